"""`kubetune validate`'s look at what this machine can see: local model folders
and data files of a job (kubetune_trainer.preflight's checks that need no
tokenizer). Without the trainer package there is nothing to add."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def local_findings(doc: Any, file: str) -> tuple[list[dict], list[str]]:
    """(errors as FieldError dicts, warnings) for one valid document of `file`."""
    try:
        from kubetune_trainer.preflight import validate_findings
    except ImportError:
        return [], []
    job_dir = None if file == "-" else Path(file).resolve().parent
    report = validate_findings(doc, Path.cwd(), job_dir)
    return [e.to_dict() for e in report.errors], report.warnings
