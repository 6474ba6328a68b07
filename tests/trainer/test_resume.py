"""Kill and resume: SIGKILL `python -m kubetune_trainer` mid-run, leave a
half-written checkpoint, run again on the same prefix, and compare with an
uninterrupted run of the same config.

The killed run and its retry are each a process with its own local Ray, as on
a cluster retry; the uninterrupted reference runs on the tier's shared Ray.
A copy of the reference with a file of its newest checkpoint cut short resumes
from the checkpoint before it (verified checkpoints).
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
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


@pytest.fixture(scope="module")
def reference(_ray_session, tmp_path_factory):
    """The uninterrupted run, trained once for the module's tests: it only has to
    be the same training, so it runs on the tier's shared Ray. (model, data, its
    config, its prefix)."""
    from lineage_chain import start_ray  # the shared Ray's start (conftest.ray_local)

    from kubetune_trainer.driver import run

    start_ray()
    tmp = tmp_path_factory.mktemp("reference")
    model = H.tiny_model(tmp / "model")
    data = H.write_jsonl(tmp / "chat.jsonl", H.chat_rows(240))
    cfg = H.trainer_config(_job(model, data, tmp / "out", "reference"))
    assert run(cfg) == 0
    return model, data, cfg, Path(cfg.storage_prefix.removeprefix("file://"))


def test_sigkill_then_resume_reproduces_uninterrupted_run(ray_local, reference, tmp_path):
    model, data, _, ref = reference
    # the killed run and its retry are processes of their own, as on a cluster
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


def test_a_truncated_file_in_the_newest_checkpoint_resumes_from_the_previous_one(
    ray_local, reference, tmp_path
):
    """A file of the newest committed checkpoint cut short after its commit: the
    next attempt verifies it, moves it aside, resumes from the previous one (and
    trains as the uninterrupted run did), says so in progress.json, metrics.jsonl
    and the operator's status, and finishes. One fit: it starts from a copy of
    the module's reference run (checkpoints at steps 4, 8 and 12)."""
    from kubetune_operator.progress import progress_to_status
    from kubetune_operator.storage_reader import read_snapshot
    from kubetune_trainer.driver import run

    _, _, ref_cfg, ref = reference
    cfg = ref_cfg.model_copy(
        update={"storage_prefix": (tmp_path / "prefix").as_uri(), "attempt": 2}
    )
    prefix = tmp_path / "prefix"
    shutil.copytree(ref, prefix)
    newest = prefix / "checkpoints/step-00000012"
    manifest = json.loads((newest / "manifest.json").read_text())
    assert sorted(manifest["digests"]) == manifest["files"]  # every file: size and sha256
    # the biggest file (optimizer state) loses its second half after the commit
    name = max(manifest["files"], key=lambda f: manifest["digests"][f]["bytes"])
    size = manifest["digests"][name]["bytes"]
    (newest / name).write_bytes((newest / name).read_bytes()[: size // 2])
    for done in ("progress.json", "outputs.json"):  # only what this attempt writes
        (prefix / done).unlink()

    assert run(cfg, quiet=True, check=False) == 0

    progress = json.loads((prefix / "progress.json").read_text())
    assert progress["phase"] == "Succeeded" and progress["step"] == 12, progress
    assert progress["resumedFrom"] == 8
    [skipped] = progress["skippedCheckpoints"]
    assert skipped["step"] == 12
    assert skipped["reason"] == f"{name}: {size // 2} bytes, the manifest says {size}"
    moved = Path(skipped["movedTo"].removeprefix("file://"))
    assert moved.parent == prefix / "checkpoints/quarantine"
    assert (moved / name).stat().st_size == size // 2  # kept as found, for a look
    # steps 9-12 trained again, as the uninterrupted run trained them, and committed anew
    again = json.loads((newest / "manifest.json").read_text())
    assert again["digests"][name]["bytes"] == size
    got, want = _rows(prefix), _rows(ref)
    assert sorted(got) == sorted(want)
    assert [s for s, r in got.items() if r.get("resumedFrom")] == [9]
    assert got[9]["resumedFrom"] == 8 and got[9]["skippedCheckpoints"] == [12]
    for step in range(9, 13):
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-5, abs=1e-6), step
    assert json.loads((prefix / "outputs.json").read_text())["steps"] == 12
    # and the FineTuneJob's status says it
    snap = read_snapshot(str(prefix), None, {}, schemes=("file",))
    status = progress_to_status(snap)["progress"]
    assert status["resumedFrom"] == 8
    assert status["skippedCheckpoints"] == [
        {"step": 12, "reason": skipped["reason"], "movedTo": skipped["movedTo"]}
    ]
