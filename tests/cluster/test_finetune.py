"""FineTuneJobs on a real one-node cluster: `kubectl apply` → kubetune's operator
(a Pod from the chart) → KubeRay (a Pod too) starts a head and two workers from the
trainer image → Ray Train + DeepSpeed ZeRO-2 train LoRA across the pods (gloo) →
data, checkpoints and the adapter in S3 → `kubectl wait --for=condition=Succeeded`.

Every job runs in a namespace that enforces the `restricted` Pod Security
Standard; its Ray cluster answers only holders of the job's token (a probe pod
from another namespace is refused) and a NetworkPolicy names who may reach it.

Faults: a worker pod deleted after a committed checkpoint and `spec.suspend`
mid-run (one job, both in turn), and a spec whose pods Kubernetes refuses to create.
"""

from __future__ import annotations

import json
import textwrap
import time
from pathlib import Path

import pytest

from harness.kuberay import KUBERAY_NAMESPACE
from harness.procs import wait_until
from kubetune_api.storage import STARTUP_PHASES
from model_fixtures import tiny_model
from operator_support import apply, condition, get, names, s3_secret, status, wait_status

ROOT = Path(__file__).resolve().parents[2]
JOB_TIMEOUT = 900
# The fault run's length, sized from the measured step rate so that both faults
# land mid-run and no more steps are trained than that needs:
# - the tiny model trains at ~3.3 steps/s in these pods (350m CPU per worker);
# - the status shows a checkpoint up to one poll (10 s) after the trainer commits it;
# - a deleted worker stops the run at once; the retry resumes from the checkpoint;
# - a suspended run trains on while the operator's poll, the patch and KubeRay's
#   delete go through; without save on stop it also trained through the pods'
#   grace period (30 s): measured here, suspended when the status showed
#   checkpoint 20, the trainer reached step 143 (~37 s of training) and the resume
#   lost the 123 steps after checkpoint 20. With save on stop the ranks stop at
#   the step in flight when the pods are told to stop.
STEP_RATE = 3.3  # steps/s
EVERY = 20  # steps between checkpoints
POLL_S, SUSPEND_LAG_S = 10, 37
# First fault at the first checkpoint (+ a poll); the retry's first new checkpoint
# (+ a poll); then the suspend's lag; half as much again as a margin.
FAULT_RUN = int(round(1.5 * (2 * (EVERY + STEP_RATE * POLL_S) + STEP_RATE * SUSPEND_LAG_S), -1))
EVIDENCE = ROOT / ".cache" / "cluster-tier"


def _job(name: str, bucket, steps: int, every: int) -> dict:
    access = {
        "endpoint": bucket.endpoint,
        "region": bucket.region,
        "secretRef": {"name": "s3-creds"},
    }
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": f"s3://{bucket.bucket}/models/tiny"} | access,
            "dataset": {
                "train": {"uri": f"s3://{bucket.bucket}/data/train.jsonl"},
                "format": "chat",
                "maxSeqLength": 128,
                "validationSplit": 0.1,
            }
            | access,
            "method": {"type": "lora", "lora": {"r": 4, "alpha": 8}},
            "hyperparameters": {
                "maxSteps": steps,
                "batchSize": 2,
                "learningRate": 0.001,
                "precision": "fp32",
                "logEverySteps": 1,
            },
            "checkpointing": {"everySteps": every, "keepLast": 10},
            "evaluation": {"enabled": True, "maxBatches": 2},
            # A head and two workers on a 2-core node, beside KubeRay's submitter
            # (100m), KubeRay's operator (100m) and kubetune's. Ray's head does not
            # start in time below ~0.5 CPU (limits equal requests: CFS throttles it);
            # each worker counts as 1 Ray CPU.
            "resources": {
                "workers": 2,
                "gpusPerWorker": 0,
                "cpuPerWorker": "350m",
                "memoryPerWorker": "2560Mi",
                # checkpoint staging: a 1Gi emptyDir, requested as ephemeral-storage
                "scratchPerWorker": "1Gi",
                # The head holds the driver and Ray Train's controller besides
                # Ray's own processes: at 2Gi Ray's memory monitor killed them.
                "head": {"cpu": "700m", "memory": "3Gi"},
            },
            "distributed": {"zeroStage": 2},
            "output": {"uri": f"s3://{bucket.bucket}/runs"} | access,
            "backoffLimit": 2,
        },
    }


