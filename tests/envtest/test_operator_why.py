"""Status that says why: jobs that can never start end with a reason, a message
and a hint; a queue that does not exist is named; credentials in a URI never
reach status, events, the ConfigMap, the RayJob or the operator's log.

The PriorityClass case runs the real KubeRay operator: the real API server's
Priority admission plugin refuses the head Pod, KubeRay records that in the
RayCluster's ReplicaFailure condition and copies it into the RayJob, and the
operator reads it from there."""

from __future__ import annotations

import json
import time

import pytest

from harness import wait_until
from operator_support import (
    OperatorProcess,
    apply,
    condition,
    events,
    finetunejob,
    get,
    rayjob_running,
    s3_secret,
    wait_phase,
    wait_status,
)

pytestmark = pytest.mark.envtest

POLL = 1.0  # KUBETUNE_POLL_SECONDS in OperatorProcess


def test_missing_priority_class_ends_failed_naming_it(kube, kuberay, namespace, operator):
    job = finetunejob("pc")
    job["spec"]["resources"]["priorityClassName"] = "gold-does-not-exist"
    apply(kube, namespace, job)
    created = time.monotonic()
    st = wait_phase(kube, "pc", namespace, "Failed", timeout=90)
    print(f"Failed {time.monotonic() - created:.2f}s after the FineTuneJob was created")
    assert st["reason"] == "PriorityClassNotFound", st
    # KubeRay's own words, as the API server gave them to it.
    assert "no PriorityClass with name gold-does-not-exist was found" in st["message"]
    assert "hint:" in st["message"] and "delete and re-create" in st["message"]
    assert condition(st, "Failed")["status"] == "True"
    # The default columns of `kubectl get ftj` say why.
    row = kube.kubectl("get", "ftj", "pc", "-n", namespace, "--no-headers").stdout.split()
    assert row[1] == "Failed" and "PriorityClassNotFound" in row, row
    warnings = [e for e in events(kube, namespace, "pc") if e["type"] == "Warning"]
    assert any(e["reason"] == "PriorityClassNotFound" for e in warnings)
    ours = [
        e for e in events(kube, namespace, "pc") if e["involvedObject"]["kind"] == "FineTuneJob"
    ]
    assert ours and all(e["source"].get("component") == "kubetune-operator" for e in ours), ours
    # KubeRay would otherwise retry the refused Pod forever.
    wait_until(lambda: get(kube, "rayjob", "pc", namespace) is None, 30, what="RayJob deleted")


def test_unknown_kueue_queue_is_named_with_a_hint(kube, namespace, operator):
    job = finetunejob("q")
    job["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "no-such-queue"}
    apply(kube, namespace, job)
    st = wait_status(kube, "q", namespace, lambda s: s.get("reason") == "QueueNotFound", 30)
    assert st["phase"] == "Queued"
    # This control plane has no Kueue: the message says so and what to do.
    assert "no-such-queue" in st["message"] and "hint:" in st["message"]
    assert "Kueue" in st["message"]


def test_resuming_without_kueue_posts_no_queued_event(kube, namespace, operator):
    apply(kube, namespace, finetunejob("res", suspend=True))
    wait_phase(kube, "res", namespace, "Suspended")
    # What KubeRay writes once it has suspended the RayJob.
    kube.kubectl(
        "patch",
        "rayjob",
        "res",
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": {"jobDeploymentStatus": "Suspended"}}),
    )
    kube.kubectl(
        "patch", "ftj", "res", "-n", namespace, "--type=merge", "-p", '{"spec": {"suspend": false}}'
    )
    wait_phase(kube, "res", namespace, "Starting")
    time.sleep(2 * POLL)
    reasons = [e["reason"] for e in events(kube, namespace, "res")]
    assert "Queued" not in reasons, reasons


def test_credentials_in_uris_are_never_echoed(kube, namespace, s3, tmp_path):
    secret = "s3cr3t-in-the-uri-0123456789"
    # The operator-wide default output URI is not checked at admission: the
    # operator itself must keep its userinfo out of everything it writes.
    op = OperatorProcess(
        kube,
        [namespace],
        tmp_path,
        extra_env={"KUBETUNE_DEFAULT_OUTPUT_URI": f"s3://AKIAUSER:{secret}@{s3.bucket}/runs"},
    ).start()
    try:
        s3_secret(kube, namespace, s3)
        job = finetunejob("cred", s3)
        del job["spec"]["output"]["uri"]
        apply(kube, namespace, job)
        uid = get(kube, "finetunejob", "cred", namespace)["metadata"]["uid"]
        wait_status(kube, "cred", namespace, lambda s: s.get("rayJobName"), 30)
        rayjob_running(kube, "cred", namespace)
        prefix = f"runs/{namespace}/cred/{uid}"
        with s3.fs.open(f"{s3.bucket}/{prefix}/progress.json", "w") as f:
            f.write(json.dumps({"phase": "Training", "step": 3, "updatedAt": "x"}))
        st = wait_status(kube, "cred", namespace, lambda s: s.get("progress", {}).get("step") == 3)
        assert st["outputs"]["prefix"] == f"s3://{s3.bucket}/{prefix}"
        seen = {
            "status": json.dumps(st),
            "events": json.dumps(events(kube, namespace, "cred")),
            "configmap": json.dumps(get(kube, "configmap", "cred-config", namespace)),
            "rayjob": json.dumps(get(kube, "rayjob", "cred", namespace)),
            "log": op.log_path.read_text(),
        }
        for where, text in seen.items():
            assert secret not in text and "AKIAUSER" not in text, where
    finally:
        op.stop()
        print(op.log_tail(60))


def test_output_uri_without_a_bucket_never_reads_local_files(kube, namespace, operator):
    job = finetunejob("nobucket")
    job["spec"]["output"] = {"uri": "s3://"}
    out = kube.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(job), check=False)
    if out.returncode != 0:  # refused at admission: that names the field too
        assert "spec.output.uri" in out.stderr
        return
    st = wait_phase(kube, "nobucket", namespace, "Failed", 30)
    assert st["reason"] == "InvalidSpec" and "no bucket" in st["message"]
    assert "outputs" not in st
