"""Distillation on one machine, one run: a pruned student trained by plain SFT,
by kubetune's logit distillation and by TRL's GKDTrainer, from the same teacher,
the same starting weights, the same data and the same number of steps.

The teacher: SmolLM2-135M-Instruct fine-tuned on the quickstart corpus by
kubetune (LoRA r 16, `--teacher-steps` steps, the adapter merged), as a user
would make it. The student: that teacher with half of its decoder layers kept
(`spec.model.prune`, kubetune's default choice of layers), full fine-tuning.
Four students train from those weights, each in a fresh process:

- `sft`: kubetune, `method.objective: sft` (the plain next-token loss);
- `distill`: kubetune, `method.objective: distill`, the teacher the unpruned
  model (the default), forward KL on the response tokens, temperature 1, the
  distillation loss alone (weight 1);
- `distill_mixed`: the same with `distill`'s defaults, the KL and the plain loss
  weighed half and half (weight 0.5);
- `trl`: TRL's GKDTrainer with the settings that make it the same objective:
  `lmbda` 0 (no student-generated sequences), `beta` 0 (forward KL),
  temperature 1, on the pruned weights kubetune starts from.

The same settings in all four: `--steps` optimizer steps of batch 4, learning
rate 5e-5 constant, no warm-up, fp32, sequences of at most 128 tokens, the same
training conversations in kubetune's epoch order (TRL's sampler unshuffled).

One function scores every model on the same held-out conversations (the
quickstart split): the loss over assistant tokens, and the agreement with the
teacher (the share of those tokens where the student's top-1 next token is the
teacher's). Throughput: training tokens per second over steps 2..N. Peak memory
of each process tree. Parameters of teacher and student.

    .venv/bin/python benchmarks/distill_vs_trl.py [--steps 40] [--teacher-steps 60]

On a 2-core CPU the defaults take about 20 minutes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import common as C

SEED = 42
LR = 5e-5
BATCH = 4
MAX_LEN = 128


def _hp(steps: int, seed: int = SEED, **extra) -> dict:
    return {
        "maxSteps": steps,
        "batchSize": BATCH,
        "seed": seed,
        "logEverySteps": 1,
        "learningRate": LR,
        "lrScheduler": "constant",
        "warmupRatio": 0.0,
        "precision": "fp32",
        **extra,
    }


def _run(job: dict) -> Path:
    """kubetune's trainer on `job` in this process (its own local Ray); the prefix."""
    from kubetune_api import load_trainer_config, spec_to_trainer_config
    from kubetune_trainer.driver import ensure_env, run

    ensure_env()
    cfg = load_trainer_config(spec_to_trainer_config(job))
    assert run(cfg, ray_init=C.ray_init(), quiet=True) == 0
    return Path(cfg.storage_prefix.removeprefix("file://"))


def _published(prefix: Path, kind: str) -> str:
    """The folder of an output kind (merged, model) from outputs.json."""
    outputs = json.loads((prefix / "outputs.json").read_text())
    for key in (f"{kind}_model", kind, f"{kind}Model"):
        if outputs.get(key):
            return outputs[key].removeprefix("file://")
    return str(prefix / kind)


# ------------------------------------------------------------------ contenders
def teacher(train: str, out: str, steps: int) -> dict:
    """The quickstart fine-tune, merged: the teacher every student learns from."""
    job = C.job(
        Path(train),
        Path(out).as_uri(),
        "teacher",
        hyperparameters={"maxSteps": steps, "batchSize": BATCH, "seed": SEED, "precision": "fp32"},
        output={"mergeAdapter": True},
    )
    prefix = _run(job)
    return {"model": _published(prefix, "merged")}


def _student_job(
    train: str,
    out: str,
    name: str,
    teacher_dir: str,
    steps: int,
    layers: int,
    method: dict,
    seed: int = SEED,
) -> dict:
    job = C.job(
        Path(train),
        Path(out).as_uri(),
        name,
        model={"uri": teacher_dir, "prune": {"keepLayers": layers}},
        hyperparameters=_hp(steps, seed),
    )
    job["spec"]["method"] = {"type": "full", **method}  # no lora block
    return job


def sft(train: str, out: str, teacher_dir: str, steps: int, layers: int, seed: int = SEED) -> dict:
    job = _student_job(train, out, "sft", teacher_dir, steps, layers, {"objective": "sft"}, seed)
    prefix = _run(job)
    tps, tokens = C.steady_tokens_per_second(prefix, steps)
    return {"model": _published(prefix, "model"), "tps": tps, "tokens": tokens}


def distill(
    train: str,
    out: str,
    teacher_dir: str,
    steps: int,
    layers: int,
    weight: float = 1.0,
    tokens: str = "responses",
    seed: int = SEED,
) -> dict:
    method = {
        "objective": "distill",
        "distill": {
            "mode": "logits",
            "loss": "forwardKL",
            "temperature": 1.0,
            "weight": weight,
            "tokens": tokens,
        },
    }
    prefix = _run(_student_job(train, out, "distill", teacher_dir, steps, layers, method, seed))
    tps, tokens = C.steady_tokens_per_second(prefix, steps)
    return {"model": _published(prefix, "model"), "tps": tps, "tokens": tokens}


