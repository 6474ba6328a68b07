"""The storage contract and trainer config shared by operator and trainer."""

import json

import pytest
import yaml

from kubetune_api import spec_to_trainer_config
from kubetune_api.models import StorageAccess
from kubetune_api.storage import (
    checkpoint_dir,
    credential_env,
    job_prefix,
    parse_checkpoint_dir,
    storage_options,
)

from .test_examples import REPO


def test_job_prefix_layout():
    assert job_prefix("s3://b/runs/", "ns", "job", "u-1") == "s3://b/runs/ns/job/u-1"
    with pytest.raises(ValueError, match="uid"):
        job_prefix("s3://b", "ns", "job", "")
    with pytest.raises(ValueError, match="name"):
        job_prefix("s3://b", "ns", "a/b", "u")


def test_checkpoint_dirs_sort_and_parse():
    names = [checkpoint_dir("s3://p", s).rsplit("/", 1)[1] for s in (5, 40, 300)]
    assert names == sorted(names) == ["step-00000005", "step-00000040", "step-00000300"]
    assert [parse_checkpoint_dir(n) for n in names] == [5, 40, 300]
    assert parse_checkpoint_dir("step-12") is None
    assert parse_checkpoint_dir("s3://p/checkpoints/step-00000040/") == 40


def test_storage_options_use_role_credentials_and_endpoint():
    env = {
        credential_env("OUTPUT", "AWS_ACCESS_KEY_ID"): "AKIA",
        credential_env("OUTPUT", "AWS_SECRET_ACCESS_KEY"): "s3cr3t",
    }
    access = StorageAccess(endpoint="http://127.0.0.1:9000", region="us-east-1")
    opts = storage_options("s3://b/x", access, "OUTPUT", env)
    assert opts == {
        "key": "AKIA",
        "secret": "s3cr3t",
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000", "region_name": "us-east-1"},
    }
    assert storage_options("s3://b/x", access, "DATASET", env)["client_kwargs"]
    assert "key" not in storage_options("s3://b/x", access, "DATASET", env)
    assert storage_options("file:///tmp/x", access, "OUTPUT", env) == {}


def test_trainer_config_has_the_resolved_spec_and_no_secret_values():
    job = yaml.safe_load((REPO / "crds/examples/chat-s3-secret.yaml").read_text())
    job["metadata"].update(namespace="team", uid="1234")
    config = spec_to_trainer_config(job)
    assert config["kind"] == "TrainerConfig"
    assert config["storagePrefix"] == "s3://team-models/fine-tunes/team/support-bot/1234"
    assert config["spec"]["hyperparameters"]["learningRate"] == 2e-4  # resolved
    assert config["spec"]["output"]["secretRef"] == {"name": "team-s3"}  # a reference only
    text = json.dumps(config)
    assert "AWS_SECRET_ACCESS_KEY" not in text and "AKIA" not in text


def test_trainer_config_needs_an_output_somewhere():
    job = yaml.safe_load((REPO / "crds/examples/quickstart.yaml").read_text())
    with pytest.raises(ValueError, match="spec.output.uri"):
        spec_to_trainer_config(job)
    config = spec_to_trainer_config(job, default_output_uri="file:///tmp/runs")
    assert config["storagePrefix"] == "file:///tmp/runs/default/quickstart/local"


