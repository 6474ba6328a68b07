"""Fixtures for the tiers that talk to real servers (see docs/testing.md).

Every server fixture is lazy: a test that asks for none of them (tests/unit)
starts nothing. Session-scoped: ``kube``, ``kuberay``, ``helm`` (and the S3
server behind ``s3``); function-scoped: ``namespace``, ``s3`` (fresh bucket).
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# tests/ is on sys.path when pytest loads this file (rootdir conftest, no
# __init__.py); make that explicit so `harness` imports however pytest is run.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import contextlib

import harness  # noqa: E402

KEEP = os.environ.get("KUBETUNE_KEEP_SERVERS", "") not in ("", "0", "false")
SERVER_FIXTURES = {
    "kube",
    "kubetune_crd",
    "namespace",
    "kuberay",
    "s3",
    "s3_server",
    "helm",
    "_harness_session",
}

_session: harness.Session | None = None
_failed = False


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "envtest: needs the real control plane / KubeRay / S3 (tests/envtest)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    envtest_dir = Path(__file__).resolve().parent / "envtest"
    for item in items:
        if envtest_dir in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.envtest)


@pytest.fixture(scope="session")
def _harness_session(pytestconfig: pytest.Config):
    global _session
    _session = harness.Session()
    yield _session
    try:
        if KEEP and _session.started():
            # pytest captures fd 1/2 during teardown: talk to the terminal.
            capman = pytestconfig.pluginmanager.getplugin("capturemanager")
            with capman.global_and_fixture_disabled():
                _wait_for_ctrl_c(_session)
    finally:
        _session.stop()
        if not _failed and not KEEP:
            _session.remove_dir()


def _wait_for_ctrl_c(sess: harness.Session) -> None:
    msg = [f"\nKUBETUNE_KEEP_SERVERS: servers still running; run dir {sess.dir}"]
    if sess._kube:
        msg.append(f"  export KUBECONFIG={sess._kube.kubeconfig}")
    if sess._s3:
        msg.append(
            f"  S3 endpoint {sess._s3.endpoint} key {sess._s3.access_key}"
            f" secret {sess._s3.secret_key}"
        )
    msg.append("  press Ctrl-C to stop them")
    print("\n".join(msg), file=sys.stderr, flush=True)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with contextlib.suppress(KeyboardInterrupt):
        signal.pause()


@pytest.fixture(scope="session")
def kube(_harness_session: harness.Session) -> harness.ControlPlane:
    """etcd + kube-apiserver (RBAC) + kube-controller-manager, KubeRay and kubetune CRDs applied.

    ``.kubeconfig`` (admin, system:masters), ``.server``, ``.api_client()``,
    ``.kubectl(*args, input=None, check=True)``.
    """
    return _harness_session.kube()


@pytest.fixture(scope="session")
def kubetune_crd(_harness_session: harness.Session, kube) -> list[Path]:
    """``kube`` with crds/*.yaml applied; fails the test with the server's answer
    when the API server rejected them."""
    files = harness.kubetune_crd_files()
    if not files:
        pytest.fail("crds/*.yaml: no CRD files to apply")
    if _harness_session.kubetune_crd_error:
        pytest.fail(
            "the API server rejected crds/*.yaml:\n" + _harness_session.kubetune_crd_error,
            pytrace=False,
        )
    return files


@pytest.fixture(scope="session")
def _core_v1(kube):
    from kubernetes import client

    api = kube.api_client()
    yield client.CoreV1Api(api)
    api.close()


def _dns_label(text: str, limit: int) -> str:
    label = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return label[:limit].rstrip("-")


@pytest.fixture
def namespace(request: pytest.FixtureRequest, _core_v1) -> str:
    """A fresh namespace for this test (its name); deleted afterwards (the
    real namespace controller empties it, without the test waiting; the
    operator's finalizers go first: operator_support.release_namespace)."""
    from kubernetes import client

    from operator_support import release_namespace

    name = f"t-{_dns_label(request.node.name, 48)}-{secrets.token_hex(3)}"
    _core_v1.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    yield name
    release_namespace(_core_v1.api_client, name)


@pytest.fixture(scope="session")
def kuberay(_harness_session: harness.Session, kube) -> harness.KubeRayOperator:
    """The real KubeRay operator, running out of cluster against ``kube``."""
    return _harness_session.kuberay()


@pytest.fixture(scope="session")
def s3_server(_harness_session: harness.Session) -> harness.S3Server:
    return _harness_session.s3()


@dataclass
class S3Bucket:
    endpoint: str
    access_key: str
    secret_key: str
    region: str
    bucket: str
    storage_options: dict = field(repr=False)
    fs: object = field(repr=False)

    def url(self, path: str = "") -> str:
        return f"s3://{self.bucket}/{path.lstrip('/')}"


@pytest.fixture
def s3(s3_server: harness.S3Server) -> S3Bucket:
    """A fresh bucket on the S3 server, with its credentials.

    ``.endpoint``, ``.access_key``, ``.secret_key``, ``.region``, ``.bucket``,
    ``.storage_options`` (for fsspec/s3fs), ``.fs`` (an s3fs filesystem),
    ``.url(path)`` -> ``s3://bucket/path``.
    """
    fs = s3_server.filesystem()
    bucket = f"t-{secrets.token_hex(6)}"
    s3_server.create_bucket(bucket)
    fs.invalidate_cache()
    yield S3Bucket(
        s3_server.endpoint,
        s3_server.access_key,
        s3_server.secret_key,
        s3_server.region,
        bucket,
        s3_server.storage_options(),
        fs,
    )
    # Best effort: a test may have removed the bucket itself.
    with contextlib.suppress(Exception):
        fs.rm(bucket, recursive=True)


@pytest.fixture
def operator(kube, namespace, tmp_path):
    """kubetune's operator as a process on this machine, watching the test's
    namespace (tests/operator_support.py); its log's tail is printed afterwards."""
    from operator_support import OperatorProcess

    op = OperatorProcess(kube, [namespace], tmp_path).start()
    yield op
    writes = op.status_writes()
    op.stop()
    print(f"--- operator log ({op.log_path})\n{op.log_tail(120)}")
    # Whatever the test did: no reconcile wrote the status twice.
    assert writes is None or writes[2] == 0, f"{writes[2]:g} reconciles wrote status twice"


@pytest.fixture(scope="session")
def helm(_harness_session: harness.Session) -> harness.Helm:
    """``helm(*args, check=True)`` with KUBECONFIG pointing at ``kube`` and its own helm home."""
    return _harness_session.helm()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    outcome = yield
    report = outcome.get_result()
    global _failed
    if not report.failed or _session is None:
        return
    if not SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
        return
    _failed = True
    if "the API server rejected crds/" in str(report.longrepr):
        return  # the server's answer is the whole story; no logs needed
    for server in _session.servers():
        report.sections.append(
            (f"server log {server.name} ({server.log})", server.log_tail(80) or "(empty)")
        )


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if _session is None:
        return
    if _session.timings:
        terminalreporter.write_line(
            "kubetune harness start times: "
            + ", ".join(f"{k} {v:.1f}s" for k, v in _session.timings.items())
        )
    if _failed:
        terminalreporter.write_line(f"kubetune harness: server logs kept in {_session.log_dir}")
