"""Direct preference optimization: rows of prompt, chosen and rejected.

Data (dataset.format preference, normalised by data): each usable row becomes
two examples side by side, chosen at 2k and rejected at 2k + 1, with loss labels
on the response only. The unit of batching is the pair: both answers sit in the
same micro-batch (one packed row, or two padded rows), so one forward scores both.

The reference model is the policy the job starts from (objectives.reference):
with adapters the same weights with the adapter switched off, or, when the job
continues a parent's adapter (model.fromJob), that adapter kept frozen beside
the trained one, so step 0 has rewards 0 and a loss of log 2; for full
fine-tuning its log-probabilities are computed once, before the first step, and
stored beside the checkpoints (`reference_logps.json`), so a resumed run reads
them back instead of scoring with weights that have already moved.
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

NAME = "dpo"
REFERENCE = "reference_logps.json"
KEYS = "prompt, chosen, rejected"


# ---------------------------------------------------------------------------- pairs
def _tokenize_answer(prompt, answer, tokenizer) -> tuple[list[int], list[int]]:
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
        norm, why = D.normalize(row, "preference")
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


def build_examples(rows: list, fmt: str, tokenizer, max_len: int):
    """The objective's example builder (data.prepare's `build`): pairs."""
    return build_pairs(rows, tokenizer, max_len)


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


# ---------------------------------------------------------------------------- loss
def dpo_loss(
    pi_c,
    pi_r,
    ref_c,
    ref_r,
    beta: float,
    loss_type: str,
    label_smoothing: float,
    n_c=None,
    n_r=None,
):
    """Per pair: (loss, reward of chosen, reward of rejected). Log-probabilities are
    sums over the response tokens; ipo averages them per token (n_c, n_r) as the IPO
    paper does. Rewards are beta x (policy - reference) summed log-probabilities."""
    import torch.nn.functional as F

    if loss_type == "ipo":
        logits = (pi_c / n_c - pi_r / n_r) - (ref_c / n_c - ref_r / n_r)
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        logits = (pi_c - pi_r) - (ref_c - ref_r)
        if loss_type == "hinge":
            losses = F.relu(1 - beta * logits)
        else:
            losses = (
                -F.logsigmoid(beta * logits) * (1 - label_smoothing)
                - F.logsigmoid(-beta * logits) * label_smoothing
            )
    return losses, beta * (pi_c - ref_c).detach(), beta * (pi_r - ref_r).detach()


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


# ---------------------------------------------------------------------------- objective
class Dpo(FixedExamples):
    """Loss per micro-batch, running statistics for the metrics rows, evaluation,
    and the stored reference for full fine-tuning."""

    name = NAME
    reference_use = "stored"  # full fine-tuning: scored before step 0, kept

    def __init__(self, spec):
        self.cfg = spec.method.dpo
        self.ref: Optional[Reference] = None
        self.reference: dict[str, list[float]] = {}  # split -> log-prob per example
        self._stats = None
        self.ctx: Optional[TrainContext] = None

    # ---------------------------------------------------------------- data
    def build_examples(self, rows, fmt, tokenizer, max_len):
        return build_examples(rows, fmt, tokenizer, max_len)

    def tokenize(self, norm, tokenizer):
        return tokenize(norm, tokenizer)

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
        """Full fine-tuning: the base model's log-probabilities of every example, once,
        before the first step; a later attempt reads the stored file."""
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

    def _pairs(self, batch: dict, split: str):
        import torch

        w = self.ctx.worker
        pi, counts = sequence_logps(w.head, w.engine, batch)
        ref = self._reference_logps(batch, split)
        c = self.cfg
        losses, rc, rr = dpo_loss(
            pi[0::2],
            pi[1::2],
            ref[0::2],
            ref[1::2],
            c.beta,
            c.loss_type,
            c.label_smoothing,
            counts[0::2],
            counts[1::2],
        )
        stats = torch.stack(
            [
                losses.detach().sum(),
                rc.sum(),
                rr.sum(),
                (rc > rr).float().sum(),
                (rc - rr).sum(),
                torch.tensor(float(losses.numel()), device=losses.device),
            ]
        )
        return losses, stats

    # ---------------------------------------------------------------- train
    def loss(self, batch: dict):
        losses, stats = self._pairs(batch, "train")
        self._stats = stats if self._stats is None else self._stats + stats
        return losses.mean()

    def metrics(self) -> dict:
        """Means since the last metrics row, over every worker."""
        if self._stats is None:
            return {}
        stats = [float(x) for x in self._stats]
        loss, rc, rr, acc, margin, n = self.ctx.worker.allreduce(stats)
        self._stats = None
        n = max(n, 1)
        return {
            "rewards_chosen": rc / n,
            "rewards_rejected": rr / n,
            "reward_accuracy": acc / n,
            "reward_margin": margin / n,
        }

    def describe(self, row: dict) -> str:
        if row.get("reward_accuracy") is None:
            return ""
        return f" reward acc {row['reward_accuracy']:.2f} margin {row['reward_margin']:.3f}"

    def evaluate(self, examples, units, split: str) -> dict:
        import torch

        c = self.ctx
        w = c.worker
        total = torch.zeros(6, dtype=torch.float64)
        w.engine.eval()
        with torch.no_grad():
            for weight, lo, hi in w.eval_shards(len(units), c.batch_size, c.max_batches):
                _, stats = self._pairs(self._collate(examples, units[lo:hi]), split)
                total += weight * stats.double().cpu()
        w.engine.train()
        loss, rc, rr, acc, margin, count = w.allreduce(total.tolist())
        count = max(count, 1)
        return {
            "eval_loss": loss / count,
            "eval_rewards_chosen": rc / count,
            "eval_rewards_rejected": rr / count,
            "eval_reward_accuracy": acc / count,
            "eval_reward_margin": margin / count,
        }