def test_outputs_record_sections_are_declared_fields(tmp_path):
    from kubetune_api.storage import OutputsRecord, ServableOutput, outputs_record

    merged = ServableOutput(
        kind="merged",
        uri="s3://b/p/merged",
        format="huggingface-safetensors",
        precision="bf16",
        base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
        files=["config.json", "model.safetensors"],
    )
    record = outputs_record(
        OutputsRecord(merged_model=merged.uri, steps=3), {"artifacts": [merged]}
    )
    doc = record.to_dict()
    assert doc["mergedModel"] == "s3://b/p/merged" and doc["steps"] == 3
    assert doc["artifacts"] == [
        {
            "kind": "merged",
            "uri": "s3://b/p/merged",
            "format": "huggingface-safetensors",
            "precision": "bf16",
            "baseModel": "HuggingFaceTB/SmolLM2-135M-Instruct",
            "files": ["config.json", "model.safetensors"],
        }
    ]
    assert OutputsRecord.model_validate(json.loads(json.dumps(doc))) == record  # round trip
    gguf = {
        "type": "q8_0",
        "uri": "s3://b/p/gguf/model-q8_0.gguf",
        "bytes": 145_000_000,
        "seconds": 12.5,
        "tensorsOk": True,
        "tokenizerOk": True,
        "evalLoss": 1.251,
        "referenceEvalLoss": 1.25,
        "relativeIncrease": 0.0008,
        "tolerance": 0.01,
        "withinTolerance": True,
    }
    with_gguf = outputs_record(record, {"gguf": [gguf]})
    assert with_gguf.to_dict()["gguf"] == [{**gguf, "fallback": [], "problems": []}]

    # status.outputs lists the files' URIs
    from kubetune_api import storage as contract
    from kubetune_operator.progress import progress_to_status
    from kubetune_operator.storage_reader import read_snapshot
    from kubetune_trainer.storage import JobStorage

    store = JobStorage(str(tmp_path / "p"))
    store.write_record(contract.OUTPUTS, with_gguf)
    snap = read_snapshot(str(tmp_path / "p"), None, {}, schemes=("file",))
    status = progress_to_status(snap, 3, 1)["outputs"]
    assert status["gguf"] == [gguf["uri"]] and status["mergedModel"] == merged.uri
    with pytest.raises(ValueError, match="no section"):
        outputs_record(OutputsRecord(), {"evaluation": {}})
    with pytest.raises(ValueError, match="kind"):
        outputs_record(OutputsRecord(), {"artifacts": [{**doc["artifacts"][0], "kind": "gguf"}]})


def test_what_the_trainer_writes_the_operator_reads_as_the_same_models(tmp_path):
    """One contract typed both ways: kubetune_trainer.storage writes the records of
    kubetune_api.storage, kubetune_operator.storage_reader parses them back into the
    same models (equal values); a record that does not fit its model reads as absent."""
    from kubetune_api import storage as contract
    from kubetune_operator.storage_reader import read_snapshot
    from kubetune_trainer.storage import JobStorage

    prefix = str(tmp_path / "ns" / "job" / "uid")
    store = JobStorage(prefix)
    progress = contract.ProgressRecord(
        phase=contract.TrainPhase.training, step=4, total_steps=8, updated_at="t0"
    )
    store.write_progress(progress)
    rows = [{"step": 2, "loss": 3.5, "tokens_per_second": 10.0}, {"step": 4, "eval_loss": 3.1}]
    store.write_metrics(rows)
    manifest = contract.CheckpointManifest(step=4, files=["a"], eval_loss=3.1, created_at="t1")
    store.write_record(f"{store.checkpoint_rel(4)}/{contract.MANIFEST}", manifest)
    outputs = contract.OutputsRecord(adapter=store.uri(contract.ADAPTER), steps=8)
    store.write_record(contract.OUTPUTS, outputs)

    snap = read_snapshot(prefix, None, {}, schemes=("file",))
    assert snap.progress == progress
    assert snap.metrics == [contract.MetricsRow.model_validate(r) for r in rows]
    assert [c.model_dump(exclude={"uri"}) for c in snap.checkpoints] == [manifest.model_dump()]
    assert snap.checkpoints[0].uri.endswith("checkpoints/step-00000004")
    assert snap.outputs == outputs
    assert snap.run_record is None and snap.tracking is None and snap.sweep is None

    store.write_json(contract.PROGRESS, {"phase": "NoSuchPhase", "updatedAt": "t2"})
    assert read_snapshot(prefix, None, {}, schemes=("file",)).progress is None


def _manifest_for(folder, step: int, digests: bool = True):
    """A manifest of what is in `folder`, as the trainer writes it (Checkpoints.save)."""
    from kubetune_api import storage as contract
    from kubetune_trainer.checkpoint import local_digests

    found = local_digests(folder)
    return contract.CheckpointManifest(
        step=step, files=sorted(found), digests=found if digests else None, created_at="t"
    )


def _checkpoint_files(folder, seed: bytes) -> None:
    (folder / "ds").mkdir(parents=True)
    (folder / "ds/mp_rank_00_model_states.pt").write_bytes(seed * 3000)
    (folder / "trainer_state.json").write_text('{"step": 4}')


