"""dataset.mixture: the shares, the deterministic epoch order, packing per source,
the local checks, status and the summary (docs/practice.md, "Data mixtures and
multi-task"). The trainer-tier run is tests/trainer/test_mixture_run.py."""

import json
from collections import Counter

import pytest

from kubetune_api import models
from kubetune_operator.progress import progress_to_status
from kubetune_trainer import data as D
from kubetune_trainer import local, preflight


def test_weights_are_normalised_and_temperature_flattens_the_sizes():
    assert D.mixture_weights([900, 100], [3, 1], 1.0) == [0.75, 0.25]
    assert D.mixture_weights([900, 100], [None, None], 1.0) == pytest.approx([0.9, 0.1])
    # T = 2: sqrt of the sizes (30 : 10)
    assert D.mixture_weights([900, 100], [None, None], 2.0) == pytest.approx([0.75, 0.25])
    flat = D.mixture_weights([900, 100], [None, None], 100.0)
    assert flat[0] == pytest.approx(0.5, abs=0.02)


def _two_sources(n_a: int, n_b: int):
    spans = [range(0, n_a), range(n_a, n_a + n_b)]
    source = {u: 0 for u in spans[0]} | {u: 1 for u in spans[1]}
    return spans, source


def test_an_epoch_draws_the_sources_at_weights_three_to_one():
    spans, source = _two_sources(200, 200)
    counts = D.mixture_counts(spans, [200, 200], [0.75, 0.25])
    assert counts == [300, 100]  # an epoch holds the 400 examples the sources hold
    order = D.mixture_order(spans, counts, seed=42, epoch=0)
    assert len(order) == 400
    assert Counter(source[u] for u in order) == {0: 300, 1: 100}
    # interleaved, not one source after the other: every window of 80 is near 3:1
    for lo in range(0, 400, 80):
        share = sum(source[u] == 0 for u in order[lo : lo + 80]) / 80
        assert 0.6 <= share <= 0.9, (lo, share)
    # source a (drawn 300 times from 200 units) repeats; b (100 of 200) is subsampled
    drawn_a = Counter(u for u in order if source[u] == 0)
    assert len(drawn_a) == 200 and max(drawn_a.values()) == 2
    drawn_b = [u for u in order if source[u] == 1]
    assert len(set(drawn_b)) == 100


def test_the_order_is_a_function_of_seed_and_epoch_so_resume_sees_the_same_batches():
    spans, _ = _two_sources(50, 30)
    counts = D.mixture_counts(spans, [50, 30], [0.5, 0.5])
    first = D.mixture_order(spans, counts, seed=7, epoch=3)
    assert D.mixture_order(spans, counts, seed=7, epoch=3) == first
    assert D.mixture_order(spans, counts, seed=7, epoch=4) != first
    assert D.mixture_order(spans, counts, seed=8, epoch=3) != first

    # the recipe's positions: micro-batch m of an uninterrupted run, and the same
    # micro-batches computed afresh by a run resumed at micro-batch 37
    def batches(start: int, stop: int, batch: int = 4) -> list[list[int]]:
        per_epoch = sum(counts) // batch
        out = []
        for m in range(start, stop):
            epoch, k = divmod(m, per_epoch)
            order = D.mixture_order(spans, counts, 7, epoch)
            out.append([order[(k * batch + j) % len(order)] for j in range(batch)])
        return out

    whole = batches(0, 60)
    assert batches(37, 60) == whole[37:]


def test_weights_count_examples_when_packing_puts_several_in_a_unit():
    # source a: 100 examples packed 4 to a unit (25 units); b: 100 examples, one per unit
    spans = [range(0, 25), range(25, 125)]
    counts = D.mixture_counts(spans, [100, 100], [0.5, 0.5])
    assert counts == [25, 100]
    examples_a, examples_b = counts[0] * 4, counts[1] * 1
    assert examples_a == examples_b == 100


