"""The outputs a serving engine loads, loaded with plain transformers/peft in the
project's venv (transformers 5) and in a separate venv with the 4.x line that
serving stacks still run (scripts/compat-env.sh): same config values, token ids,
chat template result, logits and greedy completion.

No Ray here: export's functions are called on adapters made with peft. The
trainer's own outputs (bf16 merge, full fine-tune) are loaded and generated in
tests/trainer/test_ray_deepspeed.py.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import trainer_helpers as H

pytestmark = [pytest.mark.trainer, pytest.mark.timeout(900)]

PROBE = Path(__file__).with_name("serving_probe.py")


@pytest.fixture(scope="module")
def compat_python() -> str:
    """The compat venv's interpreter, built (or found cached) by the project's script."""
    script = H.REPO / "scripts/compat-env.sh"
    first = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    venv = first.stdout.strip().splitlines()[-1]
    t0 = time.monotonic()
    again = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60)
    assert again.stdout.strip().splitlines()[-1] == venv  # cached by the inputs' hash
    assert time.monotonic() - t0 < 10
    assert Path(venv, ".complete").exists() and Path(venv).name.startswith("compat-")
    return str(Path(venv, "bin/python"))


def _spec(model_path: Path, precision: str = "bf16"):
    return SimpleNamespace(
        model=SimpleNamespace(
            name=None, uri=str(model_path), revision=None, trust_remote_code=False, gguf_file=None
        ),
        hyperparameters=SimpleNamespace(precision=precision),
    )


def _make_adapter(base_dir: Path, out: Path) -> Path:
    """A LoRA adapter on every linear layer with random (non-zero) B, as training leaves it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kubetune_trainer import export

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules="all-linear",
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    get_peft_model(base, config).save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)
    export.finish_adapter(out)
    return out


