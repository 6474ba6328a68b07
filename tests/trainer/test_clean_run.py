"""`kubetune run` with spec.dataset.clean action drop on the planted file
(tests/clean_cases.py): the checks before Ray, the trainer and the summary count the
same findings; the rows trained are the rows read minus the rows dropped; clean.json
under the job's prefix holds the numbers, and no PII value."""

from __future__ import annotations

import json

import pytest
import trainer_helpers as H
import yaml

from clean_cases import planted

pytestmark = [pytest.mark.trainer, pytest.mark.timeout(600)]

COUNTS = (
    "train: 46 rows, 2 exact and 2 near duplicates, 2 leaked into validation/test; "
    "PII 1 email, 2 phone, 2 card, 5 key; 16 dropped, 30 kept"
)


def test_kubetune_run_drops_what_the_report_finds(ray_local, tmp_path, capsys):
    from kubetune_trainer.local import LocalRun, run_local

    train, validation = planted()
    model = H.tiny_model(tmp_path / "tiny")
    job = H.job(
        model,
        H.write_jsonl(tmp_path / "train.jsonl", train),
        (tmp_path / "runs").as_uri(),
        name="cleaned",
        hyperparameters={"maxSteps": 2, "logEverySteps": 1, "batchSize": 2},
        evaluation={"enabled": False},  # validation is read all the same: leaks
        checkpointing={"everySteps": 100, "keepLast": 1},
    )
    job["spec"]["dataset"]["validation"] = {
        "uri": str(H.write_jsonl(tmp_path / "validation.jsonl", validation))
    }
    job["spec"]["dataset"]["clean"] = {"action": "drop"}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    assert run_local(LocalRun(file=str(tmp_path / "job.yaml"), progress=False)) == 0
    out = capsys.readouterr().out
    # the check before Ray, and the summary after the run, say the same counts
    assert f"  clean: {COUNTS}" in out.splitlines(), out[-3000:]
    assert f"{'':<16}{COUNTS}" in out.splitlines(), out[-3000:]
    assert "maria.lopez" not in out and "AKIAIOSFODNN7EXAMPLE" not in out

    prefix = tmp_path / "runs/default/cleaned/u1"
    report = json.loads((prefix / "clean.json").read_text())
    counts = report["splits"]["train"]["counts"]
    assert counts == {
        "rows": 46,
        "exactDuplicates": 2,
        "nearDuplicates": 2,
        "leaked": 2,
        "pii": {"email": 1, "phone": 2, "card": 2, "key": 5},
        "piiRows": 10,
        "dropped": 16,
        "redacted": 0,
        "kept": 30,
    }
    assert report["splits"]["train"]["drop"] == list(range(30, 46))
    assert report["splits"]["validation"]["counts"]["dropped"] == 0
    assert "maria.lopez" not in json.dumps(report)
    # what the trainer built its examples from: the rows kept, and only those
    record = json.loads((prefix / "run.json").read_text())
    rows = record["dataset"]["trainRows"]
    assert rows["rows"] == counts["rows"] - counts["dropped"] == 30
    assert rows["used"] + rows["dropped"] == 30
    assert record["dataset"]["validationRows"]["rows"] == 10
