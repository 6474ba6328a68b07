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
API_CALLS = Counter(
    "kubetune_api_calls_total",
    "Kubernetes API calls made by the reconciler (kopf's own calls not included), by call",
    ["call"],
)
LEADER = Gauge(
    "kubetune_leader",
    "1 while this operator replica holds the leader Lease and acts; 0 while standby",
)
LEASE_RENEW_FAILURES = Counter(
    "kubetune_lease_renew_failures_total",
    "Failed tries to renew the leader Lease (past the renew deadline the replica stops)",
)
STATUS_CONFLICTS = Counter(
    "kubetune_status_conflicts_total",
    "Status writes refused because the FineTuneJob changed since it was read (read again)",
)
STATUS_WRITES = Histogram(
    "kubetune_status_writes_per_reconcile",
    "Status writes sent by one FineTuneJob reconcile: 0 (unchanged) or 1, never more",
    buckets=(0, 1, 2),
)
STORAGE_READS = Gauge(
    "kubetune_storage_reads_in_flight",
    "Storage reads holding a storage thread now (all namespaces; storage_limits.ReadSlots)",
)
STORAGE_DEFERRED = Counter(
    "kubetune_storage_reads_deferred_total",
    "Storage reads not started because their namespace's, store's or the operator's "
    "read slots were all taken (the next poll tries again)",
)
STARTUP_SECONDS = Histogram(
    "kubetune_startup_seconds",
    "Seconds from an attempt's start (the job's creation, or a retry's RayJob) to the end of "
    "each phase on its way to the first training step (status.progress.startup), by phase; "
    "observed once per attempt, when its first step is seen",
    ["phase"],
    buckets=(1, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600),
)

_phases: dict[str, str] = {}
_lock = threading.Lock()
for _p in Phase:
    JOBS.labels(phase=_p.value).set(0)


def observe_phase(uid: str, phase: Optional[str]) -> None:
    # Incremental: called on every reconcile of every job, so never a full recount.
    with _lock:
        old = _phases.get(uid)
        if not phase or phase == old:
            return
        if old:
            JOBS.labels(phase=old).dec()
        _phases[uid] = phase
        JOBS.labels(phase=phase).inc()


def forget(uid: str) -> None:
    with _lock:
        old = _phases.pop(uid, None)
        if old:
            JOBS.labels(phase=old).dec()


_serving: set[int] = set()


def serve(port: int, addr: str = "0.0.0.0") -> None:
    """Start the endpoint once per process (a standby starts it before kopf does)."""
    with _lock:
        if port in _serving:
            return
        start_http_server(port, addr=addr)
        _serving.add(port)


def observe_startup(startup: list[dict]) -> None:
    for phase in startup[1:]:
        STARTUP_SECONDS.labels(phase=phase["name"]).observe(max(0.0, phase["seconds"]))
