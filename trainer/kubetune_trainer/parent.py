"""What a continued job starts from (spec.model.fromJob / fromCheckpoint):
find the parent's adapter or model under the URI the trainer config names,
fetch it like a base model, and check that it was trained on this job's base."""

from __future__ import annotations

import json
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

from kubetune_api import storage as contract

from . import staging
from .model import resolve_model_path
from .storage import filesystem, to_uri

ADAPTER_CONFIG = "adapter_config.json"
MODEL_CONFIG = "config.json"


class ParentError(ValueError):
    """The parent cannot be used; the message names the field and the fix."""


@dataclass
class Parent:
    kind: str  # "adapter" or "model"
    uri: str  # the folder loaded
    local: str  # that folder on this machine
    merge: bool  # merge the adapter into the base before training
    job: Optional[dict] = None
    run_record_uri: Optional[str] = None
    run_record: Optional[dict] = None

    def lineage(self) -> contract.ParentLineage:
        return contract.ParentLineage(
            job=self.job,
            uri=self.uri,
            kind=self.kind,
            merged=self.merge and self.kind == "adapter",
            run_record=self.run_record_uri,
            spec_hash=(self.run_record or {}).get("specHash"),
        )


def _read_json(fs, path: str) -> Optional[dict]:
    try:
        with fs.open(path, "r") as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def read_json_uri(uri: str, access, environ=None) -> Optional[dict]:
    fs, path = filesystem(uri, access, "MODEL", environ)
    return _read_json(fs, path)


def _field(config) -> str:
    return "spec.model.fromJob" if config.parent.job else "spec.model.fromCheckpoint"


def _not_a_classifier(outputs: dict, field: str, uri: str) -> None:
    """A job that generates text cannot start from (or learn from) a classifier: its
    head is a label layer, not the language-model head (method.task classification)."""
    if outputs.get("classification"):
        labels = outputs["classification"].get("labels") or []
        raise ParentError(
            f"{field}: the job at {uri} trained a classification head over {len(labels)} "
            "labels (method.task classification), not a language model: name a job with "
            "method.task generation"
        )


def locate(config, environ=None) -> tuple[str, Optional[str]]:
    """(the folder to load, the parent's run.json URI or None)."""
    src, access = config.parent, config.spec.model
    uri = to_uri(src.uri).rstrip("/")
    fs, path = filesystem(uri, access, "MODEL", environ)
    path = path.rstrip("/")
    field = _field(config)

    def has(rel: str) -> bool:
        return fs.exists(contract.join(path, rel))

    if has(contract.OUTPUTS):  # a finished job's prefix
        out = _read_json(fs, contract.join(path, contract.OUTPUTS)) or {}
        _not_a_classifier(out, field, uri)
        target = out.get("adapter") or out.get("model")
        if out.get("pruned") and out.get("mergedModel"):
            # the adapter fits only the pruned model, which the merged one carries
            target = out["mergedModel"]
        if not target:
            raise ParentError(f"{field}: {uri}/outputs.json names no adapter or model")
        record = contract.join(uri, contract.RUN_RECORD) if has(contract.RUN_RECORD) else None
        return target, record
    step = contract.parse_checkpoint_dir(path)
    if step is not None:
        if not has(contract.MANIFEST):
            raise ParentError(
                f"{field}: checkpoint step {step} at {uri} is not committed (no manifest.json): "
                "use a committed one"
            )
        if not has(f"{contract.ADAPTER}/{ADAPTER_CONFIG}"):
            raise ParentError(
                f"{field}: {uri} is a full fine-tune's checkpoint (DeepSpeed shards only): "
                "continue from the finished job instead (fromJob, or its model/ folder)"
            )
        prefix = uri.rsplit("/", 2)[0]  # {prefix}/checkpoints/step-N
        pfs, ppath = filesystem(prefix, access, "MODEL", environ)
        record = contract.join(prefix, contract.RUN_RECORD)
        found = pfs.exists(contract.join(ppath.rstrip("/"), contract.RUN_RECORD))
        return contract.join(uri, contract.ADAPTER), record if found else None
    if has(ADAPTER_CONFIG) or has(MODEL_CONFIG):
        return uri, None
    if has(contract.PROGRESS):
        raise ParentError(f"{field}: the job at {uri} has not finished (no outputs.json yet)")
    raise ParentError(
        f"{field}: nothing to continue from at {uri}: name a finished job's prefix, a "
        "committed checkpoint folder, or a folder with a peft adapter or a model"
    )


