"""The real KubeRay operator reconciles RayJobs on the real control plane."""

from __future__ import annotations

import json

from harness import wait_until

RAY_IMAGE = "rayproject/ray:2.52.0"  # never pulled: there is no kubelet


def _rayjob(name: str, cluster_spec: bool = True) -> dict:
    spec: dict = {"entrypoint": "python -c 'print(1)'", "shutdownAfterJobFinishes": True}
    if cluster_spec:
        spec["rayClusterSpec"] = {
            "headGroupSpec": {
                "rayStartParams": {},
                "template": {"spec": {"containers": [{"name": "ray-head", "image": RAY_IMAGE}]}},
            },
            "workerGroupSpecs": [{
                "groupName": "workers", "replicas": 1, "minReplicas": 1, "maxReplicas": 1,
                "rayStartParams": {},
                "template": {"spec": {"containers": [{"name": "ray-worker", "image": RAY_IMAGE}]}},
            }],
        }
    return {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": name}, "spec": spec}


def _get(kube, kind: str, name: str, namespace: str) -> dict | None:
    out = kube.kubectl("get", kind, name, "-n", namespace, "-o", "json", check=False)
    return json.loads(out.stdout) if out.returncode == 0 else None


def test_rayjob_makes_kuberay_create_its_raycluster(kube, kuberay, namespace):
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(_rayjob("minimal")))
    rayjob = _get(kube, "rayjob", "minimal", namespace)

    cluster_name = wait_until(
        lambda: (_get(kube, "rayjob", "minimal", namespace) or {}).get("status", {}).get("rayClusterName"),
        60, what="KubeRay to record the RayCluster name in the RayJob's status")
    cluster = wait_until(lambda: _get(kube, "raycluster", cluster_name, namespace), 60,
                         what=f"KubeRay to create RayCluster {cluster_name}")
    owners = cluster["metadata"].get("ownerReferences", [])
    assert [(o["kind"], o["uid"]) for o in owners] == [("RayJob", rayjob["metadata"]["uid"])]

    # The RayCluster controller in turn makes the head Pod (Pending for ever: no kubelet).
    def head_pods():
        out = kube.kubectl("get", "pods", "-n", namespace, "-l",
                           f"ray.io/cluster={cluster_name},ray.io/node-type=head", "-o", "name")
        return out.stdout.split()

    assert len(wait_until(head_pods, 60, what="KubeRay to create the head Pod")) == 1
    status = _get(kube, "rayjob", "minimal", namespace)["status"]
    assert status.get("jobDeploymentStatus") == "Initializing"


def test_rayjob_that_kuberay_finds_invalid_ends_validation_failed(kube, kuberay, namespace):
    # Valid for the CRD's schema, invalid for KubeRay's own validation.
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(_rayjob("no-cluster", cluster_spec=False)))

    def status():
        s = (_get(kube, "rayjob", "no-cluster", namespace) or {}).get("status", {})
        return s if s.get("jobDeploymentStatus") else None

    s = wait_until(status, 60, what="KubeRay to validate the RayJob")
    assert s["jobDeploymentStatus"] == "ValidationFailed"
    assert s.get("reason") == "ValidationFailed"
    assert "one of RayClusterSpec or ClusterSelector must be set" in s.get("message", "")
