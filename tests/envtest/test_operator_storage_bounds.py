"""Storage reads are bounded: per namespace, in size, in cache.

Ten namespaces each run jobs whose `spec.output.endpoint` is a TCP listener
(this test's, on 127.0.0.1) that accepts and never answers, more endpoints
than a namespace has read slots; another job's progress.json on the real S3
server is 100 MiB. A healthy job's status must still show each progress update
within one poll (plus a stated margin), the oversized job's status must name
the file and the cap while its metrics keep updating, no namespace may hold
more than its read slots on its endpoints, and the operator is the same
process throughout (its RSS printed before and after).
"""

from __future__ import annotations

import json
import secrets
import time

import psutil
import pytest

from operator_support import (
    HungEndpoints,
    OperatorProcess,
    finetunejob,
    release_namespace,
    s3_secret,
)

pytestmark = pytest.mark.envtest

POLL = 1.0  # KUBETUNE_POLL_SECONDS in OperatorProcess
MARGIN = 3.0  # slack for a loaded 2-core machine (the API server's and the watch's share)
STORAGE_TIMEOUT = 3.0
PER_NAMESPACE = 2  # KUBETUNE_STORAGE_READS_PER_NAMESPACE here
HOSTILE_NAMESPACES = 10
ENDPOINTS_PER_NAMESPACE = 3  # more than its slots: the cap, not the endpoints, binds
BIG = 100 << 20  # the oversized progress.json
GROUP, VERSION = "kubetune.io", "v1alpha1"
NOT_READ = ("False", "Unknown")


