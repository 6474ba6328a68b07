"""The rule table: each rule's Python side catches what its CEL side is meant to."""

import pytest

from kubetune_api.rules import IMMUTABLE_FIELDS, MUTABLE_FIELDS, RULES
from kubetune_api.validation import resolve_spec, validate_spec

BASE = {"model": {"name": "org/model"}, "dataset": {"train": {"uri": "s3://bucket/t.jsonl"}}}

_LR_SWEEP = {
    "hyperparameters.learningRate": {"distribution": "logUniform", "low": 1e-5, "high": 1e-3}
}

# rule id -> a spec that breaks it (and breaks nothing else)
GRPO = {"grader": {"type": "stringCheck", "name": "x", "reference": "y", "operation": "eq"}}
MIXTURE = [{"id": "chat", "uri": "s3://bucket/c.jsonl"}, {"id": "qa", "uri": "s3://bucket/q.jsonl"}]
MIXED = {**BASE, "dataset": {"mixture": MIXTURE}}
# method.task classification on its own format (rows of text and label)
CLS = {
    **BASE,
    "dataset": {**BASE["dataset"], "format": "classification"},
    "method": {"task": "classification"},
}
BREAKERS = {
    "classification-needs-classification-data": {**BASE, "method": {"task": "classification"}},
    "classification-data-needs-task": {
        **BASE,
        "dataset": {**BASE["dataset"], "format": "classification"},
    },
    "classification-needs-sft": {
        **CLS,
        "method": {"task": "classification", "objective": "distill"},
    },
    "classification-not-qlora": {
        **CLS,
        "method": {"task": "classification", "type": "qlora"},
        "resources": {"gpusPerWorker": 1},
    },
    "classification-trains-head": {
        **CLS,
        "method": {"task": "classification", "type": "full", "full": {"trainHead": False}},
    },
    "classification-without-model-fromjob": {**CLS, "model": {"name": "org/m", "fromJob": "a"}},
    "classification-without-model-fromcheckpoint": {
        **CLS,
        "model": {"name": "org/m", "fromCheckpoint": "s3://bucket/run/checkpoints/step-00000010"},
    },
    "classification-without-dataset-mixture": {
        **CLS,
        "dataset": {"format": "classification", "mixture": MIXTURE},
    },
    "classification-without-evaluation-generation": {
        **CLS,
        "evaluation": {"generation": {"examples": 4}},
    },
    "classification-without-evaluation-retention": {
        **CLS,
        "evaluation": {"retention": {"dataset": {"uri": "s3://bucket/r.jsonl"}}},
    },
    "classification-without-output-gguf": {
        **CLS,
        "method": {"task": "classification", "type": "full"},
        "output": {"gguf": {"types": ["q8_0"]}, "uri": "s3://bucket"},
    },
    "classification-without-output-interpolation": {
        **CLS,
        "output": {"interpolation": {"weights": [0.5, 1.0]}, "uri": "s3://bucket"},
    },
    "train-xor-mixture": {**BASE, "dataset": {**BASE["dataset"], "mixture": MIXTURE}},
    "mixture-source": {
        **BASE,
        "dataset": {"mixture": [MIXTURE[0], {"id": "qa", "uri": "s3://bucket/q", "name": "o/d"}]},
    },
    "mixture-held-out-per-source": {
        **MIXED,
        "dataset": {**MIXED["dataset"], "validation": {"uri": "s3://bucket/v.jsonl"}},
    },
    "mixture-clean-one-format": {**MIXED, "dataset": {**MIXED["dataset"], "clean": {}}},
    "mixture-formats-fit-objective": {
        **MIXED,
        "dataset": {"mixture": [MIXTURE[0], {**MIXTURE[1], "format": "preference"}]},
    },
    "model-source": {**BASE, "model": {"name": "a", "uri": "s3://bucket/m"}},
    "train-source": {**BASE, "dataset": {"train": {}}},
    "validation-source": {**BASE, "dataset": {**BASE["dataset"], "validation": {}}},
    "clean-redact-needs-pii": {
        **BASE,
        "dataset": {**BASE["dataset"], "clean": {"action": "redact", "pii": []}},
    },
    "epochs-xor-max-steps": {**BASE, "hyperparameters": {"epochs": 1, "maxSteps": 2}},
    "lora-needs-adapter-method": {**BASE, "method": {"type": "full", "lora": {}}},
    "quantization-needs-qlora": {**BASE, "method": {"type": "lora", "quantization": {}}},
    "full-settings-need-full": {**BASE, "method": {"type": "lora", "full": {"layerLrDecay": 0.9}}},
    "full-trains-something": {
        **BASE,
        "method": {
            "type": "full",
            "full": {"trainableLayers": [], "trainEmbeddings": False, "trainHead": False},
        },
    },
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
        "model": {"name": "org/model", "fromJob": "a", "fromCheckpoint": "s3://bucket/c"},
    },
    "merge-parent-needs-parent": {**BASE, "model": {"name": "org/model", "mergeParent": True}},
    "merge-parent-not-qlora": {
        **BASE,
        "model": {"name": "org/model", "fromJob": "a", "mergeParent": True},
        "method": {"type": "qlora"},
        "resources": {"gpusPerWorker": 1},
    },
    "prune-adapter-needs-merge": {
        **BASE,
        "model": {"name": "org/model", "prune": {"keepLayers": 8}},
    },
    "prune-parent-needs-merge": {
        **BASE,
        "model": {"name": "org/model", "fromJob": "a", "prune": {"keepLayers": 8}},
        "output": {"mergeAdapter": True, "uri": "s3://bucket"},
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
        "output": {"mergeAdapter": True, "uri": "s3://bucket"},
    },
    "gguf-needs-whole-model": {
        **BASE,
        "output": {"gguf": {"types": ["q8_0"]}, "uri": "s3://bucket"},
    },
    "interpolation-unique-weights": {
        **BASE,
        "output": {"interpolation": {"weights": [0.5, 1.0, 0.5]}, "uri": "s3://bucket"},
    },
    "interpolation-fixed-weight-listed": {
        **BASE,
        "output": {
            "interpolation": {"weights": [0.5, 1.0], "select": "fixed", "weight": 0.25},
            "uri": "s3://bucket",
        },
    },
    "interpolation-weight-needs-fixed": {
        **BASE,
        "output": {"interpolation": {"weights": [0.5, 1.0], "weight": 0.5}, "uri": "s3://bucket"},
    },
    "interpolation-needs-evaluation": {
        **BASE,
        "output": {"interpolation": {"weights": [0.5, 1.0]}, "uri": "s3://bucket"},
        "evaluation": {"enabled": False},
    },
    "test-source": {**BASE, "dataset": {**BASE["dataset"], "test": {}}},
    "dpo-needs-preference-data": {**BASE, "method": {"objective": "dpo"}},
    "preference-data-needs-dpo": {
        **BASE,
        "dataset": {**BASE["dataset"], "format": "preference"},
    },
    "dpo-settings-need-dpo": {**BASE, "method": {"dpo": {"beta": 0.2}}},
    "kto-needs-feedback-data": {**BASE, "method": {"objective": "kto"}},
    "feedback-data-needs-kto": {
        **BASE,
        "dataset": {**BASE["dataset"], "format": "feedback"},
    },
    "kto-settings-need-kto": {**BASE, "method": {"kto": {"beta": 0.2}}},
    "grpo-needs-prompt-data": {**BASE, "method": {"objective": "grpo", "grpo": GRPO}},
    "prompt-data-needs-grpo": {**BASE, "dataset": {**BASE["dataset"], "format": "prompt"}},
    "grpo-settings-need-grpo": {**BASE, "method": {"grpo": GRPO}},
    "grpo-needs-grpo-settings": {
        **BASE,
        "dataset": {**BASE["dataset"], "format": "prompt"},
        "method": {"objective": "grpo"},
    },
    "grpo-completions-fit-max-seq-length": {
        **BASE,
        "dataset": {**BASE["dataset"], "format": "prompt", "maxSeqLength": 64},
        "method": {"objective": "grpo", "grpo": {**GRPO, "maxNewTokens": 64}},
    },
    "distill-settings-need-distill": {**BASE, "method": {"distill": {"weight": 0.5}}},
    "distill-teacher-source": {
        **BASE,
        "method": {
            "objective": "distill",
            "distill": {"teacher": {"name": "org/big", "uri": "s3://models/big"}},
        },
    },
    "distill-teacher-job-revision": {
        **BASE,
        "method": {
            "objective": "distill",
            "distill": {"teacher": {"fromJob": "sft-teacher", "revision": "main"}},
        },
    },
    "distill-generation-needs-prompts": {
        **BASE,
        "dataset": {**BASE["dataset"], "format": "text"},
        "method": {"objective": "distill", "distill": {"mode": "sequence"}},
    },
    "distill-on-policy-needs-logits": {
        **BASE,
        "method": {
            "objective": "distill",
            "distill": {"mode": "sequence", "onPolicyFraction": 0.5},
        },
    },
    "distill-tokens-needs-logits": {
        **BASE,
        "method": {"objective": "distill", "distill": {"mode": "sequence", "tokens": "all"}},
    },
    "distill-answers-fit-max-seq-length": {
        **BASE,
        "dataset": {**BASE["dataset"], "maxSeqLength": 64},
        "method": {"objective": "distill", "distill": {"mode": "sequence", "maxNewTokens": 64}},
    },
    "label-smoothing-needs-sigmoid": {
        **BASE,
        "dataset": {**BASE["dataset"], "format": "preference"},
        "method": {"objective": "dpo", "dpo": {"lossType": "hinge", "labelSmoothing": 0.1}},
    },
    "early-stopping-metric-fits-objective": {
        **BASE,
        "earlyStopping": {"enabled": True, "metric": "eval_reward_margin", "mode": "max"},
    },
    "early-stopping-mode-fits-metric": {
        **BASE,
        "earlyStopping": {"metric": "eval_token_accuracy", "mode": "min"},
    },
    "sweep-metric-fits-objective": {
        **BASE,
        "sweep": {"parameters": _LR_SWEEP, "metric": "eval_reward_margin"},
    },
    "sweep-mode-fits-metric": {**BASE, "sweep": {"parameters": _LR_SWEEP, "mode": "max"}},
    # the grace period defaulted: no gracePeriod, no evaluation.everySteps, so the
    # checkpoint cadence (200) against 100 steps
    "sweep-grace-period-within-max-steps": {
        **BASE,
        "hyperparameters": {"maxSteps": 100},
        "sweep": {"parameters": _LR_SWEEP},
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
    "calibration-needs-held-out-data": {
        **BASE,
        "dataset": {**BASE["dataset"], "validationSplit": 0},
        "evaluation": {"calibration": {}},
    },
    "calibration-needs-answer-tokens": {
        **BASE,
        "dataset": {**BASE["dataset"], "format": "preference"},
        "method": {"objective": "dpo"},
        "evaluation": {"calibration": {}},
    },
    "save-temperature-needs-fit": {
        **BASE,
        "evaluation": {"calibration": {"saveTemperature": True}},
    },
    "retention-source": {
        **BASE,
        "evaluation": {"retention": {"dataset": {"format": "chat"}}},
    },
    "retention-fail-needs-bound": {
        **BASE,
        "evaluation": {
            "retention": {"dataset": {"uri": "s3://bucket/r.jsonl"}, "failOnRegression": True}
        },
    },
    "retention-generation-needs-generation": {
        **BASE,
        "evaluation": {
            "retention": {"dataset": {"uri": "s3://bucket/r.jsonl"}, "generation": True}
        },
    },
    "retention-generation-needs-prompts": {
        **BASE,
        "evaluation": {
            "generation": {},
            "retention": {
                "dataset": {"uri": "s3://bucket/r.jsonl", "format": "text"},
                "generation": True,
            },
        },
    },
}


