"""Pure builders: FineTuneJob (plain dict) in, children and status (plain dicts) out.

No I/O and no clocks here: the caller passes `now`. Every child the operator
creates comes from a function in this module, and each is golden-file tested
(tests/unit/test_operator_builders.py).
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Optional

from kubetune_api import models
from kubetune_api.storage import (
    CREDENTIAL_KEYS,
    HF_TOKEN_KEY,
    credential_env,
    redact_uris,
    split_uri,
)
from kubetune_api.trainer_config import spec_to_trainer_config
from kubetune_api.validation import FieldError, SpecError, validate_document

Body = dict[str, Any]

PREFIX = "kubetune.io"
LABEL_JOB_NAME = f"{PREFIX}/job-name"
LABEL_JOB_UID = f"{PREFIX}/job-uid"
LABEL_ATTEMPT = f"{PREFIX}/attempt"
LABEL_COMPONENT = "app.kubernetes.io/component"
KUEUE_PREFIX = "kueue.x-k8s.io/"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"

CONFIG_MOUNT = "/etc/kubetune"
CONFIG_FILE = "config.json"
ENTRYPOINT = f"python -m kubetune_trainer --config {CONFIG_MOUNT}/{CONFIG_FILE}"

# KubeRay derives RayCluster (<= 53) and pod names from the RayJob name and
# rejects RayJobs whose name is longer than 47 or not a DNS-1035 label.
RAYJOB_NAME_MAX = 47
CONFIGMAP_NAME_MAX = 63  # also used as a label value
_HASH_LEN = 5


@dataclass(frozen=True)
class Settings:
    """Operator-wide settings that shape children (from env / CLI, see cli.py)."""

    trainer_image: str = "ghcr.io/kubetune/kubetune-trainer:0.1.0"
    ray_version: str = "2.60.0"
    default_output_uri: Optional[str] = None
    rayjob_ttl_seconds: int = 0  # KubeRay deletes the RayCluster this long after the job ends


# ---------------------------------------------------------------------------- names


def _dns1035(text: str, limit: int) -> str:
    """A DNS-1035 label of at most `limit` characters, derived deterministically.

    When the text had to change (case, dots, a leading digit, length) a short
    hash of the original is appended, so two different names never collide.
    """
    clean = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    if not clean or not clean[0].isalpha():
        clean = "j-" + clean
    if clean == text and len(clean) <= limit:
        return clean
    digest = hashlib.sha256(text.encode()).hexdigest()[:_HASH_LEN]
    head = clean[: limit - _HASH_LEN - 1].rstrip("-")
    return f"{head}-{digest}"


def rayjob_name(job_name: str, attempt: int) -> str:
    """`{name}` for the first attempt, `{name}-r{n}` for retry n; at most 47 characters."""
    if attempt <= 1:
        return _dns1035(job_name, RAYJOB_NAME_MAX)
    suffix = f"-r{attempt - 1}"
    return _dns1035(job_name, RAYJOB_NAME_MAX - len(suffix)) + suffix


def configmap_name(job_name: str) -> str:
    suffix = "-config"
    return _dns1035(job_name, CONFIGMAP_NAME_MAX - len(suffix)) + suffix


def child_names(job: Body, attempt: int) -> dict[str, str]:
    name = job["metadata"]["name"]
    return {"configMapName": configmap_name(name), "rayJobName": rayjob_name(name, attempt)}


# ---------------------------------------------------------------------------- validation


def validate_job(job: Body, default_output_uri: Optional[str] = None) -> list[FieldError]:
    """Everything the CRD schema and CEL cannot see; [] when the job can run."""
    doc = {k: v for k, v in job.items() if k in ("apiVersion", "kind", "metadata", "spec")}
    doc["metadata"] = {
        k: v for k, v in (job.get("metadata") or {}).items() if k in ("name", "namespace")
    }
    result = validate_document(doc)
    if not result.ok:
        return result.errors
    uri = ((job.get("spec") or {}).get("output") or {}).get("uri") or default_output_uri
    if uri:
        try:
            split_uri(uri)
        except ValueError as exc:
            return [
                FieldError("spec.output.uri", str(exc), "name the bucket, e.g. s3://models/runs")
            ]
    return []


# ---------------------------------------------------------------------------- children


def _labels(job: Body, component: str) -> dict[str, str]:
    meta = job["metadata"]
    labels = {
        "app.kubernetes.io/name": "kubetune",
        "app.kubernetes.io/managed-by": "kubetune-operator",
        "app.kubernetes.io/instance": configmap_name(meta["name"])[: -len("-config")],
        LABEL_COMPONENT: component,
        LABEL_JOB_NAME: _label_value(meta["name"]),
        LABEL_JOB_UID: meta["uid"],
    }
    return labels


def _label_value(text: str) -> str:
    if len(text) <= 63:
        return text
    return text[:57].rstrip("-._") + "-" + hashlib.sha256(text.encode()).hexdigest()[:5]


def kueue_labels(job: Body) -> dict[str, str]:
    """Kueue's labels (queue-name, priority-class, ...) carried to the RayJob."""
    labels = job["metadata"].get("labels") or {}
    return {k: v for k, v in sorted(labels.items()) if k.startswith(KUEUE_PREFIX)}


