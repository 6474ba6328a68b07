"""Spec → children: the trainer ConfigMap and the KubeRay RayJob, and the patch
that keeps a live RayJob in line with the job's mutable fields.

Pure: plain dicts out, no I/O; golden-file tested (tests/golden/).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any, Optional

from kubetune_api import graders, models
from kubetune_api.storage import CREDENTIAL_KEYS, HF_TOKEN_KEY, credential_env, redact_uris
from kubetune_api.trainer_config import RAY_ENV, spec_to_trainer_config

from .names import (
    CONFIG_FILE,
    CONFIG_MOUNT,
    ENTRYPOINT,
    KUEUE_PREFIX,
    KUEUE_QUEUE_LABEL,
    LABEL_ATTEMPT,
    LABEL_JOB_UID,
    Body,
    child_names,
    configmap_name,
    kueue_labels,
    labels,
    network_policy_name,
    owner_reference,
    ray_token_name,
)

# Where the pods write: the root filesystem is read-only, so Ray's session files
# (/tmp/ray), DeepSpeed's compiled ops and Hugging Face's cache (both under /tmp
# in the trainer image), the home directory and the checkpoint staging area are
# emptyDirs.
HOME_DIR = "/home/kubetune"
SCRATCH_DIR = "/var/kubetune/scratch"
SCRATCH_ENV = "KUBETUNE_SCRATCH_DIR"
# The staging claim (spec.staging, or Settings.staging_claim): mounted here in the
# head (read-write: its driver stages) and the workers (read-only: they read);
# each attempt stages under <mount>/<namespace>/<uid>/<attempt>, named in STAGE_ENV.
STAGE_MOUNT = "/var/kubetune/stage"
STAGE_ENV = "KUBETUNE_STAGE_DIR"  # kubetune_trainer.staging reads it
RAY_TOKEN_KEY = "auth_token"  # the key KubeRay reads from authOptions.secretName
RAY_DASHBOARD_PORT = 8265
SUBMITTER_CONTAINER = "ray-job-submitter"  # KubeRay's name for it
# KubeRay's defaults for the submitter (which the template replaces), but 100m CPU
# requested instead of 500m: `ray job submit` only submits and follows the logs.
SUBMITTER_RESOURCES = {
    "requests": {"cpu": "100m", "memory": "200Mi"},
    "limits": {"cpu": "1", "memory": "1Gi"},
}


@dataclass(frozen=True)
class Settings:
    """Operator-wide settings that shape children (from env / CLI, see cli.py)."""

    trainer_image: str = "ghcr.io/kubetune/kubetune-trainer:0.1.0"
    ray_version: str = "2.60.0"
    default_output_uri: Optional[str] = None
    rayjob_ttl_seconds: int = 0  # KubeRay deletes the RayCluster this long after the job ends
    # Every Ray pod runs as this numeric uid (the trainer image's user), whatever
    # user a job's own image declares.
    run_as_user: int = 10001
    # A NetworkPolicy per job: only its own pods, and the KubeRay operator (this
    # peer, JSON: a NetworkPolicyPeer) on the dashboard port, reach its Ray pods.
    network_policy: bool = True
    ray_operator_peer: Optional[str] = None
    # A ReadWriteMany PersistentVolumeClaim (in each job's namespace) for jobs
    # without spec.staging: the model and data are staged there once per job.
    staging_claim: Optional[str] = None


def _child_metadata(job: Body, name: str, component: str) -> Body:
    """A child's metadata: its name, the job's namespace, labels and ownership."""
    return {
        "name": name,
        "namespace": job["metadata"]["namespace"],
        "labels": labels(job, component),
        "ownerReferences": [owner_reference(job)],
    }


def spec_to_configmap(job: Body, settings: Settings, attempt: int) -> Body:
    """The trainer config (no secrets: credentials travel as env) in a ConfigMap."""
    meta = job["metadata"]
    config = spec_to_trainer_config(
        {k: job[k] for k in ("apiVersion", "kind", "spec")}
        | {"metadata": {k: meta[k] for k in ("name", "namespace", "uid")}},
        default_output_uri=settings.default_output_uri,
        attempt=attempt,
        parent=(job.get("status") or {}).get("parent"),  # resolved before the children
        teacher=(job.get("status") or {}).get("teacher"),
    )
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _child_metadata(job, configmap_name(meta["name"]), "trainer-config")
        | {"annotations": {LABEL_ATTEMPT: str(attempt)}},
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


def grader_env(spec: dict) -> list[dict]:
    """A scoreModel grader's API key: from its Secret into the environment variable the
    trainer reads (kubetune_api.graders.api_key_env), never into the trainer config."""
    env = []
    for leaf in graders.leaf_dicts(graders.job_grader(spec)):
        ref = leaf.get("apiKeySecretRef") if leaf.get("type") == "scoreModel" else None
        if ref:
            env.append(
                {
                    "name": graders.api_key_env(leaf["name"]),
                    "valueFrom": {"secretKeyRef": {"name": ref["name"], "key": ref["key"]}},
                }
            )
    return env


def grader_volumes(spec: dict) -> tuple[list[dict], list[dict]]:
    """(volumes, mounts) for python graders whose source is a ConfigMap key: mounted
    read-only where the trainer looks (kubetune_api.graders.configmap_mount). A mount,
    not a read by the operator: the operator needs no access to ConfigMaps it did not
    create, and the pod waits for a ConfigMap created after the job."""
    volumes, mounts = [], []
    for leaf in graders.leaf_dicts(graders.job_grader(spec)):
        ref = leaf.get("configMapRef") if leaf.get("type") == "python" else None
        if ref:
            name = graders.volume_name(leaf["name"])
            volumes.append(
                {
                    "name": name,
                    "configMap": {
                        "name": ref["name"],
                        "items": [{"key": ref["key"], "path": ref["key"]}],
                    },
                }
            )
            mounts.append(
                {
                    "name": name,
                    "mountPath": graders.configmap_mount(leaf["name"]),
                    "readOnly": True,
                }
            )
    return volumes, mounts


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
    env += grader_env(spec)
    return env


def pod_security_context(settings: Settings) -> dict:
    return {
        "runAsNonRoot": True,
        "runAsUser": settings.run_as_user,
        "runAsGroup": settings.run_as_user,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context(settings: Settings) -> dict:
    """The `restricted` Pod Security Standard, per container: KubeRay copies it to
    the init container it adds (wait-gcs-ready)."""
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "runAsUser": settings.run_as_user,
        "runAsGroup": settings.run_as_user,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def staging_claim(job: Body, settings: Settings) -> Optional[str]:
    """The claim the job stages on: its own spec.staging, else the operator's default."""
    own = (job["spec"].get("staging") or {}).get("claimName")
    return own or settings.staging_claim


