"""A real control plane: etcd + kube-apiserver (RBAC) + kube-controller-manager.

kube-controller-manager runs only the controllers the tests need: garbage
collection of owned objects, namespace deletion, the service-account
controllers (a ``default`` ServiceAccount and token secrets per namespace) and
ClusterRole aggregation (the chart's roles for people join ``edit``/``view``).
There is no scheduler and no kubelet: pods stay Pending. Given a ``network``
(see node.py), the plane is set up for a real node instead: it listens on the
node address that the harness creates, publishes itself as the ``kubernetes``
Service, authorizes kubelets (Node,RBAC), mounts service-account tokens, and
kube-controller-manager runs every default controller (Deployments, Jobs,
EndpointSlices, ...).
"""

from __future__ import annotations

import json
import os
import secrets
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterable
from pathlib import Path

from . import bins
from .certs import Certs, issue_cert, make_certs
from .procs import LOOPBACK, CommandError, Server, free_port, run, wait_until

ADMIN_USER = "admin"


class ControlPlane:
    def __init__(self, workdir: Path, log_dir: Path | None = None, network=None) -> None:
        self.workdir = Path(workdir)
        self.network = network
        self.address = network.node_ip if network else LOOPBACK
        self.log_dir = Path(log_dir) if log_dir else self.workdir / "logs"
        self.servers: list[Server] = []
        self.token = secrets.token_hex(16)
        self.etcd_port = free_port()
        self.etcd_peer_port = free_port()
        self.port = free_port()
        self.kcm_port = free_port()
        self.server = f"https://{self.address}:{self.port}"
        self.kubeconfig = self.workdir / "admin.kubeconfig"
        # Seeding this dir before start() (a copy of a stopped plane's) boots
        # the plane with that state: see Session's etcd templates.
        self.etcd_dir = self.workdir / "etcd"
        self.certs: Certs | None = None
        self.timings: dict[str, float] = {}  # seconds from start() to each part being ready
        self.kubectl_bin = bins.find("kubectl")
        self._etcd_bin = bins.find("etcd")
        self._apiserver_bin = bins.find("kube-apiserver")
        self._kcm_bin = bins.find("kube-controller-manager")

    # ---- lifecycle -------------------------------------------------------
    def start(self, timeout: float = 60) -> ControlPlane:
        t0 = time.monotonic()
        self.servers = []
        if self.certs is None:
            self.certs = self._make_certs()
        (self.workdir / "tokens.csv").write_text(
            f'{self.token},{ADMIN_USER},{ADMIN_USER},"system:masters"\n'
        )
        self._write_kubeconfig()
        etcd = self._add(Server("etcd", self._etcd_args(), self.log_dir))
        apiserver = self._add(Server("kube-apiserver", self._apiserver_args(), self.log_dir))
        etcd.start()
        apiserver.start()  # retries etcd by itself, so both boot at once
        etcd.wait_ready(
            lambda: self._get(f"http://{LOOPBACK}:{self.etcd_port}/health", tls=False) == 200,
            timeout,
            "healthy",
        )
        self.timings["etcd"] = time.monotonic() - t0
        apiserver.wait_ready(
            lambda: self._get(f"{self.server}/readyz") == 200, timeout, "ready (/readyz)"
        )
        self.timings["kube-apiserver"] = time.monotonic() - t0
        kcm = self._add(Server("kube-controller-manager", self._kcm_args(), self.log_dir))
        kcm.start()
        kcm.wait_ready(
            lambda: self._get(f"https://{LOOPBACK}:{self.kcm_port}/healthz", tls=None) == 200,
            timeout,
            "healthy (/healthz)",
        )
        self.timings["kube-controller-manager"] = time.monotonic() - t0
        return self

    def stop(self) -> None:
        for server in reversed(self.servers):
            server.stop()

    def stop_controllers(self) -> None:
        """Stops kube-controller-manager only (nothing re-creates deleted pods then)."""
        for server in self.servers:
            if server.name == "kube-controller-manager":
                server.stop()

    def _make_certs(self) -> Certs:
        net = self.network
        if net is None:
            return make_certs(self.workdir / "pki")
        certs = make_certs(
            self.workdir / "pki",
            (
                f"IP:{net.node_ip}",
                f"IP:{net.apiserver_service_ip}",
                "DNS:kubernetes",
                "DNS:kubernetes.default",
                "DNS:kubernetes.default.svc.cluster.local",
            ),
        )
        # How the API server proves itself to kubelets (logs, exec).
        self.kubelet_client = issue_cert(
            certs, "apiserver-kubelet-client", "kube-apiserver-kubelet-client", "system:masters"
        )
        return certs

    def _add(self, server: Server) -> Server:
        self.servers.append(server)
        return server

    # ---- args ------------------------------------------------------------
    def _etcd_args(self) -> list[str]:
        peer = f"http://{LOOPBACK}:{self.etcd_peer_port}"
        client = f"http://{LOOPBACK}:{self.etcd_port}"
        return [
            self._etcd_bin,
            "--name=default",
            f"--data-dir={self.etcd_dir}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=default={peer}",
            "--unsafe-no-fsync=true",
            "--log-level=warn",
        ]

    def _apiserver_args(self) -> list[str]:
        c = self.certs
        assert c is not None
        return [
            self._apiserver_bin,
            f"--etcd-servers=http://{LOOPBACK}:{self.etcd_port}",
            f"--cert-dir={self.workdir / 'apiserver-certs'}",
            f"--tls-cert-file={c.serving_crt}",
            f"--tls-private-key-file={c.serving_key}",
            f"--client-ca-file={c.ca_crt}",
            f"--secure-port={self.port}",
            f"--bind-address={self.address}",
            f"--advertise-address={self.address}",
            *self._mode_args(),
            "--allow-privileged=true",
            f"--token-auth-file={self.workdir / 'tokens.csv'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={c.sa_pub}",
            f"--service-account-signing-key-file={c.sa_key}",
            "--v=1",
        ]

    def _mode_args(self) -> list[str]:
        net = self.network
        if net is None:
            return [
                # No real node network: do not publish 127.0.0.1 as the
                # `kubernetes` Service's endpoints (validation rejects loopback).
                "--endpoint-reconciler-type=none",
                "--service-cluster-ip-range=10.0.0.0/24",
                "--authorization-mode=RBAC",
                "--disable-admission-plugins=ServiceAccount",
            ]
        crt, key = self.kubelet_client
        return [
            f"--service-cluster-ip-range={net.service_cidr}",
            "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction",
            f"--kubelet-client-certificate={crt}",
            f"--kubelet-client-key={key}",
            f"--kubelet-certificate-authority={self.certs.ca_crt}",
            "--kubelet-preferred-address-types=InternalIP",
        ]

    def _kcm_args(self) -> list[str]:
        c = self.certs
        assert c is not None
        return [
            self._kcm_bin,
            f"--kubeconfig={self.kubeconfig}",
            f"--authentication-kubeconfig={self.kubeconfig}",
            f"--authorization-kubeconfig={self.kubeconfig}",
            # The apiserver has no request-header CA: do not look it up.
            "--authentication-skip-lookup=true",
            f"--secure-port={self.kcm_port}",
            f"--bind-address={LOOPBACK}",
            f"--cert-dir={self.workdir / 'kcm-certs'}",
            "--controllers="
            + (
                "*"
                if self.network
                # clusterrole-aggregation: the chart's roles for people join `edit`/`view`
                else "garbagecollector,namespace,serviceaccount,serviceaccount-token,"
                "clusterrole-aggregation"
            ),
            *(
                [
                    f"--service-cluster-ip-range={self.network.service_cidr}",
                    f"--cluster-signing-cert-file={c.ca_crt}",
                    f"--cluster-signing-key-file={c.ca_key}",
                ]
                if self.network
                else []
            ),
            f"--service-account-private-key-file={c.sa_key}",
            f"--root-ca-file={c.ca_crt}",
            "--use-service-account-credentials=false",
            "--leader-elect=false",
            "--v=1",
        ]

    # ---- clients -----------------------------------------------------------
    def _write_kubeconfig(self) -> None:
        assert self.certs is not None
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "kubetune-test",
                    "cluster": {
                        "server": self.server,
                        "certificate-authority": str(self.certs.ca_crt),
                    },
                }
            ],
            "users": [{"name": ADMIN_USER, "user": {"token": self.token}}],
            "contexts": [
                {
                    "name": "kubetune-test",
                    "context": {"cluster": "kubetune-test", "user": ADMIN_USER},
                }
            ],
            "current-context": "kubetune-test",
        }
        self.kubeconfig.write_text(json.dumps(cfg, indent=2))
        os.chmod(self.kubeconfig, 0o600)

    def _get(self, url: str, tls: bool | None = True) -> int:
        """HTTP status of GET url. tls=True: verify with our CA; None: no verify."""
        ctx = None
        headers = {}
        if url.startswith("https"):
            if tls:
                assert self.certs is not None
                ctx = ssl.create_default_context(cafile=str(self.certs.ca_crt))
                headers["Authorization"] = f"Bearer {self.token}"
            else:
                ctx = ssl._create_unverified_context()  # kcm's self-signed serving cert
        req = urllib.request.Request(url, headers=headers)
        with urllib.request.urlopen(req, context=ctx, timeout=2) as resp:
            return resp.status

    def env(self) -> dict[str, str]:
        return {"KUBECONFIG": str(self.kubeconfig)}

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120
    ):
        """Runs the built kubectl against this control plane; returns CompletedProcess (text)."""
        return run(
            [self.kubectl_bin, f"--kubeconfig={self.kubeconfig}", *args],
            input=input,
            check=check,
            timeout=timeout,
        )

    def api_client(self):
        """A new kubernetes.client.ApiClient for the admin user."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig))

    # ---- resources ---------------------------------------------------------
    def apply_crds(self, paths: Iterable[Path], timeout: float = 60) -> list[str]:
        """Server-side applies CRD files and waits until they are Established.

        One kubectl per file, all at once: the API server spends seconds on
        each large CRD (schema checks, CEL cost estimates), about half as long
        in total when they come in parallel.
        """
        procs = [
            (
                path,
                subprocess.Popen(
                    [
                        str(self.kubectl_bin),
                        f"--kubeconfig={self.kubeconfig}",
                        "apply",
                        "--server-side",
                        "--force-conflicts",
                        "-o",
                        "name",
                        f"--filename={path}",
                    ],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                ),
            )
            for path in paths
        ]
        names: list[str] = []
        errors: list[str] = []
        for path, proc in procs:
            out, err = proc.communicate(timeout=timeout)
            if proc.returncode != 0:
                errors.append(f"{path.name}: {err.strip()}")
            names += [line.strip() for line in out.splitlines() if line.strip()]
        if errors:
            raise CommandError(1, ["kubectl", "apply", "--server-side"], "", "\n".join(errors))
        # Polled here, not with `kubectl wait`: that fails outright when it
        # reads a CRD whose status has no conditions yet.
        self.wait_established([n.split("/", 1)[1] for n in names], timeout)
        return names

    def wait_established(self, crds: Iterable[str], timeout: float = 60) -> None:
        for crd in crds:
            wait_until(
                lambda crd=crd: self._crd_established(crd),
                timeout,
                interval=0.1,
                what=f"CRD {crd} to be Established",
            )

    def _crd_established(self, name: str) -> bool:
        crd = self.get_json(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
        conds = (crd.get("status") or {}).get("conditions") or []
        return any(c.get("type") == "Established" and c.get("status") == "True" for c in conds)

    def get_json(self, path: str) -> dict:
        """GET an API path as the admin user (no kubectl process)."""
        assert self.certs is not None
        ctx = ssl.create_default_context(cafile=str(self.certs.ca_crt))
        req = urllib.request.Request(
            self.server + path, headers={"Authorization": f"Bearer {self.token}"}
        )
        with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
            return json.loads(resp.read())

    def wait_for(self, cond, timeout: float = 30, what: str = "condition"):
        return wait_until(cond, timeout, what=what)
