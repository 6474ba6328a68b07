"""What a sweep may search over: one table, checked by the API server and the CLI.

Each sweepable spec field has an entry with its type and bounds (the same
bounds its own field carries in kubetune_api.models). From the table come the
Checks on `spec.sweep.parameters` (CEL for the API server, Python for
`kubetune validate`), so both refuse the same search spaces with the same
words. Fields not in the table (model, dataset, resources, ...) change what is
trained or where it runs, not how well: they are not swept.

Pure and dependency-free: models.py imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from .checks import Check
from .objectives import metric_mode


@dataclass(frozen=True)
class Sweepable:
    path: str  # camelCase, below spec
    integer: bool
    low: float
    high: float
    low_open: bool = False  # the bound itself is not allowed

    def in_bounds(self, v: Any) -> bool:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            return False
        above = v > self.low if self.low_open else v >= self.low
        return above and v <= self.high and (not self.integer or float(v).is_integer())

    def cel_in_bounds(self, var: str) -> str:
        op = ">" if self.low_open else ">="
        text = f"{var} {op} {_num(self.low)} && {var} <= {_num(self.high)}"
        if self.integer:
            text += f" && double(int({var})) == {var}"
        return f"({text})"

    @property
    def bounds_text(self) -> str:
        low = f"above {self.low:g}" if self.low_open else f"from {self.low:g}"
        kind = "whole numbers" if self.integer else "numbers"
        return f"{kind} {low} to {self.high:g}"


def _num(v: float) -> str:
    return f"{float(v)!r}"


SWEEPABLE: tuple[Sweepable, ...] = (
    Sweepable("hyperparameters.learningRate", False, 0.0, 1.0, low_open=True),
    Sweepable("hyperparameters.batchSize", True, 1, 4096),
    Sweepable("hyperparameters.warmupRatio", False, 0.0, 0.5),
    Sweepable("hyperparameters.weightDecay", False, 0.0, 1.0),
    Sweepable("hyperparameters.gradientAccumulationSteps", True, 1, 4096),
    Sweepable("method.lora.r", True, 1, 1024),
    Sweepable("method.lora.alpha", True, 1, 4096),
    Sweepable("method.lora.dropout", False, 0.0, 0.99),
)
BY_PATH = {s.path: s for s in SWEEPABLE}
SWEEPABLE_TEXT = ", ".join(s.path for s in SWEEPABLE)

PARAMETERS_MAX = 16
VALUE_MAX = 1e6  # above every sweepable field's bound; keeps CEL's int() in range

DISTRIBUTIONS = ("choice", "uniform", "logUniform", "intRange")


def _has(d: Any, key: str) -> bool:
    return isinstance(d, dict) and d.get(key) is not None


# ---------------------------------------------------------------------------- one parameter

PARAMETER_CHECKS = (
    Check(
        cel="self.distribution == 'choice' ? (has(self.values) && !has(self.low) && "
        "!has(self.high)) : (!has(self.values) && has(self.low) && has(self.high))",
        message="choice takes values (a list); uniform, logUniform and intRange take low and "
        "high: give the fields that match distribution",
        python=lambda p: (
            (_has(p, "values") and not _has(p, "low") and not _has(p, "high"))
            if p.get("distribution") == "choice"
            else (not _has(p, "values") and _has(p, "low") and _has(p, "high"))
        ),
        field="distribution",
    ),
    Check(
        cel="!has(self.low) || !has(self.high) || self.low < self.high",
        message="low must be below high: swap them, or use choice for a single value",
        python=lambda p: not (_has(p, "low") and _has(p, "high")) or p["low"] < p["high"],
        field="low",
    ),
    Check(
        cel="self.distribution != 'logUniform' || !has(self.low) || self.low > 0.0",
        message="logUniform needs low above 0: raise low, or use uniform",
        python=lambda p: (
            p.get("distribution") != "logUniform" or not _has(p, "low") or p["low"] > 0
        ),
        field="low",
    ),
    Check(
        cel="self.distribution != 'intRange' || ((!has(self.low) || double(int(self.low)) == "
        "self.low) && (!has(self.high) || double(int(self.high)) == self.high))",
        message="intRange takes whole numbers for low and high: round them, or use uniform",
        python=lambda p: (
            p.get("distribution") != "intRange"
            or all(float(p[k]).is_integer() for k in ("low", "high") if _has(p, k))
        ),
        field="low",
    ),
)


# ---------------------------------------------------------------------------- the map


def _known(m: Any) -> bool:
    return isinstance(m, dict) and all(k in BY_PATH for k in m)


KNOWN_PATHS = Check(
    cel="self.all(k, k in [" + ", ".join(f"'{s.path}'" for s in SWEEPABLE) + "])",
    message=f"can sweep only these spec fields: {SWEEPABLE_TEXT} (model, dataset, "
    "resources and the rest change what is trained or where, not how well): remove the "
    "others",
    python=_known,
)


def _plain(p: Any) -> Any:
    # the map's values arrive as models (pydantic validated them first)
    return p.to_dict() if hasattr(p, "to_dict") else p


def _fits(s: Sweepable, p: Any) -> bool:
    p = _plain(p)
    if not isinstance(p, dict):
        return True
    if s.integer and p.get("distribution") in ("uniform", "logUniform"):
        return False
    if not s.integer and p.get("distribution") == "intRange":
        return False
    values = p.get("values") if _has(p, "values") else []
    bounds = [p[k] for k in ("low", "high") if _has(p, k)]
    return all(s.in_bounds(v) for v in [*values, *bounds])


def _bounds_check(s: Sweepable) -> Check:
    p = f"self['{s.path}']"
    kinds = "['choice', 'intRange']" if s.integer else "['choice', 'uniform', 'logUniform']"
    use = "choice or intRange" if s.integer else "choice, uniform or logUniform"
    cel = (
        f"!('{s.path}' in self) || ({p}.distribution in {kinds} && "
        f"(!has({p}.values) || {p}.values.all(v, {s.cel_in_bounds('v')})) && "
        f"(!has({p}.low) || {s.cel_in_bounds(p + '.low')}) && "
        f"(!has({p}.high) || {s.cel_in_bounds(p + '.high')}))"
    )
    return Check(
        cel=cel,
        message=f"{s.path} takes {s.bounds_text} (its field's bounds), with {use}: "
        "change the values",
        python=lambda m, s=s: not isinstance(m, dict) or _fits(s, m.get(s.path)),
    )


PARAMETERS_CHECKS = (KNOWN_PATHS, *(_bounds_check(s) for s in SWEEPABLE))


# ASHA's grace period, the steps every trial trains before it can be stopped: the
# first of these that is set (a trial's first evaluation when gracePeriod is not
# given; evaluations default to each checkpoint). Ray's ASHAScheduler refuses a
# grace period above the trial's steps (max_t), once the cluster is up: the rule
# "sweep-grace-period-within-max-steps" (kubetune_api.rules) refuses it at the door.
GRACE_PERIOD_FROM = (
    "sweep.earlyStopping.gracePeriod",
    "evaluation.everySteps",
    "checkpointing.everySteps",
)


def grace_period(spec: dict) -> Optional[int]:
    """ASHA's grace period for a camelCase spec with its defaults applied."""
    for path in GRACE_PERIOD_FROM:
        node: Any = spec
        for key in path.split("."):
            node = node.get(key) if isinstance(node, dict) else None
        if node is not None:
            return node
    return None


def grace_period_cel(var: str = "self") -> str:
    """The same, as a CEL expression on the spec `var`."""
    *given, last = GRACE_PERIOD_FROM
    text = f"{var}.{last}"
    for path in reversed(given):
        text = f"has({var}.{path}) ? {var}.{path} : {text}"
    return f"({text})"


def mode_for(metric: str, mode: Optional[str]) -> str:
    """The metric's direction in the objectives table (lower is better for losses,
    higher for accuracies), unless mode says."""
    if mode:
        return mode
    return metric_mode(metric) or "min"
