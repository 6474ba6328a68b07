"""Fixtures of the cluster tier: a real one-node cluster (tests/harness/cluster.py)
running kubetune's own images, the operator installed by its Helm chart.

Nothing in this tier runs kubetune's operator or trainer outside a pod.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.cluster import Cluster  # noqa: E402
from harness.images import project_images  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
OPERATOR_NS = "kubetune-system"
RELEASE = "kubetune"
KEEP = os.environ.get("KUBETUNE_KEEP_SERVERS", "") not in ("", "0", "false")


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.cluster)


@pytest.fixture(scope="package")
def cluster_images() -> dict:
    """kubetune's operator and trainer images, built from the Dockerfile, and
    KubeRay's operator image from the binary the harness builds (all cached)."""
    t0 = time.monotonic()
    images = project_images(("operator", "trainer", "kuberay"))
    print(f"images ready in {time.monotonic() - t0:.0f}s: {images}")
    return images


@pytest.fixture(scope="package")
def cluster(cluster_images, request):
    c = Cluster()
    c.start()
    c.import_images(cluster_images)
    c.deploy_kuberay()
    print("cluster timings:", json.dumps({k: round(v, 1) for k, v in c.timings.items()}))
    yield c
    if KEEP:
        print(f"\nKUBETUNE_KEEP_SERVERS: export KUBECONFIG={c.plane.kubeconfig}; Ctrl-C stops")
        try:
            import signal

            signal.pause()
        except KeyboardInterrupt:
            pass
    problems = c.stop()
    failed = request.session.testsfailed
    if not failed:
        c.remove_dir()
    else:
        print(f"cluster run dir kept for the failed tests: {c.dir}")
    assert not problems, f"the host was not put back: {problems}"


@pytest.fixture(scope="package")
def kubetune_operator(cluster):
    """The chart installed with the built operator image: the operator runs as a
    Pod under the chart's ServiceAccount."""
    op_repo, op_tag = cluster.images["operator"].rsplit(":", 1)
    cluster.helm(
        "install", RELEASE, str(ROOT / "charts" / "kubetune"),
        "-n", OPERATOR_NS, "--create-namespace",
        "--set", f"image.repository={op_repo}",
        "--set", f"image.tag={op_tag}",
        "--set", "image.pullPolicy=Never",
        "--set", f"trainer.image={cluster.images['trainer']}",
        "--set", "resources.requests.cpu=20m",
        "--wait", "--timeout", "180s",
        timeout=240,
    )  # fmt: skip
    yield RELEASE
    cluster.helm("uninstall", RELEASE, "-n", OPERATOR_NS, "--wait", check=False)


@pytest.fixture
def cluster_ns(cluster):
    """The jobs' namespace, enforcing `restricted`: the API server refuses any pod
    the operator or KubeRay makes that does not pass it."""
    name = cluster.restricted_namespace("ftj-")
    yield name
    cluster.plane.kubectl("delete", "namespace", name, "--wait=false", check=False)


class Bucket:
    """A fresh bucket on the cluster's S3 server, reached from pods at the node address."""

    def __init__(self, server, name: str) -> None:
        self.server = server
        self.bucket = name
        self.endpoint = server.endpoint
        self.access_key = server.access_key
        self.secret_key = server.secret_key
        self.region = server.region
        server.create_bucket(name)
        self.fs = server.filesystem()


@pytest.fixture
def cluster_s3(cluster) -> Bucket:
    return Bucket(cluster.s3, "b-" + secrets.token_hex(4))
