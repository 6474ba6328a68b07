"""helm talks to the real control plane."""

from __future__ import annotations

import json

from harness import versions


def test_helm_is_the_pinned_version(helm):
    assert versions()["HELM_VERSION"] in helm("version", "--short").stdout


def test_helm_installs_and_uninstalls_a_chart(helm, kube, namespace, tmp_path):
    helm("create", str(tmp_path / "demo"))
    helm("install", "demo", str(tmp_path / "demo"), "-n", namespace)
    releases = json.loads(helm("list", "-n", namespace, "-o", "json").stdout)
    assert [(r["name"], r["status"]) for r in releases] == [("demo", "deployed")]
    assert kube.kubectl("get", "deployment", "demo", "-n", namespace).returncode == 0
    helm("uninstall", "demo", "-n", namespace)
    assert kube.kubectl("get", "deployment", "demo", "-n", namespace, check=False).returncode != 0
