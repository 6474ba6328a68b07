"""The trainer writing to a real S3 server (the harness's), credentials only in
the KUBETUNE_OUTPUT_* environment, then resuming from what it wrote there."""

from __future__ import annotations

import json

import pytest
import trainer_helpers as H

pytestmark = [pytest.mark.trainer, pytest.mark.timeout(900)]


def test_checkpoints_metrics_progress_on_s3(s3, tmp_path, monkeypatch):
    from kubetune_trainer.__main__ import ensure_env, run

    monkeypatch.setenv("KUBETUNE_OUTPUT_AWS_ACCESS_KEY_ID", s3.access_key)
    monkeypatch.setenv("KUBETUNE_OUTPUT_AWS_SECRET_ACCESS_KEY", s3.secret_key)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    ensure_env()
    import ray

    model = H.tiny_model(tmp_path / "model")
    data = H.write_jsonl(tmp_path / "chat.jsonl", H.chat_rows(120))
    output = {"uri": s3.url("runs"), "endpoint": s3.endpoint, "region": s3.region}
    cfg = H.trainer_config(
        H.job(
            model,
            data,
            s3.url("runs"),
            hyperparameters={"maxSteps": 4},
            checkpointing={"everySteps": 2, "keepLast": 1},
            evaluation={"everySteps": 2},
            output=output,
        )
    )
    dumped = json.dumps(cfg.to_dict())
    assert s3.secret_key not in dumped and s3.access_key not in dumped
    # A Ray of its own, started after the credentials are in the environment: they
    # reach the workers only that way (as in a pod), which the tier's shared Ray,
    # started before, cannot show. The next test that needs the shared one starts it.
    ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert run(cfg, quiet=True) == 0
        prefix = cfg.storage_prefix.removeprefix("s3://")
        fs = s3.fs
        fs.invalidate_cache()
        progress = json.loads(fs.cat(f"{prefix}/progress.json"))
        assert progress["phase"] == "Succeeded" and progress["step"] == 4
        ckpts = [p.rsplit("/", 1)[-1] for p in fs.ls(f"{prefix}/checkpoints")]
        assert ckpts == ["step-00000004"]  # keepLast 1
        manifest = json.loads(fs.cat(f"{prefix}/checkpoints/step-00000004/manifest.json"))
        for f in manifest["files"]:
            assert fs.exists(f"{prefix}/checkpoints/step-00000004/{f}"), f
        rows = [json.loads(x) for x in fs.cat(f"{prefix}/metrics.jsonl").decode().splitlines()]
        assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
        outputs = json.loads(fs.cat(f"{prefix}/outputs.json"))
        assert outputs["adapter"] == f"{cfg.storage_prefix}/adapter"
        assert fs.exists(f"{prefix}/adapter/adapter_model.safetensors")

        # Run again with more steps on the same prefix: resumes from S3's step 4.
        more = cfg.model_copy(deep=True)
        more.spec.hyperparameters.max_steps = 6
        assert run(more, quiet=True) == 0
        fs.invalidate_cache()
        rows = [json.loads(x) for x in fs.cat(f"{prefix}/metrics.jsonl").decode().splitlines()]
        assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
        assert json.loads(fs.cat(f"{prefix}/progress.json"))["step"] == 6
    finally:
        ray.shutdown()
