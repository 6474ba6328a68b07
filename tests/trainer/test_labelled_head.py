"""The LM head run only at labelled positions gives the model's own loss and
gradients (no Ray, fast)."""

from __future__ import annotations

import pytest
import torch
import trainer_helpers as H

from kubetune_trainer import data as D
from kubetune_trainer import model as M

pytestmark = pytest.mark.trainer


def _examples():
    g = torch.Generator().manual_seed(1)
    out = []
    for n in (9, 17, 5, 12):
        ids = torch.randint(3, 120, (n,), generator=g).tolist()
        labels = [D.IGNORE] * (n // 2) + ids[n // 2 :]  # a prompt half without loss
        out.append(D.Example(ids, labels))
    return out


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("packing", [False, True])
def test_loss_and_gradients_equal_the_models_own(packing):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        H.small_lm(vocab_size=120),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"),
    )
    for p in model.parameters():  # LoRA B starts at zero: make every gradient non-trivial
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)
    examples = _examples()
    seqs = [[0, 1], [2, 3]] if packing else [[0], [1], [2], [3]]
    batch = D.collate(examples, seqs, pad_id=0, packing=packing)

    reference = model(**batch, use_cache=False).loss  # the model's own shift + mean
    reference.backward()
    want = _grads(model)
    model.zero_grad()

    head = M.LabelledHead(model)
    assert head.enabled
    loss = head.loss(model, batch)
    loss.backward()
    got = _grads(model)

    assert torch.allclose(loss, reference, atol=1e-6), (loss, reference)
    assert want.keys() == got.keys() and len(got) > 0
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-6), name

    logits, target = head.logits(model, batch)  # evaluation: only the labelled rows
    n_labelled = sum(sum(1 for x in e.labels[1:] if x != D.IGNORE) for e in examples)
    assert logits.shape == (n_labelled, 120) and target.shape == (n_labelled,)
    assert n_labelled < batch["input_ids"].numel() / 2  # most positions skipped
    assert (target != D.IGNORE).all()


def test_softcapped_head_still_applies_its_own_code():
    """A model that post-processes its logits (Gemma-2's soft-capping) gets the
    same loss: the hook changes the head's input, not the model's head code."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    model = H.small_lm(
        vocab_size=120,
        config_cls=Gemma2Config,
        model_cls=Gemma2ForCausalLM,
        head_dim=8,
        final_logit_softcapping=5.0,
    )
    batch = D.collate(_examples(), [[0], [1], [2], [3]], pad_id=0, packing=False)
    reference = model(**batch, use_cache=False).loss
    loss = M.LabelledHead(model).loss(model, batch)
    assert torch.allclose(loss, reference, atol=1e-5), (loss, reference)