def pruned(teacher_dir: str, out: str, layers: int) -> dict:
    """The student's starting weights as kubetune makes them (model.prune), saved
    for TRL and for the 'before training' score."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kubetune_trainer import prune as P

    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    P.prune_layers(model, P.default_layers(model.config.num_hidden_layers, layers))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(out)
    return {"model": out}


def trl(
    train: str, out: str, teacher_dir: str, student_dir: str, steps: int, seed: int = SEED
) -> dict:
    """TRL's GKDTrainer, off-policy forward KL at temperature 1: the same objective."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    torch.set_num_threads(os.cpu_count())
    rows = C.in_kubetune_order(C.read_jsonl(train), steps * BATCH, seed)
    tok = AutoTokenizer.from_pretrained(student_dir)
    clock = C.StepClock(steps)
    trainer = GKDTrainer(
        model=AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32),
        teacher_model=AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32),
        args=GKDConfig(
            output_dir=out,
            max_steps=steps,
            per_device_train_batch_size=BATCH,
            gradient_accumulation_steps=1,
            learning_rate=LR,
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=1.0,
            max_length=MAX_LEN,
            lmbda=0.0,
            beta=0.0,
            temperature=1.0,
            seq_kd=False,
            bf16=False,
            use_cpu=True,
            save_strategy="no",
            report_to=[],
            logging_steps=5,
            shuffle_dataset=False,
            seed=seed,
        ),
        train_dataset=Dataset.from_list([{"messages": r["messages"]} for r in rows]),
        processing_class=tok,
        callbacks=[clock],
    )
    counted = {"tokens": 0}
    forward = trainer.compute_loss

    def counting(model, inputs, *a, **kw):
        if trainer.state.global_step >= 1:  # steps 2..N, as kubetune's rows count them
            counted["tokens"] += int(inputs["attention_mask"].sum())
        return forward(model, inputs, *a, **kw)

    trainer.compute_loss = counting
    trainer.train()
    trainer.save_model(str(Path(out) / "model"))
    tok.save_pretrained(str(Path(out) / "model"))
    return {
        "model": str(Path(out) / "model"),
        "tps": counted["tokens"] / clock.seconds,
        "tokens": counted["tokens"],
    }


