"""The operator on the real control plane: FineTuneJob → ConfigMap + RayJob, status
from RayJob status (patched as KubeRay does) and from the trainer's files in the
real S3 server, lifecycle, restarts. The KubeRay operator itself runs only in
the tests that ask for the `kuberay` fixture (elsewhere nothing fights our
status patches)."""

from __future__ import annotations

import base64
import calendar
import json
import subprocess
import time

import pytest

from harness import wait_until
from operator_support import (
    TRAINER_IMAGE,
    OperatorProcess,
    apply,
    condition,
    events,
    finetunejob,
    get,
    names,
    rayjob_finished,
    rayjob_running,
    s3_secret,
    status,
    wait_phase,
    wait_status,
)

pytestmark = pytest.mark.envtest


def _wait_rayjob(kube, name, namespace, rj_name=None, timeout=60) -> dict:
    st = wait_status(
        kube, name, namespace, lambda s: s.get("rayJobName"), timeout, "the RayJob name in status"
    )
    rj_name = rj_name or st["rayJobName"]
    return wait_until(
        lambda: get(kube, "rayjob", rj_name, namespace), timeout, what=f"RayJob {rj_name}"
    )


def _rfc3339(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _ray_pod(kube, namespace: str, name: str, uid: str, scheduled: float, started: float):
    """A Ray pod of the job (KubeRay's and the operator's labels), its status as
    a kubelet writes it: placed at `scheduled`, its container running since `started`."""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": {"ray.io/cluster": "tune-abcde", "kubetune.io/job-uid": uid},
        },
        "spec": {"containers": [{"name": "ray", "image": TRAINER_IMAGE}]},
    }
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(pod))
    _ray_pod_status(kube, namespace, pod, scheduled, started)


def _ray_pod_status(kube, namespace: str, pod: dict, scheduled: float, started: float):
    state = {
        "conditions": [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": _rfc3339(scheduled)}
        ],
        "containerStatuses": [
            {
                "name": c["name"],
                "image": c["image"],
                "imageID": "",
                "ready": True,
                "restartCount": 0,
                "state": {"running": {"startedAt": _rfc3339(started)}},
            }
            for c in pod["spec"]["containers"]
        ],
        "phase": "Running",
    }
    kube.kubectl(
        "patch", "pod", pod["metadata"]["name"], "-n", namespace, "--subresource=status",
        "--type=merge", "-p", json.dumps({"status": state}),
    )  # fmt: skip


def _write(s3, path: str, obj) -> None:
    data = obj if isinstance(obj, str) else json.dumps(obj)
    with s3.fs.open(f"{s3.bucket}/{path}", "w") as f:
        f.write(data)