@pytest.fixture
def staged(cluster, kubetune_operator, cluster_ns, cluster_s3, tmp_path):
    """A namespace with the S3 Secret, and the model and data in the bucket."""
    from kubetune_trainer import quickstart

    model = tiny_model(ROOT / ".cache" / "models" / "tiny-llama-e2e")
    s3 = cluster_s3
    s3.fs.put(str(model), f"{s3.bucket}/models/tiny", recursive=True)
    s3.fs.put(str(quickstart.prepare_data(ROOT)), f"{s3.bucket}/data/train.jsonl")
    s3_secret(cluster.plane, cluster_ns, s3)
    return cluster.plane, cluster_ns, s3


def _wait(plane, name: str, ns: str, pred, what: str, timeout: float = JOB_TIMEOUT) -> dict:
    """wait_status that stops early when the job has Failed (and says why)."""
    st = wait_status(plane, name, ns, lambda s: pred(s) or s.get("phase") == "Failed",
                     timeout, what)  # fmt: skip
    assert pred(st), f"{name} Failed while waiting for {what}: {st.get('message')}"
    return st


def _pods(plane, ns: str) -> str:
    return plane.kubectl("get", "pods", "-A", "-o", "wide").stdout


def _wait_succeeded(plane, name: str, ns: str) -> dict:
    out = plane.kubectl(
        "wait", "--for=condition=Succeeded", f"ftj/{name}", "-n", ns,
        f"--timeout={JOB_TIMEOUT}s", check=False, timeout=JOB_TIMEOUT + 30,
    )  # fmt: skip
    st = status(plane, name, ns)
    assert out.returncode == 0, (out.stderr, json.dumps(st, indent=1), _pods(plane, ns))
    return st


def _adapter_loads(s3, uri: str, model_dir: Path, tmp: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    local = tmp / "adapter"
    s3.fs.get(uri.removeprefix("s3://"), str(local), recursive=True)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(base, local)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(p.numel() > 0 for p in lora)
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        out = model(torch.tensor([[1, 2, 3]]))
    assert out.logits.shape[-1] == base.config.vocab_size


STAGE_CLAIM = "kubetune-stage"


def _stage_claim(cluster, ns: str) -> Path:
    """A ReadWriteMany claim on a hostPath PersistentVolume (the node's folder,
    writable by the pods' uid), bound by kube-controller-manager's binder. Restricted
    pods may mount a claim, never a hostPath. Returns the folder."""
    folder = cluster.dir / f"stage-{ns}"
    folder.mkdir(mode=0o777)
    folder.chmod(0o777)  # past the umask: uid 10001 creates <namespace>/<uid> in it
    pv = {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": f"stage-{ns}"},
        "spec": {
            "capacity": {"storage": "1Gi"},
            "accessModes": ["ReadWriteMany"],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": "",
            "hostPath": {"path": str(folder), "type": "Directory"},
            "claimRef": {"namespace": ns, "name": STAGE_CLAIM},
        },
    }
    pvc = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": STAGE_CLAIM},
        "spec": {
            "accessModes": ["ReadWriteMany"],
            "storageClassName": "",
            "volumeName": pv["metadata"]["name"],
            "resources": {"requests": {"storage": "1Gi"}},
        },
    }
    cluster.plane.kubectl("apply", "-f", "-", input=json.dumps(pv))
    apply(cluster.plane, ns, pvc)
    # Bound before the job, as an existing claim is: a pod on an unbound claim waits
    # in the scheduler's backoff, which the startup table would count.
    wait_until(
        lambda: (get(cluster.plane, "pvc", STAGE_CLAIM, ns) or {}).get("status", {}).get("phase")
        == "Bound",
        60, interval=0.5, what=f"the claim {STAGE_CLAIM} Bound",
    )  # fmt: skip
    return folder


