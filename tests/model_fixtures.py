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
    if not (path / "config.json").exists():
        model, tok = _tiny_lm(tie_word_embeddings=True)
        model.save_pretrained(path)
        tok.save_pretrained(path)
    return path


def _tiny_lm(tie_word_embeddings: bool):
    """tiny_model's model (in memory) and SmolLM2's tokenizer."""
    from transformers import AutoTokenizer

    prepare_quickstart()
    tok = AutoTokenizer.from_pretrained(SMOL)
    model = small_lm(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        max_position_embeddings=512,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    return model, tok


def peaked_model(path: Path, letters: str = "abcdefghijklmnop") -> Path:
    """A 2-layer Llama like tiny_model whose sampling starts concentrated on a few
    tokens, for the GRPO tests. A model with random weights samples almost uniformly
    over SmolLM2's 49k tokens, so every completion of a group scores alike and there
    is little for GRPO to learn from. Here the weights stay random except two things,
    set once at build time: every input embedding carries a constant 1.0 in dimension
    0 (a channel the layers, LoRA adapters included, can use as a bias), and the
    output head (not tied to the embeddings) puts a large negative weight on that
    channel for every token but the single letters in `letters`, whose rows get a
    larger random spread. Sampling then starts spread over those letters (each about
    equally likely, together 99.9% of the first token's probability; eos excluded, so
    completions run to maxNewTokens), rewards vary
    within a group, and training moves real weights as on any model."""
    if (path / "config.json").exists():
        return path
    import torch

    model, tok = _tiny_lm(tie_word_embeddings=False)
    keep = [tok.convert_tokens_to_ids(c) for c in letters]
    with torch.no_grad():
        model.get_input_embeddings().weight[:, 0] = 1.0
        head = model.get_output_embeddings().weight
        head[:, 0] = -PEAK_OFFSET
        rows = torch.randn(len(keep), head.shape[1], generator=torch.Generator().manual_seed(1))
        head[keep] = rows * PEAK_SPREAD
        head[keep, 0] = 0.0
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


# peaked_model's head: the logit offset per unit of the constant channel for the
# tokens left out, and the spread of the kept letters' rows
PEAK_OFFSET = 2.0
PEAK_SPREAD = 0.1


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
