"""The fine-tuning practice of docs/practice.md measured in one table, on
SmolLM2-135M-Instruct and the shipped chatterbot corpus, every number from the
trainer's own outputs.json (no separate scoring code).

Data, leak-free: every conversation once (the corpus repeats many, compared as
`dataset.clean` compares them). The job's domain is the categories other than
trivia, science, history, literature, psychology and ai; 150 of its
conversations are held out (`dataset.validation`), none of them in training. The
retention set (`--retention`): 64 paragraphs of English prose from the Python
standard library's docstrings, unlike chatterbot's short exchanges (`prose`, the
default: where forgetting shows), or 64 conversations of those six categories,
which no job trains on (`chat`: alike in style, so they tend to get easier).

Parts (`--parts`, each a `kubetune run` on local Ray + DeepSpeed, results kept in
`--work` so parts can run apart and the table is printed from all of them):

- `all`: full fine-tune, every layer; with `evaluation.retention`,
  `evaluation.calibration` (a fitted temperature) and `output.interpolation` at
  four weights, each scored on the held-out and the retention set (WiSE-FT);
- `frozen`: the same job with the bottom half of the decoder layers, the
  embeddings and the (tied) head frozen (`method.full.trainableLayers`);
- `mixture`: LoRA on a two-source `dataset.mixture` (the domain's chats and
  short sums, prompt-completion) at two weightings, each source's held-out loss;
- `classify`: `method.task: classification` (LoRA) on the topic of a
  conversation's first message (kubetune_trainer.quickstart.classification_rows):
  held-out accuracy, macro-F1 and label ECE before and after.

    .venv/bin/python benchmarks/practice_table.py [--parts all,frozen,mixture,classify]
        [--work DIR] [--full-steps 32] [--lora-steps 30] [--retention prose|chat]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import common as C
import yaml
from calibration_retention import RETAIN, category_rows
from practice_mixture import sums

HELDOUT, RETAINED, EVAL_BATCHES = 150, 64, 16
WEIGHTS = [0.25, 0.5, 0.75, 1.0]


# Python's own documentation: English prose unlike chatterbot's short exchanges,
# on every machine that runs this script
PROSE_MODULES = [
    "json",
    "csv",
    "argparse",
    "logging",
    "collections",
    "itertools",
    "functools",
    "pathlib",
    "subprocess",
    "threading",
    "random",
    "statistics",
    "datetime",
    "email",
    "http.client",
    "urllib.request",
    "unittest",
    "heapq",
    "bisect",
    "textwrap",
    "string",
    "shutil",
    "tempfile",
    "zipfile",
    "tarfile",
    "sqlite3",
    "socket",
    "selectors",
    "asyncio",
    "contextlib",
    "dataclasses",
    "enum",
    "typing",
    "decimal",
    "fractions",
    "math",
    "hashlib",
    "hmac",
    "secrets",
    "uuid",
    "pickle",
    "copy",
    "pprint",
    "difflib",
    "locale",
    "gettext",
    "calendar",
    "time",
    "queue",
    "sched",
    "signal",
    "mmap",
    "codecs",
    "io",
    "os",
]


def prose_rows() -> list[dict]:
    """Paragraphs of the standard library's docstrings (200 to 700 characters of
    sentences, no examples), each once, as text rows."""
    import importlib
    import inspect
    import re

    seen, rows = set(), []
    for name in PROSE_MODULES:
        mod = importlib.import_module(name)
        members = [getattr(mod, n) for n in sorted(dir(mod)) if not n.startswith("_")]
        for obj in [mod] + [m for m in members if inspect.isclass(m) or inspect.isfunction(m)]:
            for para in re.split(r"\n\s*\n", inspect.getdoc(obj) or ""):
                para = " ".join(para.split())
                if (
                    200 <= len(para) <= 700
                    and ">>>" not in para
                    and para.count("(") < 6
                    and para[:1].isupper()
                    and para.endswith(".")
                    and para not in seen
                ):
                    seen.add(para)
                    rows.append({"text": para})
    return rows


def data(work: Path, retention: str = "prose") -> dict:
    """The domain's train and held-out files and the retention file (made once)."""
    files = {k: work / f"{k}.jsonl" for k in ("train", "heldout")}
    files["retain"] = work / f"retain-{retention}.jsonl"
    if all(f.exists() for f in files.values()):
        return files
    from kubetune_trainer.quickstart import conversations

    stems = {topic for topic, _ in conversations()}
    domain = C.distinct_rows(category_rows(tuple(sorted(stems - set(RETAIN)))))
    retain = prose_rows() if retention == "prose" else C.distinct_rows(category_rows(RETAIN))
    random.Random(0).shuffle(domain)
    random.Random(0).shuffle(retain)
    C.write_jsonl(files["train"], domain[HELDOUT:])
    C.write_jsonl(files["heldout"], domain[:HELDOUT])
    C.write_jsonl(files["retain"], retain[:RETAINED])
    return files


