"""spec.model.fromJob and spec.method.distill.teacher.fromJob: the FineTuneJob
named → where its outputs are, or why this job cannot start from it yet. Pure;
the reconciler reads the job named."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from kubetune_api.storage import job_prefix

from .names import Body
from .states import Phase, Reason


@dataclass(frozen=True)
class Reference:
    """A spec field naming another FineTuneJob whose outputs this job needs."""

    path: tuple[str, ...]  # under spec
    field: str  # as messages name it
    status_key: str  # where the resolved job is kept (status.<key>)
    use: str  # what this job does with it ("continue from")


MODEL_FROM_JOB = Reference(("model", "fromJob"), "spec.model.fromJob", "parent", "continue from")
TEACHER_FROM_JOB = Reference(
    ("method", "distill", "teacher", "fromJob"),
    "spec.method.distill.teacher.fromJob",
    "teacher",
    "learn from",
)
_ROLE = {"parent": "parent", "teacher": "teacher"}
REFERENCES = (MODEL_FROM_JOB, TEACHER_FROM_JOB)


def named(job: Body, ref: Reference) -> Optional[str]:
    node = job.get("spec") or {}
    for key in ref.path:
        node = node.get(key) if isinstance(node, dict) else None
    return node if isinstance(node, str) and node else None


def from_job(job: Body) -> Optional[str]:
    return named(job, MODEL_FROM_JOB)


def whole_model(job: Body) -> bool:
    """The job saves a whole model (full fine-tuning, or its adapter merged)."""
    spec = job.get("spec") or {}
    if ((spec.get("method") or {}).get("type") or "lora") == "full":
        return True
    return bool((spec.get("output") or {}).get("mergeAdapter"))


def classifier(job: Body) -> bool:
    """The job trains a classification head (method.task classification)."""
    return ((job.get("spec") or {}).get("method") or {}).get("task") == "classification"


def unresolved(job: Body) -> list[Reference]:
    """The references the job names that status does not hold yet."""
    status = job.get("status") or {}
    return [r for r in REFERENCES if named(job, r) and not status.get(r.status_key)]


def resolve_parent(
    job: Body,
    parent: Optional[Body],
    default_output_uri: Optional[str],
    ref: Reference = MODEL_FROM_JOB,
) -> tuple[Optional[dict], Optional[tuple[Phase, Reason, str]]]:
    """(status.<ref.status_key>, None) once the job named has Succeeded; else (None,
    (phase, reason, message)): Pending while it may still succeed, Failed when it
    cannot."""
    name, ns = named(job, ref), job["metadata"]["namespace"]
    field = ref.field
    if name == job["metadata"]["name"]:
        return None, (
            Phase.Failed,
            Reason.ParentFailed,
            f"{field} names this job itself: name another FineTuneJob",
        )
    if parent is None:
        return None, (
            Phase.Pending,
            Reason.ParentNotFound,
            f"waiting for FineTuneJob {name} ({field}): there is none in namespace "
            f"{ns} (hint: create it, or fix fromJob by creating a new job)",
        )
    if classifier(parent):  # a job that names a parent generates (rule classification-*)
        return None, (
            Phase.Failed,
            Reason.ParentFailed,
            f"FineTuneJob {name} ({field}) trains a classification head (method.task "
            f"classification), and a job that generates text cannot {ref.use} it: name a "
            "job with method.task generation",
        )
    if ref is TEACHER_FROM_JOB and not whole_model(parent):
        return None, (
            Phase.Failed,
            Reason.ParentFailed,
            f"FineTuneJob {name} ({field}) saves an adapter only, and a teacher is a whole "
            "model: name a job with method.type full or output.mergeAdapter: true",
        )
    phase = (parent.get("status") or {}).get("phase")
    if phase == Phase.Failed.value:
        return None, (
            Phase.Failed,
            Reason.ParentFailed,
            f"FineTuneJob {name} ({field}) Failed, so there is nothing to {ref.use}: "
            f"create a new job from another {_ROLE[ref.status_key]}",
        )
    if phase != Phase.Succeeded.value:
        return None, (
            Phase.Pending,
            Reason.ParentNotSucceeded,
            f"waiting for FineTuneJob {name} ({field}) to succeed; it is {phase or 'not started'}",
        )
    output = ((parent.get("spec") or {}).get("output") or {}).get("uri") or default_output_uri
    if not output:
        return None, (
            Phase.Failed,
            Reason.ParentFailed,
            f"FineTuneJob {name} ({field}) has no output URI to read",
        )
    meta = parent["metadata"]
    return {
        "name": name,
        "uid": meta["uid"],
        "uri": job_prefix(output, ns, name, meta["uid"]),
    }, None
