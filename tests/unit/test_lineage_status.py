"""Pure pieces of lineage, tracking and fromJob: the parent's verdict, the
trainer config's parent, and what run.json / tracking.json become in status."""

from __future__ import annotations

import json

import pytest

from kubetune_api import load_trainer_config, spec_to_trainer_config
from kubetune_api.validation import SpecError
from kubetune_operator.children import Settings, spec_to_configmap, spec_to_rayjob
from kubetune_operator.parent import resolve_parent
from kubetune_operator.progress import progress_to_status, tracking_condition
from kubetune_operator.states import Phase, Reason

SPEC = {
    "model": {"name": "org/model", "fromJob": "first"},
    "dataset": {"train": {"uri": "s3://bucket/new.jsonl"}},
    "output": {"uri": "s3://out/ft"},
    "tracking": {
        "mlflow": {"trackingUri": "http://mlflow:5000", "secretRef": {"name": "mlflow-creds"}}
    },
}


def _job(name="second", spec=SPEC, status=None, uid="uid-2"):
    job = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": "team", "uid": uid, "generation": 1},
        "spec": spec,
    }
    if status is not None:
        job["status"] = status
    return job


def _parent(phase):
    spec = {**SPEC, "model": {"name": "org/model"}, "output": {"uri": "s3://old/ft"}}
    return _job("first", spec, {"phase": phase} if phase else {}, uid="uid-1")


def test_parent_resolves_to_its_prefix_once_succeeded():
    parent, problem = resolve_parent(_job(), _parent("Succeeded"), None)
    assert problem is None
    assert parent == {"name": "first", "uid": "uid-1", "uri": "s3://old/ft/team/first/uid-1"}


@pytest.mark.parametrize(
    ("parent", "phase", "reason", "words"),
    [
        (None, Phase.Pending, Reason.ParentNotFound, "there is none in namespace team"),
        (_parent(None), Phase.Pending, Reason.ParentNotSucceeded, "it is not started"),
        (_parent("Running"), Phase.Pending, Reason.ParentNotSucceeded, "it is Running"),
        (_parent("Failed"), Phase.Failed, Reason.ParentFailed, "Failed, so there is nothing"),
    ],
)
def test_parent_not_succeeded_is_refused_with_a_reason(parent, phase, reason, words):
    resolved, problem = resolve_parent(_job(), parent, None)
    assert resolved is None
    assert problem[:2] == (phase, reason)
    assert "spec.model.fromJob" in problem[2] and words in problem[2]


def test_a_job_cannot_continue_from_itself():
    _, problem = resolve_parent(_job("first"), _parent("Succeeded"), None)
    assert problem[1] is Reason.ParentFailed and "itself" in problem[2]


def test_trainer_config_carries_the_resolved_parent_only():
    with pytest.raises(SpecError, match="spec.model.fromJob"):
        spec_to_trainer_config(_job())
    parent = {"name": "first", "uid": "uid-1", "uri": "s3://old/ft/team/first/uid-1"}
    config = load_trainer_config(spec_to_trainer_config(_job(), parent=parent))
    assert config.parent.uri == parent["uri"]
    assert config.parent.job.to_dict() == {"name": "first", "namespace": "team", "uid": "uid-1"}
    ckpt = {**SPEC, "model": {"name": "org/model", "fromCheckpoint": "s3://bucket/c/step-00000010"}}
    config = load_trainer_config(spec_to_trainer_config(_job(spec=ckpt)))
    assert config.parent.uri == "s3://bucket/c/step-00000010" and config.parent.job is None


