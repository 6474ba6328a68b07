"""Checks on single fields that a type alone cannot say: bucket names the object
stores can hold, quantities above zero, no credentials after a URI's path. The
bucket names of tests/admission_cases.py (BAD_BUCKETS, GOOD_BUCKETS) go through
both doors on every URI field there; here: what the messages say and where the
checks stop."""

from __future__ import annotations

import copy

import pytest

from kubetune_api.validation import validate_spec

BASE = {
    "model": {"name": "org/model"},
    "dataset": {"train": {"uri": "s3://bucket/t.jsonl"}},
    "output": {"uri": "s3://bucket/out"},
}

# Every spec field that takes a storage URI, and how to set it alone.
URI_FIELDS = {
    "model.uri": lambda s, v: s["model"].update({"uri": v}) or s["model"].pop("name"),
    "model.fromCheckpoint": lambda s, v: s["model"].update({"fromCheckpoint": v}),
    "dataset.train.uri": lambda s, v: s["dataset"]["train"].update({"uri": v}),
    "dataset.validation.uri": lambda s, v: s["dataset"].update({"validation": {"uri": v}}),
    "dataset.test.uri": lambda s, v: s["dataset"].update({"test": {"uri": v}}),
    "output.uri": lambda s, v: s["output"].update({"uri": v}),
}


def _paths(field: str, value) -> list[str]:
    spec = copy.deepcopy(BASE)
    URI_FIELDS[field](spec, value)
    return [e.path for e in validate_spec(spec).errors]


def test_a_bucket_error_says_the_rules_and_credentials_are_one_error():
    spec = copy.deepcopy(BASE)
    spec["output"]["uri"] = "s3://My_Bucket/out"
    (error,) = validate_spec(spec).errors
    assert "3 to 63 lowercase letters" in error.message and "rename it" in error.message
    # user:password@ is refused for the credentials alone, not for the bucket too
    assert len(_paths("output.uri", "s3://KEY:SECRET@My_Bucket/x")) == 1
    # local paths and other schemes have no bucket
    assert _paths("output.uri", "/mnt/Runs_1/out") == []
    assert _paths("dataset.train.uri", "file:///data/A_B/t.jsonl") == []


QUANTITIES = {
    "resources.cpuPerWorker": "cpu",
    "resources.head.cpu": "cpu",
    "resources.memoryPerWorker": "bytes",
    "resources.scratchPerWorker": "bytes",
    "resources.head.memory": "bytes",
}


def _quantity_paths(field: str, value: str) -> list[str]:
    spec = copy.deepcopy(BASE)
    node = spec
    *parents, leaf = field.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    return [e.path for e in validate_spec(spec).errors]


@pytest.mark.parametrize("field", sorted(QUANTITIES))
def test_every_quantity_field_refuses_zero_in_any_spelling(field):
    for zero in ("0", "00", "0.0", "0m", "0Gi", "0.000Ki"):
        assert _quantity_paths(field, zero) == [f"spec.{field}"], zero
    for some in ("1", "0.001Gi", "100Mi", "10", "1Ki"):
        assert _quantity_paths(field, some) == [], some


@pytest.mark.parametrize("field", sorted(QUANTITIES))
def test_fractions_are_cpu_not_bytes(field):
    """Half a CPU is a request; half a byte (0.5, 500m, 128m meant as 128Mi) is a slip."""
    want = [] if QUANTITIES[field] == "cpu" else [f"spec.{field}"]
    for value in ("500m", "0.5", "1.5", "128m"):
        assert _quantity_paths(field, value) == want, value
    assert _quantity_paths(field, "0.5Gi") == []


def test_credentials_after_the_path_are_refused_in_the_fragment_too():
    for uri in (
        "s3://bucket/x#access_token=abc",
        "s3://bucket/x#/callback?token=abc",
        "s3://bucket/x?a=1#b=2&sig=abc",
    ):
        for field in URI_FIELDS:
            assert _paths(field, uri) == [f"spec.{field}"], (field, uri)
    assert _paths("output.uri", "s3://bucket/x#tokenizer=1") == []
