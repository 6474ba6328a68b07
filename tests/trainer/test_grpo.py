"""GRPO: prompt rows, the advantages and the loss against hand-computed values,
and training on a local Ray where the held-out reward must rise."""

from __future__ import annotations

import json
import math

import pytest
import torch
import trainer_helpers as H

from kubetune_trainer import data as D
from kubetune_trainer.objectives import grpo as G

pytestmark = [pytest.mark.trainer, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    H.prepare_quickstart()
    return AutoTokenizer.from_pretrained(H.SMOL)


# ---------------------------------------------------------------------------- data


def test_prompt_rows_text_and_messages_keep_the_row_for_the_graders(tok):
    text = "\n".join(
        [
            json.dumps({"prompt": "2 + 2 =", "answer": "4"}),
            json.dumps({"messages": [{"role": "user", "content": "Say hi"}], "answer": "hi"}),
            json.dumps({"prompt": [{"role": "user", "content": "Bye"}], "answer": "bye"}),
            json.dumps({"prompt": ""}),
            json.dumps({"question": "no prompt"}),
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": "q"},
                        {"role": "assistant", "content": "a"},
                    ]
                }
            ),
            "{not json",
        ]
    )
    rows = D.parse_text(text, "prompts.jsonl")
    ex, report = G.build_prompts(rows, tok, 64)
    assert (report.rows, report.usable, len(ex)) == (7, 3, 3)
    assert report.bad == {
        "empty 'prompt'": 1,
        "missing 'prompt' (text) or 'messages'": 1,
        "the prompt ends with an assistant turn: end it with the user's turn": 1,
        "invalid JSON (column 2: Expecting property name enclosed in double quotes)": 1,
    }
    assert ex[0].input_ids == tok("2 + 2 =", add_special_tokens=False)["input_ids"]
    assert all(x == D.IGNORE for e in ex for x in e.labels)  # nothing learned from a prompt
    assert [e.item["answer"] for e in ex] == ["4", "hi", "bye"]
    chat = tok.decode(ex[1].input_ids)
    assert "Say hi" in chat and chat.rstrip().endswith("assistant")  # the generation prompt
    # a prompt longer than maxSeqLength - maxNewTokens keeps its end, counted
    long_ex, long_report = G.build_prompts([{"prompt": "word " * 50 + "end"}], tok, 8)
    assert long_report.truncated == 1 and len(long_ex[0].input_ids) == 8
    assert tok.decode(long_ex[0].input_ids).endswith("end")


def test_rows_without_a_field_the_grader_names_are_counted(tok):
    rows = [{"prompt": "a", "answer": "x"}, {"prompt": "b"}]
    ex, report = G.build_prompts(rows, tok, 64, fields={"answer"})
    assert len(ex) == 1
    assert report.bad == {"missing 'answer', which the grader reads as {{item.answer}}": 1}


# ---------------------------------------------------------------------------- the maths


def test_advantages_grpo_and_dr_grpo_against_hand_computed_values():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv, flat = G.advantages(r, 4, scale=True)
    std = math.sqrt(4 * 0.25 / 3)  # Bessel-corrected, as torch.std
    half = 0.5 / (std + G.STD_EPS)
    assert adv.tolist() == pytest.approx([half, -half, -half, half, 0, 0, 0, 0])
    assert flat.tolist() == [False, True]
    adv, flat = G.advantages(r, 4, scale=False)  # Dr. GRPO: no division by the std
    assert adv.tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    assert flat.tolist() == [False, True]


def test_k3_is_the_kl_estimator_and_never_negative():
    logp, ref = torch.tensor([-2.0, -1.0, -1.0]), torch.tensor([-1.0, -1.0, -3.0])
    assert G.k3(logp, ref).tolist() == pytest.approx([math.e - 2, 0.0, math.exp(-2) + 1])
    assert (G.k3(torch.randn(100), torch.randn(100)) >= 0).all()


def _loss(loss_type, beta=0.0, ref=None, **kw):
    # completion 0: tokens 0 and 1 (advantage +1); completion 1: tokens 2 and 3 (-1)
    logp = torch.tensor([-1.0, -2.0, -0.5, -1.0], requires_grad=True)
    old = torch.tensor([-1.5, -2.0, -0.5, -0.5])
    seq = torch.tensor([0, 0, 1, 1])
    adv = torch.tensor([1.0, -1.0])
    loss, kl, clipped = G.policy_loss(
        logp,
        old,
        ref,
        adv,
        seq,
        2,
        epsilon=0.2,
        beta=beta,
        loss_type=loss_type,
        max_new_tokens=kw.get("max_new_tokens", 4),
    )
    return logp, loss, kl, clipped


