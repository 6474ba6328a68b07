"""Pure builders of the operator: golden files and the state switch.

Regenerate the golden files after an intended change with
    KUBETUNE_UPDATE_GOLDEN=1 .venv/bin/pytest tests/unit/test_operator_builders.py
and review the diff of tests/golden/ like any other code change.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from kubetune_operator.children import (
    Settings,
    job_guards,
    rayjob_patch,
    spec_to_configmap,
    spec_to_network_policy,
    spec_to_rayjob,
)
from kubetune_operator.conditions import rfc3339, set_condition, with_phase
from kubetune_operator.decide import decide, ttl_remaining
from kubetune_operator.names import configmap_name, rayjob_name
from kubetune_operator.progress import progress_to_status
from kubetune_operator.states import Action
from kubetune_operator.validate import spec_error_status, validate_job

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden"
EXAMPLES = ROOT / "crds" / "examples"
NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
SETTINGS = Settings(trainer_image="example.com/kubetune-trainer:test", ray_version="2.60.0")


def _job(example: str, **meta) -> dict:
    job = yaml.safe_load((EXAMPLES / example).read_text())
    job["metadata"].update({"namespace": "team-a", "uid": "0b7c-uid", "generation": 1} | meta)
    job["spec"].setdefault("output", {}).setdefault("uri", "s3://bucket/runs")
    parent = job["spec"]["model"].get("fromJob")
    if parent:  # resolved by the operator before it builds the children
        uri = f"s3://bucket/runs/team-a/{parent}/9a1d-uid"
        job["status"] = {"parent": {"name": parent, "uid": "9a1d-uid", "uri": uri}}
    return job


def _golden(name: str, obj: dict) -> None:
    path = GOLDEN / name
    text = yaml.safe_dump(obj, sort_keys=True)
    if os.environ.get("KUBETUNE_UPDATE_GOLDEN"):
        path.write_text(text)
    assert path.exists(), f"{path} missing: run with KUBETUNE_UPDATE_GOLDEN=1 to create it"
    assert yaml.safe_load(path.read_text()) == obj, f"{name} differs from the golden file"


EXAMPLE_FILES = sorted(p.name for p in EXAMPLES.glob("*.yaml"))


@pytest.mark.parametrize("example", EXAMPLE_FILES)
def test_rayjob_matches_golden(example):
    _golden(f"rayjob-{example}", spec_to_rayjob(_job(example), SETTINGS, attempt=1))


@pytest.mark.parametrize("example", EXAMPLE_FILES)
def test_configmap_matches_golden(example):
    cm = spec_to_configmap(_job(example), SETTINGS, attempt=1)
    # Parsed, so a change to the trainer config reads as a normal YAML diff.
    cm["data"]["config.json"] = json.loads(cm["data"]["config.json"])
    _golden(f"configmap-{example}", cm)


def test_configmap_holds_no_secret_values_and_names_no_env():
    job = _job("chat-s3-secret.yaml")
    cm = spec_to_configmap(job, SETTINGS, 1)
    text = json.dumps(cm)
    assert "AWS_SECRET_ACCESS_KEY" not in text and "KUBETUNE_OUTPUT" not in text
    config = json.loads(cm["data"]["config.json"])
    assert config["storagePrefix"] == "s3://team-models/fine-tunes/team-a/support-bot/0b7c-uid"
    assert config["attempt"] == 1


def test_rayjob_shape_from_resources():
    job = _job(
        "chat-s3-secret.yaml",
        labels={
            "kueue.x-k8s.io/queue-name": "gpu",
            "kueue.x-k8s.io/priority-class": "high",
            "team": "x",
        },
    )
    job["spec"]["resources"] |= {
        "workers": 3,
        "gpusPerWorker": 2,
        "cpuPerWorker": "6",
        "memoryPerWorker": "40Gi",
        "nodeSelector": {"pool": "a100"},
        "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "priorityClassName": "train",
        "image": "my/trainer:1",
    }
    rj = spec_to_rayjob(job, SETTINGS, 2)
    assert rj["metadata"]["name"] == "support-bot-r1"
    assert rj["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu"
    assert rj["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "high"
    assert "team" not in rj["metadata"]["labels"]
    assert rj["spec"]["suspend"] is True  # created suspended: Kueue admits it
    assert rj["spec"]["shutdownAfterJobFinishes"] is True
    assert (
        rj["spec"]["entrypoint"] == "python -m kubetune_trainer --config /etc/kubetune/config.json"
    )
    [group] = rj["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 3
    pod = group["template"]["spec"]
    c = pod["containers"][0]
    assert c["image"] == "my/trainer:1"
    assert c["resources"]["limits"] == {"cpu": "6", "memory": "40Gi", "nvidia.com/gpu": "2"}
    assert pod["nodeSelector"] == {"pool": "a100"} and pod["priorityClassName"] == "train"
    assert pod["tolerations"][0]["key"] == "gpu"
    assert pod["volumes"][0] == {
        "name": "kubetune-config",
        "configMap": {"name": "support-bot-config"},
    }
    env = {e["name"]: e for e in c["env"]}
    ref = env["KUBETUNE_OUTPUT_AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "team-s3", "key": "AWS_SECRET_ACCESS_KEY", "optional": False}
    assert (
        "KUBETUNE_DATASET_AWS_ACCESS_KEY_ID" in env
        and "KUBETUNE_MODEL_AWS_ACCESS_KEY_ID" not in env
    )
    assert env["KUBETUNE_ATTEMPT"]["value"] == "2"
    head = rj["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert head["rayStartParams"] == {"num-cpus": "0"}
    assert "nvidia.com/gpu" not in json.dumps(head)
    assert all(
        o["uid"] == "0b7c-uid" and o["controller"] for o in rj["metadata"]["ownerReferences"]
    )


def _pods(rj: dict) -> dict[str, dict]:
    """Every pod template of a RayJob: head, worker group, submitter."""
    cluster = rj["spec"]["rayClusterSpec"]
    return {
        "head": cluster["headGroupSpec"]["template"],
        "worker": cluster["workerGroupSpecs"][0]["template"],
        "submitter": rj["spec"]["submitterPodTemplate"],
    }


RESTRICTED_CONTAINER = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "runAsUser": 10001,
    "runAsGroup": 10001,
    "seccompProfile": {"type": "RuntimeDefault"},
}


@pytest.mark.parametrize("example", EXAMPLE_FILES)
def test_every_pod_passes_the_restricted_pod_security_standard(example):
    job = _job(example)
    job["spec"].setdefault("resources", {})["image"] = "someone/else:1"  # a user image too
    for role, tpl in _pods(spec_to_rayjob(job, SETTINGS, 1)).items():
        pod = tpl["spec"]
        assert pod["automountServiceAccountToken"] is False, role
        assert pod["securityContext"] == {
            "runAsNonRoot": True,
            "runAsUser": 10001,
            "runAsGroup": 10001,
            "seccompProfile": {"type": "RuntimeDefault"},
        }, role
        assert "hostNetwork" not in pod and "hostPID" not in pod, role
        for c in pod["containers"]:
            assert c["securityContext"] == RESTRICTED_CONTAINER, (role, c["name"])
            assert c["image"] == "someone/else:1"
            assert "ports" not in c or all("hostPort" not in p for p in c["ports"])
        # the read-only root leaves these writable, each an emptyDir
        vols = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        assert (
            vols[mounts["/tmp"]]["emptyDir"] == {}
            and vols[mounts["/home/kubetune"]]["emptyDir"] == {}
        )
        env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
        assert env["HOME"] == "/home/kubetune", role
        assert all(set(v) <= {"name", "emptyDir", "configMap"} for v in vols.values()), role
    assert _pods(spec_to_rayjob(job, SETTINGS, 1))["submitter"]["spec"]["restartPolicy"] == "Never"


def test_shm_and_scratch_are_sized_from_the_spec():
    job = _job("lora-minimal.yaml")
    job["spec"]["resources"] = {
        "memoryPerWorker": "40Gi",
        "scratchPerWorker": "100Gi",
        "head": {"memory": "6Gi"},
    }
    pods = _pods(spec_to_rayjob(job, SETTINGS, 1))
    worker = pods["worker"]["spec"]
    vols = {v["name"]: v["emptyDir"] for v in worker["volumes"] if "emptyDir" in v}
    assert vols["dshm"] == {"medium": "Memory", "sizeLimit": "40Gi"}
    assert vols["scratch"] == {"sizeLimit": "100Gi"}
    c = worker["containers"][0]
    assert c["resources"]["requests"]["ephemeral-storage"] == "100Gi"
    assert "ephemeral-storage" not in c["resources"]["limits"]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts["dshm"] == "/dev/shm"
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["KUBETUNE_SCRATCH_DIR"] == mounts["scratch"]
    # the head trains nothing: /dev/shm from its own memory, no scratch
    head = pods["head"]["spec"]
    hvols = {v["name"]: v["emptyDir"] for v in head["volumes"] if "emptyDir" in v}
    assert hvols["dshm"] == {"medium": "Memory", "sizeLimit": "6Gi"} and "scratch" not in hvols
    # the default, when the spec says nothing
    default = _pods(spec_to_rayjob(_job("lora-minimal.yaml"), SETTINGS, 1))["worker"]["spec"]
    assert {"name": "scratch", "emptyDir": {"sizeLimit": "20Gi"}} in default["volumes"]


def test_staging_claim_is_mounted_only_when_configured():
    """spec.staging or the operator's default claim: the head mounts it read-write
    (its driver stages), the workers read-only, both told the job's folder; neither:
    no volume, no env (each worker fetches, as before)."""

    def stage(pods: dict) -> dict:
        out = {}
        for role, tpl in pods.items():
            pod, c = tpl["spec"], tpl["spec"]["containers"][0]
            out[role] = (
                [v for v in pod["volumes"] if v["name"] == "stage"],
                [m for m in c.get("volumeMounts", []) if m["name"] == "stage"],
                [e["value"] for e in c.get("env", []) if e["name"] == "KUBETUNE_STAGE_DIR"],
            )
        return out

    job = _job("lora-minimal.yaml")
    assert all(v == ([], [], []) for v in stage(_pods(spec_to_rayjob(job, SETTINGS, 1))).values())
    folder = f"/var/kubetune/stage/{job['metadata']['namespace']}/{job['metadata']['uid']}/1"
    default = dataclasses.replace(SETTINGS, staging_claim="shared")
    for settings, own, want in ((default, None, "shared"), (SETTINGS, "mine", "mine"),
                                (default, "mine", "mine")):  # fmt: skip
        if own:
            job["spec"]["staging"] = {"claimName": own}
        got = stage(_pods(spec_to_rayjob(job, settings, 1)))
        claim = [{"name": "stage", "persistentVolumeClaim": {"claimName": want}}]
        for role, read_only in (("head", False), ("worker", True)):
            mount = {"name": "stage", "mountPath": "/var/kubetune/stage", "readOnly": read_only}
            assert got[role] == (claim, [mount], [folder]), (role, got[role])
        assert got["submitter"] == ([], [], [])  # `ray job submit` reads nothing


def test_ray_token_auth_and_the_token_secret():
    job = _job("lora-minimal.yaml")
    rj = spec_to_rayjob(job, SETTINGS, 2)
    auth = rj["spec"]["rayClusterSpec"]["authOptions"]
    assert auth == {"mode": "token", "secretName": "lora-minimal-ray-token"}
    secret, policy = job_guards(job, SETTINGS, token="t0k")
    assert secret["kind"] == "Secret" and secret["metadata"]["name"] == auth["secretName"]
    assert secret["stringData"] == {"auth_token": "t0k"}
    assert secret["metadata"]["ownerReferences"][0]["uid"] == "0b7c-uid"
    # the token never appears in the RayJob or the trainer config
    assert "t0k" not in json.dumps(rj) + json.dumps(spec_to_configmap(job, SETTINGS, 2))
    assert policy["kind"] == "NetworkPolicy"


def test_network_policy_admits_only_the_job_and_kuberay():
    job = _job("lora-minimal.yaml")
    peer = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ray-system"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}},
    }
    settings = Settings(ray_operator_peer=json.dumps(peer))
    pol = spec_to_network_policy(job, settings)
    own = {"matchLabels": {"kubetune.io/job-uid": "0b7c-uid"}}
    assert pol["spec"]["podSelector"] == own
    assert pol["spec"]["policyTypes"] == ["Ingress"]
    assert pol["spec"]["ingress"] == [
        {"from": [{"podSelector": own}]},
        {"from": [peer], "ports": [{"protocol": "TCP", "port": 8265}]},
    ]
    assert pol["metadata"]["ownerReferences"][0]["uid"] == "0b7c-uid"
    # every pod of the job (the submitter's too) carries the label the policy selects
    for tpl in _pods(spec_to_rayjob(job, settings, 1)).values():
        assert tpl["metadata"]["labels"]["kubetune.io/job-uid"] == "0b7c-uid"
    assert spec_to_network_policy(job, Settings(network_policy=False)) is None
    assert len(job_guards(job, Settings(network_policy=False), "t")) == 1


def test_hf_token_secret_becomes_env():
    job = _job("lora-minimal.yaml")
    job["spec"]["model"]["tokenSecretRef"] = {"name": "hf"}
    env = spec_to_rayjob(job, SETTINGS, 1)["spec"]["rayClusterSpec"]["headGroupSpec"]["template"][
        "spec"
    ]["containers"][0]["env"]
    assert {
        "name": "HF_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": "hf", "key": "HF_TOKEN"}},
    } in env


def test_grader_api_keys_become_env_and_configmap_sources_are_mounted():
    """scoreModel's apiKeySecretRef → an env var from the Secret (never in the trainer
    config); a python grader's configMapRef → a read-only volume where the trainer reads."""
    job = _job("lora-minimal.yaml")
    judge_msgs = [{"role": "user", "content": "{{sample.output_text}}"}]
    job["spec"]["dataset"]["format"] = "prompt"
    job["spec"].setdefault("method", {})["objective"] = "grpo"
    job["spec"]["method"]["grpo"] = {
        "grader": {
            "type": "multi",
            "name": "all",
            "graders": {
                "judge-1": {
                    "type": "scoreModel",
                    "name": "judge-1",
                    "endpoint": "http://judge.serving:8000/v1",
                    "model": "m",
                    "messages": judge_msgs,
                    "apiKeySecretRef": {"name": "judge-key", "key": "api-key"},
                },
                "fmt": {
                    "type": "python",
                    "name": "fmt",
                    "configMapRef": {"name": "g", "key": "f.py"},
                },
            },
        }
    }
    rj = spec_to_rayjob(job, SETTINGS, 1)["spec"]["rayClusterSpec"]
    for group in (rj["headGroupSpec"], *rj["workerGroupSpecs"]):
        pod = group["template"]["spec"]
        container = pod["containers"][0]
        assert {
            "name": "KUBETUNE_GRADER_JUDGE_1_API_KEY",
            "valueFrom": {"secretKeyRef": {"name": "judge-key", "key": "api-key"}},
        } in container["env"]
        assert {
            "name": "grader-fmt",
            "configMap": {"name": "g", "items": [{"key": "f.py", "path": "f.py"}]},
        } in pod["volumes"]
        assert {
            "name": "grader-fmt",
            "mountPath": "/etc/kubetune-graders/fmt",
            "readOnly": True,
        } in container["volumeMounts"]
    config = spec_to_configmap(job, SETTINGS, 1)["data"]
    assert "KUBETUNE_GRADER" not in json.dumps(config)


