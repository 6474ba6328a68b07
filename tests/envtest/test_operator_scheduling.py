"""Why the Ray pods wait, in the scheduler's own words: the real kube-scheduler
runs against the test control plane with one Node registered through the API
(no kubelet: nothing ever runs on it), the real KubeRay operator creates the
job's pods, the scheduler marks them Unschedulable, and the operator shows its
message in status within one poll, then fails the job at its start limit.

The Node is tainted and only this test's job tolerates the taint, and it is too
small for any of the job's pods: no pod of this or any other test is ever
bound to it (a bound pod without a kubelet would never finish deleting)."""

from __future__ import annotations

import json
import time
from datetime import datetime

import pytest

from harness import wait_until
from harness.node import scheduler_server
from operator_support import apply, condition, finetunejob, get, wait_phase, wait_status

pytestmark = pytest.mark.envtest

POLL = 1.0  # KUBETUNE_POLL_SECONDS in OperatorProcess
NODE = "kubetune-envtest-node"
TAINT = {"key": "kubetune.io/envtest-node", "value": "true", "effect": "NoSchedule"}
# A small node: the head (2 CPU, 8Gi) and a worker asking for 1Ti fit nowhere.
ALLOCATABLE = {"cpu": "4", "memory": "4Gi", "ephemeral-storage": "100Gi", "pods": "110"}


@pytest.fixture(scope="module")
def scheduler(kube, tmp_path_factory):
    """The real kube-scheduler and one Ready Node that no kubelet backs."""
    node = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": NODE, "labels": {"kubernetes.io/hostname": NODE}},
        "spec": {"taints": [TAINT]},
    }
    kube.kubectl("apply", "-f", "-", input=json.dumps(node))
    # The API server's admission adds node.kubernetes.io/not-ready to a new Node;
    # the node lifecycle controller (not run here) would lift it once Ready.
    taints = json.dumps({"spec": {"taints": [TAINT]}})
    kube.kubectl("patch", "node", NODE, "--type=merge", "-p", taints)
    ready = {
        "type": "Ready",
        "status": "True",
        "reason": "KubeletReady",
        "message": "registered by the test; no kubelet",
        "lastHeartbeatTime": "2026-01-01T00:00:00Z",
        "lastTransitionTime": "2026-01-01T00:00:00Z",
    }
    patch = {"status": {"capacity": ALLOCATABLE, "allocatable": ALLOCATABLE, "conditions": [ready]}}
    kube.kubectl(
        "patch", "node", NODE, "--subresource=status", "--type=merge", "-p", json.dumps(patch)
    )
    server = scheduler_server(kube.kubeconfig, tmp_path_factory.mktemp("scheduler")).start()
    yield server
    server.stop()
    kube.kubectl("delete", "node", NODE, "--wait=false", check=False)


def _ray_pods(kube, namespace) -> list[dict]:
    out = kube.kubectl("get", "pods", "-n", namespace, "-l", "ray.io/cluster", "-o", "json")
    return json.loads(out.stdout)["items"]


def _unschedulable(pod) -> dict | None:
    for c in pod.get("status", {}).get("conditions") or []:
        if c["type"] == "PodScheduled" and c.get("reason") == "Unschedulable":
            return c
    return None


def _time(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ")


def test_unschedulable_pods_say_why_then_the_start_limit_fails_the_job(
    kube, kuberay, namespace, scheduler, operator
):
    limit = 15
    job = finetunejob("big")
    job["spec"]["resources"] = {
        "workers": 1,
        "gpusPerWorker": 0,
        "cpuPerWorker": "1",
        "memoryPerWorker": "1Ti",
        "tolerations": [TAINT | {"operator": "Equal"}],
    }
    job["spec"]["startTimeoutSeconds"] = limit
    apply(kube, namespace, job)
    created = time.monotonic()

    # The scheduler's own words on the worker pod.
    def worker_refused():
        pods = [p for p in _ray_pods(kube, namespace) if _unschedulable(p)]
        workers = [p for p in pods if p["metadata"]["labels"]["ray.io/node-type"] == "worker"]
        return workers[0] if workers else None

    worker = wait_until(worker_refused, 30, what="the scheduler refusing the worker pod")
    said = _unschedulable(worker)
    assert "Insufficient memory" in said["message"], said

    # The head is refused in the same words (it does not fit either) and KubeRay
    # creates it first: the status may name the head alone for a poll.
    def shows_the_worker(s: dict) -> bool:
        message = (condition(s, "PodsScheduled") or {}).get("message") or ""
        return "Ray worker group workers:" in message and said["message"] in message

    st = wait_status(kube, "big", namespace, shows_the_worker, 30, "the worker's reason in status")
    shown = condition(st, "PodsScheduled")
    lag = (_time(shown["lastTransitionTime"]) - _time(said["lastTransitionTime"])).total_seconds()
    print(f"PodsScheduled=False {lag:.0f}s after the scheduler's verdict (poll {POLL}s)")
    assert lag <= POLL + 3, (shown, said)  # one poll, plus the seconds' rounding
    assert shown["status"] == "False" and shown["reason"] == "Unschedulable"
    assert "Ray worker group workers:" in shown["message"] and "hint:" in shown["message"]
    assert st["phase"] == "Starting" and st["reason"] == "Unschedulable"
    assert st["message"] == shown["message"]
    # The default columns of `kubectl get ftj` say why.
    row = kube.kubectl("get", "ftj", "big", "-n", namespace, "--no-headers").stdout.split()
    assert row[1] == "Starting" and "Unschedulable" in row, row

    st = wait_phase(kube, "big", namespace, "Failed", timeout=limit + 30)
    print(f"Failed {time.monotonic() - created:.1f}s after the job was created (limit {limit}s)")
    assert st["reason"] == "StartTimeout", st
    assert f"startTimeoutSeconds ({limit}s)" in st["message"]
    assert said["message"] in st["message"]
    assert condition(st, "Failed")["status"] == "True"
    # Its pods stop holding the namespace's quota and the scheduler's attention.
    wait_until(lambda: get(kube, "rayjob", "big", namespace) is None, 30, what="RayJob deleted")
