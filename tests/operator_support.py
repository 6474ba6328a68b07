"""Helpers for the operator's envtest and e2e tiers: run the real operator as a
process (`kubetune operator`, so it can be killed like a pod), make jobs, and
play KubeRay's part by patching RayJob status."""

from __future__ import annotations

import json
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from harness import free_port, wait_until

ROOT = Path(__file__).resolve().parents[1]
KUBETUNE = Path(sys.executable).parent / "kubetune"
TRAINER_IMAGE = "example.com/kubetune-trainer:envtest"  # never pulled: there is no kubelet


class OperatorProcess:
    """`kubetune operator --standalone -n NS` against the test control plane."""

    def __init__(
        self,
        kube,
        namespaces: list[str],
        log_dir: Path,
        extra_env: dict | None = None,
        via_kopf: bool = False,
        lease_namespace: str | None = None,
        lease_name: str | None = None,
    ):
        self.via_kopf = via_kopf  # `kopf run -m kubetune_operator` instead of `kubetune operator`
        # `--leader-elect` with the Lease in this namespace: one of several replicas.
        self.lease_namespace = lease_namespace
        self.lease_name = lease_name
        self.kube = kube
        self.namespaces = namespaces
        self.log_path = log_dir / f"operator-{'-'.join(namespaces)[:60]}.log"
        self.extra_env = extra_env or {}
        self.proc: subprocess.Popen | None = None
        self.health_port = 0
        self.metrics_port = 0
        self.starts = 0

    def start(self, wait: bool = True) -> OperatorProcess:
        self.health_port, self.metrics_port = free_port(), free_port()
        env = (
            os.environ
            | {
                "KUBECONFIG": str(self.kube.kubeconfig),
                "KUBETUNE_POLL_SECONDS": "1",
                "KUBETUNE_IDLE_SECONDS": "2",
                "KUBETUNE_BACKOFF_MAX_SECONDS": "4",
                "KUBETUNE_WATCH_SERVER_TIMEOUT": "10",
                "KUBETUNE_TRAINER_IMAGE": TRAINER_IMAGE,
                "KUBETUNE_METRICS_PORT": str(self.metrics_port),
            }
            | self.extra_env
        )
        args = [str(KUBETUNE), "operator"]
        if self.via_kopf:
            args = [str(KUBETUNE.parent / "kopf"), "run", "-m", "kubetune_operator"]
            args += [] if self.namespaces else ["--all-namespaces"]
        args += ["--standalone", f"--liveness=http://127.0.0.1:{self.health_port}/healthz"]
        for ns in self.namespaces:
            args += ["--namespace", ns]
        if self.lease_namespace:
            args += ["--leader-elect", "--lease-namespace", self.lease_namespace]
            args += ["--lease-name", self.lease_name] if self.lease_name else []
        self.starts += 1
        log = open(self.log_path, "a")  # noqa: SIM115 - the child owns it
        log.write(f"\n===== start {self.starts}\n")
        log.flush()
        self.proc = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        if wait:
            wait_until(self.healthy, 60, what="the operator's liveness endpoint")
        return self

    def healthy(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"operator exited: {self.log_tail()}")
        return http_get(f"http://127.0.0.1:{self.health_port}/healthz")[0] == 200

    def metrics(self) -> str:
        return http_get(f"http://127.0.0.1:{self.metrics_port}/metrics")[1]

    def status_writes(self) -> tuple[float, float, float] | None:
        """(reconciles, status writes, reconciles that wrote more than once) so
        far, from kubetune_status_writes_per_reconcile; None when the operator
        does not answer."""
        text = self.metrics()
        if not text:
            return None

        def sample(name: str) -> float:
            found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
            return float(found.group(1)) if found else 0.0

        metric = "kubetune_status_writes_per_reconcile"
        reconciles = sample(f"{metric}_count")
        at_most_one = sample(metric + '_bucket{le="1.0"}')
        return reconciles, sample(f"{metric}_sum"), reconciles - at_most_one

    def kill(self) -> None:
        """SIGKILL, like an OOM kill or a node loss: no cleanup runs."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-n:])
        except OSError:
            return "(no log)"


def _die_with_parent() -> None:
    """Linux: SIGKILL the operator if the test process dies without cleaning up."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status, r.read().decode()
    except OSError:
        return 0, ""


def finetunejob(name: str, s3=None, **spec_overrides) -> dict:
    spec: dict = {
        "model": {"name": "HuggingFaceTB/SmolLM2-135M-Instruct"},
        "dataset": {"train": {"uri": "s3://data/train.jsonl"}, "format": "chat"},
        "hyperparameters": {"maxSteps": 20},
        "resources": {
            "workers": 2,
            "gpusPerWorker": 1,
            "cpuPerWorker": "4",
            "memoryPerWorker": "16Gi",
        },
        "backoffLimit": 1,
    }
    if s3 is not None:
        access = {"endpoint": s3.endpoint, "region": s3.region, "secretRef": {"name": "s3-creds"}}
        spec["output"] = {"uri": f"s3://{s3.bucket}/runs"} | access
        spec["dataset"] |= access
    else:
        spec["output"] = {"uri": "s3://nowhere/runs"}
    for key, value in spec_overrides.items():
        spec[key] = value
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": spec,
    }


def s3_secret(kube, namespace: str, s3, name: str = "s3-creds") -> None:
    kube.kubectl(
        "create",
        "secret",
        "generic",
        name,
        "-n",
        namespace,
        f"--from-literal=AWS_ACCESS_KEY_ID={s3.access_key}",
        f"--from-literal=AWS_SECRET_ACCESS_KEY={s3.secret_key}",
    )


def apply(kube, namespace: str, obj: dict) -> None:
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(obj))


