"""A real Kubernetes node on this machine: containerd + CNI bridge + kubelet,
kube-proxy, kube-scheduler and CoreDNS, for the cluster tier.

Needs root. What it changes on the host, and how ``stop()`` puts it back
(docs/testing.md has the same list):

- an interface ``kt-node0`` (a bridge without ports: the kernel here has no
  dummy links) with the node address (10.203.255.1/32) and
  a bridge ``kt-cni0`` for the pods (10.203.0.0/24): both deleted;
- the harness's own nftables table ``inet kubetune_node``, which drops pod
  traffic to anything outside the harness's range 10.203.0.0/16 (nothing
  leaves the machine; the bridge does no masquerading): deleted;
- iptables: the kubelet's and kube-proxy's chains: the tables are put back
  exactly as they were (``iptables-save`` before, restored after; tables that
  did not exist are deleted);
- sysctls the kubelet and kube-proxy set (vm.overcommit_memory, kernel.panic,
  kernel.panic_on_oops, ip_forward, ...): recorded before, written back;
- cgroups (``kubepods`` in every v1 hierarchy), network namespaces, mounts
  (the kubelet's bind mount of its root dir, pod volumes, container
  snapshots): removed;
- processes (the servers, containerd's shims, every container): killed.

A run killed before its teardown (SIGKILL, a machine's session ending) leaves
all of that behind, and containerd's shims and the containers outlive it. So
the harness keeps a journal (``/run/kubetune-node.journal.json``: the host's
state recorded before the run and the run's folder) from the claim to the end
of ``release()``; the next claim, holding the lock, finds it and puts the host
back from it first (``recover_host``). Where there is no journal (a run of a
harness without one), it sweeps what is unambiguously the harness's: processes
naming a ``kubetune-cluster-`` folder, mounts under one, network namespaces
holding an address in the harness's range, the ``kt-`` links and the nftables
table, and, when no kubelet runs on the machine, the kubelet's and kube-proxy's
``KUBE-`` iptables chains and the ``kubepods`` cgroups.

containerd's image store lives in the cache dir (``$KUBETUNE_CACHE/node``), so
a 5 GiB trainer image is imported once per image hash, not on every run; its
containers and snapshots in use are removed on teardown.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from . import bins
from .certs import issue_cert
from .images import project_images
from .procs import LOOPBACK, CommandError, Server, free_port, run, wait_until

CNI_BIN_DIR = Path("/usr/lib/cni")
INSTALL = "bash scripts/install-node-packages.sh"

# Written by the kubelet or kube-proxy (or needed by the bridge), put back on teardown.
SYSCTLS = (
    "vm/overcommit_memory",
    "kernel/panic",
    "kernel/panic_on_oops",
    "net/ipv4/ip_forward",
    "net/bridge/bridge-nf-call-iptables",
    "net/bridge/bridge-nf-call-ip6tables",
    "net/ipv4/conf/all/route_localnet",
    "net/netfilter/nf_conntrack_max",
    "net/netfilter/nf_conntrack_tcp_timeout_established",
    "net/netfilter/nf_conntrack_tcp_timeout_close_wait",
)
IPTABLES = ("iptables", "ip6tables")
NFT_TABLE = "kubetune_node"
BUILTIN_CHAINS = {"INPUT", "OUTPUT", "FORWARD", "PREROUTING", "POSTROUTING"}


@dataclass(frozen=True)
class ClusterNetwork:
    """Every address the node uses: all inside ``harness_range``, made by the harness."""

    harness_range: str = "10.203.0.0/16"
    node_ip: str = "10.203.255.1"
    pod_cidr: str = "10.203.0.0/24"
    service_cidr: str = "10.203.16.0/24"
    node_link: str = "kt-node0"
    bridge: str = "kt-cni0"
    node_name: str = "kubetune-node"

    @property
    def apiserver_service_ip(self) -> str:
        return str(ipaddress.ip_network(self.service_cidr)[1])

    @property
    def pod_gateway(self) -> str:
        return str(ipaddress.ip_network(self.pod_cidr)[1])


class NodeError(RuntimeError):
    pass


def scheduler_server(kubeconfig: Path, log_dir: Path) -> Server:
    """The real kube-scheduler against a control plane (not started yet)."""
    kc = kubeconfig
    return Server(
        "kube-scheduler",
        [
            bins.find("kube-scheduler"),
            f"--kubeconfig={kc}",
            f"--authentication-kubeconfig={kc}",
            f"--authorization-kubeconfig={kc}",
            "--authentication-skip-lookup=true",
            "--leader-elect=false",
            f"--secure-port={free_port()}",
            f"--bind-address={LOOPBACK}",
            "--v=1",
        ],
        log_dir,
    )


def check_host() -> None:
    """Fails with the command to run when the host cannot run a node."""
    if os.geteuid() != 0:
        raise NodeError(
            "the node harness needs root (containerd, kubelet, iptables); run the cluster "
            "tier as root"
        )
    missing = [c for c in ("containerd", "runc", "ctr", "iptables", "nft", "conntrack", "ip")
               if shutil.which(c) is None]  # fmt: skip
    if not (CNI_BIN_DIR / "bridge").is_file():
        missing.append(f"{CNI_BIN_DIR}/bridge (containernetworking-plugins)")
    if missing:
        raise NodeError(f"missing on this host: {', '.join(missing)}; install with: {INSTALL}")


def _sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, check=check)


def _read_sysctl(key: str) -> str | None:
    try:
        return Path("/proc/sys", key).read_text().strip()
    except OSError:
        return None


def _write_sysctl(key: str, value: str) -> None:
    with contextlib.suppress(OSError):
        Path("/proc/sys", key).write_text(value + "\n")


def _mounts() -> list[str]:
    """Mount points, deepest last (as /proc/self/mountinfo lists them)."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].encode().decode("unicode_escape")
        out.append(point)
    return out


