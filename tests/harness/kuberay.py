"""The real KubeRay operator (ray-operator), run out of cluster with a kubeconfig."""

from __future__ import annotations

import urllib.request
from pathlib import Path

from . import bins
from .procs import LOOPBACK, Server, free_port


def kuberay_crd_files() -> list[Path]:
    return sorted(bins.find("kuberay-crds").glob("*.yaml"))


class KubeRayOperator:
    def __init__(self, kubeconfig: Path, log_dir: Path, extra_args: tuple[str, ...] = ()) -> None:
        self.kubeconfig = Path(kubeconfig)
        self.probe_port = free_port()
        self.metrics_port = free_port()
        self.server = Server(
            "kuberay-operator",
            [
                bins.find("ray-operator"),
                "--enable-leader-election=false",
                f"--health-probe-bind-address={LOOPBACK}:{self.probe_port}",
                f"--metrics-addr={LOOPBACK}:{self.metrics_port}",
                "--log-stdout-encoder=console",
                "--reconcile-concurrency=2",
                *extra_args,
            ],
            log_dir,
            env={"KUBECONFIG": str(self.kubeconfig), "ENABLE_WEBHOOKS": "false"},
        )

    @property
    def log(self) -> Path:
        return self.server.log

    def start(self, timeout: float = 60) -> KubeRayOperator:
        self.server.start()

        def ready() -> bool:
            with urllib.request.urlopen(
                f"http://{LOOPBACK}:{self.probe_port}/readyz", timeout=2
            ) as r:
                return r.status == 200

        self.server.wait_ready(ready, timeout, "ready (/readyz)")
        return self

    def stop(self) -> None:
        self.server.stop()
