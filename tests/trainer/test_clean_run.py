"""spec.dataset.clean action drop on the planted file (tests/clean_cases.py), through
the two places that read it: `kubetune run`'s checks before Ray (and `kubetune
validate`'s) and the trainer's data preparation, which every worker runs. Both count
the same findings, the examples are built from the rows kept and only those, and no
PII value is in what either says. (The whole `kubetune run`, clean.json under the
prefix and the summary, is test_smollm2's quickstart run, which sets action drop.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trainer_helpers as H

from clean_cases import planted

pytestmark = [pytest.mark.trainer]

COUNTS = (
    "train: 46 rows, 2 exact and 2 near duplicates, 2 leaked into validation/test; "
    "PII 1 email, 2 phone, 2 card, 5 key; 16 dropped, 30 kept"
)


def test_the_checks_and_the_trainer_drop_what_the_report_finds(tmp_path):
    from kubetune_api import load_trainer_config, spec_to_trainer_config
    from kubetune_trainer import clean as C
    from kubetune_trainer import data as D
    from kubetune_trainer import model as M
    from kubetune_trainer import objectives
    from kubetune_trainer.preflight import validate_findings

    train, validation = planted()
    model = H.tiny_model(tmp_path / "tiny")
    job = H.job(
        model,
        H.write_jsonl(tmp_path / "train.jsonl", train),
        (tmp_path / "runs").as_uri(),
        name="cleaned",
        evaluation={"enabled": False},  # validation is read all the same: leaks
    )
    job["spec"]["dataset"]["validation"] = {
        "uri": str(H.write_jsonl(tmp_path / "validation.jsonl", validation))
    }
    job["spec"]["dataset"]["clean"] = {"action": "drop"}

    # the checks before Ray (`kubetune run`, `kubetune validate`)
    report = validate_findings(job, Path(tmp_path))
    assert report.ok, report.errors
    assert f"clean: {COUNTS}" in report.notes, report.notes
    assert not [n for n in report.notes if "maria.lopez" in n or "AKIAIOSFODNN7" in n]

    # the trainer's data preparation, as each worker runs it
    spec = load_trainer_config(spec_to_trainer_config(job)).spec
    tok = M.load_tokenizer(spec, str(model))
    prepared = D.prepare(spec, tok, build=objectives.for_spec(spec).build_examples)
    assert C.summary(prepared.clean)[0] == COUNTS
    counts = prepared.clean["splits"]["train"]["counts"]
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
    assert prepared.clean["splits"]["train"]["drop"] == list(range(30, 46))
    assert prepared.clean["splits"]["validation"]["counts"]["dropped"] == 0
    assert "maria.lopez" not in json.dumps(prepared.clean)
    # the examples are built from the rows kept (rows 0-29), and only from those
    assert prepared.train_report.rows == counts["rows"] - counts["dropped"] == 30
    assert prepared.train_report.usable == len(prepared.train) == 30
    # the same 30 rows, built on their own, give the same examples
    alone, _ = objectives.for_spec(spec).build_examples(
        train[:30], spec.dataset.format, tok, spec.dataset.max_seq_length
    )
    assert [e.input_ids for e in prepared.train] == [e.input_ids for e in alone]
    assert prepared.val_report.rows == 10
