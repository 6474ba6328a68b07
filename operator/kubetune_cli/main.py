"""`kubetune` — one command for every way in.

Heavy imports (torch, ray, kopf) happen inside the subcommand that needs
them, so `kubetune validate` stays fast and works with the base install.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

import yaml

from kubetune_api import __name__ as _api  # noqa: F401  (import check: the API is installed)
from kubetune_api import jobfile
from kubetune_api.reference import api_reference_markdown
from kubetune_api.validation import FieldError, short, validate_document
from kubetune_openai import cli as api_command

from . import run as run_command
from .commands import run_registered, validate_checks
from .loader import load_documents


def _read(name: str) -> tuple[Optional[bytes], Optional[FieldError]]:
    try:
        return (sys.stdin.buffer.read() if name == "-" else Path(name).read_bytes()), None
    except OSError as exc:
        reason = exc.strerror or str(exc)
        return None, FieldError("(file)", f"cannot read: {reason}", "check the path")


def _report(name: str, index: int, errors: list[FieldError], warnings: list[str], job=None):
    return {
        "file": name,
        "document": index,
        "name": job,
        "valid": not errors,
        "errors": [e.to_dict() for e in errors],
        "warnings": warnings,
    }


def _validate_one(name: str, index: int, doc: Any, warnings: list[str]) -> dict:
    meta = doc.get("metadata") if isinstance(doc, dict) else None
    job_name = meta.get("name") if isinstance(meta, dict) else None
    shown = short(job_name, 80).strip("'") if isinstance(job_name, str) else None
    try:
        result = validate_document(doc)
    except Exception as exc:  # a bug here must still not print a traceback at a user
        error = FieldError(
            "(document)",
            f"kubetune could not check it: {type(exc).__name__}",
            "please report this with the file",
        )
        return _report(name, index, [error], warnings, shown)
    local_errors, local_warnings, notes = validate_checks(doc, name) if result.ok else ([], [], [])
    errors = result.errors + [FieldError(**e) for e in local_errors]
    report = _report(name, index, errors, warnings + result.warnings + local_warnings, shown)
    if notes:
        report["notes"] = notes  # e.g. dataset.clean's counts
    if not errors and result.job is not None and result.job.spec.sweep is not None:
        from kubetune_api.sweep import describe

        report["sweep"] = describe(result.job.spec)
    return report


def _check_file(name: str, documents: list, reports: list[dict]) -> None:
    """The file as `kubetune run` and the operator take it (kubetune_api.jobfile):
    two documents with one namespace/name, fromJob chains that loop. Each problem
    on the report of the document it names."""
    found = jobfile.plan(documents, file=name)
    for document, error in found.errors:
        if not 1 <= document <= len(reports):
            continue  # a file without FineTuneJobs: its documents say so themselves
        r = reports[document - 1]
        if any(e["path"] == error.path for e in r["errors"]):
            continue  # said already (a job without a name)
        r["errors"].append(error.to_dict())
        r["valid"] = False


def cmd_validate(args: argparse.Namespace) -> int:
    reports = []
    unreadable = False
    for name in args.files:
        data, read_error = _read(name)
        if read_error:
            unreadable = True
            reports.append(_report(name, 0, [read_error], []))
            continue
        loaded = load_documents(data)
        warnings = loaded.warnings
        mine = []
        for index, doc in enumerate(loaded.documents, start=1):
            mine.append(_validate_one(name, index, doc, warnings))
            warnings = []  # said once per file
        _check_file(name, loaded.documents, mine)
        reports += mine
        if loaded.error:
            reports.append(_report(name, len(loaded.documents) + 1, [loaded.error], warnings))
        elif not loaded.documents:
            error = FieldError("(file)", "holds no YAML document", "add a FineTuneJob")
            reports.append(_report(name, 0, [error], warnings))
    failed = [r for r in reports if not r["valid"]]
    if args.output == "json":
        print(json.dumps(reports, indent=2))
    else:
        for r in reports:
            label = f"{r['file']}" + (f" #{r['document']}" if r["document"] else "")
            if r["name"]:
                label += f" (FineTuneJob/{r['name']})"
            if r["valid"]:
                print(f"ok     {label}")
            else:
                print(f"error  {label}: {len(r['errors'])} error(s)")
            for e in r["errors"]:
                print("  " + str(FieldError(**e)))
            for w in r["warnings"]:
                print(f"  warning: {w}")
            for line in r.get("notes", []):
                print(f"  {line}")
            for line in r.get("sweep", []):
                print(f"  {line}")
        total = sum(len(r["errors"]) for r in reports)
        print(f"{len(reports) - len(failed)} valid, {len(failed)} invalid, {total} error(s)")
    if unreadable:
        return 2
    return 1 if failed else 0


CRD_HEADER = (
    "# Generated by `kubetune crd --write crds/` from operator/kubetune_api/models.py.\n"
    "# Do not edit: change the models and regenerate.\n"
)


def crd_yaml() -> str:
    from kubetune_api.crd import build_crd

    return CRD_HEADER + yaml.safe_dump(build_crd(), sort_keys=False, width=100)


API_REFERENCE = "api-reference.md"


def cmd_crd(args: argparse.Namespace) -> int:
    from kubetune_api.crd import CRD_FILENAME

    if args.docs:
        path = Path(args.docs) / API_REFERENCE
        path.write_text(api_reference_markdown())
        print(f"wrote {path}")
    if args.write:
        path = Path(args.write) / CRD_FILENAME
        path.write_text(crd_yaml())
        print(f"wrote {path}")
    elif not args.docs:
        sys.stdout.write(crd_yaml())
    return 0


def cmd_operator(args: argparse.Namespace) -> int:
    return run_registered("operator", args, "operator extra: pip install 'kubetune[operator]'")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubetune",
        description="Fine-tune language models on Kubernetes (FineTuneJob) or on this machine.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check FineTuneJob YAML files (multi-document)")
    p.add_argument("files", nargs="+", metavar="FILE", help="YAML files; - for stdin")
    p.add_argument("-o", "--output", choices=["text", "json"], default="text")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("crd", help="print the FineTuneJob CRD generated from the API models")
    p.add_argument("--write", metavar="DIR", help="write it into DIR (e.g. crds/) instead")
    p.add_argument("--docs", metavar="DIR", help="also write the API reference into DIR")
    p.set_defaults(func=cmd_crd)

    run_command.add_parser(sub)
    api_command.add_parser(sub)

    p = sub.add_parser(
        "operator", help="run the operator (same as `kopf run -m kubetune_operator`)"
    )
    p.add_argument(
        "--namespace",
        "-n",
        action="append",
        default=[],
        help="watch only these namespaces (repeatable); default: all",
    )
    p.add_argument("--standalone", action="store_true", help="no peering with other operators")
    p.add_argument("--liveness", default="http://0.0.0.0:8080/healthz", help="health endpoint URL")
    p.add_argument(
        "--leader-elect",
        action="store_true",
        help="act only while holding a Lease (several replicas: one acts, the others stand by)",
    )
    p.add_argument(
        "--lease-namespace",
        help="namespace of the Lease; default: the pod's own (its ServiceAccount's)",
    )
    p.add_argument(
        "--lease-name", default="kubetune-operator", help="name of the Lease (default: %(default)s)"
    )
    p.set_defaults(func=cmd_operator)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