def owner_reference(job: Body) -> dict[str, Any]:
    return {
        "apiVersion": models.API_VERSION,
        "kind": models.KIND,
        "name": job["metadata"]["name"],
        "uid": job["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def spec_to_configmap(job: Body, settings: Settings, attempt: int) -> Body:
    """The trainer config (no secrets: credentials travel as env) in a ConfigMap."""
    meta = job["metadata"]
    config = spec_to_trainer_config(
        {k: job[k] for k in ("apiVersion", "kind", "spec")}
        | {"metadata": {k: meta[k] for k in ("name", "namespace", "uid")}},
        default_output_uri=settings.default_output_uri,
        attempt=attempt,
    )
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": configmap_name(meta["name"]),
            "namespace": meta["namespace"],
            "labels": _labels(job, "trainer-config"),
            "annotations": {LABEL_ATTEMPT: str(attempt)},
            "ownerReferences": [owner_reference(job)],
        },
        "data": {CONFIG_FILE: json.dumps(redact_uris(config), indent=2, sort_keys=True) + "\n"},
    }


def _secret_env(role: str, access: Optional[dict]) -> list[dict]:
    ref = (access or {}).get("secretRef")
    if not ref:
        return []
    env = []
    for key in CREDENTIAL_KEYS:
        env.append(
            {
                "name": credential_env(role, key),
                "valueFrom": {
                    "secretKeyRef": {
                        "name": ref["name"],
                        "key": key,
                        # A session token is rare; the key pair is required.
                        "optional": key == "AWS_SESSION_TOKEN",
                    }
                },
            }
        )
    return env


def trainer_env(job: Body, attempt: int) -> list[dict]:
    spec = job["spec"]
    meta = job["metadata"]
    env: list[dict] = [
        {"name": "KUBETUNE_JOB_NAME", "value": meta["name"]},
        {"name": "KUBETUNE_JOB_NAMESPACE", "value": meta["namespace"]},
        {"name": "KUBETUNE_JOB_UID", "value": meta["uid"]},
        {"name": "KUBETUNE_ATTEMPT", "value": str(attempt)},
    ]
    env += _secret_env("MODEL", spec.get("model"))
    env += _secret_env("DATASET", spec.get("dataset"))
    env += _secret_env("OUTPUT", spec.get("output"))
    token = (spec.get("model") or {}).get("tokenSecretRef")
    if token:
        env.append(
            {
                "name": HF_TOKEN_KEY,
                "valueFrom": {"secretKeyRef": {"name": token["name"], "key": HF_TOKEN_KEY}},
            }
        )
    return env


def _pod_template(
    job: Body,
    settings: Settings,
    names: dict[str, str],
    attempt: int,
    container: str,
    resources: dict,
    component: str,
) -> dict:
    res = job["spec"].get("resources") or {}
    pod_spec: dict[str, Any] = {
        "containers": [
            {
                "name": container,
                "image": res.get("image") or settings.trainer_image,
                "env": trainer_env(job, attempt),
                "resources": resources,
                "volumeMounts": [
                    {"name": "kubetune-config", "mountPath": CONFIG_MOUNT, "readOnly": True}
                ],
            }
        ],
        "volumes": [{"name": "kubetune-config", "configMap": {"name": names["configMapName"]}}],
    }
    if res.get("nodeSelector"):
        pod_spec["nodeSelector"] = dict(sorted(res["nodeSelector"].items()))
    if res.get("tolerations"):
        pod_spec["tolerations"] = copy.deepcopy(res["tolerations"])
    if res.get("priorityClassName"):
        pod_spec["priorityClassName"] = res["priorityClassName"]
    return {"metadata": {"labels": _labels(job, component)}, "spec": pod_spec}


