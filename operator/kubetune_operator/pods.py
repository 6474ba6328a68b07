"""Ray pods → why they wait: the scheduler's own words for a head or worker pod
it cannot place (PodScheduled=False, reason Unschedulable).

Pure: the pods come in as plain dicts (as the API server sends them), the
answer goes out as a message for the job's PodsScheduled condition. The
operator lists them only while a job is starting (see reconciler.py), with the
selector built here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .names import LABEL_JOB_UID, Body

# The labels KubeRay puts on every pod of a RayCluster.
RAY_CLUSTER_LABEL = "ray.io/cluster"
RAY_NODE_TYPE_LABEL = "ray.io/node-type"  # "head" or "worker"
RAY_GROUP_LABEL = "ray.io/group"  # the worker group's name ("headgroup" for the head)
# Enough to find one waiting pod per group; a job with more pending pods than
# this still shows the first ones' reason, and the list stays one small page.
POD_LIST_LIMIT = 50
# Only pods that wait: a running cluster's pods are never sent.
PENDING_PODS = "status.phase=Pending"
SCHEDULING_HINT = (
    "hint: no node has room for what spec.resources asks (gpusPerWorker, cpuPerWorker, "
    "memoryPerWorker, head) or none matches its nodeSelector and tolerations; the job starts "
    "once a node fits (e.g. the cluster autoscaler adds one), otherwise re-create it asking "
    "for less; startTimeoutSeconds bounds the wait"
)


def ray_pod_selector(job: Body, ray_cluster_name: str) -> str:
    """The label selector of the job's own Ray pods: the RayCluster's (set by
    KubeRay) and the job's uid (set by the operator's pod templates), so a pod
    someone else labels with the cluster's name is never read as the job's."""
    return f"{RAY_CLUSTER_LABEL}={ray_cluster_name},{LABEL_JOB_UID}={job['metadata']['uid']}"


@dataclass(frozen=True)
class Unschedulable:
    """The Ray pods the scheduler cannot place, and its reason for each group."""

    groups: tuple[str, ...]  # e.g. ("head", "worker group workers")
    message: str


def _group(pod: Body) -> str:
    labels = (pod.get("metadata") or {}).get("labels") or {}
    if labels.get(RAY_NODE_TYPE_LABEL) == "head":
        return "head"
    return f"worker group {labels.get(RAY_GROUP_LABEL) or 'unknown'}"


def _one_line(text: str, limit: int = 600) -> str:
    return " ".join(str(text).split())[:limit]


def pods_to_unschedulable(pods: list[Body]) -> Optional[Unschedulable]:
    """The scheduler's reason per pod group (the head first, then worker groups
    by name), from pods it marked PodScheduled=False/Unschedulable; None when
    no pod waits for a node."""
    why: dict[str, str] = {}
    for pod in sorted(pods, key=lambda p: (p.get("metadata") or {}).get("name") or ""):
        status = pod.get("status") or {}
        if status.get("phase", "Pending") != "Pending" or (pod.get("spec") or {}).get("nodeName"):
            continue
        for cond in status.get("conditions") or []:
            if (
                cond.get("type") == "PodScheduled"
                and cond.get("status") == "False"
                and cond.get("reason") == "Unschedulable"
            ):
                why.setdefault(_group(pod), _one_line(cond.get("message") or "Unschedulable"))
    if not why:
        return None
    groups = tuple(sorted(why, key=lambda g: (g != "head", g)))
    parts = "; ".join(f"Ray {g}: {why[g]}" for g in groups)
    return Unschedulable(groups, f"no node can take the job's pods: {parts} ({SCHEDULING_HINT})")