def get(kube, kind: str, name: str, namespace: str) -> dict | None:
    out = kube.kubectl("get", kind, name, "-n", namespace, "-o", "json", check=False)
    return json.loads(out.stdout) if out.returncode == 0 else None


def names(kube, kind: str, namespace: str, selector: str | None = None) -> list[str]:
    args = ["get", kind, "-n", namespace, "-o", "jsonpath={.items[*].metadata.name}"]
    if selector:
        args += ["-l", selector]
    return kube.kubectl(*args).stdout.split()


def status(kube, name: str, namespace: str) -> dict:
    return (get(kube, "finetunejob", name, namespace) or {}).get("status") or {}


def wait_status(kube, name: str, namespace: str, pred, timeout: float = 60, what: str = ""):
    last: dict = {}

    def check():
        nonlocal last
        last = status(kube, name, namespace)
        return last if pred(last) else None

    try:
        return wait_until(check, timeout, what=what or f"status of {name}")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}; last status: {json.dumps(last, indent=1)}") from None


def wait_phase(kube, name: str, namespace: str, phase: str, timeout: float = 60) -> dict:
    return wait_status(
        kube,
        name,
        namespace,
        lambda s: s.get("phase") == phase,
        timeout,
        f"{name} to reach phase {phase}",
    )


def condition(st: dict, type_: str) -> dict | None:
    return next((c for c in st.get("conditions") or [] if c["type"] == type_), None)


def patch_rayjob_status(kube, name: str, namespace: str, **status) -> None:
    """What KubeRay writes (status subresource) as a Ray job moves along."""
    kube.kubectl(
        "patch",
        "rayjob",
        name,
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": status}),
    )


def rayjob_running(kube, name: str, namespace: str) -> None:
    patch_rayjob_status(
        kube,
        name,
        namespace,
        jobDeploymentStatus="Running",
        jobStatus="RUNNING",
        rayClusterName=f"{name}-abcde",
        dashboardURL=f"{name}-head-svc.{namespace}.svc.cluster.local:8265",
        jobId=f"{name}-job",
    )


def rayjob_finished(kube, name: str, namespace: str, ok: bool = True) -> None:
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if ok:
        patch_rayjob_status(
            kube,
            name,
            namespace,
            jobDeploymentStatus="Complete",
            jobStatus="SUCCEEDED",
            endTime=now,
            succeeded=1,
        )
    else:
        patch_rayjob_status(
            kube,
            name,
            namespace,
            jobDeploymentStatus="Failed",
            jobStatus="FAILED",
            reason="AppFailed",
            message="Job entrypoint command failed with exit code 1",
            endTime=now,
            failed=1,
        )


FINALIZER = "kubetune.io/finalizer"


def release_namespace(api_client, name: str) -> None:
    """Delete a test's namespace once no operator of the test watches it any more,
    without leaving it Terminating for the rest of the session: the operator's
    finalizer on its FineTuneJobs would never be removed (the operator is gone),
    so the namespace controller would retry emptying the namespace, listing and
    deleting every resource type each time, for as long as the API server runs
    (in a CI run, ~40 such namespaces cost the shared API server ~10 CPU-minutes).
    The finalizer is removed as an administrator would after uninstalling the
    operator; the test has stopped its operator (or never had one) by now."""
    from kubernetes import client

    custom, core = client.CustomObjectsApi(api_client), client.CoreV1Api(api_client)
    try:
        jobs = custom.list_namespaced_custom_object(
            "kubetune.io", "v1alpha1", name, "finetunejobs"
        )["items"]
    except client.ApiException as exc:
        if exc.status != 404:  # 404: the CRD is not served; nothing holds the namespace
            raise
        jobs = []
    for job in jobs:
        meta = job["metadata"]
        if FINALIZER not in (meta.get("finalizers") or []):
            continue
        rest = [f for f in meta["finalizers"] if f != FINALIZER]
        try:
            custom.patch_namespaced_custom_object(
                "kubetune.io", "v1alpha1", name, "finetunejobs", meta["name"],
                {"metadata": {"finalizers": rest or None}},
            )  # fmt: skip
        except client.ApiException as exc:
            if exc.status != 404:
                raise
    try:
        core.delete_namespace(name)
    except client.ApiException as exc:
        if exc.status != 404:
            raise


def events(kube, namespace: str, name: str) -> list[dict]:
    out = kube.kubectl(
        "get",
        "events",
        "-n",
        namespace,
        "-o",
        "json",
        "--field-selector",
        f"involvedObject.name={name}",
    )
    return json.loads(out.stdout)["items"]


class HungEndpoints:
    """Listeners that accept every connection and never send a byte; counts the
    connections open at once over all of them (one namespace's endpoints)."""

    def __init__(self, count: int) -> None:
        self.sel = selectors.DefaultSelector()
        self.ports = []
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sock.listen(64)
            sock.setblocking(False)
            self.sel.register(sock, selectors.EVENT_READ)
            self.ports.append(sock.getsockname()[1])
        self.open: list[socket.socket] = []
        self.peak = 0
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                ready = self.sel.select(timeout=0.2)
            except (OSError, ValueError):
                return  # closed
            for key, _ in ready:
                try:
                    conn, _ = key.fileobj.accept()
                except OSError:
                    continue
                self.open = [c for c in self.open if not _closed(c)] + [conn]
                self.peak = max(self.peak, len(self.open))

    def close(self) -> None:
        self._stop = True
        for key in list(self.sel.get_map().values()):
            key.fileobj.close()
        for c in self.open:
            c.close()


def _closed(conn: socket.socket) -> bool:
    try:
        conn.setblocking(False)
        return conn.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