@pytest.mark.parametrize("name", ["a", "My.Job.v2", "9lives", "x" * 253, "a-" * 30])
def test_child_names_are_valid_and_deterministic(name):
    dns1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
    for attempt in (1, 2, 11):
        rj = rayjob_name(name, attempt)
        assert dns1035.match(rj) and len(rj) <= 47, rj
        assert rj == rayjob_name(name, attempt)
    assert rayjob_name(name, 1) != rayjob_name(name, 2)
    cm = configmap_name(name)
    assert len(cm) <= 63 and dns1035.match(cm)


def test_truncated_names_do_not_collide():
    assert rayjob_name("x" * 60 + "a", 1) != rayjob_name("x" * 60 + "b", 1)


def _rj(deploy="", ray="", suspend=False, **status):
    return {
        "spec": {"suspend": suspend},
        "status": {"jobDeploymentStatus": deploy, "jobStatus": ray} | status,
    }


@pytest.mark.parametrize(
    "rayjob, spec, labels, phase, reason, action",
    [
        (None, {}, {}, "Pending", "Creating", "create"),
        (_rj(), {}, {}, "Starting", "RayClusterStarting", "none"),
        (_rj("Initializing"), {}, {}, "Starting", "RayClusterStarting", "none"),
        (_rj("Running", "PENDING"), {}, {}, "Starting", "RayClusterStarting", "none"),
        (_rj("Running", "RUNNING"), {}, {}, "Running", "Training", "none"),
        (_rj("Suspended", suspend=True), {"suspend": True}, {}, "Suspended", "Suspended", "none"),
        (_rj("", suspend=True), {}, {"kueue.x-k8s.io/queue-name": "q"}, "Queued", "Queued", "none"),
        (_rj("Complete", "SUCCEEDED"), {}, {}, "Succeeded", "JobSucceeded", "none"),
        (_rj("Complete", "FAILED"), {}, {}, "Starting", "Retrying", "retry"),
        (
            _rj("Failed", "FAILED"),
            {"backoffLimit": 0},
            {},
            "Failed",
            "BackoffLimitExceeded",
            "stop",
        ),
        (
            _rj("ValidationFailed", message="bad"),
            {},
            {},
            "Failed",
            "RayJobValidationFailed",
            "stop",
        ),
    ],
)
def test_decide_is_one_switch_on_the_rayjob(rayjob, spec, labels, phase, reason, action):
    job = {
        "metadata": {"labels": labels},
        "spec": {"backoffLimit": 3} | spec,
        "status": {"attempts": 1},
    }
    d = decide(job, rayjob, NOW)
    assert (d.phase, d.reason, d.action) == (phase, reason, action)


