"""GRPO quality and throughput on one machine, one run: kubetune vs TRL's
GRPOTrainer, same model, same prompts, same reward, same settings.

Model: SmolLM2-135M-Instruct with a LoRA adapter (r 16, alpha 32, no dropout,
all linear layers) in both. Task: the user questions of the shipped chat corpus,
each followed by "Answer in at most N words." (N 5, 8 or 12 in turn, kept in the
row as `maxWords`); the instruct model keeps to the limit some of the time, so
the rewards of one prompt's generations differ. Reward: this file's `GRADER`, one
Python function `grade(sample, item)` (1.0 for a non-empty answer of at most
maxWords words, else maxWords / words): kubetune gets it as its `python` grader
(`method.grpo.grader`), TRL as its reward function. `--heldout` questions are
held out. Both trainers get the same prompts in the same order (kubetune's epoch
order; TRL's sampler unshuffled).

The same settings in both: `--prompts` prompts a step, `--generations`
generations each (kubetune `generationsPerPrompt`, TRL `num_generations`), at
most `--max-new-tokens` new tokens, temperature 1.0, top-p 1.0, KL coefficient
beta 0.04 against the adapter switched off, clipping epsilon 0.2, the `grpo` loss
(per-sequence mean, rewards scaled by the group's std), one optimisation pass per
batch of rollouts, learning rate 1e-4 constant, fp32 (bf16 generation is ~6x
slower on CPUs without bf16 instructions), no gradient checkpointing.

Every adapter, and the base model, is scored by one function (this file's
`score`): the mean reward of greedy answers (the same new-token limit) to the
held-out questions. Throughput: generated tokens (each completion up to and with
its end token) per second of training over steps 2..N, rollouts and updates
together. Each training and the scoring run in a fresh process each; the peak
memory of each process tree is printed.

    .venv/bin/python benchmarks/grpo_vs_trl.py [--steps 30] [--prompts 2] [--generations 4]
        [--max-new-tokens 32] [--heldout 64]

On a 2-core CPU the defaults take about 12 minutes.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

import common as C

SEED = 42
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}
SETTINGS = {
    "temperature": 1.0,
    "top_p": 1.0,
    "beta": 0.04,
    "epsilon": 0.2,
    "loss_type": "grpo",
    "iterations": 1,
    "learning_rate": 1e-4,
    "scheduler": "constant",
}
LIMITS = (5, 8, 12)

GRADER = '''\
def grade(sample, item) -> float:
    """1.0 for a non-empty answer of at most item["maxWords"] words, else the
    share of the limit it keeps to (8 allowed, 16 written: 0.5)."""
    words = len(sample["output_text"].split())
    if words == 0:
        return 0.0
    return min(1.0, item["maxWords"] / words)
'''


def grader():
    """GRADER's `grade`, the reward of every contender and of the scoring."""
    scope: dict = {}
    exec(compile(GRADER, "grader.py", "exec"), scope)
    return scope["grade"]


def prompt_rows() -> list[dict]:
    """One row per distinct user question of the chat corpus (in file order):
    the question with a word limit, and the limit."""
    rows, seen = [], set()
    for chat in C.chat_rows():
        question = chat["messages"][0]["content"].strip()
        if chat["messages"][0]["role"] != "user" or not question or question in seen:
            continue
        seen.add(question)
        n = LIMITS[len(rows) % len(LIMITS)]
        content = f"{question} Answer in at most {n} words."
        rows.append({"messages": [{"role": "user", "content": content}], "maxWords": n})
    return rows


def split(heldout: int, distinct: bool = True) -> tuple[list[dict], list[dict]]:
    """(train, held-out); distinct: each row once (common.distinct_rows), so no held-out
    row is also a training one."""
    rows = C.distinct_rows(prompt_rows()) if distinct else prompt_rows()
    random.Random(0).shuffle(rows)
    return rows[heldout:], rows[:heldout]