def test_verify_manifest_names_the_file_that_is_missing_cut_or_changed(tmp_path, monkeypatch):
    from kubetune_api import storage as contract
    from kubetune_trainer.checkpoint import verify_local

    monkeypatch.setattr(contract, "DIGEST_CHUNK", 1024)  # several chunks per file
    ckpt = tmp_path / "step-4"
    _checkpoint_files(ckpt, b"weights!")
    manifest = _manifest_for(ckpt, 4)
    weights = ckpt / "ds/mp_rank_00_model_states.pt"
    assert manifest.digests["ds/mp_rank_00_model_states.pt"].bytes == 24000
    assert verify_local(manifest, ckpt) is None
    # what a listing shows is enough for a missing or cut file (no read)
    sizes = {"ds/mp_rank_00_model_states.pt": 24000, "trainer_state.json": 11}
    assert contract.verify_manifest(manifest, sizes) is None
    assert contract.verify_manifest(manifest, {"trainer_state.json": 11}) == (
        "ds/mp_rank_00_model_states.pt: missing"
    )
    assert contract.verify_manifest(manifest, sizes | {"trainer_state.json": 5}) == (
        "trainer_state.json: 5 bytes, the manifest says 11"
    )
    # cut short on disk
    weights.write_bytes(b"weights!" * 100)
    assert verify_local(manifest, ckpt) == (
        "ds/mp_rank_00_model_states.pt: 800 bytes, the manifest says 24000"
    )
    # same size, other bytes: only the hash tells
    weights.write_bytes(b"weights?" * 3000)
    reason = verify_local(manifest, ckpt)
    assert reason.startswith("ds/mp_rank_00_model_states.pt: sha256 "), reason
    assert "(24000 bytes), the manifest says" in reason
    weights.unlink()
    assert verify_local(manifest, ckpt) == "ds/mp_rank_00_model_states.pt: missing"


def test_an_old_manifest_without_digests_loads_and_is_trusted_if_its_files_are_there(tmp_path):
    """Manifests written before sizes and hashes were recorded: the trainer and the
    operator still read them; nothing can be checked but that the files exist."""
    from kubetune_api import storage as contract
    from kubetune_operator.storage_reader import read_snapshot
    from kubetune_trainer.checkpoint import verify_local
    from kubetune_trainer.storage import JobStorage

    prefix = tmp_path / "ns/job/uid"
    store = JobStorage(str(prefix))
    ckpt = prefix / "checkpoints/step-00000004"
    _checkpoint_files(ckpt, b"weights!")
    old = {"step": 4, "files": ["ds/mp_rank_00_model_states.pt", "trainer_state.json"],
           "evalLoss": 2.5, "createdAt": "t"}  # fmt: skip
    (ckpt / "manifest.json").write_text(json.dumps(old))
    manifest = store.read_manifest(4)
    assert manifest is not None and manifest.digests is None
    (ckpt / "ds/mp_rank_00_model_states.pt").write_bytes(b"cut")
    assert verify_local(manifest, ckpt) is None  # unverifiable, trusted
    (ckpt / "trainer_state.json").unlink()
    assert verify_local(manifest, ckpt) == "trainer_state.json: missing"
    snap = read_snapshot(str(prefix), None, {}, schemes=("file",))
    assert [c.step for c in snap.checkpoints] == [4] and snap.checkpoints[0].eval_loss == 2.5
    # and a new manifest, with digests, reads back whole on the operator's side
    new = _manifest_for(ckpt, 4)
    store.write_record("checkpoints/step-00000006/manifest.json", new)
    snap = read_snapshot(str(prefix), None, {}, schemes=("file",))
    assert snap.checkpoints[-1].digests == new.digests
    assert contract.CheckpointManifest.model_validate(json.loads(json.dumps(new.to_dict()))) == new