def test_dpo_spec_with_every_setting_breaks_no_rule():
    spec = {
        **BASE,
        "dataset": {**BASE["dataset"], "format": "preference", "test": {"uri": "s3://bucket/x"}},
        "method": {"objective": "dpo", "dpo": {"beta": 0.5, "labelSmoothing": 0.1}},
        "earlyStopping": {"enabled": True, "metric": "eval_reward_accuracy", "mode": "max"},
        "evaluation": {"generation": {"examples": 4, "maxNewTokens": 16}},
    }
    assert validate_spec(spec).ok, validate_spec(spec).errors


def test_calibration_and_retention_with_every_setting_break_no_rule():
    spec = {
        **BASE,
        "evaluation": {
            "generation": {"examples": 4},
            "calibration": {"fitTemperature": True, "saveTemperature": True},
            "retention": {
                "dataset": {"name": "org/general", "split": "test", "format": "alpaca"},
                "maxExamples": 64,
                "maxRegression": 0.05,
                "failOnRegression": True,
                "generation": True,
            },
        },
    }
    assert validate_spec(spec).ok, validate_spec(spec).errors
    # a format without answer tokens is refused by the schema itself
    spec["evaluation"]["retention"]["dataset"]["format"] = "preference"
    assert not validate_spec(spec).ok


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