def test_create_makes_configmap_and_rayjob(kube, namespace, s3, operator):
    s3_secret(kube, namespace, s3)
    apply(kube, namespace, finetunejob("chat", s3))
    job = get(kube, "finetunejob", "chat", namespace)
    rj = _wait_rayjob(kube, "chat", namespace)
    st = status(kube, "chat", namespace)
    assert st["rayJobName"] == "chat" and st["configMapName"] == "chat-config"
    assert st["attempts"] == 1 and st["observedGeneration"] == 1
    assert condition(st, "Validated")["status"] == "True"
    assert FINALIZER in get(kube, "finetunejob", "chat", namespace)["metadata"]["finalizers"]

    owner = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "name": "chat",
        "uid": job["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }
    assert rj["metadata"]["ownerReferences"] == [owner]
    assert rj["spec"]["entrypoint"] == (
        "python -m kubetune_trainer --config /etc/kubetune/config.json"
    )
    assert rj["spec"]["shutdownAfterJobFinishes"] is True
    [group] = rj["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == 2
    worker = group["template"]["spec"]["containers"][0]
    assert worker["image"] == TRAINER_IMAGE
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    env = {e["name"]: e.get("valueFrom", {}).get("secretKeyRef") for e in worker["env"]}
    assert env["KUBETUNE_OUTPUT_AWS_ACCESS_KEY_ID"]["name"] == "s3-creds"
    assert env["KUBETUNE_DATASET_AWS_SECRET_ACCESS_KEY"]["name"] == "s3-creds"

    cm = get(kube, "configmap", "chat-config", namespace)
    assert cm["metadata"]["ownerReferences"] == [owner]
    config = json.loads(cm["data"]["config.json"])
    assert config["storagePrefix"] == (
        f"s3://{s3.bucket}/runs/{namespace}/chat/{job['metadata']['uid']}"
    )
    assert s3.secret_key not in cm["data"]["config.json"]
    assert s3.secret_key not in json.dumps(rj)
    reasons = {e["reason"] for e in events(kube, namespace, "chat")}
    assert "RayJobCreated" in reasons

    # The Ray cluster is closed: a token Secret and a NetworkPolicy, both the job's.
    assert rj["spec"]["rayClusterSpec"]["authOptions"] == {
        "mode": "token",
        "secretName": "chat-ray-token",
    }
    token = wait_until(lambda: get(kube, "secret", "chat-ray-token", namespace), 30, what="token")
    assert token["metadata"]["ownerReferences"] == [owner]
    assert len(base64.b64decode(token["data"]["auth_token"])) >= 40
    assert token["data"]["auth_token"] not in json.dumps(rj) + json.dumps(cm)
    pol = wait_until(lambda: get(kube, "networkpolicy", "chat-ray", namespace), 30, what="policy")
    assert pol["metadata"]["ownerReferences"] == [owner]
    own = {"matchLabels": {"kubetune.io/job-uid": job["metadata"]["uid"]}}
    assert pol["spec"]["podSelector"] == own
    assert pol["spec"]["ingress"][0] == {"from": [{"podSelector": own}]}


FINALIZER = "kubetune.io/finalizer"


def test_status_follows_rayjob_and_storage(kube, namespace, s3, operator):
    s3_secret(kube, namespace, s3)
    apply(kube, namespace, finetunejob("tune", s3))
    uid = get(kube, "finetunejob", "tune", namespace)["metadata"]["uid"]
    _wait_rayjob(kube, "tune", namespace)
    wait_phase(kube, "tune", namespace, "Starting")

    rayjob_running(kube, "tune", namespace)
    st = wait_phase(kube, "tune", namespace, "Running")
    assert st["rayClusterName"] == "tune-abcde"
    assert st["dashboardUrl"].startswith("http://tune-head-svc.")
    assert condition(st, "Running")["status"] == "True"

    # The Ray pods as the kubelet reports them (a head and a worker, placed and
    # running), and the trainer's way to step 1: status.progress.startup.
    created = get(kube, "finetunejob", "tune", namespace)["metadata"]["creationTimestamp"]
    t0 = calendar.timegm(time.strptime(created, "%Y-%m-%dT%H:%M:%SZ"))
    _ray_pod(kube, namespace, "tune-abcde-worker", uid, t0 + 5, t0 + 31)
    _ray_pod(kube, namespace, "tune-abcde-head", uid, t0 + 2, t0 + 20)
    # Where the session runs KubeRay, it made the cluster's pods too (nothing
    # schedules them here): they are placed and started as early as the head.
    selector = f"ray.io/cluster=tune-abcde,kubetune.io/job-uid={uid}"
    listed = kube.kubectl("get", "pods", "-n", namespace, "-l", selector, "-o", "json").stdout
    for pod in json.loads(listed)["items"]:
        if pod["metadata"]["name"] != "tune-abcde-worker":
            _ray_pod_status(kube, namespace, pod, t0 + 2, t0 + 20)
    prefix = f"runs/{namespace}/tune/{uid}"
    startup = [
        {"name": "workerStarted", "time": _rfc3339(t0 + 40), "seconds": 0.0},
        {"name": "modelFetched", "time": _rfc3339(t0 + 43), "seconds": 2.52},
        {"name": "engineReady", "time": _rfc3339(t0 + 50), "seconds": 9.71},
        {"name": "firstStep", "time": _rfc3339(t0 + 51), "seconds": 11.04},
    ]
    _write(
        s3,
        f"{prefix}/progress.json",
        {
            "phase": "Training",
            "step": 10,
            "totalSteps": 20,
            "epoch": 0.5,
            "etaSeconds": 30,
            "tokensPerSecond": 900.0,
            "attempt": 1,
            "startup": startup,
            "updatedAt": "2026-01-01T00:00:00Z",
        },
    )
    _write(
        s3,
        f"{prefix}/metrics.jsonl",
        "".join(
            json.dumps(r) + "\n"
            for r in [{"step": 5, "loss": 2.5}, {"step": 10, "loss": 2.0, "evalLoss": 2.2}]
        ),
    )
    _write(s3, f"{prefix}/checkpoints/step-00000010/model.bin", "x")
    _write(
        s3,
        f"{prefix}/checkpoints/step-00000010/manifest.json",
        {"step": 10, "files": ["model.bin"], "evalLoss": 2.2, "createdAt": "2026-01-01T00:00:00Z"},
    )
    # Not committed (no manifest): must not be reported.
    _write(s3, f"{prefix}/checkpoints/step-00000015/model.bin", "x")
    st = wait_status(kube, "tune", namespace, lambda s: s.get("progress", {}).get("step") == 10)
    assert st["progress"]["display"] == "10/20" and st["progress"]["percent"] == 50.0
    assert st["metrics"]["trainLoss"] == 2.0 and st["metrics"]["evalLoss"] == 2.2
    assert st["metrics"]["displayLoss"] == "2.0000"
    assert [c["step"] for c in st["checkpoints"]] == [10]
    assert st["checkpoints"][0]["uri"] == f"s3://{s3.bucket}/{prefix}/checkpoints/step-00000010"
    assert condition(st, "Checkpointed")["status"] == "True"
    row = kube.kubectl("get", "ftj", "tune", "-n", namespace, "--no-headers").stdout.split()
    assert row[:4] == ["tune", "Running", "10/20", "2.0000"], row

    def _whole(s: dict) -> bool:
        names = [p["name"] for p in s.get("progress", {}).get("startup") or []]
        return "containersStarted" in names and "firstStep" in names

    st = wait_status(kube, "tune", namespace, _whole, 30, "the whole way to step 1")
    phases = [(p["name"], p["seconds"]) for p in st["progress"]["startup"]]
    assert phases[0] == ("created", 0.0) and phases[1][0] == "rayJobCreated", phases
    assert phases[2:] == [
        ("podsScheduled", 5.0),
        ("containersStarted", 31.0),
        ("workerStarted", 40.0),
        ("modelFetched", 42.5),
        ("engineReady", 49.7),
        ("firstStep", 51.0),
    ], phases
    text = operator.metrics()
    assert 'kubetune_startup_seconds_bucket{le="60.0",phase="firstStep"}' in text, text[-2000:]
    first = [ln for ln in text.splitlines() if ln.startswith("kubetune_startup_seconds_count")]
    assert 'kubetune_startup_seconds_count{phase="firstStep"} 1.0' in first, first

    # Every status the API server stores from here on, as a watch sees it.
    watch = subprocess.Popen(
        [kube.kubectl_bin, f"--kubeconfig={kube.kubeconfig}", "get", "ftj", "tune", "-n",
         namespace, "-w", "-o", 'jsonpath={.status.phase} {.status.progress.display}{"\\n"}'],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(1)  # the watch is open
    # The trainer's last writes, then the Ray job ends before the next poll.
    _write(
        s3,
        f"{prefix}/outputs.json",
        {"adapter": f"s3://{s3.bucket}/{prefix}/adapter", "finalTrainLoss": 1.8, "steps": 20},
    )
    _write(
        s3,
        f"{prefix}/progress.json",
        {"phase": "Succeeded", "step": 20, "totalSteps": 20, "attempt": 1, "updatedAt": "x"},
    )
    rayjob_finished(kube, "tune", namespace)
    out = kube.kubectl(
        "wait",
        "--for=condition=Succeeded",
        "ftj/tune",
        "-n",
        namespace,
        "--timeout=60s",
        timeout=70,
    )
    assert "condition met" in out.stdout
    # Succeeded comes with the final records: what a pipeline reads right after
    # `kubectl wait` is the last step and the outputs, not the poll before them.
    st = status(kube, "tune", namespace)
    assert st["progress"]["display"] == "20/20", st["progress"]
    watch.terminate()
    seen = watch.communicate(timeout=10)[0].splitlines()
    succeeded = [line for line in seen if line.startswith("Succeeded")]
    assert succeeded and all(line == "Succeeded 20/20" for line in succeeded), seen
    assert st["phase"] == "Succeeded" and st["completionTime"] and st["startTime"]
    assert [p["name"] for p in st["progress"]["startup"]][-1] == "firstStep"  # kept to the end
    assert st["outputs"]["adapter"].endswith("/adapter")
    reasons = [e["reason"] for e in events(kube, namespace, "tune")]
    for r in ("RayJobCreated", "RayClusterStarting", "Training", "JobSucceeded"):
        assert r in reasons, reasons


def test_suspend_and_resume(kube, namespace, operator):
    apply(kube, namespace, finetunejob("sus"))
    rj = _wait_rayjob(kube, "sus", namespace)
    assert rj["spec"].get("suspend", False) is False
    kube.kubectl(
        "patch", "ftj", "sus", "-n", namespace, "--type=merge", "-p", '{"spec": {"suspend": true}}'
    )
    wait_until(
        lambda: get(kube, "rayjob", "sus", namespace)["spec"].get("suspend"),
        30,
        what="RayJob suspended",
    )
    st = wait_phase(kube, "sus", namespace, "Suspended")
    assert condition(st, "Suspended")["status"] == "True"
    kube.kubectl(
        "patch", "ftj", "sus", "-n", namespace, "--type=merge", "-p", '{"spec": {"suspend": false}}'
    )
    wait_until(
        lambda: not get(kube, "rayjob", "sus", namespace)["spec"].get("suspend"),
        30,
        what="RayJob resumed",
    )
    st = wait_phase(kube, "sus", namespace, "Starting")
    assert condition(st, "Suspended")["status"] == "False"
    assert names(kube, "rayjob", namespace) == ["sus"]


def test_kueue_labels_and_admission(kube, namespace, operator):
    job = finetunejob("queued")
    job["metadata"]["labels"] = {
        "kueue.x-k8s.io/queue-name": "gpu-queue",
        "kueue.x-k8s.io/priority-class": "high",
    }
    apply(kube, namespace, job)
    rj = _wait_rayjob(kube, "queued", namespace)
    assert rj["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert rj["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "high"
    assert rj["spec"]["suspend"] is True
    st = wait_phase(kube, "queued", namespace, "Queued")
    assert "gpu-queue" in st["message"]
    # Kueue admits the workload by un-suspending the RayJob: the operator must not undo it.
    kube.kubectl(
        "patch",
        "rayjob",
        "queued",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"spec": {"suspend": false}}',
    )
    wait_phase(kube, "queued", namespace, "Starting")
    time.sleep(3)
    assert get(kube, "rayjob", "queued", namespace)["spec"]["suspend"] is False


def test_retry_resumes_then_backoff_limit(kube, namespace, operator):
    apply(kube, namespace, finetunejob("flaky"))  # backoffLimit 1
    _wait_rayjob(kube, "flaky", namespace)
    config1 = json.loads(get(kube, "configmap", "flaky-config", namespace)["data"]["config.json"])
    rayjob_running(kube, "flaky", namespace)
    wait_phase(kube, "flaky", namespace, "Running")
    rayjob_finished(kube, "flaky", namespace, ok=False)

    st = wait_status(kube, "flaky", namespace, lambda s: s.get("attempts") == 2)
    assert st["rayJobName"] == "flaky-r1"
    # "Retrying" lasts one reconcile pass (the next one reads the new RayJob and says
    # RayClusterStarting): its event is the durable record of the transition.
    retry = wait_until(
        lambda: [e for e in events(kube, namespace, "flaky") if e["reason"] == "Retrying"],
        30,
        what="the Retrying event",
    )
    assert "starting attempt 2 of 2" in retry[0]["message"]
    _wait_rayjob(kube, "flaky", namespace, "flaky-r1")
    wait_until(
        lambda: get(kube, "rayjob", "flaky", namespace) is None,
        30,
        what="the failed attempt's RayJob to be deleted",
    )
    config2 = json.loads(get(kube, "configmap", "flaky-config", namespace)["data"]["config.json"])
    # Same storage prefix: the trainer resumes from the last committed checkpoint there.
    assert config2["attempt"] == 2 and config2["storagePrefix"] == config1["storagePrefix"]
    env = get(kube, "rayjob", "flaky-r1", namespace)["spec"]["rayClusterSpec"]["workerGroupSpecs"][
        0
    ]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "KUBETUNE_ATTEMPT", "value": "2"} in env

    rayjob_finished(kube, "flaky-r1", namespace, ok=False)
    st = wait_phase(kube, "flaky", namespace, "Failed")
    assert st["reason"] == "BackoffLimitExceeded" and st["attempts"] == 2
    assert condition(st, "Failed")["status"] == "True"
    assert names(kube, "rayjob", namespace) == ["flaky-r1"]
    warnings = [e for e in events(kube, namespace, "flaky") if e["type"] == "Warning"]
    assert any(e["reason"] == "BackoffLimitExceeded" for e in warnings)


def test_one_status_write_per_reconcile(kube, namespace, s3, operator):
    # A whole life (a retry, a terminal phase whose TTL of 0 deletes the children
    # at once) and a spec error beside it: each reconcile writes status at most once.
    s3_secret(kube, namespace, s3)
    apply(kube, namespace, finetunejob("once", s3, ttlSecondsAfterFinished=0))
    bad = finetunejob("once-bad", s3)
    bad["spec"]["output"] = {}  # no URI anywhere: InvalidSpec
    apply(kube, namespace, bad)
    _wait_rayjob(kube, "once", namespace)
    rayjob_finished(kube, "once", namespace, ok=False)
    _wait_rayjob(kube, "once", namespace, "once-r1")
    rayjob_finished(kube, "once-r1", namespace)
    st = wait_status(kube, "once", namespace, lambda s: condition(s, "ChildrenDeleted"), 30)
    assert st["phase"] == "Succeeded" and st["attempts"] == 2
    assert wait_phase(kube, "once-bad", namespace, "Failed")["reason"] == "InvalidSpec"
    reconciles, writes, more = operator.status_writes()
    # Written: attempt 1 starting, the retry, attempt 2 starting, Succeeded, the TTL's
    # cleanup (once one reconcile's second write), InvalidSpec.
    assert writes >= 6 and reconciles >= writes and more == 0, (reconciles, writes, more)


def test_active_deadline(kube, namespace, operator):
    apply(kube, namespace, finetunejob("slow", activeDeadlineSeconds=3))
    _wait_rayjob(kube, "slow", namespace)
    rayjob_running(kube, "slow", namespace)
    st = wait_phase(kube, "slow", namespace, "Failed", timeout=30)
    assert st["reason"] == "DeadlineExceeded"
    wait_until(
        lambda: get(kube, "rayjob", "slow", namespace) is None,
        30,
        what="the RayJob to be deleted at the deadline",
    )


def test_ttl_removes_children_keeps_job_and_storage(kube, namespace, s3, operator):
    s3_secret(kube, namespace, s3)
    apply(kube, namespace, finetunejob("ttl", s3, ttlSecondsAfterFinished=2))
    uid = get(kube, "finetunejob", "ttl", namespace)["metadata"]["uid"]
    _wait_rayjob(kube, "ttl", namespace)
    _write(s3, f"runs/{namespace}/ttl/{uid}/outputs.json", {"adapter": "s3://x/adapter"})
    rayjob_finished(kube, "ttl", namespace)
    wait_phase(kube, "ttl", namespace, "Succeeded")
    # Success does not wait on storage: the outputs reach status on their own read,
    # before or after the TTL removes the children.
    st = wait_status(
        kube,
        "ttl",
        namespace,
        lambda s: condition(s, "ChildrenDeleted") and (s.get("outputs") or {}).get("adapter"),
        30,
    )
    assert condition(st, "ChildrenDeleted")["reason"] == "TTLExpired"
    assert get(kube, "rayjob", "ttl", namespace) is None
    assert get(kube, "configmap", "ttl-config", namespace) is None
    assert st["phase"] == "Succeeded" and st["outputs"]["adapter"] == "s3://x/adapter"
    assert s3.fs.exists(f"{s3.bucket}/runs/{namespace}/ttl/{uid}/outputs.json")


def test_delete_waits_for_the_rayjob_to_stop(kube, namespace, operator):
    apply(kube, namespace, finetunejob("gone"))
    _wait_rayjob(kube, "gone", namespace)
    # Stand-in for KubeRay's finalizer, which holds a RayJob while it stops the Ray
    # job (its own name would be removed by a real KubeRay running in this session).
    hold = '[{"op": "add", "path": "/metadata/finalizers", "value": ["test.kubetune.io/hold"]}]'
    kube.kubectl("patch", "rayjob", "gone", "-n", namespace, "--type=json", "-p", hold)
    kube.kubectl("delete", "ftj", "gone", "-n", namespace, "--wait=false")
    wait_until(
        lambda: get(kube, "rayjob", "gone", namespace)["metadata"].get("deletionTimestamp"),
        30,
        what="the operator to delete the RayJob",
    )
    time.sleep(2)
    job = get(kube, "finetunejob", "gone", namespace)
    assert job is not None and FINALIZER in job["metadata"]["finalizers"], (
        "the FineTuneJob must stay until its RayJob is gone"
    )
    kube.kubectl(
        "patch",
        "rayjob",
        "gone",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"metadata": {"finalizers": null}}',
    )
    wait_until(
        lambda: get(kube, "finetunejob", "gone", namespace) is None,
        60,
        what="the FineTuneJob to go once the RayJob is gone",
    )


def test_restart_between_recording_names_and_creating(kube, namespace, tmp_path):
    # The state a crash leaves right after the status write and before the create.
    apply(kube, namespace, finetunejob("crash"))
    kube.kubectl(
        "patch",
        "ftj",
        "crash",
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(
            {
                "status": {
                    "rayJobName": "crash",
                    "configMapName": "crash-config",
                    "attempts": 1,
                    "phase": "Pending",
                    "reason": "Creating",
                }
            }
        ),
    )
    op = OperatorProcess(kube, [namespace], tmp_path).start()
    try:
        _wait_rayjob(kube, "crash", namespace, "crash")
        time.sleep(3)
        assert names(kube, "rayjob", namespace) == ["crash"]
        assert names(kube, "configmap", namespace, "kubetune.io/job-name") == ["crash-config"]
    finally:
        op.stop()
        print(op.log_tail(80))


def test_restart_deletes_the_rayjob_an_earlier_attempt_left(kube, namespace, tmp_path):
    # A retry records attempt 2 in status, then deletes attempt 1's RayJob: an
    # operator killed in between leaves that RayJob running beside the new one.
    from kubetune_operator.children import Settings, spec_to_rayjob

    apply(kube, namespace, finetunejob("left"))
    job = get(kube, "finetunejob", "left", namespace)
    leftover = spec_to_rayjob(job, Settings(), 1)
    apply(kube, namespace, leftover)  # attempt 1's, as the operator made it
    retried = {"rayJobName": "left-r1", "configMapName": "left-config", "attempts": 2}
    kube.kubectl(
        "patch", "ftj", "left", "-n", namespace, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": retried | {"phase": "Starting", "reason": "Retrying"}}),
    )  # fmt: skip
    op = OperatorProcess(kube, [namespace], tmp_path).start()
    try:
        rj = _wait_rayjob(kube, "left", namespace, "left-r1")
        assert rj["metadata"]["labels"]["kubetune.io/attempt"] == "2"
        wait_until(
            lambda: get(kube, "rayjob", "left", namespace) is None,
            30,
            what="attempt 1's leftover RayJob to be deleted",
        )
        assert names(kube, "rayjob", namespace) == ["left-r1"]
        wait_until(
            lambda: [
                e for e in events(kube, namespace, "left") if e["reason"] == "OldAttemptDeleted"
            ],
            10,
            what="the event naming the deleted RayJob",
        )
    finally:
        op.stop()
        print(op.log_tail(80))


def test_operator_killed_mid_job_restarts_cleanly(kube, namespace, s3, tmp_path):
    s3_secret(kube, namespace, s3)
    op = OperatorProcess(kube, [namespace], tmp_path).start()
    try:
        for i in range(3):
            apply(kube, namespace, finetunejob(f"k{i}", s3))
        for i in range(3):
            _wait_rayjob(kube, f"k{i}", namespace)
        rayjob_running(kube, "k0", namespace)
        wait_phase(kube, "k0", namespace, "Running")
        op.kill()
        rayjob_finished(kube, "k0", namespace)  # happens while no operator runs
        apply(kube, namespace, finetunejob("k3", s3))  # created while no operator runs
        op.start()
        wait_phase(kube, "k0", namespace, "Succeeded")
        _wait_rayjob(kube, "k3", namespace)
        for _ in range(2):  # and again, right after a restart
            op.kill()
            op.start()
        time.sleep(3)
        assert sorted(names(kube, "rayjob", namespace)) == ["k0", "k1", "k2", "k3"]
        assert status(kube, "k0", namespace)["phase"] == "Succeeded"
        for i in range(4):
            assert status(kube, f"k{i}", namespace)["attempts"] == 1
        annotations = get(kube, "finetunejob", "k1", namespace)["metadata"].get("annotations", {})
        assert not any(k.startswith("kopf.zalando.org") for k in annotations), annotations
    finally:
        op.stop()
        print(op.log_tail(120))


@pytest.mark.parametrize(
    "spec_patch, field",
    [
        # no URI and no operator default: only the operator knows its own settings
        # (an unsupported scheme is refused at admission now: test_admission_agreement)
        ({"output": {}}, "spec.output.uri"),
    ],
)
def test_invalid_spec_fails_with_reason_and_no_hot_loop(
    kube, namespace, operator, spec_patch, field
):
    job = finetunejob("bad")
    job["spec"] |= spec_patch
    apply(kube, namespace, job)
    st = wait_phase(kube, "bad", namespace, "Failed")
    assert st["reason"] == "InvalidSpec" and field in st["message"]
    assert condition(st, "Validated")["status"] == "False"
    assert names(kube, "rayjob", namespace) == []
    # kopf posts events from a queue: the event may trail the status write.
    wait_until(
        lambda: any(
            e["type"] == "Warning" and e["reason"] == "InvalidSpec"
            for e in events(kube, namespace, "bad")
        ),
        30,
        what="the InvalidSpec warning event",
    )
    # The first reconcile runs from the watch event, before kopf's finalizer
    # patch: take the version once that landed. kopf keeps no diff base or
    # progress in annotations (the operator has no change handlers).
    wait_until(
        lambda: (
            FINALIZER
            in get(kube, "finetunejob", "bad", namespace)["metadata"].get("finalizers", [])
        ),
        30,
        what="kopf's finalizer",
    )
    meta = get(kube, "finetunejob", "bad", namespace)["metadata"]
    assert not [a for a in meta.get("annotations") or {} if a.startswith("kopf.kubetune.io/")]
    rv = meta["resourceVersion"]
    time.sleep(4)
    assert get(kube, "finetunejob", "bad", namespace)["metadata"]["resourceVersion"] == rv
    assert operator.healthy()


def test_cel_rejects_unsafe_edits_and_allows_safe_ones(kube, namespace, operator):
    apply(kube, namespace, finetunejob("edit"))
    _wait_rayjob(kube, "edit", namespace)
    out = kube.kubectl(
        "patch",
        "ftj",
        "edit",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"spec": {"hyperparameters": {"maxSteps": 99}}}',
        check=False,
    )
    assert out.returncode != 0 and "cannot change" in out.stderr
    kube.kubectl(
        "patch",
        "ftj",
        "edit",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"spec": {"backoffLimit": 5}}',
    )
    st = wait_status(kube, "edit", namespace, lambda s: s.get("observedGeneration") == 2)
    assert st["attempts"] == 1


