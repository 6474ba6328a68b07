"""spec.dataset.clean: a planted file's duplicates, leaks and PII are each found, with
nothing else; the shipped corpus's findings are counted; `kubetune validate` shows them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from clean_cases import PLANTED_PII, planted
from kubetune_api.models import Clean
from kubetune_trainer import clean as C
from kubetune_trainer import data as D
from kubetune_trainer.quickstart import prepare_data

REPO = Path(__file__).resolve().parents[2]


def _scan(train, validation, action="report", **kw):
    norms = {
        "train": [D.normalize(r, "chat")[0] for r in train],
        "validation": [D.normalize(r, "chat")[0] for r in validation],
    }
    return C.scan(norms, action=action, **kw)


def test_the_planted_file_finds_every_plant_and_nothing_else():
    train, validation = planted()
    report = _scan(train, validation)
    part = report["splits"]["train"]
    assert [(e["row"], e["of"]) for e in part["exactDuplicates"]] == [(40, 3), (41, 4)]
    assert [(e["row"], e["of"]) for e in part["nearDuplicates"]] == [(42, 5), (43, 6)]
    sims = [e["similarity"] for e in part["nearDuplicates"]]
    assert all(0.8 <= s < 1.0 for s in sims), sims
    assert [(e["row"], e["split"], e["heldOutRow"]) for e in part["leaked"]] == [
        (44, "validation", 2),
        (45, "validation", 7),
    ]
    assert part["leaked"][0]["similarity"] == 1.0
    assert 0.8 <= part["leaked"][1]["similarity"] < 1.0
    assert [(e["row"], e["kind"], e["field"]) for e in part["pii"]] == [
        (row, kind, "messages[1].content") for row, kind, _ in PLANTED_PII
    ]
    assert part["counts"] == {
        "rows": 46,
        "exactDuplicates": 2,
        "nearDuplicates": 2,
        "leaked": 2,
        "pii": {"email": 1, "phone": 2, "card": 2, "key": 5},
        "piiRows": 10,
        "dropped": 0,  # action report
        "redacted": 0,
        "kept": 46,
    }
    held = report["splits"]["validation"]["counts"]
    assert (held["exactDuplicates"], held["nearDuplicates"], sum(held["pii"].values())) == (0, 0, 0)
    assert C.found(report) == 2 + 2 + 2 + 10


def test_the_report_never_holds_a_pii_value():
    train, validation = planted()
    saved = json.dumps(_scan(train, validation))
    for secret in ("maria.lopez", "555-0132", "4111 1111", "AKIAIOSFODNN7EXAMPLE", "f3Kq9ZxT"):
        assert secret not in saved
    masked = [e["masked"] for e in _scan(train, validation)["splits"]["train"]["pii"]]
    assert masked[0] == "m***@***.fm"
    assert masked[3] == "**************11 (16 digits)"
    assert masked[5] == "AKIA*** (20 characters)"


def test_drop_leaves_out_duplicates_leaks_and_pii_rows():
    train, validation = planted()
    report = _scan(train, validation, action="drop")
    part = report["splits"]["train"]
    assert part["drop"] == list(range(30, 46))
    assert part["counts"]["dropped"] == 16 and part["counts"]["kept"] == 30
    kept, positions = C.apply(train, part, "drop", C.KINDS, "chat")
    assert positions == list(range(30)) and kept == train[:30]
    assert report["splits"]["validation"]["drop"] == []  # held-out rows stay whole


def test_redact_replaces_the_spans_and_drops_duplicates_and_leaks():
    train, validation = planted()
    report = _scan(train, validation, action="redact")
    part = report["splits"]["train"]
    assert part["drop"] == [40, 41, 42, 43, 44, 45]
    assert part["counts"]["redacted"] == 10
    kept, positions = C.apply(train, part, "redact", C.KINDS, "chat")
    assert positions == list(range(40))
    answers = [r["messages"][1]["content"] for r in kept[30:40]]
    assert [a.split()[1] for a in answers[:2]] == ["<EMAIL>", "number"]
    assert "<PHONE>" in answers[1] and "<CARD>" in answers[3] and "<KEY>" in answers[5]
    assert answers[7].startswith("<KEY>\nMIIEowIBAAKCAQEA")  # the header; the block is gone
    rescan = _scan(kept, validation)["splits"]["train"]["counts"]
    assert rescan["pii"] == {"email": 0, "phone": 0, "card": 0, "key": 0}
    assert kept[:30] == train[:30]  # the decoys are untouched


@pytest.mark.parametrize(
    "fmt, row, trained, kept",
    [
        # a prompt row's reference field is the grader's answer: neither scanned nor rewritten
        (
            "prompt",
            {"prompt": "Mail ann.lee@fastmail.fm the form.", "answer": "ann.lee@fastmail.fm"},
            "prompt",
            "answer",
        ),
        (
            "prompt-completion",
            {"prompt": "Who?", "completion": "Call +1 (415) 555-0132.", "id": "bo@fastmail.fm"},
            "completion",
            "id",
        ),
    ],
)
def test_redact_rewrites_only_the_fields_the_scan_counted(fmt, row, trained, kept):
    norms = {"train": [D.normalize(row, fmt)[0]]}
    part = C.scan(norms, action="redact")["splits"]["train"]
    assert part["counts"]["redacted"] == 1  # the trained field's one span
    (out,), positions = C.apply([row], part, "redact", C.KINDS, fmt)
    assert positions == [0]
    assert "<" in out[trained] and out[trained] != row[trained]
    assert out[kept] == row[kept]  # untouched, as the count says
    assert set(out) == set(row)


def test_threshold_one_counts_exact_duplicates_only():
    train, validation = planted()
    part = _scan(train, validation, threshold=1.0)["splits"]["train"]
    assert part["counts"]["exactDuplicates"] == 2 and part["counts"]["nearDuplicates"] == 0
    assert [e["row"] for e in part["leaked"]] == [44]


def test_only_the_kinds_asked_for_are_scanned():
    train, validation = planted()
    part = _scan(train, validation, kinds=["card"])["splits"]["train"]
    assert part["counts"]["pii"] == {"card": 2}


@pytest.mark.parametrize(
    "text, kinds",
    [
        ("mail j.doe+news@uni-mail.co.uk now", ["email"]),
        ("call 415.555.0132 or +44 20 7946 0958", ["phone", "phone"]),
        ("cards 5555555555554444 and 6011 1111 1111 1117", ["card", "card"]),
        ("AKIAIOSFODNN7EXAMPLE and user@example.com", ["key"]),
        ("client_secret: 'Zq8xV2nL5tR9wK3mP7sJ'", ["key"]),
        ("build 2024.01.15, pi 3.14159265358979, isbn 978-3-16-148410-0", []),
        ("xoxb-1234567890-abcdefghij and hf_abcdefghijklmnopqrstuvwxyz123456", ["key", "key"]),
        # at the end of a sentence: the full stop is not part of a longer number
        ("Call +1 (415) 555-0132. Pay with 4111 1111 1111 1111.", ["phone", "card"]),
        ("Version 1.2.3.4 of 192.168.1.10. Call 020 7946 0958.5 now", []),
    ],
)
def test_pii_patterns(text, kinds):
    assert [k for k, _, _ in C.find_pii(text)] == kinds


def _corpus(tmp_path) -> D.Rows:
    path = prepare_data(tmp_path)
    return D.parse_text(path.read_text(encoding="utf-8"), path.name)


def test_the_shipped_corpus(tmp_path):
    """The chatterbot conversations the quickstart trains on: 2026 rows, of which 1127
    repeat an earlier row exactly (the corpus ships some files' conversations several
    times: `sort | uniq` leaves 899 distinct lines) and 3 nearly (a dropped "?", a
    dropped ")" in a code sample, a "diijkstra" typo); no PII ("user@example.com" in
    two regex samples is a reserved documentation address)."""
    rows = _corpus(tmp_path)
    report = C.scan({"train": [D.normalize(r, "chat")[0] for r in rows]})
    c = report["splits"]["train"]["counts"]
    assert (c["rows"], c["exactDuplicates"], c["nearDuplicates"]) == (2026, 1127, 3)
    assert c["pii"] == {"email": 0, "phone": 0, "card": 0, "key": 0}
    assert c["exactDuplicates"] == len(rows) - len({json.dumps(r, sort_keys=True) for r in rows})
    near = report["splits"]["train"]["nearDuplicates"]
    assert [(e["row"], e["of"]) for e in near] == [(100, 85), (262, 188), (268, 194)]


def test_the_quickstart_split_leaks_and_drop_fixes_it(tmp_path):
    """validationSplit 0.1 of a corpus that repeats itself: most held-out rows are also
    in train. Dropped, what is left trains on nothing the evaluation sees."""
    rows = _corpus(tmp_path)
    train, val = D.split_validation(rows, 0.1, 42)
    splits, report = D.clean_splits(
        {"train": train, "validation": val}, "chat", Clean(action="drop", pii=[])
    )
    c = report["splits"]["train"]["counts"]
    assert (c["rows"], c["leaked"]) == (1823, 980)
    assert c["dropped"] == len(set(report["splits"]["train"]["drop"]))
    assert len(splits["train"]) == c["kept"] == 1823 - c["dropped"]
    again = C.scan(
        {
            "train": [D.normalize(r, "chat")[0] for r in splits["train"]],
            "validation": [D.normalize(r, "chat")[0] for r in splits["validation"]],
        }
    )
    assert C.found(again) == 0
    assert splits["train"].where[0] == train.where[0]  # rows keep their file and line


JOB = """\
apiVersion: kubetune.io/v1alpha1
kind: FineTuneJob
metadata:
  name: planted