def spec_to_rayjob(job: Body, settings: Settings, attempt: int) -> Body:
    """A KubeRay RayJob: a head (no training work) plus one worker group sized from
    spec.resources, running the trainer entrypoint on the mounted config."""
    spec = job["spec"]
    res = models.Resources.model_validate(spec.get("resources") or {}).to_dict()
    names = child_names(job, attempt)
    head_res = res["head"]
    head_resources = {
        "requests": {"cpu": head_res["cpu"], "memory": head_res["memory"]},
        "limits": {"cpu": head_res["cpu"], "memory": head_res["memory"]},
    }
    worker_requests = {"cpu": res["cpuPerWorker"], "memory": res["memoryPerWorker"]}
    worker_limits = dict(worker_requests)
    if res["gpusPerWorker"] > 0:
        worker_limits[res["gpuResourceName"]] = str(res["gpusPerWorker"])
    workers = res["workers"]
    suspend = bool(spec.get("suspend")) or bool(
        job["metadata"].get("labels", {}).get(KUEUE_QUEUE_LABEL)
    )
    meta = job["metadata"]
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {
            "name": names["rayJobName"],
            "namespace": meta["namespace"],
            "labels": _labels(job, "rayjob") | {LABEL_ATTEMPT: str(attempt)} | kueue_labels(job),
            "ownerReferences": [owner_reference(job)],
        },
        "spec": {
            "entrypoint": ENTRYPOINT,
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": settings.rayjob_ttl_seconds,
            # Kueue admits a queued job by flipping this; the operator only ever
            # sets it to true (spec.suspend) while a queue label is present.
            "suspend": suspend,
            "rayClusterSpec": {
                "rayVersion": settings.ray_version,
                "headGroupSpec": {
                    # Training runs on workers only: the head schedules, never trains.
                    "rayStartParams": {"num-cpus": "0"},
                    "template": _pod_template(
                        job, settings, names, attempt, "ray-head", head_resources, "ray-head"
                    ),
                },
                "workerGroupSpecs": [
                    {
                        "groupName": "workers",
                        "replicas": workers,
                        "minReplicas": workers,
                        "maxReplicas": workers,
                        "rayStartParams": {},
                        "template": _pod_template(
                            job,
                            settings,
                            names,
                            attempt,
                            "ray-worker",
                            {"requests": worker_requests, "limits": worker_limits},
                            "ray-worker",
                        ),
                    }
                ],
            },
        },
    }


def rayjob_patch(job: Body, rayjob: Body) -> Optional[dict]:
    """The merge patch that brings a live RayJob in line with the safe, mutable
    parts of the FineTuneJob (suspend, Kueue labels); None when nothing to do."""
    patch: dict[str, Any] = {}
    want_suspend = bool(job["spec"].get("suspend"))
    has_queue = KUEUE_QUEUE_LABEL in (job["metadata"].get("labels") or {})
    live_suspend = bool(rayjob.get("spec", {}).get("suspend"))
    # Without Kueue the FineTuneJob owns the flag; with Kueue only "stop" is ours.
    if (not has_queue and want_suspend != live_suspend) or (
        has_queue and want_suspend and not live_suspend
    ):
        patch["spec"] = {"suspend": want_suspend}
    live_labels = rayjob.get("metadata", {}).get("labels") or {}
    want = kueue_labels(job)
    changed = {k: v for k, v in want.items() if live_labels.get(k) != v}
    gone = {k: None for k in live_labels if k.startswith(KUEUE_PREFIX) and k not in want}
    if changed or gone:
        patch["metadata"] = {"labels": changed | gone}
    return patch or None


# ---------------------------------------------------------------------------- observed state