def test_a_classification_job_breaks_no_rule_with_either_method():
    assert validate_spec(CLS).ok, validate_spec(CLS).errors
    full = {**CLS, "method": {"task": "classification", "type": "full", "full": {}}}
    assert validate_spec(full).ok, validate_spec(full).errors
    assert resolve_spec(full).method.task == "classification"
    assert resolve_spec(BASE).method.task == "generation"  # the default


def test_a_mixture_breaks_no_rule_and_resolves_its_formats():
    spec = {
        **MIXED,
        "dataset": {
            "format": "chat",
            "mixture": [
                {**MIXTURE[0], "weight": 3},
                {**MIXTURE[1], "format": "alpaca", "weight": 1},
            ],
            "test": {"uri": "s3://bucket/t.jsonl"},
        },
    }
    assert validate_spec(spec).ok, validate_spec(spec).errors
    ds = resolve_spec(spec).dataset
    assert [ds.format_of(s) for s in ds.train_sources()] == ["chat", "alpaca"]
    dpo = {
        **MIXED,
        "method": {"objective": "dpo"},
        "dataset": {**MIXED["dataset"], "format": "preference"},
    }
    assert validate_spec(dpo).ok, validate_spec(dpo).errors


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


def _sweep_job(steps: int, **blocks) -> dict:
    spec = {**BASE, "hyperparameters": {"maxSteps": steps}, "sweep": {"parameters": _LR_SWEEP}}
    for key, value in blocks.items():
        spec[key] = {**spec.get(key, {}), **value}
    return spec


