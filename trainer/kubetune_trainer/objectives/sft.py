"""Supervised fine-tuning: next-token cross-entropy on the labelled tokens.

Examples are data's own (one per row, in any of the five formats); a batch unit
is one example, or a packed row of several. Metrics: eval_loss,
eval_perplexity and eval_token_accuracy.
"""

from __future__ import annotations

import math
from typing import Optional

from .. import data as D
from .base import FixedExamples, Splits, SupervisedData, TrainContext

NAME = "sft"


class Sft(SupervisedData, FixedExamples):
    name = NAME

    def __init__(self, spec):
        self.spec = spec
        self.ctx: Optional[TrainContext] = None

    # ---------------------------------------------------------------- training
    def setup(self, ctx: TrainContext, splits: Splits) -> None:
        self.ctx = ctx

    def loss(self, batch: dict):
        w = self.ctx.worker
        return w.head.loss(w.engine, batch)

    def metrics(self) -> dict:
        return {}

    def describe(self, row: dict) -> str:
        return ""

    def evaluate(self, examples, units, split: str) -> dict:
        import torch
        import torch.nn.functional as F

        c = self.ctx
        w = c.worker
        w.engine.eval()
        loss_sum = correct = count = 0.0
        with torch.no_grad():
            for weight, lo, hi in w.eval_shards(len(units), c.batch_size, c.max_batches):
                batch = w.to_device(D.collate(examples, units[lo:hi], c.pad_id, c.packing))
                logits, target = w.head.logits(w.engine, batch)
                loss_sum += weight * F.cross_entropy(logits, target, reduction="sum").item()
                correct += weight * (logits.argmax(-1) == target).sum().item()
                count += weight * target.numel()
        w.engine.train()
        loss_sum, correct, count = w.allreduce([loss_sum, correct, count])
        loss = loss_sum / max(count, 1)
        return {
            "eval_loss": loss,
            "eval_perplexity": math.exp(min(loss, 50)),
            "eval_token_accuracy": correct / max(count, 1),
        }
