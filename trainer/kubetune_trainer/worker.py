"""One Ray Train worker's place in the run: its rank, the collectives every rank
calls together, and the DeepSpeed engine (with the model's labelled head).

The recipe owns one Worker and hands it to the objective, so an objective
scores batches and reduces its statistics without reaching into the recipe.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator

from .model import LabelledHead


def lr_lambda(kind: str, warmup: int, total: int):
    def f(step: int) -> float:
        if kind != "constant" and step < warmup:
            return (step + 1) / (warmup + 1)
        if kind in ("constant", "constant_with_warmup"):
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def gated(schedule, start: int):
    """`schedule` from optimizer update `start` on, 0 before it (a part that waits
    for its unfreezing). A plain function: LambdaLR saves no state of it, so a
    resumed run rebuilds it from the spec."""

    def f(step: int) -> float:
        return schedule(step) if step >= start else 0.0

    return f


class Worker:
    def __init__(self, rank: int, world: int, use_gpu: bool):
        self.rank, self.world, self.use_gpu = rank, world, use_gpu
        self.engine = None  # set by init_engine
        self.head = None
        self.device = None
        self.stage = 0

    # ------------------------------------------------------------------ engine
    def init_engine(
        self, model, ds_config: dict, stage: int, hp, total_steps: int, groups=None
    ) -> None:
        """AdamW over the trainable parameters, the learning-rate schedule, DeepSpeed.

        `groups` (kubetune_trainer.freeze.Plan.optimizer_groups): (params, rate
        scale, first update) per parameter group; each group's rate is the
        schedule's times its scale, and 0 before its first update."""
        import deepspeed
        import torch

        self.stage = stage
        self.head = LabelledHead(model)
        warmup = math.ceil(hp.warmup_ratio * total_steps)
        schedule = lr_lambda(hp.lr_scheduler, warmup, total_steps)
        if groups:
            optimizer = torch.optim.AdamW(
                [{"params": ps, "lr": hp.learning_rate * scale} for ps, scale, _ in groups],
                lr=hp.learning_rate,
                weight_decay=hp.weight_decay,
            )
            schedule = [gated(schedule, start) for _, _, start in groups]
        else:
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=hp.learning_rate, weight_decay=hp.weight_decay)
        if not self.use_gpu and os.environ.get("KUBETUNE_DEEPSPEED_SHM") != "1":
            # On CPU DeepSpeed compiles a shared-memory all-reduce at init (needs
            # g++, ~1 min cold). gloo does the job; skip the build.
            # (importlib: the attribute deepspeed.comm.torch is PyTorch itself)
            import importlib

            ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
            if hasattr(ds_torch_comm, "build_shm_op"):
                ds_torch_comm.build_shm_op = lambda: None
        self.engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            config=ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
            dist_init_required=False,
        )
        self.device = self.engine.device

    def to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device) for k, v in batch.items()}

    # ------------------------------------------------------------------ collectives
    def allreduce(self, values: list[float]) -> list[float]:
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64)
        if self.use_gpu:
            t = t.cuda()
        if dist.is_initialized() and self.world > 1:
            dist.all_reduce(t)
        return t.cpu().tolist()

    def barrier(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized() and self.world > 1:
            dist.barrier()

    def gather(self, obj) -> list:
        import torch.distributed as dist

        if not (dist.is_initialized() and self.world > 1):
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def gathered(self, params):
        """ZeRO-3: the full parameters inside the block (every rank enters it)."""
        if self.stage == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        return contextlib.nullcontext()

    def writable(self, params):
        """ZeRO-3: the full parameters inside the block; what rank 0 writes there
        reaches every rank's partition when it ends (every rank enters it)."""
        if self.stage == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(params, modifier_rank=0)
        return contextlib.nullcontext()

    def eval_shards(
        self, n_units: int, batch_size: int, max_batches: int | None = None
    ) -> Iterator[tuple[float, int, int]]:
        """This rank's evaluation batches as (weight, start, end) over the units.
        Every rank runs the same number of forwards (ZeRO-3 needs them all); the
        extra ones repeat a batch with weight 0."""
        n = math.ceil(n_units / batch_size)
        if max_batches:
            n = min(n, max_batches)
        if n == 0:
            return
        for j in range(math.ceil(n / self.world)):
            b = j * self.world + self.rank
            start = (b % n) * batch_size
            yield (1.0 if b < n else 0.0), start, start + batch_size