TEACHER_FIELD = "spec.method.distill.teacher.fromJob"


def locate_teacher(config, environ=None) -> Optional[str]:
    """method.distill.teacher.fromJob: the whole model its job saved (the merged
    model, or a full fine-tune's), read with spec.model's access; None without one."""
    src = getattr(config, "teacher", None)
    if src is None:
        return None
    uri = to_uri(src.uri).rstrip("/")
    fs, path = filesystem(uri, config.spec.model, "MODEL", environ)
    name = f"FineTuneJob {src.job.name}" if src.job else uri
    out = _read_json(fs, contract.join(path.rstrip("/"), contract.OUTPUTS))
    if out is None:
        raise ParentError(
            f"{TEACHER_FIELD}: {name} has not finished at {uri} (no outputs.json): run it first"
        )
    _not_a_classifier(out, TEACHER_FIELD, uri)
    target = out.get("mergedModel") or out.get("model")
    if not target:
        raise ParentError(
            f"{TEACHER_FIELD}: {name} saved an adapter only ({uri}/outputs.json), and a "
            "teacher is a whole model: run it with output.mergeAdapter: true or method.type full"
        )
    return target


def resolve(config, environ=None) -> Optional[Parent]:
    """The parent, fetched into the local cache (None when the job has none)."""
    if config.parent is None:
        return None
    staged = staging.parent_location(environ)  # the driver located it on the job's stage
    if staged is not None:
        target, record_uri = staged["target"], staged["record"]
    else:
        target, record_uri = locate(config, environ)
    m = config.spec.model
    source = SimpleNamespace(
        name=None, uri=target, endpoint=m.endpoint, region=m.region, secret_ref=m.secret_ref
    )
    local = resolve_model_path(source, environ)
    fs, path = filesystem(to_uri(local), None, "MODEL", environ)
    if fs.exists(contract.join(path, ADAPTER_CONFIG)):
        kind = "adapter"
    elif fs.exists(contract.join(path, MODEL_CONFIG)):
        kind = "model"
    else:
        raise ParentError(f"{_field(config)}: {target} holds neither a peft adapter nor a model")
    record = staged["runRecord"] if staged is not None else None
    if record_uri and staged is None:
        record = read_json_uri(record_uri, m, environ)
    merge = kind == "adapter" and (m.merge_parent or config.spec.method.type == "full")
    job = config.parent.job.to_dict() if config.parent.job else None
    return Parent(kind, target, local, merge, job, record_uri, record)


def check_base(parent: Parent, base) -> None:
    """An adapter applies only to the base it was trained on: refuse another one
    (same shapes would load silently and produce a wrong model)."""
    if parent is None or parent.kind != "adapter" or not parent.run_record:
        return
    theirs = parent.run_record.get("baseModel") or {}
    if theirs.get("prune"):
        raise ParentError(
            f"spec.model: the parent's adapter {parent.uri} was trained on a pruned model "
            "(its spec.model.prune) and fits no other: continue from the parent's merged "
            "model instead (model.fromJob does; or model.fromCheckpoint: its merged/ folder)"
        )
    ours = base.to_dict()
    keys = ("name", "revision") if ours.get("name") else ("sha256",)
    if any(theirs.get(k) != ours.get(k) for k in keys):
        was = theirs.get("name") or theirs.get("uri") or "another model"
        now = ours.get("name") or ours.get("uri")
        raise ParentError(
            f"spec.model: the parent's adapter was trained on {was} "
            f"({', '.join(f'{k} {theirs.get(k)}' for k in keys)}), this job names {now}: set "
            "spec.model.name or uri to the parent's base model"
        )