def _model_gets(s3, log_from: int) -> dict[str, int]:
    """GETs of each model object in the S3 server's request log since `log_from`
    (its size then): the pods' downloads, lists left out."""
    text = s3.server.log.read_bytes()[log_from:].decode(errors="replace")
    counts: dict[str, int] = {}
    prefix = f"/{s3.bucket}/models/tiny/"
    for line in text.splitlines():
        cols = [c.strip() for c in line.split("|")]
        if len(cols) > 6 and cols[5] == "GET" and cols[6].startswith(prefix):
            name = cols[6][len(prefix) :]
            counts[name] = counts.get(name, 0) + 1
    return counts


def test_lora_zero2_on_two_worker_pods(cluster, staged, tmp_path):
    plane, ns, s3 = staged
    # Staged once per job: the head fetches the model and data into the claim
    # before the workers start; they read it there (kubetune_trainer.staging).
    stage_root = _stage_claim(cluster, ns)
    log_from = s3.server.log.stat().st_size
    t0 = time.monotonic()
    job = _job("pods", s3, steps=6, every=3)
    job["spec"]["staging"] = {"claimName": STAGE_CLAIM}
    apply(plane, ns, job)
    # From another namespace, while the job runs: its Ray job API without the token.
    probe_ns, probe = _start_probe(cluster, ns)

    # The head, both workers and the operator, all running from kubetune's images.
    def training(st: dict) -> bool:
        return (st.get("progress") or {}).get("step", 0) >= 1

    _wait(plane, "pods", ns, training, "the first training step")
    first_step = time.monotonic() - t0
    pods = _pods(plane, ns)
    EVIDENCE.mkdir(parents=True, exist_ok=True)
    (EVIDENCE / "pods-mid-run.txt").write_text(pods)
    print(f"apply -> first training step: {first_step:.0f}s\n{pods}")
    running = [ln for ln in pods.splitlines() if " Running " in ln]
    assert sum("-head-" in ln for ln in running) == 1, pods
    assert sum("-workers-" in ln for ln in running) == 2, pods
    assert any(ln.startswith("kubetune-system ") for ln in running), pods
    assert any(ln.startswith(f"{KUBERAY_NAMESPACE} ") for ln in running), pods  # KubeRay
    live = _assert_restricted_pods(plane, ns)
    _assert_staged_on_scratch(plane, ns, live)
    _assert_network_policy(plane, ns, get(plane, "finetunejob", "pods", ns))

    st = _wait_succeeded(plane, "pods", ns)
    (EVIDENCE / "status-final.json").write_text(json.dumps(st, indent=1))
    print(f"apply -> Succeeded: {time.monotonic() - t0:.0f}s")
    assert st["phase"] == "Succeeded"
    assert st["progress"]["step"] == 6
    assert isinstance(st["metrics"]["trainLoss"], float) and st["metrics"]["trainLoss"] > 0
    # The way from `kubectl apply` to step 1, phase by phase, on the API
    # server's clock and the trainer's (status.progress.startup).
    startup = st["progress"]["startup"]
    table = "\n".join(f"  {p['name']:<18}{p['seconds']:>7.1f}s  {p['time']}" for p in startup)
    (EVIDENCE / "startup.txt").write_text(table + "\n")
    print(f"created -> first step, phase by phase:\n{table}")
    got = [p["name"] for p in startup]
    assert got[:4] == ["created", "rayJobCreated", "podsScheduled", "containersStarted"], got
    assert got[4:] == [n for n in STARTUP_PHASES if n in got[4:]] and got[-1] == "firstStep", got
    seconds = [p["seconds"] for p in startup]
    assert all(b >= a - 1.0 for a, b in zip(seconds, seconds[1:], strict=False)), table
    assert seconds[-1] <= first_step + 1.0, (table, first_step)
    assert [c["step"] for c in st["checkpoints"]] == [3, 6]
    assert st["outputs"]["adapter"].startswith(f"s3://{s3.bucket}/runs/{ns}/pods/")
    _adapter_loads(s3, st["outputs"]["adapter"], ROOT / ".cache/models/tiny-llama-e2e", tmp_path)
    assert len(names(plane, "rayjob", ns)) <= 1
    _assert_probe_refused(plane, probe_ns, probe)
    # Two workers, one fetch of each model file: the head's (main fetched it on
    # the head and on every worker: 3 GETs of each).
    gets = _model_gets(s3, log_from)
    (EVIDENCE / "s3-model-gets.json").write_text(json.dumps(gets, indent=1, sort_keys=True))
    print(f"S3 GETs of the model's objects, head and two workers: {gets}")
    assert gets and set(gets.values()) == {1}, gets
    assert "config.json" in gets and any(n.endswith(".safetensors") for n in gets), gets
    # the driver removes the attempt's stage, and the job's folder, when it ends
    uid = get(plane, "finetunejob", "pods", ns)["metadata"]["uid"]
    assert (stage_root / ns).is_dir() and not (stage_root / ns / uid).exists()


