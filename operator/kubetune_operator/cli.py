"""`kubetune operator`: run the kopf operator with kubetune's settings."""

from __future__ import annotations

import argparse
import logging
import os


def run_operator(args: argparse.Namespace) -> int:
    import kopf

    from . import handlers  # noqa: F401  (registers the handlers)

    namespaces = list(getattr(args, "namespace", None) or [])
    level = os.environ.get("KUBETUNE_LOG_LEVEL", "INFO").upper()  # the chart's logLevel
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise SystemExit(f"KUBETUNE_LOG_LEVEL={level!r}: use DEBUG, INFO, WARNING or ERROR")
    from .endpoints import ENV, Allowlist

    try:  # a bad allowlist stops the operator here, with the entry named
        Allowlist.from_env(os.environ.get(ENV))
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s")
    # kopf's own loggers follow the same level (kopf run's --verbose/--quiet do the same).
    logging.getLogger("kopf").setLevel(level)
    kopf.run(
        standalone=bool(getattr(args, "standalone", False)),
        clusterwide=not namespaces,
        namespaces=namespaces,
        liveness_endpoint=getattr(args, "liveness", None),
    )
    return 0
