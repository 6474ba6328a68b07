"""`kubetune run` on the real SmolLM2-135M-Instruct (the quickstart, shortened):
held-out loss must drop and the summary must say where the adapter is."""

from __future__ import annotations

import json

import pytest
import trainer_helpers as H
import yaml

pytestmark = [pytest.mark.trainer, pytest.mark.slow, pytest.mark.timeout(1200)]


def test_kubetune_run_quickstart_short(ray_local, tmp_path, monkeypatch, capsys):
    from kubetune_trainer.local import LocalRun, run_local

    H.prepare_quickstart()
    job = yaml.safe_load((H.REPO / "crds/examples/quickstart.yaml").read_text())
    spec = job["spec"]
    spec["hyperparameters"].update({"maxSteps": 6, "logEverySteps": 2})
    spec["evaluation"] = {"everySteps": 6, "maxBatches": 4}
    spec["checkpointing"] = {"everySteps": 6, "keepLast": 1}
    spec["output"] = {"mergeAdapter": True}
    # relative paths are read from the current directory
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    monkeypatch.chdir(H.REPO)
    run = LocalRun(file=str(tmp_path / "job.yaml"), output=str(tmp_path / "runs"), progress=False)
    assert run_local(run) == 0
    out = capsys.readouterr().out
    assert "held-out loss: before" in out and "(better)" in out, out
    prefix = tmp_path / "runs/default/quickstart/local"
    outputs = json.loads((prefix / "outputs.json").read_text())
    assert outputs["finalEvalLoss"] < outputs["initialEvalLoss"]
    assert (prefix / "merged/model.safetensors").exists()
    assert (prefix / "adapter/adapter_model.safetensors").exists()
    assert str(prefix / "adapter") in out
