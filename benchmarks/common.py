"""Shared setup for the benchmark scripts: the quickstart model and data, a
held-out set, and one held-out loss function used for every contender."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "trainer"))
sys.path.insert(0, str(REPO / "operator"))

MODEL = REPO / ".cache/models/SmolLM2-135M-Instruct"
DATA = REPO / ".cache/data/chatterbot-chat.jsonl"


def prepare() -> None:
    from kubetune_trainer import quickstart

    quickstart.prepare_model(REPO)
    quickstart.prepare_data(REPO)


def chat_rows() -> list[dict]:
    """The chatterbot conversations, one exchange each, in file (topic) order."""
    return [json.loads(line) for line in DATA.read_text().splitlines()]


def split(n_val: int = 150, seed: int = 0):
    import random

    rows = chat_rows()
    random.Random(seed).shuffle(rows)
    return rows[n_val:], rows[:n_val]


def varied_chats(seed: int = 0, median: float = 3.0, sigma: float = 1.2) -> list[dict]:
    """Multi-turn conversations of varied lengths from the chatterbot exchanges:
    consecutive exchanges of one topic file chained into one conversation, the
    number of exchanges log-normal (median 3, sigma 1.2, at most 40), so lengths
    spread over an order of magnitude the way real chat data does."""
    import random

    rows = chat_rows()
    rng = random.Random(seed)
    out, i = [], 0
    while i < len(rows):
        k = max(1, min(40, round(math.exp(rng.gauss(math.log(median), sigma)))))
        out.append({"messages": [m for r in rows[i : i + k] for m in r["messages"]]})
        i += k
    return out


def job(train: Path, out: str, name: str, **spec) -> dict:
    base = {
        "model": {"uri": str(MODEL)},
        "dataset": {
            "train": {"uri": str(train)},
            "format": "chat",
            "maxSeqLength": 128,
            "validationSplit": 0.0,
        },
        "method": {"type": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.05}},
        "hyperparameters": {
            "maxSteps": 10,
            "batchSize": 4,
            "precision": "bf16",
            "logEverySteps": 1,
        },
        "distributed": {"zeroStage": 2},
        "resources": {"workers": 1, "gpusPerWorker": 0, "cpuPerWorker": "2"},
        "evaluation": {"enabled": False},
        "checkpointing": {"everySteps": 100000},
        "output": {"uri": out},
    }
    for key, value in spec.items():
        base.setdefault(key, {}).update(value)
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": "bench", "uid": "b"},
        "spec": base,
    }


def heldout_loss(model, tokenizer, rows, max_len: int = 128, batch: int = 8) -> float:
    """Mean loss over assistant tokens of the held-out conversations (kubetune's
    tokenization and masks), the same function for every contender."""
    import torch
    import torch.nn.functional as F

    from kubetune_trainer import data as D

    examples, _ = D.build_examples(rows, "chat", tokenizer, max_len)
    total = count = 0.0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(examples), batch):
            b = D.collate(
                examples,
                [[j] for j in range(i, min(i + batch, len(examples)))],
                tokenizer.pad_token_id,
                packing=False,
            )
            labels = b.pop("labels")
            logits = model(**b).logits.float()[:, :-1]
            target = labels[:, 1:]
            mask = target != D.IGNORE
            total += F.cross_entropy(logits[mask], target[mask], reduction="sum").item()
            count += mask.sum().item()
    return total / count if count else math.nan
