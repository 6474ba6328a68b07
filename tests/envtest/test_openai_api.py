"""`kubetune api` with the official openai client, unchanged, on the real control
plane, operator and S3 server: uploads checked at upload, a job created with the
caller's ServiceAccount token (the server's own identity may not create
FineTuneJobs), its events and checkpoints while it runs, `succeeded` with its
fine_tuned_model, a second job continuing it from that `ft:` name, pause, resume
and cancel, and the client's PermissionDeniedError for a caller without RBAC.

No pods run here: KubeRay's part is played by patching the RayJob status and
the trainer's by writing its storage records to S3 (as tests/envtest/test_operator.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
import yaml
from kubernetes import client

from harness import free_port, wait_until
from kubetune_openai.mapping import rfc3339
from operator_support import (
    _die_with_parent,
    get,
    http_get,
    rayjob_finished,
    rayjob_running,
    s3_secret,
    wait_status,
)

pytestmark = pytest.mark.envtest

CHAT = [
    {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
    for i in range(4)
]
CATALOG = {
    "models": [
        {
            "id": "smollm2",
            "model": {"name": "HuggingFaceTB/SmolLM2-135M-Instruct"},
            "spec": {"resources": {"workers": 1, "cpuPerWorker": "1", "memoryPerWorker": "2Gi"}},
        }
    ]
}


def _jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _token(core, namespace: str, sa: str) -> str:
    core.create_namespaced_service_account(
        namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name=sa))
    )
    req = client.AuthenticationV1TokenRequest(
        spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=3600)
    )
    return core.create_namespaced_service_account_token(sa, namespace, req).status.token


RBAC = "rbac.authorization.k8s.io"


def _role(kind: str, name: str, namespace: str | None, rules: list[dict]) -> dict:
    meta = {"name": name} | ({"namespace": namespace} if namespace else {})
    return {"apiVersion": f"{RBAC}/v1", "kind": kind, "metadata": meta, "rules": rules}


def _binding(role: dict, sa: str, namespace: str) -> dict:
    kind = role["kind"] + "Binding"
    return {
        "apiVersion": f"{RBAC}/v1",
        "kind": kind,
        "metadata": dict(role["metadata"]),
        "roleRef": {"apiGroup": RBAC, "kind": role["kind"], "name": role["metadata"]["name"]},
        "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": namespace}],
    }


def _rbac(kube, namespace: str) -> list[str]:
    """The chart's rules for the API server (TokenReview, SubjectAccessReview, the
    catalog) and a tenant Role for FineTuneJobs; returns cluster objects to delete."""
    from kubetune_openai.kube import SERVER_CLUSTER_RULES

    cluster_role = f"kubetune-api-{namespace}"
    server = _role(
        "ClusterRole",
        cluster_role,
        None,
        [
            {"apiGroups": [g], "resources": [r], "verbs": sorted(v)}
            for (g, r), v in SERVER_CLUSTER_RULES.items()
        ],
    )
    catalog = _role(
        "Role",
        "kubetune-api-catalog",
        namespace,
        [{"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["models"],
          "verbs": ["get"]}],
    )  # fmt: skip
    tenant = _role(
        "Role",
        "fine-tuner",
        namespace,
        [
            {
                "apiGroups": ["kubetune.io"],
                "resources": ["finetunejobs"],
                "verbs": ["get", "list", "watch", "create", "patch", "delete"],
            },
            {"apiGroups": [""], "resources": ["events"], "verbs": ["list"]},
        ],
    )
    docs = [
        server,
        _binding(server, "kubetune-api", namespace),
        catalog,
        _binding(catalog, "kubetune-api", namespace),
        tenant,
        _binding(tenant, "pipeline", namespace),
    ]
    kube.kubectl("apply", "-f", "-", input="\n---\n".join(json.dumps(d) for d in docs))
    return [f"clusterrole/{cluster_role}", f"clusterrolebinding/{cluster_role}"]


class ApiServer:
    """`kubetune api` as a process, with the kubetune-api ServiceAccount's token."""

    def __init__(self, kube, namespace, s3, token: str, tmp_path: Path):
        kc = yaml.safe_load(Path(kube.kubeconfig).read_text())
        kc["users"] = [{"name": "kubetune-api", "user": {"token": token}}]
        for ctx in kc["contexts"]:
            ctx["context"]["user"] = "kubetune-api"
        kubeconfig = tmp_path / "api.kubeconfig"
        kubeconfig.write_text(yaml.safe_dump(kc))
        self.port = free_port()
        self.log_path = tmp_path / "api.log"
        self.files_uri = s3.url("files")
        env = os.environ | {
            "KUBETUNE_API_FILES_URI": self.files_uri,
            "KUBETUNE_API_OUTPUT_URI": s3.url("runs"),
            "KUBETUNE_API_STORAGE_ENDPOINT": s3.endpoint,
            "KUBETUNE_API_STORAGE_REGION": s3.region,
            "KUBETUNE_API_JOB_SECRET": "s3-creds",
            "KUBETUNE_API_CATALOG": f"{namespace}/models",
            "KUBETUNE_API_AWS_ACCESS_KEY_ID": s3.access_key,
            "KUBETUNE_API_AWS_SECRET_ACCESS_KEY": s3.secret_key,
        }
        args = [sys.executable, "-m", "kubetune_cli", "api", "--host", "127.0.0.1"]
        args += ["--port", str(self.port), "--kubeconfig", str(kubeconfig)]
        log = open(self.log_path, "w")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent
        )
        wait_until(self.healthy, 60, what="kubetune api's /healthz")

    def healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"kubetune api exited: {self.log()}")
        return http_get(f"http://127.0.0.1:{self.port}/healthz")[0] == 200

    def client(self, token: str, **kw) -> openai.OpenAI:
        return openai.OpenAI(
            api_key=token, base_url=f"http://127.0.0.1:{self.port}/v1", max_retries=0, **kw
        )

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else "(no log)"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _write(s3, path: str, obj) -> None:
    data = obj if isinstance(obj, str) else json.dumps(obj)
    with s3.fs.open(f"{s3.bucket}/{path}", "w") as f:
        f.write(data)


