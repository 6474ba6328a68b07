"""Data: read rows, normalise the formats, tokenize with loss masks, pack, batch.

The five supervised formats become one of three shapes before tokenizing:
  {"text": str}                               loss on every token
  {"prompt": str, "completion": str}          loss on the completion
  {"messages": [{"role", "content"}, ...]}    the model's chat template, loss on
                                              assistant turns only
The preference format becomes {"prompt", "chosen", "rejected"} (text or messages);
its examples are built by the objective that trains on pairs (objectives/dpo.py).
The feedback format becomes {"prompt", "completion", "label"} (text or messages; label
True for a thumbs up), built into examples by objectives/kto.py. The classification
format becomes {"text", "label"} (label a string or an integer), built into examples
by objectives/classify.py (label_names: the labels and their ids).
prepare() takes the objective's example builder and never imports one.
Rows that cannot be used are counted by reason, with a few examples, and a
dataset without a usable row raises DataError before any training starts.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

from . import clean as C
from . import staging
from .storage import filesystem, to_uri

IGNORE = -100
_ROLES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
}
# Used only for tokenizers that ship no chat template.
FALLBACK_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class DataError(ValueError):
    pass


# The keys each format reads from a row (optional ones in brackets).
EXPECTED_KEYS = {
    "text": "text",
    "prompt-completion": "prompt, completion",
    "chat": "messages",
    "alpaca": "instruction, output [, input]",
    "sharegpt": "conversations",
    "preference": "prompt, chosen, rejected",
    "feedback": "prompt, completion, label",
    "prompt": "prompt or messages [, the fields the grader reads]",
    "classification": "text, label",
}


class BadLine:
    """A line of a JSONL file that is not JSON: kept in place so rows keep their
    positions, reported with its 1-based line number."""

    def __init__(self, message: str):
        self.message = message

    def __repr__(self) -> str:
        return f"BadLine({self.message!r})"


class Rows(list):
    """Rows plus where each one came from ("train.jsonl line 4"), for messages."""

    def __init__(self, rows=(), where=None):
        super().__init__(rows)
        self.where = list(where) if where is not None else []

    def label(self, index: int) -> str:
        return self.where[index] if index < len(self.where) else f"row {index + 1}"


def describe_keys(row: Any) -> str:
    if isinstance(row, dict):
        return "keys found: " + (", ".join(map(str, row)) or "none")
    return f"got a {type(row).__name__}"


@dataclass
class DataReport:
    rows: int = 0
    usable: int = 0
    truncated: int = 0
    bad: Counter = field(default_factory=Counter)
    bad_examples: list[str] = field(default_factory=list)
    tokens: int = 0
    loss_tokens: int = 0

    def reject(self, where: str, reason: str, row: Any) -> None:
        self.bad[reason] += 1
        if len(self.bad_examples) < 5:
            detail = "" if isinstance(row, BadLine) else f" ({describe_keys(row)})"
            self.bad_examples.append(f"{where}: {reason}{detail}")

    def summary(self, name: str = "train") -> str:
        text = (
            f"{name}: {self.usable}/{self.rows} rows usable, {self.truncated} truncated, "
            f"{self.tokens} tokens ({self.loss_tokens} with loss)"
        )
        if self.bad:
            text += "; bad rows: " + ", ".join(f"{n} {r}" for r, n in self.bad.most_common())
            text += "".join(f"\n  {e}" for e in self.bad_examples)
        return text


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


# ---------------------------------------------------------------------------- reading


def parse_text(text: str, name: str) -> Rows:
    """Rows of a JSON or JSONL file's text; `name` labels them in messages. A
    whole-file JSON error raises DataError; a bad JSONL line becomes a BadLine."""
    lower = name.lower()
    stripped = text.lstrip()
    whole = lower.endswith(".json") and (
        stripped.startswith("[") or (stripped.startswith("{") and "\n{" not in text.strip())
    )
    if whole:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{name} line {exc.lineno} column {exc.colno}: invalid JSON: {exc.msg}"
            ) from None
        if isinstance(doc, dict):
            doc = doc["data"] if isinstance(doc.get("data"), list) else [doc]
        return Rows(doc, (f"{name} item {i}" for i in range(1, len(doc) + 1)))
    rows = Rows()
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            rows.append(BadLine(f"column {exc.colno}: {exc.msg}"))
        rows.where.append(f"{name} line {n}")
    return rows


def _read_file(fs, path: str) -> Rows:
    name = path.rsplit("/", 1)[-1]
    if path.lower().endswith(".parquet"):
        import pyarrow.parquet as pq

        with fs.open(path, "rb") as f:
            table = pq.read_table(f).to_pylist()
        return Rows(table, (f"{name} row {i}" for i in range(1, len(table) + 1)))
    with fs.open(path, "r", encoding="utf-8") as f:
        return parse_text(f.read(), name)


def read_rows(source, access=None, environ=None) -> Rows:
    """Rows of a DataSource: a file or folder (any fsspec URI), or a datasets name."""
    if source.name:
        import datasets

        ds = datasets.load_dataset(source.name, split=source.split)
        return Rows(ds)
    staged = staging.local(source.uri, environ)  # the job's stage, when the pods share one
    if staged is not None:
        fs, path = filesystem(to_uri(staged), None, "DATASET", environ)
    else:
        fs, path = filesystem(to_uri(source.uri), access, "DATASET", environ)
    if fs.isdir(path):
        files = sorted(
            p for p in fs.find(path) if p.lower().endswith((".jsonl", ".json", ".parquet"))
        )
        if not files:
            raise DataError(f"{source.uri}: no .jsonl, .json or .parquet file in the folder")
    elif fs.exists(path):
        files = [path]
    else:
        raise DataError(f"{source.uri}: no such file")
    rows = Rows()
    for p in files:
        part = _read_file(fs, p)
        rows.extend(part)
        rows.where.extend(part.where)
    return rows


# ---------------------------------------------------------------------------- formats


def _str(value) -> bool:
    return isinstance(value, str) and value.strip() != ""


def normalize(row: Any, fmt: str) -> tuple[Optional[dict], Optional[str]]:
    """(normalised row, None) or (None, why it is unusable)."""
    if isinstance(row, BadLine):
        return None, f"invalid JSON ({row.message})"
    if not isinstance(row, dict):
        return None, "not an object"
    if fmt == "text":
        if not _str(row.get("text")):
            return None, "missing or empty 'text'"
        return {"text": row["text"]}, None
    if fmt == "prompt-completion":
        prompt, completion = row.get("prompt"), row.get("completion")
        if isinstance(prompt, list) and isinstance(completion, list):
            return _messages(prompt + completion, "prompt/completion")
        if not isinstance(prompt, str) or not _str(completion):
            return None, "missing 'prompt' or empty 'completion'"
        return {"prompt": prompt, "completion": completion}, None
    if fmt == "alpaca":
        if not _str(row.get("instruction")) or not _str(row.get("output")):
            return None, "missing 'instruction' or 'output'"
        user = row["instruction"]
        if _str(row.get("input")):
            user += "\n\n" + row["input"]
        return {
            "messages": [
                {"role": "user", "content": user},
                {"role": "assistant", "content": row["output"]},
            ]
        }, None
    if fmt == "sharegpt":
        conv = row.get("conversations")
        if not isinstance(conv, list):
            return None, "missing 'conversations' list"
        msgs = []
        for turn in conv:
            if not isinstance(turn, dict):
                return None, "a conversation turn is not an object"
            msgs.append({"role": turn.get("from"), "content": turn.get("value")})
        return _messages(msgs, "conversations")
    if fmt == "chat":
        return _messages(row.get("messages"), "messages")
    if fmt == "preference":
        return _preference(row)
    if fmt == "feedback":
        return _feedback(row)
    if fmt == "prompt":
        return _prompt(row)
    if fmt == "classification":
        return _classification(row)
    return None, f"unknown format {fmt!r}"


def _classification(row: dict) -> tuple[Optional[dict], Optional[str]]:
    """{"text": str, "label": str or int}: one label per text."""
    text, label = row.get("text"), row.get("label")
    if not _str(text):
        return None, "missing or empty 'text'"
    if isinstance(label, bool) or not (isinstance(label, int) or _str(label)):
        return None, "'label' must be a non-empty string or an integer"
    return {"text": text, "label": label}, None


def label_names(rows: list) -> list[str]:
    """method.task classification: the distinct labels of the usable rows, sorted (as
    numbers when every label is an integer), as strings: a label's id is its index."""
    seen = set()
    for row in rows:
        norm, _ = normalize(row, "classification")
        if norm is not None:
            seen.add(norm["label"])
    ints = all(isinstance(x, int) for x in seen)
    ordered = sorted(seen, key=(lambda x: x) if ints else str)
    return list(dict.fromkeys(str(x) for x in ordered))  # 1 and "1" are one label


