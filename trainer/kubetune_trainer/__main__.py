"""`python -m kubetune_trainer --config FILE|URI`: run one FineTuneJob's training.

On a cluster this is the RayJob's entrypoint on the Ray head (see driver.py).
Started again on the same storage prefix, it resumes from the newest
committed checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys

from .config import StaleConfig, read_config_for_attempt
from .driver import FENCED, ensure_env, run  # noqa: F401  (the entry's names, kept importable)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m kubetune_trainer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="trainer config: a path or fsspec URI")
    p.add_argument(
        "--ray-address",
        default=os.environ.get("RAY_ADDRESS"),
        help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)",
    )
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray")
    args = p.parse_args(argv)
    ensure_env()
    try:
        config = read_config_for_attempt(args.config)
    except StaleConfig as exc:
        print(f"kubetune: {exc}", file=sys.stderr, flush=True)
        return FENCED if exc.older_pod else 1
    init = {"address": args.ray_address} if args.ray_address else {"num_cpus": args.num_cpus}
    return run(config, ray_init=init)


if __name__ == "__main__":
    raise SystemExit(main())
