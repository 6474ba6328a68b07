"""The kubetune CRD and every example in crds/examples against the real API server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.bins import REPO_ROOT

CRD_FILE = REPO_ROOT / "crds" / "kubetune.io_finetunejobs.yaml"
EXAMPLES = sorted((REPO_ROOT / "crds" / "examples").glob("*.yaml"))
INVALID = sorted((REPO_ROOT / "crds" / "examples" / "invalid").glob("*.yaml"))


def _ids(paths):
    return [p.name for p in paths]


def test_kubetune_crd_is_established(kube, kubetune_crd):
    assert CRD_FILE.is_file(), f"{CRD_FILE.relative_to(REPO_ROOT)} is missing"
    crd = json.loads(kube.kubectl("get", "crd", "finetunejobs.kubetune.io", "-o", "json").stdout)
    established = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    assert established.get("Established") == "True"
    assert established.get("NamesAccepted") == "True"
    # A structural schema: the API server reports no NonStructuralSchema condition.
    assert "NonStructuralSchema" not in established


def test_there_are_examples():
    assert EXAMPLES, "crds/examples/*.yaml: no examples to test"


@pytest.mark.parametrize("example", EXAMPLES, ids=_ids(EXAMPLES))
def test_example_applies(kube, kubetune_crd, namespace, example: Path):
    out = kube.kubectl("apply", "-n", namespace, "-f", str(example), "-o", "json")
    obj = json.loads(out.stdout)
    items = obj.get("items", [obj])
    assert items and all(i["kind"] for i in items)
    for item in items:
        got = kube.kubectl("get", item["kind"], item["metadata"]["name"], "-n", namespace, "-o", "json")
        assert json.loads(got.stdout)["metadata"]["uid"] == item["metadata"]["uid"]


def _expectations(path: Path) -> list[str]:
    return [line.split(":", 1)[1].strip() for line in path.read_text().splitlines()
            if line.strip().startswith("# expect:")]


@pytest.mark.parametrize("example", INVALID, ids=_ids(INVALID))
def test_invalid_example_is_rejected_by_the_server(kube, kubetune_crd, namespace, example: Path):
    expected = _expectations(example)
    assert expected, f"{example.name}: add a '# expect: <part of the API server's error>' line"
    out = kube.kubectl("apply", "-n", namespace, "-f", str(example), check=False)
    assert out.returncode != 0, f"{example.name} was accepted:\n{out.stdout}"
    for text in expected:
        assert text in out.stderr, f"{example.name}: {text!r} not in the server's answer:\n{out.stderr}"
