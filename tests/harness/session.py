"""One test session's servers: started lazily, all stopped together."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from . import bins
from .controlplane import ControlPlane
from .helm import Helm
from .kuberay import KubeRayOperator, kuberay_crd_files
from .procs import CommandError, Server
from .s3 import S3Server


def kubetune_crd_files() -> list[Path]:
    """The project's own CRDs: crds/*.yaml (the examples live in sub-folders)."""
    return sorted((bins.REPO_ROOT / "crds").glob("*.yaml"))


class Session:
    """Owns a run dir (logs, etcd data, certs, S3 data) and the servers in it.

    ``KUBETUNE_RUN_ROOT`` picks the parent of the run dir (default: the
    system temp dir).
    """

    def __init__(self, root: Path | None = None) -> None:
        parent = root or os.environ.get("KUBETUNE_RUN_ROOT") or tempfile.gettempdir()
        Path(parent).mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix="kubetune-envtest-", dir=parent))
        self.log_dir = self.dir / "logs"
        self.log_dir.mkdir()
        self._kube: ControlPlane | None = None
        self._kuberay: KubeRayOperator | None = None
        self._s3: S3Server | None = None
        self._helm: Helm | None = None
        self.timings: dict[str, float] = {}
        self.kubetune_crd_error: str | None = None

    # Each getter starts its part on first use, then returns the same one.
    def kube(self) -> ControlPlane:
        if self._kube is None:
            t0 = time.monotonic()
            cp = ControlPlane(self.dir / "kube", self.log_dir)
            self._kube = cp
            cp.start()
            cp.apply_crds(kuberay_crd_files())
            # The project's own CRD is what the envtest tests check: a CRD the
            # server rejects fails those tests (kubetune_crd fixture), not the
            # whole control plane.
            try:
                cp.apply_crds(kubetune_crd_files())
            except CommandError as exc:
                self.kubetune_crd_error = (exc.stderr or str(exc)).strip()
            self.timings["control plane (etcd+apiserver+kcm+CRDs)"] = time.monotonic() - t0
        return self._kube

    def kuberay(self) -> KubeRayOperator:
        if self._kuberay is None:
            kube = self.kube()
            t0 = time.monotonic()
            self._kuberay = KubeRayOperator(kube.kubeconfig, self.log_dir)
            self._kuberay.start()
            self.timings["kuberay operator"] = time.monotonic() - t0
        return self._kuberay

    def s3(self) -> S3Server:
        if self._s3 is None:
            t0 = time.monotonic()
            self._s3 = S3Server(self.dir / "s3", self.log_dir)
            self._s3.start()
            self.timings["s3 server (versitygw)"] = time.monotonic() - t0
        return self._s3

    def helm(self) -> Helm:
        if self._helm is None:
            self._helm = Helm(self.kube().kubeconfig, self.dir / "helm")
        return self._helm

    def servers(self) -> list[Server]:
        out: list[Server] = []
        if self._kube:
            out += self._kube.servers
        if self._kuberay:
            out.append(self._kuberay.server)
        if self._s3:
            out.append(self._s3.server)
        return out

    def started(self) -> bool:
        return bool(self.servers())

    def stop(self) -> None:
        # Operator first (it talks to the apiserver), etcd last.
        for part in (self._kuberay, self._s3, self._kube):
            if part is not None:
                part.stop()

    def remove_dir(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
