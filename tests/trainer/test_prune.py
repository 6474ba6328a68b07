"""spec.model.prune: which layers keepLayers keeps, and the pruned model, on tiny
models built from config (no Ray): same class, fewer layers, the same numbers as
a smaller model built by hand from the kept weights, generation with a KV cache,
and a saved folder that loads back with the reduced layer count. The run through
`kubetune run` is in tests/trainer/test_prune_run.py."""

from __future__ import annotations

import pytest
import trainer_helpers as H

from kubetune_api.models import Prune

pytestmark = pytest.mark.trainer


def _lm(layers: int = 4, **extra):
    import torch

    model = H.small_lm(vocab_size=64, num_hidden_layers=layers, **extra).eval()
    with torch.no_grad():  # norms away from 1, so a layer in the wrong place shows
        for p in model.parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
    return model


def _by_hand(model, kept: list[int]):
    """A fresh model of len(kept) layers holding the kept layers' weights."""
    import re

    settings = {**model.config.to_dict(), "num_hidden_layers": len(kept)}
    if settings.get("layer_types"):
        settings["layer_types"] = [settings["layer_types"][i] for i in kept]
    config = model.config.__class__(**settings)
    small = model.__class__(config).eval()
    renumber = {old: new for new, old in enumerate(kept)}
    state = {}
    for key, value in model.state_dict().items():
        found = re.match(r"model\.layers\.(\d+)\.(.*)", key)
        if found is None:
            state[key] = value
        elif int(found[1]) in renumber:
            state[f"model.layers.{renumber[int(found[1])]}.{found[2]}"] = value
    small.load_state_dict(state, strict=True)
    return small


def test_keep_layers_keeps_both_ends_and_drops_the_middle():
    from kubetune_trainer.prune import default_layers, format_layers, kept_layers

    assert default_layers(30, 15) == [*range(8), *range(23, 30)]
    assert format_layers(default_layers(30, 15)) == "0-7,23-29"
    assert default_layers(30, 1) == [0]
    assert default_layers(4, 3) == [0, 1, 3]
    assert default_layers(5, 2) == [0, 4]
    assert kept_layers(Prune(keep_layers=2), 4) == [0, 3]
    assert kept_layers(Prune(layers=[1, 2]), 4) == [1, 2]


@pytest.mark.parametrize(
    ("prune", "field", "words"),
    [
        (Prune(keep_layers=4), "spec.model.prune.keepLayers", "has 4 decoder layers"),
        (Prune(keep_layers=9), "spec.model.prune.keepLayers", "set it below 4"),
        (Prune(layers=[0, 4, 7]), "spec.model.prune.layers", "[4, 7] beyond"),
        (Prune(layers=[0, 1, 2, 3]), "spec.model.prune.layers", "nothing would be pruned"),
    ],
)
def test_a_choice_the_model_cannot_take_names_the_field(prune, field, words):
    from kubetune_trainer.prune import PruneError, kept_layers

    with pytest.raises(PruneError) as err:
        kept_layers(prune, 4)
    assert str(err.value).startswith(field) and words in str(err.value)


def test_the_pruned_model_is_the_smaller_model_with_the_kept_weights(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from kubetune_trainer.prune import prune_layers

    model = _lm(4)
    kept = [0, 3]
    hand = _by_hand(model, kept)
    report = prune_layers(model, kept)
    assert len(model.model.layers) == 2 and model.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    assert report.layers_before == 4 and report.kept == (0, 3)
    assert report.params_after == sum(p.numel() for p in hand.parameters())
    assert report.params_before - report.params_after == 2 * sum(
        p.numel() for p in model.model.layers[0].parameters()
    )
    assert "pruned 4 → 2 layers" in report.line()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, hand(ids).logits)
    # generation fills the KV cache layer by layer: it needs the renumbered layer_idx
    prompt = ids[:1, :5]
    for m in (model, hand):
        m.config.use_cache = True
    out = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True)
    assert torch.equal(out, hand.generate(prompt, max_new_tokens=8, do_sample=False))
    with torch.no_grad():  # the cached steps match one pass over the whole sequence
        full = model(out).logits[0, 4:-1].argmax(-1)
    assert torch.equal(full, out[0, 5:])
    model.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert back.config.num_hidden_layers == 2 and len(back.model.layers) == 2
    with torch.no_grad():
        assert torch.equal(back(ids).logits, hand(ids).logits)


