"""Pure parts of the trainer: imports, config loading, ZeRO choice, LR schedule."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import trainer_helpers as H

pytestmark = pytest.mark.trainer


def test_trainer_never_imports_kopf_or_kubernetes():
    code = (
        "import sys, kubetune_trainer.__main__, kubetune_trainer.recipe, kubetune_trainer.local,"
        " kubetune_trainer.data, kubetune_trainer.model, kubetune_trainer.storage,"
        " kubetune_trainer.config, kubetune_trainer.quickstart\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('kopf', 'kubernetes')]\n"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_read_config_from_file_and_uri(tmp_path):
    from kubetune_api import spec_to_trainer_config
    from kubetune_trainer.config import read_config

    cfg = spec_to_trainer_config(H.job(H.SMOL, tmp_path / "d.jsonl", tmp_path.as_uri()))
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    for location in (str(tmp_path / "c.json"), (tmp_path / "c.json").as_uri()):
        got = read_config(location)
        assert got.storage_prefix == f"{tmp_path.as_uri()}/default/t/u1"
        assert got.spec.hyperparameters.max_steps == 6


def test_a_pod_reads_its_own_attempts_config(tmp_path):
    """KUBETUNE_ATTEMPT (the pod's) against the mounted config's attempt: a config
    that is behind is read again until it catches up, one that is ahead means the
    pod is an older attempt's, and one that never catches up fails saying so."""
    from kubetune_api import spec_to_trainer_config
    from kubetune_trainer.config import StaleConfig, read_config_for_attempt

    path = tmp_path / "c.json"

    def write(attempt: int) -> None:
        cfg = spec_to_trainer_config(H.job(H.SMOL, tmp_path / "d.jsonl", tmp_path.as_uri()))
        path.write_text(json.dumps(cfg | {"attempt": attempt}))

    write(1)
    assert read_config_for_attempt(str(path), environ={}).attempt == 1  # local: no check
    reads = []

    def catch_up(_seconds):  # the kubelet updates the mounted file between reads
        reads.append(1)
        if len(reads) == 2:
            write(2)

    got = read_config_for_attempt(str(path), {"KUBETUNE_ATTEMPT": "2"}, sleep=catch_up)
    assert got.attempt == 2 and len(reads) == 2
    with pytest.raises(StaleConfig, match="newer attempt owns the job") as older:
        read_config_for_attempt(str(path), {"KUBETUNE_ATTEMPT": "1"}, sleep=catch_up)
    assert older.value.older_pod
    with pytest.raises(StaleConfig, match="still holds attempt 2's config") as behind:
        read_config_for_attempt(str(path), {"KUBETUNE_ATTEMPT": "3"}, wait_s=0.0)
    assert not behind.value.older_pod


def _spec(**overrides):
    return H.trainer_config(H.job(H.SMOL, "d.jsonl", "file:///x", **overrides)).spec


def test_zero_auto_picks_and_says_why():
    from kubetune_trainer.model import pick_zero_stage

    gib = 1 << 30
    lora = _spec(distributed={"zeroStage": "auto"})
    assert pick_zero_stage(lora, 135_000_000, None, 1)[0] == 2
    assert pick_zero_stage(lora, 7_000_000_000, 80 * gib, 8)[0] == 2
    assert pick_zero_stage(lora, 70_000_000_000, 80 * gib, 8)[0] == 3
    full = _spec(distributed={"zeroStage": "auto"}, method={"type": "full"})
    assert pick_zero_stage(full, 1_000_000_000, 80 * gib, 8)[0] == 1
    assert pick_zero_stage(full, 13_000_000_000, 80 * gib, 8)[0] == 2
    stage, why = pick_zero_stage(full, 70_000_000_000, 80 * gib, 8)
    assert stage == 3 and "ZeRO-3" in why
    fixed = _spec(distributed={"zeroStage": 1})
    assert pick_zero_stage(fixed, 1, None, 1) == (1, "set in the spec")


def test_deepspeed_config_from_spec():
    from kubetune_trainer.model import deepspeed_config

    spec = _spec(
        distributed={"zeroStage": 3, "offloadOptimizer": True, "offloadParameters": True},
        hyperparameters={"precision": "bf16", "gradientAccumulationSteps": 4, "maxGradNorm": 0.5},
    )
    cfg = deepspeed_config(spec, 3, use_gpu=False)
    z = cfg["zero_optimization"]
    assert z["stage"] == 3 and z["offload_optimizer"]["device"] == "cpu"
    assert z["offload_param"]["device"] == "cpu"
    assert cfg["bf16"] == {"enabled": True} and cfg["gradient_accumulation_steps"] == 4
    assert cfg["gradient_clipping"] == 0.5 and cfg["zero_force_ds_cpu_optimizer"] is False


def test_lr_schedule_warmup_then_decay():
    from kubetune_trainer.worker import lr_lambda

    cos = lr_lambda("cosine", warmup=4, total=20)
    assert cos(0) < cos(3) < 1.0 and cos(4) == pytest.approx(1.0)
    assert cos(12) == pytest.approx(0.5) and cos(20) == pytest.approx(0.0)
    lin = lr_lambda("linear", warmup=0, total=10)
    assert lin(5) == pytest.approx(0.5)
    assert lr_lambda("constant", warmup=4, total=10)(0) == 1.0


def test_qlora_on_cpu_is_rejected_before_running():
    from kubetune_api import SpecError, spec_to_trainer_config

    j = H.job(H.SMOL, "d.jsonl", "file:///x", method={"type": "qlora"})
    with pytest.raises(SpecError, match="qlora"):
        spec_to_trainer_config(j)


def test_background_writer_keeps_the_newest_snapshot_and_reports_errors():
    import threading

    from kubetune_trainer.storage import BackgroundWriter

    started, gate, written = threading.Event(), threading.Event(), []
    w = BackgroundWriter()
    w.submit("progress", lambda: (started.set(), gate.wait(10), written.append("p1")))
    assert started.wait(10)  # the writer is busy with p1
    w.submit("metrics", lambda: written.append("m1"))
    w.submit("metrics", lambda: written.append("m2"))  # replaces m1 before it ran
    w.submit("progress", lambda: written.append("p2"))
    gate.set()
    w.flush()
    assert written == ["p1", "m2", "p2"]

    def fail():
        raise OSError("bucket gone")

    w.submit("metrics", fail)
    with pytest.raises(OSError, match="bucket gone"):
        w.flush()  # a storage failure still fails the run
    w.submit("metrics", lambda: written.append("m3"))
    w.close()
    assert written[-1] == "m3"
