"""spec → trainer config: what the trainer reads, rendered from a FineTuneJob.

The operator puts it in a ConfigMap; `kubetune run` writes it to a local file.
It holds the resolved spec and where to write, never a credential: secrets
reach the trainer only as environment variables (see storage.credential_env).
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from . import models
from .models import FineTuneJobSpec, _Model
from .storage import job_prefix
from .validation import FieldError, SpecError, resolve_spec

TRAINER_CONFIG_KIND = "TrainerConfig"

# The environment of every Ray process that runs a job: the operator puts it in
# each Ray pod, the trainer's driver in the local Ray it starts.
# - Ray Train's preemption watcher off: it is one more actor process per run
#   (~4 CPU-seconds to start) that only logs node drains and hands them to
#   `ray.train.get_preemption_info()`, which kubetune does not read: a pod told
#   to stop saves through its preStop hook (kubetune_trainer.stop).
RAY_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


class JobRef(_Model):
    name: str
    namespace: str
    uid: str


class ParentSource(_Model):
    """Where a continued job starts from: fromJob resolved by the operator (or by
    `kubetune run` under its output folder) to the parent's storage prefix, or
    fromCheckpoint as written."""

    job: Optional[JobRef] = Field(None, description="The parent FineTuneJob (fromJob).")
    uri: str = Field(description="The parent's storage prefix, or the checkpoint URI.")


class TrainerConfig(_Model):
    api_version: Literal["kubetune.io/v1alpha1"] = models.API_VERSION
    kind: Literal["TrainerConfig"] = TRAINER_CONFIG_KIND
    job: JobRef
    storage_prefix: str = Field(description="{output.uri}/{namespace}/{name}/{uid}")
    attempt: int = Field(1, ge=1, description="1 + retries so far; the trainer resumes anyway.")
    spec: FineTuneJobSpec = Field(description="The resolved spec (defaults filled in).")
    parent: Optional[ParentSource] = Field(None, description="What this job continues from.")
    teacher: Optional[ParentSource] = Field(
        None, description="method.distill.teacher.fromJob: the teacher job's storage prefix."
    )


def _job_source(field: str, name: str, resolved: Optional[dict], namespace: str) -> ParentSource:
    """The FineTuneJob a fromJob field names, as the operator resolved it (its
    status.parent or status.teacher); unresolved, an error naming the field."""
    if not resolved or not resolved.get("uri"):
        raise SpecError(
            [
                FieldError(
                    field, f"FineTuneJob {name} is not resolved", "wait until it has Succeeded"
                )
            ]
        )
    uid = resolved.get("uid") or "local"
    return ParentSource(job=JobRef(name=name, namespace=namespace, uid=uid), uri=resolved["uri"])


def spec_to_trainer_config(
    job: models.FineTuneJob | dict,
    default_output_uri: Optional[str] = None,
    attempt: int = 1,
    parent: Optional[dict] = None,
    teacher: Optional[dict] = None,
) -> dict:
    """Pure: a FineTuneJob (model or dict) → the trainer config as a plain dict.

    `parent` ({name, uid, uri}): the job that spec.model.fromJob names, resolved
    by the caller (only the caller can look it up); `teacher` likewise for
    method.distill.teacher.fromJob."""
    if isinstance(job, dict):
        job = models.FineTuneJob.model_validate({**job, "status": None})
    spec = resolve_spec(job.spec)
    output_uri = spec.output.uri or default_output_uri
    if not output_uri:
        raise SpecError(
            [FieldError("spec.output.uri", "is required here", "set an s3:// or file:// URI")]
        )
    meta = job.metadata
    namespace = meta.namespace or "default"
    uid = meta.uid or "local"
    source = None
    if spec.model.from_job:
        source = _job_source("spec.model.fromJob", spec.model.from_job, parent, namespace)
    elif spec.model.from_checkpoint:
        source = ParentSource(uri=spec.model.from_checkpoint)
    teacher_source = None
    distill = spec.method.distill
    named = distill.teacher.from_job if distill and distill.teacher else None
    if named and spec.method.objective == "distill":
        field = "spec.method.distill.teacher.fromJob"
        teacher_source = _job_source(field, named, teacher, namespace)
    config = TrainerConfig(
        job=JobRef(name=meta.name, namespace=namespace, uid=uid),
        storage_prefix=job_prefix(output_uri, namespace, meta.name, uid),
        attempt=attempt,
        spec=spec,
        parent=source,
        teacher=teacher_source,
    )
    return config.to_dict()


def load_trainer_config(data: dict) -> TrainerConfig:
    return TrainerConfig.model_validate(data)
