"""Kill and resume: SIGKILL `python -m kubetune_trainer` mid-run, leave a
half-written checkpoint, run again on the same prefix, and compare with an
uninterrupted run of the same config.

The killed run and its retry are each a process with its own local Ray, as on
a cluster retry; the uninterrupted reference runs on the tier's shared Ray.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trainer_helpers as H

pytestmark = [pytest.mark.trainer, pytest.mark.timeout(1500)]


def _job(model, data, out: Path, name: str) -> dict:
    return H.job(
        model,
        data,
        out.as_uri(),
        name=name,
        hyperparameters={"maxSteps": 12, "logEverySteps": 1},
        evaluation={"everySteps": 4},
        checkpointing={"everySteps": 4, "keepLast": 3},
    )


def _config_file(tmp: Path, model, data, out: Path, name: str) -> tuple[Path, Path]:
    from kubetune_api import spec_to_trainer_config

    cfg = spec_to_trainer_config(_job(model, data, out, name))
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path, Path(cfg["storagePrefix"].removeprefix("file://"))


def _start(config: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "kubetune_trainer", "--config", str(config), "--num-cpus", "2"],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the trainer and every process it started (Ray's included), by pid."""
    import psutil

    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    proc.send_signal(signal.SIGKILL)
    for child in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    psutil.wait_procs(tree, timeout=30)


def _rows(prefix: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (prefix / "metrics.jsonl").open())}


def test_sigkill_then_resume_reproduces_uninterrupted_run(ray_local, tmp_path):
    from kubetune_trainer.driver import run

    model = H.tiny_model(tmp_path / "model")
    data = H.write_jsonl(tmp_path / "chat.jsonl", H.chat_rows(240))

    # The uninterrupted run only has to be the same training: it runs on the
    # tier's shared Ray; the killed run and its retry are processes of their own.
    ref_cfg = H.trainer_config(_job(model, data, tmp_path / "out", "reference"))
    assert run(ref_cfg) == 0
    ref = Path(ref_cfg.storage_prefix.removeprefix("file://"))

    cfg, prefix = _config_file(tmp_path, model, data, tmp_path / "out", "killed")
    log1 = tmp_path / "killed-1.log"
    proc = _start(cfg, log1)
    try:
        manifest = prefix / "checkpoints/step-00000004/manifest.json"
        deadline = time.monotonic() + 400
        while not manifest.exists():
            assert proc.poll() is None, log1.read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint committed in time"
            time.sleep(0.05)
    finally:
        _kill_tree(proc)
    progress = json.loads((prefix / "progress.json").read_text())
    assert progress["phase"] != "Succeeded" and progress["step"] < 12, progress
    committed = max(
        int(p.name[5:])
        for p in (prefix / "checkpoints").iterdir()
        if (p / "manifest.json").exists()
    )
    assert committed in (4, 8)

    # A half-written newer checkpoint: files but no manifest. Loading it would fail.
    half = prefix / f"checkpoints/step-{committed + 2:08d}"
    (half / "ds").mkdir(parents=True, exist_ok=True)
    (half / "ds/mp_rank_00_model_states.pt").write_bytes(b"truncated garbage")
    (half / "trainer_state.json").write_text('{"step": 999')

    log2 = tmp_path / "killed-2.log"
    proc = _start(cfg, log2)
    assert proc.wait(timeout=400) == 0, log2.read_text()[-3000:]
    text = log2.read_text()
    assert re.search(rf"resumed from committed checkpoint step {committed}\b", text), text[-3000:]
    assert not half.exists()  # ignored and cleared, never loaded

    got, want = _rows(prefix), _rows(ref)
    assert sorted(got) == sorted(want)  # every step logged once, none lost or repeated
    # The resume is on the record: the first row after it and progress.json name the step.
    assert [s for s, r in got.items() if r.get("resumedFrom")] == [committed + 1], got
    assert got[committed + 1]["resumedFrom"] == committed
    assert json.loads((prefix / "progress.json").read_text())["resumedFrom"] == committed
    for step in range(committed + 1, 13):
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-5, abs=1e-6), step
    assert got[12]["evalLoss"] == pytest.approx(want[12]["evalLoss"], rel=1e-5)
    assert got[12]["learningRate"] == pytest.approx(want[12]["learningRate"])
    outputs = json.loads((prefix / "outputs.json").read_text())
    assert outputs["steps"] == 12
    assert outputs["initialEvalLoss"] == pytest.approx(want[0]["evalLoss"])