def test_retries_stop_at_backoff_limit():
    job = {"metadata": {}, "spec": {"backoffLimit": 2}, "status": {"attempts": 3}}
    assert decide(job, _rj("Failed", "FAILED"), NOW).reason == "BackoffLimitExceeded"
    job["status"]["attempts"] = 2
    assert decide(job, _rj("Failed", "FAILED"), NOW).action == "retry"


def test_active_deadline():
    start = rfc3339(NOW - timedelta(seconds=100))
    job = {
        "metadata": {},
        "spec": {"activeDeadlineSeconds": 60},
        "status": {"attempts": 1, "startTime": start},
    }
    assert decide(job, _rj("Running", "RUNNING"), NOW).reason == "DeadlineExceeded"
    job["spec"]["activeDeadlineSeconds"] = 600
    assert decide(job, _rj("Running", "RUNNING"), NOW).phase == "Running"


def test_ttl_remaining():
    done = rfc3339(NOW - timedelta(seconds=30))
    job = {
        "spec": {"ttlSecondsAfterFinished": 60},
        "status": {"phase": "Succeeded", "completionTime": done},
    }
    assert ttl_remaining(job, NOW) == 30
    job["spec"]["ttlSecondsAfterFinished"] = 10
    assert ttl_remaining(job, NOW) == 0
    job["status"]["phase"] = "Running"
    assert ttl_remaining(job, NOW) is None


