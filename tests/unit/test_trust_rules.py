"""The operator's trust rules as pure functions: where it may read with its own
identity (the endpoint allowlist), and which objects with a child's name are
the job's (ownership). The envtest tier proves both against the real API
server (tests/envtest/test_operator_trust.py)."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from kubetune_operator.endpoints import DEFAULT_ALLOWLIST, Allowlist, endpoint_problem
from kubetune_operator.ownership import ChildConflict, Owner, check, describe_owners, owner_of
from kubetune_operator.validate import spec_error_status

DEFAULT = Allowlist.from_env(None)


@pytest.mark.parametrize(
    "endpoint",
    [
        "https://s3.amazonaws.com",
        "https://s3.eu-west-1.amazonaws.com/",
        "https://S3.US-EAST-1.amazonaws.com:443",
        "https://s3.dualstack.us-east-2.amazonaws.com",
        "https://s3-fips.us-gov-west-1.amazonaws.com",
        "https://s3.cn-north-1.amazonaws.com.cn",
        "https://storage.googleapis.com",
    ],
)
def test_default_allowlist_takes_the_clouds_public_endpoints(endpoint):
    assert DEFAULT.allows(endpoint)


@pytest.mark.parametrize(
    "endpoint",
    [
        "http://s3.amazonaws.com",  # plain http: not the public endpoint
        "https://s3.amazonaws.com:8443",
        "https://s3.amazonaws.com.evil.example",
        "https://evil.s3.eu-west-1.amazonaws.com",  # a bucket's virtual host
        "https://s3.a.b.amazonaws.com",  # `*` is one label, never two
        "https://ec2-1-2-3-4.compute-1.amazonaws.com",  # a tenant's own VM
        "https://abc.execute-api.us-east-1.amazonaws.com",
        "http://127.0.0.1:9000",
        "https://minio.team-a.svc:9000",
        "https://[::1]:99999",  # a port out of range: refused, not a crash
        "not a url",
    ],
)
def test_default_allowlist_refuses_everything_else(endpoint):
    assert not DEFAULT.allows(endpoint)


def test_allowlist_entries_and_env():
    allow = Allowlist.from_env("http://minio.storage.svc:9000, s3.*.example.com")
    assert allow.allows("http://minio.storage.svc:9000/")
    assert not allow.allows("https://minio.storage.svc:9000")  # the scheme is part of it
    assert not allow.allows("http://minio.storage.svc")  # so is the port
    assert allow.allows("https://s3.x.example.com")
    assert not allow.allows("https://s3.amazonaws.com")  # the default is replaced, not added
    assert Allowlist.from_env("").entries == ()  # empty: the operator reads only with secrets
    assert len(DEFAULT.entries) == len(DEFAULT_ALLOWLIST)
    for bad in ("ftp://host", "https://u:p@host", "https://host/path", "*", "https://a.*"):
        with pytest.raises(ValueError, match="KUBETUNE_STORAGE_ENDPOINT_ALLOWLIST"):
            Allowlist.from_env(bad)


def _job(output: dict) -> dict:
    return {
        "metadata": {"name": "chat", "namespace": "team-a", "uid": "u-1"},
        "spec": {"output": output},
    }


def test_endpoint_problem_only_without_the_jobs_own_credentials():
    hostile = {"uri": "s3://bucket/runs", "endpoint": "http://10.0.0.9:8080"}
    problem = endpoint_problem(_job(hostile), DEFAULT)
    assert problem is not None and problem.path == "spec.output.endpoint"
    assert "s3.*.amazonaws.com" in problem.message and "storage.endpointAllowlist" in str(problem)
    with_secret = hostile | {"secretRef": {"name": "s3-creds"}}
    assert endpoint_problem(_job(with_secret), DEFAULT) is None
    assert (
        endpoint_problem(_job({"uri": "s3://bucket/runs"}), DEFAULT) is None
    )  # the default endpoint
    aws = {"uri": "s3://bucket/runs", "endpoint": "https://s3.eu-west-1.amazonaws.com"}
    assert endpoint_problem(_job(aws), DEFAULT) is None

    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    status = spec_error_status({}, [problem], now, 1)
    assert (status["phase"], status["reason"]) == ("Failed", "EndpointNotAllowed")
    assert "storage.endpointAllowlist" in status["message"]


JOB = {"metadata": {"name": "chat", "namespace": "team-a", "uid": "u-1"}}


def _ref(name: str, uid: str, kind: str = "FineTuneJob", api: str = "kubetune.io/v1alpha1"):
    return {"apiVersion": api, "kind": kind, "name": name, "uid": uid}


def test_ownership():
    assert owner_of({"ownerReferences": [_ref("chat", "u-1")]}, JOB) is Owner.OURS
    assert owner_of({"ownerReferences": [_ref("chat", "u-0")]}, JOB) is Owner.PREVIOUS
    assert owner_of({}, JOB) is Owner.FOREIGN
    assert owner_of({"ownerReferences": [_ref("other", "u-2")]}, JOB) is Owner.FOREIGN
    # The same name under another API group is not an earlier FineTuneJob.
    spoof = {"ownerReferences": [_ref("chat", "u-0", api="evil.example/v1")]}
    assert owner_of(spoof, JOB) is Owner.FOREIGN
    # A uid label alone (anyone can write labels) proves nothing.
    assert owner_of({"labels": {"kubetune.io/job-uid": "u-1"}}, JOB) is Owner.FOREIGN
    with pytest.raises(ChildConflict) as err:
        check(
            "RayJob", "team-a", "chat", {"ownerReferences": [_ref("x", "u-9", "Deployment")]}, JOB
        )
    assert err.value.owner is Owner.FOREIGN and "Deployment x (uid u-9)" in err.value.owners
    assert describe_owners({}) == "no owner"


def test_kubetune_validate_warns_about_an_endpoint_without_a_secret():
    """`kubetune validate` cannot see a cluster's allowlist, so it warns, never refuses."""
    from kubetune_api.validation import validate_document

    doc = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "chat"},
        "spec": {
            "model": {"name": "org/model"},
            "dataset": {"train": {"uri": "s3://bucket/train.jsonl"}, "format": "chat"},
            "output": {"uri": "s3://bucket/runs", "endpoint": "http://minio.team-a:9000"},
        },
    }
    result = validate_document(doc)
    assert result.ok and any("storage.endpointAllowlist" in w for w in result.warnings)
    doc["spec"]["output"]["secretRef"] = {"name": "s3-creds"}
    assert not [w for w in validate_document(doc).warnings if "endpointAllowlist" in w]
