"""Shared setup for the benchmark scripts: the quickstart model and data, a
held-out set, and one held-out loss function used for every contender."""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "trainer"))
sys.path.insert(0, str(REPO / "operator"))

MODEL = REPO / ".cache/models/SmolLM2-135M-Instruct"
DATA = REPO / ".cache/data/chatterbot-chat.jsonl"


def prepare() -> None:
    from kubetune_trainer import quickstart

    quickstart.prepare_model(REPO)
    quickstart.prepare_data(REPO)


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def chat_rows() -> list[dict]:
    """The chatterbot conversations, one exchange each, in file (topic) order."""
    return read_jsonl(DATA)


def distinct_rows(rows: list[dict]) -> list[dict]:
    """Each row once, the first of its repeats kept, compared as `dataset.clean`
    compares rows (kubetune_trainer.clean.canonical)."""
    from kubetune_trainer import clean

    seen: set[str] = set()
    unique = []
    for row in rows:
        key = clean.canonical(row)
        if key not in seen:
            seen.add(key)
            unique.append(row)
    return unique


def split(n_val: int = 150, seed: int = 0, distinct: bool = True):
    """(train, held-out) of the chatterbot conversations, shuffled with `seed`.
    distinct (the default): each conversation once (the corpus repeats many: 2,026
    rows hold 899 distinct ones, compared as `dataset.clean` compares them), so no
    held-out conversation is also a training one. False: the corpus as shipped, as
    the benchmarks' runs before 7 December split it (`--with-repeats`)."""
    import random

    rows = distinct_rows(chat_rows()) if distinct else chat_rows()
    random.Random(seed).shuffle(rows)
    return rows[n_val:], rows[:n_val]


def add_split_flag(parser) -> None:
    """`--with-repeats`: split the corpus as shipped (see `split`)."""
    parser.add_argument(
        "--with-repeats",
        action="store_true",
        help="keep the corpus's repeated conversations (then many held-out ones are also "
        "training ones), as this benchmark's runs before 7 December did",
    )


def varied_chats(seed: int = 0, median: float = 3.0, sigma: float = 1.2) -> list[dict]:
    """Multi-turn conversations of varied lengths from the chatterbot exchanges:
    consecutive exchanges of one topic file chained into one conversation, the
    number of exchanges log-normal (median 3, sigma 1.2, at most 40), so lengths
    spread over an order of magnitude the way real chat data does."""
    import random

    rows = chat_rows()
    rng = random.Random(seed)
    out, i = [], 0
    while i < len(rows):
        k = max(1, min(40, round(math.exp(rng.gauss(math.log(median), sigma)))))
        out.append({"messages": [m for r in rows[i : i + k] for m in r["messages"]]})
        i += k
    return out


def job(train: Path, out: str, name: str, **spec) -> dict:
    base = {
        "model": {"uri": str(MODEL)},
        "dataset": {
            "train": {"uri": str(train)},
            "format": "chat",
            "maxSeqLength": 128,
            "validationSplit": 0.0,
        },
        "method": {"type": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.05}},
        "hyperparameters": {
            "maxSteps": 10,
            "batchSize": 4,
            "precision": "bf16",
            "logEverySteps": 1,
        },
        "distributed": {"zeroStage": 2},
        "resources": {"workers": 1, "gpusPerWorker": 0, "cpuPerWorker": "2"},
        "evaluation": {"enabled": False},
        "checkpointing": {"everySteps": 100000},
        "output": {"uri": out},
    }
    for key, value in spec.items():
        base.setdefault(key, {}).update(value)
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": "bench", "uid": "b"},
        "spec": base,
    }


def tokenizer():
    """The model's tokenizer as kubetune's trainer loads it."""
    from kubetune_api import load_trainer_config, spec_to_trainer_config
    from kubetune_trainer import model as M

    spec = load_trainer_config(spec_to_trainer_config(job(Path("-"), "file:///-", "ref"))).spec
    return M.load_tokenizer(spec, str(MODEL))


def in_kubetune_order(rows: list[dict], n: int, seed: int) -> list[dict]:
    """The first n rows kubetune's trainer takes (its epoch order, seed `seed`,
    epochs repeated), for a contender whose sampler runs unshuffled."""
    from kubetune_trainer import data as D

    order = D.epoch_order(len(rows), seed, 0)
    return [rows[order[j % len(rows)]] for j in range(n)]


