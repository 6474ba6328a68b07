"""Fenced attempts: after a retry, the failed attempt's pods (alive for their grace
period) may still commit a checkpoint and write records under the job's prefix.
Nothing they write after the new attempt took over changes what the new attempt
resumes from or what the operator's status shows (kubetune_api.storage's rules,
the trainer's JobStorage and the operator's storage_reader + progress, on a
local-folder prefix)."""

from __future__ import annotations

import json

import pytest

from kubetune_api import storage as contract
from kubetune_api.storage import AttemptRecord, checkpoint_counts, record_counts, row_counts


def test_rules_count_what_older_attempts_committed_before_the_owner_started():
    fence = AttemptRecord(attempt=2, started_at="t", inherited=[4, 8])
    # no fence (a prefix from before fencing): everything counts
    assert checkpoint_counts(12, 1, None) and row_counts(12, 1, None)
    # the owner's and later attempts' commits count; an older one's only if inherited
    assert checkpoint_counts(12, 2, fence) and checkpoint_counts(12, 3, fence)
    assert checkpoint_counts(8, 1, fence) and checkpoint_counts(4, None, fence)
    assert not checkpoint_counts(12, 1, fence) and not checkpoint_counts(12, None, fence)
    # rows of older attempts count up to the newest inherited checkpoint
    assert row_counts(8, 1, fence) and row_counts(20, 2, fence)
    assert not row_counts(9, 1, fence) and not row_counts(9, None, fence)
    assert not row_counts(1, 1, AttemptRecord(attempt=2, started_at="t"))
    # whole-file records: only the newest attempt's (None: before records had one)
    assert record_counts(2, 2) and record_counts(3, 2) and record_counts(None, 2)
    assert not record_counts(1, 2)
    assert contract.newer_owner(fence, 1) and not contract.newer_owner(fence, 2)
    assert not contract.newer_owner(None, 1)


def _commit(store, step: int, attempt) -> None:
    """What Checkpoints.save leaves: files, then the manifest (no attempt check:
    a commit that passed the check just before the newer attempt took over)."""
    rel = store.checkpoint_rel(step)
    store.write_text(f"{rel}/weights.bin", f"step {step} of attempt {attempt}")
    manifest = contract.CheckpointManifest(
        step=step, attempt=attempt, files=["weights.bin"], created_at=f"t{step}"
    )
    store.write_record(f"{rel}/{contract.MANIFEST}", manifest)


def _rows(upto: int, attempt: int, loss: float) -> list[dict]:
    return [{"step": s, "loss": loss - s / 100, "attempt": attempt} for s in range(1, upto + 1)]


def _progress(store, step: int, attempt: int) -> None:
    store.write_progress(
        contract.ProgressRecord(
            phase=contract.TrainPhase.training,
            step=step,
            total_steps=40,
            attempt=attempt,
            updated_at=f"t{step}",
        )
    )


def test_an_old_attempt_writing_after_a_retry_changes_nothing_read(tmp_path):
    from kubetune_operator.progress import progress_to_status
    from kubetune_operator.storage_reader import read_snapshot
    from kubetune_trainer.storage import FencedOut, JobStorage

    prefix = str(tmp_path / "ns" / "job" / "uid")
    old = JobStorage(prefix, attempt=1)  # the failed attempt's rank 0
    new = JobStorage(prefix, attempt=2)  # the retry's driver and rank 0

    # Attempt 1 trains to step 10, commits steps 4 and 8, then its RayJob fails.
    assert old.take_over().attempt == 1
    old.write_metrics(_rows(10, 1, 3.0))
    _commit(old, 4, 1)
    old.commit_checkpoint(
        old.checkpoint_rel(8),
        contract.CheckpointManifest(step=8, attempt=1, files=[], created_at="t8"),
    )
    _progress(old, 10, 1)
    old.write_text(f"{old.checkpoint_rel(12)}/weights.bin", "half written")

    # Attempt 2 starts: the fence first, inheriting what attempt 1 committed.
    fence = new.take_over()
    assert (fence.attempt, fence.inherited) == (2, [4, 8])
    assert json.loads((tmp_path / "ns/job/uid/attempt.json").read_text())["attempt"] == 2

    def reads() -> dict:
        snap = read_snapshot(prefix, None, {}, schemes=("file",))
        return {
            "committed": new.committed_checkpoints(),
            "resume rows": new.resumed_metrics(new.committed_checkpoints()[-1]),
            "status": progress_to_status(snap, keep_last=3, attempt=2),
        }

    before = reads()
    assert before["committed"] == [4, 8]
    assert [r["step"] for r in before["resume rows"]] == list(range(1, 9))
    assert [c["step"] for c in before["status"]["checkpoints"]] == [4, 8]
    assert "progress" not in before["status"]  # attempt 1's record: the status keeps its own
    assert before["status"]["metrics"]["trainLoss"] == pytest.approx(3.0 - 8 / 100)

    # Attempt 1's pods, still in their grace period: a commit through the trainer
    # is refused, and the driver of attempt 1 can no longer (re)start.
    with pytest.raises(FencedOut, match="attempt 2 took over"):
        old.commit_checkpoint(
            old.checkpoint_rel(12),
            contract.CheckpointManifest(step=12, attempt=1, files=[], created_at="t12"),
        )
    with pytest.raises(FencedOut, match="before it starts"):
        old.take_over()
    # ... and what slips past that check (a commit checked just before the fence),
    # the half-written folder's commit, later rows, progress and outputs:
    _commit(old, 12, 1)
    _commit(old, 16, 1)
    old.write_metrics(_rows(16, 1, 3.0))  # its rows in memory, now up to step 16
    _progress(old, 16, 1)
    old.write_record(contract.OUTPUTS, contract.OutputsRecord(steps=16, attempt=1))

    assert reads() == before
    # The new attempt's resume clears what does not count, like a half-written folder.
    new.clear_uncommitted(new.committed_checkpoints())
    assert sorted(p.name for p in (tmp_path / "ns/job/uid/checkpoints").iterdir()) == [
        "step-00000004",
        "step-00000008",
    ]

    # Attempt 2's own records count as soon as it writes them.
    new.write_metrics(before["resume rows"] + _rows(12, 2, 1.0)[8:])
    _commit(new, 12, 2)
    _progress(new, 12, 2)
    status = progress_to_status(read_snapshot(prefix, None, {}, schemes=("file",)), 3, 2)
    assert status["progress"]["step"] == 12
    assert [c["step"] for c in status["checkpoints"]] == [4, 8, 12]
    assert status["metrics"]["trainLoss"] == pytest.approx(1.0 - 12 / 100)
    assert new.committed_checkpoints() == [4, 8, 12]


