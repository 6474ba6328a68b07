"""The Helm chart: lint, render, install into the real API server, least-privilege RBAC.

The operator-reconciles-as-the-chart's-ServiceAccount test lives in
test_chart_operator.py; this file checks the chart itself.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kubetune"

VALUE_SETS = {
    "defaults": [],
    "namespaced": ["--set", "watch.namespaces={team-a,team-b}"],
    "monitoring": [
        "--set",
        "metrics.serviceMonitor.enabled=true",
        "--set",
        "metrics.serviceMonitor.labels.release=prom",
    ],
    "no-metrics-existing-sa": [
        "--set",
        "metrics.enabled=false",
        "--set",
        "serviceAccount.create=false",
        "--set",
        "serviceAccount.name=platform-sa",
        "--set",
        "commonLabels.team=ml",
    ],
}

# What the operator's code needs (docs/helm.md lists each with the code that uses it).
NAMESPACED_RULES = {
    ("kubetune.io", "finetunejobs"): {"get", "list", "watch", "patch"},
    ("kubetune.io", "finetunejobs/status"): {"patch"},
    ("kubetune.io", "finetunejobs/finalizers"): {"update"},
    ("ray.io", "rayjobs"): {"get", "list", "watch", "create", "patch", "delete"},
    ("", "configmaps"): {"get", "create", "patch", "delete"},
    ("", "secrets"): {"get", "create"},
    ("networking.k8s.io", "networkpolicies"): {"get", "create"},
    ("kueue.x-k8s.io", "localqueues"): {"get"},
    ("", "events"): {"create"},
}
# Rules for APIs this control plane does not serve (Kueue is optional).
UNSERVED_GROUPS = {"kueue.x-k8s.io"}
CLUSTER_RULES = {
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"},
    ("", "namespaces"): {"list", "watch"},
}


def _render(helm, *args: str) -> list[dict]:
    out = helm(
        "template",
        "kt",
        str(CHART),
        "--namespace",
        "kubetune-system",
        "--kube-version",
        "1.35.0",
        *args,
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def _operator_cluster_roles(docs: list[dict]) -> list[dict]:
    """The operator's ClusterRoles, not the aggregated ones for people."""
    return [
        d
        for d in docs
        if d["kind"] == "ClusterRole"
        and not any(k.startswith(AGGREGATE) for k in d["metadata"]["labels"])
    ]


AGGREGATE = "rbac.authorization.k8s.io/aggregate-to-"


