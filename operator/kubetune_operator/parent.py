"""spec.model.fromJob: the parent FineTuneJob → where its outputs are, or why
this job cannot start from it yet. Pure; the reconciler reads the parent."""

from __future__ import annotations

from typing import Optional

from kubetune_api.storage import job_prefix

from .names import Body
from .states import Phase, Reason


def from_job(job: Body) -> Optional[str]:
    return ((job.get("spec") or {}).get("model") or {}).get("fromJob")


def resolve_parent(
    job: Body, parent: Optional[Body], default_output_uri: Optional[str]
) -> tuple[Optional[dict], Optional[tuple[Phase, Reason, str]]]:
    """(status.parent, None) once the parent has Succeeded; else (None, (phase,
    reason, message)): Pending while it may still succeed, Failed when it cannot."""
    name, ns = from_job(job), job["metadata"]["namespace"]
    if name == job["metadata"]["name"]:
        return None, (
            Phase.Failed,
            Reason.ParentFailed,
            "spec.model.fromJob names this job itself: name another FineTuneJob",
        )
    if parent is None:
        return None, (
            Phase.Pending,
            Reason.ParentNotFound,
            f"waiting for FineTuneJob {name} (spec.model.fromJob): there is none in namespace "
            f"{ns} (hint: create it, or fix fromJob by creating a new job)",
        )
    phase = (parent.get("status") or {}).get("phase")
    if phase == Phase.Failed.value:
        return None, (
            Phase.Failed,
            Reason.ParentFailed,
            f"FineTuneJob {name} (spec.model.fromJob) Failed, so there is nothing to continue "
            "from: create a new job from another parent",
        )
    if phase != Phase.Succeeded.value:
        return None, (
            Phase.Pending,
            Reason.ParentNotSucceeded,
            f"waiting for FineTuneJob {name} (spec.model.fromJob) to succeed; it is "
            f"{phase or 'not started'}",
        )
    output = ((parent.get("spec") or {}).get("output") or {}).get("uri") or default_output_uri
    if not output:
        return None, (
            Phase.Failed,
            Reason.ParentFailed,
            f"FineTuneJob {name} (spec.model.fromJob) has no output URI to read",
        )
    meta = parent["metadata"]
    return {
        "name": name,
        "uid": meta["uid"],
        "uri": job_prefix(output, ns, name, meta["uid"]),
    }, None
