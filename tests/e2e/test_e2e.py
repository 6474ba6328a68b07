"""End to end: FineTuneJob → operator → RayJob → the RayJob's own entrypoint run for
real on a local Ray against the real S3 server → status from what the trainer
wrote → `kubectl wait --for=condition=Succeeded`.

There is no kubelet, so the test plays the two parts a cluster would: it runs
the head container's entrypoint (with the container's env, Secret refs
resolved as the kubelet would, and the ConfigMap's config.json as the mounted
file), and it patches the RayJob's status as KubeRay does around that run.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import wait_until
from model_fixtures import tiny_model
from operator_support import (
    OperatorProcess,
    apply,
    finetunejob,
    get,
    rayjob_finished,
    rayjob_running,
    s3_secret,
    status,
    wait_phase,
    wait_status,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
TRAINER_TIMEOUT = 900


def _container_env(kube, namespace: str, container: dict) -> dict[str, str]:
    """The env the kubelet would give this container: values and Secret refs."""
    import base64

    env: dict[str, str] = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
            continue
        ref = e["valueFrom"]["secretKeyRef"]
        secret = get(kube, "secret", ref["name"], namespace)
        data = (secret or {}).get("data", {})
        if ref["key"] in data:
            env[e["name"]] = base64.b64decode(data[ref["key"]]).decode()
        elif not ref.get("optional"):
            raise AssertionError(f"Secret {ref['name']} lacks key {ref['key']}")
    return env


def test_finetunejob_end_to_end(kube, namespace, s3, tmp_path):
    model = tiny_model(ROOT / ".cache" / "models" / "tiny-llama-e2e")
    from kubetune_trainer import quickstart

    chat = quickstart.prepare_data(ROOT)
    s3.fs.put(str(chat), f"{s3.bucket}/data/train.jsonl")
    s3_secret(kube, namespace, s3)

    job = finetunejob("e2e", s3)
    job["spec"] |= {
        "model": {"uri": str(model)},
        "dataset": job["spec"]["dataset"]
        | {
            "train": {"uri": f"s3://{s3.bucket}/data/train.jsonl"},
            "maxSeqLength": 128,
            "validationSplit": 0.1,
        },
        "method": {"type": "lora", "lora": {"r": 4, "alpha": 8}},
        "hyperparameters": {
            "maxSteps": 4,
            "batchSize": 2,
            "learningRate": 0.001,
            "precision": "fp32",
            "logEverySteps": 1,
        },
        "checkpointing": {"everySteps": 2, "keepLast": 2},
        "evaluation": {"enabled": True, "maxBatches": 2},
        "resources": {
            "workers": 1,
            "gpusPerWorker": 0,
            "cpuPerWorker": "1",
            "memoryPerWorker": "4Gi",
        },
        "distributed": {"zeroStage": 2},
    }
    op = OperatorProcess(kube, [namespace], tmp_path).start()
    try:
        apply(kube, namespace, job)
        st = wait_status(kube, "e2e", namespace, lambda s: s.get("rayJobName"), 60)
        rj = wait_until(
            lambda: get(kube, "rayjob", st["rayJobName"], namespace), 60, what="the RayJob"
        )
        head = rj["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
        container = head["containers"][0]
        cm_name = head["volumes"][0]["configMap"]["name"]
        mount = container["volumeMounts"][0]["mountPath"]
        cm = get(kube, "configmap", cm_name, namespace)
        (tmp_path / "etc").mkdir()
        for key, value in cm["data"].items():
            (tmp_path / "etc" / key).write_text(value)

        argv = shlex.split(rj["spec"]["entrypoint"])
        assert argv[:3] == ["python", "-m", "kubetune_trainer"], argv
        argv = [sys.executable, *[a.replace(mount, str(tmp_path / "etc")) for a in argv[1:]]]
        env = os.environ | _container_env(kube, namespace, container)
        env.pop("RAY_ADDRESS", None)  # no cluster to join: the trainer starts a local Ray
        assert "KUBETUNE_OUTPUT_AWS_SECRET_ACCESS_KEY" in env

        rayjob_running(kube, rj["metadata"]["name"], namespace)
        wait_phase(kube, "e2e", namespace, "Running")
        started = time.monotonic()
        run = subprocess.run(
            argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=TRAINER_TIMEOUT
        )
        print(f"trainer ran {time.monotonic() - started:.0f}s rc={run.returncode}")
        assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
        rayjob_finished(kube, rj["metadata"]["name"], namespace, ok=True)

        out = kube.kubectl(
            "wait",
            "--for=condition=Succeeded",
            "ftj/e2e",
            "-n",
            namespace,
            "--timeout=120s",
            timeout=130,
        )
        assert "condition met" in out.stdout
        # Success never waits on storage: the final read lands just after it.
        st = wait_status(kube, "e2e", namespace, lambda s: s.get("outputs", {}).get("adapter"), 60)
        assert st["phase"] == "Succeeded"
        assert isinstance(st["metrics"]["trainLoss"], float) and st["metrics"]["trainLoss"] > 0
        assert st["progress"]["step"] == 4 and st["progress"]["display"] == "4/4"
        assert [c["step"] for c in st["checkpoints"]] == [2, 4]
        for c in st["checkpoints"]:
            path = c["uri"].removeprefix("s3://")
            assert s3.fs.exists(f"{path}/manifest.json"), c
        assert st["outputs"]["adapter"].startswith(f"s3://{s3.bucket}/runs/{namespace}/e2e/")
        assert s3.fs.exists(st["outputs"]["adapter"].removeprefix("s3://"))
        print(json.dumps(status(kube, "e2e", namespace), indent=1))
    finally:
        op.stop()
        print(op.log_tail(80))
