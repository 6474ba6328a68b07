"""Stage once per job (kubetune_trainer.staging): the driver fetches the model,
a parent's adapter and the data from a real S3 server into the stage folder;
the workers' readers then find them there, hashes checked, with the bucket
emptied (nothing fetched again); a changed byte, a missing stage and a job
without a stage each behave as documented. No Ray: the functions the driver
and the ranks call, on real files."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import trainer_helpers as H

pytestmark = [pytest.mark.trainer, pytest.mark.timeout(120)]


@pytest.fixture
def staged_job(s3, tmp_path, monkeypatch):
    """A job whose model, parent adapter and data are in the bucket, and its stage folder."""
    for role in ("MODEL", "DATASET", "OUTPUT"):
        monkeypatch.setenv(f"KUBETUNE_{role}_AWS_ACCESS_KEY_ID", s3.access_key)
        monkeypatch.setenv(f"KUBETUNE_{role}_AWS_SECRET_ACCESS_KEY", s3.secret_key)
    model = H.tiny_model(tmp_path / "model")
    data = H.write_jsonl(tmp_path / "chat.jsonl", H.chat_rows(20))
    s3.fs.put(str(model), s3.url("models/tiny").removeprefix("s3://"), recursive=True)
    s3.fs.put(str(data), s3.url("data/train.jsonl").removeprefix("s3://"))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 4}')
    (adapter / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    s3.fs.put(str(adapter), s3.url("parent/adapter").removeprefix("s3://"), recursive=True)
    access = {"endpoint": s3.endpoint, "region": s3.region}
    j = H.job(model, data, s3.url("runs"), output={"uri": s3.url("runs")} | access)
    j["spec"]["model"] = {"uri": s3.url("models/tiny")} | access
    j["spec"]["dataset"]["train"]["uri"] = s3.url("data/train.jsonl")
    j["spec"]["dataset"] |= access
    cfg = H.trainer_config(j)
    cfg.parent = SimpleNamespace(uri=s3.url("parent/adapter"), job=None)
    stage = tmp_path / "stage" / "ns" / "uid" / "2"
    (stage.parent / "1" / "abc").mkdir(parents=True)  # what a killed attempt 1 left
    monkeypatch.setenv("KUBETUNE_STAGE_DIR", str(stage))
    monkeypatch.setenv("KUBETUNE_STAGE_TIMEOUT_SECONDS", "1")
    return cfg, stage, model


def test_staged_once_then_read_without_the_store(staged_job, s3, tmp_path):
    from kubetune_trainer import data as D
    from kubetune_trainer import model as M
    from kubetune_trainer import parent as P
    from kubetune_trainer import stager, staging

    cfg, stage, model = staged_job
    logged = []
    assert stager.stage_job(cfg, log=logged.append) == stage
    assert "staged 3 source(s)" in logged[0], logged
    manifest = json.loads((stage / "manifest.json").read_text())
    entry = manifest["entries"][cfg.spec.model.uri]
    assert entry["files"]["config.json"] == staging.sha256_file(model / "config.json")
    assert manifest["parent"] == {"target": s3.url("parent/adapter"), "record": None,
                                  "runRecord": None}  # fmt: skip
    assert (stage / ".complete").exists()
    assert sorted(p.name for p in stage.parent.iterdir()) == ["2"]  # attempt 1's is gone

    # A worker: a fresh process's view (nothing checked yet), and an empty bucket.
    staging._verified.clear()
    s3.fs.rm(s3.bucket + "/", recursive=True)
    s3.fs.invalidate_cache()
    path = M.resolve_model_path(cfg.spec.model)
    assert path == str(stage / entry["dir"])
    assert (stage / entry["dir"] / "config.json").read_bytes() == (
        model / "config.json"
    ).read_bytes()
    rows = D.read_rows(cfg.spec.dataset.train, cfg.spec.dataset)
    assert len(rows) == 20
    assert staging.local(s3.url("models/other")) is None  # not staged: fetched as before
    parent = P.resolve(cfg)
    assert parent.kind == "adapter" and parent.uri == s3.url("parent/adapter")
    assert parent.local.startswith(str(stage))

    # A changed byte on the volume: a clear failure naming the file, never a refetch.
    staging._verified.clear()
    weights = stage / entry["dir"] / "config.json"
    weights.write_bytes(weights.read_bytes() + b" ")
    with pytest.raises(
        staging.StagingError, match=r"config\.json .*has sha256 .* the manifest says"
    ):
        M.resolve_model_path(cfg.spec.model)

    staging.clean()
    assert not stage.parent.exists()  # the job's folder goes with its last attempt's


def test_workers_wait_for_the_stage_and_say_why(staged_job):
    from kubetune_trainer import model as M
    from kubetune_trainer import staging

    cfg, stage, _ = staged_job
    staging._verified.clear()
    with pytest.raises(
        staging.StagingError, match=r"not complete after 1s .*KUBETUNE_STAGE_TIMEOUT"
    ):
        M.resolve_model_path(cfg.spec.model)


def test_no_stage_no_change(staged_job, monkeypatch, tmp_path):
    from kubetune_trainer import model as M
    from kubetune_trainer import stager

    cfg, stage, _ = staged_job
    monkeypatch.delenv("KUBETUNE_STAGE_DIR")
    monkeypatch.setenv("KUBETUNE_CACHE", str(tmp_path / "cache"))
    assert stager.stage_job(cfg) is None and not stage.exists()
    path = M.resolve_model_path(cfg.spec.model)  # today's per-node cache
    assert path.startswith(str(tmp_path / "cache" / "models"))


def test_a_distill_teacher_in_object_storage_is_staged_too(tmp_path):
    from kubetune_trainer import stager

    distill = {"type": "lora", "objective": "distill", "distill": {"teacher": {}}}
    distill["distill"]["teacher"]["uri"] = "s3://bkt/teacher"
    j = H.job(tmp_path / "m", tmp_path / "d.jsonl", "file:///tmp/out", method=distill)
    assert stager.teacher_uri(H.trainer_config(j).spec) == "s3://bkt/teacher"
    distill["distill"]["teacher"]["uri"] = str(tmp_path / "teacher")  # on this machine
    j = H.job(tmp_path / "m", tmp_path / "d.jsonl", "file:///tmp/out", method=distill)
    assert stager.teacher_uri(H.trainer_config(j).spec) is None
    plain = H.job(tmp_path / "m", tmp_path / "d.jsonl", "file:///tmp/out")
    assert stager.teacher_uri(H.trainer_config(plain).spec) is None


def test_a_teacher_job_s_model_is_staged_where_its_outputs_say(staged_job, s3, tmp_path):
    """teacher.fromJob: the driver reads the teacher job's outputs.json once and
    stages the whole model it names, beside the job's own sources."""
    from kubetune_api.trainer_config import JobRef, ParentSource
    from kubetune_trainer import stager

    cfg, stage, model = staged_job
    prefix = s3.url("runs/default/big/u1")
    s3.fs.put(str(model), f"{prefix}/model".removeprefix("s3://"), recursive=True)
    s3.fs.pipe(
        f"{prefix}/outputs.json".removeprefix("s3://"),
        json.dumps({"model": f"{prefix}/model"}).encode(),
    )
    cfg.teacher = ParentSource(job=JobRef(name="big", namespace="default", uid="u1"), uri=prefix)
    logged = []
    assert stager.stage_job(cfg, log=logged.append) == stage
    assert "staged 4 source(s)" in logged[0], logged
    manifest = json.loads((stage / "manifest.json").read_text())
    assert sorted(manifest["entries"][f"{prefix}/model"]["files"]) == sorted(
        p.name for p in model.iterdir()
    )