def test_status_waits_for_the_new_attempt_and_reads_a_prefix_without_a_fence(tmp_path):
    """Right after a retry (status.attempts 2, attempt 2 not started yet) the old
    attempt's progress.json is not shown; a prefix written before fencing (no
    attempt.json, records without an attempt) reads as it always did."""
    from kubetune_operator.progress import progress_to_status
    from kubetune_operator.storage_reader import read_snapshot
    from kubetune_trainer.storage import JobStorage

    prefix = str(tmp_path / "p")
    store = JobStorage(prefix)
    store.write_metrics([{"step": 2, "loss": 1.5}])
    _commit(store, 2, None)
    _progress(store, 2, 1)
    snap = read_snapshot(prefix, None, {}, schemes=("file",))
    assert snap.fence is None
    assert progress_to_status(snap, 3, 1)["progress"]["step"] == 2
    shown = progress_to_status(snap, 3, 2)
    assert "progress" not in shown
    assert [c["step"] for c in shown["checkpoints"]] == [2]
    assert shown["metrics"]["trainLoss"] == 1.5
    assert store.committed_checkpoints() == [2] and store.resumed_metrics(None) == []


def test_a_fenced_out_driver_writes_nothing_and_says_why(tmp_path):
    from kubetune_api import load_trainer_config, spec_to_trainer_config
    from kubetune_trainer.driver import FENCED, run
    from kubetune_trainer.storage import JobStorage

    job = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "late", "namespace": "ns", "uid": "u1"},
        "spec": {
            "model": {"uri": str(tmp_path / "model")},
            "dataset": {"train": {"uri": str(tmp_path / "train.jsonl")}, "format": "chat"},
            "output": {"uri": str(tmp_path / "out")},
        },
    }
    config = load_trainer_config(spec_to_trainer_config(job, attempt=1))
    newer = JobStorage(config.storage_prefix, attempt=3)
    newer.take_over()
    _progress(newer, 5, 3)
    progress = newer.read_json(contract.PROGRESS)
    said: list[str] = []
    assert run(config, check=False, log=said.append) == FENCED
    assert newer.read_json(contract.PROGRESS) == progress  # untouched
    assert newer.read_fence().attempt == 3
    assert len(said) == 1 and "attempt 1 no longer owns" in said[0], said
    assert "attempt 3 took over" in said[0]


def test_older_attempts_names_only_the_jobs_own_earlier_rayjobs():
    from kubetune_operator.names import LABEL_ATTEMPT, LABEL_JOB_UID
    from kubetune_operator.ownership import older_attempts

    job = {"metadata": {"name": "j", "namespace": "ns", "uid": "u1"}}

    def rj(name, attempt, uid="u1", owner="u1", deleting=False):
        meta = {
            "name": name,
            "labels": {LABEL_JOB_UID: uid, LABEL_ATTEMPT: str(attempt)},
            "ownerReferences": [{"kind": "FineTuneJob", "name": "j", "uid": owner}],
        }
        if deleting:
            meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
        return {"metadata": meta}

    rayjobs = [
        rj("j", 1),
        rj("j-r1", 2),
        rj("j-r2", 3),  # the current attempt's
        rj("j-r3", 4),  # a later one's (never made): not older
        rj("other", 1, uid="u2", owner="u2"),
        rj("forged", 1, owner="someone-else"),  # labelled, not owned: never touched
        rj("going", 1, deleting=True),
        {"metadata": {"name": "odd", "labels": {LABEL_JOB_UID: "u1", LABEL_ATTEMPT: "x"}}},
    ]
    assert older_attempts(rayjobs, job, 3) == ["j", "j-r1"]
    assert older_attempts(rayjobs, job, 1) == []
