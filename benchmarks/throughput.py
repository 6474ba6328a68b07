"""Throughput on one machine, one run: kubetune vs a plain transformers Trainer,
and packing vs padding.

Same model (SmolLM2-135M-Instruct, LoRA r=16 all-linear, bf16), same data, same
batch size, same steps, this machine. The Trainer is fed exactly the batches
kubetune's padded run trains on (kubetune's epoch order, sequential sampler),
so the padded comparison is batch for batch. Reported tokens/s count useful
(non-pad) tokens only, over steps 2..N (step 1 is warm-up). The three run in
interleaved rounds and each reports its best round (noise on a shared machine
only ever slows a run down). Every run of every contender is a fresh Python
process (its own local Ray for kubetune): nothing one round held is left for the
next, and the peak memory of each contender's process tree is printed.

The default data is chat of varied lengths (`--data varied`): chatterbot
exchanges chained into multi-turn conversations, log-normal in the number of
exchanges. `--data chatterbot` uses the single exchanges as they are (short
and alike: little padding to remove, so little for packing to win).

    .venv/bin/python benchmarks/throughput.py [--steps 6] [--max-length 1024] [--rounds 1]
                                              [--data varied|chatterbot]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import common as C

SEED = 42


def ours(train: str, out: str, name: str, packing: bool, args: dict) -> dict:
    """kubetune's trainer (Ray Train + DeepSpeed ZeRO-2, 1 worker) in this process:
    useful tokens / seconds over steps 2..N, from its metrics.jsonl."""
    from kubetune_api import load_trainer_config, spec_to_trainer_config
    from kubetune_trainer.driver import ensure_env, run

    args = argparse.Namespace(**args)
    ensure_env()
    cfg = load_trainer_config(
        spec_to_trainer_config(
            C.job(
                Path(train),
                Path(out).as_uri(),
                name,
                dataset={"packing": packing, "maxSeqLength": args.max_length},
                hyperparameters={"maxSteps": args.steps, "batchSize": args.batch, "seed": SEED},
            )
        )
    )
    assert run(cfg, ray_init=C.ray_init(), quiet=True) == 0
    prefix = Path(cfg.storage_prefix.removeprefix("file://"))
    tps, _ = C.steady_tokens_per_second(prefix, args.steps)
    return {"tps": tps}


def reference_batches(rows: list, args):
    """The examples kubetune's padded run trains on, in its order."""
    from kubetune_api import load_trainer_config, spec_to_trainer_config
    from kubetune_trainer import data as D
    from kubetune_trainer import model as M

    spec = load_trainer_config(spec_to_trainer_config(C.job(Path("-"), "file:///-", "ref"))).spec
    tok = M.load_tokenizer(spec, str(C.MODEL))
    examples, report = D.build_examples(rows, "chat", tok, args.max_length)
    order = D.epoch_order(len(examples), SEED, 0)
    used = [examples[order[j]] for j in range(args.steps * args.batch)]
    return tok, examples, report, used


def rows_of(data: str) -> list:
    return C.varied_chats() if data == "varied" else C.chat_rows()


