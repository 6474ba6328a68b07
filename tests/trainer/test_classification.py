"""method.task classification: one real run per method (local Ray, DeepSpeed ZeRO-2,
the 2-layer tiny Llama) on a separable synthetic set whose label is named by the
text's last word. Accuracy before (the base with its new head) and after, macro-F1
and label ECE in metrics, outputs.json, status and the summary; the saved folder
loads with AutoModelForSequenceClassification, its labels round-trip, and its
predictions on the validation rows give the reported accuracy and F1 again.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import trainer_helpers as H

pytestmark = [pytest.mark.trainer, pytest.mark.timeout(600)]

KEYWORDS = {"apple": "fruit", "truck": "vehicle", "otter": "animal"}
FILLER = [
    "the",
    "a",
    "one",
    "big",
    "small",
    "red",
    "old",
    "new",
    "some",
    "this",
    "that",
    "my",
    "your",
    "our",
    "blue",
    "green",
]


def _rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    words = list(KEYWORDS)
    rows = []
    for i in range(n):
        word = words[i % len(words)]
        text = " ".join(rng.choices(FILLER, k=rng.randint(3, 7)) + [word])
        rows.append({"text": text, "label": KEYWORDS[word]})
    rng.shuffle(rows)
    return rows


def _macro_f1(pred: list[int], gold: list[int], k: int) -> float:
    scores = []
    for j in range(k):
        tp = sum(p == j and g == j for p, g in zip(pred, gold, strict=True))
        fp = sum(p == j and g != j for p, g in zip(pred, gold, strict=True))
        fn = sum(p != j and g == j for p, g in zip(pred, gold, strict=True))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / k


def _predict(folder: Path, rows: list[dict]) -> tuple[list[int], dict]:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder)
    model.eval()
    pred = []
    with torch.no_grad():
        for r in rows:  # one row at a time: no padding at all
            ids = torch.tensor([tok(r["text"])["input_ids"]])
            pred.append(int(model(input_ids=ids).logits.argmax(-1)))
    return pred, model.config.id2label


@pytest.fixture(scope="module")
def runs(_ray_session, tmp_path_factory):
    from lineage_chain import start_ray

    start_ray()
    tmp = tmp_path_factory.mktemp("classify")
    model = H.tiny_model(tmp / "tiny")
    train = H.write_jsonl(tmp / "train.jsonl", _rows(96, 1))
    val_rows = _rows(30, 2)
    val = H.write_jsonl(tmp / "val.jsonl", val_rows)
    out = {}
    for method, lr in (("lora", 5e-3), ("full", 2e-3)):
        job = H.job(
            model,
            train,
            (tmp / f"out-{method}").as_uri(),
            name=f"cls-{method}",
            dataset={"format": "classification", "validation": {"uri": str(val)}},
            method={"task": "classification", "type": method}
            | ({"lora": {"r": 8, "alpha": 16, "dropout": 0.0}} if method == "lora" else {}),
            hyperparameters={"maxSteps": 16, "learningRate": lr, "batchSize": 8},
            evaluation={"everySteps": 16, "maxBatches": None},
            checkpointing={"everySteps": 16},
            output={"mergeAdapter": method == "lora"},
            # watched, never triggered in one evaluation after the base: the metric is reported
            earlyStopping={"enabled": True, "metric": "eval_accuracy", "patience": 3},
        )
        cfg = H.trainer_config(job)
        H.fit(cfg)
        out[method] = cfg
    return out, val_rows


@pytest.mark.parametrize("method", ["lora", "full"])
def test_accuracy_rises_and_the_saved_classifier_reproduces_it(runs, method):
    from kubetune_operator.progress import progress_to_status
    from kubetune_operator.storage_reader import read_snapshot
    from kubetune_trainer.local import summary
    from kubetune_trainer.storage import JobStorage

    configs, val_rows = runs
    cfg = configs[method]
    prefix = Path(H.local(cfg))
    outputs = json.loads((prefix / "outputs.json").read_text())
    c = outputs["classification"]
    labels = sorted(set(KEYWORDS.values()))
    assert c["labels"] == labels and c["examples"] == len(val_rows)
    rows = H.metric_rows(cfg)
    assert rows[0]["evalAccuracy"] == c["accuracyBefore"]
    assert rows[16]["evalAccuracy"] == c["accuracy"]
    print(f"{method}: {c}")
    assert c["accuracy"] >= 0.9 and c["accuracy"] > c["accuracyBefore"] + 0.2, c
    assert c["f1"] > c["f1Before"] and 0 <= c["ece"] <= 1 and 0 <= c["eceBefore"] <= 1
    assert rows[16]["evalLoss"] < rows[0]["evalLoss"]

    folder = prefix / ("merged" if method == "lora" else "model")
    pred, id2label = _predict(folder, val_rows)
    assert id2label == dict(enumerate(labels))
    gold = [labels.index(r["label"]) for r in val_rows]
    accuracy = sum(p == g for p, g in zip(pred, gold, strict=True)) / len(gold)
    assert accuracy == pytest.approx(c["accuracy"], abs=1e-9)
    assert _macro_f1(pred, gold, len(labels)) == pytest.approx(c["f1"], abs=1e-9)
    # every saved folder is listed as a classifier over the labels, for a serving engine
    kinds = {a["kind"]: a for a in outputs["artifacts"]}
    assert set(kinds) == ({"adapter", "merged"} if method == "lora" else {"full"})
    assert all(a["labels"] == labels for a in kinds.values()), kinds
    if method == "lora":  # the head trained and was saved with the adapter
        adapter = json.loads((prefix / "adapter/adapter_config.json").read_text())
        assert adapter["task_type"] == "SEQ_CLS" and "score" in adapter["modules_to_save"]

    snap = read_snapshot(str(prefix), None, {}, schemes=("file",))
    metrics = progress_to_status(snap)["metrics"]
    assert metrics["evalAccuracy"] == pytest.approx(c["accuracy"])
    assert metrics["evalAccuracyBefore"] == pytest.approx(c["accuracyBefore"])
    assert metrics["evalF1"] == pytest.approx(c["f1"])
    assert metrics["evalLabelEce"] == pytest.approx(c["ece"], abs=1e-6)
    text = summary(JobStorage(cfg.storage_prefix, cfg.spec.output))
    assert f"labels:       3 ({', '.join(labels)})" in text
    assert f"accuracy {c['accuracyBefore']:.4f} -> {c['accuracy']:.4f}" in text
