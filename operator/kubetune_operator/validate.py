"""Validation beyond the CRD schema and CEL, and the status of a job that fails it."""

from __future__ import annotations

from datetime import datetime
from typing import Optional

from kubetune_api.storage import split_uri
from kubetune_api.validation import FieldError, validate_document

from .conditions import set_condition, with_phase
from .names import Body
from .states import Cond, Phase, Reason


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


def spec_error_status(status: dict, errors: list[FieldError], now: datetime, generation) -> dict:
    message = "; ".join(str(e) for e in errors) + (
        ". A FineTuneJob's spec cannot be edited: fix the manifest, then delete and re-create "
        "the job (kubectl delete ftj NAME; kubectl apply -f FILE)"
    )
    # Only the operator's own rules (its endpoint allowlist) have a reason of their own.
    allowlist_only = all(e.rule == Reason.EndpointNotAllowed for e in errors)
    reason = Reason.EndpointNotAllowed if allowlist_only else Reason.InvalidSpec
    out = dict(status)
    out["conditions"] = set_condition(
        list(out.get("conditions") or []),
        Cond.Validated,
        "False",
        reason,
        message,
        now,
        generation,
    )
    out = with_phase(out, Phase.Failed, reason, message, now, generation)
    out["observedGeneration"] = generation
    return out