def test_clipped_loss_per_variant_against_hand_computed_values():
    # token 0: ratio e^0.5 > 1.2, advantage +1 -> clipped at 1.2: -1.2, no gradient
    # token 1: ratio 1: -1;  token 2: ratio 1, advantage -1: +1
    # token 3: ratio e^-0.5 < 0.8, advantage -1 -> min(-0.607, -0.8) = -0.8: +0.8, no gradient
    per_token = [-1.2, -1.0, 1.0, 0.8]
    logp, loss, kl, clipped = _loss("grpo")
    assert clipped.tolist() == [True, False, False, True]
    # grpo: each completion's mean, then the mean over completions
    assert loss.item() == pytest.approx(((-1.2 - 1.0) / 2 + (1.0 + 0.8) / 2) / 2)
    loss.backward()
    # d/dlogp of -ratio*A/|i| at ratio 1 is -A/2; the clipped tokens get none
    assert logp.grad.tolist() == pytest.approx([0.0, -0.25, 0.25, 0.0])
    logp, loss, _, _ = _loss("drGrpo", max_new_tokens=4)
    # Dr. GRPO: the sum over every token, divided by completions x maxNewTokens
    assert loss.item() == pytest.approx(sum(per_token) / (2 * 4))
    loss.backward()
    assert logp.grad.tolist() == pytest.approx([0.0, -1 / 8, 1 / 8, 0.0])
    assert kl.tolist() == [0.0] * 4


def test_kl_term_adds_beta_times_k3_per_token():
    ref = torch.tensor([-2.0, -2.0, -0.5, -1.0])
    _, plain, _, _ = _loss("grpo")
    logp, loss, kl, _ = _loss("grpo", beta=0.1, ref=ref)
    k = [math.exp(-1) + 1 - 1, 0.0, 0.0, 0.0]  # d = ref - logp = [-1, 0, 0, 0]
    assert kl.tolist() == pytest.approx(k)
    assert loss.item() == pytest.approx(plain.item() + 0.1 * (k[0] / 2) / 2)


def test_completion_mask_stops_after_the_first_eos():
    comp = torch.tensor([[5, 6, 2, 7], [5, 5, 5, 5], [2, 9, 9, 9]])
    assert G.completion_mask(comp, 2).tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_rollout_log_probs_equal_one_prompt_at_a_time(tok):
    """Left-padded prompts with right-padded completions score each completion's
    tokens as the model does on that prompt and completion alone."""
    from kubetune_trainer.model import LabelledHead

    model = H.small_lm(vocab_size=len(tok), attn_implementation="sdpa").float()
    prompts = [[5, 6, 7], [8, 9]]
    comps = torch.tensor([[11, 12, 2], [13, 2, 0]])
    mask = G.completion_mask(comps, 2)
    p_ids, p_mask = G.left_pad(prompts, 0)
    batch = G.rollout_batch(p_ids, p_mask, comps, mask)
    logps, rows = G.token_logps(LabelledHead(model), model, batch, temperature=0.7)
    assert rows.tolist() == [0, 0, 0, 1, 1]
    direct = []
    for p, c, m in zip(prompts, comps.tolist(), mask.tolist(), strict=True):
        c = [t for t, k in zip(c, m, strict=True) if k]
        ids = torch.tensor([p + c])
        lp = torch.log_softmax(model(input_ids=ids).logits[0, len(p) - 1 : -1] / 0.7, -1)
        direct += lp.gather(1, torch.tensor(c)[:, None])[:, 0].tolist()
    assert logps.tolist() == pytest.approx(direct, abs=1e-4)


def test_data_check_names_a_template_field_the_rows_lack(tmp_path):
    """kubetune run's preflight (and kubetune validate): {{item.answer}} against rows
    without `answer` is an error naming the grader and the fix; some rows without it
    are a warning."""
    from kubetune_trainer import preflight as P

    grader = {
        "type": "stringCheck",
        "name": "exact",
        "reference": "{{item.answer}}",
        "operation": "eq",
    }
    spec = {
        "dataset": {"format": "prompt"},
        "method": {"objective": "grpo", "grpo": {"grader": grader}},
    }
    report = P.Report()
    usable = [("p.jsonl line 1", {"prompt": "q", "item": {"prompt": "q", "solution": "4"}})]
    P.check_grader_fields(spec, "train", usable, report)
    [err] = report.errors
    assert err.path == "spec.method.grpo.grader"
    assert "reads {{item.answer}}, but no row of train has the field 'answer'" in err.message
    assert "add 'answer' to the rows" in err.hint
    report = P.Report()
    usable.append(("p.jsonl line 2", {"prompt": "q", "item": {"prompt": "q", "answer": "4"}}))
    P.check_grader_fields(spec, "train", usable, report)
    assert not report.errors
    assert report.warnings == [
        "train: 1 of 2 rows lack 'answer', which the grader reads as {{item.answer}}; they are "
        "left out: p.jsonl line 1"
    ]


