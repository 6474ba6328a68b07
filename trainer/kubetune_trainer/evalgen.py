"""Evaluation by generation: what the model says, before and after training.

The same held-out prompts (the first `examples` of a seeded shuffle of the usable
rows) are answered by the base model and by the fine-tuned one, with the same
decoding settings, and the answers are scored against the references with
maintained libraries: exact match, ROUGE-L F1 (rouge-score), corpus BLEU with its
brevity penalty, corpus chrF and each answer's chrF1 (sacrebleu), and the answers'
length against the references'. Corpus scores pool n-grams over all answers, so a
few long answers move them more than many short ones, and chrF counts recall
twice, so a long answer that holds the reference among much else scores well:
each answer's chrF1 (precision and recall weighted equally), after against
before, says how many answers came closer to their reference. Rank 0 does it
after the final weights are saved, from the saved files, so ZeRO sharding never
gets in the way; the other ranks wait.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

from . import data as D
from . import prune

SAMPLES = "samples.jsonl"
# the summary table's rows: each answer counting once, then the corpus scores,
# then the length (a prompt split's reward, reward/<name>, ... follow in name order)
ROWS = ("exact_match", "rouge_l", "chrf1", "chrf", "bleu", "brevity_penalty", "length_ratio")


def prompt_and_reference(norm: dict) -> Optional[tuple[object, object]]:
    """(prompt: text or messages, reference answer) of a normalised row, or None;
    a prompt row's reference is the row itself (what its grader reads)."""
    if "item" in norm:
        return norm["prompt"], norm["item"]
    if "chosen" in norm:
        chosen = norm["chosen"]
        if isinstance(chosen, str):
            return norm["prompt"], chosen
        return norm["prompt"], chosen[-1]["content"]
    if "label" in norm:  # feedback: only a thumbs-up answer is a reference
        if not norm["label"]:
            return None
        answer = norm["completion"]
        return norm["prompt"], answer if isinstance(answer, str) else answer[-1]["content"]
    if "completion" in norm:
        return norm["prompt"], norm["completion"]
    if "messages" in norm:
        msgs = norm["messages"]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        if last == 0:
            return None
        return msgs[:last], msgs[last]["content"]
    return None


def pick(rows: list, fmt: str, n: int, seed: int) -> list[tuple[object, str]]:
    """The first n usable rows of a seeded shuffle: the same ones on every run."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    out = []
    for i in order:
        norm, _why = D.normalize(rows[i], fmt)
        pair = prompt_and_reference(norm) if norm else None
        if pair and (isinstance(pair[1], dict) or pair[1].strip()):
            out.append(pair)
            if len(out) == n:
                break
    return out


def render(prompt, tokenizer) -> str:
    if isinstance(prompt, str):
        return prompt
    return D.template(tokenizer, prompt, generation_prompt=True)


def generate(model, tokenizer, prompts: list, settings) -> list[str]:
    """One prompt at a time: no padding, so the answers do not depend on the batch."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    answers = []
    for k, prompt in enumerate(prompts):
        ids = tokenizer(render(prompt, tokenizer), add_special_tokens=False, return_tensors="pt")
        ids = ids["input_ids"].to(device)
        kwargs = {"max_new_tokens": settings.max_new_tokens, "do_sample": settings.do_sample}
        if settings.do_sample:
            kwargs.update(temperature=settings.temperature, top_p=settings.top_p)
            torch.manual_seed(settings.seed + k)
        else:  # greedy: say so, whatever the model's generation_config prefers
            kwargs.update(temperature=None, top_p=None, top_k=None)
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                use_cache=True,
                **kwargs,
            )
        answers.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip())
    return answers


def score(predictions: list[str], references: list[str]) -> dict:
    """exact_match and rouge_l in [0, 1]; bleu, chrf and chrf1 (the mean of each
    answer's own chrF1) on sacrebleu's 0-100 scale; brevity_penalty (BLEU's, in
    (0, 1]: 1 unless the answers are shorter than the references) and length_ratio
    (the answers' length over the references', in BLEU's tokens: words and
    punctuation marks)."""
    import sacrebleu
    from rouge_score import rouge_scorer

    n = max(len(predictions), 1)
    exact = sum(p.strip() == r.strip() for p, r in zip(predictions, references, strict=True))
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rouge = sum(
        scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True)
    )
    bleu = sacrebleu.corpus_bleu(predictions, [references])
    return {
        "exact_match": exact / n,
        "rouge_l": rouge / n,
        "bleu": bleu.score,
        "brevity_penalty": bleu.bp,
        "chrf": sacrebleu.corpus_chrf(predictions, [references]).score,
        "chrf1": sum(chrf1(predictions, references)) / n,
        "length_ratio": bleu.sys_len / bleu.ref_len if bleu.ref_len else 0.0,
    }