# ------------------------------------------------------------------ contenders
def ours(train: str, out: str, steps: int, prompts: int, generations: int, max_new: int) -> dict:
    """kubetune's trainer (Ray Train + DeepSpeed ZeRO-2, 1 worker) in this process."""
    from kubetune_api import load_trainer_config, spec_to_trainer_config
    from kubetune_trainer.driver import ensure_env, run

    ensure_env()
    job = C.job(
        Path(train),
        Path(out).as_uri(),
        "grpo",
        dataset={"format": "prompt"},
        method={
            "objective": "grpo",
            "lora": LORA,
            "grpo": {
                "generationsPerPrompt": generations,
                "maxNewTokens": max_new,
                "temperature": SETTINGS["temperature"],
                "topP": SETTINGS["top_p"],
                "beta": SETTINGS["beta"],
                "epsilon": SETTINGS["epsilon"],
                "lossType": SETTINGS["loss_type"],
                "iterations": SETTINGS["iterations"],
                "grader": {"type": "python", "name": "max-words", "source": GRADER},
            },
        },
        hyperparameters={
            "maxSteps": steps,
            "batchSize": prompts,
            "seed": SEED,
            "logEverySteps": 1,
            "learningRate": SETTINGS["learning_rate"],
            "lrScheduler": SETTINGS["scheduler"],
            "warmupRatio": 0.0,
            "precision": "fp32",
        },
    )
    cfg = load_trainer_config(spec_to_trainer_config(job))
    assert run(cfg, ray_init=C.ray_init(), quiet=True) == 0
    prefix = Path(cfg.storage_prefix.removeprefix("file://"))
    rows, seconds = C.steady_steps(prefix, steps)
    # completionLength: the mean over the step's completions, up to and with the end token
    tokens = round(sum(r["completionLength"] for r in rows[1:]) * prompts * generations)
    return {
        "adapter": str(prefix / "adapter"),
        "tps": tokens / seconds,
        "tokens": tokens,
        "rewards": [r["reward"] for r in rows],
    }


def trl(train: str, out: str, steps: int, prompts: int, generations: int, max_new: int) -> dict:
    """TRL's GRPOTrainer in this process, on the same prompts in kubetune's order."""
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(os.cpu_count())
    used = C.in_kubetune_order(C.read_jsonl(train), steps * prompts, SEED)
    grade = grader()
    tokens, rewards = [], []

    def max_words(completions, completion_ids, maxWords, **_) -> list[float]:
        tokens.append(sum(len(ids) for ids in completion_ids))
        scores = [
            grade({"output_text": c[0]["content"]}, {"maxWords": n})
            for c, n in zip(completions, maxWords, strict=True)
        ]
        rewards.append(sum(scores) / len(scores))
        print(f"trl: rollout {len(rewards)}/{steps}, reward {rewards[-1]:.3f}", file=sys.stderr)
        return scores

    clock = C.StepClock(steps)
    trainer = GRPOTrainer(
        model=str(C.MODEL),
        reward_funcs=max_words,
        args=GRPOConfig(
            output_dir=out,
            max_steps=steps,
            per_device_train_batch_size=prompts * generations,  # completions, not prompts
            gradient_accumulation_steps=1,
            steps_per_generation=1,
            num_generations=generations,
            max_completion_length=max_new,
            temperature=SETTINGS["temperature"],
            top_p=SETTINGS["top_p"],
            beta=SETTINGS["beta"],
            epsilon=SETTINGS["epsilon"],
            loss_type=SETTINGS["loss_type"],
            num_iterations=SETTINGS["iterations"],
            scale_rewards="group",
            learning_rate=SETTINGS["learning_rate"],
            lr_scheduler_type=SETTINGS["scheduler"],
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=1.0,
            bf16=False,  # GRPOConfig's default is bf16 (autocast on CPU as well)
            gradient_checkpointing=False,
            shuffle_dataset=False,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            logging_steps=steps,
            seed=SEED,
            disable_tqdm=True,
        ),
        train_dataset=Dataset.from_list(
            [{"prompt": r["messages"], "maxWords": r["maxWords"]} for r in used]
        ),
        peft_config=C.peft_lora(LORA),
        callbacks=[clock],
    )
    trainer.train()
    trainer.model.save_pretrained(str(Path(out) / "adapter"))
    assert len(tokens) == steps, f"{len(tokens)} rollouts for {steps} steps"
    counted = sum(tokens[1:])
    return {
        "adapter": str(Path(out) / "adapter"),
        "tps": counted / clock.seconds,
        "tokens": counted,
        "rewards": rewards,
    }


