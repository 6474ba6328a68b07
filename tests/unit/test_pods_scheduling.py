"""Why a job's Ray pods wait: the scheduler's words (pods → PodsScheduled), and
the start limit that ends a job whose pods never all run (decide)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from kubetune_operator.conditions import rfc3339
from kubetune_operator.decide import decide, starting_since
from kubetune_operator.pods import pods_to_unschedulable, ray_pod_selector
from kubetune_operator.states import Action

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
MEMORY = (
    "0/1 nodes are available: 1 Insufficient memory. preemption: 0/1 nodes are available: "
    "1 No preemption victims found for incoming pod."
)


def _pod(name, node_type="worker", group="workers", *conditions, node=None, phase="Pending"):
    labels = {"ray.io/node-type": node_type, "ray.io/group": group}
    return {
        "metadata": {"name": name, "labels": labels},
        "spec": {"nodeName": node} if node else {},
        "status": {"phase": phase, "conditions": list(conditions)},
    }


def _unschedulable(message=MEMORY):
    return {
        "type": "PodScheduled",
        "status": "False",
        "reason": "Unschedulable",
        "message": message,
    }


def test_selector_is_the_clusters_and_the_jobs_own():
    job = {"metadata": {"uid": "0b7c-uid"}}
    assert ray_pod_selector(job, "tune-x2kq") == (
        "ray.io/cluster=tune-x2kq,kubetune.io/job-uid=0b7c-uid"
    )


def test_unschedulable_pods_name_their_group_and_the_schedulers_words():
    taint = "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector."
    found = pods_to_unschedulable(
        [
            _pod("tune-workers-b", "worker", "workers", _unschedulable()),
            _pod("tune-workers-a", "worker", "workers", _unschedulable()),
            _pod("tune-head-x", "head", "headgroup", _unschedulable(taint)),
        ]
    )
    assert found.groups == ("head", "worker group workers")
    assert found.message.startswith(
        f"no node can take the job's pods: Ray head: {taint}; Ray worker group workers: {MEMORY}"
    )
    assert "hint:" in found.message and "startTimeoutSeconds" in found.message


def test_pods_that_wait_for_other_things_say_nothing():
    scheduling = {"type": "PodScheduled", "status": "False", "reason": "SchedulingGated"}
    assert pods_to_unschedulable([]) is None
    assert pods_to_unschedulable([_pod("a")]) is None  # not looked at by the scheduler yet
    assert pods_to_unschedulable([_pod("a", "worker", "workers", scheduling)]) is None
    placed = {"type": "PodScheduled", "status": "True"}
    assert pods_to_unschedulable([_pod("a", "head", "headgroup", placed, node="n1")]) is None
    # A stale condition on a pod that is bound or running is not the scheduler's word now.
    assert pods_to_unschedulable([_pod("a", "head", "h", _unschedulable(), node="n1")]) is None
    assert (
        pods_to_unschedulable([_pod("a", "head", "h", _unschedulable(), phase="Running")]) is None
    )


def _job(spec=None, starting_for=100, *conditions):
    status = {"attempts": 1, "rayJobName": "tune", "conditions": list(conditions)}
    if starting_for is not None:
        status["conditions"].append(
            {
                "type": "Starting",
                "status": "True",
                "lastTransitionTime": rfc3339(NOW - timedelta(seconds=starting_for)),
            }
        )
    return {
        "metadata": {"name": "tune"},
        "spec": {"backoffLimit": 3} | (spec or {}),
        "status": status,
    }


_INIT = {"spec": {}, "status": {"jobDeploymentStatus": "Initializing", "jobStatus": ""}}
_COND = {
    "type": "PodsScheduled",
    "status": "False",
    "reason": "Unschedulable",
    "message": f"no node can take the job's pods: Ray worker group workers: {MEMORY}",
}


def test_unschedulable_is_the_reason_while_starting():
    d = decide(_job({}, 100, _COND), _INIT, NOW)
    assert (d.phase, d.reason, d.action) == ("Starting", "Unschedulable", Action.NONE)
    assert MEMORY in d.message


def test_start_limit_fails_the_job_with_the_schedulers_reason():
    d = decide(_job({"startTimeoutSeconds": 60}, 100, _COND), _INIT, NOW)
    assert (d.phase, d.reason, d.action) == ("Failed", "StartTimeout", Action.STOP_AND_DELETE)
    assert "startTimeoutSeconds (60s)" in d.message and MEMORY in d.message


def test_operator_default_applies_and_the_spec_overrides_it():
    assert decide(_job({}, 100, _COND), _INIT, NOW, start_timeout=60).reason == "StartTimeout"
    assert decide(_job({}, 100, _COND), _INIT, NOW, start_timeout=600).reason == "Unschedulable"
    # 0 in the spec: wait as long as it takes, whatever the operator's default.
    job = _job({"startTimeoutSeconds": 0}, 100, _COND)
    assert decide(job, _INIT, NOW, start_timeout=60).reason == "Unschedulable"
    # A longer limit in the spec wins over a shorter default.
    job = _job({"startTimeoutSeconds": 600}, 100, _COND)
    assert decide(job, _INIT, NOW, start_timeout=60).reason == "Unschedulable"


def test_start_limit_counts_from_the_current_attempts_start():
    # Starting for 100s, but this attempt's RayJob was created 30s ago (a retry).
    retry = _INIT | {"metadata": {"creationTimestamp": rfc3339(NOW - timedelta(seconds=30))}}
    job = _job({"startTimeoutSeconds": 60}, 100, _COND)
    assert starting_since(job, retry) == NOW - timedelta(seconds=30)
    assert decide(job, retry, NOW).reason == "Unschedulable"
    # Before the job is Starting (the first look) the clock has not started.
    assert starting_since(_job({}, None), _INIT) is None
    assert decide(_job({"startTimeoutSeconds": 1}, None), _INIT, NOW).phase == "Starting"


def test_start_limit_never_ends_a_running_queued_or_suspended_job():
    running = {"spec": {}, "status": {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}}
    assert decide(_job({"startTimeoutSeconds": 1}, 100), running, NOW).phase == "Running"
    suspended = {"spec": {"suspend": True}, "status": {"jobDeploymentStatus": "Suspended"}}
    job = _job({"startTimeoutSeconds": 1, "suspend": True}, 100)
    assert decide(job, suspended, NOW).phase == "Suspended"
    job = _job({"startTimeoutSeconds": 1}, 100)
    job["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "q"}
    queued = {"spec": {"suspend": True}, "status": {"jobDeploymentStatus": ""}}
    assert decide(job, queued, NOW).phase == "Queued"
