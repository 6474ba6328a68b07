"""What DPO and KTO share: two answers side by side per batch unit, scored as
summed log-probabilities against the reference model.

Each objective builds its examples in pairs (DPO: chosen at 2k and rejected at
2k + 1; KTO: the rated answer at 2k and a mismatched one at 2k + 1). A unit of
batching is such a pair, so one forward scores both (`sequences`, `collate`);
`sequence_logps` sums each answer's log-probabilities. `Paired` is the base class
of both objectives: the units, the collation, and the reference (objectives.reference):
the policy the job starts from, with adapters the same weights with the adapter
switched off or a continued parent's adapter frozen beside the trained one; for full
fine-tuning its log-probabilities are computed once, before the first step, and
stored beside the checkpoints (`reference_logps.json`), so a resumed run reads them
back instead of scoring with weights that have already moved.
"""

from __future__ import annotations

import hashlib
import json
import random
from typing import Optional

from kubetune_api import storage as contract

from .. import data as D
from ..data import IGNORE
from .base import FixedExamples, Splits, TrainContext
from .reference import Reference

REFERENCE = "reference_logps.json"


def tokenize_answer(prompt, answer, tokenizer) -> tuple[list[int], list[int]]:
    eos = tokenizer.eos_token_id
    if isinstance(prompt, str):
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        a = tokenizer(answer, add_special_tokens=False)["input_ids"] + [eos]
        return p + a, [D.IGNORE] * len(p) + a
    before = D.template(tokenizer, prompt, generation_prompt=True)
    full = D.template(tokenizer, prompt + answer)
    if not full.startswith(before):
        raise D.DataError("the chat template does not render conversations prefix by prefix")
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [
        t if start >= len(before) else D.IGNORE
        for t, (start, _end) in zip(ids, enc["offset_mapping"], strict=False)
    ]
    return ids, labels


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


def sequence_logps(head, forward, batch: dict):
    """(summed log-probability, response tokens) per example slot of a pair batch."""
    import torch
    import torch.nn.functional as F

    inputs = {k: v for k, v in batch.items() if k not in ("segments", "example_ids")}
    logits, target = head.logits(forward, inputs)
    keep = batch["labels"][:, 1:] != IGNORE
    slot = batch["segments"][:, 1:][keep]
    token_logp = -F.cross_entropy(logits, target, reduction="none")
    n = batch["example_ids"].numel()
    sums = torch.zeros(n, dtype=token_logp.dtype, device=token_logp.device)
    counts = torch.zeros(n, dtype=token_logp.dtype, device=token_logp.device)
    sums = sums.index_add(0, slot, token_logp)
    counts = counts.index_add(0, slot, torch.ones_like(token_logp))
    return sums, counts


def fingerprint(model_path: str, examples, parent=None) -> str:
    h = hashlib.sha256(str(model_path).encode())
    if parent is not None:  # the weights step 0 starts from
        h.update(f"{parent.kind}:{parent.uri}".encode())
    for ex in examples:
        h.update(json.dumps([ex.input_ids, ex.labels]).encode())
    return h.hexdigest()[:16]


class Paired(FixedExamples):
    """The base of DPO and KTO: pair units, their collation, and the reference. A
    subclass sets `name` and `cfg` and implements the data, the loss and the metrics."""

    reference_use = "stored"  # full fine-tuning: scored before step 0, kept

    def __init__(self, spec):
        self.ref: Optional[Reference] = None
        self.reference: dict[str, list[float]] = {}  # split -> log-prob per example
        self._stats = None
        self.ctx: Optional[TrainContext] = None

    # ---------------------------------------------------------------- units
    def units(self, examples, max_len, packing, seed):
        return sequences(examples, max_len, packing, seed)

    def collate(self, examples, units, pad_id, packing):
        return collate(examples, units, pad_id, packing)

    # ---------------------------------------------------------------- reference
    def _reference_logps(self, batch: dict, split: str):
        import torch

        w = self.ctx.worker
        if not self.ref.stored:
            with torch.no_grad(), self.ref.active():
                logps, _ = sequence_logps(w.head, w.engine, batch)
            return logps.detach()
        table = self.reference[split]
        ids = batch["example_ids"].tolist()
        return torch.tensor([table[i] for i in ids], dtype=torch.float32, device=w.device)

    def setup(self, ctx: TrainContext, splits: Splits) -> None:
        """The reference (objectives.reference). Full fine-tuning: the starting weights'
        log-probabilities of every example, once, before the first step; a later attempt
        reads the stored file."""
        self.ctx = ctx
        self.ref = Reference(ctx)
        ctx.log(self.ref.describe())
        if not self.ref.stored:
            return
        want = {n: fingerprint(ctx.model_path, ex, ctx.parent) for n, (ex, _) in splits.items()}
        stored = ctx.storage.read_json(REFERENCE)
        if stored and stored.get("fingerprints") == want:
            self.reference = stored["logps"]
            ctx.log(f"reference log-probabilities read from {REFERENCE}")
            return
        if ctx.start_step > 0:
            raise RuntimeError(
                f"{REFERENCE} is missing or was made for other data, and the weights have "
                "moved since step 0: start a new FineTuneJob"
            )
        ctx.progress(contract.TrainPhase.evaluating, "computing reference log-probabilities")
        for name, (examples, units) in splits.items():
            self.reference[name] = self._score_all(examples, units)
        if ctx.worker.rank == 0:
            ctx.storage.write_json(REFERENCE, {"fingerprints": want, "logps": self.reference})
        ctx.worker.barrier()
        ctx.log(
            f"reference log-probabilities of {sum(map(len, self.reference.values()))} "
            f"answers stored in {REFERENCE}"
        )

    def _score_all(self, examples, units) -> list[float]:
        import torch

        w = self.ctx.worker
        found: dict[int, float] = {}
        with torch.no_grad(), self.ref.active():  # before step 0: the starting weights
            for _weight, lo, hi in w.eval_shards(len(units), self.ctx.batch_size):
                batch = self._collate(examples, units[lo:hi])
                logps, _ = sequence_logps(w.head, w.engine, batch)
                for i, v in zip(batch["example_ids"].tolist(), logps.tolist(), strict=True):
                    found[i] = v
        merged: dict[int, float] = {}
        for part in w.gather(found):
            merged.update(part)
        return [merged[i] for i in range(len(examples))]

    # ---------------------------------------------------------------- batches
    def _collate(self, examples, units) -> dict:
        c = self.ctx
        return c.worker.to_device(collate(examples, units, c.pad_id, c.packing))
