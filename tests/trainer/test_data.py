"""Data formats, loss masks, bad rows, truncation and packing (no Ray, fast)."""

from __future__ import annotations

import json

import pytest
import torch
import trainer_helpers as H

from kubetune_trainer import data as D

pytestmark = pytest.mark.trainer


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    H.prepare_quickstart()
    return AutoTokenizer.from_pretrained(H.SMOL)


def _trained_text(tok, ids, labels):
    return tok.decode([t for t in labels if t != D.IGNORE])


def test_chat_loss_only_on_assistant_turns(tok):
    msgs = [
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "Four."},
        {"role": "user", "content": "And three?"},
        {"role": "assistant", "content": "Three is three."},
    ]
    ids, labels = D.tokenize({"messages": msgs}, tok)
    trained = _trained_text(tok, ids, labels)
    assert "Four." in trained and "Three is three." in trained
    assert "two plus two" not in trained and "And three" not in trained
    assert "system" not in trained and "user" not in trained


@pytest.mark.parametrize(
    "fmt,row,must_train,must_not_train",
    [
        ("text", {"text": "hello big world"}, "big world", None),
        ("prompt-completion", {"prompt": "Q: sky?", "completion": " blue"}, "blue", "sky"),
        (
            "alpaca",
            {"instruction": "Add", "input": "1 and 2", "output": "3 exactly"},
            "3 exactly",
            "1 and 2",
        ),
        (
            "sharegpt",
            {
                "conversations": [
                    {"from": "human", "value": "hi there"},
                    {"from": "gpt", "value": "hello friend"},
                ]
            },
            "hello friend",
            "hi there",
        ),
        (
            "chat",
            {
                "messages": [
                    {"role": "user", "content": "ping"},
                    {"role": "assistant", "content": "pong"},
                ]
            },
            "pong",
            "ping",
        ),
    ],
)
def test_every_format(tok, fmt, row, must_train, must_not_train):
    examples, report = D.build_examples([row], fmt, tok, 256)
    assert report.usable == 1 and not report.bad
    ex = examples[0]
    trained = _trained_text(tok, ex.input_ids, ex.labels)
    assert must_train in trained
    if must_not_train:
        assert must_not_train not in trained
        assert must_not_train in tok.decode(ex.input_ids)


def test_bad_rows_counted_with_examples(tok):
    rows = [
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"messages": "not a list"},
        {"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]},
        {"text": "wrong format"},
        "a bare string",
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    ]
    examples, report = D.build_examples(rows, "chat", tok, 256)
    assert report.usable == 1 and len(examples) == 1
    assert sum(report.bad.values()) == 5
    assert report.bad["no assistant turn"] == 1
    assert report.bad["not an object"] == 1
    assert any("unknown role 'wizard'" in r for r in report.bad)
    assert report.bad_examples and report.bad_examples[0].startswith(
        "row 1: no assistant turn"
    )  # 1-based
    assert "5" in report.summary() or "1/6" in report.summary()


def test_no_usable_rows_fails_fast(tmp_path, tok):
    from kubetune_api import load_trainer_config, spec_to_trainer_config

    bad = H.write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x"}] * 5)
    j = H.job(H.SMOL, bad, tmp_path.as_uri())
    cfg = load_trainer_config(spec_to_trainer_config(j))
    with pytest.raises(D.DataError, match="no usable rows"):
        D.prepare(cfg.spec, tok)


def test_truncation_counted(tok):
    rows = [{"text": "word " * 200}, {"text": "short"}]
    examples, report = D.build_examples(rows, "text", tok, 32)
    assert report.truncated == 1
    assert max(len(e.input_ids) for e in examples) == 32


def test_file_formats_jsonl_json_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": f"row {i}"} for i in range(5)]
    H.write_jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "b.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{broken\n')

    class Src:
        name = None
        split = "train"

    for name, n in (("a.jsonl", 5), ("b.json", 5), ("c.parquet", 5)):
        Src.uri = str(tmp_path / name)
        assert D.read_rows(Src) == rows[:n]
    Src.uri = (tmp_path / "bad.jsonl").as_uri()
    got = D.read_rows(Src)
    assert got[0] == {"text": "ok"} and isinstance(got[1], D.BadLine)
    assert got.where == ["bad.jsonl line 1", "bad.jsonl line 2"]
    norm, why = D.normalize(got[1], "text")
    assert norm is None and why.startswith("invalid JSON (column 2:"), why
    Src.uri = str(tmp_path)  # a folder: every file in it
    assert len(D.read_rows(Src)) == 17


def test_packing_resets_positions_and_keeps_examples_apart(tok):
    examples, _ = D.build_examples(H.chat_rows(64), "chat", tok, 128)
    seqs = D.pack(examples, 128, seed=0)
    assert sorted(i for s in seqs for i in s) == list(range(len(examples)))
    assert all(sum(len(examples[i].input_ids) for i in s) <= 128 for s in seqs)
    assert len(seqs) < len(examples) / 2  # short chats: several per sequence
    batch = D.collate(examples, seqs[:2], tok.pad_token_id, packing=True)
    assert "attention_mask" not in batch
    first = seqs[0]
    starts = [0]
    for i in first[:-1]:
        starts.append(starts[-1] + len(examples[i].input_ids))
    pos = batch["position_ids"][0]
    assert all(pos[s].item() == 0 for s in starts)
    assert all(batch["labels"][0, s].item() == D.IGNORE for s in starts)


def test_packed_batch_matches_separate_examples():
    """No cross-example attention: logits of a packed row equal each example alone."""
    model = H.small_lm().eval()
    a, b = (
        D.Example(list(range(3, 13)), list(range(3, 13))),
        D.Example([50, 51, 52, 53], [50, 51, 52, 53]),
    )
    batch = D.collate([a, b], [[0, 1]], pad_id=0, packing=True)
    with torch.no_grad():
        packed = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits[0]
        alone_b = model(input_ids=torch.tensor([b.input_ids]), use_cache=False).logits[0]
    assert torch.allclose(packed[10:14], alone_b, atol=1e-5)
