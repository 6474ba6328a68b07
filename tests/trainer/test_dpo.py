"""DPO: preference rows, the loss against its formula, the reference without a
second copy, and training on a local Ray (full fine-tuning with stored reference
log-probabilities and a resume; LoRA on two workers with the adapter disabled)."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
import trainer_helpers as H

from kubetune_trainer import data as D
from kubetune_trainer.objectives import dpo as DPO
from kubetune_trainer.objectives import dpo as P

pytestmark = [pytest.mark.trainer, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    H.prepare_quickstart()
    return AutoTokenizer.from_pretrained(H.SMOL)


def preference_rows(n: int, messages: bool = True) -> list[dict]:
    """chosen = the real reply; rejected = the reply of another conversation."""
    chats = [r for r in H.chat_rows(400) if r["messages"][-1]["role"] == "assistant"]
    rows = []
    for k in range(n):
        chat, other = chats[k], chats[(k + n // 2 + 7) % len(chats)]
        prompt, chosen = chat["messages"][:-1], chat["messages"][-1]["content"]
        rejected = other["messages"][-1]["content"]
        if chosen == rejected:
            continue
        if messages:
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        else:
            rows.append({"prompt": prompt[-1]["content"], "chosen": chosen, "rejected": rejected})
    return rows


# ---------------------------------------------------------------------------- data


def test_text_pairs_train_on_the_answers_only(tok):
    rows = [{"prompt": "Capital of France?", "chosen": " Paris.", "rejected": " Rome."}]
    ex, report = P.build_pairs(rows, tok, 64)
    assert report.usable == 1 and len(ex) == 2
    chosen, rejected = (tok.decode([t for t in e.labels if t != D.IGNORE]) for e in ex)
    assert chosen == " Paris." + tok.eos_token and rejected == " Rome." + tok.eos_token
    prompt = tok("Capital of France?", add_special_tokens=False)["input_ids"]
    assert ex[0].input_ids[: len(prompt)] == prompt == ex[1].input_ids[: len(prompt)]


def test_message_pairs_use_the_chat_template_and_implicit_prompts(tok):
    prompt = [{"role": "user", "content": "Say hi"}]
    explicit = {"prompt": prompt, "chosen": "Hi!", "rejected": "No."}
    implicit = {
        "chosen": prompt + [{"role": "assistant", "content": "Hi!"}],
        "rejected": prompt + [{"role": "assistant", "content": "No."}],
    }
    ex, report = P.build_pairs([explicit, implicit], tok, 256)
    assert report.usable == 2
    assert ex[0].input_ids == ex[2].input_ids and ex[1].labels == ex[3].labels
    full = tok.decode(ex[0].input_ids)
    trained = tok.decode([t for t in ex[0].labels if t != D.IGNORE])
    assert "Say hi" in full and "<|im_start|>assistant" in full
    assert trained.startswith("Hi!") and "Say hi" not in trained and "user" not in trained


def test_bad_preference_rows_are_counted_with_examples(tok):
    text = "\n".join(
        [
            json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}),
            json.dumps({"prompt": "q", "chosen": "a"}),
            json.dumps({"prompt": "q", "chosen": "same", "rejected": "same"}),
            "{not json",
            json.dumps(
                {"prompt": [{"role": "wizard", "content": "q"}], "chosen": "a", "rejected": "b"}
            ),
            json.dumps({"prompt": "q", "chosen": "", "rejected": "b"}),
            json.dumps(["a list"]),
        ]
    )
    rows = D.parse_text(text, "prefs.jsonl")
    ex, report = P.build_examples(rows, "preference", tok, 64)
    assert (report.rows, report.usable, len(ex)) == (7, 1, 2)
    assert report.bad == {
        "missing 'chosen' or 'rejected'": 1,
        "'chosen' and 'rejected' are the same": 1,
        "invalid JSON (column 2: Expecting property name enclosed in double quotes)": 1,
        "unknown role 'wizard'": 1,
        "empty 'chosen' or 'rejected'": 1,
        "not an object": 1,
    }
    summary = report.summary("train")
    assert "prefs.jsonl line 2: missing 'chosen' or 'rejected'" in summary
    assert "prefs.jsonl line 4: invalid JSON" in summary
    with pytest.raises(D.DataError, match="no usable rows"):
        D.require_usable(P.build_examples(rows[1:3], "preference", tok, 64)[1], "train")


def test_a_prompt_longer_than_max_length_leaves_nothing_to_learn(tok):
    rows = [{"prompt": "word " * 100, "chosen": "yes", "rejected": "no"}]
    ex, report = P.build_pairs(rows, tok, 32)
    assert ex == [] and report.bad == {"no tokens left to learn from after truncation": 1}


def test_pairs_stay_together_packed_and_padded(tok):
    ex, _ = P.build_pairs(preference_rows(12), tok, 256)
    packed = P.sequences(ex, 256, True, 0)
    padded = P.sequences(ex, 256, False, 0)
    assert sorted(i for s in packed for i in s) == list(range(len(ex)))
    assert padded == [[2 * k, 2 * k + 1] for k in range(len(ex) // 2)]
    for s in packed:
        assert all(s[j] % 2 == 0 and s[j + 1] == s[j] + 1 for j in range(0, len(s), 2))
    batch = P.collate(ex, packed[:2], tok.pad_token_id, True)
    assert batch["input_ids"].shape[0] == 2  # one row per packed unit
    assert batch["example_ids"].tolist() == packed[0] + packed[1]
    batch = P.collate(ex, padded[:2], tok.pad_token_id, False)
    assert batch["input_ids"].shape[0] == 4  # chosen and rejected in rows of their own
    assert batch["segments"][:, 0].tolist() == [0, 1, 2, 3]


# ---------------------------------------------------------------------------- the loss


def test_loss_and_rewards_against_hand_computed_values():
    t = torch.tensor
    pi_c, pi_r, ref_c, ref_r = (
        t([-10.0, -4.0]),
        t([-12.0, -3.0]),
        t([-11.0, -4.0]),
        t([-11.0, -4.0]),
    )
    # logits = (pi_c - pi_r) - (ref_c - ref_r) = [2, -1]; beta 0.5 -> [1, -0.5]
    loss, rc, rr = DPO.dpo_loss(pi_c, pi_r, ref_c, ref_r, 0.5, "sigmoid", 0.0)
    assert loss.tolist() == pytest.approx([math.log1p(math.exp(-1.0)), math.log1p(math.exp(0.5))])
    assert rc.tolist() == pytest.approx([0.5, 0.0]) and rr.tolist() == pytest.approx([-0.5, 0.5])
    loss, _, _ = DPO.dpo_loss(pi_c, pi_r, ref_c, ref_r, 0.5, "sigmoid", 0.2)
    expect = [
        0.8 * math.log1p(math.exp(-1.0)) + 0.2 * math.log1p(math.exp(1.0)),
        0.8 * math.log1p(math.exp(0.5)) + 0.2 * math.log1p(math.exp(-0.5)),
    ]
    assert loss.tolist() == pytest.approx(expect)
    loss, _, _ = DPO.dpo_loss(pi_c, pi_r, ref_c, ref_r, 0.5, "hinge", 0.0)
    assert loss.tolist() == pytest.approx([0.0, 1.5])
    n_c, n_r = t([2.0, 4.0]), t([4.0, 1.0])
    loss, _, _ = DPO.dpo_loss(pi_c, pi_r, ref_c, ref_r, 0.5, "ipo", 0.0, n_c, n_r)
    # per token: (pi_c/n_c - pi_r/n_r) - (ref_c/n_c - ref_r/n_r) = [0.75, -1]; target 1/(2 beta)
    assert loss.tolist() == pytest.approx([0.0625, 4.0])


def _direct_logps(model, ex):
    """The textbook way: one example per forward, log-softmax, gather the labels."""
    out = []
    for e in ex:
        ids = torch.tensor([e.input_ids])
        logits = model(input_ids=ids).logits[0, :-1].float()
        target = torch.tensor(e.labels[1:])
        keep = target != D.IGNORE
        lp = torch.log_softmax(logits, -1)[keep].gather(1, target[keep][:, None]).sum()
        out.append(lp)
    return torch.stack(out)


@pytest.mark.parametrize("packing", [False, True])
def test_batched_log_probs_loss_and_gradients_equal_the_formula(tok, packing):
    from kubetune_trainer.model import LabelledHead

    model = H.small_lm(vocab_size=len(tok), attn_implementation="sdpa").float()
    head = LabelledHead(model)
    ex, _ = P.build_pairs(preference_rows(6), tok, 128)
    seqs = P.sequences(ex, 512, packing, 0)[:3]
    batch = P.collate(ex, seqs, tok.pad_token_id, packing)
    order = batch["example_ids"].tolist()
    ref = torch.randn(len(order)) - 50.0
    beta = 0.3

    logps, counts = DPO.sequence_logps(head, model, batch)
    direct = _direct_logps(model, [ex[i] for i in order])
    assert logps.tolist() == pytest.approx(direct.tolist(), rel=1e-4, abs=1e-3)
    assert counts.tolist() == [sum(x != D.IGNORE for x in ex[i].labels[1:]) for i in order]

    loss, _, _ = DPO.dpo_loss(logps[0::2], logps[1::2], ref[0::2], ref[1::2], beta, "sigmoid", 0.0)
    loss.mean().backward()
    ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    direct = _direct_logps(model, [ex[i] for i in order])
    logits = beta * ((direct[0::2] - direct[1::2]) - (ref[0::2] - ref[1::2]))
    (-F.logsigmoid(logits)).mean().backward()
    for a, p in zip(ours, model.parameters(), strict=True):
        assert torch.allclose(a, p.grad, rtol=1e-3, atol=1e-5)


def test_adapter_disabled_scores_like_a_frozen_copy_of_the_base(tok):
    from peft import LoraConfig, get_peft_model

    from kubetune_trainer.model import LabelledHead

    base = H.small_lm(vocab_size=len(tok)).float()
    frozen = copy.deepcopy(base)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # an adapter that has learned something
    ex, _ = P.build_pairs(preference_rows(4), tok, 128)
    batch = P.collate(ex, P.sequences(ex, 512, True, 0), tok.pad_token_id, True)
    head = LabelledHead(model)
    with torch.no_grad(), model.disable_adapter():
        ref, _ = DPO.sequence_logps(head, model, batch)
        policy_off = ref.clone()
    with torch.no_grad():
        policy, _ = DPO.sequence_logps(head, model, batch)
        copy_ref, _ = DPO.sequence_logps(LabelledHead(frozen), frozen, batch)
    assert torch.allclose(ref, copy_ref, atol=1e-4)
    assert not torch.allclose(policy, policy_off, atol=1e-2)  # the adapter does change it


# ---------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-dpo")
    model = H.tiny_model(root / "model")
    data = H.write_jsonl(root / "prefs.jsonl", preference_rows(40))
    return model, data


def _dpo_job(model, data, out, **overrides):
    return H.job(
        model,
        data,
        out.as_uri(),
        dataset={"format": "preference", "validationSplit": 0.2, "maxSeqLength": 128},
        **overrides,
    )


def test_full_dpo_zero3_two_workers_learns_stores_the_reference_and_resumes_on_it(
    ray_local, tiny, tmp_path
):
    model, data = tiny
    cfg = H.trainer_config(
        _dpo_job(
            model,
            data,
            tmp_path,
            method={"type": "full", "objective": "dpo", "dpo": {"beta": 0.5}},
            hyperparameters={"maxSteps": 8, "learningRate": 2e-3, "batchSize": 2},
            resources={"workers": 2},
            distributed={"zeroStage": 3},
            evaluation={"everySteps": 4},
            checkpointing={"everySteps": 4, "keepLast": 3},
        )
    )
    H.fit(cfg)
    rows = H.metric_rows(cfg)
    ref_path = H.local(cfg, DPO.REFERENCE)
    with open(ref_path) as f:
        stored = json.load(f)
    assert len(stored["logps"]["train"]) == 2 * 32 and len(stored["logps"]["validation"]) == 16
    assert all(v < 0 for v in stored["logps"]["train"])
    assert rows[0]["evalRewardAccuracy"] == 0.0  # policy == reference before training
    assert rows[0]["evalRewardMargin"] == pytest.approx(0.0, abs=1e-5)
    for step in range(1, 9):
        for key in ("loss", "rewardsChosen", "rewardsRejected", "rewardAccuracy", "rewardMargin"):
            assert isinstance(rows[step][key], float), (step, key)
    # it learns: later steps prefer the chosen answers by a wider margin, held-out too
    first = sum(rows[s]["rewardMargin"] for s in (1, 2)) / 2
    last = sum(rows[s]["rewardMargin"] for s in (7, 8)) / 2
    assert last > first + 0.1, (first, last)
    assert rows[7]["rewardAccuracy"] + rows[8]["rewardAccuracy"] >= 1.0
    margins = [rows[s]["evalRewardMargin"] for s in (0, 4, 8)]
    assert margins == sorted(margins) and margins[2] > margins[0] + 0.1, margins
    assert rows[8]["evalLoss"] < rows[0]["evalLoss"] == pytest.approx(math.log(2), abs=1e-4)

    # lose the last checkpoint: the next attempt resumes at step 4 on the stored reference
    mtime = os.stat(ref_path).st_mtime_ns
    shutil.rmtree(H.local(cfg, "checkpoints", "step-00000008"))
    os.remove(H.local(cfg, "outputs.json"))
    H.fit(cfg)
    again = H.metric_rows(cfg)
    assert os.stat(ref_path).st_mtime_ns == mtime, "the reference was computed again"
    assert again[5].get("resumedFrom") == 4
    for step in (5, 6, 7, 8):
        assert again[step]["loss"] == pytest.approx(rows[step]["loss"], rel=1e-4), step
        assert again[step]["rewardMargin"] == pytest.approx(rows[step]["rewardMargin"], rel=1e-3)


def test_lora_dpo_two_workers_zero2_with_test_split_and_generation(ray_local, tiny, tmp_path):
    from kubetune_trainer import evalgen as G
    from kubetune_trainer import local
    from kubetune_trainer.storage import JobStorage

    model, data = tiny
    test = H.write_jsonl(tmp_path / "test.jsonl", preference_rows(48)[40:])
    j = _dpo_job(
        model,
        data,
        tmp_path,
        method={"type": "lora", "objective": "dpo", "lora": {"r": 4, "alpha": 8}},
        hyperparameters={"maxSteps": 4, "learningRate": 5e-3, "batchSize": 2},
        resources={"workers": 2},
        distributed={"zeroStage": 2},
        evaluation={"everySteps": 4, "generation": {"examples": 3, "maxNewTokens": 6}},
        checkpointing={"everySteps": 4},
    )
    j["spec"]["dataset"]["test"] = {"uri": str(test)}
    cfg = H.trainer_config(j)
    H.fit(cfg)
    rows = H.metric_rows(cfg)
    assert not os.path.exists(H.local(cfg, DPO.REFERENCE))  # the adapter-less model is it
    assert rows[0]["evalRewardMargin"] == pytest.approx(0.0, abs=1e-4)
    assert rows[4]["evalRewardMargin"] != rows[0]["evalRewardMargin"]
    assert all(0.0 <= rows[s]["rewardAccuracy"] <= 1.0 for s in range(1, 5))

    with open(H.local(cfg, "outputs.json")) as f:
        out = json.load(f)
    assert set(out["testMetrics"]) == {
        "test_loss",
        "test_rewards_chosen",
        "test_rewards_rejected",
        "test_reward_accuracy",
        "test_reward_margin",
    }
    gen = out["generation"]
    assert gen["examples"] == {"validation": 3, "test": 3}
    with open(H.local(cfg, "samples.jsonl")) as f:
        samples = [json.loads(line) for line in f]
    assert len(samples) == 6 and {s["split"] for s in samples} == {"validation", "test"}
    # "before" is what the base model says, "after" what base + the saved adapter say
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    settings = cfg.spec.evaluation.generation
    prompts = [s["prompt"] for s in samples]
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    assert [s["before"] for s in samples] == G.generate(base, tok, prompts, settings)
    tuned = PeftModel.from_pretrained(base, H.local(cfg, "adapter"))
    assert [s["after"] for s in samples] == G.generate(tuned, tok, prompts, settings)
    for split in ("validation", "test"):
        refs = [s["reference"] for s in samples if s["split"] == split]
        per = {}
        for when in ("before", "after"):
            answers = [s[when] for s in samples if s["split"] == split]
            assert gen[f"{split}_{when}"] == G.score(answers, refs)
            per[when] = [s[f"chrf1_{when}"] for s in samples if s["split"] == split]
            assert per[when] == G.chrf1(answers, refs)
        versus = gen[f"{split}_after_vs_before"]
        assert versus == G.after_vs_before(per["before"], per["after"], "chrf1")
        assert versus["wins"] + versus["ties"] + versus["losses"] == 3
    text = local.summary(JobStorage(cfg.storage_prefix))
    assert "answers to 3 validation prompts" in text and "rouge_l" in text
    assert "length_ratio" in text and "answers are closer to their reference (by chrF1)" in text
    assert text.count("reference: ") == 3
    # local files print as plain paths, like every other line of the summary
    assert f"samples:      {H.local(cfg, 'samples.jsonl')}" in text and "file://" not in text


# ---------------------------------------------------------------------------- generation


def test_generation_scores_against_hand_computed_values():
    from kubetune_trainer import evalgen as G

    same = G.score(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert same == {
        "exact_match": 1.0,
        "rouge_l": 1.0,
        "bleu": pytest.approx(100.0),
        "brevity_penalty": 1.0,
        "chrf": pytest.approx(100.0),
        "chrf1": pytest.approx(100.0),
        "length_ratio": 1.0,
    }
    part = G.score(["the cat sat", "dog"], ["the cat sat on the mat", "dog"])
    # LCS 3 of 3 and of 6 words: F1 = 2 * 1 * 0.5 / 1.5; the second pair is exact
    assert part["exact_match"] == 0.5
    assert part["rouge_l"] == pytest.approx((2 / 3 + 1.0) / 2)
    assert G.score(["zzz"], ["the cat"])["bleu"] == 0.0
    # corpus BLEU has no 4-gram in three words: sacrebleu scores it 0, not 100
    assert G.score(["the cat sat"], ["the cat sat"])["bleu"] == 0.0


def test_generation_picks_the_same_prompts_with_their_references():
    from kubetune_trainer import evalgen as G

    rows = H.chat_rows(30) + [{"messages": [{"role": "user", "content": "no answer"}]}]
    a, b = G.pick(rows, "chat", 5, 3), G.pick(rows, "chat", 5, 3)
    assert a == b and len(a) == 5 and G.pick(rows, "chat", 5, 4) != a
    for prompt, ref in a:
        assert prompt[-1]["role"] == "user" and ref.strip()
        assert any(r["messages"][: len(prompt) + 1][-1]["content"] == ref for r in rows[:30])
    pairs = G.pick(preference_rows(6, messages=False), "preference", 2, 0)
    assert all(isinstance(p, str) and r for p, r in pairs)


def test_kubetune_run_console_shows_rewards():
    from kubetune_trainer.local import Watcher

    row = {
        "step": 4,
        "loss": 0.52,
        "reward_accuracy": 0.75,
        "reward_margin": 0.61,
        "eval_loss": 0.49,
        "eval_reward_accuracy": 0.625,
    }
    line = Watcher._row_line(row, 8, None)
    assert "loss 0.5200" in line and "reward acc 0.75" in line and "margin 0.610" in line
    assert "eval 0.4900" in line and "eval reward acc 0.62" in line