def _netns() -> list[str]:
    return os.listdir("/var/run/netns") if os.path.isdir("/var/run/netns") else []


def _cgroup_roots() -> list[Path]:
    root = Path("/sys/fs/cgroup")
    return [d for d in root.iterdir() if d.is_dir() and not d.is_symlink()]


class HostState:
    """What the node changes on the host, recorded before, put back after."""

    def __init__(self, net: ClusterNetwork, recorded: dict | None = None) -> None:
        self.net = net
        if recorded is not None:  # from a journal
            self.sysctls = dict(recorded["sysctls"])
            self.iptables = dict(recorded["iptables"])
            self.nft_tables = set(recorded["nft_tables"])
            self.netns = set(recorded["netns"])
            self.cgroups = set(recorded["cgroups"])
            return
        self.sysctls = {k: v for k in SYSCTLS if (v := _read_sysctl(k)) is not None}
        self.iptables = {cmd: _sh(f"{cmd}-save", check=False).stdout for cmd in IPTABLES}
        self.nft_tables = set(_sh("nft", "list", "tables", check=False).stdout.splitlines())
        self.netns = set(_netns())
        self.cgroups = {str(d / "kubepods") for d in _cgroup_roots() if (d / "kubepods").exists()}

    def recorded(self) -> dict:
        """What a journal keeps (``HostState(net, recorded=...)`` reads it back)."""
        return {
            "sysctls": self.sysctls,
            "iptables": self.iptables,
            "nft_tables": sorted(self.nft_tables),
            "netns": sorted(self.netns),
            "cgroups": sorted(self.cgroups),
        }

    def snapshot(self) -> dict:
        """Comparable view of the host: a teardown test asserts it is unchanged."""
        links = sorted(
            line.split(":")[1].strip().split("@")[0]
            for line in _sh("ip", "-o", "link", "show").stdout.splitlines()
        )
        return {
            "sysctls": {k: _read_sysctl(k) for k in SYSCTLS},
            "iptables": {cmd: _rules(_sh(f"{cmd}-save", check=False).stdout) for cmd in IPTABLES},
            "nft_tables": sorted(_sh("nft", "list", "tables", check=False).stdout.splitlines()),
            "links": links,
            "netns": sorted(_netns()),
            "kubepods_cgroups": sorted(
                str(d / "kubepods") for d in _cgroup_roots() if (d / "kubepods").exists()
            ),
            "mounts": sorted(m for m in _mounts() if "kubelet" in m or "containerd" in m),
        }

    def restore(self, dirs: list[Path]) -> list[str]:
        """Puts the host back; returns what could not be undone (empty when all went well)."""
        problems: list[str] = []
        # Mounts under our dirs, deepest first.
        prefixes = [str(d) for d in dirs]
        for point in reversed(_mounts()):
            if any(point == p or point.startswith(p + "/") for p in prefixes):
                r = _sh("umount", "-l", point, check=False)
                if r.returncode:
                    problems.append(f"umount {point}: {r.stderr.strip()}")
        # Network namespaces the CNI made for pods that were not torn down.
        for ns in set(_netns()) - self.netns:
            _sh("ip", "netns", "delete", ns, check=False)
        for link in (self.net.bridge, self.net.node_link):
            _sh("ip", "link", "delete", link, check=False)
        # iptables: back to the saved rules; tables that did not exist go away.
        for cmd in IPTABLES:
            saved = self.iptables[cmd]
            for table in ("filter", "nat", "mangle", "raw"):
                if f"*{table}" not in saved:
                    _sh(cmd, "-t", table, "-F", check=False)
                    _sh(cmd, "-t", table, "-X", check=False)
            if saved.strip():
                r = subprocess.run(
                    [f"{cmd}-restore"], input=saved, text=True, capture_output=True, check=False
                )
                if r.returncode:
                    problems.append(f"{cmd}-restore: {r.stderr.strip()}")
        for line in set(_sh("nft", "list", "tables", check=False).stdout.splitlines()):
            if line not in self.nft_tables and line.startswith("table "):
                _sh("nft", "delete", *line.split(), check=False)
        _sh("conntrack", "-D", "-s", self.net.harness_range, check=False)
        _sh("conntrack", "-D", "-d", self.net.harness_range, check=False)
        for key, value in self.sysctls.items():
            _write_sysctl(key, value)
        for root in _cgroup_roots():
            top = root / "kubepods"
            if top.exists() and str(top) not in self.cgroups:
                problems += _remove_cgroup(top)
        return problems


