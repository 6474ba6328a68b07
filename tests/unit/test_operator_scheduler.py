"""The watch cache and the one scheduler that replaced the per-job daemons."""

from __future__ import annotations

import asyncio

from kubetune_operator.cache import WatchCache
from kubetune_operator.scheduler import Scheduler


def _job(uid: str, rv: str, phase: str = "Running") -> dict:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {
            "name": "j",
            "namespace": "ns",
            "uid": uid,
            "resourceVersion": rv,
            "managedFields": [{"manager": "kubectl", "fieldsV1": {"f:spec": {}}}],
        },
        "spec": {"suspend": False},
        "status": {"phase": phase},
    }


def test_cache_keeps_the_newest_version_and_trims():
    cache = WatchCache()
    assert cache.put_job(_job("u1", "10", "Starting"))
    assert cache.put_job(_job("u1", "12", "Running"))
    # a late watch event (older than our own write's answer) must not undo it
    assert not cache.put_job(_job("u1", "11", "Starting"))
    assert not cache.put_job(_job("u1", "12", "Running"))
    job = cache.job("u1")
    assert job["status"]["phase"] == "Running"
    assert "managedFields" not in job["metadata"]
    job["status"] = {"phase": "Failed"}  # a reconcile changes its own copy only
    assert cache.job("u1")["status"]["phase"] == "Running"
    cache.job("u1")["status"]["phase"] = "Failed"
    assert cache.job("u1")["status"]["phase"] == "Running"
    assert cache.has_job("u1") and not cache.has_job("u2")

    rayjob = {
        "metadata": {"name": "j", "namespace": "ns", "resourceVersion": "5", "labels": {"a": "b"}},
        "spec": {"suspend": True, "rayClusterSpec": {"headGroupSpec": {"big": "x" * 1000}}},
        "status": {"jobDeploymentStatus": "Suspended"},
    }
    assert cache.put_rayjob(rayjob)
    kept = cache.rayjob("ns", "j")
    assert kept["spec"] == {"suspend": True}
    assert kept["metadata"]["labels"] == {"a": "b"}
    assert kept["status"] == rayjob["status"]
    cache.drop_rayjob("ns", "j")
    assert cache.rayjob("ns", "j") is None


def test_scheduler_never_overlaps_a_job_and_reruns_it_when_woken_meanwhile():
    async def main():
        running: set[str] = set()
        runs: list[str] = []
        overlaps: list[str] = []
        release = asyncio.Event()

        async def run(uid: str):
            if uid in running:
                overlaps.append(uid)
            running.add(uid)
            runs.append(uid)
            if uid == "a" and runs.count("a") == 1:
                await release.wait()  # the first run of "a" is slow
            running.discard(uid)
            return None  # nothing scheduled: only wakes run it

        sched = Scheduler(run, workers=4)
        sched.start()
        sched.wake("a")
        await asyncio.sleep(0.05)
        sched.wake("a")  # while it runs: once more afterwards, not beside it
        sched.wake("a")
        sched.wake("b")  # another job is not held up by the slow one
        await asyncio.sleep(0.05)
        assert runs == ["a", "b"]
        release.set()
        await asyncio.sleep(0.05)
        await sched.stop()
        return runs, overlaps

    runs, overlaps = asyncio.run(main())
    assert overlaps == []
    assert runs == ["a", "b", "a"]


def test_scheduler_runs_by_due_time_and_an_earlier_wake_wins():
    async def main():
        order: list[str] = []

        async def run(uid: str):
            order.append(uid)
            return None

        sched = Scheduler(run, workers=1)
        sched.start()
        sched.after("late", 0.3)
        sched.after("soon", 0.1)
        sched.after("woken", 5.0)
        sched.wake("woken")  # sooner than its due time: runs now
        sched.after("soon", 1.0)  # a later time never postpones an earlier one
        await asyncio.sleep(0.2)
        first = list(order)
        sched.forget("late")
        await asyncio.sleep(0.3)
        await sched.stop()
        return first, order, sched.pending()

    first, order, pending = asyncio.run(main())
    assert first == ["woken", "soon"]
    assert order == ["woken", "soon"]  # "late" was forgotten before it was due
    assert pending == 0
