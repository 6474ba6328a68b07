"""The rule table: each rule's Python side catches what its CEL side is meant to."""

import pytest

from kubetune_api.rules import IMMUTABLE_FIELDS, MUTABLE_FIELDS, RULES
from kubetune_api.validation import validate_spec

BASE = {"model": {"name": "org/model"}, "dataset": {"train": {"uri": "s3://b/t.jsonl"}}}

_LR_SWEEP = {
    "hyperparameters.learningRate": {"distribution": "logUniform", "low": 1e-5, "high": 1e-3}
}

# rule id -> a spec that breaks it (and breaks nothing else)
BREAKERS = {
    "model-source": {**BASE, "model": {"name": "a", "uri": "s3://b/m"}},
    "train-source": {**BASE, "dataset": {"train": {}}},
    "validation-source": {**BASE, "dataset": {**BASE["dataset"], "validation": {}}},
    "epochs-xor-max-steps": {**BASE, "hyperparameters": {"epochs": 1, "maxSteps": 2}},
    "lora-needs-adapter-method": {**BASE, "method": {"type": "full", "lora": {}}},
    "quantization-needs-qlora": {**BASE, "method": {"type": "lora", "quantization": {}}},
    "qlora-needs-gpu": {**BASE, "method": {"type": "qlora"}, "resources": {"gpusPerWorker": 0}},
    "fp16-needs-gpu": {
        **BASE,
        "hyperparameters": {"precision": "fp16"},
        "resources": {"gpusPerWorker": 0},
    },
    "offload-optimizer-needs-zero2": {
        **BASE,
        "distributed": {"zeroStage": 1, "offloadOptimizer": True},
    },
    "offload-parameters-needs-zero3": {
        **BASE,
        "distributed": {"zeroStage": 2, "offloadParameters": True},
    },
    "early-stopping-needs-evaluation": {
        **BASE,
        "earlyStopping": {"enabled": True},
        "evaluation": {"enabled": False},
    },
    "one-parent": {
        **BASE,
        "model": {"name": "org/model", "fromJob": "a", "fromCheckpoint": "s3://b/c"},
    },
    "merge-parent-needs-parent": {**BASE, "model": {"name": "org/model", "mergeParent": True}},
    "merge-parent-not-qlora": {
        **BASE,
        "model": {"name": "org/model", "fromJob": "a", "mergeParent": True},
        "method": {"type": "qlora"},
        "resources": {"gpusPerWorker": 1},
    },
    "sweep-parallel-within-trials": {
        **BASE,
        "sweep": {"parameters": _LR_SWEEP, "trials": 2, "parallelTrials": 3},
    },
    "sweep-needs-evaluation": {
        **BASE,
        "sweep": {"parameters": _LR_SWEEP},
        "evaluation": {"enabled": False},
    },
    "sweep-lora-needs-adapter": {
        **BASE,
        "method": {"type": "full"},
        "sweep": {"parameters": {"method.lora.r": {"distribution": "choice", "values": [8]}}},
    },
    "merge-needs-adapter": {
        **BASE,
        "method": {"type": "full"},
        "output": {"mergeAdapter": True, "uri": "s3://o"},
    },
    "test-source": {**BASE, "dataset": {**BASE["dataset"], "test": {}}},
    "dpo-needs-preference-data": {**BASE, "method": {"objective": "dpo"}},
    "preference-data-needs-dpo": {
        **BASE,
        "dataset": {**BASE["dataset"], "format": "preference"},
    },
    "dpo-settings-need-dpo": {**BASE, "method": {"dpo": {"beta": 0.2}}},
    "label-smoothing-needs-sigmoid": {
        **BASE,
        "dataset": {**BASE["dataset"], "format": "preference"},
        "method": {"objective": "dpo", "dpo": {"lossType": "hinge", "labelSmoothing": 0.1}},
    },
    "early-stopping-metric-fits-objective": {
        **BASE,
        "earlyStopping": {"enabled": True, "metric": "eval_reward_margin", "mode": "max"},
    },
    "generation-needs-held-out-data": {
        **BASE,
        "dataset": {**BASE["dataset"], "validationSplit": 0},
        "evaluation": {"generation": {}},
    },
    "generation-needs-prompts": {
        **BASE,
        "dataset": {**BASE["dataset"], "format": "text"},
        "evaluation": {"generation": {"examples": 4}},
    },
}


def test_dpo_spec_with_every_setting_breaks_no_rule():
    spec = {
        **BASE,
        "dataset": {**BASE["dataset"], "format": "preference", "test": {"uri": "s3://b/x"}},
        "method": {"objective": "dpo", "dpo": {"beta": 0.5, "labelSmoothing": 0.1}},
        "earlyStopping": {"enabled": True, "metric": "eval_reward_accuracy", "mode": "max"},
        "evaluation": {"generation": {"examples": 4, "maxNewTokens": 16}},
    }
    assert validate_spec(spec).ok, validate_spec(spec).errors


def test_every_python_rule_has_a_breaking_example():
    python_rules = {r.id for r in RULES if r.python is not None}
    assert python_rules == set(BREAKERS)


@pytest.mark.parametrize("rule_id", sorted(BREAKERS))
def test_rule_fires_alone_with_its_message(rule_id):
    rule = next(r for r in RULES if r.id == rule_id)
    errors = validate_spec(BREAKERS[rule_id]).errors
    assert [e.rule for e in errors] == [rule_id], errors
    assert errors[0].message == rule.message
    assert errors[0].path == rule.field_path


def test_base_spec_breaks_no_rule():
    assert validate_spec(BASE).ok


def test_auto_zero_stage_allows_any_offload():
    spec = {**BASE, "distributed": {"offloadOptimizer": True, "offloadParameters": True}}
    assert validate_spec(spec).ok


def test_cross_field_errors_are_reported_alongside_schema_errors():
    spec = {
        **BASE,
        "hyperparameters": {"epochs": 1, "maxSteps": 2, "batchSize": 0},
        "dataset": {**BASE["dataset"], "format": "nope"},
    }
    paths = sorted(e.path for e in validate_spec(spec).errors)
    assert paths == [
        "spec.dataset.format",
        "spec.hyperparameters",
        "spec.hyperparameters.batchSize",
    ]


def test_every_rule_has_cel_or_python_and_a_fix_in_its_message():
    for rule in RULES:
        assert rule.cel or rule.python, rule.id
        # a message says how to fix it, not only what is wrong
        verbs = ("set ", "use ", "remove ", "create ", "give ", "must ")
        assert any(v in rule.message for v in verbs), rule.id


def test_immutable_and_mutable_fields_cover_the_whole_spec():
    from kubetune_api.models import FineTuneJobSpec

    aliases = {f.alias for f in FineTuneJobSpec.model_fields.values()}
    assert set(IMMUTABLE_FIELDS) | set(MUTABLE_FIELDS) == aliases
    assert not set(IMMUTABLE_FIELDS) & set(MUTABLE_FIELDS)
