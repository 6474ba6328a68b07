"""KTO: feedback rows (a thumbs up or down on one answer), the loss against hand-computed
values, the held-out ranking, and a LoRA fit on a local Ray that learns from the ratings."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
import trainer_helpers as H

from kubetune_trainer import data as D
from kubetune_trainer.objectives import kto as K

pytestmark = [pytest.mark.trainer, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    H.prepare_quickstart()
    return AutoTokenizer.from_pretrained(H.SMOL)


def feedback_rows(first: int, n: int) -> list[dict]:
    """Two rows per chat exchange k in [first, first + n): its real reply with a thumbs
    up, and the reply of another exchange (from further down the corpus, never one of
    the rated prompts' own) with a thumbs down, for the same prompt."""
    chats = [r for r in H.chat_rows(400) if r["messages"][-1]["role"] == "assistant"]
    rows = []
    for k in range(first, first + n):
        chat, other = chats[k], chats[len(chats) - 1 - k]
        prompt = chat["messages"][:-1]
        good, bad = chat["messages"][-1]["content"], other["messages"][-1]["content"]
        if good == bad:
            continue
        rows.append({"prompt": prompt, "completion": good, "label": True})
        rows.append({"prompt": prompt, "completion": bad, "label": False})
    return rows


# ---------------------------------------------------------------------------- loss


def test_kto_loss_matches_hand_computed_values():
    beta, w_up, w_down = 0.5, 1.0, 2.0
    pi = torch.tensor([-10.0, -12.0, -9.0])
    ref = torch.tensor([-11.0, -11.0, -9.0])  # logratios 1, -1, 0
    kl_pi = torch.tensor([-20.0, -21.0, -19.0])
    kl_ref = torch.tensor([-20.6, -21.0, -19.3])  # mean 0.3 (0.6, 0, 0.3)
    up = torch.tensor([True, False, False])
    losses, rewards, z = K.kto_loss(pi, ref, kl_pi, kl_ref, up, beta, w_up, w_down)

    def sig(x):
        return 1 / (1 + math.exp(-x))

    assert z.item() == pytest.approx(0.3, abs=1e-6)
    expected = [
        w_up * (1 - sig(0.5 * (1 - 0.3))),  # thumbs up, logratio 1
        w_down * (1 - sig(0.5 * (0.3 + 1))),  # thumbs down, logratio -1
        w_down * (1 - sig(0.5 * 0.3)),  # thumbs down, logratio 0
    ]
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert rewards.tolist() == pytest.approx([0.5, -0.5, 0.0])

    # a negative KL estimate is clamped at 0, and no gradient flows through it
    kl_pi2 = torch.tensor([-20.0, -21.0, -19.0], requires_grad=True)
    pi2 = pi.clone().requires_grad_(True)
    losses, _, z = K.kto_loss(pi2, ref, kl_pi2, kl_pi2.detach() + 1, up, beta, w_up, w_down)
    assert z.item() == 0.0
    losses.sum().backward()
    assert kl_pi2.grad is None and pi2.grad is not None
    # policy == reference, z = 0: every answer costs half its weight
    same, _, _ = K.kto_loss(ref, ref, kl_ref, kl_ref, up, beta, w_up, w_down)
    assert same.tolist() == pytest.approx([0.5 * w_up, 0.5 * w_down, 0.5 * w_down])


def test_ranking_accuracy_counts_up_down_pairs_of_the_same_prompt():
    ex = [
        K.Rated([1], [1], desirable=True, group=0),
        K.Rated([1], [1], desirable=False, group=0),
        K.Rated([1], [1], desirable=False, group=0),
        K.Rated([1], [1], desirable=True, group=1),
        K.Rated([1], [1], desirable=False, group=1),
        K.Rated([1], [1], desirable=True, group=2),  # no thumbs down: no pair
    ]
    # prompt 0: up -1.0 beats -2.0, loses to -0.5; prompt 1: up -3.0 loses to -1.0
    scores = {0: -1.0, 1: -2.0, 2: -0.5, 3: -3.0, 4: -1.0, 5: -9.0}
    assert K.ranking_accuracy(scores, ex) == pytest.approx(1 / 3)
    # a tie counts half: before training every reward is 0, and the share is 0.5
    assert K.ranking_accuracy(dict.fromkeys(range(6), 0.0), ex) == 0.5
    assert K.ranking_accuracy({0: -1.0, 5: -1.0}, ex) is None


# ---------------------------------------------------------------------------- data


def test_feedback_rows_become_rated_and_mismatched_examples(tok):
    rows = [
        {"prompt": "Capital of France?", "completion": " Paris.", "label": True},
        {"prompt": "Capital of France?", "completion": " Rome.", "label": False},
        {"prompt": "Two plus two?", "completion": " Four.", "label": True},
        {"prompt": "x", "completion": " y", "label": "yes"},
        {"prompt": "x", "label": True},
    ]
    ex, report = K.build_rated(rows, tok, 64)
    assert report.usable == 3 and len(ex) == 6
    assert dict(report.bad) == {
        "'label' must be true (thumbs up) or false (thumbs down)": 1,
        "'completion' must be non-empty text or a message list": 1,
    }
    answers = [tok.decode([t for t in e.labels if t != D.IGNORE]) for e in ex]
    eos = tok.eos_token
    # rated at 2k; at 2k + 1 the next answer to another prompt (the two France rows share one)
    assert answers == [f" Paris.{eos}", f" Four.{eos}", f" Rome.{eos}", f" Four.{eos}"] + [
        f" Four.{eos}",
        f" Paris.{eos}",
    ]
    assert [e.desirable for e in ex[0::2]] == [True, False, True]
    assert [e.group for e in ex[0::2]] == [0, 0, 1]
    prompt = tok("Two plus two?", add_special_tokens=False)["input_ids"]
    assert ex[5].input_ids[: len(prompt)] == prompt

    # messages, a text answer and numpy's bool (Parquet) are read too
    import numpy as np

    chat = [{"role": "user", "content": "Say hi"}]
    more = [
        {"prompt": chat, "completion": "Hi!", "label": np.bool_(True)},
        {"prompt": chat, "completion": [{"role": "assistant", "content": "No."}], "label": False},
    ]
    ex, report = K.build_rated(more, tok, 256)
    assert report.usable == 2
    assert "<|im_start|>assistant" in tok.decode(ex[0].input_ids)
    assert tok.decode([t for t in ex[0].labels if t != D.IGNORE]).startswith("Hi!")
    norm, why = D.normalize(more[1], "feedback")
    assert why is None and norm["label"] is False and norm["completion"][-1]["content"] == "No."


def test_generation_references_are_thumbs_up_answers_only():
    from kubetune_trainer import evalgen as G

    rows = feedback_rows(0, 6)
    picked = G.pick(rows, "feedback", 20, 0)
    good = {r["completion"] for r in rows if r["label"]}
    assert len(picked) == 6 and all(ref in good for _p, ref in picked)


def test_kubetune_run_console_shows_kto_metrics():
    from kubetune_trainer.local import Watcher

    row = {
        "step": 4,
        "loss": 0.41,
        "kl": 0.125,
        "rewards_desirable": 0.2,
        "rewards_undesirable": -0.3,
        "eval_loss": 0.45,
        "eval_ranking_accuracy": 0.75,
    }
    line = Watcher._row_line(row, 8, None)
    assert "kl 0.125" in line and "reward up 0.200" in line and "reward down -0.300" in line
    assert "eval 0.4500" in line and "eval ranked 0.75" in line


# ---------------------------------------------------------------------------- training


def test_lora_kto_on_feedback_rows_learns_to_rank_thumbs_up_higher(ray_local, tmp_path):
    from kubetune_trainer.__main__ import run

    model = H.tiny_model(tmp_path / "model")
    train = H.write_jsonl(tmp_path / "feedback.jsonl", feedback_rows(0, 40))
    held = H.write_jsonl(tmp_path / "held.jsonl", feedback_rows(40, 12))
    j = H.job(
        model,
        train,
        tmp_path.joinpath("out").as_uri(),
        dataset={"format": "feedback", "maxSeqLength": 128, "validation": {"uri": str(held)}},
        method={
            "type": "lora",
            "objective": "kto",
            "kto": {"beta": 0.5},
            "lora": {"r": 8, "alpha": 16},
        },
        hyperparameters={"maxSteps": 18, "learningRate": 1e-2, "batchSize": 4},
        evaluation={"everySteps": 9, "maxBatches": 50},
        checkpointing={"everySteps": 18},
    )
    cfg = H.trainer_config(j)
    t0 = time.monotonic()
    assert run(cfg, quiet=True) == 0, H.local(cfg, "progress.json")
    with open(H.local(cfg, "metrics.jsonl")) as f:
        rows = {r["step"]: r for r in map(json.loads, f)}
    print(f"kto fit: {time.monotonic() - t0:.1f}s")
    for s in (0, 9, 18):
        print(
            f"step {s}: eval_loss {rows[s]['evalLoss']:.4f} ranked "
            f"{rows[s]['evalRankingAccuracy']:.3f} kl {rows[s]['evalKl']:.4f} rewards up "
            f"{rows[s]['evalRewardsDesirable']:.3f} down {rows[s]['evalRewardsUndesirable']:.3f}"
        )
    # before training the policy is the reference: every answer costs 1 - sigmoid(0)
    assert rows[0]["evalLoss"] == pytest.approx(0.5, abs=1e-4)
    assert rows[0]["evalRewardsDesirable"] == pytest.approx(0.0, abs=1e-4)
    assert rows[0]["evalRankingAccuracy"] == 0.5  # every reward 0: all ties
    for step in range(1, 19):  # a row's rewards: of the rated answers its batches held
        assert isinstance(rows[step]["loss"], float) and rows[step]["kl"] >= 0, step
        assert "rewardsDesirable" in rows[step] or "rewardsUndesirable" in rows[step], step
    # it learns from the ratings: on held-out prompts the loss falls, and the real reply
    # is ranked above the other exchange's in more pairs than before
    assert rows[18]["evalLoss"] < rows[0]["evalLoss"] - 0.02
    assert rows[18]["evalRankingAccuracy"] >= rows[0]["evalRankingAccuracy"] + 0.1
    assert rows[18]["evalRewardsDesirable"] > rows[18]["evalRewardsUndesirable"]