# What a RayJob's status means for the FineTuneJob, one word each.
NONE, QUEUED, STARTING, RUNNING, SUSPENDED, SUCCEEDED, FAILED, INVALID = (
    "none",
    "queued",
    "starting",
    "running",
    "suspended",
    "succeeded",
    "failed",
    "invalid",
)


def rayjob_state(job: Body, rayjob: Optional[Body]) -> str:
    if rayjob is None:
        return NONE
    st = rayjob.get("status") or {}
    deploy = st.get("jobDeploymentStatus") or ""
    ray = st.get("jobStatus") or ""
    if deploy == "ValidationFailed":
        return INVALID
    if deploy == "Complete" or ray in ("SUCCEEDED", "FAILED", "STOPPED"):
        if ray == "SUCCEEDED":
            return SUCCEEDED
        if ray in ("FAILED", "STOPPED") or deploy == "Complete":
            return FAILED
    if deploy == "Failed":
        return FAILED
    if deploy in ("Suspending", "Suspended") or rayjob.get("spec", {}).get("suspend"):
        if job["spec"].get("suspend"):
            return SUSPENDED
        # Only Kueue holds a RayJob suspended on its own; without a queue label
        # a suspended RayJob is one the operator is resuming right now.
        if KUEUE_QUEUE_LABEL in (job["metadata"].get("labels") or {}):
            return QUEUED
        return STARTING
    if deploy == "Running" and ray == "RUNNING":
        return RUNNING
    return STARTING


@dataclass(frozen=True)
class PodTrouble:
    """Why KubeRay cannot get the Ray pods running, as the job's status shows it."""

    reason: str
    message: str
    terminal: bool  # True: it cannot heal without deleting and re-creating the job


_RECREATE = (
    "fix the FineTuneJob's manifest, then delete and re-create it "
    "(kubectl delete ftj NAME; kubectl apply -f FILE): its spec cannot be edited"
)
# HeadPodReady=False reasons (the head container's waiting reason) that no
# retry can fix: the image reference itself is wrong.
_IMAGE_FATAL = {"InvalidImageName", "ErrImageNeverPull"}
_IMAGE_WAIT = {"ErrImagePull", "ImagePullBackOff"}


def _one_line(text: str, limit: int = 600) -> str:
    return " ".join(str(text).split())[:limit]


def pod_trouble(rayjob: Optional[Body]) -> Optional[PodTrouble]:
    """KubeRay's own account of pod trouble, from the RayCluster status it copies
    into `RayJob.status.rayClusterStatus.conditions`.

    A Pod the API server rejects for its own spec (a bad name, toleration,
    resource name, label) never heals: the pod-shaping fields of a FineTuneJob
    are immutable, and KubeRay would retry the create forever. The same holds
    for a PriorityClass that does not exist: it is cluster policy, named by the
    job, and a typo far more often than a race. Both end the job at once.
    An exceeded quota, an image pull that may succeed later and a missing
    Secret/ConfigMap can heal without touching the job: they stay a visible,
    non-terminal reason (activeDeadlineSeconds bounds the wait).
    """
    if rayjob is None:
        return None
    cluster = (rayjob.get("status") or {}).get("rayClusterStatus") or {}
    for cond in cluster.get("conditions") or []:
        ctype, status = cond.get("type"), cond.get("status")
        why = _one_line(cond.get("message") or cond.get("reason") or "")
        if ctype == "ReplicaFailure" and status == "True":
            which = "head" if "head" in (cond.get("reason") or "").lower() else "worker"
            lowered = why.lower()
            if "exceeded quota" in lowered:
                return PodTrouble(
                    "PodQuotaExceeded",
                    f"Kubernetes refused the Ray {which} Pod: {why} (hint: the job starts "
                    "once the namespace's ResourceQuota has room; free quota or ask for more)",
                    False,
                )
            if "priorityclass" in lowered:
                return PodTrouble(
                    "PriorityClassNotFound",
                    f"Kubernetes refused the Ray {which} Pod: {why} (hint: "
                    "spec.resources.priorityClassName must name an existing PriorityClass "
                    f"(kubectl get priorityclass); {_RECREATE})",
                    True,
                )
            return PodTrouble(
                "PodCreationFailed",
                f"Kubernetes refused the Ray {which} Pod: {why} (hint: {_RECREATE})",
                True,
            )
        if ctype == "HeadPodReady" and status == "False":
            reason = cond.get("reason") or ""
            if reason in _IMAGE_FATAL:
                return PodTrouble(
                    "InvalidImage",
                    f"the Ray head cannot start: {reason}: {why} (hint: check "
                    f"spec.resources.image; {_RECREATE})",
                    True,
                )
            if reason in _IMAGE_WAIT:
                return PodTrouble(
                    "ImagePullBackOff",
                    f"the Ray head's image cannot be pulled yet: {why} (hint: check that "
                    "the image exists and the nodes can reach its registry)",
                    False,
                )
            if reason == "CreateContainerConfigError":
                return PodTrouble(
                    "PodConfigError",
                    f"the Ray head cannot start: {why} (hint: create the Secret or "
                    "ConfigMap it names in this namespace)",
                    False,
                )
    return None


