"""spec.method.full (which layers train, gradual unfreezing, layer-wise learning
rates) and method.lora.layers.

The pure parts on a tiny Llama built from a config: how the model is cut into
parts, the parameter groups, the errors. Then one real run (local Ray,
DeepSpeed ZeRO-2, a 4-layer tiny Llama whose head is not tied to its
embeddings): the weights of every checkpoint show which part trained when, the
counts in outputs.json, the metrics and the summary are the counted ones, and a
resume from the middle of the unfreezing schedule ends with the weights of the
uninterrupted run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import trainer_helpers as H

small_lm = H.small_lm

pytestmark = [pytest.mark.trainer, pytest.mark.timeout(900)]


def _full(**settings):
    from kubetune_api.models import FullConfig

    return FullConfig.model_validate(settings)


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_parts_groups_and_rates_of_a_four_layer_model():
    from kubetune_trainer import freeze as F

    model = small_lm(num_hidden_layers=4, tie_word_embeddings=False)
    plan = F.plan(
        model,
        _full(
            trainableLayers=[1, 2, 3],
            trainEmbeddings=False,
            unfreeze={"everySteps": 5},
            layerLrDecay=0.5,
        ),
    )
    layers = model.model.layers
    head = _numel(model.model.norm) + _numel(model.lm_head)
    # top down: the head, then layer 3, 2, 1, one part every 5 steps
    assert [g.names for g in plan.groups] == [("head",), ("layer 3",), ("layer 2",), ("layer 1",)]
    assert [g.start for g in plan.groups] == [0, 5, 10, 15]
    assert [g.lr_scale for g in plan.groups] == [1.0, 1.0, 0.5, 0.25]  # 0.5^(L-1-i)
    assert [g.parameters for g in plan.groups] == [head, *(_numel(layers[i]) for i in (3, 2, 1))]
    assert plan.total == _numel(model)
    assert plan.trainable == head + sum(_numel(layers[i]) for i in (1, 2, 3))
    assert plan.frozen == ["embeddings", "layer 0"]
    assert plan.trainable_at(4) == head and plan.trainable_at(5) == head + _numel(layers[3])
    assert plan.trainable_at(10**6) == plan.trainable
    # the optimizer's start is counted in updates (an objective may do several per step)
    assert [s for _, _, s in plan.optimizer_groups(updates_per_step=2)] == [0, 10, 20, 30]

    # without unfreezing, parts of one rate share one group; embeddings at decay^L
    plan = F.plan(model, _full(layerLrDecay=0.5))
    assert [(g.names, g.lr_scale) for g in plan.groups] == [
        (("head", "layer 3"), 1.0),
        (("layer 2",), 0.5),
        (("layer 1",), 0.25),
        (("layer 0",), 0.125),
        (("embeddings",), 0.0625),
    ]
    # the defaults: everything, one group, one rate
    plan = F.plan(model, _full())
    assert len(plan.groups) == 1 and plan.trainable == plan.total == _numel(model)
    assert plan.groups[0].lr_scale == 1.0 and plan.groups[0].start == 0


def test_apply_freezes_what_never_trains_and_counts_match():
    from kubetune_api import load_trainer_config, spec_to_trainer_config
    from kubetune_trainer import freeze as F
    from kubetune_trainer.model import count_parameters

    model = small_lm(num_hidden_layers=4, tie_word_embeddings=False)
    job = H.job(Path("m"), Path("d.jsonl"), "file:///x", method={"type": "full"})
    job["spec"]["method"]["full"] = {"trainableLayers": [2, 3], "trainEmbeddings": False}
    spec = load_trainer_config(spec_to_trainer_config(job)).spec
    plan = F.apply(model, spec)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {
        n
        for n, _ in model.named_parameters()
        if n.startswith(("model.embed_tokens", "model.layers.0.", "model.layers.1."))
    }
    total, trainable = count_parameters(model)
    assert (plan.total, plan.trainable) == (total, trainable)
    record = plan.record().to_dict()
    assert record["trainableLayers"] == [2, 3] and record["trainEmbeddings"] is False
    assert "groups" not in record  # one group: nothing to list
    line = F.summary_line(record)
    assert line.startswith(f"parameters: {total / 1e6:.1f}M, {trainable / 1e6:.2f}M trainable")
    assert "decoder layers 2-3 of 4, embeddings frozen, head" in line
    # a LoRA job: no plan, every parameter keeps its flag
    lora = H.job(Path("m"), Path("d.jsonl"), "file:///x")
    assert F.apply(small_lm(), load_trainer_config(spec_to_trainer_config(lora)).spec) is None


def test_a_classification_model_freezes_alike_and_its_head_is_norm_and_score():
    """method.task classification: the head part is the final norm and the new
    `score` (no output embedding to tie); layers and embeddings freeze as for a
    language model, and trainHead keeps the new head training."""
    from transformers import LlamaForSequenceClassification

    from kubetune_api import load_trainer_config, spec_to_trainer_config
    from kubetune_trainer import freeze as F

    model = small_lm(
        model_cls=LlamaForSequenceClassification,
        num_hidden_layers=4,
        num_labels=3,
        pad_token_id=0,
        tie_word_embeddings=True,  # as SmolLM2's config says; a classifier has nothing tied
    )
    parts, layers = F.model_parts(model)
    assert layers == 4 and not F.tied_embeddings(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in parts[-1].params) == ["model.norm.weight", "score.weight"]
    assert [names[id(p)] for p in parts[0].params] == ["model.embed_tokens.weight"]
    job = H.job(Path("m"), Path("d.jsonl"), "file:///x", method={"type": "full"})
    job["spec"]["method"] = {
        "task": "classification",
        "type": "full",
        "full": {"trainableLayers": [3], "trainEmbeddings": False},
    }
    job["spec"]["dataset"]["format"] = "classification"
    F.apply(model, load_trainer_config(spec_to_trainer_config(job)).spec)
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    kept = ("model.layers.3.", "model.norm", "score")
    assert trains == {n for n in names.values() if n.startswith(kept)}


def test_errors_name_the_field_and_the_layer_count():
    from kubetune_trainer import freeze as F

    untied = small_lm(num_hidden_layers=4, tie_word_embeddings=False)
    with pytest.raises(F.FreezeError) as err:
        F.plan(untied, _full(trainableLayers=[2, 4, 7]))
    assert str(err.value) == (
        "spec.method.full.trainableLayers: [4, 7] beyond the model's 4 decoder layers "
        "(indices 0 to 3): remove them"
    )
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = small_lm(config_cls=GPT2Config, model_cls=GPT2LMHeadModel)
    with pytest.raises(F.FreezeError, match=r"^spec.method.full: cannot find the decoder layers"):
        F.plan(gpt2, _full())
    tied = small_lm(num_hidden_layers=4, tie_word_embeddings=True)
    with pytest.raises(F.FreezeError, match=r"trainEmbeddings: .*tie_word_embeddings.*alike"):
        F.plan(tied, _full(trainEmbeddings=False))
    # tied and both frozen: the shared weight is frozen once, as part of the head
    plan = F.plan(tied, _full(trainEmbeddings=False, trainHead=False))
    assert plan.trainable == sum(_numel(layer) for layer in tied.model.layers)
    # tied and both trained: the shared weight trains at the head's rate, counted once
    plan = F.plan(tied, _full(layerLrDecay=0.5, unfreeze={"everySteps": 1}))
    assert plan.groups[0].names == ("head",) and plan.groups[-1].names == ("layer 0",)
    assert plan.trainable == _numel(tied)


def test_lora_adapters_only_on_the_chosen_layers(tmp_path):
    from kubetune_api import load_trainer_config, spec_to_trainer_config
    from kubetune_trainer.freeze import FreezeError
    from kubetune_trainer.model import load_model

    path = H.tiny_model(tmp_path / "tiny4", num_hidden_layers=4)
    job = H.job(path, Path("d.jsonl"), "file:///x")
    job["spec"]["method"]["lora"]["layers"] = [0, 3]
    spec = load_trainer_config(spec_to_trainer_config(job)).spec
    model = load_model(spec, str(path), use_gpu=False)
    adapted: dict[int, set] = {}
    for n, p in model.named_parameters():
        if "lora_A" in n and p.requires_grad:
            layer, module = n.split(".layers.")[1].split(".")[0], n.split(".")[-4]
            adapted.setdefault(int(layer), set()).add(module)
    # all-linear on the chosen layers: each of their seven linear modules, nothing else
    every = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert adapted == {0: every, 3: every}
    job["spec"]["method"]["lora"]["layers"] = [1, 4]
    spec = load_trainer_config(spec_to_trainer_config(job)).spec
    with pytest.raises(FreezeError, match=r"^spec.method.lora.layers: \[4\] beyond the model's 4"):
        load_model(spec, str(path), use_gpu=False)


def test_adamw_with_weight_decay_leaves_a_group_at_rate_zero_bit_identical():
    """Decoupled weight decay is scaled by the rate: a waiting group keeps its
    weights bit for bit, with gradients and weight decay, until its step."""
    import torch

    from kubetune_trainer.worker import gated, lr_lambda

    torch.manual_seed(0)
    a, b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    opt = torch.optim.AdamW(
        [{"params": a.parameters(), "lr": 1e-2}, {"params": b.parameters(), "lr": 5e-3}],
        weight_decay=0.1,
    )
    schedule = lr_lambda("cosine", warmup=1, total=10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [gated(schedule, 0), gated(schedule, 3)])
    b0 = [p.detach().clone() for p in b.parameters()]
    for step in range(5):
        opt.zero_grad()
        (a(torch.randn(4, 8)).sum() + b(torch.randn(4, 8)).pow(2).sum()).backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in b.parameters())
        opt.step()
        sched.step()
        same = all(torch.equal(p, q) for p, q in zip(b.parameters(), b0, strict=True))
        assert same == (step < 3), step  # steps 0-2 wait, step 3 is its first update
    assert opt.param_groups[1]["lr"] == pytest.approx(5e-3 * schedule(5))


# ------------------------------------------------------------------ a real run


def _untied_model(path: Path) -> Path:
    """tiny_model with 4 layers and a head of its own (so embeddings and head are
    separate weights)."""
    from model_fixtures import _tiny_lm

    if not (path / "config.json").exists():
        model, tok = _tiny_lm(tie_word_embeddings=False, num_hidden_layers=4)
        model.save_pretrained(path)
        tok.save_pretrained(path)
    return path


FULL = {
    "trainableLayers": [1, 2, 3],
    "trainEmbeddings": False,
    "trainHead": True,
    "unfreeze": {"everySteps": 2},
    "layerLrDecay": 0.8,
}
# top down, one part every 2 steps: head from step 0, layer 3 from 2, layer 2 from 4,
# layer 1 from 6 (after the last of the 6 steps: it never moves); embeddings and
# layer 0 are frozen


def _module_states(prefix: Path, step: int) -> dict:
    import torch

    path = prefix / f"checkpoints/step-{step:08d}/ds/mp_rank_00_model_states.pt"
    return torch.load(path, weights_only=False, map_location="cpu")["module"]


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _part(name: str) -> str:
    return {"head": "lm_head.", "norm": "model.norm.", "embeddings": "model.embed_tokens."}.get(
        name, f"model.layers.{name}."
    )


@pytest.fixture(scope="module")
def frozen_run(_ray_session, tmp_path_factory):
    from lineage_chain import start_ray

    start_ray()
    tmp = tmp_path_factory.mktemp("freeze")
    model = _untied_model(tmp / "tiny4")
    data = H.write_jsonl(tmp / "chat.jsonl", H.chat_rows(64))
    job = H.job(
        model,
        data,
        (tmp / "out").as_uri(),
        name="frozen",
        method={"type": "full", "full": FULL},
        hyperparameters={"maxSteps": 6, "learningRate": 1e-3, "weightDecay": 0.1},
        evaluation={"enabled": False},
        checkpointing={"everySteps": 2, "keepLast": 5},
    )
    cfg = H.trainer_config(job)
    H.fit(cfg)
    return model, cfg, Path(H.local(cfg))


def test_frozen_parts_stay_bit_identical_and_unfreezing_follows_the_steps(frozen_run):
    import torch

    model, cfg, prefix = frozen_run
    start = _weights(model)
    final = _weights(prefix / "model")
    assert set(final) == set(start)

    def moved(weights: dict, part: str) -> bool:
        keys = [k for k in start if k.startswith(_part(part))]
        assert keys, part
        return any(not torch.equal(weights[k], start[k]) for k in keys)

    # never trained: bit-identical in the saved model, and absent from the checkpoints
    assert not moved(final, "embeddings") and not moved(final, "0")
    ckpt = {s: _module_states(prefix, s) for s in (2, 4, 6)}
    for states in ckpt.values():
        assert not any(k.startswith((_part("embeddings"), _part("0"))) for k in states)
        assert any(k.startswith(_part("1")) for k in states)  # waits, but is in the optimizer
    # after 2 steps only the head moved; after 4 layer 3 too; after 6 layer 2 too;
    # layer 1's turn (step 6) never came
    for step, trained in ((2, {"head", "norm"}), (4, {"head", "norm", "3"}), (6, None)):
        states = ckpt[step]
        for part in ("head", "norm", "3", "2", "1"):
            expect = part in trained if trained else part != "1"
            assert moved(states, part) == expect, (step, part)
    for k, v in ckpt[6].items():  # the last checkpoint holds the saved model's weights
        assert torch.equal(v, final[k]), k


def test_trainable_counts_in_outputs_metrics_status_and_summary(frozen_run):
    from transformers import AutoModelForCausalLM

    from kubetune_operator.progress import progress_to_status
    from kubetune_operator.storage_reader import read_snapshot
    from kubetune_trainer.freeze import summary_line
    from kubetune_trainer.local import summary
    from kubetune_trainer.storage import JobStorage

    model, cfg, prefix = frozen_run
    m = AutoModelForCausalLM.from_pretrained(model)
    layer = [_numel(m.model.layers[i]) for i in range(4)]
    head = _numel(m.lm_head) + _numel(m.model.norm)
    params = json.loads((prefix / "outputs.json").read_text())["parameters"]
    assert params["total"] == _numel(m)
    assert params["trainable"] == head + layer[1] + layer[2] + layer[3]
    assert params["layers"] == 4 and params["trainableLayers"] == [1, 2, 3]
    assert [(g["name"], g["fromStep"]) for g in params["groups"]] == [
        ("head", 0),
        ("layer 3", 2),
        ("layer 2", 4),
        ("layer 1", 6),
    ]
    assert [g["lrScale"] for g in params["groups"]] == pytest.approx([1, 1, 0.8, 0.64])
    rows = H.metric_rows(cfg)
    assert {s: rows[s]["trainableParameters"] for s in range(1, 7)} == {
        1: head,
        2: head,
        3: head + layer[3],
        4: head + layer[3],
        5: head + layer[3] + layer[2],
        6: head + layer[3] + layer[2],
    }
    text = summary(JobStorage(cfg.storage_prefix, cfg.spec.output))
    assert summary_line(params) in text
    assert "decoder layers 1-3 of 4, embeddings frozen, head" in text
    snap = read_snapshot(str(prefix), None, {}, schemes=("file",))
    assert (
        progress_to_status(snap)["metrics"]["trainableParameters"] == rows[6]["trainableParameters"]
    )


def test_resume_mid_unfreezing_ends_with_the_uninterrupted_weights(frozen_run, tmp_path):
    """The checkpoint at step 4 (layer 2 about to start) resumed: steps 5 and 6
    train as they did, every group at its rate, and the model is the same."""
    import torch

    from kubetune_trainer.driver import run

    _, ref_cfg, ref = frozen_run
    prefix = tmp_path / "prefix"
    shutil.copytree(ref, prefix)
    shutil.rmtree(prefix / "checkpoints/step-00000006")
    shutil.rmtree(prefix / "model")
    for done in ("progress.json", "outputs.json"):
        (prefix / done).unlink()
    cfg = ref_cfg.model_copy(update={"storage_prefix": prefix.as_uri(), "attempt": 2})
    assert run(cfg, quiet=True, check=False) == 0
    assert json.loads((prefix / "progress.json").read_text())["resumedFrom"] == 4
    want, got = _weights(ref / "model"), _weights(prefix / "model")
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7, msg=k)
    rows, ref_rows = H.metric_rows(cfg), H.metric_rows(ref_cfg)
    for step in (5, 6):
        assert rows[step]["learningRate"] == pytest.approx(ref_rows[step]["learningRate"])
        assert rows[step]["loss"] == pytest.approx(ref_rows[step]["loss"], rel=1e-5)


def test_zero3_keeps_frozen_and_waiting_parts_and_trains_the_rest(ray_local, frozen_run, tmp_path):
    """The same under ZeRO-3, where DeepSpeed partitions every parameter group (and
    the frozen weights too): 2 steps, one part unfrozen per step."""
    import torch

    model, _, _ = frozen_run
    data = H.write_jsonl(tmp_path / "chat.jsonl", H.chat_rows(32))
    full = {"trainableLayers": [2, 3], "trainEmbeddings": False, "unfreeze": {"everySteps": 1}}
    cfg = H.trainer_config(
        H.job(
            model,
            data,
            (tmp_path / "out").as_uri(),
            name="zero3",
            method={"type": "full", "full": {**full, "layerLrDecay": 0.5}},
            hyperparameters={"maxSteps": 2, "learningRate": 1e-3, "weightDecay": 0.1},
            distributed={"zeroStage": 3},
            evaluation={"enabled": False},
            checkpointing={"everySteps": 100, "keepLast": 1},
        )
    )
    H.fit(cfg)
    start, final = _weights(model), _weights(Path(H.local(cfg, "model")))
    for part, trained in (
        ("head", True),  # from step 0
        ("norm", True),
        ("3", True),  # from step 1
        ("2", False),  # from step 2: after the last step
        ("1", False),  # frozen
        ("0", False),
        ("embeddings", False),
    ):
        keys = [k for k in start if k.startswith(_part(part))]
        assert any(not torch.equal(final[k], start[k]) for k in keys) == trained, part
    manifest = json.loads(Path(H.local(cfg, "checkpoints/step-00000002/manifest.json")).read_text())
    assert manifest["zeroStage"] == 3
