"""The reference model of DPO, KTO and GRPO: the policy the job starts from, frozen.

A preference or reward objective measures how far the policy has moved from
where the job started (DPO's implicit rewards, GRPO's KL term). Where it
started depends on the method and on the parent (spec.model.fromJob /
fromCheckpoint, kubetune_trainer.parent):

- LoRA / QLoRA without a parent, with a parent merged into the base first, or
  with a fully fine-tuned parent (its weights replace the base): the starting
  policy is the model under the adapter, so the reference is the same weights
  with the adapter switched off (peft's `disable_adapter`; no second copy).
- LoRA / QLoRA continuing a parent's adapter: the trained adapter starts as the
  parent's, so switching it off would give the base, not the starting policy.
  A frozen copy of the parent's adapter is loaded beside the trained one (peft
  holds several adapters on one model: `REFERENCE_ADAPTER` beside
  `TRAINED_ADAPTER`) and switched to for the reference forward. It is loaded
  before DeepSpeed initializes (`prepare`), so ZeRO-3 partitions it like the
  base weights and the optimizer never sees it; every switch puts
  `requires_grad` back exactly as it was (peft's set_adapter would make the
  active adapter trainable). Checkpoints and outputs hold the trained adapter
  only (checkpoint.save_adapter), so a resumed attempt loads the parent's
  adapter again as the reference, never the checkpoint's.
- Full fine-tuning, objectives that score the reference before step 0 and keep
  the numbers (`reference_use = "stored"`, DPO and KTO): no model is kept;
  `active()` gives the engine itself, which is the starting policy only before
  the first step (the objective stores what it scores then).
- Full fine-tuning, objectives that need the reference while training
  (`reference_use = "online"`, GRPO's KL term): a frozen copy of the starting
  weights, made before DeepSpeed initializes (`prepare`); on its own ZeRO-3
  engine (no optimizer) under ZeRO-3, else on the worker's device.

Objectives say which they need with the class attribute `reference_use`
(None: no reference; "stored" or "online"; read by the recipe through
`use_of`). Every rank builds the same Reference at the same point and enters
`active()` together (ZeRO-3 gathers weights inside the forward).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Any, Optional

from ..model import TRAINED_ADAPTER

REFERENCE_ADAPTER = "reference"

ADAPTER_OFF = "adapter off"
PARENT_ADAPTER = "parent adapter"
COPY = "frozen copy"
STORED = "stored"

USES = (None, "stored", "online")


def use_of(objective) -> Optional[str]:
    """The objective's `reference_use` (None when it declares none)."""
    use = getattr(objective, "reference_use", None)
    if use not in USES:
        raise ValueError(f"reference_use must be one of {USES}, got {use!r}")
    return use


def mode_for(method_type: str, parent, use: Optional[str]) -> Optional[str]:
    """Which reference a job gets (None: the objective uses none). `parent`:
    a kubetune_trainer.parent.Parent or None."""
    if use is None:
        return None
    if method_type != "full":
        if parent is not None and parent.kind == "adapter" and not parent.merge:
            return PARENT_ADAPTER
        return ADAPTER_OFF
    return COPY if use == "online" else STORED


def describe(mode: Optional[str], parent=None) -> str:
    """One line for the job's log: what the reference is and why."""
    if mode == PARENT_ADAPTER:
        return f"reference: the parent's adapter {parent.uri}, frozen beside the trained one"
    if mode == ADAPTER_OFF:
        if parent is not None:
            return f"reference: the model under the adapter (the parent {parent.kind} {parent.uri})"
        return "reference: the base model (the adapter switched off)"
    if mode == COPY:
        return "reference: a frozen copy of the starting weights"
    if mode == STORED:
        return "reference: log-probabilities of the starting weights, stored before step 0"
    return ""


def prepare(model, method_type: str, parent, use: Optional[str]) -> Any:
    """Before DeepSpeed initializes (every rank): load the parent's adapter as the
    frozen REFERENCE_ADAPTER, or return a frozen copy of the starting weights for an
    online full fine-tuning reference (to pass as TrainContext.reference_copy).
    Returns None otherwise."""
    mode = mode_for(method_type, parent, use)
    if mode == PARENT_ADAPTER:
        before = {n: p.requires_grad for n, p in model.named_parameters()}
        model.load_adapter(parent.local, adapter_name=REFERENCE_ADAPTER, is_trainable=False)
        model.set_adapter(TRAINED_ADAPTER)
        _restore(model, before)  # the new adapter's parameters: frozen
        return None
    if mode == COPY:
        ref = copy.deepcopy(model)
        ref.requires_grad_(False)
        ref.eval()
        return ref
    return None