def test_rayjob_patch_syncs_suspend_and_kueue_labels():
    job = {"metadata": {"labels": {}}, "spec": {"suspend": True}}
    live = {
        "metadata": {"labels": {"kueue.x-k8s.io/queue-name": "old"}},
        "spec": {"suspend": False},
    }
    assert rayjob_patch(job, live) == {
        "spec": {"suspend": True},
        "metadata": {"labels": {"kueue.x-k8s.io/queue-name": None}},
    }
    # Under Kueue, the operator never un-suspends: admission is Kueue's call.
    job = {"metadata": {"labels": {"kueue.x-k8s.io/queue-name": "q"}}, "spec": {"suspend": False}}
    live = {"metadata": {"labels": {"kueue.x-k8s.io/queue-name": "q"}}, "spec": {"suspend": True}}
    assert rayjob_patch(job, live) is None


def test_progress_to_status_golden():
    snapshot = {
        "prefix": "s3://b/runs/ns/j/uid",
        "progress": {
            "phase": "Training",
            "step": 120,
            "totalSteps": 600,
            "epoch": 0.4,
            "etaSeconds": 960,
            "tokensPerSecond": 1234.5,
            "updatedAt": "x",
        },
        "metrics": [
            {"step": 100, "loss": 2.5},
            {"step": 110, "loss": 2.25, "evalLoss": 2.4},
            {"step": 120, "loss": 2.125, "learningRate": 0.0002},
        ],
        "checkpoints": [
            {
                "step": s,
                "uri": f"s3://b/runs/ns/j/uid/checkpoints/step-{s:08d}",
                "evalLoss": 2.4,
                "createdAt": "2026-01-01T00:00:00Z",
            }
            for s in (25, 50, 75, 100)
        ],
        "outputs": None,
    }
    out = progress_to_status(snapshot, keep_last=3)
    assert out["progress"]["display"] == "120/600" and out["progress"]["percent"] == 20.0
    assert out["metrics"]["displayLoss"] == "2.1250"
    assert [c["step"] for c in out["checkpoints"]] == [50, 75, 100]
    _golden("status-progress.yaml", out)