def peft_lora(lora: dict):
    """A PEFT LoraConfig of a spec's `method.lora` block, on all linear layers."""
    from peft import LoraConfig

    return LoraConfig(
        r=lora["r"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"],
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )


def with_adapters(base, adapters: list):
    """Yield (adapter, model) for each saved adapter on top of `base` in turn
    (None: the base model itself), unloading each before the next."""
    from peft import PeftModel

    for adapter in adapters:
        if adapter is None:
            yield adapter, base
            continue
        model = PeftModel.from_pretrained(base, adapter)
        yield adapter, model
        base = model.unload()


def heldout_scores(model, tokenizer, rows, max_len: int = 128, batch: int = 8):
    """(mean loss over the assistant tokens of the held-out conversations, the
    model's top-1 next token at each of those tokens), with kubetune's tokenization
    and masks: the same function for every contender."""
    import torch
    import torch.nn.functional as F

    from kubetune_trainer import data as D

    examples, _ = D.build_examples(rows, "chat", tokenizer, max_len)
    total = count = 0.0
    tops = []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(examples), batch):
            b = D.collate(
                examples,
                [[j] for j in range(i, min(i + batch, len(examples)))],
                tokenizer.pad_token_id,
                packing=False,
            )
            labels = b.pop("labels")
            logits = model(**b).logits.float()[:, :-1]
            target = labels[:, 1:]
            mask = target != D.IGNORE
            total += F.cross_entropy(logits[mask], target[mask], reduction="sum").item()
            count += mask.sum().item()
            tops.append(logits[mask].argmax(-1))
    loss = total / count if count else math.nan
    return loss, (torch.cat(tops) if tops else torch.empty(0, dtype=torch.long))


def heldout_loss(model, tokenizer, rows, max_len: int = 128, batch: int = 8) -> float:
    """Mean loss over assistant tokens of the held-out conversations."""
    return heldout_scores(model, tokenizer, rows, max_len, batch)[0]


# ------------------------------------------------------------------ one process per contender
RESULT = "KUBETUNE-BENCH-RESULT "


def isolated(script: str, contender: str, /, **kwargs) -> tuple[dict, float]:
    """Run `script`'s `contender(**kwargs)` in a fresh Python process (see
    `child_main`) and return (its JSON result, peak memory in GiB). The peak is
    the largest sum of resident memory over the child and every process it
    started (its Ray head and workers included), sampled 4 times a second. A
    contender in its own process leaves nothing behind for the next one: memory
    that a round's models, Ray actors or allocator caches hold is returned to
    the system when the process ends."""
    import psutil

    proc = subprocess.Popen(
        [sys.executable, str(Path(script).resolve()), "--child", contender, json.dumps(kwargs)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=str(Path(script).resolve().parent),
    )
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                tree = [root, *root.children(recursive=True)]
            except psutil.Error:
                return
            rss = 0
            for p in tree:
                with contextlib.suppress(psutil.Error):
                    rss += p.memory_info().rss
            peak[0] = max(peak[0], rss)
            done.wait(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    result = None
    for line in proc.stdout:
        if line.startswith(RESULT):
            result = json.loads(line[len(RESULT) :])
        else:
            sys.stdout.write(line)
    rc = proc.wait()
    done.set()
    sampler.join()
    if rc != 0 or result is None:
        raise SystemExit(f"{Path(script).name}: contender {contender} failed (exit {rc})")
    return result, peak[0] / 2**30


def peaks_line(peaks: dict) -> str:
    """The report's line of peak memory per contender (GiB, from `isolated`)."""
    return "peak memory of each process tree: " + ", ".join(
        f"{k} {v:.1f} GiB" for k, v in peaks.items() if not math.isnan(v)
    )


def child_main(contenders: dict) -> bool:
    """In a process started by `isolated`: run the named contender, print its
    result as one JSON line, and return True. Otherwise return False."""
    if len(sys.argv) != 4 or sys.argv[1] != "--child":
        return False
    result = contenders[sys.argv[2]](**json.loads(sys.argv[3]))
    print(RESULT + json.dumps(result), flush=True)
    return True


def ray_init() -> dict:
    """Arguments for the local Ray a contender's kubetune run starts."""
    return {"num_cpus": os.cpu_count(), "include_dashboard": False, "log_to_driver": False}


def steady_steps(prefix: Path, steps: int) -> tuple[list[dict], float]:
    """(the metrics rows of steps 1..N, the seconds steps 2..N took) from a run's
    metrics.jsonl (logged every step; step 1 is warm-up)."""
    rows = [json.loads(x) for x in (prefix / "metrics.jsonl").open()]
    rows = [r for r in rows if r.get("loss") is not None]
    assert [r["step"] for r in rows] == list(range(1, steps + 1)), rows
    pairs = zip(rows, rows[1:], strict=False)
    seconds = sum((b["tokens"] - a["tokens"]) / b["tokensPerSecond"] for a, b in pairs)
    return rows, seconds


def steady_tokens_per_second(prefix: Path, steps: int) -> tuple[float, int]:
    """(useful tokens / s over steps 2..N, those tokens) from a run's metrics.jsonl."""
    rows, seconds = steady_steps(prefix, steps)
    tokens = rows[-1]["tokens"] - rows[0]["tokens"]
    return tokens / seconds, tokens


class StepClock:
    """A transformers TrainerCallback (built lazily, so importing common stays
    cheap) timing optimizer steps 2..N."""

    def __new__(cls, steps: int):
        from transformers import TrainerCallback

        class Clock(TrainerCallback):
            seconds = math.nan

            def on_step_end(self, a, state, control, **kw):
                if state.global_step == 1:
                    self.t = time.perf_counter()
                if state.global_step == steps:
                    self.seconds = time.perf_counter() - self.t

        return Clock()
