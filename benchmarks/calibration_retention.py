"""Calibration and forgetting, measured on SmolLM2-135M-Instruct and the shipped data.

Trains LoRA on one chatterbot-corpus category (tech_support, a narrow domain) and
measures, before and after: the calibration error of the validation split's answer
tokens (with a fitted temperature) and the loss on a general-purpose retention set
made of other categories (trivia, science, history, literature, psychology, ai),
which the job never trains on. Prints outputs.json's two sections.

    .venv/bin/python benchmarks/calibration_retention.py [--steps 16] [--lr 5e-4]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

import yaml
from common import MODEL, REPO, prepare

TRAIN = ("tech_support",)
RETAIN = ("trivia", "science", "history", "literature", "psychology", "ai")


def category_rows(names: tuple[str, ...]) -> list[dict]:
    """chatterbot-corpus's English conversations of some categories, as chat rows
    (the quickstart's conversion)."""
    from kubetune_trainer.quickstart import chat_rows

    return chat_rows(names)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--method", default="lora", choices=("lora", "full"))
    args = ap.parse_args()
    prepare()
    work = Path(tempfile.mkdtemp(prefix="kubetune-calret-"))
    train, retain = category_rows(TRAIN), category_rows(RETAIN)
    random.Random(0).shuffle(retain)
    for name, rows in (("train", train), ("retain", retain)):
        (work / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    method = {"type": args.method}
    if args.method == "lora":
        method["lora"] = {"r": 16, "alpha": 32}
    job = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "calret"},
        "spec": {
            "model": {"uri": str(MODEL)},
            "dataset": {
                "train": {"uri": str(work / "train.jsonl")},
                "format": "chat",
                "validationSplit": 0.1,
                "maxSeqLength": 128,
            },
            "method": method,
            "hyperparameters": {
                "maxSteps": args.steps,
                "learningRate": args.lr,
                "batchSize": 4,
                "precision": "fp32",
                "logEverySteps": 4,
            },
            "distributed": {"zeroStage": 2},
            "resources": {"workers": 1, "gpusPerWorker": 0, "cpuPerWorker": "2"},
            "evaluation": {
                "everySteps": args.steps,
                "maxBatches": 8,
                "calibration": {"fitTemperature": True},
                "retention": {
                    "dataset": {"uri": str(work / "retain.jsonl"), "format": "chat"},
                    "maxExamples": 64,
                    "maxRegression": 0.02,
                },
            },
            "checkpointing": {"everySteps": args.steps, "keepLast": 1},
            "output": {"uri": (work / "runs").as_uri()},
        },
    }
    (work / "job.yaml").write_text(yaml.safe_dump(job))
    print(f"train {len(train)} rows ({', '.join(TRAIN)}), retention {len(retain)} rows")
    sys.path.insert(0, str(REPO / "trainer"))
    from kubetune_trainer.local import LocalRun, run_local

    rc = run_local(LocalRun(file=str(work / "job.yaml"), progress=False))
    outputs = next((work / "runs").rglob("outputs.json"), None)
    if outputs is not None:
        out = json.loads(outputs.read_text())
        print(json.dumps({k: out.get(k) for k in ("calibration", "retention")}, indent=2))
        print(f"held-out loss {out.get('initialEvalLoss')} -> {out.get('finalEvalLoss')}")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
