"""DPO quality and throughput on one machine, one run: kubetune vs TRL's
DPOTrainer, same model, same preference data, same steps.

Model: SmolLM2-135M-Instruct with a LoRA adapter (r 16, alpha 32, dropout 0.05,
all linear layers) in both. Data: preference pairs built from the shipped chat
corpus, chosen = the conversation's real reply, rejected = the reply of another
conversation; `--heldout` pairs are held out. Both trainers get the same pairs in
the same order (kubetune's epoch order; TRL's sampler sequential), batch 4 pairs.

Two settings, each trains both contenders:
- **equal**: the same optimiser settings in both (kubetune's DPO defaults:
  learning rate 5e-5, cosine with 3% warmup, beta 0.1, sigmoid loss, bf16,
  dropout on, no gradient checkpointing, padded batches, max length 256);
- **defaults**: each one's own defaults (kubetune: the same, plus packing; TRL:
  DPOConfig's learning rate 1e-6, linear schedule, dropout off, gradient
  checkpointing, max length 1024), the LoRA shape above in both.

Every adapter, and the base model, is scored by one function (this file's
`score`): the DPO loss at beta 0.1 and the reward accuracy and margin on the
held-out pairs, with kubetune's tokenization (the model's chat template, loss on
the answers). Throughput: useful (non-pad) tokens of chosen and rejected per
second over steps 2..N of the equal-settings runs, which train on the same
batches. Each training and the scoring run in a fresh process each; the peak
memory of each process tree is printed.

    .venv/bin/python benchmarks/dpo_vs_trl.py [--steps 40] [--heldout 150]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import tempfile
from pathlib import Path

import common as C

SEED = 42
BETA = 0.1
LORA = {"r": 16, "alpha": 32, "dropout": 0.05}
EQUAL = {
    "learning_rate": 5e-5,
    "scheduler": "cosine",
    "warmup_ratio": 0.03,
    "max_length": 256,
}


def preference_rows() -> list[dict]:
    """One pair per chat exchange: chosen = its reply, rejected = another's."""
    chats = [r for r in C.chat_rows() if r["messages"][-1]["role"] == "assistant"]
    n = len(chats)
    rows = []
    for k, chat in enumerate(chats):
        other = chats[(k + n // 2 + 7) % n]
        chosen = chat["messages"][-1]["content"].strip()
        rejected = other["messages"][-1]["content"].strip()
        if chosen and rejected and chosen != rejected:
            rows.append({"prompt": chat["messages"][:-1], "chosen": chosen, "rejected": rejected})
    return rows


def split(heldout: int, distinct: bool = True) -> tuple[list[dict], list[dict]]:
    """(train, held-out); distinct: each row once (common.distinct_rows), so no held-out
    row is also a training one."""
    rows = C.distinct_rows(preference_rows()) if distinct else preference_rows()
    random.Random(0).shuffle(rows)
    return rows[heldout:], rows[:heldout]


def usable(rows: list[dict], max_length: int) -> list[dict]:
    """The rows kubetune trains on (pair k of its examples is row k of this list)."""
    from kubetune_trainer.objectives import dpo as PF

    tok = C.tokenizer()
    return [r for r in rows if PF.build_pairs([r], tok, max_length)[1].usable == 1]


# ------------------------------------------------------------------ contenders
def ours(train: str, out: str, steps: int, setting: str) -> dict:
    """kubetune's trainer (Ray Train + DeepSpeed ZeRO-2, 1 worker) in this process."""
    from kubetune_api import load_trainer_config, spec_to_trainer_config
    from kubetune_trainer.driver import ensure_env, run

    ensure_env()
    dataset = {"format": "preference", "maxSeqLength": EQUAL["max_length"]}
    hp = {"maxSteps": steps, "batchSize": 4, "seed": SEED, "logEverySteps": 1}
    if setting == "equal":
        dataset["packing"] = False
        hp.update(
            learningRate=EQUAL["learning_rate"],
            lrScheduler=EQUAL["scheduler"],
            warmupRatio=EQUAL["warmup_ratio"],
        )
    job = C.job(
        Path(train),
        Path(out).as_uri(),
        f"dpo-{setting}",
        dataset=dataset,
        method={"objective": "dpo", "dpo": {"beta": BETA, "lossType": "sigmoid"}, "lora": LORA},
        hyperparameters=hp,
    )
    cfg = load_trainer_config(spec_to_trainer_config(job))
    assert run(cfg, ray_init=C.ray_init(), quiet=True) == 0
    prefix = Path(cfg.storage_prefix.removeprefix("file://"))
    tps, tokens = C.steady_tokens_per_second(prefix, steps)
    return {"adapter": str(prefix / "adapter"), "tps": tps, "tokens": tokens}


def trl(train: str, out: str, steps: int, setting: str) -> dict:
    """TRL's DPOTrainer in this process, on the same pairs in kubetune's order."""
    import torch
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(os.cpu_count())
    used = C.in_kubetune_order(C.read_jsonl(train), steps * 4, SEED)
    # TRL's conversational rows hold the answers as messages too
    used = [
        {**r, **{k: [{"role": "assistant", "content": r[k]}] for k in ("chosen", "rejected")}}
        for r in used
    ]
    settings = dict(
        output_dir=out,
        max_steps=steps,
        per_device_train_batch_size=4,
        beta=BETA,
        loss_type=["sigmoid"],
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        logging_steps=steps,
        train_sampling_strategy="sequential",
        seed=SEED,
        disable_tqdm=True,
    )
    if setting == "equal":
        settings.update(
            learning_rate=EQUAL["learning_rate"],
            lr_scheduler_type=EQUAL["scheduler"],
            warmup_steps=EQUAL["warmup_ratio"],  # transformers 5: a float < 1 is a ratio
            max_length=EQUAL["max_length"],
            bf16=True,
            gradient_checkpointing=False,
            disable_dropout=False,
        )
    clock = C.StepClock(steps)
    trainer = DPOTrainer(
        model=str(C.MODEL),
        args=DPOConfig(**settings),
        train_dataset=Dataset.from_list(used),
        peft_config=C.peft_lora(LORA),
        callbacks=[clock],
    )
    done = trainer.train_dataset
    assert len(done) == len(used), "TRL dropped pairs: the batches would differ"
    trainer.train()
    trainer.model.save_pretrained(str(Path(out) / "adapter"))
    tokens = sum(
        2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"])
        for r in done.select(range(4, steps * 4))
    )
    return {"adapter": str(Path(out) / "adapter"), "tps": tokens / clock.seconds, "tokens": tokens}


def score(heldout: str, adapters: list) -> dict:
    """Held-out DPO loss (beta 0.1), reward accuracy and margin of each adapter
    against the base model as reference; None scores the base model itself."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from kubetune_trainer import data as D
    from kubetune_trainer.objectives import dpo as PF

    torch.set_num_threads(os.cpu_count())
    rows = C.read_jsonl(heldout)
    tok = C.tokenizer()
    examples, report = PF.build_pairs(rows, tok, EQUAL["max_length"])
    assert report.usable == len(rows), report

    def logps(model) -> torch.Tensor:
        out = []
        model.eval()
        with torch.no_grad():
            for i in range(0, len(examples), 16):
                b = D.collate(
                    examples,
                    [[j] for j in range(i, min(i + 16, len(examples)))],
                    tok.pad_token_id,
                    packing=False,
                )
                labels = b.pop("labels")
                logits = model(**b).logits.float()[:, :-1]
                target = labels[:, 1:]
                mask = target != D.IGNORE
                lp = torch.gather(
                    F.log_softmax(logits, -1), 2, target.clamp(min=0).unsqueeze(-1)
                ).squeeze(-1)
                out.append((lp * mask).sum(-1))
        return torch.cat(out)

    base = AutoModelForCausalLM.from_pretrained(C.MODEL, dtype=torch.float32)
    ref = logps(base)
    results = {}
    for adapter, model in C.with_adapters(base, adapters):
        pi = ref if adapter is None else logps(model)
        rc, rr = BETA * (pi[0::2] - ref[0::2]), BETA * (pi[1::2] - ref[1::2])
        results[adapter or "base"] = {
            "loss": (-F.logsigmoid(rc - rr)).mean().item(),
            "accuracy": (rc > rr).float().mean().item(),
            "margin": (rc - rr).mean().item(),
        }
    return results


# ------------------------------------------------------------------ the run
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--heldout", type=int, default=150)
    C.add_split_flag(p)
    args = p.parse_args()
    C.prepare()
    train_rows, val_rows = split(args.heldout, distinct=not args.with_repeats)
    train_rows = usable(train_rows, EQUAL["max_length"])
    val_rows = usable(val_rows, EQUAL["max_length"])
    work = Path(tempfile.mkdtemp(prefix="kubetune-dpo-"))
    train = C.write_jsonl(work / "train.jsonl", train_rows)
    heldout = C.write_jsonl(work / "heldout.jsonl", val_rows)
    runs, peaks = {}, {}
    try:
        for setting in ("equal", "defaults"):
            for name in ("kubetune", "trl"):
                key = f"{name}/{setting}"
                runs[key], peaks[key] = C.isolated(
                    __file__,
                    name,
                    train=str(train),
                    out=str(work / name / setting),
                    steps=args.steps,
                    setting=setting,
                )
                print(
                    f"{key}: {runs[key]['tps']:.1f} useful tokens/s, peak {peaks[key]:.1f} GiB",
                    flush=True,
                )
        keys = list(runs)
        scores, peaks["scoring"] = C.isolated(
            __file__,
            "score",
            heldout=str(heldout),
            adapters=[None] + [runs[k]["adapter"] for k in keys],
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def line(label: str, s: dict) -> str:
        return f"  {label:<34} {s['loss']:8.4f} {s['accuracy']:9.3f} {s['margin']:9.4f}"

    print()
    print(
        f"DPO on SmolLM2-135M-Instruct + LoRA r=16, {len(train_rows)} training pairs, "
        f"{args.steps} steps of 4 pairs, {os.cpu_count()} CPUs"
    )
    print(
        f"held-out ({len(val_rows)} pairs, beta {BETA}):  DPO loss  reward acc    margin"
        "  (loss: lower is better)"
    )
    print(line("base model (no training)", scores["base"]))
    for setting in ("equal", "defaults"):
        for name, label in (("kubetune", "kubetune"), ("trl", "TRL DPOTrainer")):
            print(line(f"{label}, {setting}", scores[runs[f"{name}/{setting}"]["adapter"]]))
    ours, theirs = (scores[runs[f"{n}/equal"]["adapter"]] for n in ("kubetune", "trl"))
    print(
        f"  kubetune - TRL at equal settings    loss {ours['loss'] - theirs['loss']:+.4f}, "
        f"reward accuracy {ours['accuracy'] - theirs['accuracy']:+.3f}"
    )
    a, b = runs["kubetune/equal"], runs["trl/equal"]
    print(
        f"throughput, equal settings, the same batches (steps 2..{args.steps}): kubetune "
        f"{a['tps']:.1f}, TRL {b['tps']:.1f} useful tokens/s ({a['tokens']} and {b['tokens']} "
        f"tokens counted); kubetune ÷ TRL {a['tps'] / b['tps']:.2f} (target >= 1.0)"
    )
    c, d = runs["kubetune/defaults"], runs["trl/defaults"]
    print(
        f"throughput at each one's defaults: kubetune (packed) {c['tps']:.1f}, TRL "
        f"{d['tps']:.1f} useful tokens/s"
    )
    print(C.peaks_line(peaks))
    return 0


if __name__ == "__main__":
    if not C.child_main({"kubetune": ours, "trl": trl, "score": score}):
        raise SystemExit(main())