def _rules(obj: dict) -> dict[tuple[str, str], set[str]]:
    table: dict[tuple[str, str], set[str]] = {}
    for rule in obj["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                table.setdefault((group, resource), set()).update(rule["verbs"])
    return table


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_lint_strict(helm, name):
    proc = helm(
        "lint", "--strict", str(CHART), "--kube-version", "1.35.0", *VALUE_SETS[name], check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_values_schema_rejects_bad_values(helm):
    for bad in (
        ["--set", "trainer.rayVersion=latest"],
        ["--set", "logLevel=LOUD"],
        ["--set", "watch.namespaces={Bad_Name}"],
        ["--set", "unknownKey=1"],
        ["--set", "storage.endpointAllowlist={ftp://host}"],
        ["--set", "storage.endpointAllowlist={https://host/path}"],
        ["--set", "storage.readsPerNamespace=0"],
    ):
        proc = helm("template", "kt", str(CHART), *bad, check=False)
        assert proc.returncode != 0, bad
        assert "values don't meet the specifications of the schema" in proc.stderr, proc.stderr


def test_every_value_has_a_comment():
    lines = (CHART / "values.yaml").read_text().splitlines()
    in_resources = False
    for i, line in enumerate(lines):
        if not re.match(r"^\s*[A-Za-z]\w*:", line):
            continue
        if not line.startswith(" "):
            in_resources = line.startswith("resources:")
        elif in_resources:
            continue  # requests/limits: Kubernetes' own, documented there
        previous = next(p.strip() for p in reversed(lines[:i]) if p.strip())
        assert previous.startswith("#"), f"values.yaml line {i + 1} has no comment: {line}"


def test_chart_crds_equal_generated_crds():
    for crd in (REPO / "crds").glob("*.yaml"):
        assert (CHART / "crds" / crd.name).read_text() == crd.read_text(), crd.name
    assert {p.name for p in (CHART / "crds").glob("*.yaml")} == {
        p.name for p in (REPO / "crds").glob("*.yaml")
    }


def test_deployment_is_hardened_and_single_active(helm):
    docs = _render(helm)
    deploy = next(d for d in docs if d["kind"] == "Deployment")
    spec = deploy["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert "--standalone" in container["args"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["KUBETUNE_TRAINER_IMAGE"] == "ghcr.io/kubetune/kubetune-trainer:0.1.0"
    assert env["KUBETUNE_RAY_VERSION"] == "2.60.0"
    assert env["KUBETUNE_STORAGE_READS_PER_NAMESPACE"] == "4"
    assert container["image"] == "ghcr.io/kubetune/kubetune-operator:0.1.0"


def test_cluster_wide_rbac_is_exactly_what_the_operator_uses(helm):
    docs = _render(helm)
    (role,) = _operator_cluster_roles(docs)
    assert _rules(role) == {**NAMESPACED_RULES, **CLUSTER_RULES}
    assert not [d for d in docs if d["kind"] in ("Role", "RoleBinding")]


def test_namespaced_rbac_gives_roles_only_where_watched(helm):
    docs = _render(helm, *VALUE_SETS["namespaced"])
    (role,) = _operator_cluster_roles(docs)
    assert _rules(role) == CLUSTER_RULES
    roles = {d["metadata"]["namespace"]: _rules(d) for d in docs if d["kind"] == "Role"}
    assert roles == {"team-a": NAMESPACED_RULES, "team-b": NAMESPACED_RULES}
    bindings = [d for d in docs if d["kind"] == "RoleBinding"]
    assert {b["metadata"]["namespace"] for b in bindings} == {"team-a", "team-b"}
    args = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"][
        "containers"
    ][0]["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args


def test_optional_objects_follow_their_values(helm):
    kinds = lambda docs: sorted(d["kind"] for d in docs)  # noqa: E731
    assert "ServiceMonitor" not in kinds(_render(helm))
    monitored = _render(helm, *VALUE_SETS["monitoring"])
    sm = next(d for d in monitored if d["kind"] == "ServiceMonitor")
    assert sm["metadata"]["labels"]["release"] == "prom"
    bare = _render(helm, *VALUE_SETS["no-metrics-existing-sa"])
    assert "Service" not in kinds(bare) and "ServiceAccount" not in kinds(bare)
    deploy = next(d for d in bare if d["kind"] == "Deployment")
    assert deploy["spec"]["template"]["spec"]["serviceAccountName"] == "platform-sa"
    assert all(d["metadata"]["labels"]["team"] == "ml" for d in bare)


def test_install_into_the_real_api_server_and_rbac_denies_the_rest(helm, kube, namespace):
    release = f"kt-{namespace}"[:40]
    helm(
        "install",
        release,
        str(CHART),
        "-n",
        namespace,
        "--set",
        f"watch.namespaces={{{namespace}}}",
        "--wait=false",
    )
    status = json.loads(helm("status", release, "-n", namespace, "-o", "json").stdout)
    assert status["info"]["status"] == "deployed"
    assert kube.kubectl("get", "crd", "finetunejobs.kubetune.io").returncode == 0
    assert "kubectl apply -f finetunejob.yaml" in status["info"]["notes"]
    sa = f"system:serviceaccount:{namespace}:{release}-kubetune"[:200]
    sa_name = kube.kubectl(
        "get",
        "deploy",
        "-n",
        namespace,
        "-o",
        "jsonpath={.items[0].spec.template.spec.serviceAccountName}",
    ).stdout
    sa = f"system:serviceaccount:{namespace}:{sa_name}"

    def can(verb: str, resource: str, ns: str | None = namespace) -> bool:
        args = ["auth", "can-i", verb, resource, f"--as={sa}"]
        if "/" in resource.split(".")[0]:  # finetunejobs/status.kubetune.io
            name, group = resource.split(".", 1) if "." in resource else (resource, "")
            base, sub = name.split("/")
            args = [
                "auth",
                "can-i",
                verb,
                f"{base}.{group}".rstrip("."),
                f"--subresource={sub}",
                f"--as={sa}",
            ]
        args += ["-n", ns] if ns else []
        return kube.kubectl(*args, check=False).stdout.strip() == "yes"

    def can_unserved(verb: str, group: str, resource: str) -> bool:
        """`kubectl auth can-i` needs the API in discovery; Kueue is not installed
        here, so ask the authorizer directly (a SelfSubjectAccessReview as the SA)."""
        review = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SelfSubjectAccessReview",
            "spec": {
                "resourceAttributes": {
                    "verb": verb,
                    "group": group,
                    "resource": resource,
                    "namespace": namespace,
                }
            },
        }
        out = kube.kubectl(
            "create", "-f", "-", "-o", "json", f"--as={sa}", input=json.dumps(review)
        )
        return json.loads(out.stdout)["status"].get("allowed") is True

    for (group, resource), verbs in NAMESPACED_RULES.items():
        target = f"{resource}.{group}" if group else resource
        for verb in verbs:
            if group in UNSERVED_GROUPS:
                assert can_unserved(verb, group, resource), (verb, target)
            else:
                assert can(verb, target), (verb, target)
    # Not needed, so denied: other verbs, other resources, other namespaces.
    denied = [
        ("list", "secrets"),
        ("watch", "secrets"),
        ("update", "secrets"),
        ("delete", "secrets"),
        ("patch", "networkpolicies.networking.k8s.io"),
        ("create", "pods"),
        ("delete", "finetunejobs.kubetune.io"),
        ("create", "finetunejobs.kubetune.io"),
        ("update", "rayclusters.ray.io"),
        ("create", "deployments.apps"),
        ("list", "configmaps"),
    ]
    for verb, resource in denied:
        assert not can(verb, resource), (verb, resource)
    assert not can("get", "rayjobs.ray.io", ns="default")
    assert not can("create", "nodes", ns=None)
    helm("uninstall", release, "-n", namespace)
    assert kube.kubectl("get", "clusterrole", f"{release}-kubetune", check=False).returncode != 0


def test_people_roles_aggregate_into_edit_and_view(helm):
    docs = _render(helm)
    people = {
        d["metadata"]["name"]: d
        for d in docs
        if d["kind"] == "ClusterRole" and d not in _operator_cluster_roles(docs)
    }
    assert set(people) == {"kt-kubetune-edit", "kt-kubetune-view"}
    edit, view = people["kt-kubetune-edit"], people["kt-kubetune-view"]
    aggregates = lambda role: {  # noqa: E731
        k.removeprefix(AGGREGATE)
        for k, v in role["metadata"]["labels"].items()
        if v == "true" and k.startswith(AGGREGATE)
    }
    assert aggregates(edit) == {"edit", "admin"} and aggregates(view) == {"view"}
    assert _rules(edit) == {
        ("kubetune.io", "finetunejobs"): {
            "create",
            "delete",
            "deletecollection",
            "get",
            "list",
            "patch",
            "update",
            "watch",
        }
    }
    # Status is the operator's: nobody's role writes it.
    assert _rules(view) == {
        ("kubetune.io", "finetunejobs"): {"get", "list", "watch"},
        ("kubetune.io", "finetunejobs/status"): {"get", "list", "watch"},
    }
    off = _render(helm, "--set", "rbac.aggregateToDefaultRoles=false")
    assert not [
        d for d in off if d["kind"] == "ClusterRole" and d not in _operator_cluster_roles(off)
    ]


def test_endpoint_allowlist_default_is_the_operators(helm):
    """The chart's default allowlist and the operator's built-in one are the same list."""
    from kubetune_operator.endpoints import DEFAULT_ALLOWLIST, ENV

    def env(docs):
        deploy = next(d for d in docs if d["kind"] == "Deployment")
        container = deploy["spec"]["template"]["spec"]["containers"][0]
        return {e["name"]: e.get("value") for e in container["env"]}[ENV]

    assert env(_render(helm)).split(",") == list(DEFAULT_ALLOWLIST)
    custom = _render(helm, "--set", "storage.endpointAllowlist={http://minio.s3.svc:9000}")
    assert env(custom) == "http://minio.s3.svc:9000"
    assert env(_render(helm, "--set-json", "storage.endpointAllowlist=[]")) == ""
