"""spec.model.fromJob on the real control plane: a job waits (no RayJob) while
its parent is missing or has not Succeeded, fails when the parent Failed, and
once the parent Succeeded records the parent's prefix in status and in the
trainer config; the run record and tracking state the trainer writes to S3
show in status."""

from __future__ import annotations

import json

import pytest

from operator_support import (
    apply,
    condition,
    finetunejob,
    get,
    rayjob_finished,
    rayjob_running,
    s3_secret,
    status,
    wait_phase,
    wait_status,
)

pytestmark = pytest.mark.envtest


def _child(s3, name: str, parent: str) -> dict:
    job = finetunejob(name, s3)
    job["spec"]["model"] = {**job["spec"]["model"], "fromJob": parent}
    job["spec"]["tracking"] = {"mlflow": {"trackingUri": "http://mlflow.example:5000"}}
    return job


def _reason(kube, name, namespace, reason, timeout=60) -> dict:
    return wait_status(
        kube, name, namespace, lambda s: s.get("reason") == reason, timeout, f"reason {reason}"
    )


def test_from_job_waits_for_the_parent_then_continues_from_it(kube, namespace, s3, operator):
    s3_secret(kube, namespace, s3)
    apply(kube, namespace, _child(s3, "second", "first"))
    st = _reason(kube, "second", namespace, "ParentNotFound")
    assert st["phase"] == "Pending" and "rayJobName" not in st
    assert condition(st, "ParentReady")["status"] == "False"
    assert "spec.model.fromJob" in st["message"]

    apply(kube, namespace, finetunejob("first", s3))
    wait_status(kube, "first", namespace, lambda s: s.get("rayJobName"), 60, "first's RayJob")
    st = _reason(kube, "second", namespace, "ParentNotSucceeded")
    assert st["phase"] == "Pending" and get(kube, "rayjob", "second", namespace) is None

    rayjob_running(kube, "first", namespace)
    rayjob_finished(kube, "first", namespace)
    wait_phase(kube, "first", namespace, "Succeeded")
    st = wait_status(kube, "second", namespace, lambda s: s.get("rayJobName"), 60, "RayJob")
    first_uid = get(kube, "finetunejob", "first", namespace)["metadata"]["uid"]
    prefix = f"s3://{s3.bucket}/runs/{namespace}/first/{first_uid}"
    assert st["parent"] == {"name": "first", "uid": first_uid, "uri": prefix}
    assert condition(st, "ParentReady")["status"] == "True"
    config = json.loads(get(kube, "configmap", "second-config", namespace)["data"]["config.json"])
    assert config["parent"] == {
        "job": {"name": "first", "namespace": namespace, "uid": first_uid},
        "uri": prefix,
    }

    # what the trainer writes under the job's prefix shows in status
    uid = get(kube, "finetunejob", "second", namespace)["metadata"]["uid"]
    rayjob_running(kube, "second", namespace)
    own = f"{s3.bucket}/runs/{namespace}/second/{uid}"
    record = {
        "job": {"name": "second", "namespace": namespace, "uid": uid},
        "specHash": "a" * 64,
        "dataset": {"hash": "b" * 64},
        "baseModel": {"name": "HuggingFaceTB/SmolLM2-135M-Instruct"},
        "parent": {"job": {"name": "first"}, "uri": f"{prefix}/adapter", "kind": "adapter"},
        "image": "reg/trainer:1",
        "versions": {},
        "createdAt": "2026-01-01T00:00:00Z",
    }
    down = {
        "trackingUri": "http://mlflow.example:5000",
        "reachable": False,
        "message": "GET /api/2.0/mlflow/experiments/get-by-name: URLError: refused",
        "updatedAt": "2026-01-01T00:00:00Z",
    }
    for name, obj in (("run.json", record), ("tracking.json", down)):
        with s3.fs.open(f"{own}/{name}", "w") as f:
            f.write(json.dumps(obj))
    st = wait_status(kube, "second", namespace, lambda s: s.get("lineage"), 60, "lineage")
    assert st["lineage"]["parent"] == f"FineTuneJob first ({prefix}/adapter)"
    assert st["lineage"]["specHash"] == "a" * 64
    assert st["lineage"]["runRecord"] == f"s3://{own}/run.json"
    cond = condition(st, "TrackingReachable")
    assert cond["status"] == "False" and cond["reason"] == "TrackingUnreachable"
    assert "refused" in cond["message"] and st["phase"] == "Running"


def test_from_job_whose_parent_failed_fails(kube, namespace, s3, operator):
    s3_secret(kube, namespace, s3)
    apply(kube, namespace, finetunejob("broken", s3, backoffLimit=0))
    wait_status(kube, "broken", namespace, lambda s: s.get("rayJobName"), 60, "RayJob")
    rayjob_finished(kube, "broken", namespace, ok=False)
    wait_phase(kube, "broken", namespace, "Failed")
    apply(kube, namespace, _child(s3, "after-broken", "broken"))
    st = wait_phase(kube, "after-broken", namespace, "Failed")
    assert st["reason"] == "ParentFailed" and "rayJobName" not in st
    assert "create a new job from another parent" in st["message"]
    assert status(kube, "after-broken", namespace).get("parent") is None


def test_teacher_from_job_waits_for_a_whole_model_then_teaches(kube, namespace, s3, operator):
    """spec.method.distill.teacher.fromJob waits like fromJob, pins the teacher job's
    prefix in status.teacher and the trainer config; a job that saves an adapter only
    cannot teach and the student fails at once, saying what to change."""
    s3_secret(kube, namespace, s3)

    def student(name: str, teacher: str) -> dict:
        distill = {"teacher": {"fromJob": teacher}}
        return finetunejob(name, s3, method={"objective": "distill", "distill": distill})

    apply(kube, namespace, finetunejob("adapter-only", s3))  # LoRA, no merge
    apply(kube, namespace, student("taught-by-adapter", "adapter-only"))
    st = wait_phase(kube, "taught-by-adapter", namespace, "Failed")
    assert st["reason"] == "ParentFailed" and "rayJobName" not in st
    assert "saves an adapter only" in st["message"]
    assert "output.mergeAdapter: true" in st["message"]

    apply(kube, namespace, student("small", "big"))
    st = _reason(kube, "small", namespace, "ParentNotFound")
    assert "spec.method.distill.teacher.fromJob" in st["message"]
    apply(kube, namespace, finetunejob("big", s3, method={"type": "full"}))
    wait_status(kube, "big", namespace, lambda s: s.get("rayJobName"), 60, "big's RayJob")
    st = _reason(kube, "small", namespace, "ParentNotSucceeded")
    assert st["phase"] == "Pending" and get(kube, "rayjob", "small", namespace) is None
    rayjob_running(kube, "big", namespace)
    rayjob_finished(kube, "big", namespace)
    wait_phase(kube, "big", namespace, "Succeeded")
    st = wait_status(kube, "small", namespace, lambda s: s.get("rayJobName"), 60, "RayJob")
    big_uid = get(kube, "finetunejob", "big", namespace)["metadata"]["uid"]
    prefix = f"s3://{s3.bucket}/runs/{namespace}/big/{big_uid}"
    assert st["teacher"] == {"name": "big", "uid": big_uid, "uri": prefix}
    assert st.get("parent") is None
    config = json.loads(get(kube, "configmap", "small-config", namespace)["data"]["config.json"])
    assert config["teacher"] == {
        "job": {"name": "big", "namespace": namespace, "uid": big_uid},
        "uri": prefix,
    }
    assert config.get("parent") is None
