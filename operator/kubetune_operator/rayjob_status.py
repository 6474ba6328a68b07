"""RayJob status → what it means: the job's state, KubeRay's account of pods
Kubernetes refused, and the names and URLs KubeRay reports."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from .names import KUEUE_QUEUE_LABEL, Body
from .states import RayJobState, Reason


def rayjob_state(job: Body, rayjob: Optional[Body]) -> RayJobState:
    if rayjob is None:
        return RayJobState.NONE
    st = rayjob.get("status") or {}
    deploy = st.get("jobDeploymentStatus") or ""
    ray = st.get("jobStatus") or ""
    if deploy == "ValidationFailed":
        return RayJobState.INVALID
    if deploy == "Complete" or ray in ("SUCCEEDED", "FAILED", "STOPPED"):
        if ray == "SUCCEEDED":
            return RayJobState.SUCCEEDED
        if ray in ("FAILED", "STOPPED") or deploy == "Complete":
            return RayJobState.FAILED
    if deploy == "Failed":
        return RayJobState.FAILED
    if deploy in ("Suspending", "Suspended") or rayjob.get("spec", {}).get("suspend"):
        if job["spec"].get("suspend"):
            return RayJobState.SUSPENDED
        # Only Kueue holds a RayJob suspended on its own; without a queue label
        # a suspended RayJob is one the operator is resuming right now.
        if KUEUE_QUEUE_LABEL in (job["metadata"].get("labels") or {}):
            return RayJobState.QUEUED
        return RayJobState.STARTING
    if deploy == "Running" and ray == "RUNNING":
        return RayJobState.RUNNING
    return RayJobState.STARTING


@dataclass(frozen=True)
class PodTrouble:
    """Why KubeRay cannot get the Ray pods running, as the job's status shows it."""

    reason: Reason
    message: str
    terminal: bool  # True: it cannot heal without deleting and re-creating the job


RECREATE = (
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
        # KubeRay's message opens with its own reason word, already named here.
        if cond.get("reason") and why.startswith(cond["reason"] + " "):
            why = why[len(cond["reason"]) + 1 :]
        if ctype == "ReplicaFailure" and status == "True":
            which = "head" if "head" in (cond.get("reason") or "").lower() else "worker"
            lowered = why.lower()
            if "exceeded quota" in lowered:
                return PodTrouble(
                    Reason.PodQuotaExceeded,
                    f"Kubernetes refused the Ray {which} Pod: {why} (hint: the job starts "
                    "once the namespace's ResourceQuota has room; free quota or ask for more)",
                    False,
                )
            if "priorityclass" in lowered:
                return PodTrouble(
                    Reason.PriorityClassNotFound,
                    f"Kubernetes refused the Ray {which} Pod: {why} (hint: "
                    "spec.resources.priorityClassName must name an existing PriorityClass "
                    f"(kubectl get priorityclass); {RECREATE})",
                    True,
                )
            return PodTrouble(
                Reason.PodCreationFailed,
                f"Kubernetes refused the Ray {which} Pod: {why} (hint: {RECREATE})",
                True,
            )
        if ctype == "HeadPodReady" and status == "False":
            reason = cond.get("reason") or ""
            if reason in _IMAGE_FATAL:
                return PodTrouble(
                    Reason.InvalidImage,
                    f"the Ray head cannot start: {why} (hint: check "
                    f"spec.resources.image; {RECREATE})",
                    True,
                )
            if reason in _IMAGE_WAIT:
                return PodTrouble(
                    Reason.ImagePullBackOff,
                    f"the Ray head's image cannot be pulled yet: {why} (hint: check that "
                    "the image exists and the nodes can reach its registry)",
                    False,
                )
            if reason == "CreateContainerConfigError":
                return PodTrouble(
                    Reason.PodConfigError,
                    f"the Ray head cannot start: {why} (hint: create the Secret or "
                    "ConfigMap it names in this namespace)",
                    False,
                )
    return None


def trainer_may_have_written(job: Body, rayjob: Optional[Body], attempts: int) -> bool:
    """Whether reading the storage prefix can show anything: once the Ray job runs
    or has run, or on a retry (earlier attempts wrote there)."""
    done_or_running = (RayJobState.RUNNING, RayJobState.SUCCEEDED, RayJobState.FAILED)
    return attempts > 1 or rayjob_state(job, rayjob) in done_or_running


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
