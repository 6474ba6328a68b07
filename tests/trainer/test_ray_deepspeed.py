"""The trainer on a local Ray: 2 workers, DeepSpeed ZeRO-2 and ZeRO-3 with offload,
records under the prefix, adapters with real tensors, merged == adapter logits.

The tier's one local Ray (tests/trainer/conftest.py); each test is one Ray fit of a tiny
model built from config.
"""

from __future__ import annotations

import json
import os

import pytest
import trainer_helpers as H

pytestmark = [pytest.mark.trainer, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    model = H.tiny_model(root / "model")
    data = H.write_jsonl(root / "chat.jsonl", H.chat_rows(240))
    return model, data


def _run(config) -> None:
    from kubetune_trainer.__main__ import run

    assert run(config, quiet=True) == 0, (config.storage_prefix, _read(config, "progress.json"))


def _local(config, *parts) -> str:
    return os.path.join(config.storage_prefix.removeprefix("file://"), *parts)


def _json(path):
    with open(path) as f:
        return json.load(f)


def _read(config, name):
    path = _local(config, name)
    return _json(path) if os.path.exists(path) else None


def _generates(folder: str) -> None:
    """A saved model folder loads with plain transformers and completes a chat."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == ids["input_ids"].shape[1] + 4


def test_two_workers_zero2_records_and_retention(ray_local, tiny, tmp_path):
    model, data = tiny
    cfg = H.trainer_config(
        H.job(
            model,
            data,
            tmp_path.as_uri(),
            resources={"workers": 2},
            distributed={"zeroStage": 2},
            checkpointing={"everySteps": 2, "keepLast": 2},
        )
    )
    _run(cfg)
    progress = _read(cfg, "progress.json")
    assert progress["phase"] == "Succeeded" and progress["step"] == 6
    assert progress["lastCheckpoint"]["step"] == 6 and progress["percent"] == 100.0
    ckpts = sorted(os.listdir(_local(cfg, "checkpoints")))
    assert ckpts == ["step-00000004", "step-00000006"]  # keepLast 2 of 2, 4, 6
    manifest = _json(_local(cfg, "checkpoints", ckpts[-1], "manifest.json"))
    assert manifest["worldSize"] == 2 and manifest["zeroStage"] == 2
    # both ranks' optimizer shards, each rank's RNG, the config that made it
    for f in (
        "ds/zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "rng_state_0.pt",
        "rng_state_1.pt",
        "config.json",
        "trainer_state.json",
        "adapter/adapter_model.safetensors",
    ):
        assert f in manifest["files"], f
        assert os.path.exists(_local(cfg, "checkpoints", ckpts[-1], f))
    with open(_local(cfg, "metrics.jsonl")) as f:
        rows = [json.loads(x) for x in f]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert rows[0]["step"] == 0 and "evalLoss" in rows[0]  # held-out loss before training
    for r in rows:
        if "loss" in r:
            assert r["tokensPerSecond"] > 0 and r["learningRate"] >= 0
    evals = [r for r in rows if "evalLoss" in r]
    assert [r["step"] for r in evals] == [0, 3, 6]
    assert all(0 <= r["evalTokenAccuracy"] <= 1 and r["evalPerplexity"] > 1 for r in evals)
    outputs = _read(cfg, "outputs.json")
    assert outputs["adapter"].endswith("/adapter") and outputs["steps"] == 6
    assert outputs["initialEvalLoss"] > 0 and outputs["finalEvalLoss"] > 0
    assert os.path.getsize(_local(cfg, "loss.png")) > 1000


def test_zero3_offload_lora_adapter_has_real_tensors_and_merges(ray_local, tiny, tmp_path):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model, data = tiny
    cfg = H.trainer_config(
        H.job(
            model,
            data,
            tmp_path.as_uri(),
            resources={"workers": 2},
            hyperparameters={"maxSteps": 3, "precision": "bf16"},
            distributed={"zeroStage": 3, "offloadOptimizer": True, "offloadParameters": True},
            evaluation={"everySteps": 3},
            checkpointing={"everySteps": 3},
            output={"uri": tmp_path.as_uri(), "mergeAdapter": True, "gguf": {"types": ["q8_0"]}},
        )
    )
    _run(cfg)
    manifest = _json(_local(cfg, "checkpoints/step-00000003/manifest.json"))
    assert manifest["zeroStage"] == 3
    outputs = _read(cfg, "outputs.json")
    adapter_dir = outputs["adapter"].removeprefix("file://")
    tensors = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    lora_a = [t for k, t in tensors.items() if "lora_A" in k]
    assert lora_a and all(t.numel() > 0 for t in tensors.values())
    assert all(t.shape[0] == 4 and t.shape[1] in (64, 128) for t in lora_a)  # r=4, in=64|128
    assert any(t.abs().sum() > 0 for k, t in tensors.items() if "lora_B" in k)  # trained

    merged_dir = outputs["mergedModel"].removeprefix("file://")
    for name in ("tokenizer.json", "special_tokens_map.json", "generation_config.json"):
        assert os.path.exists(os.path.join(merged_dir, name)), name
    # saved in the training precision (bf16), described in outputs.json
    weights = load_file(os.path.join(merged_dir, "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    # output.gguf: the merged model as q8_0, read back and scored against it
    (gguf,) = outputs["gguf"]
    assert gguf["type"] == "q8_0" and gguf["tensorsOk"] and gguf["tokenizerOk"]
    assert gguf["withinTolerance"] and gguf["relativeIncrease"] < gguf["tolerance"] == 0.01
    assert gguf["referenceEvalLoss"] > 0 and gguf["fallback"] == []
    assert os.path.getsize(gguf["uri"].removeprefix("file://")) == gguf["bytes"]
    (gguf_artifact,) = [a for a in outputs["artifacts"] if a["format"] == "gguf"]
    assert gguf_artifact["kind"] == "merged" and gguf_artifact["precision"] == "q8_0"
    assert gguf_artifact["uri"] == gguf["uri"]

    kinds = {a["kind"]: a for a in outputs["artifacts"] if a["format"] != "gguf"}
    assert sorted(kinds) == ["adapter", "merged"]
    assert kinds["merged"]["uri"] == outputs["mergedModel"]
    assert kinds["merged"]["format"] == "huggingface-safetensors"
    assert (
        kinds["adapter"]["format"] == "peft-lora-safetensors" and kinds["adapter"]["loraRank"] == 4
    )
    assert all(a["precision"] == "bf16" and a["baseModel"] == str(model) for a in kinds.values())
    assert "model.safetensors" in kinds["merged"]["files"]
    assert "adapter_model.safetensors" in kinds["adapter"]["files"]

    x = torch.tensor([[1, 5, 200, 3000, 17, 42]])
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(base, adapter_dir).eval()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        a, b = with_adapter(input_ids=x).logits, merged(input_ids=x).logits
        # the fp32 merge, rounded once to bf16
        rounded = with_adapter.merge_and_unload().to(torch.bfloat16).float()
        c = rounded(input_ids=x).logits
        out = merged.generate(input_ids=x, max_new_tokens=4, do_sample=False)
    assert torch.allclose(b, c, atol=1e-5), (b - c).abs().max()
    assert torch.allclose(a, b, atol=0.05), (a - b).abs().max()  # bf16 rounding only
    assert out.shape[1] == x.shape[1] + 4


def test_full_finetune_zero1_learns_and_stops_early(ray_local, tiny, tmp_path):
    model, data = tiny
    rows = H.chat_rows(8)  # tiny data, many steps: the model must memorize it
    small = H.write_jsonl(tmp_path / "small.jsonl", rows)
    cfg = H.trainer_config(
        H.job(
            model,
            small,
            tmp_path.as_uri(),
            method={"type": "full"},
            dataset={
                "train": {"uri": str(small)},
                "validation": {"uri": str(small)},
                "format": "chat",
                "maxSeqLength": 128,
            },
            hyperparameters={
                "maxSteps": 40,
                "learningRate": 3e-3,
                "batchSize": 2,
                "logEverySteps": 5,
                "lrScheduler": "constant",
            },
            distributed={"zeroStage": 1},
            evaluation={"everySteps": 5},
            earlyStopping={
                "enabled": True,
                "metric": "eval_token_accuracy",
                "mode": "max",
                "patience": 1,
                "minDelta": 0.5,
            },
            checkpointing={"everySteps": 100},
        )
    )
    _run(cfg)
    outputs = _read(cfg, "outputs.json")
    assert outputs["model"].endswith("/model")
    assert os.path.exists(_local(cfg, "model", "model.safetensors"))
    [full] = outputs["artifacts"]
    assert full["kind"] == "full" and full["uri"] == outputs["model"]
    assert full["precision"] == "fp32" and "special_tokens_map.json" in full["files"]
    _generates(_local(cfg, "model"))
    # no accuracy gain of 0.5 between two evaluations: stops at the second one
    assert outputs["stoppedEarly"] is True and outputs["steps"] == 10
    assert outputs["finalEvalLoss"] < outputs["initialEvalLoss"] - 1.0
