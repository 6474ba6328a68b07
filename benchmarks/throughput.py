"""Throughput on one machine, one run: kubetune vs a plain transformers Trainer,
and packing vs padding.

Same model (SmolLM2-135M-Instruct, LoRA r=16 all-linear, bf16 weights), same
chat data (chatterbot), same batch size (4), same steps, this machine.
Reported tokens/s count useful (non-pad) tokens only.

    .venv/bin/python benchmarks/throughput.py [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import common as C


def ours(train: Path, out: Path, name: str, packing: bool, steps: int) -> float:
    """kubetune's trainer (Ray Train + DeepSpeed ZeRO-2, 1 worker); tokens/s of
    steps 2..N from its metrics.jsonl (step 1 is warm-up)."""
    from kubetune_api import load_trainer_config, spec_to_trainer_config
    from kubetune_trainer.__main__ import run

    cfg = load_trainer_config(
        spec_to_trainer_config(
            C.job(
                train,
                out.as_uri(),
                name,
                dataset={"packing": packing},
                hyperparameters={"maxSteps": steps},
            )
        )
    )
    assert run(cfg, quiet=True) == 0
    prefix = Path(cfg.storage_prefix.removeprefix("file://"))
    rows = [json.loads(x) for x in (prefix / "metrics.jsonl").open()]
    rates = [r["tokensPerSecond"] for r in rows if r.get("loss") is not None and r["step"] > 1]
    # harmonic mean of per-step rates == total tokens / total time for equal-sized steps
    return len(rates) / sum(1 / r for r in rates)


def hf_trainer(train_rows: list, steps: int) -> float:
    """transformers.Trainer, same LoRA model and padded batches of 4."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from kubetune_trainer import data as D

    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(C.MODEL)
    examples, _ = D.build_examples(train_rows, "chat", tok, 128)
    model = AutoModelForCausalLM.from_pretrained(C.MODEL, dtype=torch.bfloat16)
    model.config.use_cache = False
    model = get_peft_model(
        model,
        LoraConfig(
            r=16,
            lora_alpha=32,
            lora_dropout=0.05,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        ),
    )
    dataset = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
    seen = {"tokens": 0}

    def collate(items):
        exs = [D.Example(i["input_ids"], i["labels"]) for i in items]
        seen["tokens"] += sum(len(e.input_ids) for e in exs)
        return D.collate(exs, [[j] for j in range(len(exs))], tok.pad_token_id, packing=False)

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 1:
                self.t, self.tokens = time.perf_counter(), seen["tokens"]
            if state.global_step == steps:
                self.rate = (seen["tokens"] - self.tokens) / (time.perf_counter() - self.t)

    clock = Clock()
    out = tempfile.mkdtemp(prefix="hf-trainer-")
    args = TrainingArguments(
        output_dir=out,
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=2e-4,
        lr_scheduler_type="cosine",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        seed=42,
        remove_unused_columns=False,
    )
    Trainer(
        model=model, args=args, train_dataset=dataset, data_collator=collate, callbacks=[clock]
    ).train()
    shutil.rmtree(out, ignore_errors=True)
    return clock.rate


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--reference-only", action="store_true",
                   help="measure only the transformers Trainer")
    args = p.parse_args()
    C.prepare()
    if args.reference_only:
        train_rows, _ = C.split()
        print(f"transformers Trainer (padded) {hf_trainer(train_rows, args.steps):.1f} tokens/s")
        return 0
    from kubetune_trainer.__main__ import ensure_env

    ensure_env()
    import ray

    train_rows, _ = C.split()
    work = Path(tempfile.mkdtemp(prefix="kubetune-bench-"))
    train = work / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in train_rows))
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        padded = ours(train, work / "out", "padded", packing=False, steps=args.steps)
        packed = ours(train, work / "out", "packed", packing=True, steps=args.steps)
    finally:
        ray.shutdown()
    reference = hf_trainer(train_rows, args.steps)
    shutil.rmtree(work, ignore_errors=True)
    print()
    print(
        f"model SmolLM2-135M-Instruct, LoRA r=16 all-linear, bf16, batch 4, max length 128, "
        f"{args.steps} steps, {os.cpu_count()} CPUs"
    )
    print(f"transformers Trainer (padded)        {reference:10.1f} useful tokens/s")
    print(f"kubetune (padded, same batches)      {padded:10.1f} useful tokens/s")
    print(f"kubetune (packed)                    {packed:10.1f} useful tokens/s")
    print(f"kubetune ÷ Trainer (padded)          {padded / reference:10.2f}   (target >= 1.0)")
    print(f"kubetune packed ÷ Trainer            {packed / reference:10.2f}")
    print(f"packing ÷ padding (useful tokens/s)  {packed / padded:10.2f}   (target >= 2)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
