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
