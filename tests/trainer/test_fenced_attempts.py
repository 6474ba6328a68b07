"""Fenced attempts on the real trainer: attempt 2 takes over the prefix while
attempt 1 still trains (a retry beside a failed attempt's pods in their grace
period). Attempt 1's first commit after that is refused and its run ends
(exit code 4, no Failed record); what it wrote meanwhile is not shown by the
operator's status; attempt 2 then trains from the start and reads none of it.

One Ray fit per attempt of a tiny model on the tier's shared Ray."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import trainer_helpers as H

pytestmark = [pytest.mark.trainer, pytest.mark.timeout(600)]


def test_a_late_attempt_commits_nothing_and_the_retry_reads_none_of_it(ray_local, tmp_path):
    from kubetune_api import load_trainer_config, spec_to_trainer_config
    from kubetune_operator.progress import progress_to_status
    from kubetune_operator.storage_reader import read_snapshot
    from kubetune_trainer.driver import FENCED, run
    from kubetune_trainer.storage import JobStorage

    model = H.tiny_model(tmp_path / "model")
    data = H.write_jsonl(tmp_path / "chat.jsonl", H.chat_rows(120))
    job = H.job(
        model,
        data,
        (tmp_path / "out").as_uri(),
        evaluation={"enabled": False},
        checkpointing={"everySteps": 2, "keepLast": 3},
    )
    first = load_trainer_config(spec_to_trainer_config(job, attempt=1))
    prefix = Path(first.storage_prefix.removeprefix("file://"))
    retry = JobStorage(first.storage_prefix, attempt=2)

    def take_over_once_attempt_1_started() -> None:
        # attempt 1's driver wrote its fence; its first commit is seconds away
        while retry.read_fence() is None:
            threading.Event().wait(0.05)
        took.append(retry.take_over())

    took: list = []
    watcher = threading.Thread(target=take_over_once_attempt_1_started, daemon=True)
    watcher.start()
    said: list[str] = []
    assert run(first, quiet=True, log=said.append) == FENCED, said
    watcher.join(timeout=10)
    assert took and took[0].attempt == 2 and took[0].inherited == []
    assert any("attempt 1 no longer owns" in line for line in said), said
    # attempt 1 trained a step or two and wrote records, but committed nothing
    assert not list(prefix.glob("checkpoints/*/manifest.json"))
    progress = json.loads((prefix / "progress.json").read_text())
    assert progress["attempt"] == 1 and progress["phase"] != "Failed", progress
    rows = [json.loads(line) for line in (prefix / "metrics.jsonl").open()]
    assert rows and {r["attempt"] for r in rows} == {1}
    status = progress_to_status(read_snapshot(str(prefix), None, {}, schemes=("file",)), 3, 2)
    assert not {"progress", "metrics", "checkpoints"} & set(status), status
    assert retry.committed_checkpoints() == [] and retry.resumed_metrics(None) == []

    second = load_trainer_config(spec_to_trainer_config(job, attempt=2))
    assert run(second, quiet=True) == 0
    rows = [json.loads(line) for line in (prefix / "metrics.jsonl").open()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # trained once, from the start
    assert {r["attempt"] for r in rows} == {2}
    manifests = [json.loads(p.read_text()) for p in prefix.glob("checkpoints/*/manifest.json")]
    assert sorted(m["step"] for m in manifests) == [2, 4, 6]
    assert {m["attempt"] for m in manifests} == {2}
    outputs = json.loads((prefix / "outputs.json").read_text())
    assert outputs["attempt"] == 2 and outputs["steps"] == 6
    status = progress_to_status(read_snapshot(str(prefix), None, {}, schemes=("file",)), 3, 2)
    assert status["progress"]["step"] == 6 and status["outputs"]["adapter"]