def test_children_take_the_parent_from_status_and_credentials_by_reference():
    parent = {"name": "first", "uid": "uid-1", "uri": "s3://old/ft/team/first/uid-1"}
    job = _job(status={"parent": parent})
    cm = spec_to_configmap(job, Settings(), 1)
    assert '"uri": "s3://old/ft/team/first/uid-1"' in cm["data"]["config.json"]
    rayjob = spec_to_rayjob(job, Settings(trainer_image="reg/trainer:1"), 1)
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    env = {e["name"]: e for e in head["containers"][0]["env"]}
    assert env["KUBETUNE_IMAGE"]["value"] == "reg/trainer:1"
    token = env["MLFLOW_TRACKING_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert token == {"name": "mlflow-creds", "key": "MLFLOW_TRACKING_TOKEN", "optional": True}


def test_run_record_and_tracking_become_status():
    record = {  # a run.json as the trainer writes it (kubetune_api.storage.RunRecord)
        "job": {"name": "second", "namespace": "team", "uid": "uid-2"},
        "specHash": "s" * 64,
        "dataset": {"hash": "d" * 64},
        "baseModel": {"name": "org/model", "revision": "main"},
        "parent": {
            "job": {"name": "first"},
            "uri": "s3://old/ft/team/first/uid-1/adapter",
            "kind": "adapter",
        },
        "image": "reg/trainer:1",
        "createdAt": "2026-01-01T00:00:00Z",
    }
    tracking = {
        "trackingUri": "http://mlflow:5000",
        "runId": "abc",
        "experimentId": "3",
        "url": "http://mlflow:5000/#/experiments/3/runs/abc",
        "reachable": True,
        "updatedAt": "2026-01-01T00:00:00Z",
    }
    snap = {"prefix": "s3://out/ft/team/second/uid-2", "runRecord": record, "tracking": tracking}
    status = progress_to_status(snap)
    assert status["lineage"] == {
        "runRecord": "s3://out/ft/team/second/uid-2/run.json",
        "specHash": "s" * 64,
        "dataHash": "d" * 64,
        "baseModel": "org/model",
        "parent": "FineTuneJob first (s3://old/ft/team/first/uid-1/adapter)",
        "image": "reg/trainer:1",
    }
    assert status["tracking"] == {"runId": "abc", "experimentId": "3", "url": tracking["url"]}
    assert tracking_condition(snap) == (True, f"MLflow run abc at {tracking['url']}")
    down = {**tracking, "reachable": False, "runId": None, "message": "POST x: refused"}
    ok, why = tracking_condition({"tracking": down})
    assert not ok and "http://mlflow:5000: POST x: refused" in why
    assert "tracking" not in progress_to_status({"prefix": "p", "tracking": down})
    assert tracking_condition({"prefix": "p"}) is None


DISTILL = {
    **SPEC,
    "model": {"name": "org/model", "prune": {"keepLayers": 2}},
    "method": {"type": "full", "objective": "distill", "distill": {"teacher": {"fromJob": "big"}}},
}


def _teacher(phase, method=None, output=None):
    spec = {
        **SPEC,
        "model": {"name": "org/model"},
        "method": method or {"type": "full"},
        "output": {"uri": "s3://old/ft", **(output or {})},
    }
    return _job("big", spec, {"phase": phase} if phase else {}, uid="uid-t")


def test_a_teacher_job_resolves_like_a_parent_and_only_a_whole_model_teaches():
    from kubetune_operator.parent import TEACHER_FROM_JOB, unresolved

    job = _job(spec=DISTILL)
    assert [r.status_key for r in unresolved(job)] == ["teacher"]
    resolved, problem = resolve_parent(job, _teacher("Succeeded"), None, TEACHER_FROM_JOB)
    assert problem is None and resolved["uri"] == "s3://old/ft/team/big/uid-t"
    merged = _teacher("Succeeded", {"type": "lora"}, {"mergeAdapter": True})
    assert resolve_parent(job, merged, None, TEACHER_FROM_JOB)[1] is None
    # waiting and failing name the teacher's field
    _, problem = resolve_parent(job, _teacher("Running"), None, TEACHER_FROM_JOB)
    assert problem[:2] == (Phase.Pending, Reason.ParentNotSucceeded)
    assert "spec.method.distill.teacher.fromJob" in problem[2]
    _, problem = resolve_parent(job, _teacher("Failed"), None, TEACHER_FROM_JOB)
    assert problem[1] is Reason.ParentFailed and "nothing to learn from" in problem[2]
    # an adapter alone is no teacher: refused at once, before it even finishes
    _, problem = resolve_parent(job, _teacher("Running", {"type": "lora"}), None, TEACHER_FROM_JOB)
    assert problem[0] is Phase.Failed and "output.mergeAdapter: true" in problem[2]
    assert unresolved(_job(spec=DISTILL, status={"teacher": resolved})) == []


def test_trainer_config_and_configmap_carry_the_resolved_teacher():
    with pytest.raises(SpecError, match="spec.method.distill.teacher.fromJob"):
        spec_to_trainer_config(_job(spec=DISTILL))
    teacher = {"name": "big", "uid": "uid-t", "uri": "s3://old/ft/team/big/uid-t"}
    config = load_trainer_config(spec_to_trainer_config(_job(spec=DISTILL), teacher=teacher))
    assert config.teacher.uri == teacher["uri"] and config.teacher.job.name == "big"
    assert config.parent is None
    cm = spec_to_configmap(_job(spec=DISTILL, status={"teacher": teacher}), Settings(), 1)
    assert json.loads(cm["data"]["config.json"])["teacher"]["uri"] == teacher["uri"]


def test_a_classifier_is_no_parent_and_no_teacher(tmp_path):
    """A job that names a parent or a teacher generates text (the classification rules
    refuse fromJob on a classifier), so a classification job is neither: the operator
    fails it from the parent's spec before any pod starts, and the trainer from the
    parent's outputs.json (fromCheckpoint, `kubetune run`)."""
    from types import SimpleNamespace

    from kubetune_api.trainer_config import JobRef, ParentSource
    from kubetune_operator.parent import TEACHER_FROM_JOB
    from kubetune_trainer.parent import ParentError, locate, locate_teacher

    classifier = _parent("Succeeded")
    classifier["spec"] = {**classifier["spec"], "method": {"task": "classification"}}
    for job, ref, use in ((_job(), None, "continue from"), (_job(spec=DISTILL), "t", "learn")):
        args = (TEACHER_FROM_JOB,) if ref else ()
        _, problem = resolve_parent(job, classifier, None, *args)
        assert problem[:2] == (Phase.Failed, Reason.ParentFailed), problem
        assert "method.task classification" in problem[2] and use in problem[2]
    generating = _parent("Succeeded")
    generating["spec"] = {**generating["spec"], "method": {"task": "generation"}}
    assert resolve_parent(_job(), generating, None)[1] is None

    prefix = tmp_path / "first"
    prefix.mkdir()
    outputs = {
        "adapter": "file:///x/adapter",
        "mergedModel": "file:///x/merged",
        "classification": {"labels": ["ai", "food", "money"], "accuracy": 0.9},
    }
    (prefix / "outputs.json").write_text(json.dumps(outputs))
    source = ParentSource(job=JobRef(name="first", namespace="t", uid="u"), uri=prefix.as_uri())
    access = SimpleNamespace(endpoint=None, region=None, secret_ref=None)
    config = SimpleNamespace(parent=source, teacher=source, spec=SimpleNamespace(model=access))
    with pytest.raises(ParentError, match=r"spec.model.fromJob: .* over 3 labels"):
        locate(config)
    with pytest.raises(ParentError, match=r"teacher.fromJob: .* method.task generation"):
        locate_teacher(config)
    del outputs["classification"]
    (prefix / "outputs.json").write_text(json.dumps(outputs))
    assert locate(config)[0] == "file:///x/adapter"
    assert locate_teacher(config) == "file:///x/merged"