def test_progress_to_status_shows_the_step_a_resumed_attempt_started_from():
    rec = {"phase": "Training", "step": 9, "totalSteps": 12, "updatedAt": "x"}
    assert "resumedFrom" not in progress_to_status({"progress": rec})["progress"]
    out = progress_to_status({"progress": rec | {"resumedFrom": 6}})
    assert out["progress"]["resumedFrom"] == 6


def test_progress_to_status_shows_the_checkpoints_a_resume_skipped_and_why():
    from kubetune_api.models import FineTuneJobStatus

    moved = "s3://b/runs/ns/j/uid/checkpoints/quarantine/step-00000008-20260101T000000Z"
    rec = {
        "phase": "Training",
        "step": 5,
        "totalSteps": 12,
        "resumedFrom": 4,
        "skippedCheckpoints": [
            {
                "step": 8,
                "reason": "ds/mp_rank_00_model_states.pt: 10 bytes, the manifest says 90",
                "movedTo": moved,
            },
            {"step": 6, "reason": "x" * 1000},  # not moved (the move failed); a long reason
        ],
        "updatedAt": "x",
    }
    out = progress_to_status({"progress": rec})
    assert out["progress"]["resumedFrom"] == 4
    skipped = out["progress"]["skippedCheckpoints"]
    assert skipped[0] == {
        "step": 8,
        "reason": "ds/mp_rank_00_model_states.pt: 10 bytes, the manifest says 90",
        "movedTo": moved,
    }
    assert skipped[1] == {"step": 6, "reason": "x" * 256}  # cut to what the CRD allows
    status = with_phase({"attempts": 2} | out, "Running", "Training", "m", NOW, 1)
    FineTuneJobStatus.model_validate(status)  # the CRD's status schema has the field
    assert (
        "skippedCheckpoints"
        not in progress_to_status({"progress": rec | {"skippedCheckpoints": None}})["progress"]
    )


def test_progress_to_status_outputs():
    out = progress_to_status(
        {
            "prefix": "s3://p",
            "outputs": {"adapter": "s3://p/adapter", "finalTrainLoss": 1.5, "finalEvalLoss": 1.75},
        }
    )
    assert out["outputs"] == {"prefix": "s3://p", "adapter": "s3://p/adapter"}
    assert out["metrics"]["trainLoss"] == 1.5 and out["metrics"]["evalLoss"] == 1.75


