"""The real KubeRay operator (ray-operator): out of cluster with a kubeconfig
(envtest tier), or as a Pod deployed from KubeRay's own manifests (cluster tier)."""

from __future__ import annotations

import json
import subprocess
import tempfile
import urllib.request
from pathlib import Path

import yaml

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


# --- KubeRay as a Pod (the cluster tier) -------------------------------------

KUBERAY_NAMESPACE = "ray-system"
KUBERAY_MODULE = "github.com/ray-project/kuberay/ray-operator"
# What the harness changes in KubeRay's own manifests (config/rbac + config/manager
# of the pinned module, rendered by `kubectl kustomize`), and why:
#  - namespace ray-system (kustomize's placeholder is `system`);
#  - the image: the ray-operator binary the harness builds, imported into the
#    node (no registry), so imagePullPolicy Never.
# Everything else (RBAC, ServiceAccount, securityContext, args, resources, probes,
# the Service) is KubeRay's.


def kuberay_module_dir() -> Path:
    """The pinned KubeRay module in Go's module cache (build-test-bins.sh fetched it)."""
    version = bins.versions()["KUBERAY_VERSION"]
    proc = subprocess.run(
        ["go", "mod", "download", "-json", f"{KUBERAY_MODULE}@{version}"],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
        cwd=tempfile.gettempdir(),
    )
    if proc.returncode != 0:
        raise RuntimeError(f"go mod download {KUBERAY_MODULE}@{version}: {proc.stderr[-2000:]}")
    return Path(json.loads(proc.stdout)["Dir"])


def kuberay_manifests(kubectl, image: str) -> list[dict]:
    """KubeRay's own RBAC and manager manifests, with the changes listed above.
    `kubectl` is ControlPlane.kubectl (its bundled kustomize renders them)."""
    config = kuberay_module_dir() / "config"
    objs: list[dict] = []
    for part in ("rbac", "manager"):
        out = kubectl("kustomize", str(config / part)).stdout
        objs += [o for o in yaml.safe_load_all(out) if o]
    for o in objs:
        if o["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            o["metadata"]["namespace"] = KUBERAY_NAMESPACE
        for s in o.get("subjects") or []:
            if s.get("kind") == "ServiceAccount":
                s["namespace"] = KUBERAY_NAMESPACE
        if o["kind"] == "Deployment":
            pod = o["spec"]["template"]["spec"]
            [c] = pod["containers"]
            c["image"] = image
            c["imagePullPolicy"] = "Never"
    return objs


def deploy_kuberay(plane, image: str, timeout: float = 180) -> list[dict]:
    """KubeRay's operator as a Deployment in ray-system; returns once it is Available."""
    plane.kubectl("create", "namespace", KUBERAY_NAMESPACE)
    objs = kuberay_manifests(plane.kubectl, image)
    plane.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(objs))
    deploy = next(o for o in objs if o["kind"] == "Deployment")["metadata"]["name"]
    plane.kubectl(
        "wait", "--for=condition=Available", f"deployment/{deploy}", "-n", KUBERAY_NAMESPACE,
        f"--timeout={int(timeout)}s", timeout=timeout + 30,
    )  # fmt: skip
    return objs
