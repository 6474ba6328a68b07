"""The protocol every training objective implements, and what it is handed.

An objective is the part of training that differs between SFT, DPO and the
objectives after them: how normalised rows become examples, what a batch unit
is and how a micro-batch is collated, the loss, the statistics it adds to a
metrics row, how it evaluates a split, and an optional setup for a second model
(a reference or a teacher). The recipe calls these and never asks which
objective it runs. The API side's row for the objective
(kubetune_api.objectives) names the formats it accepts, its metrics and its
default learning rate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional, Protocol

from .. import data as D
from ..data import DataReport, Example
from ..storage import JobStorage
from ..worker import Worker

Splits = dict[str, tuple[list[Example], list[list[int]]]]  # split -> (examples, units)


@dataclass
class TrainContext:
    """What an objective may use while training: passed in, never the recipe."""

    worker: Worker
    storage: JobStorage
    log: Callable[[str], None]
    progress: Callable[..., None]  # (TrainPhase, message): progress.json while it works
    model_path: str
    pad_id: int
    packing: bool
    batch_size: int
    max_batches: Optional[int]
    start_step: int  # the committed step this attempt continues from (0: fresh)
    # for the reference model (objectives.reference.Reference reads these):
    method: str = "lora"  # spec.method.type
    parent: Optional[Any] = None  # kubetune_trainer.parent.Parent (fromJob / fromCheckpoint)
    reference_use: Optional[str] = None  # the objective's reference_use (reference.use_of)
    reference_copy: Optional[Any] = None  # full fine-tuning, online: reference.prepare's copy


class Objective(Protocol):
    name: str
    # optimiser steps per training step (the learning-rate schedule counts them)
    updates_per_step: int
    # Optional class attribute `reference_use` (objectives.reference): None (no
    # reference model), "stored" (full fine-tuning scores the reference before step
    # 0 and keeps the numbers) or "online" (a frozen copy of the starting weights is
    # kept for full fine-tuning). LoRA's reference never needs a copy of the base.

    # data: no engine needed (the driver's data check calls these too)
    def build_examples(
        self, rows: list, fmt: str, tokenizer: Any, max_len: int
    ) -> tuple[list[Example], DataReport]: ...

    def tokenize(self, norm: dict, tokenizer: Any) -> tuple[list[int], list[int]]:
        """The tokens of one normalised row that count against maxSeqLength."""
        ...

    def units(
        self, examples: list[Example], max_len: int, packing: bool, seed: int
    ) -> list[list[int]]:
        """Batch units (lists of example indices): what a micro-batch is made of."""
        ...

    def collate(
        self, examples: list[Example], units: list[list[int]], pad_id: int, packing: bool
    ) -> dict: ...

    # training: every rank calls these at the same points
    def setup(self, ctx: TrainContext, splits: Splits) -> None:
        """Before the first step (and after a resume): keep ctx; load or score a
        second model if the objective has one."""
        ...

    def step_batches(self, batches: list[tuple[dict, int]]) -> list[tuple[dict, int]]:
        """A step's micro-batches (collated, on the device; with their token counts)
        → what the step trains on, in order: gradient_accumulation_steps of them per
        optimiser step. Objectives trained on fixed examples return them as they
        are (FixedExamples); an online one makes its own (grpo: rollouts)."""
        ...

    def loss(self, batch: dict) -> Any:
        """The loss of one micro-batch already on the device (a scalar tensor)."""
        ...

    def metrics(self) -> dict[str, float]:
        """Its statistics since the last metrics row, reduced over every rank."""
        ...

    def evaluate(self, examples: list[Example], units: list[list[int]], split: str) -> dict:
        """eval_loss and its own eval_* metrics on a split, reduced over every rank."""
        ...

    def describe(self, row: dict) -> str:
        """Its part of a training log line (may be empty)."""
        ...


class SupervisedData:
    """The examples, units and collation of the supervised formats (data's own: one
    example per row, padded or packed): SFT's, and distillation's."""

    def build_examples(self, rows, fmt, tokenizer, max_len):
        return D.build_examples(rows, fmt, tokenizer, max_len)

    def tokenize(self, norm, tokenizer):
        return D.tokenize(norm, tokenizer)

    def units(self, examples, max_len, packing, seed):
        return D.sequences(examples, max_len, packing, seed)

    def collate(self, examples, units, pad_id, packing):
        return D.collate(examples, units, pad_id, packing)


class FixedExamples:
    """For objectives that train on the examples the data gives (SFT, DPO): a step
    is its micro-batches, one optimiser step."""

    updates_per_step = 1

    def step_batches(self, batches: list[tuple[dict, int]]) -> list[tuple[dict, int]]:
        return batches


def left_pad(prompts: list[list[int]], pad_id: int):
    """Prompts of token ids, padded on the left (as generate wants): (ids, mask)."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[r, width - len(p) :] = 1
    return ids, mask


def completion_mask(completions, eos_id: int):
    """1 on each completion's tokens up to and including its first EOS."""
    import torch

    is_eos = completions == eos_id
    n = completions.shape[1]
    first = torch.where(
        is_eos.any(dim=1),
        is_eos.int().argmax(dim=1),
        torch.full_like(is_eos[:, 0], n, dtype=torch.long),
    )
    return (torch.arange(n, device=completions.device)[None, :] <= first[:, None]).long()


def rollout_batch(prompt_ids, prompt_mask, completions, comp_mask) -> dict:
    """The model inputs of prompt + completion (positions counted from each row's
    first real token), labels on the completion's tokens only."""
    import torch

    ids = torch.cat([prompt_ids, completions], dim=1)
    mask = torch.cat([prompt_mask, comp_mask], dim=1)
    labels = torch.cat(
        [torch.full_like(prompt_ids, D.IGNORE), completions.masked_fill(comp_mask == 0, D.IGNORE)],
        dim=1,
    )
    position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": position_ids,
        "labels": labels,
    }
