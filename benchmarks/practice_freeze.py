"""Full fine-tuning of SmolLM2-135M-Instruct on the quickstart corpus: every
layer against the bottom half frozen (spec.method.full), one run.

Two contenders, each kubetune's trainer in a fresh process, from the same
weights, on the same conversations in the same order, for the same steps:

- `all`: method.type full, every weight trains;
- `frozen_bottom`: method.full.trainableLayers the top half of the decoder
  layers (15 to 29 of 30), trainEmbeddings and trainHead false (SmolLM2's head
  is its embedding weight, tied: both stay frozen together).

Settings shared: `--steps` optimizer steps of batch 4, learning rate `--lr`
constant after no warm-up, fp32, sequences of at most 128 tokens, ZeRO-2, one
worker. Scored by one function (benchmarks/common.heldout_loss) on the same
held-out conversations (the quickstart split): the base model and both
fine-tunes. Time per step: the mean over steps 2..N from metrics.jsonl (step 1
is warm-up). Trainable parameters from outputs.json.

    .venv/bin/python benchmarks/practice_freeze.py [--steps 100]

A 20-step smoke run (`--steps 20 --heldout 40`) takes about 25 minutes on a
loaded 2-core CPU (two 135M full fine-tunes and the scoring).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import common as C

BATCH, SEED, MAX_LEN = 4, 0, 128


def _frozen_bottom(layers: int) -> dict:
    return {
        "trainableLayers": list(range(layers // 2, layers)),
        "trainEmbeddings": False,
        "trainHead": False,
    }


def train(train: str, out: str, name: str, steps: int, lr: float, freeze: bool) -> dict:
    """One kubetune full fine-tune; its model folder, seconds per step, parameters."""
    from kubetune_api import load_trainer_config, spec_to_trainer_config
    from kubetune_trainer.driver import ensure_env, run

    layers = json.loads((C.MODEL / "config.json").read_text())["num_hidden_layers"]
    method = {"type": "full"}
    if freeze:
        method["full"] = _frozen_bottom(layers)
    job = C.job(
        Path(train),
        Path(out).as_uri(),
        name,
        method=method,
        hyperparameters={
            "maxSteps": steps,
            "batchSize": BATCH,
            "seed": SEED,
            "learningRate": lr,
            "lrScheduler": "constant",
            "warmupRatio": 0.0,
            "precision": "fp32",
        },
    )
    job["spec"]["method"] = method  # C.job merges blocks; the method is replaced whole
    ensure_env()
    cfg = load_trainer_config(spec_to_trainer_config(job))
    assert run(cfg, ray_init=C.ray_init(), quiet=True) == 0
    prefix = Path(cfg.storage_prefix.removeprefix("file://"))
    _, seconds = C.steady_steps(prefix, steps)
    outputs = json.loads((prefix / "outputs.json").read_text())
    return {
        "model": outputs["model"].removeprefix("file://"),
        "seconds_per_step": seconds / max(1, steps - 1),
        "parameters": outputs["parameters"],
    }


def score(heldout: str, models: dict) -> dict:
    """Held-out loss of every model folder (and of the base model)."""
    import os

    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count())
    tok = C.tokenizer()
    rows = C.read_jsonl(heldout)
    out = {}
    for name, path in {"base": str(C.MODEL), **models}.items():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        out[name] = C.heldout_loss(model, tok, rows, MAX_LEN)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument(
        "--heldout",
        type=int,
        default=150,
        help="held-out conversations scored (a smoke run: fewer)",
    )
    C.add_split_flag(p)
    args = p.parse_args()
    C.prepare()
    train_rows, val_rows = C.split(distinct=not args.with_repeats)
    val_rows = val_rows[: args.heldout]
    work = Path(tempfile.mkdtemp(prefix="kubetune-freeze-"))
    runs, peaks = {}, {}
    try:
        data = C.write_jsonl(work / "train.jsonl", train_rows)
        heldout = C.write_jsonl(work / "heldout.jsonl", val_rows)
        for name, freeze in (("all", False), ("frozen_bottom", True)):
            runs[name], peaks[name] = C.isolated(
                __file__,
                "train",
                train=str(data),
                out=str(work / name),
                name=name.replace("_", "-"),
                steps=args.steps,
                lr=args.lr,
                freeze=freeze,
            )
            print(f"{name}: trained, peak {peaks[name]:.1f} GiB", flush=True)
        scores, _ = C.isolated(
            __file__,
            "score",
            heldout=str(heldout),
            models={k: v["model"] for k, v in runs.items()},
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print()
    print(
        f"SmolLM2-135M-Instruct, full fine-tuning, {args.steps} steps of batch {BATCH}, "
        f"lr {args.lr:g} constant, fp32; held-out: {len(val_rows)} conversations "
        f"(base model {scores['base']:.4f})"
    )
    print("| layers trained | trainable parameters | held-out loss | s/step | peak memory |")
    print("|---|---|---|---|---|")
    for name, label in (("all", "all"), ("frozen_bottom", "top half (bottom half frozen)")):
        r, params = runs[name], runs[name]["parameters"]
        print(
            f"| {label} | {params['trainable'] / 1e6:.1f}M of {params['total'] / 1e6:.1f}M | "
            f"{scores[name]:.4f} | {r['seconds_per_step']:.2f} | {peaks[name]:.1f} GiB |"
        )
    return 0


if __name__ == "__main__":
    if not C.child_main({"train": train, "score": score}):
        raise SystemExit(main())