def chrf1(predictions: list[str], references: list[str]) -> list[float]:
    """Each answer's chrF1 against its reference (0-100): character n-gram F-score
    with precision and recall weighted equally (sacrebleu's chrF, beta 1; its default,
    beta 2, counts recall twice and so favours answers longer than the reference)."""
    from sacrebleu.metrics import CHRF

    metric = CHRF(beta=1)
    return [
        metric.sentence_score(p, [r]).score for p, r in zip(predictions, references, strict=True)
    ]


def after_vs_before(before: list[float], after: list[float], by: str) -> dict:
    """Per answer, is the fine-tuned one's score higher (a win), the same (a tie) or
    lower (a loss) than the base model's? `by` names the score."""
    out = {"by": by, "wins": 0, "ties": 0, "losses": 0}
    for b, a in zip(before, after, strict=True):
        key = "ties" if math.isclose(a, b, abs_tol=1e-9) else "wins" if a > b else "losses"
        out[key] += 1
    return out


def rewards(grader, answers: list[str], items: list[dict], base_dir=None) -> tuple[dict, list]:
    """A prompt split's answers scored by the job's grader: ({reward, reward/<name>,
    grader_errors, grader_timeouts}, per answer {total, <name>: score})."""
    from .graders import Graders

    graders = Graders(grader, base_dir=base_dir)
    try:
        scores = graders.score([{"output_text": a} for a in answers], items)
    finally:
        graders.close()
    n = max(len(answers), 1)
    summary = {"reward": sum(scores.total) / n}
    for name, vals in sorted(scores.per_grader.items()):
        summary[f"reward/{name}"] = sum(vals) / n
    summary["grader_errors"] = sum(scores.errors.values())
    summary["grader_timeouts"] = sum(scores.timeouts.values())
    each = [
        {"total": t, **{name: vals[k] for name, vals in scores.per_grader.items()}}
        for k, t in enumerate(scores.total)
    ]
    return summary, each


def load_base(path: str, spec, use_gpu: bool, saved: bool = False):
    """The base model (or, saved=True, a folder the trainer wrote) for generating."""
    import torch
    from transformers import AutoModelForCausalLM

    m = spec.model
    kwargs = {"trust_remote_code": m.trust_remote_code}
    kwargs["dtype"] = torch.bfloat16 if use_gpu else torch.float32
    if not saved:
        kwargs["revision"] = m.revision
        if m.gguf_file:
            kwargs["gguf_file"] = m.gguf_file
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if not saved:  # where training started: the pruned model (a saved one already is)
        prune.apply(model, spec)
    return model.to("cuda") if use_gpu else model


def load_final(model_path: str, spec, final_dir: Path, use_gpu: bool):
    if spec.method.type == "full":
        return load_base(str(final_dir), spec, use_gpu, saved=True)
    from peft import PeftModel

    return PeftModel.from_pretrained(load_base(model_path, spec, use_gpu), str(final_dir))


def run(
    settings,
    held_out: dict[str, list],
    fmt: str,
    tokenizer,
    models: dict[str, Callable[[], Any]],
    storage,
    local: Path,
    log: Callable[[str], None],
    grader=None,
    base_dir: Optional[str] = None,
    formats: Optional[dict[str, str]] = None,
) -> Optional[dict]:
    """Rank 0: answers before and after on the held-out prompts (`held_out`: split ->
    rows; `models`: "before"/"after" -> a loader); writes samples.jsonl beside the
    outputs; returns the record for outputs.json. Prompt rows (objective grpo) are
    scored by the job's `grader` instead of against a reference answer: each sample
    carries its rewards before and after (else its chrF1 before and after), and
    `<split>_after_vs_before` counts the answers that score higher, the same, lower.
    `formats`: a split in its own format (evaluation.retention's set), never graded."""
    if settings is None:
        return None
    formats = formats or {}
    sets = {
        k: pick(rows, formats.get(k, fmt), settings.examples, settings.seed)
        for k, rows in held_out.items()
    }
    sets = {k: v for k, v in sets.items() if v}
    if not sets:
        log("evaluation.generation: no held-out prompt with a reference answer")
        return None
    answers: dict[str, dict[str, list[str]]] = {k: {} for k in sets}
    for when in ("before", "after"):
        model = models[when]()
        for split, pairs in sets.items():
            answers[split][when] = generate(model, tokenizer, [p for p, _ in pairs], settings)
        del model
    record: dict = {"examples": {k: len(v) for k, v in sets.items()}}
    lines = []
    for split, pairs in sets.items():
        refs = [r for _, r in pairs]
        # per answer: what samples.jsonl keeps (its rewards or its chrF1) and one number
        each: dict[str, list] = {}
        per: dict[str, list[float]] = {}
        graded = grader is not None and split not in formats
        for when in ("before", "after"):
            if graded:
                record[f"{split}_{when}"], each[when] = rewards(
                    grader, answers[split][when], refs, base_dir
                )
                per[when] = [r["total"] for r in each[when]]
            else:
                record[f"{split}_{when}"] = score(answers[split][when], refs)
                each[when] = per[when] = chrf1(answers[split][when], refs)
        by = "reward" if graded else "chrf1"
        record[f"{split}_after_vs_before"] = after_vs_before(per["before"], per["after"], by)
        for k, (prompt, ref) in enumerate(pairs):
            line = {
                "split": split,
                "prompt": prompt,
                "reference": ref,
                "before": answers[split]["before"][k],
                "after": answers[split]["after"][k],
            }
            kind = "rewards" if graded else "chrf1"
            line[f"{kind}_before"] = each["before"][k]
            line[f"{kind}_after"] = each["after"][k]
            lines.append(json.dumps(line))
    path = local / SAMPLES
    path.write_text("".join(line + "\n" for line in lines))
    storage.fs.put_file(str(path), storage.path(SAMPLES))
    record["samples"] = storage.uri(SAMPLES)
    return record


