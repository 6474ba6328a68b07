"""`kubetune operator`: run the kopf operator with kubetune's settings."""

from __future__ import annotations

import argparse
import logging


def run_operator(args: argparse.Namespace) -> int:
    import kopf

    from . import handlers  # noqa: F401  (registers the handlers)

    namespaces = list(getattr(args, "namespace", None) or [])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    kopf.run(
        standalone=bool(getattr(args, "standalone", False)),
        clusterwide=not namespaces,
        namespaces=namespaces,
        liveness_endpoint=getattr(args, "liveness", None),
    )
    return 0
