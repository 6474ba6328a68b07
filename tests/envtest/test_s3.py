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

    bad = s3fs.S3FileSystem(key=s3.access_key, secret="not-the-secret", skip_instance_cache=True,
                            client_kwargs=s3.storage_options["client_kwargs"])
    with pytest.raises((PermissionError, OSError)):
        bad.ls(s3.bucket)