def staging_volume(
    job: Body, settings: Settings, attempt: int, writer: bool
) -> tuple[list, list, list]:
    """(volumes, mounts, env) for the attempt's stage; empty without a staging claim.
    The writer (the head, whose driver stages) mounts it read-write, the rest read-only.
    One folder per attempt: a late driver of an older one never removes a newer one's."""
    claim = staging_claim(job, settings)
    if not claim:
        return [], [], []
    meta = job["metadata"]
    volume = {"name": "stage", "persistentVolumeClaim": {"claimName": claim}}
    mount = {"name": "stage", "mountPath": STAGE_MOUNT, "readOnly": not writer}
    folder = f"{STAGE_MOUNT}/{meta['namespace']}/{meta['uid']}/{attempt}"
    env = {"name": STAGE_ENV, "value": folder}
    return [volume], [mount], [env]


def _writable(scratch: Optional[str] = None, shm: Optional[str] = None) -> tuple[list, list]:
    """(volumes, mounts) for what the pod writes; scratch and /dev/shm with size limits."""
    vols = [("tmp", "/tmp", {}), ("home", HOME_DIR, {})]
    if shm:
        # NCCL and data loaders outgrow the runtime's 64 MiB /dev/shm; it counts
        # against the container's memory, so it never exceeds the pod's memory.
        vols.append(("dshm", "/dev/shm", {"medium": "Memory", "sizeLimit": shm}))
    if scratch:
        vols.append(("scratch", SCRATCH_DIR, {"sizeLimit": scratch}))
    volumes = [{"name": n, "emptyDir": e} for n, _, e in vols]
    mounts = [{"name": n, "mountPath": p} for n, p, _ in vols]
    return volumes, mounts


# the hook's wait ends this much before the grace period does: the processes
# then get SIGTERM with time to exit before the kubelet's SIGKILL
STOP_MARGIN_SECONDS = 10
STOP_HOOK = ("python", "-m", "kubetune_trainer.stop", "--wait")


def stop_grace(spec: dict) -> Optional[int]:
    """The pods' grace period when they save on stop; None when they stop at once
    (saveOnStop off, or a sweep: its trials resume from their periodic checkpoints)."""
    ckpt = models.Checkpointing.model_validate(spec.get("checkpointing") or {})
    if not ckpt.save_on_stop or spec.get("sweep"):
        return None
    return ckpt.termination_grace_period_seconds


