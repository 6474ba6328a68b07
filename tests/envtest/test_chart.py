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
    # Two replicas, one acting: the holder of the Lease (leader.py); a rolling update
    # starts a standby before it stops an old pod.
    assert spec["replicas"] == 2
    assert spec["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
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
    assert {
        "--leader-elect",
        "--lease-namespace=kubetune-system",
        "--lease-name=kt-kubetune",
    } <= set(container["args"])
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["KUBETUNE_LEASE_DURATION_SECONDS"] == "15"
    assert env["KUBETUNE_LEASE_RENEW_DEADLINE_SECONDS"] == "10"
    assert env["KUBETUNE_LEASE_RETRY_SECONDS"] == "2"
    pod_name = next(e for e in container["env"] if e["name"] == "KUBETUNE_POD_NAME")
    assert pod_name["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["KUBETUNE_TRAINER_IMAGE"] == "ghcr.io/kubetune/kubetune-trainer:0.1.0"
    assert env["KUBETUNE_RAY_VERSION"] == "2.60.0"
    assert env["KUBETUNE_STORAGE_READS_PER_NAMESPACE"] == "4"
    assert container["image"] == "ghcr.io/kubetune/kubetune-operator:0.1.0"


def _leader_role(docs: list[dict]) -> dict:
    (role,) = [d for d in docs if d["kind"] == "Role" and d["metadata"]["name"].endswith("-leader")]
    return role


def test_pdb_and_spread_follow_the_replicas(helm):
    docs = _render(helm)
    deploy = next(d for d in docs if d["kind"] == "Deployment")
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    (pdb,) = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    assert pdb["apiVersion"] == "policy/v1" and pdb["spec"]["minAvailable"] == 1
    selector = pdb["spec"]["selector"]["matchLabels"]
    assert selector == deploy["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    assert selector["app.kubernetes.io/component"] == "operator"  # not the API server's pods
    [term] = deploy["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"
    ]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"] == selector

    # One replica: no budget (minAvailable 1 would block every drain of its node).
    single = _render(helm, "--set", "replicas=1")
    assert not [d for d in single if d["kind"] == "PodDisruptionBudget"]
    assert next(d for d in single if d["kind"] == "Deployment")["spec"]["replicas"] == 1
    # Affinity of one's own replaces the default spread.
    pool = {"key": "pool", "operator": "In", "values": ["system"]}
    required = {"nodeSelectorTerms": [{"matchExpressions": [pool]}]}
    zone = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": required}}
    custom = _render(helm, "--set-json", f"affinity={json.dumps(zone)}")
    assert (
        next(d for d in custom if d["kind"] == "Deployment")["spec"]["template"]["spec"]["affinity"]
        == zone
    )


def test_lease_timing_that_could_give_two_leaders_is_refused(helm):
    for bad, says in (
        (["--set", "leaderElection.renewDeadlineSeconds=15"], "renewDeadlineSeconds"),
        (["--set", "leaderElection.retryPeriodSeconds=10"], "retryPeriodSeconds"),
        (["--set", "leaderElection.leaseDurationSeconds=0"], "leaseDurationSeconds"),
    ):
        proc = helm("template", "kt", str(CHART), *bad, check=False)
        assert proc.returncode != 0, bad
        assert says in proc.stderr, proc.stderr


def test_cluster_wide_rbac_is_exactly_what_the_operator_uses(helm):
    docs = _render(helm)
    (role,) = _operator_cluster_roles(docs)
    assert _rules(role) == {**NAMESPACED_RULES, **CLUSTER_RULES}
    # In the release namespace, only the Lease: create it, then read and renew that one.
    leader = _leader_role(docs)
    assert leader["metadata"]["namespace"] == "kubetune-system"
    assert leader["rules"] == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "resourceNames": ["kt-kubetune"],
            "verbs": ["get", "update"],
        },
    ]
    assert [d["metadata"]["name"] for d in docs if d["kind"] in ("Role", "RoleBinding")] == [
        "kt-kubetune-leader",
        "kt-kubetune-leader",
    ]
    binding = next(d for d in docs if d["kind"] == "RoleBinding")
    assert binding["roleRef"]["name"] == "kt-kubetune-leader"
    assert binding["subjects"][0]["name"] == "kt-kubetune"


def test_namespaced_rbac_gives_roles_only_where_watched(helm):
    docs = _render(helm, *VALUE_SETS["namespaced"])
    (role,) = _operator_cluster_roles(docs)
    assert _rules(role) == CLUSTER_RULES
    leader = _leader_role(docs)
    roles = {
        d["metadata"]["namespace"]: _rules(d) for d in docs if d["kind"] == "Role" and d != leader
    }
    assert roles == {"team-a": NAMESPACED_RULES, "team-b": NAMESPACED_RULES}
    assert leader["metadata"]["namespace"] == "kubetune-system"
    bindings = [d for d in docs if d["kind"] == "RoleBinding"]
    assert {b["metadata"]["namespace"] for b in bindings} == {"team-a", "team-b", "kubetune-system"}
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
    # Leader election: its own Lease only, in the release namespace.
    lease = f"leases.coordination.k8s.io/{sa_name}"  # both named after the release
    assert can("create", "leases.coordination.k8s.io")
    assert can("get", lease) and can("update", lease)
    assert not can("get", "leases.coordination.k8s.io/kube-scheduler")
    assert not can("list", "leases.coordination.k8s.io")
    assert not can("delete", lease)
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
