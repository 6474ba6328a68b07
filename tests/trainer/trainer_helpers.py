"""Shared builders for the trainer tests: a tiny model from config, data, specs."""

from __future__ import annotations

import copy
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SMOL = REPO / ".cache/models/SmolLM2-135M-Instruct"
CHAT = REPO / ".cache/data/chatterbot-chat.jsonl"


def prepare_quickstart() -> None:
    from kubetune_trainer import quickstart

    quickstart.prepare_model(REPO)
    quickstart.prepare_data(REPO)


def tiny_model(path: Path) -> Path:
    """A 2-layer Llama built from config (random weights) with SmolLM2's tokenizer."""
    if (path / "config.json").exists():
        return path
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    prepare_quickstart()
    tok = AutoTokenizer.from_pretrained(SMOL)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


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
