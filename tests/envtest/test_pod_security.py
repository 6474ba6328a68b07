"""Every pod template the operator renders is admitted by the real API server's
PodSecurity admission under `restricted` (server-side dry run: no kubelet needed),
including the init container KubeRay adds to workers, which copies the Ray
container's securityContext and mounts; and the job's Ray token is never one
that someone else put there."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from harness import wait_until
from kubetune_operator.children import Settings, spec_to_rayjob
from operator_support import OperatorProcess, apply, finetunejob, get, wait_phase

EXAMPLES = Path(__file__).resolve().parents[2] / "crds" / "examples"


def _pods(example: str, image: str | None) -> dict[str, dict]:
    job = yaml.safe_load((EXAMPLES / example).read_text())
    job["metadata"] |= {"namespace": "x", "uid": "0b7c-uid"}
    job["spec"].setdefault("output", {}).setdefault("uri", "s3://bucket/runs")
    if image:
        job["spec"].setdefault("resources", {})["image"] = image
    rj = spec_to_rayjob(job, Settings(trainer_image="example.com/trainer:1"), 1)
    cluster = rj["spec"]["rayClusterSpec"]
    worker = copy.deepcopy(cluster["workerGroupSpecs"][0]["template"])
    ray = worker["spec"]["containers"][0]
    # KubeRay's wait-gcs-ready, as KubeRay v1.6 builds it from the Ray container
    worker["spec"]["initContainers"] = [
        {
            "name": "wait-gcs-ready",
            "image": ray["image"],
            "command": ["/bin/bash", "-lc", "--"],
            "args": ["ray health-check"],
            "securityContext": ray["securityContext"],
            "env": ray["env"],
            "volumeMounts": ray["volumeMounts"],
        }
    ]
    return {
        "head": cluster["headGroupSpec"]["template"],
        "worker": worker,
        "submitter": rj["spec"]["submitterPodTemplate"],
    }


@pytest.mark.parametrize("example", ["lora-minimal.yaml", "qlora.yaml", "dpo.yaml"])
def test_restricted_namespace_admits_every_pod(kube, namespace, example):
    kube.kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted")
    for role, tpl in _pods(example, image="someone/else:1").items():
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"p-{role}"}} | {
            "spec": tpl["spec"]
        }
        out = kube.kubectl(
            "create", "--dry-run=server", "-n", namespace, "-f", "-", "-o", "json",
            input=json.dumps(pod), check=False,
        )  # fmt: skip
        assert out.returncode == 0, (role, out.stderr)
        assert "would violate" not in out.stderr, (role, out.stderr)


def test_restricted_namespace_refuses_a_pod_without_the_context(kube, namespace):
    """The check above can fail: the same pod without its securityContext is refused."""
    kube.kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted")
    spec = copy.deepcopy(_pods("lora-minimal.yaml", None)["head"]["spec"])
    del spec["containers"][0]["securityContext"]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "bare"}, "spec": spec}
    out = kube.kubectl(
        "create", "--dry-run=server", "-n", namespace, "-f", "-", input=json.dumps(pod),
        check=False,
    )  # fmt: skip
    assert out.returncode != 0 and "restricted" in out.stderr, out.stderr


def test_a_token_secret_someone_else_made_is_never_used(kube, namespace, tmp_path):
    """A Secret with the job's token name made first by someone else (who knows
    that token) would open the job's Ray cluster: the job fails NameConflict, its
    RayJob is deleted, and the Secret is left as it was."""
    kube.kubectl(
        "create", "secret", "generic", "stolen-ray-token", "-n", namespace,
        "--from-literal=auth_token=known-to-someone",
    )  # fmt: skip
    before = get(kube, "secret", "stolen-ray-token", namespace)
    op = OperatorProcess(kube, [namespace], tmp_path).start()
    try:
        apply(kube, namespace, finetunejob("stolen"))
        st = wait_phase(kube, "stolen", namespace, "Failed")
        assert st["reason"] == "NameConflict", st
        assert "Secret stolen-ray-token" in st["message"], st["message"]
        wait_until(lambda: not get(kube, "rayjob", "stolen", namespace), 30, what="RayJob gone")
        after = get(kube, "secret", "stolen-ray-token", namespace)
        assert after["data"] == before["data"]
        assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
    finally:
        op.stop()