def score(heldout: str, adapters: list, max_new: int, batch: int = 16) -> dict:
    """Mean reward and words of the greedy answers to the held-out questions, for
    each adapter; None scores the base model itself."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count())
    rows = C.read_jsonl(heldout)
    grade = grader()
    tok = C.tokenizer()
    tok.padding_side = "left"
    texts = [
        tok.apply_chat_template(r["messages"], tokenize=False, add_generation_prompt=True)
        for r in rows
    ]

    def answers(model) -> list[str]:
        model.eval()
        out = []
        with torch.no_grad():
            for i in range(0, len(texts), batch):
                enc = tok(
                    texts[i : i + batch],
                    return_tensors="pt",
                    padding=True,
                    add_special_tokens=False,
                )
                ids = model.generate(
                    **enc, max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id
                )
                out += tok.batch_decode(
                    ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True
                )
        return out

    base = AutoModelForCausalLM.from_pretrained(C.MODEL, dtype=torch.float32)
    results = {}
    for adapter, model in C.with_adapters(base, adapters):
        said = answers(model)
        rewards = [grade({"output_text": a}, r) for a, r in zip(said, rows, strict=True)]
        results[adapter or "base"] = {
            "reward": sum(rewards) / len(rewards),
            "words": sum(len(a.split()) for a in said) / len(said),
            "example": said[0],
        }
    return results


# ------------------------------------------------------------------ the run
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--prompts", type=int, default=2, help="prompts per step")
    p.add_argument("--generations", type=int, default=4, help="generations per prompt")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--heldout", type=int, default=64)
    p.add_argument(
        "--only", choices=("kubetune", "trl"), help="train one contender (and score it) only"
    )
    C.add_split_flag(p)
    args = p.parse_args()
    C.prepare()
    train_rows, val_rows = split(args.heldout, distinct=not args.with_repeats)
    work = Path(tempfile.mkdtemp(prefix="kubetune-grpo-"))
    train = C.write_jsonl(work / "train.jsonl", train_rows)
    heldout = C.write_jsonl(work / "heldout.jsonl", val_rows)
    names = [args.only] if args.only else ["kubetune", "trl"]
    runs, peaks = {}, {}
    try:
        for name in names:
            runs[name], peaks[name] = C.isolated(
                __file__,
                name,
                train=str(train),
                out=str(work / name),
                steps=args.steps,
                prompts=args.prompts,
                generations=args.generations,
                max_new=args.max_new_tokens,
            )
            print(
                f"{name}: {runs[name]['tps']:.1f} generated tokens/s, peak {peaks[name]:.1f} GiB",
                flush=True,
            )
        scores, peaks["scoring"] = C.isolated(
            __file__,
            "score",
            heldout=str(heldout),
            adapters=[None] + [runs[n]["adapter"] for n in names],
            max_new=args.max_new_tokens,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    labels = {"kubetune": "kubetune", "trl": "TRL GRPOTrainer"}

    def line(label: str, s: dict, rewards: list | None = None) -> str:
        text = f"  {label:<26} {s['reward']:11.3f} {s['words']:10.1f}"
        if rewards:
            k = max(1, len(rewards) // 5)
            first, last = sum(rewards[:k]) / k, sum(rewards[-k:]) / k
            text += f"    {first:.3f} -> {last:.3f}"
        return text

    print()
    print(
        f"GRPO on SmolLM2-135M-Instruct + LoRA r=16, {len(train_rows)} training prompts, "
        f"{args.steps} steps of {args.prompts} prompts x {args.generations} generations "
        f"(<= {args.max_new_tokens} new tokens), {os.cpu_count()} CPUs"
    )
    print(
        f"held-out ({len(val_rows)} questions, greedy):  mean reward  mean words"
        "    training reward, first -> last fifth of the steps"
    )
    print(line("base model (no training)", scores["base"]))
    for n in names:
        print(line(labels[n], scores[runs[n]["adapter"]], runs[n]["rewards"]))
    if len(names) == 2:
        ours_, theirs = (scores[runs[n]["adapter"]] for n in names)
        print(f"  kubetune - TRL             reward {ours_['reward'] - theirs['reward']:+.3f}")
        a, b = runs["kubetune"], runs["trl"]
        print(
            f"generated tokens/s over steps 2..{args.steps} (rollouts and updates): kubetune "
            f"{a['tps']:.1f}, TRL {b['tps']:.1f} ({a['tokens']} and {b['tokens']} tokens "
            f"generated); kubetune ÷ TRL {a['tps'] / b['tps']:.2f} (target >= 1.0)"
        )
    else:
        r = runs[names[0]]
        print(
            f"generated tokens/s over steps 2..{args.steps} (rollouts and updates): "
            f"{labels[names[0]]} {r['tps']:.1f} ({r['tokens']} tokens generated)"
        )
    print(C.peaks_line(peaks))
    return 0


if __name__ == "__main__":
    if not C.child_main({"kubetune": ours, "trl": trl, "score": score}):
        raise SystemExit(main())
