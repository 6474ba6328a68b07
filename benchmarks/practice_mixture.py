"""A two-source dataset.mixture on SmolLM2-135M-Instruct at two weightings: the
chatterbot conversations (chat) and short sums (prompt-completion), each with its
own held-out loss before and after, and the examples trained from each (the table
in docs/practice.md, "Data mixtures and multi-task").

    .venv/bin/python benchmarks/practice_mixture.py [--steps 100] [--weights 3:1,1:3]

Each weighting is one `kubetune run` (local Ray + DeepSpeed, LoRA) from the same
base, seed and steps; only the weights differ.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import yaml
from common import DATA, job, prepare, write_jsonl


def sums(n: int, seed: int = 0) -> list[dict]:
    """prompt-completion rows unlike the chat corpus: 'What is 37 plus 45?' -> '82'."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        rows.append({"prompt": f"What is {a} plus {b}? ", "completion": f"{a + b}"})
    return rows


def run(
    weights: tuple[float, float], steps: int, work: Path, sums_file: Path, eval_batches: int
) -> dict:
    from kubetune_trainer.local import LocalRun, run_local

    name = f"mix-{weights[0]:g}-{weights[1]:g}".replace(".", "p")
    doc = job(DATA, (work / "runs").as_uri(), name)
    ds = doc["spec"]["dataset"]
    del ds["train"]
    ds["validationSplit"] = 0.05
    ds["mixture"] = [
        {"id": "chat", "uri": str(DATA), "weight": weights[0]},
        {"id": "sums", "uri": str(sums_file), "format": "prompt-completion", "weight": weights[1]},
    ]
    spec = doc["spec"]
    spec["hyperparameters"].update(maxSteps=steps, learningRate=5e-4, seed=0)
    spec["hyperparameters"]["logEverySteps"] = max(1, steps // 10)
    spec["evaluation"] = {"enabled": True, "everySteps": steps, "maxBatches": eval_batches}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    t0 = time.monotonic()
    assert run_local(LocalRun(file=str(path), progress=False)) == 0
    seconds = time.monotonic() - t0
    prefix = work / "runs/bench" / name / "b"
    out = json.loads((prefix / "outputs.json").read_text())
    return {"weights": weights, "seconds": seconds, "mixture": out["mixture"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--weights", default="3:1,1:3", help="chat:sums weightings, comma separated")
    ap.add_argument("--sums", type=int, default=600, help="rows of the sums source")
    ap.add_argument(
        "--eval-batches", type=int, default=16, help="evaluation.maxBatches (of 4), per source"
    )
    args = ap.parse_args()
    prepare()
    work = Path(tempfile.mkdtemp(prefix="kubetune-mixture-"))
    sums_file = write_jsonl(work / "sums.jsonl", sums(args.sums))
    results = []
    for pair in args.weights.split(","):
        a, b = (float(x) for x in pair.split(":"))
        results.append(run((a, b), args.steps, work, sums_file, args.eval_batches))
    print(f"\n{args.steps} steps, batch 4, LoRA r16, SmolLM2-135M-Instruct, CPU:")
    print(
        "| weights chat:sums | source | share | examples trained | held-out loss before | after |"
    )
    print("|---|---|---|---|---|---|")
    for r in results:
        for s in r["mixture"]:
            print(
                f"| {r['weights'][0]:g}:{r['weights'][1]:g} | {s['id']} ({s['format']}) | "
                f"{s['weight']:.0%} | {s['trainedExamples']} | {s['initialEvalLoss']:.4f} | "
                f"{s['finalEvalLoss']:.4f} |"
            )
    for r in results:
        print(f"weights {r['weights'][0]:g}:{r['weights'][1]:g}: {r['seconds']:.0f} s")


if __name__ == "__main__":
    main()
