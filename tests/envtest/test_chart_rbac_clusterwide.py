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