def score(heldout: str, teacher_dir: str, models: dict) -> dict:
    """Held-out loss, agreement with the teacher and parameters of every model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(os.cpu_count())
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    rows = C.read_jsonl(heldout)

    def predictions(path: str):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        loss, tops = C.heldout_scores(model, tok, rows, MAX_LEN)
        return loss, tops, sum(p.numel() for p in model.parameters())

    t_loss, t_top, t_params = predictions(teacher_dir)
    out = {"teacher": {"loss": t_loss, "agreement": 1.0, "params": t_params}}
    for name, path in models.items():
        loss, top, params = predictions(path)
        out[name] = {
            "loss": loss,
            "agreement": (top == t_top).float().mean().item(),
            "params": params,
        }
    return out


# ------------------------------------------------------------------ the run
# name: (the contender function, its settings)
CONTENDERS = {
    "sft": ("sft", {}),
    "distill": ("distill", {"weight": 1.0}),
    "distill_mixed": ("distill", {"weight": 0.5}),
    "distill_all": ("distill", {"weight": 1.0, "tokens": "all"}),
    "distill_all_mixed": ("distill", {"weight": 0.5, "tokens": "all"}),
    "trl": ("trl", {}),
}
LABELS = {
    "sft": "kubetune sft",
    "distill": "kubetune distill (KL only on the responses, as TRL's)",
    "distill_mixed": "kubetune distill (KL 0.5 + CE 0.5 on the responses: the defaults)",
    "distill_all": "kubetune distill (KL only, tokens all)",
    "distill_all_mixed": "kubetune distill (KL 0.5 + CE 0.5, tokens all)",
    "trl": "TRL GKDTrainer",
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--teacher-steps", type=int, default=60)
    p.add_argument("--layers", type=int, default=15, help="decoder layers the student keeps")
    p.add_argument(
        "--contenders",
        default=",".join(CONTENDERS),
        help="which students to train, comma-separated (default: all of them)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=SEED,
        help="the students' seed (their data order); the teacher keeps 42",
    )
    p.add_argument(
        "--with-repeats",
        action="store_true",
        help="keep the corpus's repeated conversations (then many held-out ones are also "
        "training ones), as the first runs of this benchmark did",
    )
    p.add_argument(
        "--work",
        help="a folder to keep the teacher and the students in (reused: a teacher found "
        "there is not trained again); default: a temporary folder, removed at the end",
    )
    args = p.parse_args()
    chosen = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = sorted(set(chosen) - set(CONTENDERS))
    if unknown:
        p.error(f"--contenders: unknown {unknown}; choose from {', '.join(CONTENDERS)}")
    C.prepare()
    # Each conversation once: the corpus repeats many, and a held-out conversation
    # that is also a training one scores memory, not what was learned (the first
    # runs of this benchmark had 81 of the 150 held-out conversations in training).
    train_rows, val_rows = C.split(distinct=not args.with_repeats)
    # Conversations that fit MAX_LEN whole: TRL's GKD collator refuses one whose answer
    # alone fills the window, and kubetune would cut it; the same rows for all four.
    tok = C.tokenizer()

    def length(row: dict) -> int:
        enc = tok.apply_chat_template(row["messages"], tokenize=True, return_dict=True)
        return len(enc["input_ids"])

    fits = [r for r in train_rows if length(r) <= MAX_LEN]
    print(f"training rows: {len(fits)} of {len(train_rows)} fit {MAX_LEN} tokens", flush=True)
    train_rows = fits
    keep = args.work is not None
    work = Path(args.work) if keep else Path(tempfile.mkdtemp(prefix="kubetune-distill-"))
    work.mkdir(parents=True, exist_ok=True)
    train = C.write_jsonl(work / "train.jsonl", train_rows)
    heldout = C.write_jsonl(work / "heldout.jsonl", val_rows)
    peaks, runs = {}, {}
    try:
        key = hashlib.sha256(train.read_bytes()).hexdigest()[:12]
        made = work / f"teacher-{args.teacher_steps}-{key}.json"
        if keep and made.exists():
            t = json.loads(made.read_text())
            print(f"teacher: read back from {work}", flush=True)
        else:
            t, peaks["teacher"] = C.isolated(
                __file__,
                "teacher",
                train=str(train),
                out=str(work / f"teacher-{args.teacher_steps}-{key}"),
                steps=args.teacher_steps,
            )
            made.write_text(json.dumps(t))
            print(f"teacher: trained, peak {peaks['teacher']:.1f} GiB", flush=True)
        teacher_dir = t["model"]
        start, _ = C.isolated(
            __file__,
            "pruned",
            teacher_dir=teacher_dir,
            out=str(work / "pruned"),
            layers=args.layers,
        )
        common = {
            "train": str(train),
            "teacher_dir": teacher_dir,
            "steps": args.steps,
            "seed": args.seed,
        }
        for name in chosen:
            contender, extra = CONTENDERS[name]
            if contender == "trl":
                extra = {**extra, "student_dir": start["model"]}
            else:
                extra = {**extra, "layers": args.layers}
            shutil.rmtree(work / name, ignore_errors=True)
            runs[name], peaks[name] = C.isolated(
                __file__, contender, out=str(work / name), **common, **extra
            )
            print(f"{name}: trained, peak {peaks[name]:.1f} GiB", flush=True)
        models = {"pruned": start["model"], **{k: v["model"] for k, v in runs.items()}}
        scores, _ = C.isolated(
            __file__, "score", heldout=str(heldout), teacher_dir=teacher_dir, models=models
        )
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)

    t, before = scores["teacher"], scores["pruned"]
    print()
    print(
        f"SmolLM2-135M-Instruct teacher ({args.teacher_steps} LoRA steps, merged); student: "
        f"{args.layers} of its decoder layers, full fine-tuning, {args.steps} steps of "
        f"batch {BATCH}, seed {args.seed}; held-out: {len(val_rows)} conversations"
        f"{' (some also in training)' if args.with_repeats else ', none of them in training'}; "
        f"training: {len(train_rows)} conversations"
    )
    print(
        "| model | parameters | held-out loss | gap to the teacher closed | top-1 agreement "
        "with the teacher | training tokens/s | peak memory |"
    )
    print("|---|---|---|---|---|---|---|")
    gap = before["loss"] - t["loss"]
    rows = [
        ("teacher", t, None),
        ("pruned student, before training", before, None),
        *((LABELS[name], scores[name], name) for name in chosen),
    ]
    for label, s, run in rows:
        closed = (before["loss"] - s["loss"]) / gap if gap > 0 and label != "teacher" else None
        tps = runs[run]["tps"] if run else None
        peak = peaks.get(run or "", math.nan)
        print(
            f"| {label} | {s['params'] / 1e6:.1f}M | {s['loss']:.4f} | "
            f"{'' if closed is None else f'{closed:.0%}'} | {s['agreement']:.3f} | "
            f"{'' if tps is None else f'{tps:.0f}'} | "
            f"{'' if math.isnan(peak) else f'{peak:.1f} GiB'} |"
        )
    if "distill" in runs and "trl" in runs:
        ratio = runs["distill"]["tps"] / runs["trl"]["tps"]
        print(f"\ntokens/s ratio kubetune distill / TRL GKD: {ratio:.2f} (target >= 1.0)")
    for name in (n for n in chosen if n.startswith("distill") and "sft" in scores):
        print(
            f"{name}: closed more of the gap than SFT: "
            f"{scores[name]['loss'] < scores['sft']['loss']}"
            f"; agreement with the teacher above SFT's: "
            f"{scores[name]['agreement'] > scores['sft']['agreement']}"
        )
    print(C.peaks_line(peaks))
    return 0


if __name__ == "__main__":
    if not C.child_main(
        {
            "teacher": teacher,
            "pruned": pruned,
            "sft": sft,
            "distill": distill,
            "trl": trl,
            "score": score,
        }
    ):
        raise SystemExit(main())
