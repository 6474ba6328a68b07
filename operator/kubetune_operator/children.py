"""Spec → children: the trainer ConfigMap and the KubeRay RayJob, and the patch
that keeps a live RayJob in line with the job's mutable fields.

Pure: plain dicts out, no I/O; golden-file tested (tests/golden/).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any, Optional

from kubetune_api import models
from kubetune_api.storage import CREDENTIAL_KEYS, HF_TOKEN_KEY, credential_env, redact_uris
from kubetune_api.trainer_config import spec_to_trainer_config

from .names import (
    CONFIG_FILE,
    CONFIG_MOUNT,
    ENTRYPOINT,
    KUEUE_PREFIX,
    KUEUE_QUEUE_LABEL,
    LABEL_ATTEMPT,
    Body,
    child_names,
    configmap_name,
    kueue_labels,
    labels,
    owner_reference,
)


@dataclass(frozen=True)
class Settings:
    """Operator-wide settings that shape children (from env / CLI, see cli.py)."""

    trainer_image: str = "ghcr.io/kubetune/kubetune-trainer:0.1.0"
    ray_version: str = "2.60.0"
    default_output_uri: Optional[str] = None
    rayjob_ttl_seconds: int = 0  # KubeRay deletes the RayCluster this long after the job ends


def spec_to_configmap(job: Body, settings: Settings, attempt: int) -> Body:
    """The trainer config (no secrets: credentials travel as env) in a ConfigMap."""
    meta = job["metadata"]
    config = spec_to_trainer_config(
        {k: job[k] for k in ("apiVersion", "kind", "spec")}
        | {"metadata": {k: meta[k] for k in ("name", "namespace", "uid")}},
        default_output_uri=settings.default_output_uri,
        attempt=attempt,
        parent=(job.get("status") or {}).get("parent"),  # resolved before the children
    )
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": configmap_name(meta["name"]),
            "namespace": meta["namespace"],
            "labels": labels(job, "trainer-config"),
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
    mlflow = (spec.get("tracking") or {}).get("mlflow") or {}
    if mlflow.get("secretRef"):
        # a token, or a user and password: whichever the Secret holds
        for key in (
            "MLFLOW_TRACKING_TOKEN",
            "MLFLOW_TRACKING_USERNAME",
            "MLFLOW_TRACKING_PASSWORD",
        ):
            ref = {"name": mlflow["secretRef"]["name"], "key": key, "optional": True}
            env.append({"name": key, "valueFrom": {"secretKeyRef": ref}})
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
    image = res.get("image") or settings.trainer_image
    pod_spec: dict[str, Any] = {
        "containers": [
            {
                "name": container,
                "image": image,
                # the run record names the image it ran in
                "env": [*trainer_env(job, attempt), {"name": "KUBETUNE_IMAGE", "value": image}],
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
    return {"metadata": {"labels": labels(job, component)}, "spec": pod_spec}


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
    # a sweep trains parallelTrials trials at once, each on resources.workers workers
    workers = res["workers"] * ((spec.get("sweep") or {}).get("parallelTrials") or 1)
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
            "labels": labels(job, "rayjob") | {LABEL_ATTEMPT: str(attempt)} | kueue_labels(job),
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