def trainer_may_have_written(job: Body, rayjob: Optional[Body], attempts: int) -> bool:
    """Whether reading the storage prefix can show anything: once the Ray job runs
    or has run, or on a retry (earlier attempts wrote there)."""
    return attempts > 1 or rayjob_state(job, rayjob) in (RUNNING, SUCCEEDED, FAILED)


def rayjob_to_status(rayjob: Optional[Body]) -> dict[str, Any]:
    """Names and URLs that KubeRay reports (only those it has set)."""
    if rayjob is None:
        return {}
    st = rayjob.get("status") or {}
    out: dict[str, Any] = {}
    if st.get("rayClusterName"):
        out["rayClusterName"] = st["rayClusterName"]
    if st.get("dashboardURL"):
        url = st["dashboardURL"]
        out["dashboardUrl"] = url if "://" in url else f"http://{url}"
    return out


def _round(x: Optional[float], digits: int = 6) -> Optional[float]:
    return None if x is None else round(float(x), digits)


def progress_to_status(snapshot: Optional[dict], keep_last: int = 3) -> dict[str, Any]:
    """What the trainer wrote under the job's prefix → status.progress, .metrics,
    .checkpoints, .outputs. `snapshot` comes from storage_reader.read_snapshot."""
    if not snapshot:
        return {}
    out: dict[str, Any] = {}
    if snapshot.get("prefix"):
        out["outputs"] = {"prefix": snapshot["prefix"]}
    rec = snapshot.get("progress")
    if rec:
        step = int(rec.get("step") or 0)
        total = rec.get("totalSteps")
        progress: dict[str, Any] = {"step": step}
        if total:
            progress["totalSteps"] = int(total)
        for key in ("epoch", "percent"):
            if rec.get(key) is not None:
                progress[key] = _round(rec[key], 4)
        if progress.get("percent") is None and total:
            progress["percent"] = round(100.0 * step / int(total), 2)
        if rec.get("etaSeconds") is not None:
            progress["etaSeconds"] = int(rec["etaSeconds"])
        progress["display"] = f"{step}/{total}" if total else str(step)
        out["progress"] = progress
    rows = snapshot.get("metrics") or []
    metrics: dict[str, Any] = {}
    for row in rows:  # oldest first: later rows win
        for src, dst in (
            ("loss", "trainLoss"),
            ("evalLoss", "evalLoss"),
            ("evalPerplexity", "evalPerplexity"),
            ("evalTokenAccuracy", "evalTokenAccuracy"),
            ("tokensPerSecond", "tokensPerSecond"),
            ("learningRate", "learningRate"),
        ):
            if row.get(src) is not None:
                metrics[dst] = _round(row[src])
    if rec and rec.get("tokensPerSecond") is not None:
        metrics["tokensPerSecond"] = _round(rec["tokensPerSecond"])
    if "trainLoss" in metrics:
        metrics["displayLoss"] = f"{metrics['trainLoss']:.4f}"
    elif "evalLoss" in metrics:
        metrics["displayLoss"] = f"{metrics['evalLoss']:.4f}"
    if metrics:
        out["metrics"] = metrics
    cps = sorted(snapshot.get("checkpoints") or [], key=lambda c: c["step"])
    if cps:
        out["checkpoints"] = [
            {
                k: v
                for k, v in {
                    "step": c["step"],
                    "uri": c["uri"],
                    "evalLoss": _round(c.get("evalLoss")),
                    "time": c.get("createdAt"),
                }.items()
                if v is not None
            }
            for c in cps[-keep_last:]
        ]
    rec_out = snapshot.get("outputs")
    if rec_out:
        outputs = out.setdefault("outputs", {})
        for src, dst in (
            ("adapter", "adapter"),
            ("mergedModel", "mergedModel"),
            ("model", "mergedModel"),
            ("metrics", "metrics"),
            ("lossCurve", "lossCurve"),
        ):
            if rec_out.get(src) and dst not in outputs:
                outputs[dst] = rec_out[src]
        if rec_out.get("finalTrainLoss") is not None:
            metrics = out.setdefault("metrics", {})
            metrics.setdefault("trainLoss", _round(rec_out["finalTrainLoss"]))
            metrics.setdefault("displayLoss", f"{metrics['trainLoss']:.4f}")
        if rec_out.get("finalEvalLoss") is not None:
            out.setdefault("metrics", {}).setdefault("evalLoss", _round(rec_out["finalEvalLoss"]))
    return out


