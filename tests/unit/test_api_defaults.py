"""Defaults a practitioner would pick, and the defaults that depend on other fields."""

import pytest

from kubetune_api import models
from kubetune_api.validation import SpecError, apply_defaults, resolve_spec, validate_spec

MINIMAL = {"model": {"name": "org/model"}, "dataset": {"train": {"uri": "s3://bucket/train.jsonl"}}}


def test_minimal_spec_gets_documented_defaults():
    spec = models.FineTuneJobSpec.model_validate(apply_defaults(MINIMAL)).to_dict()
    assert spec["method"] == {"task": "generation", "objective": "sft", "type": "lora"}
    assert spec["dataset"]["format"] == "chat"
    assert spec["dataset"]["maxSeqLength"] == 2048
    assert spec["dataset"]["packing"] is True
    assert spec["dataset"]["validationSplit"] == 0.05
    hp = spec["hyperparameters"]
    assert (hp["batchSize"], hp["gradientAccumulationSteps"]) == (4, 1)
    assert (hp["lrScheduler"], hp["warmupRatio"], hp["precision"]) == ("cosine", 0.03, "bf16")
    assert "epochs" not in hp and "maxSteps" not in hp and "learningRate" not in hp
    assert spec["distributed"] == {
        "zeroStage": "auto",
        "offloadOptimizer": False,
        "offloadParameters": False,
    }
    res = spec["resources"]
    assert (res["workers"], res["gpusPerWorker"], res["gpuResourceName"]) == (
        1,
        1,
        "nvidia.com/gpu",
    )
    assert spec["checkpointing"] == {
        "everySteps": 200,
        "keepLast": 3,
        "saveOnStop": True,
        "terminationGracePeriodSeconds": 120,
    }
    assert spec["evaluation"]["enabled"] is True
    assert spec["earlyStopping"]["enabled"] is False
    assert spec["backoffLimit"] == 3 and spec["suspend"] is False
    assert spec["model"]["trustRemoteCode"] is False


@pytest.mark.parametrize("method, lr", [("lora", 2e-4), ("qlora", 2e-4), ("full", 2e-5)])
def test_resolve_fills_method_dependent_defaults(method, lr):
    raw = {**MINIMAL, "method": {"type": method}}
    resolved = resolve_spec(raw)
    assert resolved.hyperparameters.learning_rate == lr
    assert resolved.hyperparameters.epochs == 1.0
    assert (resolved.method.lora is not None) == (method != "full")
    assert (resolved.method.quantization is not None) == (method == "qlora")
    if method != "full":
        assert resolved.method.lora.target_modules == ["all-linear"]
        assert (resolved.method.lora.r, resolved.method.lora.alpha) == (16, 32)


def test_resolve_keeps_explicit_values():
    raw = {**MINIMAL, "hyperparameters": {"maxSteps": 50, "learningRate": 1e-3}}
    resolved = resolve_spec(raw)
    assert resolved.hyperparameters.max_steps == 50
    assert resolved.hyperparameters.epochs is None
    assert resolved.hyperparameters.learning_rate == 1e-3


def test_resolve_raises_with_field_paths():
    with pytest.raises(SpecError) as err:
        resolve_spec({**MINIMAL, "hyperparameters": {"epochs": 1, "maxSteps": 5}})
    assert [e.path for e in err.value.errors] == ["spec.hyperparameters"]


def test_camel_case_in_snake_case_in_python():
    spec = models.FineTuneJobSpec.model_validate(
        {**MINIMAL, "hyperparameters": {"gradientAccumulationSteps": 8}}
    )
    assert spec.hyperparameters.gradient_accumulation_steps == 8
    assert spec.to_dict()["hyperparameters"]["gradientAccumulationSteps"] == 8


def test_unknown_fields_are_errors_with_a_suggestion():
    result = validate_spec({**MINIMAL, "hyperparameters": {"learningRte": 0.1}})
    assert [(e.path, e.message, e.hint) for e in result.errors] == [
        ("spec.hyperparameters.learningRte", "unknown field", "did you mean learningRate?")
    ]


def test_zero_stage_accepts_auto_and_integers_only():
    for ok in ("auto", 0, 3):
        assert validate_spec({**MINIMAL, "distributed": {"zeroStage": ok}}).ok
    for bad in (4, "three", -1):
        errors = validate_spec({**MINIMAL, "distributed": {"zeroStage": bad}}).errors
        assert [e.path for e in errors] == ["spec.distributed.zeroStage"], bad


def test_status_phase_terminality():
    assert models.Phase("Succeeded").is_terminal and models.Phase("Failed").is_terminal
    assert not any(
        models.Phase(p).is_terminal for p in ("Pending", "Queued", "Running", "Suspended")
    )


@pytest.mark.parametrize("method, lr", [("lora", 5e-5), ("full", 1e-6)])
def test_dpo_gets_its_settings_and_a_smaller_learning_rate(method, lr):
    spec = resolve_spec(
        {
            **MINIMAL,
            "dataset": {**MINIMAL["dataset"], "format": "preference"},
            "method": {"objective": "dpo", "type": method},
        }
    )
    assert spec.hyperparameters.learning_rate == lr
    assert spec.method.dpo.to_dict() == {"beta": 0.1, "lossType": "sigmoid", "labelSmoothing": 0.0}