@pytest.mark.parametrize(
    "steps, blocks, ok",
    [
        # gracePeriod, when given, is what counts (even with evaluations beyond maxSteps)
        (100, {"sweep": {"parameters": _LR_SWEEP, "earlyStopping": {"gracePeriod": 100}}}, True),
        (100, {"sweep": {"parameters": _LR_SWEEP, "earlyStopping": {"gracePeriod": 101}}}, False),
        # else the first evaluation, else the first checkpoint
        (100, {"evaluation": {"everySteps": 50}}, True),
        (100, {"evaluation": {"everySteps": 150}, "checkpointing": {"everySteps": 20}}, False),
        (100, {"checkpointing": {"everySteps": 100}}, True),
        (99, {"checkpointing": {"everySteps": 100}}, False),
        # no early termination: no grace period to fit
        (10, {"sweep": {"parameters": _LR_SWEEP, "earlyStopping": {"enabled": False}}}, True),
    ],
)
def test_the_asha_grace_period_fits_the_steps_given_or_defaulted(steps, blocks, ok):
    errors = validate_spec(_sweep_job(steps, **blocks)).errors
    assert [e.rule for e in errors] == ([] if ok else ["sweep-grace-period-within-max-steps"])


def test_the_grace_period_is_not_checked_against_epochs():
    """With epochs the steps depend on the data's size, which neither door sees."""
    spec = {**_sweep_job(1), "hyperparameters": {"epochs": 1}}
    assert validate_spec(spec).ok


@pytest.mark.parametrize(
    "block, metric, mode, ok",
    [
        ("earlyStopping", "eval_loss", "min", True),
        ("earlyStopping", "eval_loss", "max", False),  # a loss maximised
        ("earlyStopping", "eval_perplexity", "max", False),
        ("earlyStopping", "eval_token_accuracy", "min", False),  # an accuracy minimised
        ("earlyStopping", "eval_token_accuracy", None, True),  # mode follows the metric
        ("sweep", "eval_token_accuracy", "max", True),
        ("sweep", "eval_token_accuracy", "min", False),
        ("sweep", "eval_perplexity", "max", False),
        ("sweep", "eval_perplexity", None, True),
    ],
)
def test_a_mode_must_be_its_metrics_direction(block, metric, mode, ok):
    spec = {**BASE, "sweep": {"parameters": _LR_SWEEP}} if block == "sweep" else dict(BASE)
    spec[block] = {**spec.get(block, {}), "metric": metric}
    if mode:
        spec[block]["mode"] = mode
    errors = validate_spec(spec).errors
    want = (
        []
        if ok
        else [f"{'early-stopping' if block == 'earlyStopping' else 'sweep'}-mode-fits-metric"]
    )
    assert [e.rule for e in errors] == want


@pytest.mark.parametrize(
    "objective, metric, ok",
    [
        ("dpo", "eval_reward_accuracy", True),
        ("dpo", "eval_loss", True),
        ("dpo", "eval_perplexity", False),  # SFT's metric: a DPO evaluation never reports it
        ("sft", "eval_token_accuracy", True),
        ("sft", "eval_reward_margin", False),
    ],
)
def test_a_sweep_ranks_on_a_metric_its_objective_reports(objective, metric, ok):
    spec = {**BASE, "sweep": {"parameters": _LR_SWEEP, "metric": metric}}
    if objective == "dpo":
        spec["method"] = {"objective": "dpo"}
        spec["dataset"] = {**BASE["dataset"], "format": "preference"}
    errors = validate_spec(spec).errors
    assert [e.rule for e in errors] == ([] if ok else ["sweep-metric-fits-objective"])


def test_resolve_fills_the_early_stopping_mode_from_the_metric():
    spec = {**BASE, "earlyStopping": {"metric": "eval_token_accuracy"}}
    assert resolve_spec(spec).early_stopping.mode == "max"
    assert resolve_spec(BASE).early_stopping.mode == "min"