# ---------------------------------------------------------------------------- conditions


def rfc3339(now: datetime) -> str:
    return now.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: Optional[str]) -> Optional[datetime]:
    if not text:
        return None
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)


def set_condition(
    conditions: list[dict],
    type_: str,
    status: str,
    reason: str,
    message: str,
    now: datetime,
    generation: Optional[int],
) -> list[dict]:
    """Kubernetes convention: lastTransitionTime moves only when status flips."""
    out = []
    found = False
    for c in conditions:
        if c.get("type") != type_:
            out.append(c)
            continue
        found = True
        same = c.get("status") == status
        new = {
            "type": type_,
            "status": status,
            "reason": reason,
            "message": message[:4096],
            "lastTransitionTime": c.get("lastTransitionTime") if same else rfc3339(now),
            "observedGeneration": generation,
        }
        out.append({k: v for k, v in new.items() if v is not None})
    if not found:
        new = {
            "type": type_,
            "status": status,
            "reason": reason,
            "message": message[:4096],
            "lastTransitionTime": rfc3339(now),
            "observedGeneration": generation,
        }
        out.append({k: v for k, v in new.items() if v is not None})
    return out


def get_condition(status: dict, type_: str) -> Optional[dict]:
    for c in status.get("conditions") or []:
        if c.get("type") == type_:
            return c
    return None


# The phase conditions: exactly one of these is True at a time (plus Validated,
# Checkpointed and the error conditions, which stand on their own).
PHASE_CONDITIONS = {
    "Pending": None,
    "Queued": "Queued",
    "Starting": "Starting",
    "Running": "Running",
    "Suspended": "Suspended",
    "Succeeded": "Succeeded",
    "Failed": "Failed",
}


def with_phase(
    status: dict, phase: str, reason: str, message: str, now: datetime, generation: Optional[int]
) -> dict:
    """Set phase, reason, message and the matching phase conditions."""
    out = dict(status)
    out["phase"] = phase
    out["reason"] = reason
    out["message"] = message[:4096]
    conds = list(out.get("conditions") or [])
    for ph, ctype in PHASE_CONDITIONS.items():
        if ctype is None:
            continue
        if ph == phase:
            conds = set_condition(conds, ctype, "True", reason, message, now, generation)
        elif get_condition({"conditions": conds}, ctype) is not None:
            conds = set_condition(
                conds, ctype, "False", reason, f"the job is {phase} now", now, generation
            )
    out["conditions"] = conds
    if phase in ("Succeeded", "Failed") and not out.get("completionTime"):
        out["completionTime"] = rfc3339(now)
    return out


# ---------------------------------------------------------------------------- decisions


@dataclass
class Decision:
    """One reconcile's verdict: the phase to show and what to do about it."""

    phase: str
    reason: str
    message: str
    action: Optional[str] = None  # "retry" | "stop" | "create" | None
    warnings: list[str] = field(default_factory=list)
    # With "stop": delete the RayJob too (its Ray job must not go on, or KubeRay
    # would keep retrying Pods that Kubernetes refuses).
    delete_rayjob: bool = False