def _probe(python: str, model: Path, out: Path, adapter: Path | None = None):
    cmd = [python, str(PROBE), str(model), str(out)]
    if adapter is not None:
        cmd += ["--adapter", str(adapter)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _reports(compat_python: str, tmp: Path, model: Path, adapter: Path | None = None):
    """The probe's reports from transformers 5 and 4.x, run side by side."""
    procs = {
        "v5": _probe(sys.executable, model, tmp / "v5.json", adapter),
        "v4": _probe(compat_python, model, tmp / "v4.json", adapter),
    }
    for name, p in procs.items():
        log, _ = p.communicate(timeout=600)
        assert p.returncode == 0, f"{name} probe failed:\n{log[-4000:]}"
    v5, v4 = (json.loads((tmp / f"{n}.json").read_text()) for n in ("v5", "v4"))
    assert v5["transformers"].startswith("5.") and v4["transformers"].startswith("4.57.")
    return v5, v4


def _assert_alike(v5: dict, v4: dict, atol: float) -> None:
    for key in ("config", "rope", "saved_dtype", "special_tokens", "ids", "decoded"):
        assert v4[key] == v5[key], (key, v4[key], v5[key])
    assert v4["vocab_size"] == v5["vocab_size"]
    assert v4["chat_text"] == v5["chat_text"] and v4["chat_ids"] == v5["chat_ids"]
    diff = max(abs(a - b) for a, b in zip(v4["last_logits"], v5["last_logits"], strict=True))
    assert diff <= atol, diff
    assert v4["greedy"] == v5["greedy"] and len(v5["greedy"]) > 0


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """An adapter on the shipped SmolLM2-135M-Instruct and the model it merges into."""
    from kubetune_trainer import export

    H.prepare_quickstart()
    root = tmp_path_factory.mktemp("smol")
    adapter = _make_adapter(H.SMOL, root / "adapter")
    merged = root / "merged"
    export.merge_adapter(str(H.SMOL), _spec(H.SMOL), adapter, merged)
    return adapter, merged


def test_merged_smollm2_is_bf16_and_loads_alike_in_transformers_4(compat_python, smol, tmp_path):
    from safetensors import safe_open

    adapter, merged = smol

    with safe_open(merged / "model.safetensors", "pt") as f:
        dtypes = {str(f.get_slice(k).get_dtype()) for k in f.keys()}  # noqa: SIM118
    assert dtypes == {"BF16"}, dtypes
    base_bytes = (H.SMOL / "model.safetensors").stat().st_size  # fp32
    assert (merged / "model.safetensors").stat().st_size < 0.55 * base_bytes
    for name in ("tokenizer.json", "chat_template.jinja", "generation_config.json"):
        assert (merged / name).exists(), name
    special = json.loads((merged / "special_tokens_map.json").read_text())
    assert special["eos_token"] == "<|im_end|>" and special["pad_token"]
    config = json.loads((merged / "config.json").read_text())
    assert config["torch_dtype"] == config["dtype"] == "bfloat16"

    v5, v4 = _reports(compat_python, tmp_path, merged)
    # 4.x reads the rotary base from the top-level key: without it, 10000 and wrong logits
    assert v4["rope"] == v5["rope"] == {"rope_theta": 100000.0, "rope_type": "default"}
    assert v4["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert v5["chat_text"].endswith("<|im_start|>assistant\n")
    _assert_alike(v5, v4, atol=1e-4)
    assert all(math.isfinite(x) for x in v5["last_logits"])


def test_adapter_loads_with_peft_in_both_lines_and_fits_vllm(compat_python, tmp_path):
    from safetensors.torch import load_file

    base = H.tiny_model(tmp_path / "base")
    adapter = _make_adapter(base, tmp_path / "adapter")

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    # `all-linear` resolved to concrete module names (peft writes their paths), the
    # language model's linear layers only; vLLM serves r <= --max-lora-rank
    targets = cfg["target_modules"]
    assert isinstance(targets, list) and targets == sorted(targets)
    assert {t.rsplit(".", 1)[-1] for t in targets} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert cfg["r"] == 4 and cfg["peft_type"] == "LORA" and cfg["bias"] == "none"
    assert not cfg["use_dora"] and not cfg.get("modules_to_save")
    tensors = load_file(adapter / "adapter_model.safetensors")
    # vLLM refuses weights outside the LoRA A/B of its target modules (no embeddings, no head)
    for key in tensors:
        assert key.startswith("base_model.model.model.layers."), key
        assert key.endswith((".lora_A.weight", ".lora_B.weight")), key
    assert len(tensors) == 2 * 7 * 2  # A and B, 7 modules, 2 layers

    v5, v4 = _reports(compat_python, tmp_path, base, adapter)
    assert v4["peft"].startswith("0.17.") and v5["peft"].startswith("0.21.")
    _assert_alike(v5, v4, atol=1e-5)


def test_portable_files_keep_what_transformers_5_reads(tmp_path):
    """Keys are only added or renamed to names both lines read: transformers 5
    loads the rewritten folder with the values it wrote."""
    from transformers import AutoConfig, AutoTokenizer

    from kubetune_trainer import export

    src = H.tiny_model(tmp_path / "base")
    tok = AutoTokenizer.from_pretrained(src)
    tok.add_special_tokens({"additional_special_tokens": ["<tool>", "</tool>"]})
    out = tmp_path / "out"
    tok.save_pretrained(out)
    config = AutoConfig.from_pretrained(src)
    config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 50000.0}
    config.save_pretrained(out)
    before_cfg = AutoConfig.from_pretrained(out).to_dict()
    before_tok = AutoTokenizer.from_pretrained(out)

    export.make_portable(out)
    export.make_portable(out)  # idempotent
    written = json.loads((out / "config.json").read_text())
    assert written["rope_theta"] == 50000.0
    assert written["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_cfg["additional_special_tokens"] == ["<tool>", "</tool>"]
    assert "extra_special_tokens" not in tok_cfg
    special = json.loads((out / "special_tokens_map.json").read_text())
    assert special["additional_special_tokens"] == ["<tool>", "</tool>"]

    after_cfg = AutoConfig.from_pretrained(out).to_dict()
    for key in ("rope_parameters", "vocab_size", "hidden_size", "dtype", "eos_token_id"):
        assert after_cfg.get(key) == before_cfg.get(key), key
    after_tok = AutoTokenizer.from_pretrained(out)
    text = "<tool>call</tool> hello"
    assert after_tok(text)["input_ids"] == before_tok(text)["input_ids"]
    assert after_tok.all_special_tokens == before_tok.all_special_tokens
    assert after_tok.convert_tokens_to_ids("<tool>") == before_tok.convert_tokens_to_ids("<tool>")
