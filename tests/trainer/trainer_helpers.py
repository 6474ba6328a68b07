"""Shared builders for the trainer tests: a tiny model from config, data, specs."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from model_fixtures import (  # noqa: F401
    SMOL,
    peaked_model,
    prepare_quickstart,
    small_lm,
    tiny_model,
)

REPO = Path(__file__).resolve().parents[2]
CHAT = REPO / ".cache/data/chatterbot-chat.jsonl"


def chat_rows(n: int) -> list[dict]:
    prepare_quickstart()
    rows = [json.loads(line) for line in CHAT.read_text().splitlines()]
    return rows[:n]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


BASE_JOB = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "t", "namespace": "default", "uid": "u1"},
    "spec": {
        "model": {"uri": "MODEL"},
        "dataset": {
            "train": {"uri": "DATA"},
            "format": "chat",
            "validationSplit": 0.1,
            "maxSeqLength": 128,
        },
        "method": {"type": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.1}},
        "hyperparameters": {
            "maxSteps": 6,
            "learningRate": 1e-3,
            "batchSize": 4,
            "precision": "fp32",
            "logEverySteps": 1,
            "seed": 7,
        },
        "distributed": {"zeroStage": 2},
        "resources": {"workers": 1, "gpusPerWorker": 0, "cpuPerWorker": "1"},
        "evaluation": {"everySteps": 3, "maxBatches": 2},
        "checkpointing": {"everySteps": 3, "keepLast": 5},
    },
}


def job(model: Path, data: Path, output_uri: str, **overrides) -> dict:
    """BASE_JOB with model/data/output set and `section={...}` merged into spec."""
    j = copy.deepcopy(BASE_JOB)
    j["spec"]["model"]["uri"] = str(model)
    j["spec"]["dataset"]["train"]["uri"] = str(data)
    j["spec"]["output"] = {"uri": output_uri}
    for key, value in overrides.items():
        if key == "name":
            j["metadata"]["name"] = value
        elif isinstance(value, dict) and key != "method":  # method is replaced whole
            j["spec"].setdefault(key, {}).update(value)
        else:
            j["spec"][key] = value
    return j


def trainer_config(j: dict):
    from kubetune_api import load_trainer_config, spec_to_trainer_config

    return load_trainer_config(spec_to_trainer_config(j))


def fit(config) -> None:
    """One driver run of a trainer config on the shared local Ray; it must succeed."""
    from kubetune_trainer.__main__ import run

    assert run(config, quiet=True) == 0, local(config, "progress.json")


def local(config, *parts) -> str:
    """A path under a file:// config's job prefix."""
    return str(Path(config.storage_prefix.removeprefix("file://"), *parts))


def metric_rows(config) -> dict[int, dict]:
    """metrics.jsonl of a config's job, by step (a later row of a step wins)."""
    with open(local(config, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f)}
