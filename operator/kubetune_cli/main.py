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
from kubetune_api.validation import FieldError, validate_document


def _load_documents(path: Path) -> tuple[list[Any], Optional[FieldError]]:
    try:
        text = path.read_text() if str(path) != "-" else sys.stdin.read()
    except OSError as exc:
        return [], FieldError("(file)", f"cannot read: {exc.strerror}", "check the path")
    try:
        return [d for d in yaml.safe_load_all(text) if d is not None], None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"
        problem = getattr(exc, "problem", None) or str(exc)
        return [], FieldError(f"(yaml {where})", problem, "fix the YAML syntax")


def cmd_validate(args: argparse.Namespace) -> int:
    reports = []
    for name in args.files:
        docs, load_error = _load_documents(Path(name))
        if load_error:
            reports.append(
                {
                    "file": name,
                    "document": 0,
                    "name": None,
                    "valid": False,
                    "errors": [load_error.to_dict()],
                    "warnings": [],
                }
            )
            continue
        if not docs:
            reports.append(
                {
                    "file": name,
                    "document": 0,
                    "name": None,
                    "valid": False,
                    "errors": [
                        FieldError(
                            "(file)", "holds no YAML document", "add a FineTuneJob"
                        ).to_dict()
                    ],
                    "warnings": [],
                }
            )
        for index, doc in enumerate(docs, start=1):
            result = validate_document(doc)
            meta = doc.get("metadata") if isinstance(doc, dict) else None
            reports.append(
                {
                    "file": name,
                    "document": index,
                    "name": meta.get("name") if isinstance(meta, dict) else None,
                    "valid": result.ok,
                    "errors": [e.to_dict() for e in result.errors],
                    "warnings": result.warnings,
                }
            )
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
        total = sum(len(r["errors"]) for r in reports)
        print(f"{len(reports) - len(failed)} valid, {len(failed)} invalid, {total} error(s)")
    return 1 if failed else 0


def cmd_crd(args: argparse.Namespace) -> int:
    from kubetune_api.crd import crd_yaml, write_crd

    if args.write:
        print(f"wrote {write_crd(Path(args.write))}")
    else:
        sys.stdout.write(crd_yaml())
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    try:
        from kubetune_trainer.local import run_local
    except ImportError as exc:
        print(
            f"kubetune run needs the trainer extra ({exc.name} is missing): "
            "pip install 'kubetune[trainer]' or run scripts/setup.sh",
            file=sys.stderr,
        )
        return 2
    return run_local(args)


def cmd_operator(args: argparse.Namespace) -> int:
    try:
        from kubetune_operator.cli import run_operator
    except ImportError as exc:
        print(
            f"kubetune operator needs the operator extra ({exc.name} is missing): "
            "pip install 'kubetune[operator]'",
            file=sys.stderr,
        )
        return 2
    return run_operator(args)


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
    p.set_defaults(func=cmd_crd)

    p = sub.add_parser("run", help="run a FineTuneJob on this machine with a local Ray")
    p.add_argument("file", metavar="FILE", help="FineTuneJob YAML")
    p.add_argument(
        "--output",
        metavar="URI",
        help="where results go when spec.output.uri is unset (default ./runs)",
    )
    p.add_argument("--name", help="which FineTuneJob when FILE has several")
    p.add_argument("--no-progress", action="store_true", help="plain log lines, no progress bar")
    p.set_defaults(func=cmd_run)

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
    p.set_defaults(func=cmd_operator)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