def test_quarantine_moves_a_damaged_checkpoint_aside_and_says_why(tmp_path):
    from kubetune_api import storage as contract
    from kubetune_trainer.storage import JobStorage

    prefix = tmp_path / "ns/job/uid"
    store = JobStorage(prefix.as_uri())
    for step in (4, 8):
        ckpt = prefix / f"checkpoints/step-{step:08d}"
        _checkpoint_files(ckpt, b"w")
        store.write_record(f"{store.checkpoint_rel(step)}/manifest.json", _manifest_for(ckpt, step))
    assert store.committed_checkpoints() == [4, 8]
    assert store.stored_sizes(store.checkpoint_rel(8))["trainer_state.json"] == 11
    skipped = contract.SkippedCheckpoint(step=8, reason="trainer_state.json: missing")
    moved = store.quarantine(skipped)
    assert store.committed_checkpoints() == [4]
    assert not (prefix / "checkpoints/step-00000008").exists()
    [folder] = (prefix / "checkpoints/quarantine").iterdir()
    assert moved == f"{prefix.as_uri()}/checkpoints/quarantine/{folder.name}"
    assert folder.name.startswith("step-00000008-")
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
        "ds/mp_rank_00_model_states.pt",
        "manifest.json",
        "skipped.json",
        "trainer_state.json",
    ]
    record = json.loads((folder / "skipped.json").read_text())
    assert record == {"step": 8, "reason": "trainer_state.json: missing", "movedTo": moved}
    store.clear_uncommitted(store.committed_checkpoints())  # never touches quarantine/
    assert folder.exists()


def _pick(prefix, steps_damaged: dict, tmp):
    """Committed checkpoints at the given steps (damaged by the callables given),
    then Checkpoints.pick (rank 0's part of resume, storage only): its choice,
    what it skipped, its log."""
    from kubetune_trainer.checkpoint import Checkpoints
    from kubetune_trainer.storage import JobStorage

    store = JobStorage(prefix.as_uri())
    for step, damage in steps_damaged.items():
        ckpt = prefix / f"checkpoints/step-{step:08d}"
        _checkpoint_files(ckpt, b"w")
        store.write_record(f"{store.checkpoint_rel(step)}/manifest.json", _manifest_for(ckpt, step))
        if damage:
            damage(ckpt)
    lines: list[str] = []
    ckpts = Checkpoints(None, store, None, tmp, keep_last=3, adapter=True, log=lines.append)
    return ckpts.pick(), ckpts.skipped, lines, store


def _truncate(ckpt):
    path = ckpt / "ds/mp_rank_00_model_states.pt"
    path.write_bytes(path.read_bytes()[:100])


def test_resume_picks_the_newest_intact_checkpoint_and_moves_damaged_ones_aside(tmp_path):
    prefix = tmp_path / "ns/job/uid"
    half = prefix / "checkpoints/step-00000012/ds"  # half-written: no manifest
    half.mkdir(parents=True)
    changed = lambda c: (c / "trainer_state.json").write_text('{"step": 9}')  # noqa: E731
    step, skipped, lines, store = _pick(
        prefix, {4: None, 8: changed, 10: _truncate}, tmp_path / "tmp"
    )
    assert step == 4
    assert (tmp_path / "tmp/resume-4/trainer_state.json").exists()  # downloaded to load
    assert [s.step for s in skipped] == [10, 8]  # newest first
    assert skipped[0].reason == "ds/mp_rank_00_model_states.pt: 100 bytes, the manifest says 3000"
    assert skipped[1].reason.startswith("trainer_state.json: sha256 ")
    assert all("/checkpoints/quarantine/step-" in s.moved_to for s in skipped)
    assert store.committed_checkpoints() == [4] and not half.exists()
    assert not (tmp_path / "tmp/resume-10").exists() and not (tmp_path / "tmp/resume-8").exists()
    assert lines[0].startswith(
        "checkpoint step 10 failed verification (ds/mp_rank_00_model_states.pt: 100 bytes"
    )
    assert "; moved to file://" in lines[0] and lines[0].endswith("; trying the next newest")


def test_resume_starts_from_scratch_when_no_committed_checkpoint_is_intact(tmp_path):
    prefix = tmp_path / "ns/job/uid"
    broken = lambda c: (c / "manifest.json").write_text('{"step": ')  # noqa: E731
    step, skipped, _, store = _pick(prefix, {2: _truncate, 4: broken}, tmp_path / "tmp")
    assert step is None
    assert [(s.step, s.reason) for s in skipped] == [
        (4, "manifest.json: not a checkpoint manifest"),
        (2, "ds/mp_rank_00_model_states.pt: 100 bytes, the manifest says 3000"),
    ]
    assert store.committed_checkpoints() == []
    assert len(list((prefix / "checkpoints/quarantine").iterdir())) == 2