def _flags_without(model, name: str) -> dict[str, bool]:
    """requires_grad per parameter, the named adapter frozen."""
    return {n: (p.requires_grad and f".{name}." not in n) for n, p in model.named_parameters()}


def _restore(model, flags: dict[str, bool]) -> None:
    for n, p in model.named_parameters():
        want = flags.get(n, False)
        if p.requires_grad != want:
            p.requires_grad_(want)


def place_frozen(model, worker):
    """A frozen model (a reference copy, a teacher) where it runs: on its own ZeRO-3
    engine (no optimizer, its weights partitioned over the workers like the trained
    model's) under ZeRO-3, else on the worker's device. Every rank calls it."""
    import torch

    if worker.stage != 3:
        return model.to(worker.device)
    import deepspeed

    dtype = next(model.parameters()).dtype
    cfg: dict = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    if dtype == torch.bfloat16:
        cfg["bf16"] = {"enabled": True}
    elif dtype == torch.float16:
        cfg["fp16"] = {"enabled": True}
    engine, *_ = deepspeed.initialize(model=model, config=cfg, dist_init_required=False)
    engine.eval()
    return engine


class Reference:
    """The policy the job starts from, frozen: LoRA without parent or a merged parent ->
    the adapter switched off; LoRA continuing a parent adapter -> a frozen copy of that
    adapter beside the trained one; full fine-tuning -> a frozen copy of the starting weights
    (online) or log-probabilities stored before step 0 (DPO/KTO, as DPO does today).

    To use it, an objective sets the class attribute `reference_use` ("stored":
    full fine-tuning scores the reference before step 0 and keeps the numbers, as
    DPO; "online": a frozen copy of the starting weights is kept for full
    fine-tuning, as GRPO's KL needs) and builds Reference(ctx) in its setup, after
    DeepSpeed initialized; the recipe ran `prepare` before that (the parent's
    adapter loaded beside the trained one, or the copy made).
    `active()`: inside it (and under torch.no_grad()) the forward of
    ctx.worker.engine (read it inside the block) computes the reference's logits;
    the model is in eval mode there (no dropout) and back as it was after.
    Also: `mode` (one of ADAPTER_OFF, PARENT_ADAPTER, COPY, STORED), `stored`
    (True when the objective must score and keep the reference before step 0),
    `describe()` (a log line).
    """

    def __init__(self, ctx):
        self.ctx = ctx
        self.mode = mode_for(ctx.method, ctx.parent, ctx.reference_use or "stored")
        self.stored = self.mode == STORED
        self._engine = None
        if self.mode == PARENT_ADAPTER:
            module = ctx.worker.engine.module
            if REFERENCE_ADAPTER not in getattr(module, "peft_config", {}):
                raise RuntimeError(
                    "the reference adapter was not loaded before DeepSpeed initialized "
                    "(objectives.reference.prepare)"
                )
            self._flags = _flags_without(module, REFERENCE_ADAPTER)
        elif self.mode == COPY:
            if ctx.reference_copy is None:
                raise RuntimeError(
                    "no frozen copy of the starting weights (objectives.reference.prepare)"
                )
            self._engine = self._place(ctx.reference_copy)

    def _place(self, model):
        return place_frozen(model, self.ctx.worker)

    def describe(self) -> str:
        return describe(self.mode, self.ctx.parent)

    @contextmanager
    def active(self):
        w = self.ctx.worker
        engine = w.engine
        module = engine.module
        was_training = module.training
        if self.mode == ADAPTER_OFF:
            module.eval()
            try:
                with module.disable_adapter():
                    yield
            finally:
                module.train(was_training)
        elif self.mode == PARENT_ADAPTER:
            module.eval()
            module.set_adapter(REFERENCE_ADAPTER, inference_mode=True)
            try:
                yield
            finally:
                module.set_adapter(TRAINED_ADAPTER)
                _restore(module, self._flags)
                module.train(was_training)
        elif self.mode == COPY:
            w.engine = self._engine
            try:
                yield
            finally:
                w.engine = engine
        else:  # STORED: the engine itself, the starting policy before the first step
            module.eval()
            try:
                yield
            finally:
                module.train(was_training)