def _rules(save: str) -> list[str]:
    """The rules and user chains of an iptables-save dump, without counters."""
    out, table = [], ""
    for line in save.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith("-A"):
            out.append(f"{table} {line}")
        elif line.startswith(":") and line[1:].split()[0] not in BUILTIN_CHAINS:
            out.append(f"{table} {line.split()[0]}")
    return out


def _remove_cgroup(top: Path) -> list[str]:
    """Kills what is left in a cgroup tree, then removes it bottom-up."""
    problems = []
    dirs = sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
    for d in [*dirs, top]:
        with contextlib.suppress(OSError):
            for pid in (d / "cgroup.procs").read_text().split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
    for d in [*dirs, top]:
        for _ in range(50):
            try:
                d.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.1)
        else:
            problems.append(f"cgroup {d} is still busy")
    return problems


LOCK = Path("/run/kubetune-node.lock")
JOURNAL = Path("/run/kubetune-node.journal.json")
RUN_DIR_PREFIX = "kubetune-cluster-"  # harness.cluster.Cluster's folders


def _claim_lock():
    """The machine-wide lock, or NodeError when another node harness holds it."""
    lock = open(LOCK, "w")  # noqa: SIM115 - held by the caller
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        lock.close()
        raise NodeError(
            f"another kubetune node harness is running on this machine ({LOCK})"
        ) from exc
    return lock


