"""`kubetune run` with spec.model.prune: a 4-layer tiny Llama pruned to 2 layers,
LoRA trained a few steps by distillation from the same model unpruned (the
teacher's default) and merged. The summary says what was pruned, the merged model
loads with transformers with 2 layers, and the adapter applies to the pruned model
(the merged model is that model with the adapter in it)."""

from __future__ import annotations

import json

import pytest
import trainer_helpers as H
import yaml

pytestmark = [pytest.mark.trainer, pytest.mark.timeout(600)]


def test_kubetune_run_trains_and_saves_the_pruned_model(ray_local, tmp_path, capsys):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from kubetune_trainer.local import LocalRun, run_local
    from kubetune_trainer.prune import prune_layers

    base = H.tiny_model(tmp_path / "tiny4", num_hidden_layers=4)
    data = H.write_jsonl(tmp_path / "chat.jsonl", H.chat_rows(32))
    job = H.job(
        base,
        data,
        (tmp_path / "runs").as_uri(),
        name="pruned",
        hyperparameters={"maxSteps": 2, "logEverySteps": 1},
        evaluation={"enabled": False},
        checkpointing={"everySteps": 100, "keepLast": 1},
    )
    job["spec"]["model"]["prune"] = {"keepLayers": 2}
    job["spec"]["method"].update(objective="distill", distill={"weight": 0.5})
    job["spec"]["output"]["mergeAdapter"] = True
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    run = LocalRun(file=str(tmp_path / "job.yaml"), progress=False)
    assert run_local(run) == 0
    out = capsys.readouterr().out
    assert "pruned 4 → 2 layers" in out and "(kept layers 0,3)" in out, out[-3000:]
    prefix = tmp_path / "runs/default/pruned/u1"
    outputs = json.loads((prefix / "outputs.json").read_text())
    assert outputs["pruned"]["keptLayers"] == [0, 3]
    assert outputs["pruned"]["parametersAfter"] < outputs["pruned"]["parametersBefore"]
    adapter = next(a for a in outputs["artifacts"] if a["kind"] == "adapter")
    assert adapter["baseModel"].endswith("pruned (keepLayers: 2)")  # not the base alone
    rows = [json.loads(line) for line in (prefix / "metrics.jsonl").read_text().splitlines()]
    sizes = next(r for r in rows if r.get("teacherParameters"))
    # the teacher is spec.model without its prune block: all 4 layers
    assert sizes["teacherParameters"] == outputs["pruned"]["parametersBefore"]
    assert sizes["studentParameters"] < sizes["teacherParameters"]
    record = json.loads((prefix / "run.json").read_text())
    assert record["baseModel"]["prune"] == {"keepLayers": 2}

    config = json.loads((prefix / "merged/config.json").read_text())
    assert config["num_hidden_layers"] == 2
    merged = AutoModelForCausalLM.from_pretrained(prefix / "merged", dtype=torch.float32)
    assert len(merged.model.layers) == 2
    assert sum(p.numel() for p in merged.parameters()) == outputs["pruned"]["parametersAfter"]
    # the adapter on the pruned base gives the merged model's logits
    pruned = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    prune_layers(pruned, [0, 3])
    adapted = PeftModel.from_pretrained(pruned, prefix / "adapter").eval()
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            merged.eval()(ids).logits, adapted(ids).logits, atol=1e-4, rtol=1e-4
        )
    merged.config.use_cache = True
    assert merged.generate(ids[:, :4], max_new_tokens=4, do_sample=False).shape == (1, 8)
