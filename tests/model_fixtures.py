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


def tiny_model(path: Path, **extra) -> Path:
    """A 2-layer Llama built from config (random weights) with SmolLM2's tokenizer;
    `extra`: other config values (e.g. num_hidden_layers)."""
    if not (path / "config.json").exists():
        model, tok = _tiny_lm(tie_word_embeddings=True, **extra)
        model.save_pretrained(path)
        tok.save_pretrained(path)
    return path


def _tiny_lm(tie_word_embeddings: bool, **extra):
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
        **extra,
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


# ------------------------------------------------------------------ GGUF export
# A tiny Llama with a small byte-level BPE tokenizer trained here (seconds, no
# 49k-token vocabulary to convert): tests/trainer/test_gguf_export.py and
# tests/trainer/test_gguf_llama_cpp.py.

CHAT = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you today? 2024 had 366 days.",
    "Ünïcödé: café, naïve, 東京, emoji 🙂 and tabs\tand\nnew lines",
] * 20


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(
        CORPUS,
        trainers.BpeTrainer(
            vocab_size=320,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
    )
    fast.chat_template = CHAT
    return fast


def tiny_folder(path: Path, hidden: int = 64, extra_vocab: int = 3, tied: bool = True) -> Path:
    """A 2-layer Llama (4 heads, 2 kv heads) saved with the tokenizer; the embedding
    has `extra_vocab` rows beyond the tokenizer's tokens, as padded vocabularies do."""
    import torch

    tok = tiny_tokenizer()
    model = small_lm(
        vocab_size=len(tok) + extra_vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        rope_theta=50000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tied,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    with torch.no_grad():  # norms away from 1, so a misplaced norm shows
        for p in model.parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
