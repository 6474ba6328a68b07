"""Start the test servers by hand, for debugging (see docs/testing.md).

    python -m tests.harness up [--no-kuberay] [--no-s3] [--exit]
    python -m tests.harness up --node [--images] [--no-kuberay] [--no-s3] [--exit]   (root)
    python -m tests.harness check

``up`` starts the control plane (+ CRDs), the KubeRay operator and the S3
server, prints how to reach them and waits for Ctrl-C; ``--exit`` stops them
right after printing the start times (a warm-start measurement).
``--node`` starts the cluster tier's one-node cluster instead (a control plane
for nodes, containerd, kubelet, kube-proxy, kube-scheduler, CoreDNS) and puts
the host back on exit; ``--images`` also builds and imports kubetune's images.
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
from .cluster import Cluster  # noqa: E402
from .images import project_images  # noqa: E402
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


def cmd_up_node(args: argparse.Namespace) -> int:
    cluster = Cluster()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        cluster.start(with_kuberay=not args.no_kuberay, with_s3=not args.no_s3)
        if args.images:
            cluster.import_images(project_images(("operator", "trainer", "kuberay")))
            if not args.no_kuberay:
                cluster.deploy_kuberay()
        for what, secs in cluster.timings.items():
            print(f"{what}: {secs:.1f}s")
        print(f"run dir {cluster.dir} (logs in {cluster.log_dir})")
        print(f"export KUBECONFIG={cluster.plane.kubeconfig}")
        for name, ref in cluster.images.items():
            print(f"image {name}: {ref}")
        if cluster.s3:
            print(f"S3 endpoint (from pods and host): {cluster.s3.endpoint}")
        sys.stdout.flush()
        if not args.exit:
            print("Ctrl-C stops everything and puts the host back.", flush=True)
            signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        problems = cluster.stop()
        for p in problems:
            print(f"teardown: {p}", file=sys.stderr)
        if args.exit:
            cluster.remove_dir()
    return 1 if problems else 0


def cmd_up(args: argparse.Namespace) -> int:
    if args.node:
        return cmd_up_node(args)
    sess = Session()
    # SIGTERM behaves like Ctrl-C, so the finally below stops everything; and
    # SIGINT is restored (a shell starts background jobs with it ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
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
            print(
                f"export AWS_ENDPOINT_URL={s3.endpoint} AWS_ACCESS_KEY_ID={s3.access_key} "
                f"AWS_SECRET_ACCESS_KEY={s3.secret_key} AWS_DEFAULT_REGION={s3.region}"
            )
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
    up.add_argument("--node", action="store_true", help="a one-node cluster with real pods (root)")
    up.add_argument("--images", action="store_true", help="with --node: import kubetune's images")
    up.add_argument(
        "--exit", action="store_true", help="stop right after start (measures start time)"
    )
    sub.add_parser("check", help="which binaries are found")
    args = p.parse_args(argv)
    return cmd_check() if args.cmd == "check" else cmd_up(args)


if __name__ == "__main__":
    sys.exit(main())