# --- restricted pods, closed Ray clusters ------------------------------------

SA_TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"
SCRATCH = "/var/kubetune/scratch"


def _assert_restricted_pods(plane, ns: str) -> dict[str, dict]:
    """The live pods (as KubeRay and the Job controller made them, and the API
    server admitted them under `restricted`): security fields, no ServiceAccount
    token, writable paths as emptyDirs. Returns them by role."""
    items = json.loads(plane.kubectl("get", "pods", "-n", ns, "-o", "json").stdout)["items"]
    by_role: dict[str, dict] = {}
    for pod in items:
        role = pod["metadata"]["labels"].get("app.kubernetes.io/component")
        by_role.setdefault(role, pod)
        spec, name = pod["spec"], pod["metadata"]["name"]
        assert spec.get("automountServiceAccountToken") is False, name
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc = c.get("securityContext") or {}
            assert sc.get("allowPrivilegeEscalation") is False, (name, c["name"])
            assert sc.get("capabilities") == {"drop": ["ALL"]}, (name, c["name"])
            assert sc.get("runAsUser") == 10001, (name, c["name"])
            assert sc.get("readOnlyRootFilesystem") is True, (name, c["name"])
            mounts = [m["mountPath"] for m in c.get("volumeMounts", [])]
            assert not any(m.startswith(SA_TOKEN_PATH) for m in mounts), (name, mounts)
        for v in spec.get("volumes", []):
            # no projected SA token; a claim where the job stages
            assert set(v) & {"emptyDir", "configMap", "persistentVolumeClaim"}, (name, v)
    assert {"ray-head", "ray-worker", "ray-submitter"} <= set(by_role), sorted(by_role)
    worker = by_role["ray-worker"]["spec"]
    vols = {v["name"]: v for v in worker["volumes"]}
    assert vols["scratch"]["emptyDir"] == {"sizeLimit": "1Gi"}
    assert vols["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "2560Mi"}
    requests = worker["containers"][0]["resources"]["requests"]
    assert requests["ephemeral-storage"] == "1Gi", requests
    if "stage" in vols:  # the stage: the head writes it, the workers only read it
        stage = {r: {m["name"]: m for m in by_role[r]["spec"]["containers"][0]["volumeMounts"]}
                 for r in ("ray-head", "ray-worker")}  # fmt: skip
        assert stage["ray-worker"]["stage"]["readOnly"] is True, stage
        assert not stage["ray-head"]["stage"].get("readOnly"), stage
    print("restricted pods:", {r: p["metadata"]["name"] for r, p in by_role.items()})
    return by_role


def _assert_staged_on_scratch(plane, ns: str, pods: dict[str, dict]) -> None:
    """Rank 0 says where it stages checkpoints; the line reaches the submitter's
    log (Ray forwards worker output to the job's driver, which the submitter follows)."""
    submitter = pods["ray-submitter"]["metadata"]["name"]
    want = f"staging checkpoints in {SCRATCH}/kubetune-rank0-"

    def logged() -> str | None:
        out = plane.kubectl("logs", submitter, "-n", ns, check=False).stdout
        return next((ln for ln in out.splitlines() if want in ln), None)

    line = wait_until(logged, 120, interval=2, what=f"'{want}' in {submitter}'s log")
    print(f"submitter log: {line.strip()}")


def _assert_network_policy(plane, ns: str, job: dict) -> None:
    """The job's NetworkPolicy as the API server stores it, and what its selectors
    select among the live pods: the job's own (head, workers, submitter) and KubeRay's
    operator, nothing else. (This node's CNI, the bridge plugin, does not enforce
    policies; Calico or Cilium do.)"""
    uid = job["metadata"]["uid"]
    [pol_name] = names(plane, "networkpolicy", ns)
    pol = get(plane, "networkpolicy", pol_name, ns)
    assert pol["metadata"]["ownerReferences"][0]["uid"] == uid
    spec = pol["spec"]
    own = {"matchLabels": {"kubetune.io/job-uid": uid}}
    assert spec["podSelector"] == own and spec["policyTypes"] == ["Ingress"], spec
    [mine, kuberay] = spec["ingress"]
    assert mine == {"from": [{"podSelector": own}]}, mine
    assert kuberay["ports"] == [{"port": 8265, "protocol": "TCP"}], kuberay
    [peer] = kuberay["from"]

    def selected(sel: dict, namespace: str) -> list[str]:
        labels = ",".join(f"{k}={v}" for k, v in sel["matchLabels"].items())
        return names(plane, "pod", namespace, labels)

    every_pod = set(names(plane, "pod", ns))
    assert set(selected(own, ns)) == every_pod and len(every_pod) >= 4, every_pod
    ns_labels = peer["namespaceSelector"]["matchLabels"]
    assert ns_labels == {"kubernetes.io/metadata.name": KUBERAY_NAMESPACE}, peer
    assert len(selected(peer["podSelector"], KUBERAY_NAMESPACE)) == 1, peer
    for other in ("kubetune-system", "default"):
        assert not selected(peer["podSelector"], other), (other, peer)
    secret = get(plane, "secret", f"{job['metadata']['name']}-ray-token", ns)
    assert secret["metadata"]["ownerReferences"][0]["uid"] == uid


PROBE = textwrap.dedent(
    """
    import json, os, time, urllib.error, urllib.request
    url = "http://" + os.environ["DASHBOARD"] + "/api/jobs/"
    def call(token):
        req = urllib.request.Request(url)
        if token:
            req.add_header("Authorization", "Bearer " + token)
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
    deadline, codes = time.time() + 600, None
    while time.time() < deadline:
        try:
            codes = {"none": call(None), "wrong": call("x" * 43), "token": call(os.environ["T"])}
            if codes["token"] == 200:
                break
        except OSError as e:  # not up yet: DNS, connection refused, reset
            codes = {"error": repr(e)}
        time.sleep(1)
    print(json.dumps(codes))
    """
)


def _start_probe(cluster, ns: str) -> tuple[str, str]:
    """A pod in another (restricted) namespace that calls the job's Ray job API
    (port 8265) without a token, with a wrong one, and with the job's token (which
    the test copies in, to show that the refusals are the token's doing)."""
    plane, image = cluster.plane, cluster.images["trainer"]
    rayjob = wait_until(lambda: names(plane, "rayjob", ns), 120, what="the RayJob")[0]
    dashboard = wait_until(
        lambda: ((get(plane, "rayjob", rayjob, ns) or {}).get("status") or {}).get("dashboardURL"),
        300, interval=1, what="the RayJob's dashboardURL",
    )  # fmt: skip
    data = wait_until(
        lambda: (get(plane, "secret", "pods-ray-token", ns) or {}).get("data"), 120,
        what="the job's Ray token Secret",
    )  # fmt: skip
    probe_ns = cluster.restricted_namespace("probe-")
    restricted = {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "runAsUser": 10001,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    objs = [
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "copied-token"},
         "data": {"T": data["auth_token"]}},
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "probe"},
            "spec": {
                "restartPolicy": "Never",
                "automountServiceAccountToken": False,
                "terminationGracePeriodSeconds": 1,
                "containers": [{
                    "name": "probe", "image": image, "imagePullPolicy": "Never",
                    "command": ["python", "-c", PROBE],
                    "env": [
                        {"name": "DASHBOARD", "value": dashboard},
                        {"name": "T", "valueFrom": {"secretKeyRef": {"name": "copied-token",
                                                                     "key": "T"}}},
                    ],
                    "resources": {"requests": {"cpu": "20m", "memory": "64Mi"},
                                  "limits": {"memory": "256Mi"}},
                    "securityContext": restricted,
                }],
            },
        },
    ]  # fmt: skip
    items = {"apiVersion": "v1", "kind": "List", "items": objs}
    plane.kubectl("apply", "-n", probe_ns, "-f", "-", input=json.dumps(items))
    print(f"probe pod started in {probe_ns} against {dashboard}")
    return probe_ns, "probe"