def test_mlflow_gets_every_number_of_a_row_and_one_metric_per_grader():
    from kubetune_trainer.tracking import metric_values

    row = {
        "step": 3,
        "epoch": 0.5,
        "loss": 0.0,
        "reward": 0.5,
        "rewards_per_grader": {"share": 0.25, "has-a": 1.0},
        "grader_errors": {"raises": 32},
        "eval_rewards_per_grader": {"share": 0.1},
        "time": "2026-01-01T00:00:00Z",
        "attempt": 1,
    }
    assert dict(metric_values(row)) == {
        "train_loss": 0.0,
        "reward": 0.5,
        "reward/share": 0.25,
        "reward/has-a": 1.0,
        "grader_errors/raises": 32.0,
        "eval_reward/share": 0.1,
    }


# ---------------------------------------------------------------------------- training

SHARE = """
def grade(sample, item):
    text = sample["output_text"]
    return sum(c == item["letter"] for c in text) / max(len(text), 1)
"""
HANGS = """
import time
def grade(sample, item):
    if item.get("slow"):
        time.sleep(600)
    return 1.0
"""
RAISES = """
def grade(sample, item):
    raise ValueError("this grader always fails")
"""
ALLOCATES = """
def grade(sample, item):
    hog = []
    while item.get("hog"):
        hog.append(bytearray(16 * 1024 * 1024))
    return 1.0
"""
STEPS, PROMPTS, GENERATIONS = 8, 4, 8  # the fit: steps, prompts per step, completions each
SAMPLES = PROMPTS * GENERATIONS  # graded per step


def prompt_rows(n: int) -> list[dict]:
    """Short text prompts (the user turns of the chat data); the reference fields the
    graders read: the letter the answer should be made of, and, on one row in eight
    each, `slow` (the hanging grader hangs there) and `hog` (the allocating grader
    allocates without bound there)."""
    turns = [m["content"] for r in H.chat_rows(400) for m in r["messages"] if m["role"] == "user"]
    return [
        {"prompt": turns[k], "letter": "a", "slow": k % 8 == 0, "hog": k % 8 == 1} for k in range(n)
    ]


