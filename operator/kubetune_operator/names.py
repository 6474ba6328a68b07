"""Names and labels of everything the operator creates, derived from the job.

Deterministic (never random) and within Kubernetes' limits, so a retry or a
restarted operator finds the child it made instead of making another.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from kubetune_api import models

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


def labels(job: Body, component: str) -> dict[str, str]:
    meta = job["metadata"]
    labels = {
        "app.kubernetes.io/name": "kubetune",
        "app.kubernetes.io/managed-by": "kubetune-operator",
        "app.kubernetes.io/instance": configmap_name(meta["name"])[: -len("-config")],
        LABEL_COMPONENT: component,
        LABEL_JOB_NAME: label_value(meta["name"]),
        LABEL_JOB_UID: meta["uid"],
    }
    return labels


def label_value(text: str) -> str:
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


def ray_token_name(job_name: str) -> str:
    """The Secret with the job's Ray auth token (KubeRay's authOptions.secretName)."""
    suffix = "-ray-token"
    return _dns1035(job_name, CONFIGMAP_NAME_MAX - len(suffix)) + suffix


def network_policy_name(job_name: str) -> str:
    suffix = "-ray"
    return _dns1035(job_name, CONFIGMAP_NAME_MAX - len(suffix)) + suffix
