"""`kubetune run` on the real SmolLM2-135M-Instruct (the quickstart, shortened):
held-out loss must drop, the summary must say where the adapter is, and
dataset.clean's drop reaches the checks, the trainer, clean.json and the summary."""

from __future__ import annotations

import json

import pytest
import trainer_helpers as H
import yaml

pytestmark = [pytest.mark.trainer, pytest.mark.slow, pytest.mark.timeout(1200)]


def test_kubetune_run_quickstart_short(ray_local, tmp_path, monkeypatch, capsys):
    from kubetune_trainer import clean as C
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
    # dataset.clean action drop (the quickstart's): the check before Ray and the
    # summary say the same counts, clean.json under the prefix holds them, and the
    # trainer read the rows kept (the corpus repeats many conversations)
    report = json.loads((prefix / "clean.json").read_text())
    assert report["action"] == "drop"
    lines = C.summary(report)
    assert [ln for ln in lines if ln.startswith("train: ")], lines
    for line in lines:
        assert f"  clean: {line}" in out and f"{'':<16}{line}" in out, (line, out[-3000:])
    record = json.loads((prefix / "run.json").read_text())["dataset"]
    for split, key in (("train", "trainRows"), ("validation", "validationRows")):
        counts = report["splits"][split]["counts"]
        assert counts["dropped"] > 0 and counts["exactDuplicates"] > 0, counts
        assert record[key]["rows"] == counts["rows"] - counts["dropped"] == counts["kept"]
    assert report["splits"]["train"]["counts"]["leaked"] > 0
