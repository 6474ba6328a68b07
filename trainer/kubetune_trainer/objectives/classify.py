"""method.task classification: a sequence-classification head, cross-entropy over
the labels.

Rows are dataset.format classification ({text, label}). The labels are the
training split's distinct labels, sorted (data.label_names): a label's id is its
index, and a held-out row whose label the training data lacks is an error that
names it. One example per row (dataset.packing does not apply: the head reads one
sequence's last real token), right-padded with the attention mask; the model is
AutoModelForSequenceClassification on the same checkpoint (kubetune_trainer.model),
so its config's pad_token_id finds the last real token it pools.

Evaluation: eval_loss (the labels' cross-entropy), eval_accuracy, eval_f1 (macro
over the labels: each label's F1 from its true and false positives and false
negatives, averaged) and eval_label_ece (the top label's expected calibration
error, calibration.bin_stats on the label logits). Each rank sums its shard's
counts and one all-reduce gives the split's numbers.
"""

from __future__ import annotations

from typing import Optional

from .. import calibration
from .. import data as D
from ..data import DataError, DataReport, Example, Rows
from .base import FixedExamples, Splits, TrainContext

NAME = "classification"
HELD_OUT = "dataset.validation, dataset.validationSplit or dataset.test"


def macro_f1(tp: list[float], fp: list[float], fn: list[float]) -> float:
    """Mean over the labels of 2TP / (2TP + FP + FN); a label with no true or
    predicted row scores 0 (it is in the mean: every label counts alike)."""
    scores = [
        (2 * t / (2 * t + p + n)) if (2 * t + p + n) > 0 else 0.0
        for t, p, n in zip(tp, fp, fn, strict=True)
    ]
    return sum(scores) / max(len(scores), 1)


class Classify(FixedExamples):
    name = NAME

    def __init__(self, spec):
        self.spec = spec
        self.labels: Optional[list[str]] = None  # set by the first split built: train
        self.ctx: Optional[TrainContext] = None

    # -------------------------------------------------------------------- data
    def build_examples(self, rows, fmt, tokenizer, max_len):
        """One example per usable row: the text's tokens, and its label id as the
        example's one label. The first call (prepare's train split) fixes the labels."""
        first = self.labels is None
        if first:
            self.labels = D.label_names(rows)
        ids_of = {name: i for i, name in enumerate(self.labels)}
        report = DataReport(rows=len(rows))
        where = rows.label if isinstance(rows, Rows) else (lambda i: f"row {i + 1}")
        out = []
        for index, row in enumerate(rows):
            norm, why = D.normalize(row, fmt)
            if norm is None:
                report.reject(where(index), why, row)
                continue
            label = str(norm["label"])
            if label not in ids_of:
                raise DataError(
                    f"{HELD_OUT}: {where(index)} has label {label!r}, which no training row "
                    f"has (the labels: {', '.join(self.labels)}): fix the row's label, or "
                    "add training rows with it"
                )
            ids, _ = self.tokenize(norm, tokenizer)
            if len(ids) > max_len:
                report.truncated += 1
                ids = ids[:max_len]
            report.usable += 1
            report.tokens += len(ids)
            report.loss_tokens += 1
            out.append(Example(ids, [ids_of[label]]))
        if first and len(self.labels) < 2:
            raise DataError(
                f"dataset.train: method.task classification needs at least two labels, the "
                f"training rows have {len(self.labels)} ({', '.join(self.labels) or 'none'}): "
                "add rows of another label"
            )
        return out, report

    def tokenize(self, norm, tokenizer):
        ids = tokenizer(norm["text"], add_special_tokens=True)["input_ids"]
        return ids, [D.IGNORE] * len(ids)

    def units(self, examples, max_len, packing, seed):
        return D.sequences(examples, max_len, False, seed)  # never packed

    def collate(self, examples, units, pad_id, packing):
        import torch

        rows = [examples[u[0]] for u in units]
        width = max(len(ex.input_ids) for ex in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, ex in enumerate(rows):
            ids[r, : len(ex.input_ids)] = torch.tensor(ex.input_ids)
            mask[r, : len(ex.input_ids)] = 1
        labels = torch.tensor([ex.labels[0] for ex in rows], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    # ---------------------------------------------------------------- training
    def setup(self, ctx: TrainContext, splits: Splits) -> None:
        self.ctx = ctx

    def logits(self, forward, batch: dict):
        out = forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return out.logits.float()

    def loss(self, batch: dict):
        import torch.nn.functional as F

        return F.cross_entropy(self.logits(self.ctx.worker.engine, batch), batch["labels"])

    def metrics(self) -> dict:
        return {}

    def describe(self, row: dict) -> str:
        acc = row.get("eval_accuracy")
        return f" accuracy {acc:.3f} F1 {row['eval_f1']:.3f}" if acc is not None else ""

    def evaluate(self, examples, units, split: str) -> dict:
        import torch
        import torch.nn.functional as F

        c = self.ctx
        w = c.worker
        k = len(self.labels)
        w.engine.eval()
        loss_sum = count = 0.0
        tp, fp, fn = [0.0] * k, [0.0] * k, [0.0] * k
        bins = [0.0] * (3 * calibration.BINS)
        with torch.no_grad():
            for weight, lo, hi in w.eval_shards(len(units), c.batch_size, c.max_batches):
                batch = w.to_device(self.collate(examples, units[lo:hi], c.pad_id, False))
                logits, target = self.logits(w.engine, batch), batch["labels"]
                pred = logits.argmax(-1)
                loss_sum += weight * F.cross_entropy(logits, target, reduction="sum").item()
                count += weight * target.numel()
                for j in range(k):
                    is_p, is_t = pred == j, target == j
                    tp[j] += weight * (is_p & is_t).sum().item()
                    fp[j] += weight * (is_p & ~is_t).sum().item()
                    fn[j] += weight * (~is_p & is_t).sum().item()
                stats = calibration.bin_stats(logits, target)
                bins = [b + weight * s for b, s in zip(bins, stats, strict=True)]
        w.engine.train()
        reduced = w.allreduce([loss_sum, count, *tp, *fp, *fn, *bins])
        loss_sum, count = reduced[0], reduced[1]
        tp, fp, fn = reduced[2 : 2 + k], reduced[2 + k : 2 + 2 * k], reduced[2 + 2 * k : 2 + 3 * k]
        return {
            "eval_loss": loss_sum / max(count, 1),
            "eval_accuracy": sum(tp) / max(count, 1),
            "eval_f1": macro_f1(tp, fp, fn),
            "eval_label_ece": calibration.summarize(reduced[2 + 3 * k :])["ece"],
        }
