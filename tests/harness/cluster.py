"""A one-node cluster for the cluster tier: a control plane set up for nodes,
the node itself (node.py), the KubeRay operator, an S3 server the pods reach on
the node address, helm, and the project's images imported into containerd.

The KubeRay operator runs as a Pod (kuberay.deploy_kuberay: KubeRay's own
manifests for the pinned version, the image built from the binary the harness
builds), so its calls to the Ray dashboards cross the pod network, as in
production. kubetune's operator and trainer run only in pods.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path

from .controlplane import ControlPlane
from .helm import Helm
from .kuberay import KUBERAY_NAMESPACE, deploy_kuberay, kuberay_crd_files
from .node import ClusterNetwork, Node
from .s3 import S3Server
from .session import kubetune_crd_files

RESTRICTED = "pod-security.kubernetes.io/enforce=restricted"


class Cluster:
    """Starts lazily-by-parts like Session; ``stop()`` tears down in order."""

    def __init__(self, root: Path | None = None, net: ClusterNetwork | None = None) -> None:
        parent = root or os.environ.get("KUBETUNE_RUN_ROOT") or tempfile.gettempdir()
        Path(parent).mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix="kubetune-cluster-", dir=parent))
        self.log_dir = self.dir / "logs"
        self.log_dir.mkdir()
        self.net = net or ClusterNetwork()
        self.plane: ControlPlane | None = None
        self.node: Node | None = None
        self.kuberay: list[dict] | None = None  # KubeRay's objects, once deployed
        self.s3: S3Server | None = None
        self._helm: Helm | None = None
        self.timings: dict[str, float] = {}
        self.images: dict[str, str] = {}

    def start(self, with_kuberay: bool = True, with_s3: bool = True) -> Cluster:
        """Control plane, node and S3; KubeRay's CRDs when `with_kuberay` (its
        operator starts with deploy_kuberay once the images are imported)."""
        t0 = time.monotonic()
        try:
            self.plane = ControlPlane(self.dir / "kube", self.log_dir, network=self.net)
            # The node's address must exist before the API server binds it.
            self.node = Node(self.plane, self.dir / "node", self.log_dir, self.net)
            self.node.check_and_claim()
            self.plane.start()
            crds = kubetune_crd_files() + (kuberay_crd_files() if with_kuberay else [])
            self.plane.apply_crds(crds)
            self.timings["control plane + CRDs"] = time.monotonic() - t0
            self.node.start()
            self.timings["node Ready"] = time.monotonic() - t0
            if with_s3:
                self.s3 = S3Server(self.dir / "s3", self.log_dir, host=self.net.node_ip).start()
            self.timings["cluster up"] = time.monotonic() - t0
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def helm(self) -> Helm:
        if self._helm is None:
            self._helm = Helm(self.plane.kubeconfig, self.dir / "helm")
        return self._helm

    def import_images(self, images: dict[str, tuple[str, Path]]) -> None:
        assert self.node is not None
        for name, (ref, archive) in images.items():
            secs = self.node.import_image(archive, ref)
            self.timings[f"import {name}"] = secs
            self.images[name] = ref

    def restricted_namespace(self, prefix: str) -> str:
        """A fresh namespace whose pods must pass the `restricted` Pod Security Standard."""
        name = prefix + secrets.token_hex(3)
        self.plane.kubectl("create", "namespace", name)
        self.plane.kubectl(
            "label", "namespace", name, "pod-security.kubernetes.io/enforce=restricted"
        )
        return name

    def deploy_kuberay(self) -> None:
        """KubeRay's operator as a Pod in ray-system, from the imported `kuberay` image."""
        t0 = time.monotonic()
        self.kuberay = deploy_kuberay(self.plane, self.images["kuberay"])
        self.timings["KubeRay operator Available"] = time.monotonic() - t0

    def stop(self) -> list[str]:
        """Everything stopped, the host put back; returns what could not be undone."""
        problems: list[str] = []
        if self.node is not None and self.plane is not None:
            # Controllers first, so nothing re-creates the pods being drained.
            self.plane.stop_controllers()
            if self.kuberay is not None and self.node.servers:
                # KubeRay next: it would re-create the Ray pods being drained.
                self.plane.kubectl(
                    "delete", "pods", "--all", "-n", KUBERAY_NAMESPACE, "--grace-period=1",
                    "--timeout=60s", check=False, timeout=90,
                )  # fmt: skip
            if self.node.servers:
                self.node.drain()
            self.node.stop()
        if self.s3 is not None:
            self.s3.stop()
        if self.plane is not None:
            self.plane.stop()
        if self.node is not None:
            problems += self.node.release()
        return problems

    def remove_dir(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
