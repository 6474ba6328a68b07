"""Two operator replicas on the real control plane: one acts (the holder of a
coordination.k8s.io Lease), the other stands by; the leader SIGKILLed mid-job is
replaced within the bound leader.py states, with exactly one RayJob per attempt
and the status going on. And a status write from a stale view is refused
(409 Conflict) instead of clobbering a newer status."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import time

import pytest

from harness import wait_until
from operator_support import (
    OperatorProcess,
    apply,
    events,
    finetunejob,
    get,
    names,
    rayjob_finished,
    rayjob_running,
    status,
    wait_phase,
    wait_status,
)

pytestmark = pytest.mark.envtest
LEASE = "kubetune-operator"


def _holder(kube, namespace: str) -> str:
    out = kube.kubectl(
        "get", "lease", LEASE, "-n", namespace, "-o", "jsonpath={.spec.holderIdentity}", check=False
    )
    return out.stdout.strip() if out.returncode == 0 else ""


def _gauge(text: str, name: str) -> float | None:
    found = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(found.group(1)) if found else None


def _replica(kube, namespace, tmp_path, pod: str, env: dict | None = None) -> OperatorProcess:
    (tmp_path / pod).mkdir()
    return OperatorProcess(
        kube,
        [namespace],
        tmp_path / pod,
        extra_env={"KUBETUNE_POD_NAME": pod} | (env or {}),
        lease_namespace=namespace,
    )


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_lease_one_holder_takeover_only_after_the_duration_and_release(kube, namespace):
    """LeaderElector against the real Lease API, each replica with a clock of its
    own (no sleeps): a standby takes over only when the record has not changed
    for the duration by its own clock; the old holder then knows it lost."""
    from kubernetes import client

    from kubetune_operator.leader import LeaderElector, LeaseTiming

    timing = LeaseTiming()
    api_client = kube.api_client()
    custom = client.CustomObjectsApi(api_client)
    clocks = {who: FakeClock() for who in ("a", "b", "c")}
    a, b, c = (
        LeaderElector(custom, namespace, LEASE, f"{who}_1", timing, monotonic=clocks[who])
        for who in ("a", "b", "c")
    )
    try:
        assert a.try_once() and a.leading  # no Lease yet: created, held
        assert _holder(kube, namespace) == "a_1"
        assert not b.try_once()  # held: b starts its wait now
        clocks["b"].now += timing.duration - 1
        assert a.try_once()  # a renews: a new record...
        assert not b.try_once()  # ...restarts b's wait
        clocks["b"].now += timing.duration - 1
        assert not b.try_once() and _holder(kube, namespace) == "a_1"

        clocks["b"].now += 1  # a silent for the whole duration, by b's clock
        assert b.try_once() and b.leading
        lease = get(kube, "lease", LEASE, namespace)
        assert lease["spec"]["holderIdentity"] == "b_1"
        assert lease["spec"]["leaseTransitions"] == 1
        assert lease["spec"]["leaseDurationSeconds"] == 15
        assert not a.try_once()  # a wakes up: the Lease is b's
        assert a.lost.is_set() and not a.leading

        clocks["a"].now += timing.deadline  # b, by its own clock, past its deadline
        clocks["b"].now += timing.deadline
        assert not b.leading
        assert b.try_once() and b.leading  # renewing still works while it holds it

        b.release()  # a clean stop: c needs no wait at all
        assert _holder(kube, namespace) == ""
        assert c.try_once() and _holder(kube, namespace) == "c_1"
    finally:
        api_client.close()


@contextlib.contextmanager
def _two_replicas(kube, namespace, tmp_path, env: dict | None = None):
    """op-a starts first and leads; op-b starts next and stands by."""
    a = _replica(kube, namespace, tmp_path, "op-a", env).start()
    b = _replica(kube, namespace, tmp_path, "op-b", env)
    try:
        wait_until(lambda: _holder(kube, namespace).startswith("op-a_"), 30, what="op-a leads")
        b.start()
        wait_until(lambda: "standby as op-b_" in b.log_path.read_text(), 30, what="op-b waits")
        yield a, b
    finally:
        for op in (a, b):
            if op.proc and op.proc.poll() is None:
                op.proc.send_signal(signal.SIGCONT)
            op.stop()
            print(f"--- {op.log_path}\n{op.log_tail(40)}")


def test_leader_killed_mid_job_one_rayjob_per_attempt_and_failover_bound(kube, namespace, tmp_path):
    from kubetune_operator.leader import LeaseTiming

    bound = LeaseTiming().failover_bound  # the chart's defaults: 15 s lease, 2 s retry
    with _two_replicas(kube, namespace, tmp_path) as (a, b):
        apply(kube, namespace, finetunejob("ha"))  # backoffLimit 1: one retry
        wait_until(lambda: get(kube, "rayjob", "ha", namespace), 60, what="RayJob ha")
        rayjob_running(kube, "ha", namespace)
        wait_phase(kube, "ha", namespace, "Running")
        # Only the leader acts: the standby has made no API call for any job.
        assert _gauge(a.metrics(), "kubetune_leader") == 1.0
        b_metrics = b.metrics()
        assert _gauge(b_metrics, "kubetune_leader") == 0.0
        assert "kubetune_api_calls_total{" not in b_metrics, b_metrics
        assert _holder(kube, namespace).startswith("op-a_")

        a.kill()  # SIGKILL: no release, the Lease just stops being renewed
        killed = time.monotonic()
        rayjob_finished(kube, "ha", namespace, ok=False)  # the Ray job fails meanwhile
        wait_until(lambda: _holder(kube, namespace).startswith("op-b_"), 40, what="op-b leads")
        took_lease = time.monotonic() - killed
        st = wait_status(kube, "ha", namespace, lambda s: s.get("attempts") == 2, 30)
        acted = time.monotonic() - killed
        assert st["rayJobName"] == "ha-r1"
        wait_until(lambda: get(kube, "rayjob", "ha-r1", namespace), 30, what="RayJob ha-r1")
        wait_until(lambda: get(kube, "rayjob", "ha", namespace) is None, 30, what="ha deleted")
        rayjob_running(kube, "ha-r1", namespace)
        st = wait_phase(kube, "ha", namespace, "Running")  # the status goes on
        assert st["rayJobName"] == "ha-r1" and st["attempts"] == 2

        assert names(kube, "rayjob", namespace) == ["ha-r1"]
        created = sorted(
            e["message"] for e in events(kube, namespace, "ha") if e["reason"] == "RayJobCreated"
        )
        assert created == ["created RayJob ha (attempt 1)", "created RayJob ha-r1 (attempt 2)"]
        assert _gauge(b.metrics(), "kubetune_leader") == 1.0
        print(
            f"failover after SIGKILL: Lease held by the standby after {took_lease:.1f}s "
            f"(bound {bound:g}s), the retry written after {acted:.1f}s"
        )
        assert took_lease <= bound + 2  # + the test's own polling of the Lease


def test_a_frozen_leader_wakes_up_stopped_and_a_clean_stop_hands_over(kube, namespace, tmp_path):
    """SIGSTOP past the Lease (a stalled node, a long pause): the standby takes
    over; the old leader, woken, finds its renew deadline passed and exits 1
    without a write. Restarted (as its pod would be), it stands by; the new
    leader's clean stop (SIGTERM: a rolling update, a drain) hands it the Lease
    at once."""
    fast = {
        "KUBETUNE_LEASE_DURATION_SECONDS": "4",
        "KUBETUNE_LEASE_RENEW_DEADLINE_SECONDS": "2.5",
        "KUBETUNE_LEASE_RETRY_SECONDS": "0.5",
    }
    with _two_replicas(kube, namespace, tmp_path, fast) as (a, b):
        apply(kube, namespace, finetunejob("frozen"))
        wait_until(lambda: get(kube, "rayjob", "frozen", namespace), 60, what="RayJob frozen")
        wait_phase(kube, "frozen", namespace, "Starting")

        a.proc.send_signal(signal.SIGSTOP)
        wait_until(lambda: _holder(kube, namespace).startswith("op-b_"), 30, what="op-b leads")
        rayjob_running(kube, "frozen", namespace)
        wait_phase(kube, "frozen", namespace, "Running")  # written by op-b
        a.proc.send_signal(signal.SIGCONT)
        assert a.proc.wait(15) == 1
        log = a.log_path.read_text()
        assert "lost Lease" in log, log[-3000:]
        assert _holder(kube, namespace).startswith("op-b_")
        assert names(kube, "rayjob", namespace) == ["frozen"]
        assert status(kube, "frozen", namespace)["phase"] == "Running"

        a.start()
        wait_until(lambda: "standby as op-a_" in a.log_path.read_text(), 30, what="op-a waits")
        stopped = time.monotonic()
        b.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: _holder(kube, namespace).startswith("op-a_"), 10, what="op-a leads")
        handed = time.monotonic() - stopped
        print(f"clean stop: the Lease changed hands {handed:.1f}s after SIGTERM")
        assert handed < 4  # below the lease duration: released, not waited out
        assert b.proc.wait(20) == 0
        assert "released Lease" in b.log_path.read_text()
        rayjob_finished(kube, "frozen", namespace)
        wait_phase(kube, "frozen", namespace, "Succeeded")  # written by op-a again


def test_a_stale_status_write_is_refused_not_clobbering(kube, namespace):
    """The reconciler's one status write carries the resourceVersion it decided
    on: a newer write by someone else is kept, the stale reconcile ends quietly
    (no event, no exception), reads the job again and writes on the fresh one."""
    from prometheus_client import REGISTRY

    from kubetune_operator.cache import WatchCache
    from kubetune_operator.children import Settings
    from kubetune_operator.kube import Api
    from kubetune_operator.reconciler import Reconciler, Timing

    job = finetunejob("stale")
    job["spec"]["output"] = {}  # no URI anywhere: InvalidSpec, written without children
    apply(kube, namespace, job)
    seen = get(kube, "finetunejob", "stale", namespace)
    uid = seen["metadata"]["uid"]
    newer = {"phase": "Pending", "message": "written by a newer view"}
    kube.kubectl(
        "patch", "ftj", "stale", "-n", namespace, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": newer}),
    )  # fmt: skip

    api_client = kube.api_client()
    posted: list[tuple] = []
    cache = WatchCache()
    cache.put_job(seen)  # what this replica saw: before the newer write
    reconciler = Reconciler(
        Api(api_client),
        Settings(),
        Timing(),
        lambda job, kind, reason, message: posted.append((kind, reason)),
        cache=cache,
    )
    conflicts = REGISTRY.get_sample_value("kubetune_status_conflicts_total")
    try:
        delay = asyncio.run(reconciler.reconcile(uid))
        assert delay == 0.0  # looks again at once, on the body it read again
        st = status(kube, "stale", namespace)
        assert (st.get("phase"), st.get("message"), st.get("reason")) == (
            "Pending",
            "written by a newer view",
            None,
        )
        assert posted == []
        assert REGISTRY.get_sample_value("kubetune_status_conflicts_total") == conflicts + 1
        fresh_version = cache.job(uid)["metadata"]["resourceVersion"]
        assert int(fresh_version) > int(seen["metadata"]["resourceVersion"])

        asyncio.run(reconciler.reconcile(uid))
        st = status(kube, "stale", namespace)
        assert st["phase"] == "Failed" and st["reason"] == "InvalidSpec"
        assert posted == [("Warning", "InvalidSpec")]
    finally:
        api_client.close()
