"""status.progress.startup: the way from a job's creation to its first step
(kubetune_operator.startup), from the Ray pods as the API server sends them and
the trainer's progress.json."""

from __future__ import annotations

from kubetune_api.models import FineTuneJobStatus
from kubetune_operator.startup import cluster_phases_of, combine, pod_phases, reached_first_step


def _pod(scheduled: str | None, *started: str | None, waiting: bool = False) -> dict:
    conditions = [{"type": "Initialized", "status": "True", "lastTransitionTime": "x"}]
    if scheduled:
        conditions.append(
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": scheduled}
        )
    else:
        conditions.append({"type": "PodScheduled", "status": "False", "reason": "Unschedulable"})
    statuses = []
    for i, t in enumerate(started):
        state = {"running": {"startedAt": t}} if t else {"waiting": {"reason": "ContainerCreating"}}
        statuses.append({"name": f"c{i}", "state": state})
    if waiting:
        statuses.append({"name": "w", "state": {"waiting": {"reason": "ErrImagePull"}}})
    return {"status": {"conditions": conditions, "containerStatuses": statuses}}


def test_pod_phases_are_the_last_pod_to_reach_each():
    pods = [
        _pod("2026-01-01T00:00:02Z", "2026-01-01T00:00:20Z"),
        _pod("2026-01-01T00:00:05Z", "2026-01-01T00:00:31Z", "2026-01-01T00:00:30Z"),
    ]
    assert pod_phases(pods) == {
        "podsScheduled": "2026-01-01T00:00:05Z",
        "containersStarted": "2026-01-01T00:00:31Z",
    }


def test_a_phase_some_pod_has_not_reached_is_left_out():
    head = _pod("2026-01-01T00:00:02Z", "2026-01-01T00:00:20Z")
    assert pod_phases([head, _pod(None)]) == {}  # a worker waits for a node
    pulling = _pod("2026-01-01T00:00:03Z", None)  # scheduled, its image still pulling
    assert pod_phases([head, pulling]) == {"podsScheduled": "2026-01-01T00:00:03Z"}
    assert pod_phases([]) == {}
    assert (
        pod_phases([{"status": {"conditions": [{"type": "PodScheduled", "status": "True"}]}}]) == {}
    )


def test_combine_counts_every_phase_from_the_attempt_start():
    cluster = {
        "rayJobCreated": "2026-01-01T00:00:01Z",
        "podsScheduled": "2026-01-01T00:00:05Z",
        "containersStarted": "2026-01-01T00:00:31Z",
    }
    trainer = [  # rank 0's clock: seconds from its worker's start (whole-second times)
        {"name": "workerStarted", "time": "2026-01-01T00:00:40Z", "seconds": 0.0},
        {"name": "modelFetched", "time": "2026-01-01T00:00:43Z", "seconds": 2.52},
        {"name": "engineReady", "time": "2026-01-01T00:00:50Z", "seconds": 9.71},
        {"name": "firstStep", "time": "2026-01-01T00:00:51Z", "seconds": 11.04},
    ]
    out = combine("2026-01-01T00:00:00Z", cluster, trainer)
    assert [(p["name"], p["seconds"]) for p in out] == [
        ("created", 0.0),
        ("rayJobCreated", 1.0),
        ("podsScheduled", 5.0),
        ("containersStarted", 31.0),
        ("workerStarted", 40.0),
        ("modelFetched", 42.5),
        ("engineReady", 49.7),
        ("firstStep", 51.0),
    ]
    assert out[-1]["time"] == "2026-01-01T00:00:51Z"
    status = {"phase": "Running", "progress": {"step": 1, "startup": out}}
    FineTuneJobStatus.model_validate(status)  # the CRD's status schema has the field
    assert cluster_phases_of(status["progress"]) == cluster  # kept once the pods are gone


def test_combine_without_a_start_or_with_odd_records():
    assert combine(None, {}, []) is None
    assert combine("not a time", {}, []) is None
    odd = [{"name": "workerStarted", "time": "bad", "seconds": 0}, {"seconds": 3}, "x"]
    assert combine("2026-01-01T00:00:00Z", {"podsScheduled": "bad"}, odd) == [
        {"name": "created", "time": "2026-01-01T00:00:00Z", "seconds": 0.0}
    ]


def test_first_step_is_counted_once_per_attempt():
    shown = combine(
        "2026-01-01T00:00:00Z",
        {"rayJobCreated": "2026-01-01T00:00:01Z"},
        [
            {"name": "workerStarted", "time": "2026-01-01T00:00:09Z", "seconds": 0.0},
            {"name": "firstStep", "time": "2026-01-01T00:00:19Z", "seconds": 10.0},
        ],
    )
    assert reached_first_step(shown)
    assert reached_first_step(shown, "2026-01-01T00:00:01Z")  # this attempt's: counted already
    assert not reached_first_step(shown, "2026-01-01T00:05:00Z")  # a retry's RayJob: not yet
    assert not reached_first_step(shown[:-1]) and not reached_first_step(None)