def _peak_rss(pid: int) -> int:
    """The process's peak resident set (VmHWM), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def _metric(op: OperatorProcess, name: str) -> float:
    line = next(x for x in op.metrics().splitlines() if x.startswith(name + " "))
    return float(line.split()[1])


def _condition(status: dict, type_: str) -> dict:
    return next((c for c in status.get("conditions") or [] if c["type"] == type_), {})


def test_hung_namespaces_and_an_oversized_file_do_not_delay_a_healthy_job(kube, s3, tmp_path):
    from kubernetes import client

    api = kube.api_client()
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    tag = secrets.token_hex(3)
    hostile_ns = [f"t-hung{i}-{tag}" for i in range(HOSTILE_NAMESPACES)]
    good_ns = f"t-good-{tag}"
    namespaces = hostile_ns + [good_ns]
    endpoints = {ns: HungEndpoints(ENDPOINTS_PER_NAMESPACE) for ns in hostile_ns}
    for ns in namespaces:
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    op = OperatorProcess(
        kube,
        namespaces,
        tmp_path,
        extra_env={
            "KUBETUNE_STORAGE_TIMEOUT_SECONDS": str(STORAGE_TIMEOUT),
            "KUBETUNE_STORAGE_READS_PER_NAMESPACE": str(PER_NAMESPACE),
        },
    ).start()

    def create(ns: str, body: dict) -> None:
        custom.create_namespaced_custom_object(GROUP, VERSION, ns, "finetunejobs", body)

    def job(ns: str, name: str) -> dict:
        return custom.get_namespaced_custom_object(GROUP, VERSION, ns, "finetunejobs", name)

    def wait(ns: str, name: str, pred, timeout: float, what: str) -> tuple[dict, float]:
        t0 = time.monotonic()
        last: dict = {}
        while time.monotonic() - t0 < timeout:
            last = job(ns, name).get("status") or {}
            if pred(last):
                return last, time.monotonic() - t0
            time.sleep(0.05)
        raise AssertionError(f"{ns}/{name}: {what} within {timeout}s; last status {last}")

    def running(ns: str, name: str) -> None:
        rj = wait(ns, name, lambda s: s.get("rayJobName"), 60, "a RayJob")[0]["rayJobName"]
        custom.patch_namespaced_custom_object_status(
            "ray.io",
            "v1",
            ns,
            "rayjobs",
            rj,
            {"status": {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}},
        )

    try:
        proc = psutil.Process(op.proc.pid)
        for ns in hostile_ns:
            core.create_namespaced_secret(
                ns,
                client.V1Secret(
                    metadata=client.V1ObjectMeta(name="s3-creds"),
                    string_data={"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"},
                ),
            )
            for i, port in enumerate(endpoints[ns].ports):
                body = finetunejob(f"hung{i}")
                body["spec"]["output"] = {
                    "uri": "s3://hung/runs",
                    "endpoint": f"http://127.0.0.1:{port}",
                    "secretRef": {"name": "s3-creds"},
                }
                create(ns, body)
        s3_secret(kube, good_ns, s3)
        create(good_ns, finetunejob("good", s3))
        create(good_ns, finetunejob("big", s3))
        prefix = {
            name: f"{s3.bucket}/runs/{good_ns}/{name}/{job(good_ns, name)['metadata']['uid']}"
            for name in ("good", "big")
        }
        s3.fs.pipe(f"{prefix['big']}/progress.json", b" " * BIG)
        s3.fs.pipe(
            f"{prefix['big']}/metrics.jsonl", json.dumps({"step": 1, "loss": 2.5}).encode() + b"\n"
        )
        rss_before = proc.memory_info().rss  # no storage read yet

        # Every job's Ray job runs: every job's storage is read from now on.
        for ns in hostile_ns:
            for i in range(ENDPOINTS_PER_NAMESPACE):
                running(ns, f"hung{i}")
        running(good_ns, "good")
        time.sleep(POLL)  # the hostile reads are in flight now

        delays: list[float] = []
        in_flight: list[float] = []  # storage reads holding a thread, sampled
        for step in range(1, 5):
            s3.fs.pipe(
                f"{prefix['good']}/progress.json",
                json.dumps({"phase": "Training", "step": step, "updatedAt": "x"}).encode(),
            )
            delays.append(
                wait(
                    good_ns,
                    "good",
                    lambda s, step=step: (s.get("progress") or {}).get("step") == step,
                    60,
                    f"progress step {step}",
                )[1]
            )
            if step == 1:  # the oversized file's job runs from now on
                rss_hostile, hwm_hostile = proc.memory_info().rss, _peak_rss(proc.pid)
                running(good_ns, "big")
            for _ in range(8):  # over more than one read timeout of the hung reads
                in_flight.append(_metric(op, "kubetune_storage_reads_in_flight"))
                time.sleep(0.25)

        st, _ = wait(
            good_ns,
            "big",
            lambda s: _condition(s, "StorageReadable").get("reason") == "StorageFileTooLarge",
            20,
            "StorageFileTooLarge",
        )
        message = _condition(st, "StorageReadable")["message"]
        assert _condition(st, "StorageReadable")["status"] == "False"
        assert "progress.json is 100 MiB, over the operator's 1 MiB cap" in message, message
        assert "hint:" in message
        s3.fs.pipe(
            f"{prefix['big']}/metrics.jsonl",
            json.dumps({"step": 1, "loss": 2.5}).encode()
            + b"\n"
            + json.dumps({"step": 2, "loss": 1.25}).encode()
            + b"\n",
        )
        wait(
            good_ns,
            "big",
            lambda s: (s.get("metrics") or {}).get("trainLoss") == 1.25,
            POLL + MARGIN + 2,
            "the metrics of the job with the oversized progress.json",
        )

        reasons = set()
        for ns in hostile_ns:
            for i in range(ENDPOINTS_PER_NAMESPACE):
                st, _ = wait(
                    ns,
                    f"hung{i}",
                    lambda s: _condition(s, "StorageReadable").get("status") in NOT_READ,
                    30,
                    "StorageReadable False or Unknown",
                )
                cond = _condition(st, "StorageReadable")
                assert cond["reason"] in ("StorageTimeout", "StorageReadQueued"), cond
                assert "hint:" in cond["message"]
                reasons.add(cond["reason"])
        rss_after, hwm_after = proc.memory_info().rss, _peak_rss(proc.pid)
        peaks = {ns: endpoints[ns].peak for ns in hostile_ns}
        deferred = _metric(op, "kubetune_storage_reads_deferred_total")
        print(
            f"healthy progress delays {[round(d, 2) for d in delays]} s (poll {POLL}s); "
            f"hostile reasons {sorted(reasons)}; storage reads in flight max {max(in_flight):g} "
            f"(of {len(in_flight)} samples), {deferred:g} deferred; hung connections open at "
            f"once per namespace {sorted(peaks.values())}; operator pid {proc.pid} RSS "
            f"{rss_before / 2**20:.0f} MiB before any read, {rss_hostile / 2**20:.0f} MiB with the "
            f"hostile reads running, {rss_after / 2**20:.0f} MiB at the end; peak RSS "
            f"{hwm_hostile / 2**20:.0f} -> {hwm_after / 2**20:.0f} MiB while the "
            f"{BIG >> 20} MiB file was polled"
        )
        assert max(delays) <= POLL + MARGIN, delays
        assert "StorageTimeout" in reasons
        # However many endpoints a namespace names, it holds at most its slots: without
        # them all 30 hung reads would hold a thread at once.
        assert max(in_flight) <= HOSTILE_NAMESPACES * PER_NAMESPACE + 2, in_flight
        assert deferred > 0
        assert min(peaks.values()) >= 1, peaks  # every namespace's reads did start
        # The same process all along, and the 50 MiB file was never held in memory.
        assert op.proc.poll() is None and op.starts == 1 and op.healthy()
        assert proc.pid == op.proc.pid
        assert hwm_after - hwm_hostile < BIG // 2, (hwm_hostile, hwm_after)
    finally:
        op.stop()
        for hung in endpoints.values():
            hung.close()
        for ns in namespaces:
            release_namespace(api, ns)
        api.close()
        print(op.log_tail(60))