def decide(
    job: Body, rayjob: Optional[Body], now: datetime, queue_problem: Optional[str] = None
) -> Decision:
    """The one switch on the state of the job's current RayJob.

    `queue_problem` is what the operator found wrong with the job's Kueue
    queue (None when it exists or could not be checked)."""
    spec = job["spec"]
    status = job.get("status") or {}
    attempts = int(status.get("attempts") or 1)
    backoff = int(spec.get("backoffLimit", 3))
    state = rayjob_state(job, rayjob)
    rj_status = (rayjob or {}).get("status") or {}
    why = rj_status.get("message") or rj_status.get("reason") or ""

    if state == INVALID:
        return Decision(
            "Failed", "RayJobValidationFailed", f"KubeRay rejected the RayJob: {why}", "stop"
        )
    if state == SUCCEEDED:
        return Decision("Succeeded", "JobSucceeded", "training finished")
    if state == FAILED:
        if attempts <= backoff:
            return Decision(
                "Starting",
                "Retrying",
                f"attempt {attempts} failed ({why or 'Ray job failed'}); starting attempt "
                f"{attempts + 1} of {backoff + 1}, resuming from the last committed checkpoint",
                "retry",
            )
        return Decision(
            "Failed",
            "BackoffLimitExceeded",
            f"attempt {attempts} failed ({why or 'Ray job failed'}) and backoffLimit "
            f"{backoff} is used up",
            "stop",
        )
    deadline = spec.get("activeDeadlineSeconds")
    started = parse_time(status.get("startTime"))
    if deadline and started and (now - started).total_seconds() > int(deadline):
        return Decision(
            "Failed",
            "DeadlineExceeded",
            f"the job ran longer than activeDeadlineSeconds ({deadline}s)",
            "stop",
            delete_rayjob=True,
        )
    if state == NONE:
        return Decision("Pending", "Creating", "creating the RayJob", "create")
    if state == SUSPENDED:
        return Decision(
            "Suspended", "Suspended", "spec.suspend is true: the Ray cluster is stopped"
        )
    if state == QUEUED:
        queue = (job["metadata"].get("labels") or {}).get(KUEUE_QUEUE_LABEL)
        if queue_problem:
            return Decision("Queued", "QueueNotFound", queue_problem)
        return Decision("Queued", "Queued", f"waiting for admission in Kueue queue {queue}")
    if state == RUNNING:
        return Decision("Running", "Training", "the Ray job is running")
    trouble = pod_trouble(rayjob)
    if trouble is not None:
        if trouble.terminal:
            return Decision("Failed", trouble.reason, trouble.message, "stop", delete_rayjob=True)
        return Decision("Starting", trouble.reason, trouble.message)
    return Decision(
        "Starting", "RayClusterStarting", "waiting for the Ray cluster and job to start"
    )


def ttl_remaining(job: Body, now: datetime) -> Optional[float]:
    """Seconds until finished-job cleanup; None when there is none to do."""
    status = job.get("status") or {}
    ttl = job["spec"].get("ttlSecondsAfterFinished")
    if ttl is None or status.get("phase") not in ("Succeeded", "Failed"):
        return None
    done = parse_time(status.get("completionTime"))
    if done is None:
        return None
    return max(0.0, int(ttl) - (now - done).total_seconds())


def status_changed(old: dict, new: dict) -> bool:
    """Ignore what moves on its own (nothing here does): plain deep comparison."""
    return json.dumps(old, sort_keys=True) != json.dumps(new, sort_keys=True)


def spec_error_status(status: dict, errors: list[FieldError], now: datetime, generation) -> dict:
    message = "; ".join(str(e) for e in errors) + (
        ". A FineTuneJob's spec cannot be edited: fix the manifest, then delete and re-create "
        "the job (kubectl delete ftj NAME; kubectl apply -f FILE)"
    )
    out = dict(status)
    out["conditions"] = set_condition(
        list(out.get("conditions") or []),
        "Validated",
        "False",
        "InvalidSpec",
        message,
        now,
        generation,
    )
    out = with_phase(out, "Failed", "InvalidSpec", message, now, generation)
    out["observedGeneration"] = generation
    return out


__all__ = [
    "Decision",
    "Settings",
    "SpecError",
    "child_names",
    "decide",
    "progress_to_status",
    "rayjob_patch",
    "rayjob_to_status",
    "spec_to_configmap",
    "spec_to_rayjob",
]
