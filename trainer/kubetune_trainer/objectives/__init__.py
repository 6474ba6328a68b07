"""Training objectives, found by the name in spec.method.objective.

Each objective is one module implementing base.Objective; the API side's
objectives table (kubetune_api.objectives) holds the same names. A test checks
that the two agree.
"""

from __future__ import annotations

from .base import Objective, Splits, TrainContext
from .classify import Classify
from .distill import Distill
from .dpo import Dpo
from .grpo import Grpo
from .kto import Kto
from .sft import Sft

REGISTRY: dict[str, type] = {
    Sft.name: Sft,
    Dpo.name: Dpo,
    Kto.name: Kto,
    Grpo.name: Grpo,
    Distill.name: Distill,
}

__all__ = ["REGISTRY", "Objective", "Splits", "TrainContext", "for_spec"]


def for_spec(spec) -> Objective:
    """The objective a (resolved) spec trains with: method.task classification's
    head (its objective is sft, a rule says so), else method.objective's."""
    if spec.method.task == "classification":
        return Classify(spec)
    return REGISTRY[spec.method.objective](spec)