def _live(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _pids_naming(fragment: str) -> list[int]:
    """Processes (other than this one) whose command line contains `fragment`."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmdline = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if fragment in cmdline:
            pids.append(int(d.name))
    return pids


def _kill_all(pids: list[int]) -> list[str]:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while (left := [p for p in pids if _live(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [f"process {p} survived SIGKILL" for p in left]


def _kubelet_running() -> bool:
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                if (d / "comm").read_text().strip() in ("kubelet", "kube-proxy"):
                    return True
    return False


def _without_kube_chains(save: str) -> str:
    """An iptables-save dump without the kubelet's and kube-proxy's chains and the jumps to them."""
    keep = []
    for line in save.splitlines():
        if line.startswith((":KUBE-", "-A KUBE-")) or " -j KUBE-" in line or " -g KUBE-" in line:
            continue
        keep.append(line)
    return "\n".join(keep) + "\n"


def recover_host(net: ClusterNetwork) -> list[str]:
    """Takes the lock and puts back what a node run killed before its teardown
    left on the host; returns what could not be undone."""
    lock = _claim_lock()
    try:
        return _recover(net)
    finally:
        lock.close()


def _recover(net: ClusterNetwork) -> list[str]:
    """With the lock held: the journal's recorded state put back, or (no journal)
    a sweep of what is unambiguously the harness's."""
    for link in (net.bridge, net.node_link):
        _sh("ip", "link", "delete", link, check=False)
    if JOURNAL.exists():
        try:
            journal = json.loads(JOURNAL.read_text())
            run_dir = Path(journal["run_dir"])
            host = HostState(net, recorded=journal["host"])
            dirs = [Path(d) for d in journal["dirs"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            problems = [f"unreadable journal {JOURNAL} ({exc}); swept instead"]
            problems += _sweep(net)
        else:
            problems = _kill_all(_pids_naming(f"{run_dir}/"))
            problems += host.restore(dirs + [run_dir])
            shutil.rmtree(run_dir, ignore_errors=True)
        JOURNAL.unlink(missing_ok=True)
        return problems
    return _sweep(net)


def _sweep(net: ClusterNetwork) -> list[str]:
    problems = _kill_all(_pids_naming(f"/{RUN_DIR_PREFIX}"))
    run_dirs = set()
    for point in reversed(_mounts()):
        parts = Path(point).parts
        tops = [i for i, part in enumerate(parts) if part.startswith(RUN_DIR_PREFIX)]
        if tops:
            run_dirs.add(Path(*parts[: tops[0] + 1]))
            r = _sh("umount", "-l", point, check=False)
            if r.returncode:
                problems.append(f"umount {point}: {r.stderr.strip()}")
    harness = ipaddress.ip_network(net.harness_range)
    for ns in _netns():
        out = _sh("ip", "-n", ns, "-4", "-o", "addr", "show", check=False).stdout.split()
        addrs = [w.split("/")[0] for i, w in enumerate(out) if i and out[i - 1] == "inet"]
        if any(ipaddress.ip_address(a) in harness for a in addrs):
            _sh("ip", "netns", "delete", ns, check=False)
    _sh("nft", "delete", "table", "inet", NFT_TABLE, check=False)
    _sh("conntrack", "-D", "-s", net.harness_range, check=False)
    _sh("conntrack", "-D", "-d", net.harness_range, check=False)
    if not _kubelet_running():
        for cmd in IPTABLES:
            save = _sh(f"{cmd}-save", check=False).stdout
            clean = _without_kube_chains(save)
            if save.strip() and _rules(clean) != _rules(save):
                r = subprocess.run(
                    [f"{cmd}-restore"], input=clean, text=True, capture_output=True, check=False
                )
                if r.returncode:
                    problems.append(f"{cmd}-restore: {r.stderr.strip()}")
        for root in _cgroup_roots():
            if (root / "kubepods").exists():
                problems += _remove_cgroup(root / "kubepods")
    for d in run_dirs:
        shutil.rmtree(d, ignore_errors=True)
    return problems


class Node:
    """The node's processes and host changes; ``start()`` then ``stop()``."""

    def __init__(self, plane, workdir: Path, log_dir: Path, net: ClusterNetwork) -> None:
        self.plane = plane
        self.net = net
        self.workdir = Path(workdir)
        self.log_dir = Path(log_dir)
        self.store = bins.cache_dir() / "node" / "containerd"
        self.state_dir = self.workdir / "containerd-state"
        self.socket = self.workdir / "containerd.sock"
        self.kubelet_dir = self.workdir / "kubelet"
        self.servers: list[Server] = []
        self.host: HostState | None = None
        self.timings: dict[str, float] = {}
        self._lock = None
        self.pause_ref = ""

    # ---- lifecycle -----------------------------------------------------------
    def check_and_claim(self) -> Node:
        """Checks the host, takes the machine-wide lock, records the host's state
        and creates the node's network (the API server then binds the node address)."""
        check_host()
        self._take_lock()
        self.host = HostState(self.net)
        try:
            JOURNAL.write_text(
                json.dumps(
                    {
                        "run_dir": str(self.workdir.parent),
                        "dirs": [str(d) for d in self._dirs()],
                        "host": self.host.recorded(),
                    }
                )
            )
            self._network()
        except BaseException:
            self.release()
            raise
        return self

    def start(self, timeout: float = 90) -> Node:
        """containerd, kubelet, kube-proxy, kube-scheduler, CoreDNS; waits for Ready."""
        if self.host is None:
            self.check_and_claim()
        t0 = time.monotonic()
        try:
            self._containerd()
            self.timings["containerd"] = time.monotonic() - t0
            self._kubelet()
            self._kube_proxy()
            self._scheduler()
            self._coredns()
            wait_until(self._node_ready, timeout, interval=0.5, what="the node to be Ready")
            self.timings["node Ready"] = time.monotonic() - t0
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stops the node's processes and every container (the host is put back by release())."""
        for server in reversed(self.servers):
            if server.name != "containerd":
                server.stop(grace=5)
        self._kill_containers()
        for server in self.servers:
            if server.name == "containerd":
                server.stop(grace=10)
        self.servers = []

    def release(self) -> list[str]:
        """Puts the host back and frees the lock; returns what could not be undone."""
        self.stop()
        problems: list[str] = []
        if self.host is not None:
            problems = self.host.restore(self._dirs())
            self.host = None
        shutil.rmtree(self.kubelet_dir, ignore_errors=True)
        shutil.rmtree(self.state_dir, ignore_errors=True)
        if self._lock is not None:
            JOURNAL.unlink(missing_ok=True)
            self._lock.close()
            self._lock = None
        return problems

    def drain(self, timeout: float = 90) -> None:
        """Deletes every pod and waits until containerd runs no container (the
        kubelet tears each sandbox down: CNI, volumes, cgroups)."""
        self.plane.kubectl(
            "delete", "pods", "--all", "--all-namespaces", "--grace-period=1", "--wait=false",
            check=False,
        )  # fmt: skip
        with contextlib.suppress(TimeoutError):
            wait_until(lambda: not self._running_tasks(), timeout, interval=1, what="pods gone")

    # ---- parts ---------------------------------------------------------------
    def _dirs(self) -> list[Path]:
        """Where the node mounts things."""
        return [self.kubelet_dir, self.state_dir, self.store]

    def _take_lock(self) -> None:
        self._lock = _claim_lock()
        # A run killed before its teardown leaves the host changed: put it back first.
        for problem in _recover(self.net):
            print(f"kubetune node harness: after an earlier run: {problem}", flush=True)

    def _network(self) -> None:
        n = self.net
        # A port-less bridge holds the address: this kernel has no dummy links.
        _sh("ip", "link", "add", n.node_link, "type", "bridge")
        _sh("ip", "addr", "add", f"{n.node_ip}/32", "dev", n.node_link)
        _sh("ip", "link", "set", n.node_link, "up")
        for key, value in (
            ("net/ipv4/ip_forward", "1"),
            ("net/bridge/bridge-nf-call-iptables", "1"),
            ("net/bridge/bridge-nf-call-ip6tables", "1"),
        ):
            _write_sysctl(key, value)
        # Pods reach pods, the node address and (through kube-proxy's DNAT,
        # which runs first) Services; anything else from a pod is dropped. A
        # table of its own, hooked before iptables' filter chains: kube-proxy
        # and the kubelet keep inserting their rules at the top of those.
        rules = f"""table inet {NFT_TABLE} {{
  chain forward {{
    type filter hook forward priority -10; policy accept;
    ip saddr {n.pod_cidr} ip daddr != {n.harness_range} drop
    iifname "{n.bridge}" meta nfproto ipv6 drop
  }}
  chain input {{
    type filter hook input priority -10; policy accept;
    ip saddr {n.pod_cidr} ip daddr != {n.harness_range} drop
  }}
}}
"""
        subprocess.run(["nft", "-f", "-"], input=rules, text=True, check=True, capture_output=True)
        cni = self.workdir / "cni"
        (cni / "net.d").mkdir(parents=True, exist_ok=True)
        (cni / "net.d" / "10-kubetune.conflist").write_text(
            json.dumps(
                {
                    "cniVersion": "1.0.0",
                    "name": "kubetune",
                    "plugins": [
                        {
                            "type": "bridge",
                            "bridge": n.bridge,
                            "isGateway": True,
                            "ipMasq": False,
                            "hairpinMode": True,
                            "ipam": {
                                "type": "host-local",
                                "ranges": [[{"subnet": n.pod_cidr, "gateway": n.pod_gateway}]],
                                "routes": [{"dst": "0.0.0.0/0"}],
                                "dataDir": str(cni / "ipam"),
                            },
                        },
                        {"type": "portmap", "capabilities": {"portMappings": True}},
                    ],
                },
                indent=1,
            )
        )

    def _containerd(self) -> None:
        self.store.mkdir(parents=True, exist_ok=True)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.pause_ref, pause_archive = project_images(("pause",))["pause"]
        cni = self.workdir / "cni"
        config = self.workdir / "containerd.toml"
        config.write_text(
            f"""version = 2
root = "{self.store}"
state = "{self.state_dir}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "{self.socket}"
[ttrpc]
  address = "{self.socket}.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{self.workdir / "opt"}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{self.pause_ref}"
  # No CAP_SYS_RESOURCE here: runc must not try to lower oom_score_adj.
  restrict_oom_score_adj = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{cni / "net.d"}"
"""
        )
        server = self._add(
            Server(
                "containerd",
                ["containerd", "--config", config, "--log-level", "warn"],
                self.log_dir,
            )  # fmt: skip
        )
        server.start()
        server.wait_ready(lambda: self.ctr("version", check=False).returncode == 0, 30, "serving")
        self.import_image(pause_archive, self.pause_ref)

    def ctr(self, *args: str, check: bool = True, timeout: float = 600):
        return run(["ctr", "--address", self.socket, "-n", "k8s.io", *args], check=check,
                   timeout=timeout)  # fmt: skip

    def images(self) -> set[str]:
        return set(self.ctr("images", "ls", "-q").stdout.split())

    def import_image(self, archive: Path, ref: str) -> float:
        """Imports an image archive unless ``ref`` is already there; removes other
        tags of the same repository (stale builds). Returns the seconds it took."""
        t0 = time.monotonic()
        have = self.images()
        repo = ref.rsplit(":", 1)[0]
        stale = [i for i in have if i.rsplit(":", 1)[0] == repo and i != ref]
        if stale:
            # Before the import, and --sync: containerd frees the old build's
            # layers and snapshots now (each trainer image is ~12 GB unpacked),
            # so the new one never needs room beside it.
            self.ctr("images", "rm", "--sync", *stale, check=False)
        self._remove_orphan_ids()
        if ref not in have:
            self.ctr("images", "import", "--no-unpack=false", "--snapshotter", "overlayfs",
                     str(archive), timeout=1200)  # fmt: skip
            if ref not in self.images():
                raise NodeError(f"importing {archive} did not create {ref}")
        return time.monotonic() - t0

    def _remove_orphan_ids(self) -> None:
        """The kubelet's image service adds a second name to every image it has
        seen, `sha256:<config digest>`; removing an old build's tag leaves that
        name holding the old layers (~12 GB a trainer build, found when a run
        filled the disk). Removes each such name no tagged image has as its
        config. Best effort: a failure here never fails an import."""
        try:
            rows = [line.split() for line in self.ctr("images", "ls").stdout.splitlines()[1:]]
            named = {r[0]: r[2] for r in rows if len(r) > 2 and not r[0].startswith("sha256:")}
            ids = {r[0] for r in rows if r and r[0].startswith("sha256:")}
            keep = {self._config_digest(d) for d in named.values()}
            orphans = sorted(ids - keep)
            if orphans and None not in keep:
                self.ctr("images", "rm", "--sync", *orphans, check=False)
        except (CommandError, NodeError, ValueError, KeyError, IndexError,
                subprocess.TimeoutExpired) as exc:  # fmt: skip
            print(f"node: leaving old image names in place ({exc})")

    def _config_digest(self, digest: str):
        doc = json.loads(self.ctr("content", "get", digest).stdout)
        if "manifests" in doc:  # an index: its first manifest's config
            doc = json.loads(self.ctr("content", "get", doc["manifests"][0]["digest"]).stdout)
        return doc.get("config", {}).get("digest")

    def _kubelet(self) -> None:
        n, cp = self.net, self.plane
        self.kubelet_dir.mkdir(parents=True, exist_ok=True)
        certs = cp.certs
        client = issue_cert(certs, "kubelet-client", f"system:node:{n.node_name}", "system:nodes")
        serving = issue_cert(
            certs, "kubelet-serving", n.node_name, server=True,
            sans=(f"IP:{n.node_ip}", f"DNS:{n.node_name}"),
        )  # fmt: skip
        kubeconfig = self._kubeconfig("kubelet", {"client-certificate": str(client[0]),
                                                  "client-key": str(client[1])})  # fmt: skip
        self.kubelet_port = free_port()
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": n.node_ip,
            "port": self.kubelet_port,
            "readOnlyPort": 0,
            "healthzBindAddress": LOOPBACK,
            "healthzPort": free_port(),
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": False},
                "x509": {"clientCAFile": str(certs.ca_crt)},
            },
            "authorization": {"mode": "AlwaysAllow"},
            "tlsCertFile": str(serving[0]),
            "tlsPrivateKeyFile": str(serving[1]),
            "containerRuntimeEndpoint": f"unix://{self.socket}",
            "cgroupDriver": "cgroupfs",
            # This machine: cgroup v1 (1.35 refuses it unless told), no swap limit.
            "failCgroupV1": False,
            "failSwapOn": False,
            "clusterDNS": [n.node_ip],
            "clusterDomain": "cluster.local",
            "resolvConf": "/etc/resolv.conf",
            "staticPodPath": "",
            # One node for tests: never evict or garbage-collect the imported images.
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%",
                             "imagefs.available": "1%", "nodefs.inodesFree": "1%"},
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "serializeImagePulls": False,
            "syncFrequency": "5s",
            "fileCheckFrequency": "5s",
            "nodeStatusUpdateFrequency": "5s",
            "volumeStatsAggPeriod": "0s",
            "registerNode": True,
            "maxPods": 30,
        }  # fmt: skip
        cfg_file = self.workdir / "kubelet-config.json"
        cfg_file.write_text(json.dumps(config, indent=1))
        server = self._add(
            Server(
                "kubelet",
                [
                    bins.find("kubelet"),
                    f"--config={cfg_file}",
                    f"--kubeconfig={kubeconfig}",
                    f"--root-dir={self.kubelet_dir}",
                    f"--cert-dir={self.workdir / 'kubelet-pki'}",
                    f"--hostname-override={n.node_name}",
                    f"--node-ip={n.node_ip}",
                    "--v=1",
                ],
                self.log_dir,
            )
        )
        server.start()

    def _kube_proxy(self) -> None:
        n = self.net
        cfg = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(self.plane.kubeconfig)},
            "mode": "iptables",
            "clusterCIDR": n.pod_cidr,
            "hostnameOverride": n.node_name,
            "bindAddress": n.node_ip,
            "healthzBindAddress": f"{LOOPBACK}:{free_port()}",
            "metricsBindAddress": f"{LOOPBACK}:{free_port()}",
            "nodePortAddresses": [f"{n.node_ip}/32"],
            # Leave the host's conntrack settings and route_localnet alone.
            "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s",
                          "tcpCloseWaitTimeout": "0s"},
            "iptables": {"localhostNodePorts": False, "syncPeriod": "5s", "minSyncPeriod": "0s"},
            "oomScoreAdj": 0,
        }  # fmt: skip
        f = self.workdir / "kube-proxy-config.json"
        f.write_text(json.dumps(cfg, indent=1))
        self._add(Server("kube-proxy", [bins.find("kube-proxy"), f"--config={f}", "--v=1"],
                         self.log_dir)).start()  # fmt: skip

    def _scheduler(self) -> None:
        self._add(scheduler_server(self.plane.kubeconfig, self.log_dir)).start()

    def _coredns(self) -> None:
        n = self.net
        ready_port = free_port()
        corefile = self.workdir / "Corefile"
        corefile.write_text(
            f""".:53 {{
    bind {n.node_ip}
    errors
    health {LOOPBACK}:{free_port()}
    ready {LOOPBACK}:{ready_port}
    kubernetes cluster.local in-addr.arpa ip6.arpa {{
        kubeconfig {self.plane.kubeconfig} kubetune-test
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
    cache 5
}}
"""
        )
        server = self._add(Server("coredns", [bins.find("coredns"), "-conf", corefile],
                                  self.log_dir))  # fmt: skip
        server.start()
        import urllib.request

        def ready() -> bool:
            with urllib.request.urlopen(f"http://{LOOPBACK}:{ready_port}/ready", timeout=2) as r:
                return r.status == 200

        server.wait_ready(ready, 60, "ready (/ready)")

    # ---- helpers -------------------------------------------------------------
    def _add(self, server: Server) -> Server:
        self.servers.append(server)
        return server

    def _kubeconfig(self, user: str, creds: dict) -> Path:
        cp = self.plane
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "local", "cluster": {
                "server": cp.server, "certificate-authority": str(cp.certs.ca_crt)}}],
            "users": [{"name": user, "user": creds}],
            "contexts": [{"name": "local", "context": {"cluster": "local", "user": user}}],
            "current-context": "local",
        }  # fmt: skip
        path = self.workdir / f"{user}.kubeconfig"
        path.write_text(json.dumps(cfg, indent=1))
        os.chmod(path, 0o600)
        return path

    def _node_ready(self) -> bool:
        for server in self.servers:
            if not server.alive():
                raise NodeError(f"{server.name} exited; log {server.log}:\n{server.log_tail()}")
        node = self.plane.get_json(f"/api/v1/nodes/{self.net.node_name}")
        conds = node.get("status", {}).get("conditions") or []
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)

    def _running_tasks(self) -> list[str]:
        r = self.ctr("tasks", "ls", check=False)
        return [ln for ln in r.stdout.splitlines()[1:] if "RUNNING" in ln]

    def _kill_containers(self) -> None:
        """What the kubelet did not tear down: tasks, shims, containers."""
        if self.socket.exists():
            r = self.ctr("containers", "ls", "-q", check=False)
            for cid in r.stdout.split():
                self.ctr("tasks", "kill", "-s", "SIGKILL", cid, check=False)
        # Shims outlive containerd (they re-parent to init): find ours by socket.
        needle = str(self.state_dir).encode()
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"containerd-shim" in cmd and (needle in cmd or str(self.socket).encode() in cmd):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
        if self.socket.exists():
            r = self.ctr("containers", "ls", "-q", check=False)
            for cid in r.stdout.split():
                self.ctr("containers", "rm", cid, check=False)
