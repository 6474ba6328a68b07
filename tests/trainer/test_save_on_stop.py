"""Save on stop: a stop request mid-run (what a stopping pod's preStop hook writes)
ends training after the step in flight with a committed checkpoint of that step,
and the next run resumes there: no step is lost. Runs on the tier's shared Ray."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import trainer_helpers as H

pytestmark = [pytest.mark.trainer, pytest.mark.timeout(900)]

STEPS, ASK_AT = 12, 3


def _progress(prefix: Path) -> dict:
    try:
        return json.loads((prefix / "progress.json").read_text())
    except (OSError, ValueError):
        return {}


def test_a_stop_request_commits_the_step_in_flight_and_the_next_run_starts_there(
    ray_local, tmp_path
):
    from kubetune_trainer.driver import STOPPED, run
    from kubetune_trainer.stop import StopFiles

    model = H.tiny_model(tmp_path / "model")
    data = H.write_jsonl(tmp_path / "chat.jsonl", H.chat_rows(120))
    job = H.job(
        model,
        data,
        (tmp_path / "out").as_uri(),
        name="stop",
        hyperparameters={"maxSteps": STEPS, "logEverySteps": 1},
        checkpointing={"everySteps": 1000, "keepLast": 2},  # only the stop's checkpoint
        resources={"workers": 2},  # two ranks that must agree on the step
    )
    config = H.trainer_config(job)
    prefix = Path(config.storage_prefix.removeprefix("file://"))
    stop = StopFiles(tmp_path / "stop")

    def ask() -> None:  # what the hook does, once training is under way
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and (_progress(prefix).get("step") or 0) < ASK_AT:
            time.sleep(0.05)
        stop.request("test")

    asker = threading.Thread(target=ask, daemon=True)
    asker.start()
    assert run(config, quiet=True, stop_dir=str(stop.dir)) == STOPPED
    asker.join(5)
    progress = _progress(prefix)
    step = progress["step"]
    print(f"stop asked at step >= {ASK_AT}; stopped at step {step}: {progress['message']}")
    assert progress["phase"] == "Interrupted", progress
    assert ASK_AT <= step < STEPS, progress
    assert progress["lastCheckpoint"]["step"] == step, progress  # nothing trained unsaved
    assert f"checkpoint step {step} committed" in progress["message"], progress
    manifest = json.loads((prefix / f"checkpoints/step-{step:08d}/manifest.json").read_text())
    assert manifest["step"] == step
    workers = config.spec.resources.workers
    assert stop.saved_steps() == [step] * workers  # every rank stopped at the same step
    assert not list(stop.dir.glob("running-*"))  # and none is waited for any more
    rows = [json.loads(line) for line in (prefix / "metrics.jsonl").open()]
    assert max(r["step"] for r in rows) == step

    # The next run ignores the old request (older than its ranks) and resumes there.
    assert run(config, quiet=True, stop_dir=str(stop.dir)) == 0
    progress = _progress(prefix)
    assert progress["phase"] == "Succeeded" and progress["step"] == STEPS, progress
    assert progress["resumedFrom"] == step, progress
    steps = [json.loads(line)["step"] for line in (prefix / "metrics.jsonl").open()]
    assert [s for s in steps if s > 0] == list(range(1, STEPS + 1)), steps  # each step once