def _pod_template(
    job: Body,
    settings: Settings,
    names: dict[str, str],
    attempt: int,
    container: str,
    resources: dict,
    component: str,
    scratch: Optional[str] = None,
) -> dict:
    res = job["spec"].get("resources") or {}
    image = res.get("image") or settings.trainer_image
    volumes, mounts = _writable(scratch, shm=resources["limits"]["memory"])
    grader_vols, grader_mounts = grader_volumes(job["spec"])
    volumes, mounts = volumes + grader_vols, mounts + grader_mounts
    stage_vols, stage_mounts, stage_env = staging_volume(
        job, settings, attempt, writer=component == "ray-head"
    )
    volumes, mounts = volumes + stage_vols, mounts + stage_mounts
    env = [*trainer_env(job, attempt), {"name": "KUBETUNE_IMAGE", "value": image}]
    env += stage_env
    env.append({"name": "HOME", "value": HOME_DIR})
    env += [{"name": k, "value": v} for k, v in RAY_ENV.items()]
    if scratch:
        env.append({"name": SCRATCH_ENV, "value": SCRATCH_DIR})
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "securityContext": pod_security_context(settings),
        "containers": [
            {
                "name": container,
                "image": image,
                # the run record names the image it ran in
                "env": env,
                "resources": resources,
                "securityContext": container_security_context(settings),
                "volumeMounts": [
                    {"name": "kubetune-config", "mountPath": CONFIG_MOUNT, "readOnly": True},
                    *mounts,
                ],
            }
        ],
        "volumes": [
            {"name": "kubetune-config", "configMap": {"name": names["configMapName"]}},
            *volumes,
        ],
    }
    grace = stop_grace(job["spec"])
    if grace is not None:
        # Save on stop (kubetune_trainer.stop): the hook asks the ranks for a checkpoint
        # at the end of the step in flight and holds SIGTERM back until it is committed.
        pod_spec["terminationGracePeriodSeconds"] = grace
        pod_spec["containers"][0]["lifecycle"] = {
            "preStop": {"exec": {"command": [*STOP_HOOK, str(grace - STOP_MARGIN_SECONDS)]}}
        }
    if res.get("nodeSelector"):
        pod_spec["nodeSelector"] = dict(sorted(res["nodeSelector"].items()))
    if res.get("tolerations"):
        pod_spec["tolerations"] = copy.deepcopy(res["tolerations"])
    if res.get("priorityClassName"):
        pod_spec["priorityClassName"] = res["priorityClassName"]
    return {"metadata": {"labels": labels(job, component)}, "spec": pod_spec}


def _submitter_template(job: Body, settings: Settings) -> dict:
    """KubeRay's submitter pod (`ray job submit`) under the same restrictions;
    KubeRay fills in its command, the dashboard address and the token."""
    res = job["spec"].get("resources") or {}
    volumes, mounts = _writable()
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "restartPolicy": "Never",
        "securityContext": pod_security_context(settings),
        "containers": [
            {
                "name": SUBMITTER_CONTAINER,
                "image": res.get("image") or settings.trainer_image,
                "env": [{"name": "HOME", "value": HOME_DIR}],
                "resources": copy.deepcopy(SUBMITTER_RESOURCES),
                "securityContext": container_security_context(settings),
                "volumeMounts": mounts,
            }
        ],
        "volumes": volumes,
    }
    for key in ("nodeSelector", "tolerations", "priorityClassName"):
        if res.get(key):
            pod_spec[key] = copy.deepcopy(res[key])
    return {"metadata": {"labels": labels(job, "ray-submitter")}, "spec": pod_spec}


def spec_to_ray_token_secret(job: Body, token: str) -> Body:
    """The job's Ray auth token: KubeRay hands it to the Ray pods and the
    submitter, and sends it on its own dashboard calls. Owned by the job, so it
    lives as long as the job, across attempts."""
    meta = job["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": _child_metadata(job, ray_token_name(meta["name"]), "ray-token"),
        "stringData": {RAY_TOKEN_KEY: token},
    }


def spec_to_network_policy(job: Body, settings: Settings) -> Optional[Body]:
    """Ingress to the job's pods only from the job's own pods (head, workers,
    submitter) and, on the dashboard port, from the KubeRay operator. None when
    the chart turned policies off."""
    if not settings.network_policy:
        return None
    meta = job["metadata"]
    own = {"matchLabels": {LABEL_JOB_UID: meta["uid"]}}
    ingress: list[dict] = [{"from": [{"podSelector": own}]}]
    if settings.ray_operator_peer:
        ingress.append(
            {
                "from": [json.loads(settings.ray_operator_peer)],
                "ports": [{"protocol": "TCP", "port": RAY_DASHBOARD_PORT}],
            }
        )
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _child_metadata(job, network_policy_name(meta["name"]), "ray-network-policy"),
        "spec": {"podSelector": own, "policyTypes": ["Ingress"], "ingress": ingress},
    }


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
    # the scratch volume's size limit, requested so the scheduler picks a node with the disk
    worker_requests["ephemeral-storage"] = res["scratchPerWorker"]
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
            "submitterPodTemplate": _submitter_template(job, settings),
            "rayClusterSpec": {
                "rayVersion": settings.ray_version,
                # Ray's token authentication (Ray >= 2.52): the dashboard, job API and
                # GCS refuse callers without the job's token.
                "authOptions": {"mode": "token", "secretName": ray_token_name(meta["name"])},
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
                            scratch=res["scratchPerWorker"],
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


def job_guards(job: Body, settings: Settings, token: str) -> list[Body]:
    """What closes the job's Ray cluster: its token Secret (`token` is used only
    when the Secret does not exist yet) and, when enabled, its NetworkPolicy."""
    policy = spec_to_network_policy(job, settings)
    return [spec_to_ray_token_secret(job, token)] + ([policy] if policy else [])
