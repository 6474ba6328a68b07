"""One tenant's object store cannot stall another's job.

Hostile jobs in one namespace point `spec.output.endpoint` at a TCP server that
accepts connections and never answers, and at a real S3 server (versitygw)
frozen with SIGSTOP. A healthy job in another namespace, on the real S3
server, must still show new progress and `Succeeded` within one poll plus a
stated bound, and every hostile job must show `StorageReadable=False`
(StorageTimeout) or, when its namespace's or store's read slots are taken,
`Unknown` (StorageReadQueued) within the storage timeout plus a poll plus the
same bound.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import time

import pytest

import harness
from operator_support import (
    HungEndpoints,
    OperatorProcess,
    apply,
    condition,
    finetunejob,
    get,
    rayjob_finished,
    rayjob_running,
    release_namespace,
    s3_secret,
    wait_status,
)

pytestmark = pytest.mark.envtest

POLL = 1.0  # KUBETUNE_POLL_SECONDS in OperatorProcess
STORAGE_TIMEOUT = 4.0
BOUND = 5.0  # slack for a loaded 2-core machine; a stalled operator took minutes
HOSTILE_HUNG = 5
HOSTILE_FROZEN = 2


@pytest.fixture
def other_namespace(kube):
    name = f"t-healthy-{secrets.token_hex(3)}"
    kube.kubectl("create", "namespace", name)
    yield name
    api = kube.api_client()
    try:
        release_namespace(api, name)
    finally:
        api.close()


def test_hung_and_frozen_stores_do_not_delay_another_tenant(
    kube, namespace, other_namespace, s3, s3_server, tmp_path
):
    hung = HungEndpoints(1)
    frozen = harness.S3Server(tmp_path / "frozen-s3", tmp_path).start()
    frozen.create_bucket("frozen")
    op = OperatorProcess(
        kube,
        [namespace, other_namespace],
        tmp_path,
        extra_env={"KUBETUNE_STORAGE_TIMEOUT_SECONDS": str(STORAGE_TIMEOUT)},
    ).start()
    try:
        os.kill(frozen.server.pid, signal.SIGSTOP)
        kube.kubectl(
            "create",
            "secret",
            "generic",
            "s3-creds",
            "-n",
            namespace,
            f"--from-literal=AWS_ACCESS_KEY_ID={frozen.access_key}",
            f"--from-literal=AWS_SECRET_ACCESS_KEY={frozen.secret_key}",
        )
        hostile = []
        for i in range(HOSTILE_HUNG + HOSTILE_FROZEN):
            endpoint = f"http://127.0.0.1:{hung.ports[0]}" if i < HOSTILE_HUNG else frozen.endpoint
            job = finetunejob(f"bad{i}")
            job["spec"]["output"] = {
                "uri": "s3://frozen/runs",
                "endpoint": endpoint,
                "secretRef": {"name": "s3-creds"},
            }
            apply(kube, namespace, job)
            hostile.append(f"bad{i}")

        s3_secret(kube, other_namespace, s3)
        apply(kube, other_namespace, finetunejob("good", s3))
        uid = get(kube, "finetunejob", "good", other_namespace)["metadata"]["uid"]
        for name in hostile:
            wait_status(kube, name, namespace, lambda s: s.get("rayJobName"), 60)
        wait_status(kube, "good", other_namespace, lambda s: s.get("rayJobName"), 60)

        # Every hostile job starts reading its store at once.
        started = time.monotonic()
        for name in hostile:
            rayjob_running(kube, name, namespace)
        rayjob_running(kube, "good", other_namespace)
        time.sleep(1)  # the hostile reads are in flight now

        # The healthy job's progress, while the hostile reads hang.
        with s3.fs.open(f"{s3.bucket}/runs/{other_namespace}/good/{uid}/progress.json", "w") as f:
            f.write(json.dumps({"phase": "Training", "step": 7, "totalSteps": 9, "updatedAt": "x"}))
        t0 = time.monotonic()
        wait_status(
            kube, "good", other_namespace, lambda s: s.get("progress", {}).get("step") == 7, 60
        )
        progress_delay = time.monotonic() - t0

        t0 = time.monotonic()
        rayjob_finished(kube, "good", other_namespace)
        wait_status(kube, "good", other_namespace, lambda s: s.get("phase") == "Succeeded", 60)
        success_delay = time.monotonic() - t0

        # A read that timed out says so; one its store's or namespace's slots do not
        # admit yet (storage_limits.ReadSlots) says that it waits.
        for name in hostile:
            st = wait_status(
                kube,
                name,
                namespace,
                lambda s: (
                    (c := condition(s, "StorageReadable")) and c["status"] in ("False", "Unknown")
                ),
                60,
            )
            reason = condition(st, "StorageReadable")["reason"]
            assert reason in ("StorageTimeout", "StorageReadQueued"), st
            assert "hint:" in condition(st, "StorageReadable")["message"]
        unreadable_after = time.monotonic() - started

        print(
            f"healthy progress {progress_delay:.2f}s, Succeeded {success_delay:.2f}s; "
            f"all {len(hostile)} hostile jobs StorageReadable False or Unknown after "
            f"{unreadable_after:.2f}s; hung server peak connections {hung.peak}"
        )
        assert progress_delay <= POLL + BOUND, progress_delay
        assert success_delay <= POLL + BOUND, success_delay
        assert unreadable_after <= STORAGE_TIMEOUT + POLL + BOUND + 1, unreadable_after
        # One filesystem per store, a few connections each: no growth per read.
        time.sleep(3 * STORAGE_TIMEOUT)
        assert hung.peak <= 8, hung.peak
        assert op.healthy()
    finally:
        op.stop()
        os.kill(frozen.server.pid, signal.SIGCONT)
        frozen.stop()
        hung.close()
        print(op.log_tail(80))
    log = op.log_path.read_text()
    assert "Connection pool is full" not in log
