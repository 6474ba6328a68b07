"""output.interpolation (WiSE-FT): the interpolation on tiny tensors and a tiny
Llama (no Ray), then two real runs (local Ray + DeepSpeed): LoRA with a fixed
weight and a merged model, full fine-tuning under ZeRO-3 with bestHeldOut. Each
run checks the listed scores, that α = 1 scores the final held-out loss, the
rule, and that the published folder loads with transformers and holds the
interpolated weights."""

from __future__ import annotations

import json
import math

import pytest
import trainer_helpers as H
import yaml

pytestmark = [pytest.mark.trainer, pytest.mark.timeout(600)]


def _state(folder):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_mix_is_the_weighted_mean_and_keeps_the_dtype():
    import torch

    from kubetune_trainer.interpolate import mix

    g = torch.Generator().manual_seed(0)
    base, tuned = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    torch.testing.assert_close(mix(base, tuned, 0.0), base)
    assert torch.equal(mix(base, tuned, 1.0), tuned)  # exactly the fine-tuned weights
    torch.testing.assert_close(mix(base, tuned, 0.5), (base + tuned) / 2)
    torch.testing.assert_close(mix(base, tuned, 0.25), 0.75 * base + 0.25 * tuned)
    half = mix(base.bfloat16(), tuned.bfloat16(), 0.5)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), (base + tuned) / 2, atol=2e-2, rtol=2e-2)


def test_lora_scaling_and_the_scaled_adapter_move_the_weights_linearly(tmp_path):
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from kubetune_trainer.interpolate import LoraMix, scale_adapter

    base_dir = H.tiny_model(tmp_path / "tiny")
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    torch.manual_seed(0)  # init_lora_weights=False: B is random, the update is not 0
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), lora).eval()
    peft.save_pretrained(tmp_path / "adapter")
    scale_adapter(tmp_path / "adapter", tmp_path / "half", 0.5)

    def merged(adapter):
        m = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        return PeftModel.from_pretrained(m, adapter).merge_and_unload().eval()

    w0 = _state(base_dir)
    full, half = merged(tmp_path / "adapter"), merged(tmp_path / "half")
    key = "model.layers.0.self_attn.q_proj.weight"
    delta = full.state_dict()[key] - w0[key]
    assert delta.abs().max() > 1e-3
    torch.testing.assert_close(half.state_dict()[key] - w0[key], 0.5 * delta)
    untouched = "model.layers.0.self_attn.k_proj.weight"
    assert torch.equal(half.state_dict()[untouched], w0[untouched])

    # the in-place scaling scores the same model as the scaled adapter, merged
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = peft(ids).logits
        mixer = LoraMix(peft)
        mixer.set(0.5)
        torch.testing.assert_close(peft(ids).logits, half(ids).logits, atol=1e-5, rtol=1e-5)
        mixer.set(0.0)  # the adapter off: the base model
        base_logits = AutoModelForCausalLM.from_pretrained(base_dir).eval()(ids).logits
        torch.testing.assert_close(peft(ids).logits, base_logits, atol=1e-5, rtol=1e-5)
        mixer.restore()
        assert torch.equal(peft(ids).logits, before)


def test_full_mix_averages_in_place_and_restores(tmp_path):
    import contextlib

    import torch
    from transformers import AutoModelForCausalLM

    from kubetune_trainer.interpolate import FullMix, base_parameters

    base_dir = H.tiny_model(tmp_path / "tiny")
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    tuned = AutoModelForCausalLM.from_pretrained(base_dir)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(torch.randn_like(p))
    want = {n: p.detach().clone() for n, p in tuned.named_parameters()}
    mixer = FullMix(tuned, base_parameters(base), lambda ps: contextlib.nullcontext(), True)
    mixer.set(0.5)
    for n, p in tuned.named_parameters():
        torch.testing.assert_close(p, (dict(base.named_parameters())[n] + want[n]) / 2)
    mixer.restore()
    assert all(torch.equal(p, want[n]) for n, p in tuned.named_parameters())


def _check_scores(outputs: dict) -> dict:
    wise = outputs["interpolation"]
    for p in wise["weights"]:
        assert isinstance(p["evalLoss"], float) and math.isfinite(p["evalLoss"]), p
    at_one = next(p for p in wise["weights"] if p["alpha"] == 1.0)
    # α = 1 is the fine-tuned model as the last evaluation scored it
    assert at_one["evalLoss"] == pytest.approx(outputs["finalEvalLoss"], rel=1e-5)
    losses = [p["evalLoss"] for p in wise["weights"]]
    assert len(set(round(x, 6) for x in losses)) == len(losses), losses  # the models differ
    return wise


