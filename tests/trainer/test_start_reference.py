"""The reference is where the job starts, and one file runs as a chain.

One YAML file, as a new user writes it: a DPO job continuing an SFT job's
adapter (spec.model.fromJob), the DPO job first in the file. One `kubetune run`
of the file (in this process, on the shared local Ray) says the order, trains
the SFT job once, then the DPO job (ZeRO-3), whose reference is the SFT adapter
it starts from: step 0 has rewards 0 and a loss of log 2 (with the base as the
reference, as before, they were +0.35 and +0.27, loss 0.655). A second run with
--name reuses both finished jobs.

Without Ray: the reference of each mode scores like the starting policy (a
continued parent adapter, a merged parent, a full fine-tune's frozen copy), and
the trained adapter alone stays trainable and is what gets saved.
"""

from __future__ import annotations

import json
import math
import types

import pytest
import trainer_helpers as H
import yaml

pytestmark = [pytest.mark.trainer, pytest.mark.timeout(900)]


def _preference_rows(n: int) -> list[dict]:
    """chosen: the conversation's reply; rejected: another conversation's."""
    chats = [r for r in H.chat_rows(200) if r["messages"][-1]["role"] == "assistant"]
    rows = []
    for k in range(n):
        chat, other = chats[k], chats[(k + n // 2 + 7) % len(chats)]
        chosen, rejected = chat["messages"][-1]["content"], other["messages"][-1]["content"]
        if chosen != rejected:
            rows.append({"prompt": chat["messages"][:-1], "chosen": chosen, "rejected": rejected})
    return rows


def _job(name: str, data, model, **spec) -> dict:
    job = H.job(model, data, "unused", name=name, **spec)
    job["metadata"] = {"name": name}
    del job["spec"]["output"]  # --output: under the test's folder
    job["spec"]["method"] = spec.get("method") or {
        "type": "lora",
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
    }
    return job


def test_a_file_with_sft_then_dpo_runs_both_and_dpo_starts_at_zero_reward(
    ray_local, tmp_path, capsys
):
    from kubetune_trainer.local import LocalRun, run_local

    model = H.tiny_model(tmp_path / "model")
    chat = H.write_jsonl(tmp_path / "chat.jsonl", H.chat_rows(32))
    prefs = H.write_jsonl(tmp_path / "prefs.jsonl", _preference_rows(24))
    sft = _job(
        "sft",
        chat,
        model,
        hyperparameters={"maxSteps": 3, "learningRate": 5e-2},
        evaluation={"everySteps": 3, "maxBatches": 1},
        checkpointing={"everySteps": 3, "keepLast": 1},
    )
    dpo = _job(
        "dpo",
        prefs,
        model,
        dataset={"format": "preference", "validationSplit": 0.2},
        method={"type": "lora", "objective": "dpo", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
        hyperparameters={"maxSteps": 1},
        evaluation={"everySteps": 1, "maxBatches": 1},
        checkpointing={"everySteps": 1, "keepLast": 1},
        distributed={"zeroStage": 3},  # the reference adapter partitioned like the base
    )
    dpo["spec"]["model"]["fromJob"] = "sft"
    path = tmp_path / "chain.yaml"
    path.write_text(yaml.safe_dump_all([dpo, sft], sort_keys=False))  # the child first
    runs = tmp_path / "runs"

    assert run_local(LocalRun(file=str(path), output=str(runs), progress=False)) == 0
    out = capsys.readouterr().out
    said = out.index("holds 2 FineTuneJobs; running 2")
    assert said < out.index("1. sft (document 2)") < out.index("2. dpo (document 1), after sft")
    assert out.count("sft: results in") == 1 and out.count("dpo: results in") == 1
    assert out.index("sft: results in") < out.index("dpo: results in")

    sft_rows = [json.loads(x) for x in (runs / "default/sft/local/metrics.jsonl").open()]
    assert [r["step"] for r in sft_rows if "loss" in r] == [1, 2, 3]  # trained once
    first = json.loads((runs / "default/dpo/local/metrics.jsonl").open().readline())
    assert first["step"] == 0
    print("dpo step 0:", {k: v for k, v in first.items() if k.startswith("eval")})
    assert abs(first["evalRewardsChosen"]) < 1e-3, first
    assert abs(first["evalRewardsRejected"]) < 1e-3, first
    assert first["evalLoss"] == pytest.approx(math.log(2), abs=1e-3)
    run = json.loads((runs / "default/dpo/local/run.json").read_text())
    assert run["parent"]["job"]["name"] == "sft" and run["parent"]["merged"] is False
    saved = sorted(p.name for p in (runs / "default/dpo/local/adapter").iterdir())
    assert "reference" not in saved and "adapter_model.safetensors" in saved

    # --name: the job and its in-file parent, both finished: reused, nothing trains
    assert run_local(LocalRun(file=str(path), name="dpo", output=str(runs), progress=False)) == 0
    again = capsys.readouterr().out
    assert again.count("already finished") == 2, again


# ---------------------------------------------------------------------------- no Ray


class _Engine:
    """What Reference reads of DeepSpeed's engine: the module and its forward."""

    def __init__(self, module):
        self.module = module

    def __call__(self, **kw):
        return self.module(**kw)


def _context(model, method, parent, use, copy=None):
    from kubetune_trainer.worker import Worker

    worker = Worker(0, 1, False)
    worker.engine, worker.device, worker.stage = _Engine(model), "cpu", 2
    return types.SimpleNamespace(
        worker=worker, method=method, parent=parent, reference_use=use, reference_copy=copy
    )


def _logits(worker, ids):
    import torch

    with torch.no_grad():
        return worker.engine(input_ids=ids).logits


def test_each_reference_mode_scores_like_the_starting_policy(tmp_path):
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    from kubetune_trainer.checkpoint import save_adapter
    from kubetune_trainer.objectives import reference as R

    lm = lambda: H.small_lm(vocab_size=50).float()  # noqa: E731  (the same seeded weights)
    parent_model = get_peft_model(lm(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for n, p in parent_model.named_parameters():
            if "lora_B" in n:
                p.normal_()  # a parent that learned something
    parent_model.save_pretrained(tmp_path / "parent")
    ids = torch.randint(0, 50, (2, 12))
    start = _logits(types.SimpleNamespace(engine=parent_model), ids)

    def moved(model):
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.3)  # training moved the policy

    # a continued parent adapter: the frozen copy beside the trained one
    parent = types.SimpleNamespace(kind="adapter", merge=False, local=str(tmp_path / "parent"))
    model = PeftModel.from_pretrained(lm(), parent.local, is_trainable=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert R.prepare(model, "lora", parent, "stored") is None
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    # what DeepSpeed's optimizer and its checkpoints (exclude_frozen_parameters) hold:
    # the trained adapter; a resumed attempt loads the parent's as the reference again
    assert any(f".{R.REFERENCE_ADAPTER}." in n for n, _ in model.named_parameters())
    assert not any(f".{R.REFERENCE_ADAPTER}." in n for n in trainable)
    ctx = _context(model, "lora", parent, "stored")
    ref = R.Reference(ctx)
    assert ref.mode == R.PARENT_ADAPTER and not ref.stored
    moved(model)
    model.train()
    with ref.active():
        assert torch.allclose(_logits(ctx.worker, ids), start, atol=1e-5)
    assert model.training
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    assert not torch.allclose(_logits(ctx.worker, ids), start, atol=1e-3)
    save_adapter(ctx.worker, tmp_path / "saved")
    assert not (tmp_path / "saved" / R.REFERENCE_ADAPTER).exists()

    # a merged parent: the adapter switched off is the merged model
    merged = PeftModel.from_pretrained(lm(), parent.local).merge_and_unload()
    model = get_peft_model(merged, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    parent.merge = True
    ctx = _context(model, "lora", parent, "stored")
    assert R.prepare(model, "lora", parent, "stored") is None
    ref = R.Reference(ctx)
    assert ref.mode == R.ADAPTER_OFF
    moved(model)
    with ref.active():
        assert torch.allclose(_logits(ctx.worker, ids), start, atol=1e-5)

    # full fine-tuning from the merged parent: online, a frozen copy; stored, the engine
    full = PeftModel.from_pretrained(lm(), parent.local).merge_and_unload().requires_grad_(True)
    copy = R.prepare(full, "full", parent, "online")
    assert copy is not None and not any(p.requires_grad for p in copy.parameters())
    ctx = _context(full, "full", parent, "online", copy)
    ref = R.Reference(ctx)
    assert ref.mode == R.COPY
    moved(full)
    with ref.active():
        assert torch.allclose(_logits(ctx.worker, ids), start, atol=1e-5)
    assert not torch.allclose(_logits(ctx.worker, ids), start, atol=1e-3)
    assert R.prepare(full, "full", parent, "stored") is None
    assert R.Reference(_context(full, "full", parent, "stored")).stored
