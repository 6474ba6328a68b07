"""A sweep's plan and its record: what the trainer runs and the operator reads.

Under the job's prefix a sweep writes

    {prefix}/sweep.json              SweepRecord: every trial, rewritten on each change
    {prefix}/trials/{id}/...         one trial: the same records as a job (progress.json,
                                     metrics.jsonl, checkpoints/, outputs.json, adapter/)
    {prefix}/outputs.json            the best trial's outputs, once the sweep is done
    {prefix}/sweep.png               the metric of every trial over steps

A trial's id is a hash of its parameter values, so a sweep started again on
the same prefix finds each trial's folder: a finished trial is not trained
again, and one that was running resumes from its newest committed checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from enum import Enum
from typing import Any, Optional

from pydantic import Field

from . import sweep_space
from .models import FineTuneJobSpec, Sweep, _Model
from .storage import OutputsRecord, join
from .sweep_space import BY_PATH, mode_for

SWEEP = "sweep.json"
SWEEP_PLOT = "sweep.png"
TRIALS = "trials"


class TrialState(str, Enum):
    pending = "Pending"
    running = "Running"
    finished = "Finished"  # trained to its last step
    stopped = "Stopped"  # stopped early by ASHA: its metric trailed the others'
    failed = "Failed"

    @property
    def is_done(self) -> bool:
        return self in (TrialState.finished, TrialState.stopped)


class TrialRecord(_Model):
    id: str
    params: dict[str, float]
    state: TrialState = TrialState.pending
    step: int = Field(0, description="Steps trained so far.")
    total_steps: Optional[int] = None
    metric: Optional[float] = Field(None, description="Latest value of the sweep's metric.")
    best_metric: Optional[float] = Field(None, description="Best value of the sweep's metric.")
    stopped_early: bool = False
    message: Optional[str] = None


class SweepRecord(_Model):
    metric: str
    mode: str
    trials: int = Field(description="Trials planned.")
    parallel_trials: int
    algorithm: str
    records: list[TrialRecord] = Field(default_factory=list)
    best_trial: Optional[str] = None
    best_params: Optional[dict[str, float]] = None
    best_metric: Optional[float] = None
    steps_trained: int = Field(0, description="Steps trained, all trials together.")
    done: bool = False
    outputs: Optional[OutputsRecord] = None
    updated_at: Optional[str] = None

    def counts(self) -> dict[str, int]:
        out = {s.value: 0 for s in TrialState}
        for r in self.records:
            out[TrialState(r.state).value] += 1
        return out


def trial_id(params: dict[str, float]) -> str:
    text = json.dumps({k: float(v) for k, v in sorted(params.items())}, sort_keys=True)
    return "t" + hashlib.sha256(text.encode()).hexdigest()[:10]


def trial_prefix(prefix: str, tid: str) -> str:
    return join(prefix, TRIALS, tid)


def metric_mode(sweep: Sweep) -> str:
    return mode_for(sweep.metric, sweep.mode)


def grace_period(spec: FineTuneJobSpec) -> int:
    """Steps every trial trains before ASHA may stop it (sweep_space.GRACE_PERIOD_FROM)."""
    return sweep_space.grace_period(spec.to_dict())


def better(a: Optional[float], b: Optional[float], mode: str) -> bool:
    """a is better than b (None is worst)."""
    if a is None or (isinstance(a, float) and math.isnan(a)):
        return False
    if b is None:
        return True
    return a < b if mode == "min" else a > b


def cast(path: str, value: float) -> Any:
    return int(round(value)) if BY_PATH[path].integer else float(value)


def sample(sweep: Sweep, rng: random.Random) -> dict[str, Any]:
    """One draw from the space (the random algorithm)."""
    out = {}
    for path, p in sorted(sweep.parameters.items()):
        if p.distribution == "choice":
            v = rng.choice(p.values)
        elif p.distribution == "uniform":
            v = rng.uniform(p.low, p.high)
        elif p.distribution == "logUniform":
            v = math.exp(rng.uniform(math.log(p.low), math.log(p.high)))
        else:
            v = rng.randint(int(p.low), int(p.high))
        out[path] = cast(path, v)
    return out


def random_plan(sweep: Sweep, seed: int) -> list[dict[str, Any]]:
    """The random algorithm's trials, the same on every start: distinct draws
    (a space with fewer points than `trials` gives fewer trials)."""
    rng = random.Random(seed)
    plan: list[dict[str, Any]] = []
    seen: set[str] = set()
    for _ in range(sweep.trials * 20):
        if len(plan) == sweep.trials:
            break
        params = sample(sweep, rng)
        tid = trial_id(params)
        if tid not in seen:
            seen.add(tid)
            plan.append(params)
    return plan


def apply_params(spec: dict, params: dict[str, Any]) -> dict:
    """A camelCase spec with the trial's values set, and no sweep (a trial is a job)."""
    out = json.loads(json.dumps(spec))
    out.pop("sweep", None)
    for path, value in params.items():
        node = out
        *parents, leaf = path.split(".")
        for key in parents:
            if not isinstance(node.get(key), dict):
                node[key] = {}  # e.g. method.lora unset: its defaults, then this value
            node = node[key]
        node[leaf] = cast(path, value)
    return out


def trial_spec(spec: FineTuneJobSpec, params: dict[str, Any]) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate(apply_params(spec.to_dict(), params))


def _dist_text(p) -> str:
    if p.distribution == "choice":
        return "one of " + ", ".join(f"{v:g}" for v in p.values)
    return f"{p.distribution} from {p.low:g} to {p.high:g}"


def describe(spec: FineTuneJobSpec) -> list[str]:
    """The expanded search space in words (for `kubetune validate`)."""
    sweep = spec.sweep
    if sweep is None:
        return []
    es = sweep.early_stopping
    lines = [
        f"sweep: {sweep.trials} trial(s), {sweep.parallel_trials} at a time, "
        f"{sweep.algorithm} search, {sweep.metric} ({metric_mode(sweep)}); each trial: "
        f"{spec.resources.workers} worker(s); the Ray cluster holds "
        f"{sweep.parallel_trials * spec.resources.workers} worker(s)"
    ]
    if es.enabled:
        lines.append(
            f"  early termination (ASHA): after {grace_period(spec)} step(s), keep the best "
            f"1/{es.reduction_factor} at each rung"
        )
    for path, p in sorted(sweep.parameters.items()):
        lines.append(f"  {path}: {_dist_text(p)}")
    if sweep.algorithm == "random":
        plan = random_plan(sweep, spec.hyperparameters.seed)
        if len(plan) < sweep.trials:
            lines.append(f"  the space holds only {len(plan)} distinct trial(s)")
        for params in plan:
            shown = ", ".join(f"{k.rsplit('.', 1)[-1]}={v:g}" for k, v in params.items())
            lines.append(f"  trial {trial_id(params)}: {shown}")
    return lines
