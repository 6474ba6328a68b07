"""dataset.mixture on a real run (`kubetune run`, Ray + DeepSpeed, a tiny model from
a config): two sources in two formats weighted 3:1. The examples trained per
source follow the seeded order (data.mixture_order) and the weights; each source
has its own held-out loss in metrics.jsonl, outputs.json, the status and the
summary; the overall held-out loss lies between them."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import trainer_helpers as H
import yaml

pytestmark = [pytest.mark.trainer, pytest.mark.timeout(600)]

STEPS, BATCH = 10, 4


def arithmetic(n: int) -> list[dict]:
    """prompt-completion rows, nothing like the chat corpus."""
    return [{"prompt": f"{i} plus {i % 7} is", "completion": f" {i + i % 7}."} for i in range(n)]


def test_two_sources_trained_at_their_weights_with_a_held_out_loss_each(
    ray_local, tmp_path, capsys
):
    from kubetune_operator.progress import progress_to_status
    from kubetune_operator.storage_reader import read_snapshot
    from kubetune_trainer import data as D
    from kubetune_trainer.local import LocalRun, run_local

    model = H.tiny_model(tmp_path / "tiny")
    chat = H.write_jsonl(tmp_path / "chat.jsonl", H.chat_rows(60))
    sums = H.write_jsonl(tmp_path / "sums.jsonl", arithmetic(60))
    job = H.job(
        model,
        chat,
        (tmp_path / "runs").as_uri(),
        name="mixed",
        # full fine-tuning at a high rate: ten steps move a random model's losses apart
        method={"type": "full"},
        hyperparameters={
            "maxSteps": STEPS,
            "batchSize": BATCH,
            "logEverySteps": 5,
            "learningRate": 1e-2,
        },
        evaluation={"everySteps": 10, "maxBatches": 8},  # all 12 held-out examples
        checkpointing={"everySteps": 100, "keepLast": 1},
    )
    ds = job["spec"]["dataset"]
    del ds["train"]
    ds["packing"] = False  # a unit is an example: the counts below are exact
    ds["mixture"] = [
        {"id": "chat", "uri": str(chat), "weight": 3},
        {"id": "sums", "uri": str(sums), "format": "prompt-completion", "weight": 1},
    ]
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    assert run_local(LocalRun(file=str(tmp_path / "job.yaml"), progress=False)) == 0
    out = capsys.readouterr().out

    prefix = tmp_path / "runs/default/mixed/u1"
    rows = [json.loads(line) for line in (prefix / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "evalLoss" in r]
    assert [r["step"] for r in evals] == [0, 10]
    for r in evals:
        per = r["evalLossPerSource"]
        assert set(per) == {"chat", "sums"}
        assert min(per.values()) <= r["evalLoss"] <= max(per.values()), r
    first, last = evals[0]["evalLossPerSource"], evals[-1]["evalLossPerSource"]
    print("held-out loss per source, before -> after:", first, last)
    assert all(last[s] < first[s] - 0.5 for s in first), (first, last)
    # the few words of the sums are learnt faster than chat, at a quarter of the examples
    assert last["sums"] < last["chat"] - 0.5, last
    # the examples trained: those the seeded order puts in the first STEPS batches
    # (54 train rows per source after validationSplit 0.1: 81 chat + 27 sums an epoch)
    counts = D.mixture_counts([range(0, 54), range(54, 108)], [54, 54], [0.75, 0.25])
    assert counts == [81, 27]
    order = D.mixture_order([range(0, 54), range(54, 108)], counts, seed=7, epoch=0)
    expected = Counter("chat" if u < 54 else "sums" for u in order[: STEPS * BATCH])
    trained = [r for r in rows if "trainExamplesPerSource" in r]
    assert trained[-1]["trainExamplesPerSource"] == dict(expected)
    assert sum(expected.values()) == STEPS * BATCH
    assert 0.6 <= expected["chat"] / (STEPS * BATCH) <= 0.9  # 3:1 within the draw's spread

    outputs = json.loads((prefix / "outputs.json").read_text())
    mix = {s["id"]: s for s in outputs["mixture"]}
    assert mix["chat"]["weight"] == 0.75 and mix["sums"]["weight"] == 0.25
    assert mix["sums"]["format"] == "prompt-completion"
    assert (mix["chat"]["trainExamples"], mix["chat"]["validationExamples"]) == (54, 6)
    assert mix["chat"]["trainedExamples"] == expected["chat"]
    for sid in ("chat", "sums"):
        assert mix[sid]["initialEvalLoss"] == pytest.approx(evals[0]["evalLossPerSource"][sid])
        assert mix[sid]["finalEvalLoss"] == pytest.approx(evals[-1]["evalLossPerSource"][sid])

    status = progress_to_status(read_snapshot(str(prefix), None, {}, schemes=("file",)))
    assert status["metrics"]["evalLossPerSource"] == {
        k: pytest.approx(v, abs=1e-5) for k, v in evals[-1]["evalLossPerSource"].items()
    }
    summary = [line for line in out.splitlines() if "share 75.0%" in line or "share 25.0%" in line]
    assert len(summary) == 2, out[-3000:]
    assert f"{expected['sums']} examples trained (54 in the set)" in summary[1]
