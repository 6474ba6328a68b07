"""FineTuneJobs on a real one-node cluster: `kubectl apply` → kubetune's operator
(a Pod from the chart) → KubeRay starts a head and two workers from the trainer
image → Ray Train + DeepSpeed ZeRO-2 train LoRA across the pods (gloo) → data,
checkpoints and the adapter in S3 → `kubectl wait --for=condition=Succeeded`.

Faults: a worker pod deleted after a committed checkpoint and `spec.suspend`
mid-run (one job, both in turn), and a spec whose pods Kubernetes refuses to create.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from harness.procs import wait_until
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
#   delete go through and the pods' grace period (30 s) runs out: measured here,
#   suspended when the status showed checkpoint 20, the trainer reached step 143
#   (~37 s of training).
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
            # (500m) and the operator. Ray's head does not start in time below ~0.5 CPU
            # (limits equal requests: CFS throttles it); each worker counts as 1 Ray CPU.
            "resources": {
                "workers": 2,
                "gpusPerWorker": 0,
                "cpuPerWorker": "350m",
                "memoryPerWorker": "2560Mi",
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


def test_lora_zero2_on_two_worker_pods(staged, tmp_path):
    plane, ns, s3 = staged
    t0 = time.monotonic()
    apply(plane, ns, _job("pods", s3, steps=6, every=3))

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

    st = _wait_succeeded(plane, "pods", ns)
    (EVIDENCE / "status-final.json").write_text(json.dumps(st, indent=1))
    print(f"apply -> Succeeded: {time.monotonic() - t0:.0f}s")
    assert st["phase"] == "Succeeded"
    assert st["progress"]["step"] == 6
    assert isinstance(st["metrics"]["trainLoss"], float) and st["metrics"]["trainLoss"] > 0
    assert [c["step"] for c in st["checkpoints"]] == [3, 6]
    assert st["outputs"]["adapter"].startswith(f"s3://{s3.bucket}/runs/{ns}/pods/")
    _adapter_loads(s3, st["outputs"]["adapter"], ROOT / ".cache/models/tiny-llama-e2e", tmp_path)
    assert len(names(plane, "rayjob", ns)) <= 1


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
    plane.kubectl("patch", "ftj", "fault", "-n", ns, "--type=merge", "-p",
                  '{"spec":{"suspend":false}}')  # fmt: skip
    st = _wait_succeeded(plane, "fault", ns)
    _assert_resumed(plane, ns, s3, st, at, total=FAULT_RUN, earlier=[first])


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