def run_job(work: Path, name: str, spec: dict) -> tuple[dict, float]:
    """One `kubetune run`; (its outputs.json, seconds per step over steps 2..N)."""
    from kubetune_trainer.local import LocalRun, run_local

    files = data(work)
    doc = C.job(files["train"], (work / "runs").as_uri(), name)
    for key, value in spec.items():
        if isinstance(value, dict) and key != "method":  # the method is replaced whole
            doc["spec"].setdefault(key, {}).update(value)
        else:
            doc["spec"][key] = value
    doc["spec"]["dataset"] = {k: v for k, v in doc["spec"]["dataset"].items() if v is not None}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert run_local(LocalRun(file=str(path), progress=False)) == 0, name
    prefix = work / "runs/bench" / name / "b"
    steps = doc["spec"]["hyperparameters"]["maxSteps"]
    _, seconds = C.steady_steps(prefix, steps)
    return json.loads((prefix / "outputs.json").read_text()), seconds / max(1, steps - 1)


def full(work: Path, name: str, steps: int, frozen: bool, retention: str, lr: float) -> dict:
    files = data(work, retention)
    layers = json.loads((C.MODEL / "config.json").read_text())["num_hidden_layers"]
    method: dict = {"type": "full"}
    if frozen:
        method["full"] = {
            "trainableLayers": list(range(layers // 2, layers)),
            "trainEmbeddings": False,
            "trainHead": False,
        }
    spec = {
        "dataset": {"validation": {"uri": str(files["heldout"])}},
        "method": method,
        "hyperparameters": {
            "maxSteps": steps,
            "learningRate": lr,
            "lrScheduler": "constant",
            "warmupRatio": 0.0,
            "seed": 0,
            "precision": "fp32",
        },
        "evaluation": {
            "enabled": True,
            "everySteps": steps,
            "maxBatches": EVAL_BATCHES,
            "calibration": {"fitTemperature": True},
            "retention": {
                "dataset": {
                    "uri": str(files["retain"]),
                    "format": "text" if retention == "prose" else "chat",
                },
                "maxExamples": RETAINED,
            },
        },
    }
    if not frozen:
        spec["output"] = {"interpolation": {"weights": WEIGHTS, "select": "bestHeldOut"}}
    out, per_step = run_job(work, name, spec)
    return {
        "outputs": out,
        "secondsPerStep": per_step,
        "retention": retention,
        "steps": steps,
        "lr": lr,
    }


def mixture(work: Path, steps: int) -> dict:
    files = data(work)
    sums_file = C.write_jsonl(work / "sums.jsonl", sums(600))
    results = []
    for a, b in ((3, 1), (1, 3)):
        spec = {
            "dataset": {
                "train": None,
                "validationSplit": 0.05,
                "mixture": [
                    {"id": "chat", "uri": str(files["train"]), "weight": a},
                    {
                        "id": "sums",
                        "uri": str(sums_file),
                        "format": "prompt-completion",
                        "weight": b,
                    },
                ],
            },
            "hyperparameters": {"maxSteps": steps, "learningRate": 5e-4, "seed": 0},
            "evaluation": {"enabled": True, "everySteps": steps, "maxBatches": EVAL_BATCHES},
        }
        out, per_step = run_job(work, f"mix-{a}-{b}", spec)
        results.append({"weights": [a, b], "mixture": out["mixture"], "secondsPerStep": per_step})
    return {"runs": results, "steps": steps}


# topics with at least 20 distinct first messages (trivia, 261 of them, is left out:
# it would be a third of the data); at most CAP of each, a quarter of each held out
TOPICS = ("coding", "psychology", "ai", "emotion", "literature", "movies", "science", "sports")
CAP = 48


def classify(work: Path, steps: int) -> dict:
    from kubetune_trainer import quickstart

    by_topic: dict[str, list] = {}
    for row in quickstart.classification_rows(list(TOPICS)):
        by_topic.setdefault(row["label"], []).append(row)
    train_rows, val_rows = [], []
    for topic in TOPICS:
        rows = by_topic[topic]
        random.Random(0).shuffle(rows)
        rows = rows[:CAP]
        cut = len(rows) // 4
        val_rows += rows[:cut]
        train_rows += rows[cut:]
    random.Random(0).shuffle(train_rows)
    spec = {
        "dataset": {
            "train": {"uri": str(C.write_jsonl(work / "cls-train.jsonl", train_rows))},
            "validation": {"uri": str(C.write_jsonl(work / "cls-val.jsonl", val_rows))},
            "format": "classification",
        },
        "method": {
            "task": "classification",
            "type": "lora",
            "lora": {"r": 16, "alpha": 32, "dropout": 0.05},
        },
        "hyperparameters": {"maxSteps": steps, "learningRate": 5e-4, "seed": 0},
        "evaluation": {"enabled": True, "everySteps": steps},
    }
    out, per_step = run_job(work, "classify", spec)
    return {
        "outputs": out,
        "secondsPerStep": per_step,
        "rows": {"train": len(train_rows), "validation": len(val_rows)},
        "labels": list(TOPICS),
        "steps": steps,
    }


def _f(x, fmt=".4f") -> str:
    return "" if x is None else format(x, fmt)


def _times(before, regression):
    """A retention loss from the base's and the relative regression."""
    return None if before is None or regression is None else before * (1 + regression)


def _moved(before, after, fmt=".4f") -> str:
    return f"{_f(before, fmt)} → {_f(after, fmt)}"


def _row(*cells: str) -> None:
    """One row of the markdown table."""
    print("|" + "|".join(f" {c} " if c else " " for c in cells) + "|")


def _pct(x) -> str:
    return "" if x is None else f"{x:+.2%}"


def table(res: dict, args) -> None:
    print()
    kind = next((r["retention"] for r in res.values() if "retention" in r), args.retention)
    retained = (
        "paragraphs of Python's docstrings"
        if kind == "prose"
        else f"conversations of {', '.join(RETAIN)} (never trained)"
    )
    print(
        "SmolLM2-135M-Instruct on CPU, the shipped chatterbot corpus, every conversation "
        f"once; held-out: {HELDOUT} of the domain's conversations, retention: {RETAINED} "
        f"{retained}."
    )
    for key in ("all", "frozen"):
        if key in res:
            r = res[key]
            steps, lr = r.get("steps", args.full_steps), r.get("lr", args.full_lr)
            print(f"{key}: full, {steps} steps of batch 4, lr {lr:g} constant, fp32")
    print(
        f"mixture: LoRA r16, {res.get('mixture', {}).get('steps', args.lora_steps)} steps of "
        "batch 4, lr 5e-4; classify: LoRA r16, "
        f"{res.get('classify', {}).get('steps', args.classify_steps)} steps of batch 4, lr 5e-4"
    )
    print()
    _row("what", "setting", "held-out loss", "retention loss (regression)", "other", "s/step")
    print("|---" * 6 + "|")
    for key, label in (("all", "every layer"), ("frozen", "bottom half frozen")):
        if key not in res:
            continue
        out, p = res[key]["outputs"], res[key]["outputs"].get("parameters", {})
        ret = out.get("retention") or {}
        _row(
            "full fine-tune",
            label,
            _moved(out.get("initialEvalLoss"), out.get("finalEvalLoss")),
            _moved(ret.get("lossBefore"), ret.get("lossAfter"))
            + f" ({_pct(ret.get('regression'))})",
            f"{p.get('trainable', 0) / 1e6:.1f}M of {p.get('total', 0) / 1e6:.1f}M trainable",
            f"{res[key]['secondsPerStep']:.1f}",
        )
    for r in res.get("mixture", {}).get("runs", []):
        for s in r["mixture"]:
            _row(
                "mixture (LoRA)",
                f"chat:sums {r['weights'][0]}:{r['weights'][1]}, source {s['id']}",
                _moved(s.get("initialEvalLoss"), s.get("finalEvalLoss")),
                "",
                f"{s['weight']:.0%} of the draws, {s.get('trainedExamples')} examples trained",
                "",
            )
    if "all" in res:
        out = res["all"]["outputs"]
        interp = out.get("interpolation") or {}
        before = (out.get("retention") or {}).get("lossBefore")
        for w in interp.get("weights", []):
            published = w["alpha"] == interp.get("chosen")
            regression = w.get("retentionRegression")
            _row(
                "WiSE-FT of the full fine-tune",
                f"α = {w['alpha']:g}"
                + (f" (published: {interp.get('select', '')})" if published else ""),
                _f(w.get("evalLoss")),
                f"{_f(_times(before, regression))} ({_pct(regression)})",
                "",
                "",
            )
        cal = out.get("calibration") or {}
        if cal:
            _row(
                "calibration of the full fine-tune",
                f"answer tokens ({cal.get('tokens')})",
                "",
                "",
                f"ECE {_moved(cal.get('eceBefore'), cal.get('ece'))}; at fitted T = "
                f"{_f(cal.get('temperature'), '.3f')}: {_f(cal.get('eceAtTemperature'))}",
                "",
            )
    if "classify" in res:
        out = res["classify"]["outputs"]
        c = out.get("classification") or {}
        _row(
            f"classification (LoRA, {len(res['classify']['labels'])} topics, "
            f"{res['classify']['rows']['validation']} held out)",
            "sequence-classification head",
            _moved(out.get("initialEvalLoss"), out.get("finalEvalLoss")),
            "",
            f"accuracy {_moved(c.get('accuracyBefore'), c.get('accuracy'), '.3f')}; "
            f"macro-F1 {_moved(c.get('f1Before'), c.get('f1'), '.3f')}; "
            f"label ECE {_moved(c.get('eceBefore'), c.get('ece'))}",
            f"{res['classify']['secondsPerStep']:.1f}",
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--parts", default="all,frozen,mixture,classify")
    ap.add_argument("--work", help="keep the data and each part's results here (reused)")
    ap.add_argument("--full-steps", type=int, default=32)
    ap.add_argument(
        "--retention",
        choices=("prose", "chat"),
        default="prose",
        help="the retention set: paragraphs of Python's docstrings (prose), or the six "
        "chatterbot categories the job does not train on (chat)",
    )
    ap.add_argument("--full-lr", type=float, default=2e-5)
    ap.add_argument("--lora-steps", type=int, default=30)
    ap.add_argument("--classify-steps", type=int, default=60)
    args = ap.parse_args()
    C.prepare()
    work = Path(args.work or tempfile.mkdtemp(prefix="kubetune-practice-"))
    work.mkdir(parents=True, exist_ok=True)
    parts = {
        "all": lambda: full(work, "all", args.full_steps, False, args.retention, args.full_lr),
        "frozen": lambda: full(work, "frozen", args.full_steps, True, args.retention, args.full_lr),
        "mixture": lambda: mixture(work, args.lora_steps),
        "classify": lambda: classify(work, args.classify_steps),
    }
    for name in [p for p in args.parts.split(",") if p]:
        t0 = time.monotonic()
        result = parts[name]()
        result["seconds"] = time.monotonic() - t0
        (work / f"result-{name}.json").write_text(json.dumps(result, indent=1))
        print(f"{name}: {result['seconds']:.0f} s", flush=True)
    res = {
        p.stem.removeprefix("result-"): json.loads(p.read_text())
        for p in sorted(work.glob("result-*.json"))
    }
    table(res, args)
    print(f"\nresults in {work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
