"""The run record (run.json): what a job was trained from, hashed so that two
jobs on the same inputs can be seen to match, and what it continued from, so
that a chain of jobs can be walked back."""

from __future__ import annotations

import hashlib
import json
import os
from importlib import metadata
from pathlib import Path
from typing import Optional

from kubetune_api import storage as contract
from kubetune_api.rules import MUTABLE_FIELDS

from . import staging
from .storage import filesystem, now, to_uri

PACKAGES = ("torch", "transformers", "peft", "deepspeed", "ray", "kubetune")
CHUNK = 1 << 20
# Fields that change how a job runs, not what it learns: left out of the spec hash.
UNHASHED_FIELDS = (*MUTABLE_FIELDS, "tracking", "output", "staging")


def spec_hash(spec) -> str:
    data = spec.to_dict()
    for key in UNHASHED_FIELDS:
        data.pop(key, None)
    return _sha(json.dumps(data, sort_keys=True, separators=(",", ":")).encode())


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _hash_file(fs, path: str) -> tuple[str, int]:
    h, size = hashlib.sha256(), 0
    with fs.open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def data_files(source, access, environ=None) -> list[contract.FileHash]:
    """The files a DataSource reads (as data.read_rows picks them), hashed."""
    uri = to_uri(source.uri)
    staged = staging.local(source.uri, environ)  # the same bytes, already on the stage
    if staged is not None:
        fs, path = filesystem(to_uri(staged), None, "DATASET", environ)
    else:
        fs, path = filesystem(uri, access, "DATASET", environ)
    if fs.isdir(path):
        files = sorted(
            p for p in fs.find(path) if p.lower().endswith((".jsonl", ".json", ".parquet"))
        )
    else:
        files = [path]
    out = []
    for p in files:
        digest, size = _hash_file(fs, p)
        rel = p[len(path.rstrip("/")) + 1 :] if p != path else ""
        out.append(
            contract.FileHash(
                uri=contract.join(uri, rel) if rel else uri, sha256=digest, bytes=size
            )
        )
    return out


def row_counts(report) -> Optional[contract.RowCounts]:
    if report is None:
        return None
    return contract.RowCounts(
        rows=report.rows,
        used=report.usable,
        dropped=report.rows - report.usable,
        truncated=report.truncated,
    )


def dataset_lineage(spec, train_report=None, val_report=None, environ=None) -> contract.DataLineage:
    ds = spec.dataset
    sources = ds.train_sources()
    train = [f for s in sources if s.uri for f in data_files(s, ds, environ)]
    val = data_files(ds.validation, ds, environ) if ds.validation and ds.validation.uri else []
    if ds.validation is not None:
        split = {"validation": "dataset.validation"}
    else:
        split = {"validationSplit": ds.validation_split, "seed": spec.hyperparameters.seed}
    if ds.mixture:  # each source's id, format and weight make the data what it is
        split["mixture"] = [
            {"id": s.id, "format": ds.format_of(s), "weight": s.weight} for s in ds.mixture
        ]
        split["mixtureTemperature"] = ds.mixture_temperature
    names = {
        "train_name": ", ".join(f"{s.name}:{s.split}" for s in sources if s.name) or None,
        "validation_name": (
            f"{ds.validation.name}:{ds.validation.split}"
            if ds.validation and ds.validation.name
            else None
        ),
    }
    # Content only: the same bytes under another path are the same data.
    summary = {
        "train": [f.sha256 for f in train],
        "validation": [f.sha256 for f in val],
        "split": split,
        **names,
    }
    return contract.DataLineage(
        train=train,
        validation=val,
        split=split,
        train_rows=row_counts(train_report),
        validation_rows=row_counts(val_report),
        hash=_sha(json.dumps(summary, sort_keys=True).encode()),
        **names,
    )


def folder_hash(path: str) -> str:
    """sha256 over a local folder's relative file names and contents."""
    root = Path(path)
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file() and not q.name.startswith(".")):
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        with p.open("rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
    return h.hexdigest()


def model_lineage(source, local_path: str) -> contract.ModelLineage:
    prune = getattr(source, "prune", None)
    pruned = {"prune": prune.to_dict()} if prune is not None else {}
    if source.name:
        return contract.ModelLineage(name=source.name, revision=source.revision, **pruned)
    return contract.ModelLineage(uri=source.uri, sha256=folder_hash(local_path), **pruned)


def versions() -> dict[str, str]:
    import platform

    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def image(environ=None) -> str:
    environ = os.environ if environ is None else environ
    return environ.get("KUBETUNE_IMAGE") or "local"


def run_record(
    config,
    model_path: str,
    train_report=None,
    val_report=None,
    parent: Optional[contract.ParentLineage] = None,
    environ=None,
) -> contract.RunRecord:
    spec = config.spec
    return contract.RunRecord(
        job=config.job.to_dict(),
        spec_hash=spec_hash(spec),
        dataset=dataset_lineage(spec, train_report, val_report, environ),
        base_model=model_lineage(spec.model, model_path),
        parent=parent,
        versions=versions(),
        image=image(environ),
        attempt=config.attempt,
        created_at=now(),
    )