def test_metrics_and_health(kube, namespace, operator):
    apply(kube, namespace, finetunejob("m"))
    _wait_rayjob(kube, "m", namespace)
    assert operator.healthy()
    text = wait_until(
        lambda: (t := operator.metrics()) and 'phase="Starting"} 1.0' in t and t,
        30,
        what="jobs-by-phase metric",
    )
    assert "kubetune_reconcile_duration_seconds_count" in text
    assert "kubetune_reconcile_errors_total" in text or "kubetune_reconcile_errors" in text


def test_kuberay_accepts_our_rayjob_and_builds_the_cluster(kube, kuberay, namespace, s3, operator):
    s3_secret(kube, namespace, s3)
    apply(kube, namespace, finetunejob("real", s3))
    _wait_rayjob(kube, "real", namespace)
    rj = wait_until(
        lambda: (
            (r := get(kube, "rayjob", "real", namespace))
            and r.get("status", {}).get("jobDeploymentStatus")
            and r
        ),
        60,
        what="KubeRay to take the RayJob",
    )
    assert rj["status"]["jobDeploymentStatus"] != "ValidationFailed", rj["status"]
    cluster = rj["status"].get("rayClusterName") or wait_until(
        lambda: get(kube, "rayjob", "real", namespace)["status"].get("rayClusterName"),
        60,
        what="the RayCluster name",
    )
    rc = wait_until(lambda: get(kube, "raycluster", cluster, namespace), 60, what="RayCluster")
    head = rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"] == TRAINER_IMAGE
    assert {"name": "kubetune-config", "mountPath": "/etc/kubetune", "readOnly": True} in head[
        "volumeMounts"
    ]
    worker = rc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"

    def pods():
        out = kube.kubectl(
            "get", "pods", "-n", namespace, "-l", f"ray.io/cluster={cluster}", "-o", "json"
        )
        return json.loads(out.stdout)["items"]

    head_pod = wait_until(
        lambda: [p for p in pods() if p["metadata"]["labels"].get("ray.io/node-type") == "head"],
        60,
        what="the head Pod",
    )[0]
    assert head_pod["metadata"]["labels"]["kubetune.io/job-name"] == "real"
    c = head_pod["spec"]["containers"][0]
    env = {e["name"] for e in c["env"]}
    assert {"KUBETUNE_OUTPUT_AWS_ACCESS_KEY_ID", "KUBETUNE_JOB_UID"} <= env
    # KubeRay hands the job's token to Ray, from the Secret the operator made
    token = {e["name"]: e for e in c["env"]}["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert token == {"name": "real-ray-token", "key": "auth_token"} | (
        {"optional": token["optional"]} if "optional" in token else {}
    )
    assert {e["name"]: e.get("value") for e in c["env"]}["RAY_AUTH_MODE"] == "token"
    assert head_pod["spec"]["automountServiceAccountToken"] is False
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    st = wait_status(kube, "real", namespace, lambda s: s.get("rayClusterName") == cluster, 60)
    assert st["phase"] in ("Starting", "Pending")
    assert rj["status"]["jobDeploymentStatus"] in ("Initializing", "Running", "Waiting")


def test_kopf_run_module_runs_the_same_operator(kube, namespace, tmp_path):
    op = OperatorProcess(kube, [namespace], tmp_path, via_kopf=True).start()
    try:
        apply(kube, namespace, finetunejob("viakopf"))
        rj = _wait_rayjob(kube, "viakopf", namespace)
        assert rj["metadata"]["labels"]["kubetune.io/job-name"] == "viakopf"
        wait_phase(kube, "viakopf", namespace, "Starting")
        # The startup settings applied under `kopf run` too: our finalizer name
        # (kopf's default is kopf.zalando.org/KopfFinalizerMarker).
        wait_until(
            lambda: (
                FINALIZER
                in get(kube, "finetunejob", "viakopf", namespace)["metadata"].get("finalizers", [])
            ),
            30,
            what="the operator's own finalizer",
        )
    finally:
        op.stop()
        print(op.log_tail(80))