def test_lora_run_publishes_the_fixed_weight_scaled_and_merged(ray_local, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file

    from kubetune_trainer.local import LocalRun, run_local

    base = H.tiny_model(tmp_path / "tiny")
    data = H.write_jsonl(tmp_path / "chat.jsonl", H.chat_rows(48))
    retention = H.write_jsonl(
        tmp_path / "general.jsonl",
        [
            {"prompt": f"{n} plus {n} makes", "completion": f" {2 * n}, and the sky is blue"}
            for n in range(12)
        ],
    )
    job = H.job(
        base,
        data,
        (tmp_path / "runs").as_uri(),
        name="wise",
        hyperparameters={"maxSteps": 4},
        evaluation={
            "everySteps": 4,
            "maxBatches": 2,
            # each weight is scored on the retention set too; and its prompts are
            # answered before and after (retention.generation)
            "retention": {
                "dataset": {"uri": str(retention), "format": "prompt-completion"},
                "generation": True,
            },
            "generation": {"examples": 2, "maxNewTokens": 4},
        },
        checkpointing={"everySteps": 100, "keepLast": 1},
    )
    job["spec"]["output"].update(
        mergeAdapter=True,
        interpolation={"weights": [1.0, 0.25, 0.5], "select": "fixed", "weight": 0.5},
    )
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    assert run_local(LocalRun(file=str(tmp_path / "job.yaml"), progress=False)) == 0
    out = capsys.readouterr().out
    prefix = tmp_path / "runs/default/wise/u1"
    outputs = json.loads((prefix / "outputs.json").read_text())
    wise = _check_scores(outputs)
    assert [p["alpha"] for p in wise["weights"]] == [0.25, 0.5, 1.0]
    assert wise["chosen"] == 0.5 and wise["select"] == "fixed"
    # every weight's retention regression against the base; at α = 1 the model is the
    # fine-tuned one, whose regression outputs.json's retention section also has
    regressions = [p["retentionRegression"] for p in wise["weights"]]
    assert all(isinstance(r, float) and math.isfinite(r) for r in regressions), regressions
    assert len(set(regressions)) == 3, regressions
    assert regressions[-1] == pytest.approx(outputs["retention"]["regression"], abs=1e-5)
    assert "interpolated:" in out and "weight 0.50: held-out loss" in out, out[-3000:]
    # retention.generation: two of the set's prompts answered before and after, scored
    # against their completions like the validation split's, in outputs and samples
    gen = outputs["generation"]
    assert gen["examples"] == {"validation": 2, "retention": 2}, gen
    samples = [json.loads(x) for x in (prefix / "samples.jsonl").read_text().splitlines()]
    kept = [s for s in samples if s["split"] == "retention"]
    assert [s["prompt"] for s in kept] and all(s["prompt"].endswith(" makes") for s in kept)
    assert all(s["reference"].endswith("the sky is blue") for s in kept)
    for when in ("before", "after"):
        assert gen[f"retention_{when}"]["chrf"] >= 0, gen
        assert all(isinstance(s[when], str) and f"chrf1_{when}" in s for s in kept)
    assert wise["adapter"].endswith("interpolated/adapter")
    assert wise["mergedModel"].endswith("interpolated/merged")
    arts = [a for a in outputs["artifacts"] if a.get("interpolationWeight") == 0.5]
    assert sorted(a["kind"] for a in arts) == ["adapter", "merged"]

    # the published adapter is the trained one with each lora_B × 0.5
    trained = load_file(prefix / "adapter/adapter_model.safetensors")
    scaled = load_file(prefix / "interpolated/adapter/adapter_model.safetensors")
    assert trained.keys() == scaled.keys()
    for k, v in trained.items():
        torch.testing.assert_close(scaled[k], 0.5 * v if "lora_B" in k else v)
    # the published merged model (transformers loads it) is halfway from the base to
    # the fine-tuned merged model
    w0, w1, wh = _state(base), _state(prefix / "merged"), _state(prefix / "interpolated/merged")
    moved = 0
    for k in w0:
        torch.testing.assert_close(wh[k], w0[k] + 0.5 * (w1[k] - w0[k]), atol=1e-6, rtol=1e-5)
        moved += not torch.equal(w0[k], w1[k])
    assert moved > 0


def test_full_zero3_run_publishes_the_best_held_out_weight(ray_local, tmp_path):
    import torch

    base = H.tiny_model(tmp_path / "tiny")
    data = H.write_jsonl(tmp_path / "chat.jsonl", H.chat_rows(48))
    job = H.job(
        base,
        data,
        (tmp_path / "runs").as_uri(),
        name="wisefull",
        method={"type": "full"},
        distributed={"zeroStage": 3},
        hyperparameters={"maxSteps": 4, "learningRate": 1e-3},
        evaluation={"everySteps": 4, "maxBatches": 2},
        checkpointing={"everySteps": 100, "keepLast": 1},
    )
    job["spec"]["output"]["interpolation"] = {"weights": [0.5, 1.0, 0.25]}
    config = H.trainer_config(job)
    H.fit(config)
    with open(H.local(config, "outputs.json")) as fh:
        outputs = json.load(fh)
    wise = _check_scores(outputs)
    best = min(p["evalLoss"] for p in wise["weights"])
    assert wise["chosen"] == min(p["alpha"] for p in wise["weights"] if p["evalLoss"] <= best)
    assert wise["rule"].startswith("the lowest held-out loss")
    assert wise["model"].endswith("interpolated/model")
    a = wise["chosen"]
    w0, w1 = _state(base), _state(H.local(config, "model"))
    wa = _state(H.local(config, "interpolated/model"))
    for k in w0:
        torch.testing.assert_close(wa[k], torch.lerp(w0[k], w1[k], a), atol=1e-6, rtol=1e-5)
