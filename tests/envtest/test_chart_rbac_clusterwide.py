"""Cluster-wide install (the default): the chart installs into the real API server,
and its RBAC grants what the operator needs and no more (checked by the real RBAC
authorizer)."""

from __future__ import annotations

import json

import pytest

from harness.bins import REPO_ROOT

CHART = REPO_ROOT / "charts" / "kubetune"


@pytest.fixture
def release(helm, namespace):
    assert CHART.is_dir(), "charts/kubetune is missing"
    # The harness has applied crds/ already (and a rejected CRD fails test_crds).
    helm("install", "kubetune", str(CHART), "-n", namespace, "--skip-crds")
    yield "kubetune"
    helm("uninstall", "kubetune", "-n", namespace)


def test_chart_installs(helm, kube, namespace, release):
    releases = json.loads(helm("list", "-n", namespace, "-o", "json").stdout)
    assert [(r["name"], r["status"]) for r in releases] == [(release, "deployed")]
    out = kube.kubectl("get", "deployment", release, "-n", namespace, "-o", "json")
    deploy = json.loads(out.stdout)
    assert deploy["spec"]["template"]["spec"]["serviceAccountName"] == release


@pytest.mark.parametrize(
    ("verb", "resource", "scope", "allowed"),
    [
        ("watch", "finetunejobs.kubetune.io", "--all-namespaces", "yes"),
        ("patch", "finetunejobs.kubetune.io/status", "--all-namespaces", "yes"),
        ("create", "rayjobs.ray.io", "--all-namespaces", "yes"),
        ("delete", "rayjobs.ray.io", "--all-namespaces", "yes"),
        ("create", "configmaps", "--all-namespaces", "yes"),
        ("get", "secrets", "--all-namespaces", "yes"),
        ("list", "secrets", "--all-namespaces", "no"),
        ("create", "pods", "--all-namespaces", "no"),
        ("delete", "finetunejobs.kubetune.io", "--all-namespaces", "no"),
        ("create", "clusterroles.rbac.authorization.k8s.io", "", "no"),
    ],
)
def test_chart_rbac_as_the_operator(
    request, kube, namespace, release, verb, resource, scope, allowed
):
    if "kubetune.io" in resource:
        # kubectl resolves the resource through discovery: needs the CRD served.
        request.getfixturevalue("kubetune_crd")
    sa = f"system:serviceaccount:{namespace}:{release}"
    args = ["auth", "can-i", verb, resource, f"--as={sa}"] + ([scope] if scope else [])
    out = kube.kubectl(*args, check=False)
    assert out.stdout.strip() == allowed, f"{' '.join(args)}: {out.stdout}{out.stderr}"


def test_people_bound_to_edit_create_jobs_and_to_view_only_read(
    kube, namespace, release, kubetune_crd
):
    """The chart's kubetune-edit/-view join Kubernetes' `edit`/`view` (the real
    aggregation controller), so ordinary RoleBindings to those roles are enough."""
    from harness import wait_until
    from operator_support import finetunejob

    def aggregated(role: str) -> bool:
        rules = json.loads(kube.kubectl("get", "clusterrole", role, "-o", "json").stdout)["rules"]
        return any("finetunejobs" in (r.get("resources") or []) for r in rules)

    for role in ("edit", "view", "admin"):
        wait_until(lambda role=role: aggregated(role), 30, what=f"finetunejobs in {role}")
    for user, role in (("alice", "edit"), ("bob", "view")):
        kube.kubectl(
            "create", "rolebinding", f"{user}-{role}", f"--clusterrole={role}",
            f"--user={user}", "-n", namespace,
        )  # fmt: skip

    def can(user: str, verb: str, *extra: str, ns: str = namespace) -> bool:
        args = ["auth", "can-i", verb, "finetunejobs.kubetune.io", *extra, f"--as={user}"]
        return kube.kubectl(*args, "-n", ns, check=False).stdout.strip() == "yes"

    for verb in ("create", "delete", "patch", "update", "get", "list", "watch"):
        assert can("alice", verb), verb
    for verb in ("get", "list", "watch"):
        assert can("bob", verb), verb
    for verb in ("create", "delete", "patch", "update", "deletecollection"):
        assert not can("bob", verb), verb
    for user in ("alice", "bob"):  # status is the operator's
        assert not can(user, "patch", "--subresource=status"), user
        assert not can(user, "create", ns="default"), user  # bound in one namespace only

    # And for real: the API server takes alice's job and refuses bob's.
    job = json.dumps(finetunejob("by-alice"))
    made = kube.kubectl("create", "-n", namespace, "-f", "-", "--as=alice", input=job)
    assert made.returncode == 0, made.stderr
    denied = kube.kubectl(
        "create", "-n", namespace, "-f", "-", "--as=bob", input=job.replace("alice", "bob"),
        check=False,
    )  # fmt: skip
    assert denied.returncode != 0 and "forbidden" in denied.stderr.lower(), denied.stderr
    seen = kube.kubectl("get", "ftj", "by-alice", "-n", namespace, "--as=bob", check=False)
    assert seen.returncode == 0, seen.stderr
