"""Quality on one machine, one run: held-out loss after N steps, kubetune vs
TRL's SFTTrainer with its defaults, same model, data and LoRA adapter shape.

Both start from SmolLM2-135M-Instruct with LoRA r=16 all-linear, batch 4, N
optimizer steps, the same training conversations; both are scored by one
function (mean loss over assistant tokens of the same held-out conversations).
kubetune runs its defaults too (lr 2e-4 cosine for LoRA, packing); TRL runs
SFTConfig's defaults (lr 2e-5, linear, no packing). TRL is a benchmark-only
dependency. Each contender, and the scoring, runs in a fresh process
(common.isolated), which prints its peak memory.

    .venv/bin/python benchmarks/quality_vs_trl.py [--steps 20]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import common as C


def lora():
    from peft import LoraConfig

    return LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"
    )


def base(dtype):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(C.MODEL, dtype=dtype)
    m.config.use_cache = False
    return m


def ours(train: str, out: str, steps: int) -> dict:
    from kubetune_api import load_trainer_config, spec_to_trainer_config
    from kubetune_trainer.__main__ import ensure_env, run

    ensure_env()
    import ray

    cfg = load_trainer_config(
        spec_to_trainer_config(
            C.job(
                Path(train),
                Path(out).as_uri(),
                "quality",
                hyperparameters={"maxSteps": steps, "logEverySteps": 5},
            )
        )
    )
    ray.init(**C.ray_init())
    try:
        assert run(cfg, quiet=True) == 0
    finally:
        ray.shutdown()
    return {"adapter": str(Path(cfg.storage_prefix.removeprefix("file://")) / "adapter")}


def trl(train: str, out: str, steps: int) -> dict:
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    torch.set_num_threads(os.cpu_count())
    args = SFTConfig(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=4,
        max_length=128,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        logging_steps=5,
        bf16=False,
    )
    trainer = SFTTrainer(
        model=base(torch.float32),
        args=args,
        train_dataset=Dataset.from_list(C.read_jsonl(train)),
        peft_config=lora(),
    )
    trainer.train()
    trainer.model.save_pretrained(str(Path(out) / "adapter"))
    return {"adapter": str(Path(out) / "adapter")}


def score(heldout: str, adapters: list) -> list[float]:
    """Held-out loss of the base model (None) and of each adapter, in order."""
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    torch.set_num_threads(os.cpu_count())
    tok = AutoTokenizer.from_pretrained(C.MODEL)
    val_rows = C.read_jsonl(heldout)
    losses = []
    for adapter in adapters:
        model = base(torch.float32)
        if adapter:
            model = PeftModel.from_pretrained(model, adapter)
        losses.append(C.heldout_loss(model, tok, val_rows))
    return losses


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=20)
    C.add_split_flag(p)
    args = p.parse_args()
    C.prepare()
    train_rows, val_rows = C.split(distinct=not args.with_repeats)
    work = Path(tempfile.mkdtemp(prefix="kubetune-quality-"))
    train = C.write_jsonl(work / "train.jsonl", train_rows)
    heldout = C.write_jsonl(work / "heldout.jsonl", val_rows)
    adapters, peaks = {}, {}
    try:
        for name in ("kubetune", "trl"):
            run, peaks[name] = C.isolated(
                __file__, name, train=str(train), out=str(work / name), steps=args.steps
            )
            adapters[name] = run["adapter"]
            print(f"{name}: trained, peak {peaks[name]:.1f} GiB", flush=True)
        losses, peaks["scoring"] = C.isolated(
            __file__, "score", heldout=str(heldout), adapters=[None, *adapters.values()]
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    before, after_ours, after_trl = losses
    print()
    print(
        f"held-out loss (assistant tokens, {len(val_rows)} conversations) after {args.steps} "
        f"steps, batch 4, SmolLM2-135M-Instruct + LoRA r=16"
    )
    print(f"  base model (no training)       {before:.4f}")
    print(f"  kubetune (defaults)            {after_ours:.4f}")
    print(f"  TRL SFTTrainer (defaults)      {after_trl:.4f}")
    print(f"  kubetune - TRL                 {after_ours - after_trl:+.4f}  (lower is better)")
    print(
        "peak memory of each process tree: "
        + ", ".join(f"{k} {v:.1f} GiB" for k, v in peaks.items())
    )
    return 0


if __name__ == "__main__":
    if not C.child_main({"kubetune": ours, "trl": trl, "score": score}):
        raise SystemExit(main())
