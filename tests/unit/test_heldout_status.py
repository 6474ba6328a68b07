"""outputs.json's calibration and retention → status.metrics and the
RetentionRegressed condition (progress.py's pure functions)."""

from __future__ import annotations

import pytest

from kubetune_operator.progress import progress_to_status, retention_condition

CALIBRATION = {
    "tokens": 420,
    "bins": 15,
    "eceBefore": 0.0412,
    "ece": 0.1034,
    "accuracy": 0.41,
    "confidence": 0.51,
    "temperature": 1.37,
    "temperatureTokens": 420,
    "eceAtTemperature": 0.0311,
    "savedIn": ["merged"],
}


def _retention(after: float, bound=0.05, fail=False) -> dict:
    before = 2.0
    regression = (after - before) / before
    return {
        "examples": 64,
        "tokens": 3000,
        "lossBefore": before,
        "lossAfter": after,
        "regression": regression,
        "maxRegression": bound,
        "exceeded": bound is not None and regression > bound,
        "failOnRegression": fail,
    }


def _snap(retention=None, attempt=1) -> dict:
    outputs = {"steps": 10, "attempt": attempt, "finalEvalLoss": 1.5}
    if retention is not None:
        outputs["retention"] = retention
    outputs["calibration"] = CALIBRATION
    return {"prefix": "s3://b/ft/ns/job/uid", "outputs": outputs}


def test_the_numbers_go_to_status_metrics():
    metrics = progress_to_status(_snap(_retention(2.3)))["metrics"]
    assert metrics == {
        "evalLoss": 1.5,
        "evalEceBefore": 0.0412,
        "evalEce": 0.1034,
        "calibrationTemperature": 1.37,
        "evalEceAtTemperature": 0.0311,
        "retentionLossBefore": 2.0,
        "retentionLoss": 2.3,
        "retentionRegression": pytest.approx(0.15),
    }


@pytest.mark.parametrize(
    "after, fail, exceeded, words",
    [
        (2.3, False, True, "(+15.00%), above the bound of 5% (hint: set failOnRegression"),
        (2.3, True, True, "above the bound of 5%; the job fails (failOnRegression)"),
        (2.05, False, False, "(+2.50%), within the bound of 5%"),
        (1.9, False, False, "(-5.00%), within the bound of 5%"),
    ],
)
def test_the_condition_says_whether_the_bound_held(after, fail, exceeded, words):
    got, message = retention_condition(_snap(_retention(after, fail=fail)))
    assert got is exceeded
    assert message.startswith(
        f"evaluation.retention: the retention set's loss 2.0000 before, {after:.4f} after"
    )
    assert words in message


def test_no_condition_without_a_bound_or_from_an_older_attempt():
    assert retention_condition(_snap(_retention(2.3, bound=None))) is None
    assert retention_condition(_snap(None)) is None
    assert retention_condition({"prefix": "p"}) is None
    # outputs.json of attempt 1 while the job is on attempt 2: not this attempt's verdict
    assert retention_condition(_snap(_retention(2.3), attempt=1), attempt=2) is None
    assert retention_condition(_snap(_retention(2.3), attempt=2), attempt=2)[0] is True


def test_the_status_write_path_sets_the_condition_once_the_outputs_are_read():
    from datetime import datetime, timezone

    from kubetune_operator.storage_limits import ReadSlots
    from kubetune_operator.storage_reader import StorageSnapshot
    from kubetune_operator.storage_view import JobReads, StorageView

    view = StorageView(None, None, None, ReadSlots(), lambda uid: None, 5.0, 5.0)
    job = {"metadata": {"uid": "uid", "name": "job"}, "spec": {}}
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    view._jobs["uid"] = JobReads(snapshot=StorageSnapshot.model_validate(_snap(None)))
    status = view.show(job, {"attempts": 1}, now, 3)
    assert not [c for c in status["conditions"] if c["type"] == "RetentionRegressed"]
    view._jobs["uid"].snapshot = StorageSnapshot.model_validate(_snap(_retention(2.3)))
    status = view.show(job, status, now, 3)
    (cond,) = [c for c in status["conditions"] if c["type"] == "RetentionRegressed"]
    assert (cond["status"], cond["reason"]) == ("True", "RetentionAboveBound")
    assert "above the bound of 5%" in cond["message"] and cond["observedGeneration"] == 3
    assert status["metrics"]["retentionRegression"] == pytest.approx(0.15)