def _messages(msgs, name: str) -> tuple[Optional[dict], Optional[str]]:
    if not isinstance(msgs, list) or not msgs:
        return None, f"missing or empty '{name}'"
    out = []
    for m in msgs:
        if not isinstance(m, dict):
            return None, "a message is not an object"
        role = _ROLES.get(str(m.get("role", "")).lower())
        if role is None:
            return None, f"unknown role {m.get('role')!r}"
        if not isinstance(m.get("content"), str):
            return None, "a message has no text 'content'"
        out.append({"role": role, "content": m["content"]})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in out):
        return None, "no assistant turn"
    return {"messages": out}, None


def _answer(value: Any) -> Optional[list]:
    """A response as a list of messages, or None when it is neither text nor messages."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}] if value.strip() else None
    if isinstance(value, list) and value:
        return value
    return None


def _preference(row: Any) -> tuple[Optional[dict], Optional[str]]:
    """Preference rows: plain text ({"prompt": str, "chosen": str, "rejected": str})
    or chat messages ({"prompt": [messages], "chosen": [messages] or str, ...});
    with messages the prompt may be left out when chosen and rejected are whole
    conversations that share every turn but the last answer."""
    prompt, chosen, rejected = row.get("prompt"), row.get("chosen"), row.get("rejected")
    if chosen is None or rejected is None:
        return None, "missing 'chosen' or 'rejected'"
    if isinstance(chosen, str) and isinstance(rejected, str) and isinstance(prompt, str):
        if not chosen.strip() or not rejected.strip():
            return None, "empty 'chosen' or 'rejected'"
        if chosen == rejected:
            return None, "'chosen' and 'rejected' are the same"
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}, None
    c, r = _answer(chosen), _answer(rejected)
    if c is None or r is None:
        return None, "'chosen' and 'rejected' must be non-empty text or message lists"
    if prompt is None:
        # implicit prompt: the turns both conversations share
        n = 0
        while n < min(len(c), len(r)) - 1 and c[n] == r[n]:
            n += 1
        prompt, c, r = c[:n], c[n:], r[n:]
    elif isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}] if prompt.strip() else []
    if not isinstance(prompt, list) or not prompt:
        return None, "missing 'prompt' (text or messages)"
    whole = []
    for part in (prompt, c, r):
        # the shared check wants an assistant turn, which a prompt need not have
        filler = [{"role": "assistant", "content": "x"}] if part is prompt else []
        norm, why = _messages(part + filler, "messages")
        if norm is None:
            return None, why
        whole.append(norm["messages"][: len(part)])
    prompt, c, r = whole
    if c == r:
        return None, "'chosen' and 'rejected' are the same"
    return {"prompt": prompt, "chosen": c, "rejected": r}, None


def _feedback(row: Any) -> tuple[Optional[dict], Optional[str]]:
    """Feedback rows (a rating of one answer): {"prompt": str, "completion": str,
    "label": bool} or with messages ({"prompt": [messages], "completion": [messages]
    or str, ...}). The label must be a JSON true (thumbs up) or false (thumbs down)."""
    prompt, completion, label = row.get("prompt"), row.get("completion"), row.get("label")
    if type(label).__name__ not in ("bool", "bool_"):  # numpy's bool from Parquet too
        return None, "'label' must be true (thumbs up) or false (thumbs down)"
    label = bool(label)
    if isinstance(prompt, str) and isinstance(completion, str):
        if not completion.strip():
            return None, "empty 'completion'"
        return {"prompt": prompt, "completion": completion, "label": label}, None
    answer = _answer(completion)
    if answer is None:
        return None, "'completion' must be non-empty text or a message list"
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}] if prompt.strip() else []
    if not isinstance(prompt, list) or not prompt:
        return None, "missing 'prompt' (text or messages)"
    whole = []
    for part in (prompt, answer):
        # the shared check wants an assistant turn, which a prompt need not have
        filler = [{"role": "assistant", "content": "x"}] if part is prompt else []
        norm, why = _messages(part + filler, "messages")
        if norm is None:
            return None, why
        whole.append(norm["messages"][: len(part)])
    return {"prompt": whole[0], "completion": whole[1], "label": label}, None


def _prompt(row: dict) -> tuple[Optional[dict], Optional[str]]:
    """Prompt rows (objective grpo): {"prompt": text or messages, "item": the row};
    the row's other fields are what the grader's templates read ({{item.<field>}})."""
    prompt = row.get("prompt", row.get("messages"))
    if isinstance(prompt, str):
        if not prompt.strip():
            return None, "empty 'prompt'"
        return {"prompt": prompt, "item": row}, None
    if not isinstance(prompt, list) or not prompt:
        return None, "missing 'prompt' (text) or 'messages'"
    # the shared message check wants an assistant turn, which a prompt does not have
    norm, why = _messages(prompt + [{"role": "assistant", "content": "x"}], "messages")
    if norm is None:
        return None, why
    msgs = norm["messages"][:-1]
    if msgs[-1]["role"] == "assistant":
        return None, "the prompt ends with an assistant turn: end it with the user's turn"
    return {"prompt": msgs, "item": row}, None


# ---------------------------------------------------------------------------- tokenize


def template(tokenizer, messages, generation_prompt=False) -> str:
    return tokenizer.apply_chat_template(
        messages,
        tokenize=False,
        add_generation_prompt=generation_prompt,
        chat_template=None if tokenizer.chat_template else FALLBACK_TEMPLATE,
    )


def tokenize(norm: dict, tokenizer) -> tuple[list[int], list[int]]:
    """One sequence of a text, prompt-completion or messages row (loss mask included);
    a preference row's answers are tokenized by the objective that trains on pairs."""
    eos = tokenizer.eos_token_id
    if "text" in norm:
        ids = tokenizer(norm["text"], add_special_tokens=False)["input_ids"] + [eos]
        return ids, list(ids)
    if "prompt" in norm:
        p = tokenizer(norm["prompt"], add_special_tokens=False)["input_ids"]
        c = tokenizer(norm["completion"], add_special_tokens=False)["input_ids"] + [eos]
        return p + c, [IGNORE] * len(p) + c
    msgs = norm["messages"]
    full = template(tokenizer, msgs)
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before = template(tokenizer, msgs[:i], generation_prompt=True) if i else ""
        upto = template(tokenizer, msgs[: i + 1])
        if not (full.startswith(upto) and upto.startswith(before)):
            raise DataError("the chat template does not render conversations prefix by prefix")
        spans.append((len(before), len(upto)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [
        t if any(s <= start < e for s, e in spans) else IGNORE
        for t, (start, _end) in zip(ids, enc["offset_mapping"], strict=False)
    ]
    return ids, labels


def build_examples(
    rows: list, fmt: str, tokenizer, max_len: int
) -> tuple[list[Example], DataReport]:
    """One example per usable row (the pairs of preference rows are the DPO
    objective's: kubetune_trainer.objectives.dpo.build_pairs)."""
    report = DataReport(rows=len(rows))
    label = rows.label if isinstance(rows, Rows) else (lambda i: f"row {i + 1}")
    out = []
    for index, row in enumerate(rows):
        norm, why = normalize(row, fmt)
        if norm is None:
            report.reject(label(index), why, row)
            continue
        ids, labels = tokenize(norm, tokenizer)
        if len(ids) > max_len:
            report.truncated += 1
            ids, labels = ids[:max_len], labels[:max_len]
        if labels:
            labels[0] = IGNORE  # never predicted from a previous packed example
        n_loss = sum(1 for x in labels if x != IGNORE)
        if n_loss == 0:
            report.reject(label(index), "no tokens left to learn from after truncation", row)
            continue
        report.usable += 1
        report.tokens += len(ids)
        report.loss_tokens += n_loss
        out.append(Example(ids, labels))
    return out, report


def require_usable(report: DataReport, name: str) -> None:
    if report.usable == 0:
        raise DataError(f"{name} data has no usable rows. " + report.summary(name))


# ---------------------------------------------------------------------------- batches


def pack(examples: list[Example], max_len: int, seed: int) -> list[list[int]]:
    """Indices of examples per sequence of at most max_len tokens (first fit,
    random order): no example is split across sequences."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(examples[i].input_ids)
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(max_len - n)
    return bins


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order sequences are visited in one epoch: a function of (seed, epoch)
    only, so a resumed run (and a benchmark's reference trainer) sees the same
    batches."""
    order = list(range(n))
    random.Random(seed * 1000003 + epoch).shuffle(order)
    return order


# ---------------------------------------------------------------------------- mixtures


def mixture_weights(sizes: list[int], weights: list, temperature: float) -> list[float]:
    """dataset.mixture's shares of the examples drawn (summing to 1): the sources'
    weights, normalised; without weights, size^(1/temperature) (1: proportional to
    size; large: uniform)."""
    if all(w is not None for w in weights):
        raw = [float(w) for w in weights]
    else:
        raw = [float(n) ** (1.0 / temperature) for n in sizes]
    total = sum(raw)
    return [w / total for w in raw]


def source_units(
    units_fn, examples: list, spans: list[range], max_len: int, packing: bool, seed: int
):
    """The batch units of each source on its own (a packed sequence never mixes two
    sources), in one list: (units, each source's range of units)."""
    units: list[list[int]] = []
    out: list[range] = []
    for span in spans:
        own = units_fn(examples[span.start : span.stop], max_len, packing, seed)
        start = len(units)
        units += [[span.start + i for i in u] for u in own]
        out.append(range(start, len(units)))
    return units, out


def interleave(
    units: list[list[int]], spans: list[range]
) -> tuple[list[list[int]], list[list[int]]]:
    """The held-out units of the sources taken in turn (one of each, then the next),
    so that an evaluation cut short by evaluation.maxBatches still sees every source;
    with each source's positions in the new list."""
    order: list[int] = []
    positions: list[list[int]] = [[] for _ in spans]
    for k in range(max((len(s) for s in spans), default=0)):
        for i, span in enumerate(spans):
            if k < len(span):
                positions[i].append(len(order))
                order.append(span[k])
    return [units[u] for u in order], positions


def mixture_counts(unit_spans: list[range], examples: list[int], weights: list[float]) -> list[int]:
    """Units drawn from each source per epoch, so that its share of the epoch's
    examples is its weight; an epoch holds as many examples as the sources do
    together (at temperature 1: each unit once). A unit may hold several examples
    (packing), so a source's count is scaled by its units per example."""
    total = sum(examples)
    return [
        max(1, round(w * total * len(span) / max(x, 1)))
        for w, span, x in zip(weights, unit_spans, examples, strict=False)
    ]


def mixture_order(unit_spans: list[range], counts: list[int], seed: int, epoch: int) -> list[int]:
    """One epoch of a mixture: counts[i] units of source i (its units in a shuffled
    order, again reshuffled when it runs out: a source drawn above its size repeats,
    one below is subsampled), the sources interleaved at random. A function of
    (seed, epoch) only, like epoch_order: a resumed run sees the same batches."""
    rng = random.Random((seed * 1000003 + epoch) * 31 + 7)
    picks = []
    for span, count in zip(unit_spans, counts, strict=False):
        drawn: list[int] = []
        while len(drawn) < count:
            perm = list(span)
            rng.shuffle(perm)
            drawn += perm
        picks.append(iter(drawn[:count]))
    slots = [i for i, count in enumerate(counts) for _ in range(count)]
    rng.shuffle(slots)
    return [next(picks[i]) for i in slots]


def sequences(examples: list[Example], max_len: int, packing: bool, seed: int) -> list[list[int]]:
    if packing:
        return pack(examples, max_len, seed)
    return [[i] for i in range(len(examples))]


def collate(examples: list[Example], seqs: list[list[int]], pad_id: int, packing: bool) -> dict:
    """One micro-batch. Packed: position ids restart at every example and there is
    no attention mask, so the model's packed-sequence masking keeps examples
    apart. Padded: right padding with an attention mask."""
    import torch

    rows = []
    for seq in seqs:
        ids, labels, pos = [], [], []
        for i in seq:
            ex = examples[i]
            ids += ex.input_ids
            labels += ex.labels
            pos += list(range(len(ex.input_ids)))
        rows.append((ids, labels, pos))
    width = max(len(r[0]) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (ids, lab, pos) in enumerate(rows):
        n = len(ids)
        input_ids[r, :n] = torch.tensor(ids)
        labels[r, :n] = torch.tensor(lab)
        position_ids[r, :n] = torch.tensor(pos)
        position_ids[r, n:] = torch.arange(width - n)  # padding is its own "sequence"
        attention[r, :n] = 1
    batch = {"input_ids": input_ids, "labels": labels}
    if packing:
        batch["position_ids"] = position_ids
    else:
        batch["attention_mask"] = attention
    return batch


def next_token_positions(batch: dict, pad_id: int):
    """[batch, length - 1] bool: the positions t of a collated batch whose next token
    (t + 1) is a real token of the same example, prompt or response. Padded: from
    the attention mask. Packed (no mask): a row's padding is the run of unlabelled
    pad tokens at its end, and a position id of 0 starts the next example."""
    ids, labels = batch["input_ids"], batch["labels"]
    if "attention_mask" in batch:
        real = batch["attention_mask"] > 0
    else:
        pad = (ids == pad_id) & (labels == IGNORE)
        real = ~pad.flip(-1).long().cumprod(-1).flip(-1).bool()
    keep = real[:, 1:] & real[:, :-1]
    if "position_ids" in batch:
        keep &= batch["position_ids"][:, 1:] != 0
    return keep


def data_dir(spec) -> Optional[str]:
    """The training data's folder when it is on this machine (a python grader's
    `file` is read beside it), else None."""
    import os

    uri = spec.dataset.train_sources()[0].uri
    if not uri or ("://" in uri and not uri.startswith("file://")):
        return None
    path = uri.removeprefix("file://")
    return path if os.path.isdir(path) else os.path.dirname(path)


def split_validation(rows: list, fraction: float, seed: int) -> tuple[Rows, Rows]:
    if fraction <= 0 or len(rows) < 2:
        return rows, Rows()
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_val = max(1, int(round(len(rows) * fraction)))
    val = set(order[:n_val])
    label = rows.label if isinstance(rows, Rows) else (lambda i: f"row {i + 1}")
    keep = [i for i in range(len(rows)) if i not in val]
    held = sorted(val)
    return (
        Rows((rows[i] for i in keep), (label(i) for i in keep)),
        Rows((rows[i] for i in held), (label(i) for i in held)),
    )


def clean_splits(splits: dict[str, list], fmt: str, clean) -> tuple[dict[str, Rows], dict]:
    """spec.dataset.clean on the raw rows of each split (train, validation, test):
    the rows left after its action, labels kept, and the report (kubetune_trainer.clean).
    Rows that do not fit the format are passed through, for the example builder to
    count as it always does."""
    action = clean.action.value if hasattr(clean.action, "value") else str(clean.action)
    kinds = [k.value if hasattr(k, "value") else str(k) for k in clean.pii]
    norms, labels = {}, {}
    for name, rows in splits.items():
        label = rows.label if isinstance(rows, Rows) else (lambda i: f"row {i + 1}")
        norms[name] = [normalize(row, fmt)[0] for row in rows]
        labels[name] = [label(i) for i in range(len(rows))]
    report = C.scan(norms, labels, clean.near_duplicate_threshold, kinds, action)
    out = {}
    for name, rows in splits.items():
        kept_rows, kept = C.apply(list(rows), report["splits"][name], action, kinds, fmt)
        out[name] = Rows(kept_rows, (labels[name][i] for i in kept))
    return out, report


@dataclass
class Source:
    """A dataset.mixture source as prepared: where its examples lie in the splits."""

    id: str
    format: str
    weight: float  # its share of the training examples drawn (the shares sum to 1)
    train: range  # its examples in Prepared.train
    val: range  # and in Prepared.val
    train_report: DataReport
    val_report: Optional[DataReport] = None


def merge_reports(reports: list[DataReport]) -> DataReport:
    out = DataReport()
    for r in reports:
        out.rows += r.rows
        out.usable += r.usable
        out.truncated += r.truncated
        out.bad.update(r.bad)
        out.bad_examples += r.bad_examples[: max(0, 5 - len(out.bad_examples))]
        out.tokens += r.tokens
        out.loss_tokens += r.loss_tokens
    return out


@dataclass
class Prepared:
    train: list[Example]
    val: list[Example]
    train_report: DataReport
    val_report: Optional[DataReport]
    test: list[Example] = field(default_factory=list)
    test_report: Optional[DataReport] = None
    # the held-out rows, normalised, for evaluation by generation
    val_rows: list = field(default_factory=list)
    test_rows: list = field(default_factory=list)
    clean: Optional[dict] = None  # spec.dataset.clean's report (kubetune_trainer.clean)
    sources: list[Source] = field(default_factory=list)  # dataset.mixture's, in order


def prepare(spec, tokenizer, environ=None, build=build_examples) -> Prepared:
    """The three splits of spec.dataset as examples. `build(rows, format, tokenizer,
    max_len)` is the objective's example builder (default: one example per row)."""
    ds = spec.dataset
    if ds.mixture:
        return prepare_mixture(spec, tokenizer, environ, build)
    rows = read_rows(ds.train, ds, environ)
    if ds.validation is not None:
        train_rows, val_rows = rows, read_rows(ds.validation, ds, environ)
    else:
        train_rows, val_rows = split_validation(
            rows, ds.validation_split, spec.hyperparameters.seed
        )
    test_rows = read_rows(ds.test, ds, environ) if ds.test is not None else None
    report = None
    if ds.clean is not None:  # before tokenizing: what is dropped is never seen
        splits = {"train": train_rows}
        if val_rows:
            splits["validation"] = val_rows
        if test_rows is not None:
            splits["test"] = test_rows
        splits, report = clean_splits(splits, ds.format, ds.clean)
        train_rows = splits["train"]
        val_rows, test_rows = splits.get("validation", val_rows), splits.get("test")
    train, train_report = build(train_rows, ds.format, tokenizer, ds.max_seq_length)
    require_usable(train_report, "train")
    val, val_report = [], None
    if val_rows:
        val, val_report = build(val_rows, ds.format, tokenizer, ds.max_seq_length)
    prepared = Prepared(train, val, train_report, val_report, val_rows=val_rows, clean=report)
    if test_rows is not None:
        prepared.test_rows = test_rows
        prepared.test, prepared.test_report = build(
            test_rows, ds.format, tokenizer, ds.max_seq_length
        )
    return prepared


def prepare_mixture(spec, tokenizer, environ=None, build=build_examples) -> Prepared:
    """dataset.mixture: each source read, split (validationSplit of each, with the
    seed) and built in its own format; the splits hold the sources one after the
    other, and Prepared.sources says where each lies and what share it gets."""
    ds, seed = spec.dataset, spec.hyperparameters.seed
    train: list[Example] = []
    val: list[Example] = []
    gen_rows: list = []  # evaluation.generation reads the held-out rows of dataset.format
    gen_where: list[str] = []
    base_format = ds.format.value if hasattr(ds.format, "value") else str(ds.format)
    sources: list[Source] = []
    for src in ds.mixture:
        fmt = ds.format_of(src)
        train_rows, held = split_validation(read_rows(src, ds, environ), ds.validation_split, seed)
        examples, report = build(train_rows, fmt, tokenizer, ds.max_seq_length)
        require_usable(report, f"train source {src.id}")
        held_out, held_report = [], None
        if held:
            held_out, held_report = build(held, fmt, tokenizer, ds.max_seq_length)
            if fmt == base_format:
                gen_rows += held
                gen_where += [f"{src.id}: {held.label(i)}" for i in range(len(held))]
        sources.append(
            Source(
                src.id,
                fmt,
                0.0,
                range(len(train), len(train) + len(examples)),
                range(len(val), len(val) + len(held_out)),
                report,
                held_report,
            )
        )
        train += examples
        val += held_out
    shares = mixture_weights(
        [len(s.train) for s in sources], [src.weight for src in ds.mixture], ds.mixture_temperature
    )
    for s, share in zip(sources, shares, strict=False):
        s.weight = share
    val_reports = [s.val_report for s in sources if s.val_report is not None]
    prepared = Prepared(
        train,
        val,
        merge_reports([s.train_report for s in sources]),
        merge_reports(val_reports) if val_reports else None,
        val_rows=Rows(gen_rows, gen_where),
        sources=sources,
    )
    if ds.test is not None:
        prepared.test_rows = read_rows(ds.test, ds, environ)
        prepared.test, prepared.test_report = build(
            prepared.test_rows, ds.format, tokenizer, ds.max_seq_length
        )
    return prepared


def describe_mixture(sources: list[Source]) -> list[str]:
    """One line per source, for the logs and `kubetune validate`."""
    return [
        f"source {s.id} ({s.format}): {len(s.train)} train / {len(s.val)} held-out "
        f"examples, share {s.weight:.1%}"
        for s in sources
    ]