def test_status_fits_the_crd_status_model():
    from kubetune_api.models import FineTuneJobStatus

    status = {"attempts": 1, "rayJobName": "j", "configMapName": "j-config"}
    status |= progress_to_status(
        {
            "prefix": "s3://p",
            "progress": {"phase": "Training", "step": 3, "totalSteps": 9, "updatedAt": "x"},
            "metrics": [{"step": 3, "loss": 1.0}],
            "checkpoints": [{"step": 3, "uri": "s3://p/c", "createdAt": "x"}],
        }
    )
    status = with_phase(status, "Running", "Training", "m", NOW, 1)
    FineTuneJobStatus.model_validate(status)  # extra="forbid": a pruned field would fail here


def test_conditions_keep_transition_time_when_status_is_unchanged():
    c = set_condition([], "Running", "True", "A", "m", NOW, 1)
    later = NOW + timedelta(seconds=5)
    c2 = set_condition(c, "Running", "True", "B", "m2", later, 2)
    assert c2[0]["lastTransitionTime"] == c[0]["lastTransitionTime"] and c2[0]["reason"] == "B"
    c3 = set_condition(c2, "Running", "False", "C", "m3", later, 2)
    assert c3[0]["lastTransitionTime"] == rfc3339(later)


def test_with_phase_flips_phase_conditions():
    s = with_phase({}, "Running", "Training", "m", NOW, 1)
    s = with_phase(s, "Succeeded", "JobSucceeded", "done", NOW, 1)
    conds = {c["type"]: c["status"] for c in s["conditions"]}
    assert conds == {"Running": "False", "Succeeded": "True"}
    assert s["completionTime"] == rfc3339(NOW)


def test_invalid_spec_status():
    job = _job("lora-minimal.yaml")
    job["spec"]["hyperparameters"] = {"epochs": 1, "maxSteps": 5}
    errors = validate_job(job)
    assert errors and "maxSteps" in str(errors[0]) + str(errors)
    s = spec_error_status({}, errors, NOW, 3)
    assert s["phase"] == "Failed" and s["reason"] == "InvalidSpec"
    assert {c["type"]: c["status"] for c in s["conditions"]}["Validated"] == "False"


