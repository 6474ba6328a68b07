"""Preference data (dataset.format preference): rows of prompt, chosen, rejected.

A row is plain text ({"prompt": str, "chosen": str, "rejected": str}) or chat
messages ({"prompt": [messages], "chosen": [messages] or str, "rejected": ...});
with messages the prompt may be left out when chosen and rejected are whole
conversations that share every turn but the last answer. Each usable row becomes
two examples side by side, chosen at 2k and rejected at 2k + 1, with loss labels
on the response only. The unit of batching is the pair: both answers sit in the
same micro-batch (one packed row, or two padded rows), so one forward scores both.
"""

from __future__ import annotations

import random
from typing import Any, Optional

from . import data as D

KEYS = "prompt, chosen, rejected"


def _answer(value: Any) -> Optional[list]:
    """A response as a list of messages, or None when it is neither text nor messages."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}] if value.strip() else None
    if isinstance(value, list) and value:
        return value
    return None


def normalize(row: Any) -> tuple[Optional[dict], Optional[str]]:
    """(normalised row, None) or (None, why it is unusable)."""
    if isinstance(row, D.BadLine):
        return None, f"invalid JSON ({row.message})"
    if not isinstance(row, dict):
        return None, "not an object"
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
        norm, why = D._messages(part + filler, "messages")
        if norm is None:
            return None, why
        whole.append(norm["messages"][: len(part)])
    prompt, c, r = whole
    if c == r:
        return None, "'chosen' and 'rejected' are the same"
    return {"prompt": prompt, "chosen": c, "rejected": r}, None


def _tokenize_answer(prompt, answer, tokenizer) -> tuple[list[int], list[int]]:
    eos = tokenizer.eos_token_id
    if isinstance(prompt, str):
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        a = tokenizer(answer, add_special_tokens=False)["input_ids"] + [eos]
        return p + a, [D.IGNORE] * len(p) + a
    before = D._template(tokenizer, prompt, generation_prompt=True)
    full = D._template(tokenizer, prompt + answer)
    if not full.startswith(before):
        raise D.DataError("the chat template does not render conversations prefix by prefix")
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [
        t if start >= len(before) else D.IGNORE
        for t, (start, _end) in zip(ids, enc["offset_mapping"], strict=False)
    ]
    return ids, labels


def tokenize(norm: dict, tokenizer) -> tuple[list[int], list[int]]:
    """The longer of the two answers with its prompt: each is cut to maxSeqLength on
    its own, so this is the length that counts against it."""
    chosen = _tokenize_answer(norm["prompt"], norm["chosen"], tokenizer)
    rejected = _tokenize_answer(norm["prompt"], norm["rejected"], tokenizer)
    return max(chosen, rejected, key=lambda t: len(t[0]))


def build_pairs(rows: list, tokenizer, max_len: int) -> tuple[list[D.Example], D.DataReport]:
    """Examples chosen at 2k, rejected at 2k + 1. Each answer is cut to max_len tokens
    (the prompt is kept, the end of the answer goes); a pair is counted truncated once."""
    report = D.DataReport(rows=len(rows))
    label = rows.label if isinstance(rows, D.Rows) else (lambda i: f"row {i + 1}")
    out: list[D.Example] = []
    for index, row in enumerate(rows):
        norm, why = normalize(row)
        if norm is None:
            report.reject(label(index), why, row)
            continue
        pair, cut = [], False
        for answer in (norm["chosen"], norm["rejected"]):
            ids, labels = _tokenize_answer(norm["prompt"], answer, tokenizer)
            if len(ids) > max_len:
                cut = True
                ids, labels = ids[:max_len], labels[:max_len]
            labels[0] = D.IGNORE
            pair.append(D.Example(ids, labels))
        if any(all(x == D.IGNORE for x in ex.labels) for ex in pair):
            report.reject(label(index), "no tokens left to learn from after truncation", row)
            continue
        report.truncated += cut
        report.usable += 1
        for ex in pair:
            report.tokens += len(ex.input_ids)
            report.loss_tokens += sum(1 for x in ex.labels if x != D.IGNORE)
        out.extend(pair)
    return out, report


def sequences(examples: list[D.Example], max_len: int, packing: bool, seed: int) -> list[list[int]]:
    """Pairs per batch unit. Packed: whole pairs, first fit into max_len tokens in a
    random order (a pair longer than that gets a row of its own). Padded: one pair."""
    n_pairs = len(examples) // 2
    if not packing:
        return [[2 * k, 2 * k + 1] for k in range(n_pairs)]
    order = list(range(n_pairs))
    random.Random(seed).shuffle(order)
    bins: list[list[int]] = []
    room: list[int] = []
    for k in order:
        n = len(examples[2 * k].input_ids) + len(examples[2 * k + 1].input_ids)
        for b, free in enumerate(room):
            if n <= free:
                bins[b] += [2 * k, 2 * k + 1]
                room[b] -= n
                break
        else:
            bins.append([2 * k, 2 * k + 1])
            room.append(max_len - n)
    return bins


def collate(examples: list[D.Example], seqs: list[list[int]], pad_id: int, packing: bool) -> dict:
    """A micro-batch of pairs. Besides the model inputs: `segments` (per token, the
    slot of its example in this batch: chosen at 2j, rejected at 2j + 1; -1 on padding)
    and `example_ids` (per slot, the example's index, to look up stored reference
    log-probabilities). Packed: one row per unit; padded: one row per example, so an
    answer never attends to the other."""
    import torch

    rows: list[list[int]] = [s for s in seqs] if packing else [[i] for s in seqs for i in s]
    batch = D.collate(examples, rows, pad_id, packing)
    segments = torch.full_like(batch["input_ids"], -1)
    example_ids = []
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = len(examples[i].input_ids)
            segments[r, at : at + n] = len(example_ids)
            example_ids.append(i)
            at += n
    batch["segments"] = segments
    batch["example_ids"] = torch.tensor(example_ids, dtype=torch.long)
    return batch
