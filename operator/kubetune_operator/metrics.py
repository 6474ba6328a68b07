"""Prometheus metrics: jobs by phase, reconcile latency, errors."""

from __future__ import annotations

import threading
from typing import Optional

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from kubetune_api.models import Phase

JOBS = Gauge("kubetune_finetunejobs", "FineTuneJobs seen by this operator, by phase", ["phase"])
RECONCILE_SECONDS = Histogram(
    "kubetune_reconcile_duration_seconds",
    "Time of one FineTuneJob reconcile",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
ERRORS = Counter("kubetune_reconcile_errors_total", "Reconcile errors by kind", ["kind"])

_phases: dict[str, str] = {}
_lock = threading.Lock()


def _publish() -> None:
    counts = {p.value: 0 for p in Phase}
    for phase in _phases.values():
        counts[phase] = counts.get(phase, 0) + 1
    for phase, n in counts.items():
        JOBS.labels(phase=phase).set(n)


def observe_phase(uid: str, phase: Optional[str]) -> None:
    with _lock:
        if phase:
            _phases[uid] = phase
        _publish()


def forget(uid: str) -> None:
    with _lock:
        _phases.pop(uid, None)
        _publish()


def serve(port: int, addr: str = "0.0.0.0") -> None:
    start_http_server(port, addr=addr)