def test_per_layer_settings_follow_the_kept_layers():
    """Qwen2 with sliding-window attention on some layers: layer_types is per layer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from kubetune_trainer.prune import prune_layers

    model = _lm(
        4,
        config_cls=Qwen2Config,
        model_cls=Qwen2ForCausalLM,
        layer_types=["full_attention", "sliding_attention", "full_attention", "sliding_attention"],
        use_sliding_window=True,
        sliding_window=4,
    )
    kept = [1, 2]
    hand = _by_hand(model, kept)
    prune_layers(model, kept)
    assert model.config.layer_types == ["sliding_attention", "full_attention"]
    ids = torch.randint(0, 64, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, hand(ids).logits)
    out = model.generate(ids[:, :3], max_new_tokens=6, do_sample=False, use_cache=True)
    assert torch.equal(out, hand.generate(ids[:, :3], max_new_tokens=6, do_sample=False))


def test_a_model_without_a_layer_list_fails_naming_prune():
    from transformers import GPT2Config, GPT2LMHeadModel

    from kubetune_trainer.prune import PruneError, prune_layers

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(PruneError, match=r"^spec\.model\.prune: cannot find the decoder layers"):
        prune_layers(model, [0])


def test_kubetune_run_checks_the_layer_count_before_ray_starts(tmp_path):
    """A local model folder: its config.json says how many layers there are."""
    from kubetune_trainer.preflight import Report, check_prune

    _lm(4).config.save_pretrained(tmp_path)
    job = H.job(tmp_path, tmp_path / "d.jsonl", (tmp_path / "out").as_uri())
    job["spec"]["output"]["mergeAdapter"] = True
    for prune, field in (({"keepLayers": 4}, "keepLayers"), ({"layers": [0, 5]}, "layers")):
        job["spec"]["model"]["prune"] = prune
        report = Report()
        check_prune(H.trainer_config(job).spec, report)
        assert [e.path for e in report.errors] == [f"spec.model.prune.{field}"], report.errors
        assert "4 decoder layers" in report.errors[0].message
    job["spec"]["model"]["prune"] = {"keepLayers": 3}
    report = Report()
    check_prune(H.trainer_config(job).spec, report)
    assert report.ok


def test_a_pruned_parent_is_continued_from_its_merged_model(tmp_path):
    """fromJob/fromCheckpoint on a pruned LoRA job's prefix: its merged model (the
    adapter fits only the pruned model); on one of its checkpoints: refused."""
    import json

    from kubetune_trainer import parent as P

    prefix = tmp_path / "parent"
    (prefix / "merged").mkdir(parents=True)
    _lm(2).config.save_pretrained(prefix / "merged")
    step = prefix / "checkpoints/step-00000002"
    (step / "adapter").mkdir(parents=True)
    (step / "adapter/adapter_config.json").write_text("{}")
    (step / "manifest.json").write_text("{}")
    (prefix / "outputs.json").write_text(
        json.dumps(
            {
                "adapter": str(prefix / "adapter"),
                "mergedModel": str(prefix / "merged"),
                "pruned": {"layersBefore": 4, "keptLayers": [0, 3]},
            }
        )
    )
    (prefix / "run.json").write_text(
        json.dumps({"baseModel": {"uri": "/m", "prune": {"keepLayers": 2}}})
    )

    def config(uri):
        job = H.job(tmp_path / "base", tmp_path / "d.jsonl", (tmp_path / "out").as_uri())
        job["spec"]["model"].update(fromCheckpoint=str(uri), mergeParent=True)
        return H.trainer_config(job)

    assert P.locate(config(prefix))[0] == str(prefix / "merged")
    found = P.resolve(config(prefix))
    assert found.kind == "model" and found.local == str(prefix / "merged")
    parent = P.resolve(config(step))
    assert parent.kind == "adapter"
    with pytest.raises(P.ParentError, match="trained on a pruned model"):
        P.check_base(parent, config(step).spec.model)
