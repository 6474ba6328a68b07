"""The CRD is generated from the models, structural, and in sync with crds/."""

from pathlib import Path

import yaml

from kubetune_api import models
from kubetune_api.crd import CRD_FILENAME, build_crd
from kubetune_api.rules import RULES
from kubetune_cli.main import crd_yaml

REPO = Path(__file__).resolve().parents[2]


def _walk(node, path="$"):
    yield path, node
    if isinstance(node, dict):
        for key, sub in node.get("properties", {}).items():
            yield from _walk(sub, f"{path}.{key}")
        if isinstance(node.get("items"), dict):
            yield from _walk(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict):
            yield from _walk(node["additionalProperties"], f"{path}{{}}")


def _root():
    return build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_committed_crd_matches_the_models():
    committed = (REPO / "crds" / CRD_FILENAME).read_text()
    assert committed == crd_yaml(), "crds/ drifted: run `kubetune crd --write crds/`"


def test_schema_is_structural():
    forbidden = {"$ref", "anyOf", "oneOf", "allOf", "not", "const", "title", "$defs"}
    for path, node in _walk(_root()):
        if node.get("x-kubernetes-int-or-string"):
            # the one anyOf a structural schema allows: it names the two types
            assert node.get("anyOf") == [{"type": "integer"}, {"type": "string"}], path
            node = {k: v for k, v in node.items() if k != "anyOf"}
        assert not forbidden & set(node), (path, forbidden & set(node))
        assert "type" in node or node.get("x-kubernetes-int-or-string"), path
        assert not ("properties" in node and "additionalProperties" in node), path
        assert node.get("default", 0) is not None, path
        assert "nullable" not in node, path  # explicit nulls are pruned: has() == set
        for key in ("exclusiveMinimum", "exclusiveMaximum"):
            assert isinstance(node.get(key, True), bool), (path, key)


def test_every_spec_field_is_documented_for_kubectl_explain():
    spec = _root()["properties"]["spec"]
    undocumented = [
        p
        for p, n in _walk(spec)
        if p != "$" and not p.endswith(("[]", "{}")) and "description" not in n
    ]
    # Toleration fields mirror core/v1 and are self-explanatory.
    undocumented = [p for p in undocumented if ".tolerations[]" not in p]
    assert undocumented == []


def test_strings_and_lists_are_bounded_for_cel_cost():
    for path, node in _walk(_root()["properties"]["spec"]):
        if node.get("type") == "string" and "enum" not in node:
            assert "maxLength" in node, path
        if node.get("type") == "array":
            assert "maxItems" in node, path


def test_cel_rules_sit_where_the_table_says():
    spec = _root()["properties"]["spec"]
    for rule in RULES:
        if rule.cel is None:
            continue
        node = spec
        for key in rule.path:
            node = node["properties"][key]
        rules = [v["rule"] for v in node.get("x-kubernetes-validations", [])]
        assert rule.cel in rules, rule.id


def test_nested_objects_default_to_their_filled_defaults():
    # The API server checks a default against the CEL rules without defaulting inside
    # it, so `default: {}` would fail rules that read defaulted fields: the generator
    # writes out each nested object's defaults instead.
    spec = _root()["properties"]["spec"]["properties"]
    assert spec["distributed"]["default"] == {
        "zeroStage": "auto",
        "offloadOptimizer": False,
        "offloadParameters": False,
    }
    assert spec["resources"]["default"]["workers"] == 1
    assert spec["resources"]["default"]["head"] == {"cpu": "2", "memory": "8Gi"}
    for name in ("method", "hyperparameters", "distributed", "resources", "output"):
        assert isinstance(spec[name]["default"], dict), name
    assert "default" not in spec["model"] and "default" not in spec["dataset"]
    assert set(_root()["properties"]["spec"]["required"]) == {"model", "dataset"}
    # an optional block's own blocks too: set, a sweep has its early termination
    assert spec["sweep"]["properties"]["earlyStopping"]["default"] == {
        "enabled": True,
        "reductionFactor": 3,
    }
    assert "default" not in spec["sweep"]


def test_every_default_has_its_fields_type():
    """The API server refuses a CRD whose default does not fit its own schema."""
    kinds = {"object": dict, "array": list, "string": str, "boolean": bool}
    for path, node in _walk(_root()):
        if "default" in node and node.get("type") in kinds:
            assert isinstance(node["default"], kinds[node["type"]]), path


def test_names_printer_columns_and_status_subresource():
    crd = build_crd()
    assert crd["metadata"]["name"] == "finetunejobs.kubetune.io"
    names = crd["spec"]["names"]
    assert (names["kind"], names["plural"], names["shortNames"]) == (
        models.KIND,
        "finetunejobs",
        ["ftj"],
    )
    version = crd["spec"]["versions"][0]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Phase"] == ".status.phase"
    assert columns["Progress"] == ".status.progress.display"
    assert columns["Loss"] == ".status.metrics.displayLoss"
    assert columns["Age"] == ".metadata.creationTimestamp"
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    for field in (
        "phase",
        "conditions",
        "observedGeneration",
        "progress",
        "metrics",
        "checkpoints",
        "outputs",
        "rayJobName",
        "attempts",
    ):
        assert field in status, field


def test_crd_yaml_round_trips():
    assert yaml.safe_load(crd_yaml()) == build_crd()


def test_committed_api_reference_matches_the_models():
    from kubetune_cli.main import api_reference_markdown

    committed = (REPO / "docs" / "api-reference.md").read_text()
    assert committed == api_reference_markdown(), "run `kubetune crd --write crds/ --docs docs/`"
    assert "| `spec.hyperparameters.batchSize` | integer | `4` |" in committed