@pytest.fixture
def api(kube, namespace, s3, tmp_path):
    core = client.CoreV1Api(kube.api_client())
    cleanup = _rbac(kube, namespace)
    core.create_namespaced_config_map(
        namespace,
        client.V1ConfigMap(
            metadata=client.V1ObjectMeta(name="models"),
            data={"models.yaml": yaml.safe_dump(CATALOG)},
        ),
    )
    s3_secret(kube, namespace, s3)
    server = ApiServer(kube, namespace, s3, _token(core, namespace, "kubetune-api"), tmp_path)
    server.pipeline = _token(core, namespace, "pipeline")  # bound to the fine-tuner Role
    server.outsider = _token(core, namespace, "outsider")  # no RoleBinding
    yield server
    server.stop()
    kube.kubectl("delete", "--ignore-not-found", *cleanup, check=False)
    log = server.log()
    print(f"--- kubetune api log\n{log[-6000:]}")
    for secret in (s3.secret_key, server.pipeline, server.outsider):
        assert secret not in log, "a credential reached the API server's log"


def test_openai_client_runs_a_job_and_continues_it(kube, namespace, s3, operator, api):
    ai = api.client(api.pipeline)

    # Refused at upload, with the line and the reason, as the client raises them.
    broken = _jsonl(CHAT[:1]) + b'{"messages": [\n'
    with pytest.raises(openai.BadRequestError) as exc:
        ai.files.create(file=("train.jsonl", broken), purpose="fine-tune")
    assert "train.jsonl: line 2: invalid JSON" in exc.value.message
    assert exc.value.body["param"] == "file" and exc.value.code == "invalid_file_format"
    wrong = _jsonl([{"messages": [{"role": "user", "content": "no answer"}]}])
    with pytest.raises(openai.BadRequestError, match="line 1: no assistant turn"):
        ai.files.create(file=("wrong.jsonl", wrong), purpose="fine-tune")
    assert ai.files.list().data == []

    upload = ai.files.create(file=("train.jsonl", _jsonl(CHAT)), purpose="fine-tune")
    assert upload.id.startswith("file-") and upload.status == "processed"
    assert upload.bytes == len(_jsonl(CHAT)) and upload.filename == "train.jsonl"
    assert [f.id for f in ai.files.list(purpose="fine-tune")] == [upload.id]
    assert ai.files.content(upload.id).content == _jsonl(CHAT)

    with pytest.raises(openai.BadRequestError, match="catalog") as exc:
        ai.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=upload.id)
    assert exc.value.body["param"] == "model"

    job = ai.fine_tuning.jobs.create(
        model="smollm2",
        training_file=upload.id,
        suffix="support",
        seed=7,
        metadata={"team": "search"},
        method={
            "type": "supervised",
            "supervised": {"hyperparameters": {"n_epochs": 2, "learning_rate_multiplier": 0.5}},
        },
    )
    assert job.id.startswith("ftjob-") and job.status == "validating_files"
    assert job.model == "smollm2" and job.training_file == upload.id and job.seed == 7
    assert job.hyperparameters.n_epochs == 2 and job.hyperparameters.learning_rate_multiplier == 0.5
    assert job.organization_id == namespace and job.fine_tuned_model is None

    ftj = get(kube, "finetunejob", job.id, namespace)
    spec = ftj["spec"]
    assert spec["model"]["name"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert (
        spec["dataset"]["train"]["uri"] == f"{api.files_uri}/{namespace}/{upload.id}/upload.jsonl"
    )
    assert spec["dataset"]["secretRef"] == {"name": "s3-creds"}
    assert spec["hyperparameters"]["epochs"] == 2 and spec["hyperparameters"]["seed"] == 7
    assert spec["hyperparameters"]["learningRate"] == pytest.approx(1e-4)
    assert spec["resources"]["workers"] == 1
    # The server's own ServiceAccount may not create FineTuneJobs: the caller's token did.
    can = kube.kubectl(
        "auth", "can-i", "create", "finetunejobs.kubetune.io", "-n", namespace,
        f"--as=system:serviceaccount:{namespace}:kubetune-api", check=False,
    )  # fmt: skip
    assert can.stdout.strip() == "no"
    assert [j.id for j in ai.fine_tuning.jobs.list(metadata={"team": "search"})] == [job.id]
    assert ai.fine_tuning.jobs.list(metadata={"team": "other"}).data == []

    # Running: KubeRay's and the trainer's parts.
    wait_status(kube, job.id, namespace, lambda s: s.get("rayJobName") == job.id, 60, "RayJob")
    rayjob_running(kube, job.id, namespace)
    uid = ftj["metadata"]["uid"]
    prefix = f"runs/{namespace}/{job.id}/{uid}"
    progress = {"phase": "Training", "step": 10, "totalSteps": 20, "etaSeconds": 30}
    _write(
        s3,
        f"{prefix}/progress.json",
        progress | {"attempt": 1, "updatedAt": "2026-01-01T00:00:00Z"},
    )
    now = time.time()
    rows = [
        {"step": 5, "loss": 2.5, "time": rfc3339(now)},
        {"step": 10, "loss": 2.0, "evalLoss": 2.2, "tokens": 640, "time": rfc3339(now + 1)},
    ]
    _write(s3, f"{prefix}/metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    _write(s3, f"{prefix}/checkpoints/step-00000010/model.bin", "x")
    _write(
        s3,
        f"{prefix}/checkpoints/step-00000010/manifest.json",
        {"step": 10, "files": ["model.bin"], "evalLoss": 2.2, "createdAt": "2026-01-01T00:00:10Z"},
    )
    running = wait_until(
        lambda: (j := ai.fine_tuning.jobs.retrieve(job.id)).estimated_finish and j,
        60,
        what="an estimated finish (progress.json read)",
    )
    assert running.status == "running" and running.finished_at is None
    wait_status(kube, job.id, namespace, lambda s: s.get("checkpoints"), 60, "checkpoints")

    events = wait_until(
        lambda: (
            (ev := list(ai.fine_tuning.jobs.list_events(job.id, limit=2)))
            and any(e.message.startswith("RayJobCreated") for e in ev)
            and ev
        ),
        60,
        what="the operator's events among the job's events",
    )
    # Auto-paging with limit 2 walks the same list as one big page, newest first.
    assert [e.id for e in events] == [
        e.id for e in ai.fine_tuning.jobs.list_events(job.id, limit=50).data
    ]
    metrics = [e for e in events if e.type == "metrics"]
    assert [e.data["step"] for e in metrics] == [10, 5]
    assert metrics[0].data["train_loss"] == 2.0 and metrics[0].data["valid_loss"] == 2.2
    assert metrics[0].message == "Step 10/20: training loss=2.0000, validation loss=2.2000"
    assert events[-1].message == f"Created fine-tuning job: {job.id}"

    [ckpt] = ai.fine_tuning.jobs.checkpoints.list(job.id).data
    assert ckpt.step_number == 10 and ckpt.fine_tuning_job_id == job.id
    assert ckpt.metrics.train_loss == 2.0 and ckpt.metrics.valid_loss == 2.2
    assert ckpt.fine_tuned_model_checkpoint.endswith(f":{job.id}:ckpt-step-10")

    # Succeeded.
    _write(
        s3, f"{prefix}/outputs.json", {"adapter": f"s3://{s3.bucket}/{prefix}/adapter", "steps": 20}
    )
    final = {"phase": "Succeeded", "step": 20, "totalSteps": 20, "attempt": 1, "updatedAt": "x"}
    _write(s3, f"{prefix}/progress.json", final)
    rayjob_finished(kube, job.id, namespace)
    done = wait_until(
        lambda: (j := ai.fine_tuning.jobs.retrieve(job.id)).status == "succeeded" and j,
        60,
        what="status succeeded",
    )
    assert done.fine_tuned_model == f"ft:smollm2:{namespace}:support:{job.id}"
    assert done.finished_at and done.trained_tokens == 640 and done.error is None
    messages = [e.message for e in ai.fine_tuning.jobs.list_events(job.id, limit=3)]
    assert messages[:2] == [
        "The job has successfully completed",
        f"New fine-tuned model created: {done.fine_tuned_model}",
    ]
    with pytest.raises(openai.BadRequestError, match="already succeeded"):
        ai.fine_tuning.jobs.cancel(job.id)

    # A second job continues the first: model.fromJob.
    second = ai.fine_tuning.jobs.create(model=done.fine_tuned_model, training_file=upload.id)
    assert second.model == done.fine_tuned_model and second.id != job.id
    model = get(kube, "finetunejob", second.id, namespace)["spec"]["model"]
    assert model["name"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and model["fromJob"] == job.id
    st = wait_status(kube, second.id, namespace, lambda s: s.get("parent"), 60, "the parent")
    assert st["parent"]["name"] == job.id and st["parent"]["uid"] == uid
    assert [j.id for j in ai.fine_tuning.jobs.list(limit=1)] == [second.id, job.id]  # pages

    # ... or from one of its checkpoints: model.fromCheckpoint.
    third = ai.fine_tuning.jobs.create(
        model=ckpt.fine_tuned_model_checkpoint, training_file=upload.id
    )
    model = get(kube, "finetunejob", third.id, namespace)["spec"]["model"]
    assert model["fromCheckpoint"] == f"s3://{s3.bucket}/{prefix}/checkpoints/step-00000010"
    assert "fromJob" not in model and model["secretRef"] == {"name": "s3-creds"}

    ai.fine_tuning.jobs.pause(second.id)
    assert get(kube, "finetunejob", second.id, namespace)["spec"]["suspend"] is True
    wait_until(
        lambda: ai.fine_tuning.jobs.retrieve(second.id).status == "paused", 60, what="paused"
    )
    ai.fine_tuning.jobs.resume(second.id)
    wait_until(
        lambda: ai.fine_tuning.jobs.retrieve(second.id).status == "queued", 60, what="resumed"
    )
    cancelled = ai.fine_tuning.jobs.cancel(second.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at
    assert get(kube, "finetunejob", second.id, namespace)["spec"]["suspend"] is True
    with pytest.raises(openai.BadRequestError, match="cannot be resumed"):
        ai.fine_tuning.jobs.resume(second.id)


def test_callers_without_rbac_or_token_are_refused(kube, namespace, api):
    outsider = api.client(api.outsider)
    with pytest.raises(openai.PermissionDeniedError) as exc:
        outsider.fine_tuning.jobs.list()
    assert (
        f"system:serviceaccount:{namespace}:outsider may not list finetunejobs" in exc.value.message
    )
    with pytest.raises(openai.PermissionDeniedError):
        outsider.files.create(file=("t.jsonl", _jsonl(CHAT)), purpose="fine-tune")
    # The pipeline's token, pointed at a namespace where it has no RoleBinding.
    with pytest.raises(openai.PermissionDeniedError, match="namespace default"):
        api.client(api.pipeline, project="default").fine_tuning.jobs.list()
    with pytest.raises(openai.AuthenticationError):
        api.client("not-a-token").fine_tuning.jobs.list()
    with pytest.raises(openai.NotFoundError):
        api.client(api.pipeline).fine_tuning.jobs.retrieve("ftjob-doesnotexist")


def test_dpo_from_an_openai_preference_file(kube, namespace, s3, api):
    ai = api.client(api.pipeline)
    row = {
        "input": {"messages": [{"role": "user", "content": "Capital of France?"}]},
        "preferred_output": [{"role": "assistant", "content": "Paris."}],
        "non_preferred_output": [{"role": "assistant", "content": "Lyon, I think."}],
    }
    pref = ai.files.create(file=("pref.jsonl", _jsonl([row] * 3)), purpose="fine-tune")
    chat = ai.files.create(file=("chat.jsonl", _jsonl(CHAT)), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError, match="holds chat rows; method dpo"):
        ai.fine_tuning.jobs.create(model="smollm2", training_file=chat.id, method={"type": "dpo"})
    job = ai.fine_tuning.jobs.create(
        model="smollm2",
        training_file=pref.id,
        validation_file=pref.id,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.25, "n_epochs": "auto"}}},
    )
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.25
    spec = get(kube, "finetunejob", job.id, namespace)["spec"]
    assert spec["method"]["objective"] == "dpo" and spec["method"]["dpo"]["beta"] == 0.25
    assert spec["dataset"]["format"] == "preference"
    train = spec["dataset"]["train"]["uri"]
    assert train == f"{api.files_uri}/{namespace}/{pref.id}/train.jsonl"
    assert spec["dataset"]["validation"]["uri"] == train
    # The trainer reads its own preference rows; the caller gets back what it sent.
    stored = s3.fs.cat_file(train[len("s3://") :]).decode().splitlines()
    assert json.loads(stored[0]) == {
        "prompt": row["input"]["messages"],
        "chosen": row["preferred_output"],
        "rejected": row["non_preferred_output"],
    }
    assert ai.files.content(pref.id).content == _jsonl([row] * 3)
    ai.files.delete(chat.id)
    assert [f.id for f in ai.files.list()] == [pref.id]
    with pytest.raises(openai.NotFoundError):
        ai.files.retrieve(chat.id)
