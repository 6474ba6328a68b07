"""A tiny model for the tiers that train: built from config (random weights) with
SmolLM2's tokenizer, so a Ray + DeepSpeed run takes seconds. Shared by tests/trainer
and tests/e2e (tests/ is on sys.path through tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMOL = REPO / ".cache/models/SmolLM2-135M-Instruct"


def prepare_quickstart() -> None:
    from kubetune_trainer import quickstart

    quickstart.prepare_model(REPO)
    quickstart.prepare_data(REPO)


def tiny_model(path: Path) -> Path:
    """A 2-layer Llama built from config (random weights) with SmolLM2's tokenizer."""
    if (path / "config.json").exists():
        return path
    from transformers import AutoTokenizer

    prepare_quickstart()
    tok = AutoTokenizer.from_pretrained(SMOL)
    model = small_lm(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def small_lm(vocab_size: int = 100, config_cls=None, model_cls=None, **extra):
    """An in-memory 2-layer causal LM (Llama unless other classes are given), seeded."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    settings = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "use_cache": False,
        **extra,
    }
    return (model_cls or LlamaForCausalLM)(
        (config_cls or LlamaConfig)(vocab_size=vocab_size, **settings)
    )