def hf_trainer(args: dict) -> dict:
    """transformers.Trainer in this process, same LoRA model, the same padded
    batches in the same order."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from kubetune_trainer import data as D

    args = argparse.Namespace(**args)
    tok, _examples, _report, used = reference_batches(rows_of(args.data), args)
    torch.set_num_threads(os.cpu_count())
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
    dataset = [{"input_ids": e.input_ids, "labels": e.labels} for e in used]

    def collate(items):
        exs = [D.Example(i["input_ids"], i["labels"]) for i in items]
        return D.collate(exs, [[j] for j in range(len(exs))], tok.pad_token_id, packing=False)

    clock = C.StepClock(args.steps)
    out = tempfile.mkdtemp(prefix="hf-trainer-")
    targs = TrainingArguments(
        output_dir=out,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        learning_rate=2e-4,
        lr_scheduler_type="cosine",
        logging_steps=args.steps,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        train_sampling_strategy="sequential",
        seed=SEED,
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    Trainer(
        model=model, args=targs, train_dataset=dataset, data_collator=collate, callbacks=[clock]
    ).train()
    shutil.rmtree(out, ignore_errors=True)
    tokens = sum(len(e.input_ids) for e in used[args.batch :])
    return {"tps": tokens / clock.seconds}


def describe(examples, report, used, args) -> str:
    lengths = sorted(len(e.input_ids) for e in examples)

    def q(f):
        return lengths[min(len(lengths) - 1, int(f * len(lengths)))]

    batches = [used[k : k + args.batch] for k in range(0, len(used), args.batch)]
    useful = sum(len(e.input_ids) for e in used)
    padded = sum(len(b) * max(len(e.input_ids) for e in b) for b in batches)
    return (
        f"data: {len(examples)} conversations ({args.data}), tokens per conversation "
        f"p10 {q(0.1)}, p50 {q(0.5)}, p90 {q(0.9)}, max {lengths[-1]}; "
        f"{report.truncated} truncated at {args.max_length}\n"
        f"padded batches in this run: {100 * (1 - useful / padded):.0f}% of their tokens"
        " are padding"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument(
        "--rounds", type=int, default=1, help="rounds of all three; the best of each is reported"
    )
    p.add_argument("--data", choices=["varied", "chatterbot"], default="varied")
    p.add_argument(
        "--reference-only", action="store_true", help="measure only the transformers Trainer"
    )
    args = p.parse_args()
    C.prepare()
    rows = rows_of(args.data)
    shared = {k: getattr(args, k) for k in ("steps", "batch", "max_length", "data")}
    if args.reference_only:
        got, peak = C.isolated(__file__, "trainer", args=shared)
        print(f"transformers Trainer (padded) {got['tps']:.1f} tokens/s, peak {peak:.1f} GiB")
        return 0
    _tok, examples, report, used = reference_batches(rows, args)

    work = Path(tempfile.mkdtemp(prefix="kubetune-bench-"))
    names = ("reference", "padded", "packed")
    runs: dict[str, list[float]] = {k: [] for k in names}
    peaks: dict[str, list[float]] = {k: [] for k in names}
    try:
        train = C.write_jsonl(work / "train.jsonl", rows)
        for r in range(args.rounds):  # interleaved, so a slow spell hits every contender
            out = str(work / f"out-{r}")
            for key, (name, kwargs) in {
                "padded": ("kubetune", {"packing": False}),
                "packed": ("kubetune", {"packing": True}),
                "reference": ("trainer", {}),
            }.items():
                if name == "kubetune":
                    kwargs.update(train=str(train), out=out, name=key)
                got, peak = C.isolated(__file__, name, args=shared, **kwargs)
                runs[key].append(got["tps"])
                peaks[key].append(peak)
            print(
                f"round {r + 1}: Trainer {runs['reference'][-1]:.1f}, kubetune padded "
                f"{runs['padded'][-1]:.1f}, packed {runs['packed'][-1]:.1f} useful tokens/s; "
                "peak memory " + ", ".join(f"{k} {peaks[k][-1]:.1f}" for k in names) + " GiB",
                flush=True,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # best of the rounds for every contender: on a shared machine noise only slows things down
    reference, padded, packed = (max(runs[k]) for k in names)
    peak = {k: max(peaks[k]) for k in names}
    print()
    print(
        f"model SmolLM2-135M-Instruct, LoRA r=16 all-linear, bf16, batch {args.batch}, "
        f"max length {args.max_length}, {args.steps} steps, best of {args.rounds} rounds, "
        f"{os.cpu_count()} CPUs"
    )
    print(describe(examples, report, used, args))
    print(f"transformers Trainer (padded)        {reference:10.1f} useful tokens/s")
    print(f"kubetune (padded, same batches)      {padded:10.1f} useful tokens/s")
    print(f"kubetune (packed)                    {packed:10.1f} useful tokens/s")
    print(f"kubetune ÷ Trainer (padded)          {padded / reference:10.2f}   (target >= 1.0)")
    print(f"kubetune packed ÷ Trainer            {packed / reference:10.2f}")
    print(f"packing ÷ padding (useful tokens/s)  {packed / padded:10.2f}   (target >= 2)")
    print(
        "peak memory, each contender's process tree (Ray's included), largest round: "
        f"Trainer {peak['reference']:.1f} GiB, kubetune padded {peak['padded']:.1f} GiB, "
        f"packed {peak['packed']:.1f} GiB"
    )
    return 0


if __name__ == "__main__":
    if not C.child_main({"kubetune": ours, "trainer": hf_trainer}):
        raise SystemExit(main())
