"""The CLI's way to the trainer and the operator: entry points, never imports.

A command whose work lives in another package is registered in pyproject.toml
under `[project.entry-points."kubetune.commands"]` as `name = "module:function"`,
the function taking the parsed arguments and returning the exit status; the CLI
defines its arguments and loads the function only when the command runs. Checks
that `kubetune validate` adds for what this machine can see are registered the
same way under `kubetune.validate_checks` (function(doc, file) -> (errors as
FieldError dicts, warnings[, notes: findings that are no problem])). An extra
that is not installed is said in one line, with the command that installs it.
"""

from __future__ import annotations

import argparse
import functools
import sys
from importlib.metadata import EntryPoint, entry_points
from typing import Any

COMMANDS = "kubetune.commands"
VALIDATE_CHECKS = "kubetune.validate_checks"


def run_registered(name: str, args: argparse.Namespace, needs: str) -> int:
    """Run the command registered as `name`; `needs` says which extra brings it."""
    found = list(entry_points(group=COMMANDS, name=name))
    if not found:
        print(
            f"kubetune {name}: no command {name!r} is registered under {COMMANDS} "
            "(reinstall kubetune: pip install -e . or scripts/setup.sh)",
            file=sys.stderr,
        )
        return 2
    try:
        command = found[0].load()
    except ImportError as exc:
        print(f"kubetune {name} needs the {needs} ({exc.name} is missing)", file=sys.stderr)
        return 2
    return command(args)


@functools.cache
def _registered_checks() -> list[EntryPoint]:
    """Looked up once a process: entry_points() reads every installed package's
    metadata, which cost more than the checks themselves over many files."""
    return sorted(entry_points(group=VALIDATE_CHECKS), key=lambda e: e.name)


def validate_checks(doc: Any, file: str) -> tuple[list[dict], list[str], list[str]]:
    """Every registered check's findings for one valid document (errors, warnings,
    notes); a check whose package is not installed adds nothing."""
    errors: list[dict] = []
    warnings: list[str] = []
    notes: list[str] = []
    for ep in _registered_checks():
        try:
            check = ep.load()
        except ImportError:
            continue
        found = check(doc, file)
        errors += found[0]
        warnings += found[1]
        notes += found[2] if len(found) > 2 else []
    return errors, warnings, notes
