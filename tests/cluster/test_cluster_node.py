"""The node harness itself: a real kubelet runs pods, cluster DNS and the
`kubernetes` Service work from inside a pod, pod egress stays on the machine,
and a run killed before its teardown is put back by the next start, whose
own teardown leaves the host as it found it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from harness.cluster import Cluster
from harness.node import JOURNAL, ClusterNetwork, HostState, recover_host
from harness.procs import run, wait_until


def _pod(name: str, image: str, command: list[str] | None = None) -> dict:
    container = {"name": "c", "image": image, "imagePullPolicy": "Never"}
    if command:
        container["command"] = command
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "containers": [container],
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 1,
        },
    }


def _phase(plane, name: str, ns: str = "default") -> str:
    out = plane.kubectl("get", "pod", name, "-n", ns, "-o", "jsonpath={.status.phase}", check=False)
    return out.stdout.strip()


# A run killed before its teardown: a cluster with a Running pod, in a process
# that then gets SIGKILL (its servers die with it; containerd's shims, the
# containers, mounts, network namespaces, iptables and cgroups stay behind).
_KILLED_RUN = """
import json, sys, time
sys.path.insert(0, "tests")
from harness.cluster import Cluster
from harness.procs import wait_until
c = Cluster().start(with_kuberay=False, with_s3=False)
c.plane.kubectl("apply", "-f", "-", input=sys.argv[1].replace("PAUSE", c.node.pause_ref))
get = ("get", "pod", "sleeper", "-o", "jsonpath={.status.phase}")
wait_until(lambda: c.plane.kubectl(*get).stdout == "Running", 90, what="a Running pod")
print(c.dir, flush=True)
time.sleep(600)
"""


def journal_exists() -> bool:
    return JOURNAL.exists()


def test_a_killed_run_is_put_back_by_the_next_start_and_teardown_restores_the_host():
    net = ClusterNetwork()
    assert recover_host(net) == []  # whatever an earlier run on this machine left
    before = HostState(net).snapshot()

    # Round 1: killed with a Running pod, no teardown.
    killed = subprocess.Popen(
        [sys.executable, "-c", _KILLED_RUN, json.dumps(_pod("sleeper", "PAUSE"))],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    try:
        run_dir = Path(killed.stdout.readline().strip())
    finally:
        killed.kill()
        killed.wait()
    assert run_dir.name.startswith("kubetune-cluster-"), run_dir
    left = HostState(net).snapshot()
    for part in ("links", "netns", "mounts", "nft_tables"):
        assert left[part] != before[part], f"the killed run left no {part}?"
    assert journal_exists(), "the killed run kept no journal"

    # Round 2: the next start puts the host back first, runs a pod, tears down.
    c = Cluster()
    try:
        c.start(with_kuberay=False, with_s3=False)
        assert not run_dir.exists(), "the killed run's folder is still there"
        plane = c.plane
        plane.kubectl("apply", "-f", "-", input=json.dumps(_pod("sleeper", c.node.pause_ref)))
        wait_until(lambda p=plane: _phase(p, "sleeper") == "Running", 90, what="a Running pod")
        ip = plane.kubectl("get", "pod", "sleeper", "-o", "jsonpath={.status.podIP}").stdout
        assert ip.startswith("10.203.0."), ip
        during = HostState(net).snapshot()
        assert during != before, "the node changed nothing on the host?"
        print(f"node Ready after {c.timings['node Ready']:.1f}s")
    finally:
        problems = c.stop()
        c.remove_dir()
    assert problems == []
    assert not journal_exists()
    after = HostState(net).snapshot()
    assert after == before, {k: (before[k], after[k]) for k in before if before[k] != after[k]}


def test_dns_the_kubernetes_service_and_egress_rules_from_a_pod(cluster):
    """A pod resolves a Service by its cluster name and reaches the API server
    through the `kubernetes` Service (kube-proxy's DNAT to the node address)."""
    plane = cluster.plane
    probe = (
        "import socket, ssl, urllib.request, urllib.error\n"
        "print(socket.gethostbyname('kubernetes.default.svc.cluster.local'))\n"
        "ctx = ssl._create_unverified_context()\n"
        "try:\n"
        "    url = 'https://kubernetes.default.svc/version'\n"
        "    urllib.request.urlopen(url, context=ctx, timeout=10)\n"
        "except urllib.error.HTTPError as e:\n"
        "    print('api', e.code)\n"
        "else:\n"
        "    print('api', 200)\n"
    )
    pod = _pod("dns-probe", cluster.images["trainer"], ["python", "-c", probe])
    plane.kubectl("apply", "-f", "-", input=json.dumps(pod))
    wait_until(
        lambda: _phase(plane, "dns-probe") in ("Succeeded", "Failed"), 180, what="the probe pod"
    )
    logs = plane.kubectl("logs", "dns-probe").stdout.split()
    assert _phase(plane, "dns-probe") == "Succeeded", logs
    net = cluster.net
    assert logs[0] == net.apiserver_service_ip, logs
    # /version is public to authenticated and anonymous users alike: 200 or 401/403
    # proves a TLS round trip to the API server.
    assert logs[1] == "api" and logs[2] in ("200", "401", "403"), logs
    plane.kubectl("delete", "pod", "dns-probe", "--wait=false")

    # Pod egress outside the harness's range is dropped before any other rule.
    table = run(["nft", "list", "table", "inet", "kubetune_node"]).stdout
    for hook in ("forward", "input"):
        assert f"type filter hook {hook} priority filter - 10; policy accept;" in table, table
    assert f"ip saddr {net.pod_cidr} ip daddr != {net.harness_range} drop" in table, table
    nat = run(["iptables", "-t", "nat", "-S"]).stdout
    assert f"-s {net.pod_cidr} -j MASQUERADE" not in nat