def _assert_probe_refused(plane, probe_ns: str, probe: str) -> None:
    def done() -> str | None:
        phase = ((get(plane, "pod", probe, probe_ns) or {}).get("status") or {}).get("phase")
        return phase if phase in ("Succeeded", "Failed") else None

    phase = wait_until(done, 300, interval=2, what="the probe pod to finish")
    out = plane.kubectl("logs", probe, "-n", probe_ns, check=False).stdout
    plane.kubectl("delete", "namespace", probe_ns, "--wait=false", check=False)
    assert phase == "Succeeded", out
    codes = json.loads(out.strip().splitlines()[-1])
    (EVIDENCE / "probe.json").write_text(json.dumps(codes))
    print(f"Ray job API from another namespace: {codes}")
    assert codes == {"none": 401, "wrong": 403, "token": 200}, codes


def test_a_deleted_worker_and_a_suspend_each_resume_from_a_committed_checkpoint(staged):
    """Two faults in one run (one job start less than a run per fault): a worker
    pod deleted after a committed checkpoint, then `spec.suspend` mid-run once the
    retry has committed one of its own. Each time the run continues from a
    committed checkpoint at or after the one the status showed, and trains every
    step once."""
    plane, ns, s3 = staged
    apply(plane, ns, _job("fault", s3, steps=FAULT_RUN, every=EVERY))

    # Fault 1: a worker pod deleted after a committed checkpoint.
    st = _wait(plane, "fault", ns, lambda s: s.get("checkpoints"), "a committed checkpoint")
    committed = max(c["step"] for c in st["checkpoints"])
    workers = names(plane, "pod", ns, "ray.io/node-type=worker")
    assert len(workers) == 2, workers
    plane.kubectl("delete", "pod", workers[0], "-n", ns, "--grace-period=0", "--force")
    reached = _trainer_progress(s3, st)
    print(f"deleted {workers[0]} after checkpoint {committed}, at step {reached['step']}")
    assert reached["step"] < FAULT_RUN and reached["phase"] != "Succeeded", (
        f"the run trained to the end before the pod went ({reached}): raise FAULT_RUN"
    )

    # The retry resumes from it and commits a checkpoint of its own.
    def resumed_and_checkpointed(s: dict) -> bool:
        back = (s.get("progress") or {}).get("resumedFrom")
        return bool(back) and max(c["step"] for c in s.get("checkpoints") or [{"step": 0}]) > back

    st = _wait(plane, "fault", ns, resumed_and_checkpointed, "a checkpoint after the retry")
    first = st["progress"]["resumedFrom"]
    assert committed <= first < FAULT_RUN, st["progress"]

    # Fault 2: suspended mid-run, the pods removed, then resumed.
    plane.kubectl("patch", "ftj", "fault", "-n", ns, "--type=merge", "-p",
                  '{"spec":{"suspend":true}}')  # fmt: skip
    wait_until(
        lambda: not names(plane, "pod", ns, "ray.io/is-ray-node=yes"), 180, what="pods removed"
    )
    st = wait_status(plane, "fault", ns, lambda s: s.get("phase") == "Suspended", 120)
    at = max(c["step"] for c in st["checkpoints"])
    reached = _trainer_progress(s3, st)
    print(f"suspended: status had checkpoint {at}, the trainer reached step {reached['step']}")
    assert reached["step"] < FAULT_RUN and reached["phase"] != "Succeeded", (
        f"the run trained to the end before its pods went ({reached}): raise FAULT_RUN"
    )
    # Save on stop: the pods' preStop hook had the ranks commit the step in flight.
    assert reached["phase"] == "Interrupted", reached
    assert (reached.get("lastCheckpoint") or {}).get("step") == reached["step"], reached
    plane.kubectl("patch", "ftj", "fault", "-n", ns, "--type=merge", "-p",
                  '{"spec":{"suspend":false}}')  # fmt: skip
    st = _wait_succeeded(plane, "fault", ns)
    _assert_resumed(plane, ns, s3, st, reached["step"], total=FAULT_RUN, earlier=[first])
    lost = reached["step"] - st["progress"]["resumedFrom"]
    print(f"suspend: steps lost between the stop and the resume: {lost} (status had {at})")


