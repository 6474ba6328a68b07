"""Weight interpolation (WiSE-FT, output.interpolation): models between the base
and the fine-tuned weights, each scored on the held-out set, one published.

The model at weight α is θ(α) = (1-α)·θ_base + α·θ_fine-tuned:
- lora/qlora: the adapter's update scaled by α. The base is what the adapter sits
  on, so θ(α) = W + α·s·BA: every LoRA layer's scaling s is multiplied by α while
  scoring, and the published adapter is the trained one with each lora_B × α
  (the same update, servable by peft and vLLM as any adapter). With a parent
  adapter that training continued, α scales the whole adapter, the parent's part
  too: the base is the model under the adapter.
- full: the weights averaged, parameter by parameter (in fp32, cast back to the
  training dtype), against the model training started from (the base, or the
  parent model, pruned as training pruned it).

Scoring runs the objective's own evaluation on the DeepSpeed engine's module,
changed in place one weight at a time and restored to the fine-tuned weights at
the end, so a score at α = 1 is the final held-out loss and no second model is
held on the accelerator. Full fine-tuning keeps two copies in host memory (the
base and the fine-tuned weights; under ZeRO-3 on rank 0 only, gathered one
parameter at a time).

Only the chosen weight is saved (storage: one more model, not one per weight);
every weight's scores are listed in outputs.json. `choose` states the rule.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

from kubetune_api import storage as contract

TIE = 1e-6  # held-out losses this close (absolute) count as equal

RULES = {
    "bestHeldOut": "the lowest held-out loss; a tie (within 1e-6) goes to the smaller "
    "weight, the one closer to the base",
    "fixed": "the weight set in output.interpolation.weight",
}
RETENTION_RULE = (
    "; only weights whose retention regression stays within evaluation.retention's bound "
    "compete (none within it: the smallest regression)"
)


def mix(base, tuned, alpha: float):
    """(1-α)·base + α·tuned in fp32, in tuned's dtype; α = 1 gives tuned exactly."""
    import torch

    if alpha == 1.0:
        return tuned.clone()
    out = torch.lerp(base.float(), tuned.float(), alpha)
    return out.to(tuned.dtype)


def choose(
    points: Sequence[contract.InterpolationPoint],
    select: str,
    weight: Optional[float] = None,
    retention_bound: Optional[float] = None,
) -> tuple[float, str]:
    """The published α and the rule in words.

    bestHeldOut: the lowest held-out loss, a tie to the smaller α. With a
    retention bound (evaluation.retention), only the weights whose regression is
    scored and within it compete; when none is, the one with the smallest
    regression is published (keeping what the base knew comes first)."""
    if select == "fixed":
        if weight is None or weight not in {p.alpha for p in points}:
            raise ValueError("output.interpolation.weight: set it to one of weights")
        return weight, RULES["fixed"]
    rule = RULES["bestHeldOut"]
    pool = list(points)
    if retention_bound is not None:
        rule += RETENTION_RULE
        scored = [p for p in pool if p.retention_regression is not None]
        within = [p for p in scored if p.retention_regression <= retention_bound]
        if within:
            pool = within
        elif scored:
            least = min(p.retention_regression for p in scored)
            pool = [p for p in scored if p.retention_regression == least]
    best = min(p.eval_loss for p in pool)
    return min(p.alpha for p in pool if p.eval_loss <= best + TIE), rule


# ------------------------------------------------------------------ lora/qlora
def lora_layers(module) -> list:
    from peft.tuners.lora import LoraLayer

    return [m for m in module.modules() if isinstance(m, LoraLayer)]


class LoraMix:
    """θ(α) on a peft model in place: each LoRA layer's scaling × α."""

    def __init__(self, module):
        self.layers = lora_layers(module)
        if not self.layers:
            raise ValueError("output.interpolation: the model has no LoRA layers to scale")
        self.saved = [dict(m.scaling) for m in self.layers]

    def set(self, alpha: float) -> None:
        for m, scaling in zip(self.layers, self.saved, strict=True):
            for name, s in scaling.items():
                m.scaling[name] = s * alpha

    def restore(self) -> None:
        self.set(1.0)


def scale_adapter(src: Path, dst: Path, alpha: float) -> None:
    """A copy of a saved adapter folder whose update is α times the original's:
    every lora_B tensor × α (computed in fp32, saved in its own dtype)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst, dirs_exist_ok=True)
    weights = dst / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    scaled = {
        k: (v.float() * alpha).to(v.dtype) if "lora_B" in k else v for k, v in tensors.items()
    }
    if not any("lora_B" in k for k in tensors):
        raise ValueError(f"{weights}: no lora_B tensors to scale")
    save_file({k: v.contiguous() for k, v in scaled.items()}, str(weights), {"format": "pt"})


# ------------------------------------------------------------------ full
class FullMix:
    """θ(α) on the engine's module in place, against the base's weights.

    `gathered(params)`: the worker's context that makes the parameters whole
    and writable (ZeRO-3: rank 0 writes, every rank receives); `holds`: whether
    this rank keeps the copies (every rank below ZeRO-3, rank 0 under it)."""

    def __init__(self, module, base_params: dict, gathered: Callable, holds: bool):
        self.params = list(module.named_parameters())
        self.gathered, self.holds = gathered, holds
        self.base: dict = {}
        self.tuned: dict = {}
        missing = []
        for name, p in self.params:
            with self.gathered([p]):
                if self.holds:
                    if name not in base_params:
                        missing.append(name)
                        continue
                    self.tuned[name] = p.detach().to("cpu", copy=True)
                    self.base[name] = base_params[name].detach().to("cpu", p.dtype)
        if missing:
            raise ValueError(
                "output.interpolation: the base model lacks parameters "
                f"{', '.join(missing[:3])}: it is not the model training started from"
            )

    def set(self, alpha: float) -> None:
        import torch

        with torch.no_grad():
            for name, p in self.params:
                with self.gathered([p]):
                    if self.holds:
                        p.data.copy_(mix(self.base[name], self.tuned[name], alpha).to(p.device))

    def restore(self) -> None:
        self.set(1.0)


def base_parameters(model) -> dict:
    return dict(model.named_parameters())


@contextmanager
def mixing(mixer) -> Iterator:
    """The mixer, with the fine-tuned weights put back however the block ends."""
    try:
        yield mixer
    finally:
        mixer.restore()


def point(alpha: float, result: dict[str, Any], retention: Optional[float] = None):
    return contract.InterpolationPoint(
        alpha=alpha,
        eval_loss=float(result["eval_loss"]),
        metrics={
            k: float(v)
            for k, v in result.items()
            if k != "eval_loss" and isinstance(v, int | float) and not isinstance(v, bool)
        },
        retention_regression=retention,
    )


def curve_lines(record: contract.InterpolationRecord) -> list[str]:
    """The scores, one line per weight, the published one marked."""
    return [
        f"α {p.alpha:.2f}: held-out loss {p.eval_loss:.4f}"
        + (
            f", retention regression {p.retention_regression:+.4f}"
            if p.retention_regression is not None
            else ""
        )
        + ("  <- published" if p.alpha == record.chosen else "")
        for p in record.weights
    ]