def test_operator_imports_no_torch_ray_deepspeed():
    code = (
        "import sys, kubetune_operator, kubetune_operator.cli, kubetune_operator.storage_reader;"
        "bad=[m for m in sys.modules if m.split('.')[0] in ('torch','ray','deepspeed')];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=os.environ | {"PYTHONPATH": str(ROOT / "operator")},
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_no_package_named_operator():
    assert not (ROOT / "operator" / "__init__.py").exists()
    import operator

    assert operator.itemgetter(0)([5]) == 5


def test_decide_does_not_mutate_input():
    job = {"metadata": {}, "spec": {}, "status": {"attempts": 1}}
    before = copy.deepcopy(job)
    decide(job, _rj("Running", "RUNNING"), NOW)
    assert job == before


def test_importing_the_package_registers_the_handlers():
    # What `kopf run -m kubetune_operator` relies on.
    code = (
        "import kubetune_operator, kopf\n"
        "from kopf._core.intents import registries\n"
        "r = registries.get_default_registry()\n"
        "ids = {h.id for h in r._changing.get_all_handlers()}\n"
        "ids |= {h.id for h in r._watching.get_all_handlers()}\n"
        "print(sorted(ids))\n"
        "assert kubetune_operator.__file__, 'a namespace package registers nothing'\n"
        "assert {'on_job_event', 'on_rayjob_event', 'stop_ray_job'} <= ids, ids\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


def test_storage_reader_reads_either_key_case(tmp_path):
    from kubetune_operator import storage_reader

    prefix = tmp_path / "ns" / "job" / "uid"
    (prefix / "checkpoints" / "step-00000002").mkdir(parents=True)
    (prefix / "checkpoints" / "step-00000004").mkdir(parents=True)  # not committed
    (prefix / "checkpoints" / "step-00000002" / "manifest.json").write_text(
        json.dumps({"step": 2, "eval_loss": 3.0, "created_at": "2026-01-01T00:00:00Z"})
    )
    (prefix / "progress.json").write_text(
        json.dumps({"phase": "Training", "step": 4, "total_steps": 8, "updatedAt": "x"})
    )
    (prefix / "metrics.jsonl").write_text(
        json.dumps({"step": 2, "loss": 3.5, "tokens_per_second": 10.0})
        + "\n"
        + json.dumps({"step": 4, "loss": 3.25, "eval_loss": 3.1})
        + "\n"
        + '{"step": 5, "lo'
    )
    snap = storage_reader.read_snapshot(str(prefix), None, {}, schemes=("file",))
    out = progress_to_status(snap)
    assert out["progress"]["display"] == "4/8"
    assert out["metrics"] == {
        "trainLoss": 3.25,
        "evalLoss": 3.1,
        "tokensPerSecond": 10.0,
        "displayLoss": "3.2500",
    }
    assert [(c["step"], c["evalLoss"]) for c in out["checkpoints"]] == [(2, 3.0)]


def _cluster(*conditions):
    """A RayJob still initializing, with the RayCluster conditions KubeRay copies
    into status.rayClusterStatus (message text as KubeRay v1.6 writes it:
    its error, newline, the API server's error)."""
    return _rj("Initializing", rayClusterStatus={"conditions": list(conditions)})


_NO_PC = {
    "type": "ReplicaFailure",
    "status": "True",
    "reason": "FailedCreateHeadPod",
    "message": 'FailedCreateHeadPod\npods "pc-head-x7k2p" is forbidden: no PriorityClass with '
    "name gold-nope was found",
}


@pytest.mark.parametrize(
    "condition, phase, reason, deletes",
    [
        (_NO_PC, "Failed", "PriorityClassNotFound", True),
        (
            _NO_PC
            | {
                "reason": "FailedCreateWorkerPod",
                "message": 'pods "w" is invalid: spec.tolerations[0].effect: Invalid value: '
                "\"NoSchedule\": effect must be 'NoExecute' when `tolerationSeconds` is set",
            },
            "Failed",
            "PodCreationFailed",
            True,
        ),
        (
            _NO_PC | {"message": 'pods "h" is forbidden: exceeded quota: gpu, requested: x'},
            "Starting",
            "PodQuotaExceeded",
            False,
        ),
        (
            {"type": "HeadPodReady", "status": "False", "reason": "InvalidImageName"},
            "Failed",
            "InvalidImage",
            True,
        ),
        (
            {"type": "HeadPodReady", "status": "False", "reason": "ImagePullBackOff"},
            "Starting",
            "ImagePullBackOff",
            False,
        ),
        (
            {"type": "HeadPodReady", "status": "False", "reason": "RayClusterPodsProvisioning"},
            "Starting",
            "RayClusterStarting",
            False,
        ),
        (
            _NO_PC | {"status": "False"},  # a cleared failure says nothing
            "Starting",
            "RayClusterStarting",
            False,
        ),
    ],
)
def test_pods_kubernetes_refuses_say_why(condition, phase, reason, deletes):
    job = {"metadata": {}, "spec": {"backoffLimit": 3}, "status": {"attempts": 1}}
    d = decide(job, _cluster(condition), NOW)
    assert (d.phase, d.reason) == (phase, reason)
    assert (d.action is Action.STOP_AND_DELETE) == deletes
    if reason not in ("RayClusterStarting",):
        assert "hint:" in d.message and "\n" not in d.message


def test_missing_priority_class_message_names_it_and_says_recreate():
    job = {"metadata": {}, "spec": {}, "status": {"attempts": 1}}
    d = decide(job, _cluster(_NO_PC), NOW)
    assert "no PriorityClass with name gold-nope was found" in d.message
    assert "priorityClassName" in d.message and "delete and re-create" in d.message


def test_non_kueue_resume_is_starting_not_queued():
    job = {"metadata": {"labels": {}}, "spec": {"suspend": False}, "status": {"attempts": 1}}
    # The operator just flipped spec.suspend back; KubeRay still says Suspended.
    d = decide(job, _rj("Suspended", suspend=True), NOW)
    assert (d.phase, d.reason) == ("Starting", "RayClusterStarting")


def test_unknown_kueue_queue_has_a_reason_and_hint():
    job = {
        "metadata": {"labels": {"kueue.x-k8s.io/queue-name": "nope"}},
        "spec": {},
        "status": {"attempts": 1},
    }
    d = decide(job, _rj("", suspend=True), NOW, queue_problem="no LocalQueue nope (hint: x)")
    assert (d.phase, d.reason, d.message) == (
        "Queued",
        "QueueNotFound",
        "no LocalQueue nope (hint: x)",
    )


def test_invalid_spec_message_says_delete_and_recreate():
    job = _job("lora-minimal.yaml")
    job["spec"]["hyperparameters"] = {"epochs": 1, "maxSteps": 5}
    s = spec_error_status({}, validate_job(job), NOW, 1)
    assert "delete and re-create" in s["message"]


def test_output_uri_without_bucket_is_invalid():
    job = _job("lora-minimal.yaml")
    job["spec"]["output"]["uri"] = "s3://"
    [err] = validate_job(job)
    assert err.path == "spec.output.uri" and "bucket" in err.message


def test_credentials_in_uris_never_reach_the_configmap():
    # Admission refuses them in the spec; the operator-wide default is the
    # operator's own to keep clean.
    job = _job("chat-s3-secret.yaml")
    del job["spec"]["output"]["uri"]
    settings = Settings(
        trainer_image="example.com/kubetune-trainer:test",
        default_output_uri="s3://AKIAEXAMPLE:s3cr3t-value@team-models/fine-tunes",
    )
    cm = spec_to_configmap(job, settings, 1)
    text = json.dumps(cm)
    assert "s3cr3t-value" not in text and "AKIAEXAMPLE" not in text
    config = json.loads(cm["data"]["config.json"])
    assert config["storagePrefix"] == "s3://team-models/fine-tunes/team-a/support-bot/0b7c-uid"


def test_reader_never_falls_back_to_the_local_filesystem(tmp_path):
    from kubetune_operator import storage_reader

    with pytest.raises(ValueError, match="no bucket"):
        storage_reader.read_snapshot("s3:///etc", None, {})
    with pytest.raises(storage_reader.SchemeNotReadable):
        storage_reader.read_snapshot(str(tmp_path), None, {})
    with pytest.raises(storage_reader.SchemeNotReadable):
        storage_reader.read_snapshot("gs://bucket/x", None, {})


# The decision table, one row per situation, kept as a golden file so that any
# change to what the operator decides shows up as a reviewed diff.
DECISION_CASES = {
    "no-rayjob-yet": ({}, {}, None, None),
    "rayjob-created": ({}, {}, _rj(), None),
    "cluster-initializing": ({}, {}, _rj("Initializing"), None),
    "ray-job-pending": ({}, {}, _rj("Running", "PENDING"), None),
    "running": ({}, {}, _rj("Running", "RUNNING"), None),
    "suspended-by-spec": ({"suspend": True}, {}, _rj("Suspended", suspend=True), None),
    "resuming-without-kueue": ({}, {}, _rj("Suspended", suspend=True), None),
    "queued-in-kueue": ({}, {"kueue.x-k8s.io/queue-name": "q"}, _rj("", suspend=True), None),
    "queue-does-not-exist": (
        {},
        {"kueue.x-k8s.io/queue-name": "q"},
        _rj("", suspend=True),
        "namespace team-a has no Kueue LocalQueue q (hint: create it)",
    ),
    "succeeded": ({}, {}, _rj("Complete", "SUCCEEDED"), None),
    "failed-retry-left": ({}, {}, _rj("Failed", "FAILED", message="exit 1"), None),
    "failed-no-retry-left": ({"backoffLimit": 0}, {}, _rj("Failed", "FAILED"), None),
    "stopped": ({"backoffLimit": 0}, {}, _rj("Complete", "STOPPED"), None),
    "kuberay-validation-failed": ({}, {}, _rj("ValidationFailed", message="bad name"), None),
    "deadline-passed": ({"activeDeadlineSeconds": 60}, {}, _rj("Running", "RUNNING"), None),
    "missing-priority-class": ({}, {}, _cluster(_NO_PC), None),
    "quota-exceeded": (
        {},
        {},
        _cluster(_NO_PC | {"message": 'pods "h" is forbidden: exceeded quota: q'}),
        None,
    ),
    "invalid-image": (
        {},
        {},
        _cluster({"type": "HeadPodReady", "status": "False", "reason": "InvalidImageName"}),
        None,
    ),
}


# Rows that need more status than the defaults (the job has waited in Starting
# for 100s; the scheduler's word on its pods).
_STARTING_100S = {
    "type": "Starting",
    "status": "True",
    "reason": "RayClusterStarting",
    "lastTransitionTime": rfc3339(NOW - timedelta(seconds=100)),
}
_UNSCHEDULABLE = {
    "type": "PodsScheduled",
    "status": "False",
    "reason": "Unschedulable",
    "message": "no node can take the job's pods: Ray worker group workers: 0/1 nodes are "
    "available: 1 Insufficient memory. (hint: ...)",
}
DECISION_CASES |= {
    "unschedulable": ({}, {}, _cluster(), None, [_STARTING_100S, _UNSCHEDULABLE]),
    "unschedulable-past-start-limit": (
        {"startTimeoutSeconds": 60},
        {},
        _cluster(),
        None,
        [_STARTING_100S, _UNSCHEDULABLE],
    ),
    "starting-past-start-limit": (
        {"startTimeoutSeconds": 60},
        {},
        _cluster(),
        None,
        [_STARTING_100S],
    ),
    "quota-exceeded-past-start-limit": (
        {"startTimeoutSeconds": 60},
        {},
        _cluster(_NO_PC | {"message": 'pods "h" is forbidden: exceeded quota: q'}),
        None,
        [_STARTING_100S],
    ),
    "unschedulable-within-start-limit": (
        {"startTimeoutSeconds": 600},
        {},
        _cluster(),
        None,
        [_STARTING_100S, _UNSCHEDULABLE],
    ),
}


def test_decision_table_matches_golden():
    table = {}
    for case, (spec, labels, rayjob, queue_problem, *conditions) in DECISION_CASES.items():
        job = {
            "metadata": {"name": "tune", "labels": labels},
            "spec": {"backoffLimit": 3} | spec,
            "status": {
                "attempts": 1,
                "rayJobName": "tune",
                "startTime": rfc3339(NOW - timedelta(seconds=100)),
                "conditions": conditions[0] if conditions else [],
            },
        }
        d = decide(job, rayjob, NOW, queue_problem)
        table[case] = {
            "phase": d.phase.value,
            "reason": d.reason.value,
            "action": d.action.value,
            "message": d.message,
        }
    _golden("decisions.yaml", table)
