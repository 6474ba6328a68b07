"""The chart's `api` block: off by default; on, a hardened Deployment running
`kubetune api`, its Service, the catalog ConfigMap, and RBAC that is exactly
TokenReview + SubjectAccessReview + reading the catalog (the server acts with
each caller's own token, so it needs no FineTuneJob rights and no impersonation).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from kubetune_openai.kube import SERVER_CLUSTER_RULES
from kubetune_openai.mapping import parse_catalog

pytestmark = pytest.mark.envtest

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kubetune"
CATALOG = [
    {
        "id": "smollm2",
        "model": {"name": "HuggingFaceTB/SmolLM2-135M-Instruct"},
        "spec": {"resources": {"workers": 1, "gpusPerWorker": 1}},
    }
]
ON = [
    "--set", "api.enabled=true",
    "--set", "api.filesUri=s3://ml/files",
    "--set", "api.outputUri=s3://ml/runs",
    "--set", "api.endpoint=http://minio.storage:9000",
    "--set", "api.storageSecret=platform-s3",
    "--set", "api.jobSecret=s3-creds",
    "--set-json", f"api.catalog.models={json.dumps(CATALOG)}",
]  # fmt: skip


def _render(helm, *args: str, namespace: str = "ml-platform") -> list[dict]:
    out = helm("template", "kt", str(CHART), "-n", namespace, "--kube-version", "1.35.0", *args)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _api_objects(docs):
    return [
        d
        for d in docs
        if d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "api"
    ]


def test_off_by_default(helm):
    assert _api_objects(_render(helm)) == []


def test_on_renders_a_hardened_server_with_only_the_rbac_it_needs(helm, kube, namespace):
    docs = _api_objects(_render(helm, *ON, namespace=namespace))
    by_kind = {d["kind"]: d for d in docs}
    assert sorted(by_kind) == [
        "ClusterRole", "ClusterRoleBinding", "ConfigMap", "Deployment", "Role", "RoleBinding",
        "Service", "ServiceAccount",
    ]  # fmt: skip
    rules = {
        (g, r): set(rule["verbs"])
        for rule in by_kind["ClusterRole"]["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
    }
    assert rules == SERVER_CLUSTER_RULES
    [role_rule] = by_kind["Role"]["rules"]
    assert role_rule == {
        "apiGroups": [""],
        "resources": ["configmaps"],
        "resourceNames": ["kt-kubetune-api-models"],
        "verbs": ["get"],
    }
    assert "impersonate" not in json.dumps(docs)
    for binding in ("ClusterRoleBinding", "RoleBinding"):
        assert by_kind[binding]["subjects"] == [
            {"kind": "ServiceAccount", "name": "kt-kubetune-api", "namespace": namespace}
        ]
    entries = parse_catalog(yaml.safe_load(by_kind["ConfigMap"]["data"]["models.yaml"]), "chart")
    assert entries["smollm2"].spec == {"resources": {"workers": 1, "gpusPerWorker": 1}}

    pod = by_kind["Deployment"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "kt-kubetune-api"
    assert pod["securityContext"]["runAsNonRoot"] is True
    [container] = pod["containers"]
    assert container["command"] == ["kubetune", "api"]
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
    assert sc["capabilities"]["drop"] == ["ALL"]
    env = {e["name"]: e for e in container["env"]}
    assert env["KUBETUNE_API_FILES_URI"]["value"] == "s3://ml/files"
    assert env["KUBETUNE_API_CATALOG"]["value"] == f"{namespace}/kt-kubetune-api-models"
    assert env["KUBETUNE_API_AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "platform-s3",
        "key": "AWS_SECRET_ACCESS_KEY",
    }
    # Every variable the chart sets is one `kubetune api` reads.
    source = (REPO / "operator/kubetune_openai/cli.py").read_text()
    source += (REPO / "operator/kubetune_openai/store.py").read_text()
    for name in env:
        if name.startswith("KUBETUNE_API_"):
            suffix = name[len("KUBETUNE_API_") :]
            assert f'"{suffix}"' in source or f'"{name}"' in source, name
    service = by_kind["Service"]["spec"]
    assert (
        service["ports"][0]["port"] == 8000
        and service["selector"] == (by_kind["Deployment"]["spec"]["selector"]["matchLabels"])
    )
    assert by_kind["Deployment"]["spec"]["selector"]["matchLabels"] != {
        "app.kubernetes.io/name": "kubetune",
        "app.kubernetes.io/instance": "kt",
        "app.kubernetes.io/component": "operator",
    }
    # The real API server takes every object (a server-side dry run).
    items = json.dumps({"apiVersion": "v1", "kind": "List", "items": docs})
    out = kube.kubectl("apply", "--dry-run=server", "-f", "-", input=items)
    assert out.stdout.count("(server dry run)") == len(docs), out.stdout


def test_lint_and_required_values(helm):
    proc = helm("lint", "--strict", str(CHART), "--kube-version", "1.35.0", *ON, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = helm("template", "kt", str(CHART), "--set", "api.enabled=true", check=False)
    assert proc.returncode != 0 and "api.filesUri is required" in proc.stderr
    proc = helm("template", "kt", str(CHART), *ON, "--set", "api.filesUri=/local", check=False)
    assert proc.returncode != 0 and "schema" in proc.stderr
    tls = _api_objects(_render(helm, *ON, "--set", "api.tlsSecret=api-tls"))
    [deploy] = [d for d in tls if d["kind"] == "Deployment"]
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    assert re.search(r"tls\.crt", json.dumps(container["env"]))