def _assert_resumed(
    plane, ns: str, s3, st: dict, committed: int, total: int, earlier: list[int]
) -> None:
    """The job finished all `total` steps once, its last resume continuing from a
    committed checkpoint at or after `committed` (after the `earlier` resumes), shown
    in status and in metrics.jsonl; one RayJob left."""
    assert st["progress"]["step"] == total, st["progress"]
    resumed = st["progress"].get("resumedFrom")
    assert resumed is not None and committed <= resumed < total, st["progress"]
    rows = _metrics(s3, st)
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), steps  # every step logged once, none repeated
    assert [r["resumedFrom"] for r in rows if r.get("resumedFrom")] == [*earlier, resumed], rows
    rayjobs = names(plane, "rayjob", ns)
    assert len(rayjobs) == 1, rayjobs
    print(f"resumed from step {resumed} (attempt {st.get('attempts')}), rayjobs {rayjobs}")


def _trainer_progress(s3, st: dict) -> dict:
    """What the trainer itself last wrote, not the operator's last read of it: a
    fault that lands after the last step says nothing about resuming."""
    prefix = st["checkpoints"][-1]["uri"].removeprefix("s3://").rsplit("/checkpoints/", 1)[0]
    return json.loads(s3.fs.cat(f"{prefix}/progress.json"))