def grpo_grader() -> dict:
    """A multi grader: the share of the answer's characters that are "a" (python) and
    whether the answer holds an "a" (stringCheck like), which both rise when the
    model learns to answer "aaaaaa"; and three graders of weight 0 that hang, raise
    and allocate without bound, with short limits so that failing costs little."""
    py = {"type": "python", "timeoutSeconds": 0.3, "memoryMiB": 96}
    return {
        "type": "multi",
        "name": "all",
        "graders": {
            "share": {"type": "python", "name": "share", "source": SHARE},
            "has-a": {
                "type": "stringCheck",
                "name": "has-a",
                "input": "{{sample.output_text}}",
                "reference": "{{item.letter}}",
                "operation": "like",
            },
            "hangs": {**py, "name": "hangs", "source": HANGS},
            "raises": {**py, "name": "raises", "source": RAISES},
            "allocates": {**py, "name": "allocates", "source": ALLOCATES},
        },
        "weights": {"share": 1.0, "has-a": 0.5, "hangs": 0.0, "raises": 0.0, "allocates": 0.0},
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-grpo")
    return H.peaked_model(root / "model"), H.write_jsonl(root / "prompts.jsonl", prompt_rows(48))


def test_grpo_multi_grader_reward_rises_and_failing_graders_are_counted(ray_local, tiny, tmp_path):
    """LoRA on the tiny model whose sampling starts spread over 16 letters
    (model_fixtures.peaked_model), with a multi grader and a KL term against the
    reference (the adapter switched off). The training reward and the held-out
    (greedy) reward before -> after, overall and per grader, must rise clearly; the
    KL is logged and non-zero once the policy has moved; the graders that hang,
    raise and allocate without bound cost nothing to the total (weight 0), the job
    finishes, and each failure is counted in the metrics rows."""
    model, data = tiny
    j = H.job(
        model,
        data,
        tmp_path.as_uri(),
        dataset={"format": "prompt", "validationSplit": 0.25, "maxSeqLength": 64},
        method={
            "type": "lora",
            "objective": "grpo",
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
            "grpo": {
                "generationsPerPrompt": GENERATIONS,
                "maxNewTokens": 6,
                "beta": 0.04,
                "grader": grpo_grader(),
            },
        },
        hyperparameters={"maxSteps": STEPS, "learningRate": 1e-2, "batchSize": PROMPTS},
        evaluation={"everySteps": STEPS // 2, "generation": {"examples": 4, "maxNewTokens": 8}},
        checkpointing={"everySteps": STEPS},
    )
    cfg = H.trainer_config(j)
    H.fit(cfg)
    rows = H.metric_rows(cfg)
    first, mid, last = rows[0], rows[STEPS // 2], rows[STEPS]
    print("held-out reward", first["evalRewardsPerGrader"], last["evalRewardsPerGrader"])
    print("held-out total", first["evalReward"], mid["evalReward"], last["evalReward"])
    print("training reward", [rows[s]["reward"] for s in range(1, STEPS + 1)])
    print("kl", [rows[s]["kl"] for s in range(1, STEPS + 1)])
    assert last["evalReward"] >= first["evalReward"] + 0.3
    assert last["evalLoss"] == -last["evalReward"]
    for name in ("share", "has-a"):
        assert last["evalRewardsPerGrader"][name] > first["evalRewardsPerGrader"][name], name
    assert rows[STEPS]["reward"] >= rows[1]["reward"] + 0.3  # the rollouts' reward too
    assert rows[1]["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy starts at the reference
    assert all(rows[s]["kl"] > 1e-4 for s in range(2, STEPS + 1))
    for step in range(1, STEPS + 1):
        r = rows[step]
        for key in ("reward", "rewardStd", "kl", "completionLength", "fracRewardZeroStd"):
            assert isinstance(r[key], float), (step, key)
        assert set(r["rewardsPerGrader"]) == {"share", "has-a", "hangs", "raises", "allocates"}
        assert r["graderErrors"]["raises"] == SAMPLES  # every sample
    # the allocating grader runs out of memory (an error) or, on a loaded machine, out
    # of time, on its `hog` rows; the hanging one times out on its `slow` rows
    hogs = [rows[s]["graderErrors"]["allocates"] for s in range(1, STEPS + 1)]
    hog_timeouts = [rows[s]["graderTimeouts"]["allocates"] for s in range(1, STEPS + 1)]
    assert sum(hogs) > 0, "the allocating grader's hog rows run out of memory"
    timeouts = sum(rows[s]["graderTimeouts"]["hangs"] for s in range(1, STEPS + 1))
    assert timeouts > 0, "the hanging grader's slow rows time out"
    for s in range(1, STEPS + 1):  # a failed sample scores 0; the others 1
        r = rows[s]
        assert (r["rewardsPerGrader"]["hangs"] < 1) == (r["graderTimeouts"]["hangs"] > 0)
        failed = hogs[s - 1] + hog_timeouts[s - 1]
        assert r["rewardsPerGrader"]["allocates"] == pytest.approx(1 - failed / SAMPLES)
    # samples.jsonl: the same prompts answered before and after, with their rewards
    with open(H.local(cfg, "samples.jsonl")) as f:
        samples = [json.loads(line) for line in f]
    assert len(samples) == 4
    for s in samples:
        assert set(s["rewards_before"]) == {
            "total",
            "share",
            "has-a",
            "hangs",
            "raises",
            "allocates",
        }
        assert s["reference"]["letter"] == "a"
    with open(H.local(cfg, "outputs.json")) as f:
        gen = json.load(f)["generation"]
    assert gen["validation_before"]["reward"] == pytest.approx(
        sum(s["rewards_before"]["total"] for s in samples) / 4
    )
    # per prompt, the fine-tuned answer's reward against the base model's
    totals = {w: [s[f"rewards_{w}"]["total"] for s in samples] for w in ("before", "after")}
    pairs = list(zip(totals["before"], totals["after"], strict=True))
    assert gen["validation_after_vs_before"] == {
        "by": "reward",
        "wins": sum(a > b for b, a in pairs),
        "ties": sum(a == b for b, a in pairs),
        "losses": sum(a < b for b, a in pairs),
    }
