"""dataset.format classification: the rows, the labels and their ids, the errors
(no model; a word-level tokenizer built in memory)."""

from __future__ import annotations

import pytest

from kubetune_api.validation import resolve_spec
from kubetune_trainer import data as D
from kubetune_trainer import objectives
from kubetune_trainer.objectives.classify import Classify, macro_f1

WORDS = ["[PAD]", "[UNK]", "good", "bad", "film", "very", "plot"]


@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    t.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=t, pad_token="[PAD]", unk_token="[UNK]")


SPEC = {
    "model": {"name": "org/model"},
    "dataset": {"train": {"uri": "s3://bucket/t.jsonl"}, "format": "classification"},
    "method": {"task": "classification"},
}


def test_rows_normalise_and_refuse_what_is_no_label():
    assert D.normalize({"text": "good film", "label": "pos"}, "classification") == (
        {"text": "good film", "label": "pos"},
        None,
    )
    assert D.normalize({"text": "x", "label": 3}, "classification")[0] == {"text": "x", "label": 3}
    for row, why in (
        ({"label": "pos"}, "missing or empty 'text'"),
        ({"text": "x"}, "'label' must be a non-empty string or an integer"),
        ({"text": "x", "label": True}, "'label' must be a non-empty string or an integer"),
        ({"text": "x", "label": 1.5}, "'label' must be a non-empty string or an integer"),
        ({"text": "x", "label": " "}, "'label' must be a non-empty string or an integer"),
    ):
        assert D.normalize(row, "classification") == (None, why)


def test_labels_are_the_sorted_distinct_labels_numbers_as_numbers():
    rows = [{"text": "a", "label": x} for x in ("neg", "pos", "neg", "mixed")]
    assert D.label_names(rows) == ["mixed", "neg", "pos"]
    # integers sort as numbers (10 after 9), and become their strings
    assert D.label_names([{"text": "a", "label": x} for x in (10, 9, 2, 9)]) == ["2", "9", "10"]
    # 1 and "1" are one label; unusable rows bring none
    mixed = [{"text": "a", "label": 1}, {"text": "b", "label": "1"}, {"text": "", "label": "z"}]
    assert D.label_names(mixed) == ["1"]


def test_examples_carry_the_label_id_and_held_out_rows_use_the_training_labels(tok):
    spec = resolve_spec(SPEC)
    obj = objectives.for_spec(spec)
    assert isinstance(obj, Classify)
    train = D.Rows(
        [
            {"text": "very good film", "label": "pos"},
            {"text": "bad plot", "label": "neg"},
            {"label": "neg"},  # no text: counted, not used
            {"text": "good good good good good", "label": "pos"},
        ],
        [f"train.jsonl:{i + 1}" for i in range(4)],
    )
    examples, report = obj.build_examples(train, "classification", tok, 4)
    assert obj.labels == ["neg", "pos"]
    assert [e.labels for e in examples] == [[1], [0], [1]]
    assert examples[0].input_ids == [5, 2, 4]
    assert (report.rows, report.usable, report.truncated) == (4, 3, 1)
    assert len(examples[2].input_ids) == 4  # truncated to maxSeqLength
    assert report.bad == {"missing or empty 'text'": 1}

    batch = obj.collate(examples, [[0], [1]], pad_id=0, packing=True)  # never packed
    assert batch["input_ids"].tolist() == [[5, 2, 4], [3, 6, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [1, 0]
    assert obj.units(examples, 4, True, 7) == [[0], [1], [2]]

    # the second split built (validation) keeps the training labels' ids
    val, _ = obj.build_examples([{"text": "bad film", "label": "neg"}], "classification", tok, 4)
    assert val[0].labels == [0] and obj.labels == ["neg", "pos"]
    held = D.Rows([{"text": "film", "label": "meh"}], ["val.jsonl:1"])
    with pytest.raises(D.DataError) as err:
        obj.build_examples(held, "classification", tok, 4)
    text = str(err.value)
    assert "dataset.validation" in text and "val.jsonl:1" in text and "'meh'" in text
    assert "(the labels: neg, pos)" in text


def test_one_label_is_no_classifier(tok):
    obj = objectives.for_spec(resolve_spec(SPEC))
    rows = [{"text": "good", "label": "pos"}, {"text": "bad", "label": "pos"}]
    with pytest.raises(D.DataError, match="at least two labels"):
        obj.build_examples(rows, "classification", tok, 4)


def test_macro_f1_counts_every_label_alike():
    # gold 0 0 1 2, predicted 0 1 1 1: label 0 F1 2/3, label 1 F1 2/4, label 2 F1 0
    assert macro_f1([1, 1, 0], [0, 2, 0], [1, 0, 1]) == pytest.approx((2 / 3 + 0.5 + 0) / 3)
    assert macro_f1([2, 0], [0, 0], [0, 0]) == pytest.approx(0.5)  # a label never seen: 0


def _write(path, rows):
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_the_local_check_names_unseen_and_single_labels(tmp_path):
    from kubetune_trainer import preflight

    train = _write(tmp_path / "t.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": 2}])
    val = _write(tmp_path / "v.jsonl", [{"text": "c", "label": "2"}, {"text": "d", "label": 3}])
    ds = {"format": "classification", "train": {"uri": train}, "validation": {"uri": val}}
    job = {"spec": {"model": {"name": "org/m"}, "dataset": ds}}
    report, _ = preflight.check_files(job, tmp_path)
    assert "train: 2 labels (1, 2)" in report.notes
    (error,) = report.errors
    assert error.path == "spec.dataset.validation.uri"
    assert "1 row(s) have a label no training row has (v.jsonl line 2: 3)" in error.message

    _write(tmp_path / "t.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": 1}])
    _write(tmp_path / "v.jsonl", [{"text": "c", "label": 1}])
    report, _ = preflight.check_files(job, tmp_path)
    (error,) = report.errors
    assert error.path == "spec.dataset.train.uri" and "two labels at least" in error.message