def _metrics(s3, st: dict) -> list[dict]:
    prefix = st["outputs"]["adapter"].removeprefix("s3://").rsplit("/", 1)[0]
    text = s3.fs.cat(f"{prefix}/metrics.jsonl").decode()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_pods_that_can_never_be_created_fail_with_the_reason(staged):
    plane, ns, s3 = staged
    job = _job("never", s3, steps=2, every=2)
    job["spec"]["resources"]["priorityClassName"] = "no-such-priority"
    apply(plane, ns, job)
    st = wait_status(plane, "never", ns, lambda s: s.get("phase") == "Failed", 180, "Failed")
    text = json.dumps(st)
    assert "no-such-priority" in text or "PriorityClass" in text, st
    failed = condition(st, "Failed")
    assert failed and failed["status"] == "True" and failed["message"], st
    assert get(plane, "finetunejob", "never", ns)


def test_a_worker_no_node_can_take_says_why_then_fails_at_the_start_limit(
    cluster, kubetune_operator, cluster_ns, cluster_s3
):
    plane, ns, s3 = cluster.plane, cluster_ns, cluster_s3
    s3_secret(plane, ns, s3)
    limit = 60
    job = _job("huge", s3, steps=2, every=2)
    job["spec"]["resources"]["memoryPerWorker"] = "1Ti"  # more than the node has
    job["spec"]["startTimeoutSeconds"] = limit
    apply(plane, ns, job)
    created = time.monotonic()

    def refused(s):
        cond = condition(s, "PodsScheduled") or {}
        return cond.get("status") == "False" and "Insufficient memory" in cond.get("message", "")

    st = _wait(plane, "huge", ns, refused, "the scheduler's reason in status", timeout=60)
    print(f"PodsScheduled=False {time.monotonic() - created:.1f}s after the job was created")
    assert st["phase"] == "Starting" and st["reason"] == "Unschedulable", st
    assert "Ray worker group workers: 0/1 nodes are available" in st["message"], st
    st = wait_status(plane, "huge", ns, lambda s: s.get("phase") == "Failed", limit + 60, "Failed")
    print(f"Failed {time.monotonic() - created:.1f}s after the job was created (limit {limit}s)")
    assert st["reason"] == "StartTimeout", st
    assert "Insufficient memory" in st["message"] and f"({limit}s)" in st["message"], st
    wait_until(lambda: get(plane, "rayjob", "huge", ns) is None, 60, what="RayJob deleted")