def test_packing_never_mixes_two_sources_in_one_sequence():
    examples = [D.Example([1] * n, [1] * n) for n in (3, 4, 5, 6, 3, 2, 7, 1)]
    spans = [range(0, 5), range(5, 8)]
    units, unit_spans = D.source_units(D.sequences, examples, spans, 16, True, 0)
    assert sorted(i for u in units for i in u) == list(range(8))
    for span, own in zip(spans, unit_spans, strict=True):
        for u in own:
            assert all(i in span for i in units[u]), (units[u], span)
            assert sum(len(examples[i].input_ids) for i in units[u]) <= 16


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_kubetune_validate_reads_each_source_in_its_own_format(tmp_path):
    chat = _write(
        tmp_path / "chat.jsonl",
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
        * 3,
    )
    pc = _write(
        tmp_path / "pc.jsonl",
        [{"prompt": "2+2=", "completion": "4"}] * 2 + [{"text": "not prompt-completion"}],
    )
    job = {
        "spec": {
            "model": {"name": "org/m"},
            "dataset": {
                "format": "chat",
                "mixture": [
                    {"id": "chat", "uri": chat},
                    {"id": "math", "uri": pc, "format": "prompt-completion"},
                ],
            },
        }
    }
    report, usable = preflight.check_files(job, tmp_path)
    assert len(usable["mixture[0]"]) == 3 and len(usable["mixture[1]"]) == 2
    notes = "\n".join(report.notes)
    assert "mixture source chat" in notes and "3 fit format chat" in notes
    assert "mixture source math" in notes and "2 fit format prompt-completion" in notes
    assert report.warnings == [
        w for w in report.warnings if w.startswith("mixture source math: 1 of 3 rows do not fit")
    ]
    assert len(report.warnings) == 1 and "'prompt-completion'" in report.warnings[0]

    _write(tmp_path / "pc.jsonl", [{"text": "no prompt"}])  # no row fits: an error, at it
    report, _ = preflight.check_files(job, tmp_path)
    (error,) = report.errors
    assert error.path == "spec.dataset.mixture[1].uri"
    assert "spec.dataset.mixture[1].format" in str(error)

    relative = {"spec": {"dataset": {"mixture": [{"id": "a", "uri": "data/a.jsonl"}]}}}
    resolved = preflight.resolve_job_paths(relative, tmp_path)
    assert resolved["spec"]["dataset"]["mixture"][0]["uri"] == str(tmp_path / "data/a.jsonl")


def test_the_held_out_loss_per_source_reaches_status():
    rows = [
        {"step": 0, "evalLoss": 3.0, "evalLossPerSource": {"chat": 2.5, "math_qa": 3.5}},
        {"step": 2, "loss": 2.2, "trainExamplesPerSource": {"chat": 6, "math_qa": 2}},
        {"step": 4, "evalLoss": 2.0, "evalLossPerSource": {"chat": 1.75, "math_qa": 2.25}},
    ]
    status = progress_to_status({"prefix": "s3://b/p", "metrics": rows})
    assert status["metrics"]["evalLossPerSource"] == {"chat": 1.75, "math_qa": 2.25}
    assert status["metrics"]["evalLoss"] == 2.0
    models.FineTuneJobStatus.model_validate(status)  # the CRD's status schema takes it


def test_the_summary_has_a_line_per_source():
    out = {
        "mixture": [
            {
                "id": "chat",
                "format": "chat",
                "weight": 0.75,
                "trainExamples": 90,
                "validationExamples": 10,
                "trainedExamples": 48,
                "initialEvalLoss": 3.1,
                "finalEvalLoss": 2.4,
            },
            {
                "id": "math",
                "format": "prompt-completion",
                "weight": 0.25,
                "trainExamples": 40,
                "validationExamples": 4,
                "trainedExamples": 16,
                "initialEvalLoss": 4.0,
                "finalEvalLoss": 3.5,
            },
        ]
    }
    lines = local.mixture_lines(out)
    assert len(lines) == 2
    assert "mixture:" in lines[0] and "chat (chat): share 75.0%, 48 examples trained" in lines[0]
    assert "held-out loss 4.0000 -> 3.5000" in lines[1]


def test_held_out_units_take_the_sources_in_turn():
    units = [[0], [1], [2], [3], [4], [5]]
    spans = [range(0, 4), range(4, 6)]
    mixed, positions = D.interleave(units, spans)
    assert mixed == [[0], [4], [1], [5], [2], [3]]
    assert [[mixed[p] for p in pos] for pos in positions] == [[[0], [1], [2], [3]], [[4], [5]]]


def test_every_remote_source_is_staged_and_formats_resolve():
    from kubetune_api.validation import resolve_spec
    from kubetune_trainer.stager import data_sources

    spec = resolve_spec(
        {
            "model": {"name": "org/m"},
            "dataset": {
                "mixture": [
                    {"id": "a", "uri": "s3://bkt/a.jsonl"},
                    {"id": "b", "uri": "/data/b.jsonl", "format": "text"},
                    {"id": "c", "uri": "gs://bkt/c/"},
                ],
                "test": {"uri": "s3://bkt/t.jsonl"},
            },
        }
    )
    assert [s.uri for s in data_sources(spec)] == [
        "s3://bkt/a.jsonl",
        "gs://bkt/c/",
        "s3://bkt/t.jsonl",
    ]
    ds = spec.dataset
    assert [ds.format_of(s) for s in ds.train_sources()] == ["chat", "text", "chat"]
