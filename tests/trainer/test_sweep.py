"""Sweeps on Ray Tune with a tiny model: ASHA stops trials that trail, the best
trial's output becomes the job's, and a sweep killed mid-way continues on the
same prefix without training its finished trials again."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trainer_helpers as H

pytestmark = [pytest.mark.trainer, pytest.mark.timeout(1200)]


def _sweep_job(tmp: Path, name: str, sweep: dict, ckpt: int = 2, **hp) -> dict:
    model = H.tiny_model(tmp / "model")
    data = tmp / "chat.jsonl"
    if not data.exists():
        H.write_jsonl(data, H.chat_rows(120))
    j = H.job(
        model,
        data,
        (tmp / "out").as_uri(),
        name=name,
        hyperparameters={"maxSteps": 8, "logEverySteps": 2, **hp},
        evaluation={"everySteps": 2, "maxBatches": 2},
        checkpointing={"everySteps": ckpt, "keepLast": 2},
    )
    j["spec"]["sweep"] = sweep
    return j


def _prefix(cfg) -> Path:
    return Path(cfg.storage_prefix.removeprefix("file://"))


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def test_three_trials_two_at_a_time_asha_stops_the_trailing_one(ray_local, tmp_path):
    from kubetune_api import sweep as S
    from kubetune_trainer.driver import run

    lrs = [3e-3, 1e-6, 2e-3]  # two that learn, one that barely moves
    sweep = {
        "trials": 3,
        "parallelTrials": 2,
        "parameters": {"hyperparameters.learningRate": {"distribution": "choice", "values": lrs}},
        "earlyStopping": {"gracePeriod": 2, "reductionFactor": 2},
    }
    # The seed whose plan trains the two learners first: the one that follows reaches
    # the first rung behind both, which ASHA must stop (a first pair alone can pass).
    steps = 20  # room for a stop to land before a trailing trial ends
    j = _sweep_job(tmp_path, "asha", sweep, ckpt=10, maxSteps=steps)
    cfg = H.trainer_config(j)
    seed = next(
        s
        for s in range(100)
        if {p["hyperparameters.learningRate"] for p in S.random_plan(cfg.spec.sweep, s)[:2]}
        == {3e-3, 2e-3}
    )
    j = _sweep_job(tmp_path, "asha", sweep, ckpt=10, maxSteps=steps, seed=seed)
    cfg = H.trainer_config(j)
    rc = run(cfg, check=False)
    assert rc == 0
    prefix = _prefix(cfg)
    sweep = _read(prefix / "sweep.json")
    records = sweep["records"]
    assert len(records) == 3 and sweep["done"]
    assert {r["params"]["hyperparameters.learningRate"] for r in records} == set(lrs)
    states = {r["id"]: r["state"] for r in records}
    assert set(states.values()) <= {"Finished", "Stopped"}, states
    stopped = [r for r in records if r["state"] == "Stopped"]
    assert stopped, f"ASHA stopped no trial: {records}"
    for r in stopped:
        assert r["stoppedEarly"] and r["step"] < steps, r
        trial = prefix / "trials" / r["id"]
        assert (trial / "halt.json").exists() and not (trial / "outputs.json").exists()
    finished = [r for r in records if r["state"] == "Finished"]
    assert finished and all(r["step"] == steps for r in finished)
    best = min(finished, key=lambda r: r["bestMetric"])
    assert sweep["bestTrial"] == best["id"] and sweep["bestMetric"] == best["bestMetric"]
    assert best["params"]["hyperparameters.learningRate"] >= 1e-3  # a learning one won
    # the trials keep a job's records; the best one's outputs are the job's
    trial = prefix / "trials" / best["id"]
    for name in ("progress.json", "metrics.jsonl", "outputs.json"):
        assert (trial / name).exists(), name
    outputs = _read(prefix / "outputs.json")
    assert outputs["adapter"] == (trial / "adapter").as_uri()
    assert (trial / "adapter" / "adapter_model.safetensors").stat().st_size > 0
    assert sweep["stepsTrained"] == sum(r["step"] for r in records) < 3 * steps
    assert (prefix / "sweep.png").stat().st_size > 0
    assert _read(prefix / "progress.json")["phase"] == "Succeeded"


def _kill_tree(proc: subprocess.Popen) -> None:
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


def test_a_killed_sweep_continues_without_training_finished_trials_again(tmp_path):
    from kubetune_api import spec_to_trainer_config

    j = _sweep_job(
        tmp_path,
        "resume",
        {
            "trials": 2,
            "parallelTrials": 1,
            "parameters": {
                "hyperparameters.learningRate": {"distribution": "choice", "values": [2e-3, 3e-3]}
            },
            "earlyStopping": {"enabled": False},
        },
    )
    cfg = spec_to_trainer_config(j)
    config = tmp_path / "sweep.json"
    config.write_text(json.dumps(cfg))
    prefix = Path(cfg["storagePrefix"].removeprefix("file://"))
    cmd = [sys.executable, "-m", "kubetune_trainer", "--config", str(config), "--num-cpus", "2"]

    def state() -> tuple[list, list]:
        try:
            records = _read(prefix / "sweep.json")["records"]
        except (FileNotFoundError, json.JSONDecodeError):
            return [], []
        done = [r for r in records if r["state"] == "Finished"]
        running = [
            r
            for r in records
            if r["state"] == "Running"
            and any((prefix / "trials" / r["id"] / "checkpoints").glob("step-*/manifest.json"))
        ]
        return done, running

    log = tmp_path / "first.log"
    proc = subprocess.Popen(
        cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            done, running = state()
            if done and running:
                break
            time.sleep(0.5)
        assert proc.poll() is None, log.read_text()[-3000:]
        done, running = state()
        assert done and running, log.read_text()[-3000:]
    finally:
        _kill_tree(proc)
    finished = prefix / "trials" / done[0]["id"]
    before = {p.name: p.stat().st_mtime_ns for p in finished.iterdir() if p.is_file()}

    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    after = {p.name: p.stat().st_mtime_ns for p in finished.iterdir() if p.is_file()}
    assert after == before, "the finished trial was trained again"
    sweep = _read(prefix / "sweep.json")
    assert sweep["done"] and [r["state"] for r in sweep["records"]] == ["Finished"] * 2
    resumed = prefix / "trials" / running[0]["id"] / "metrics.jsonl"
    rows = [json.loads(line) for line in resumed.read_text().splitlines()]
    assert any(r.get("resumedFrom") for r in rows), "the running trial started over"
    assert rows[-1]["step"] == 8


@pytest.mark.parametrize("steps, ok", [(100, True), (99, False)])
def test_the_admission_rule_on_the_grace_period_is_rays_own(steps, ok):
    """A spec both doors accept builds the trainer's ASHA; one they refuse is one Ray
    itself refuses (grace_period <= max_t), which would show only on a started cluster.
    The grace period is defaulted here: the first evaluation, step 100."""
    from kubetune_api import sweep as S
    from kubetune_api.models import FineTuneJobSpec
    from kubetune_api.validation import validate_spec
    from kubetune_trainer.sweep import HaltingASHA

    choice = {"distribution": "choice", "values": [2]}
    spec = {
        "model": {"name": "org/model"},
        "dataset": {"train": {"uri": "s3://bucket/t.jsonl"}},
        "hyperparameters": {"maxSteps": steps},
        "evaluation": {"everySteps": 100},
        "sweep": {"parameters": {"hyperparameters.batchSize": choice}},
    }
    assert validate_spec(spec).ok is ok
    # what the trainer would compute, had the spec got through
    grace = S.grace_period(FineTuneJobSpec.model_validate(spec))
    assert grace == 100

    def build():
        return HaltingASHA(
            "k", time_attr="step", metric="eval_loss", mode="min", max_t=steps, grace_period=grace
        )

    if ok:
        build()
    else:
        with pytest.raises(AssertionError, match="grace_period"):
            build()