spec:
  model:
    name: org/model
  dataset:
    train:
      uri: {train}
    validation:
      uri: {validation}
    clean:
      action: {action}
"""


@pytest.mark.parametrize("action", ["report", "drop"])
def test_kubetune_validate_shows_the_counts(tmp_path, action):
    train, validation = planted()
    for name, rows in (("train", train), ("validation", validation)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    job = tmp_path / "job.yaml"
    job.write_text(
        JOB.format(
            train=tmp_path / "train.jsonl", validation=tmp_path / "validation.jsonl", action=action
        )
    )
    proc = subprocess.run(
        [sys.executable, "-m", "kubetune_cli", "validate", str(job)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = (
        "  clean: train: 46 rows, 2 exact and 2 near duplicates, 2 leaked into "
        "validation/test; PII 1 email, 2 phone, 2 card, 5 key"
    )
    if action == "drop":
        line += "; 16 dropped, 30 kept"
    assert line in proc.stdout.splitlines(), proc.stdout
    warned = "warning: dataset.clean found 16 duplicate, leaked or PII finding(s)" in proc.stdout
    assert warned == (action == "report")
    assert "maria.lopez" not in proc.stdout


def test_every_format_is_compared_on_the_text_it_trains_on():
    rows = {
        "text": [{"text": "one two three four five"}, {"text": "One  two three four FIVE"}],
        "preference": [
            {"prompt": "p q r s", "chosen": "a b c d e", "rejected": "x y z w v"},
            {"prompt": "p q r s", "chosen": "a b c d e", "rejected": "x y z w v"},
        ],
        "alpaca": [
            {"instruction": "mail me", "input": "at ana@corp-mail.net", "output": "ok"},
            {"instruction": "mail me", "input": "at ana@corp-mail.net", "output": "no"},
        ],
        "prompt": [
            {"prompt": "say hi", "secret": "AKIAIOSFODNN7EXAMPLE"},  # a grader field
            {"prompt": "say bye", "secret": "AKIAIOSFODNN7EXAMPLE"},
        ],
    }
    found = {}
    for fmt, pair in rows.items():
        part = C.scan({"train": [D.normalize(r, fmt)[0] for r in pair]})["splits"]["train"]
        found[fmt] = (
            part["counts"]["exactDuplicates"],
            [(e["row"], e["field"], e["kind"]) for e in part["pii"]],
        )
    assert found == {
        "text": (1, []),
        "preference": (1, []),
        "alpaca": (0, [(0, "messages[0].content", "email"), (1, "messages[0].content", "email")]),
        "prompt": (0, []),  # item fields are not trained on
    }
