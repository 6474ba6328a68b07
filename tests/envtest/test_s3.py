"""An S3 round trip through fsspec (s3fs) against the real S3 server (versitygw)."""

from __future__ import annotations

import json

import fsspec


def test_fresh_bucket_is_empty(s3):
    assert s3.fs.ls(s3.bucket) == []


def test_round_trip_through_fsspec(s3):
    payload = {"step": 3, "loss": 1.25}
    with fsspec.open(s3.url("run/progress.json"), "w", **s3.storage_options) as f:
        json.dump(payload, f)
    blob = bytes(range(256)) * 4096  # 1 MiB, binary
    with fsspec.open(s3.url("run/checkpoints/step-3/model.bin"), "wb", **s3.storage_options) as f:
        f.write(blob)

    with fsspec.open(s3.url("run/progress.json"), "r", **s3.storage_options) as f:
        assert json.load(f) == payload
    with fsspec.open(s3.url("run/checkpoints/step-3/model.bin"), "rb", **s3.storage_options) as f:
        assert f.read() == blob

    fs = s3.fs
    fs.invalidate_cache()
    assert sorted(fs.find(s3.url("run"))) == [
        f"{s3.bucket}/run/checkpoints/step-3/model.bin",
        f"{s3.bucket}/run/progress.json",
    ]
    assert fs.info(s3.url("run/checkpoints/step-3/model.bin"))["size"] == len(blob)
    fs.rm(s3.url("run/progress.json"))
    fs.invalidate_cache()
    assert not fs.exists(s3.url("run/progress.json"))


def test_wrong_credentials_are_refused(s3):
    import pytest
    import s3fs

    bad = s3fs.S3FileSystem(
        key=s3.access_key,
        secret="not-the-secret",
        skip_instance_cache=True,
        client_kwargs=s3.storage_options["client_kwargs"],
    )
    with pytest.raises((PermissionError, OSError)):
        bad.ls(s3.bucket)


def test_a_damaged_checkpoint_on_s3_is_moved_aside_and_the_previous_one_picked(s3, tmp_path):
    """The trainer's resume choice (rank 0's part, Checkpoints.pick) against real S3:
    sizes from a listing, sha256 of the downloaded copy, the move aside done by
    copy and delete, credentials only in the KUBETUNE_OUTPUT_* environment."""
    from kubetune_api import storage as contract
    from kubetune_api.models import StorageAccess
    from kubetune_trainer.checkpoint import Checkpoints, local_digests
    from kubetune_trainer.storage import JobStorage

    environ = {
        "KUBETUNE_OUTPUT_AWS_ACCESS_KEY_ID": s3.access_key,
        "KUBETUNE_OUTPUT_AWS_SECRET_ACCESS_KEY": s3.secret_key,
    }
    access = StorageAccess(endpoint=s3.endpoint, region=s3.region)
    store = JobStorage(s3.url("runs/ns/job/uid"), access, environ)
    for step in (2, 4, 6):
        local = tmp_path / f"ckpt-{step}"
        (local / "ds").mkdir(parents=True)
        (local / "ds/optim_states.pt").write_bytes(bytes([step]) * 300_000)
        (local / "trainer_state.json").write_text(json.dumps({"step": step}))
        digests = local_digests(local)
        files = store.upload_dir(local, store.checkpoint_rel(step))
        manifest = contract.CheckpointManifest(
            step=step, files=files, digests=digests, created_at="t"
        )
        store.write_record(f"{store.checkpoint_rel(step)}/{contract.MANIFEST}", manifest)
    fs = s3.fs
    base = f"{s3.bucket}/runs/ns/job/uid/checkpoints"
    fs.pipe(f"{base}/step-00000006/ds/optim_states.pt", b"\x06" * 1000)  # cut short
    fs.pipe(f"{base}/step-00000004/trainer_state.json", b'{"step": 5}')  # changed, same size

    lines: list[str] = []
    ckpts = Checkpoints(None, store, None, tmp_path / "tmp", 3, adapter=True, log=lines.append)
    assert ckpts.pick() == 2
    assert (tmp_path / "tmp/resume-2/ds/optim_states.pt").stat().st_size == 300_000
    six, four = ckpts.skipped
    assert (six.step, six.reason) == (6, "ds/optim_states.pt: 1000 bytes, the manifest says 300000")
    assert four.step == 4 and four.reason.startswith("trainer_state.json: sha256 ")
    assert store.committed_checkpoints() == [2]
    fs.invalidate_cache()
    assert not fs.exists(f"{base}/step-00000006/manifest.json")
    quarantined = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{base}/quarantine"))
    assert [q[:13] for q in quarantined] == ["step-00000004", "step-00000006"]
    moved = ckpts.skipped[0].moved_to
    assert moved.startswith(f"s3://{base}/quarantine/step-00000006-")
    folder = moved.removeprefix("s3://")
    assert sorted(p[len(folder) + 1 :] for p in fs.find(folder)) == [
        "ds/optim_states.pt",
        "manifest.json",
        "skipped.json",
        "trainer_state.json",
    ]
    assert fs.size(f"{folder}/ds/optim_states.pt") == 1000  # as found
    assert json.loads(fs.cat(f"{folder}/skipped.json"))["reason"].startswith("ds/optim_states")
    assert s3.secret_key not in json.dumps(ckpts.skipped[0].to_dict()) + "".join(lines)
