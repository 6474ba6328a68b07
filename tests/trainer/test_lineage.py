"""Lineage and continuing a fine-tune, on a local Ray with a tiny model.

A chain of two jobs run as `kubetune run` runs them after its checks, on one
local Ray (benchmarks/lineage_chain.py, the same code the benchmark prints its
table with): chain-a on data set 1, chain-b
`fromJob: chain-a` on data set 2. Their run records link; chain-b starts
from chain-a's adapter (its loss before training is chain-a's) and learns set
2. The same inputs under another job name hash the same; a parent that has
not finished is refused before Ray starts. Two Ray fits in all.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import trainer_helpers as H

sys.path.insert(0, str(H.REPO / "benchmarks"))
import lineage_chain as C  # noqa: E402

pytestmark = [pytest.mark.trainer, pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def chain(tmp_path_factory, _ray_session):
    work = tmp_path_factory.mktemp("chain")
    model = str(H.tiny_model(work / "models/tiny"))
    result = C.run_chain(work, model, 8, 1e-2, H.chat_rows(64), C.data_set_2(64))
    table = C.losses(model, result)
    C.print_report(result, table)  # the table, with -s
    return work, model, result, table


def test_run_records_link_the_chain(chain):
    work, model, result, _ = chain
    a, b = result["jobs"]["chain-a"], result["jobs"]["chain-b"]
    ra, rb = a["run"], b["run"]
    assert ra.get("parent") is None
    parent = rb["parent"]
    assert parent["job"] == {"name": "chain-a", "namespace": "default", "uid": "local"}
    assert parent["runRecord"] == (a["prefix"] / "run.json").as_uri()
    assert parent["specHash"] == ra["specHash"]
    assert parent["kind"] == "adapter" and parent["merged"] is False
    assert parent["uri"] == a["outputs"]["adapter"]
    # the same base, different data; what each read and used
    assert ra["baseModel"]["sha256"] == rb["baseModel"]["sha256"]
    assert ra["baseModel"]["uri"] == model
    assert ra["dataset"]["hash"] != rb["dataset"]["hash"]
    assert ra["dataset"]["trainRows"] == {"rows": 56, "used": 56, "dropped": 0, "truncated": 0}
    assert ra["dataset"]["validationRows"]["rows"] == 8
    assert ra["dataset"]["split"] == {"validation": "dataset.validation"}
    train_file = Path(result["data"]["set1"][0])
    assert ra["dataset"]["train"][0]["bytes"] == train_file.stat().st_size
    for key in ("torch", "transformers", "peft", "deepspeed", "ray", "kubetune"):
        assert ra["versions"][key] and ra["versions"][key] != "absent"
    assert ra["image"] == "local"
    assert "run record:" in b["console"]


def test_second_job_continues_the_first_adapter(chain):
    _, _, result, table = chain
    b = result["jobs"]["chain-b"]["outputs"]
    # chain-b's held-out loss before its first step is chain-a's adapter on set 2:
    # it started from that adapter, not from a fresh one
    assert b["initialEvalLoss"] == pytest.approx(table["chain-a"]["set2"], abs=2e-3)
    assert abs(table["base"]["set2"] - table["chain-a"]["set2"]) > 2e-3
    # and it learned set 2
    assert table["chain-b"]["set2"] < table["chain-a"]["set2"] - 0.1


def test_same_inputs_give_the_same_hashes(chain, tmp_path):
    from kubetune_trainer import lineage as L

    work, model, result, _ = chain
    ra = result["jobs"]["chain-a"]["run"]
    job = C.chain_jobs(model, result["data"], 8, 1e-2)[0]
    job["metadata"]["name"] = "another-name"
    job["spec"]["output"] = {"uri": str(tmp_path / "elsewhere")}
    record = L.run_record(H.trainer_config(job), model).to_dict()
    assert record["specHash"] == ra["specHash"]
    assert record["dataset"]["hash"] == ra["dataset"]["hash"]
    assert record["baseModel"] == ra["baseModel"]
    # one changed byte in the training data changes the data hash, not the spec's
    changed = tmp_path / "set1-train.jsonl"
    changed.write_bytes(Path(result["data"]["set1"][0]).read_bytes().replace(b"?", b"!", 1))
    job["spec"]["dataset"]["train"]["uri"] = str(changed)
    other = L.run_record(H.trainer_config(job), model).to_dict()
    assert other["dataset"]["hash"] != ra["dataset"]["hash"]
    assert other["dataset"]["train"][0]["sha256"] != ra["dataset"]["train"][0]["sha256"]


def test_from_checkpoint_finds_the_adapter_and_its_run_record(chain):
    from kubetune_trainer import parent as P

    work, model, result, _ = chain
    a = result["jobs"]["chain-a"]
    ckpt = a["prefix"] / "checkpoints" / "step-00000008"
    job = C.chain_jobs(model, result["data"], 8, 1e-2)[1]
    job["spec"]["model"] = {"uri": model, "fromCheckpoint": str(ckpt), "mergeParent": True}
    job["spec"]["output"] = {"uri": str(work / "runs")}
    config = H.trainer_config(job | {"metadata": {"name": "c", "uid": "u"}})
    parent = P.resolve(config)
    assert parent.kind == "adapter" and parent.merge
    assert parent.local == str(ckpt / "adapter")
    assert parent.run_record["specHash"] == a["run"]["specHash"]
    # an uncommitted checkpoint is refused, naming the field
    (ckpt / "manifest.json").rename(ckpt / "manifest.moved")
    try:
        with pytest.raises(P.ParentError, match="spec.model.fromCheckpoint: .* not committed"):
            P.resolve(config)
    finally:
        (ckpt / "manifest.moved").rename(ckpt / "manifest.json")


def test_merge_parent_starts_a_new_adapter_on_the_merged_model(chain):
    import torch
    from transformers import AutoModelForCausalLM

    from kubetune_trainer import model as M
    from kubetune_trainer import parent as P

    work, model, result, _ = chain
    a = result["jobs"]["chain-a"]
    job = C.chain_jobs(model, result["data"], 8, 1e-2)[1]
    job["spec"]["model"] = {"uri": model, "fromJob": "chain-a", "mergeParent": True}
    parent_ref = {"name": "chain-a", "uid": "local", "uri": a["prefix"].as_uri()}
    from kubetune_api import load_trainer_config, spec_to_trainer_config

    out = (work / "runs").as_uri()
    config = load_trainer_config(
        spec_to_trainer_config(job, default_output_uri=out, parent=parent_ref)
    )
    parent = P.resolve(config)
    merged = M.load_model(config.spec, model, False, parent)
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    name = "model.layers.0.self_attn.q_proj"
    new_base = dict(merged.named_modules())[f"base_model.model.{name}"].base_layer.weight
    assert not torch.equal(new_base, dict(base.named_modules())[name].weight)
    lora_b = dict(merged.named_modules())[f"base_model.model.{name}"].lora_B["default"].weight
    assert torch.count_nonzero(lora_b) == 0  # a fresh adapter (peft starts B at zero)


def test_from_job_that_has_not_succeeded_is_refused(chain, tmp_path):
    from kubetune_trainer.local import local_parent

    work, model, result, _ = chain
    job = C.chain_jobs(model, result["data"], 8, 1e-2)[1]
    job["spec"]["model"]["fromJob"] = "never-ran"
    parent, problem = local_parent(job, (work / "runs").as_uri())
    assert parent is None
    assert problem.startswith("spec.model.fromJob: FineTuneJob never-ran has not Succeeded")
    progress = result["jobs"]["chain-a"]["prefix"] / "progress.json"
    saved = progress.read_text()
    progress.write_text(json.dumps({**json.loads(saved), "phase": "Failed"}))
    try:
        job["spec"]["model"]["fromJob"] = "chain-a"
        _, problem = local_parent(job, (work / "runs").as_uri())
        assert "it is Failed" in problem
    finally:
        progress.write_text(saved)
