"""The control plane itself is real: versions, RBAC, garbage collection, namespace deletion."""

from __future__ import annotations

import json
import secrets

from harness import versions, wait_until


def test_server_version_is_the_pinned_one(kube):
    out = json.loads(kube.kubectl("version", "-o", "json").stdout)
    pinned = versions()["K8S_VERSION"]
    assert out["serverVersion"]["gitVersion"] == pinned
    assert out["clientVersion"]["gitVersion"] == pinned


def test_rbac_is_enforced(kube, namespace):
    def can(user: str) -> str:
        return kube.kubectl("auth", "can-i", "list", "configmaps", "-n", namespace, f"--as={user}",
                            check=False).stdout.strip()

    user = f"alice-{secrets.token_hex(3)}"
    assert can(user) == "no"
    kube.kubectl("create", "role", "cm-reader", "-n", namespace, "--verb=list", "--resource=configmaps")
    kube.kubectl("create", "rolebinding", "cm-reader", "-n", namespace, "--role=cm-reader", f"--user={user}")
    wait_until(lambda: can(user) == "yes", 10, what="the RoleBinding to take effect")


def test_garbage_collector_deletes_owned_objects(kube, namespace):
    kube.kubectl("create", "configmap", "owner", "-n", namespace)
    uid = kube.kubectl("get", "configmap", "owner", "-n", namespace, "-o", "jsonpath={.metadata.uid}").stdout
    child = {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "child", "namespace": namespace, "ownerReferences": [
            {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid}]},
    }
    kube.kubectl("apply", "-f", "-", input=json.dumps(child))
    kube.kubectl("delete", "configmap", "owner", "-n", namespace)
    wait_until(lambda: kube.kubectl("get", "configmap", "child", "-n", namespace, check=False).returncode != 0,
               30, what="the garbage collector to delete the child ConfigMap")


def test_namespace_deletion_completes(kube):
    ns = f"t-nsdelete-{secrets.token_hex(3)}"
    kube.kubectl("create", "namespace", ns)
    kube.kubectl("create", "configmap", "data", "-n", ns)
    kube.kubectl("delete", "namespace", ns, "--wait=false")
    wait_until(lambda: kube.kubectl("get", "namespace", ns, check=False).returncode != 0, 60,
               what="the namespace controller to finish deleting the namespace")


def test_service_account_controller_runs(kube, namespace):
    wait_until(lambda: kube.kubectl("get", "serviceaccount", "default", "-n", namespace, check=False).returncode == 0,
               30, what="the default ServiceAccount")
