"""The way from a job's creation to its first training step, phase by phase:
status.progress.startup.

Two sources, one clock: the cluster's (the RayJob's creation, the Ray pods'
PodScheduled condition and their containers' start, as the API server
recorded them) and the trainer's (progress.json's `startup`: rank 0's way from
its worker's start to step 1, kubetune_api.storage.STARTUP_PHASES). Every
phase's `seconds` counts from the attempt's start: the job's creation for the
first attempt, the retry's RayJob for a later one. The trainer's phases are
placed by the time its worker started (whole seconds, as every Kubernetes
time), their spacing kept from the trainer's own clock.

Pure: the pods come in as plain dicts; reconciler.py lists them while the job
runs until both pod phases are known, then never again for that attempt.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Optional

from .conditions import parse_time, rfc3339
from .names import Body

CREATED = "created"
# Seen by the API server, in order.
CLUSTER_PHASES = ("rayJobCreated", "podsScheduled", "containersStarted")
MAX_PHASES = 12


def _time(text: Optional[str]) -> Optional[datetime]:
    try:
        return parse_time(text)
    except (TypeError, ValueError):
        return None


def pod_phases(pods: Iterable[Body]) -> dict[str, str]:
    """podsScheduled: the last Ray pod's PodScheduled=True; containersStarted:
    the last pod's newest container start (its images pulled and the container
    running). A phase some pod has not reached yet is left out, and so are both
    when there is no pod."""
    scheduled: list[datetime] = []
    started: list[datetime] = []
    count = 0
    for pod in pods:
        count += 1
        st = pod.get("status") or {}
        when = next(
            (
                _time(c.get("lastTransitionTime"))
                for c in st.get("conditions") or []
                if c.get("type") == "PodScheduled" and c.get("status") == "True"
            ),
            None,
        )
        if when is not None:
            scheduled.append(when)
        starts = [
            _time(state.get("startedAt"))
            for cs in st.get("containerStatuses") or []
            for state in ((cs.get("state") or {}).get(k) for k in ("running", "terminated"))
            if state
        ]
        starts = [s for s in starts if s is not None]
        if starts:
            started.append(max(starts))
    out: dict[str, str] = {}
    if count and len(scheduled) == count:
        out["podsScheduled"] = rfc3339(max(scheduled))
    if count and len(started) == count:
        out["containersStarted"] = rfc3339(max(started))
    return out


def cluster_phases_of(progress: Optional[dict]) -> dict[str, str]:
    """The cluster phases a status already shows (kept once the pods are gone)."""
    return {
        p["name"]: p["time"]
        for p in (progress or {}).get("startup") or []
        if isinstance(p, dict) and p.get("name") in CLUSTER_PHASES and p.get("time")
    }


def combine(
    attempt_start: Optional[str], cluster: dict[str, str], trainer: Optional[list[dict]]
) -> Optional[list[dict]]:
    """status.progress.startup: the attempt's start, the cluster's phases, then
    the trainer's (its `seconds` count from its worker's start; here they count
    from the attempt's start). None when the attempt's start is unknown."""
    t0 = _time(attempt_start)
    if t0 is None:
        return None
    out = [{"name": CREATED, "time": attempt_start, "seconds": 0.0}]
    for name in CLUSTER_PHASES:
        when = _time(cluster.get(name))
        if when is not None:
            out.append({"name": name, "time": cluster[name], "seconds": _secs(when, t0)})
    phases = [p for p in trainer or [] if isinstance(p, dict) and p.get("name")]
    first = next((p for p in phases if p["name"] == "workerStarted"), None)
    base = _time(first.get("time")) if first else None
    if base is not None:
        offset = (base - t0).total_seconds() - float(first.get("seconds") or 0.0)
        for p in phases:
            try:
                seconds = round(offset + float(p.get("seconds")), 1)
            except (TypeError, ValueError):
                continue
            out.append({"name": p["name"], "time": p.get("time"), "seconds": seconds})
    return out[:MAX_PHASES]


def _secs(t: datetime, t0: datetime) -> float:
    return round((t - t0).total_seconds(), 1)


def reached_first_step(shown: Optional[list], ray_job_created: Optional[str] = None) -> bool:
    """The list ends at firstStep (and, if given, belongs to the RayJob made then)."""
    if not shown or not isinstance(shown[-1], dict) or shown[-1].get("name") != "firstStep":
        return False
    if ray_job_created is None:
        return True
    return cluster_phases_of({"startup": shown}).get("rayJobCreated") == ray_job_created
