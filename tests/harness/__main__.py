"""Start the test servers by hand, for debugging (see docs/testing.md).

    python -m tests.harness up [--no-kuberay] [--no-s3] [--exit]
    python -m tests.harness check

``up`` starts the control plane (+ CRDs), the KubeRay operator and the S3
server, prints how to reach them and waits for Ctrl-C; ``--exit`` stops them
right after printing the start times (a warm-start measurement).
``check`` lists which binaries are found and where.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python tests/harness ...`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "harness"

from . import bins  # noqa: E402
from .session import Session  # noqa: E402


def cmd_check() -> int:
    missing = 0
    for name in bins.PARTS:
        try:
            print(f"{name:26} {bins.find(name)}")
        except bins.MissingBinary:
            missing += 1
            print(f"{name:26} MISSING (build: {bins.BUILD_COMMAND} {bins.PARTS[name]})")
    print("versions:", " ".join(f"{k}={v}" for k, v in bins.versions().items()))
    return 1 if missing else 0


def cmd_up(args: argparse.Namespace) -> int:
    sess = Session()
    # SIGTERM behaves like Ctrl-C, so the finally below stops everything.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    t0 = time.monotonic()
    try:
        kube = sess.kube()
        if not args.no_kuberay:
            sess.kuberay()
        s3 = None if args.no_s3 else sess.s3()
        total = time.monotonic() - t0
        for what, secs in sess.timings.items():
            print(f"started {what} in {secs:.1f}s")
        print(f"all up in {total:.1f}s; run dir {sess.dir} (logs in {sess.log_dir})")
        print(f"export KUBECONFIG={kube.kubeconfig}")
        if s3:
            print(f"export AWS_ENDPOINT_URL={s3.endpoint} AWS_ACCESS_KEY_ID={s3.access_key} "
                  f"AWS_SECRET_ACCESS_KEY={s3.secret_key} AWS_DEFAULT_REGION={s3.region}")
        sys.stdout.flush()
        if not args.exit:
            print("Ctrl-C stops everything.", flush=True)
            signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        sess.stop()
        if args.exit:
            sess.remove_dir()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.harness")
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start the servers and wait for Ctrl-C")
    up.add_argument("--no-kuberay", action="store_true")
    up.add_argument("--no-s3", action="store_true")
    up.add_argument("--exit", action="store_true", help="stop right after start (measures start time)")
    sub.add_parser("check", help="which binaries are found")
    args = p.parse_args(argv)
    return cmd_check() if args.cmd == "check" else cmd_up(args)


if __name__ == "__main__":
    sys.exit(main())