def _short(text, width: int = 70) -> str:
    if not isinstance(text, str):  # messages: the last turn is the question
        text = text[-1]["content"] if text else ""
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _reading(before: dict, after: dict, versus: Optional[dict]) -> list[str]:
    """The table in words: how the answers' length moved, and how many answers
    score higher after training than before (corpus scores can fall while most
    answers come closer: a few long answers weigh most in them)."""
    lines = []
    if "length_ratio" in before and "length_ratio" in after:
        lines.append(
            f"  length: the answers are {before['length_ratio']:.2f}x the references' "
            f"before, {after['length_ratio']:.2f}x after (1.00x: as long)"
        )
    if versus:
        n = versus["wins"] + versus["ties"] + versus["losses"]
        if versus["by"] == "reward":
            better, worse = "score a higher reward", "lower"
        else:
            better, worse = "are closer to their reference (by chrF1)", "further"
        lines.append(
            f"  after training {versus['wins']} of {n} answers {better}, "
            f"{versus['losses']} {worse}, {versus['ties']} the same"
        )
    return lines


def summary_lines(outputs: dict, storage, samples: int = 3, show=str) -> list[str]:
    """`kubetune run`'s end: test metrics, a before/after table, a few answers;
    `show` writes a URI the way the rest of the summary does."""
    lines = []
    test = outputs.get("testMetrics")
    if test:
        lines.append("  test split: " + ", ".join(f"{k} {v:.4f}" for k, v in test.items()))
    gen = outputs.get("generation")
    if not gen:
        return lines
    for split, n in gen.get("examples", {}).items():
        before, after = gen.get(f"{split}_before"), gen.get(f"{split}_after")
        if not before or not after:
            continue
        lines.append(f"  answers to {n} {split} prompts     before    after")
        # outputs.json sorts its keys: the rows in ROWS' order, then any other
        for key in sorted(before, key=lambda k: (ROWS.index(k) if k in ROWS else len(ROWS), k)):
            if key in after:
                lines.append(f"    {key:<28}{before[key]:>8.3f} {after[key]:>8.3f}")
        lines += _reading(before, after, gen.get(f"{split}_after_vs_before"))
    try:
        with storage.fs.open(storage.path(SAMPLES), "r") as f:
            rows = [json.loads(line) for _, line in zip(range(samples), f, strict=False)]
    except FileNotFoundError:
        rows = []
    for row in rows:
        lines.append(f"  prompt:    {_short(row['prompt'])}")
        if "rewards_before" in row:  # a prompt row: its rewards, not a reference
            b, a = row["rewards_before"]["total"], row["rewards_after"]["total"]
            lines.append(f"  before:    {_short(row['before'])}  (reward {b:.3f})")
            lines.append(f"  after:     {_short(row['after'])}  (reward {a:.3f})")
            continue
        lines.append(f"  reference: {_short(row['reference'])}")
        for when in ("before", "after"):
            chrf = row.get(f"chrf1_{when}")  # absent in a job finished before it was kept
            tail = f"  (chrF1 {chrf:.1f})" if chrf is not None else ""
            lines.append(f"  {when + ':':<11}{_short(row[when])}{tail}")
    if gen.get("samples"):
        lines.append(f"  {'samples:':<14}{show(gen['samples'])}")
    return lines
