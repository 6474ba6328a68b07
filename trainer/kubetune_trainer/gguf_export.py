"""GGUF files of a saved model folder, for llama.cpp and Ollama (output.gguf).

`write` converts a Hugging Face folder (the merged model or a full fine-tune's)
into one GGUF file per requested type, through the `gguf` package: the
architecture's hyperparameters, the tokenizer (a byte-level BPE vocabulary with
its merges, token types, special token ids and chat template) and the weights.

Weights:
- 1-D tensors (the RMS norms) are stored as f32, as llama.cpp expects.
- Every 2-D weight gets the requested type. For the 4- and 5-bit types the
  token embedding and the output head stay q8_0: they are the tensors whose
  error shows most in the loss (with tied embeddings one tensor is both), and
  llama.cpp's own quantizer also keeps them at a higher precision.
- A weight whose rows do not divide into the type's blocks (32 values) falls
  back to f16; `ExportReport.fallback` names those tensors.
- llama.cpp applies rotary embeddings to interleaved pairs of each head's
  dimensions, Hugging Face's Llama to its two halves: the rows of q_proj and
  k_proj are reordered per head to llama.cpp's order (the reordering that
  transformers' GGUF loader undoes on reading).

`check` reads a file back and compares it with the folder it came from: the
tensors' names, shapes and types, the tokenizer (token ids of a few strings and
the chat template's output) and the held-out loss of the dequantized weights
against the folder's, within TOLERANCE for the type. Only Llama-family models
(LlamaForCausalLM: SmolLM2, Llama 2/3-style without rope scaling beyond linear)
are converted; any other architecture is refused with the field to change.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

# output.gguf.types -> the gguf package's type (by name, imported lazily)
TYPES = ("f16", "q8_0", "q5_0", "q4_1", "q4_0")
# The largest relative increase of the held-out loss (gguf / safetensors - 1)
# accepted per type; set with headroom from SmolLM2-135M-Instruct's (docs/gguf.md):
# f16 +0.02%, q8_0 -0.09%, q5_0 -1.9%, q4_1 0.0% (its weights came from a Q4_1
# file), q4_0 +11.5% there.
TOLERANCE = {"f16": 0.002, "q8_0": 0.01, "q5_0": 0.04, "q4_1": 0.10, "q4_0": 0.15}
# 4- and 5-bit files keep these at q8_0 (see the module docstring)
HIGH_PRECISION = ("token_embd.weight", "output.weight")
SAMPLE_TEXTS = (
    "Hello, world! How are you today?",
    "The year 2024 had 366 days; 3.14159 is pi.",
    "  leading spaces, tabs\tand\nnew lines",
    "Ünïcödé: café, naïve, 東京, emoji 🙂",
)


class ExportError(ValueError):
    """The model cannot be written as GGUF: the message names the field and the fix."""


@dataclass
class ExportReport:
    type: str
    path: str
    bytes: int
    seconds: float
    tensors: int
    fallback: list[str] = field(default_factory=list)  # 2-D weights kept at f16


@dataclass
class CheckReport:
    type: str
    tensors_ok: bool
    tokenizer_ok: bool
    eval_loss: Optional[float] = None  # the GGUF file's held-out loss
    reference_eval_loss: Optional[float] = None  # the safetensors folder's
    relative_increase: Optional[float] = None
    tolerance: float = 0.0
    within_tolerance: Optional[bool] = None
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _quant_type(name: str):
    import gguf

    return {
        "f16": gguf.GGMLQuantizationType.F16,
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
        "q5_0": gguf.GGMLQuantizationType.Q5_0,
        "q4_1": gguf.GGMLQuantizationType.Q4_1,
        "q4_0": gguf.GGMLQuantizationType.Q4_0,
    }[name]


def _file_type(name: str) -> int:
    import gguf

    return {
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "q5_0": gguf.LlamaFileType.MOSTLY_Q5_0,
        "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
        "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    }[name]


def supported(config: dict) -> Optional[str]:
    """Why the model in config.json cannot be exported, or None."""
    archs = config.get("architectures") or []
    if config.get("model_type") != "llama" or archs not in ([], ["LlamaForCausalLM"]):
        name = archs[0] if archs else config.get("model_type")
        return (
            f"output.gguf: GGUF export supports Llama-family models (LlamaForCausalLM, e.g. "
            f"SmolLM2), not {name}; remove output.gguf or start from a Llama-family model"
        )
    if config.get("attention_bias") or config.get("mlp_bias"):
        return "output.gguf: a Llama model with bias terms is not supported; remove output.gguf"
    kind = _rope(config)[1].get("rope_type", "default")
    if kind not in ("default", "linear"):
        return (
            f"output.gguf: rope scaling {kind!r} is not supported (default and linear are); "
            "remove output.gguf"
        )
    return None


def _rope(config: dict) -> tuple[float, dict]:
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    merged = {**{k: v for k, v in params.items() if k != "rope_theta"}, **scaling}
    if "type" in merged and "rope_type" not in merged:
        merged["rope_type"] = merged["type"]
    return float(theta), merged


def _rope_order(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of q_proj/k_proj from Hugging Face's rotary layout (two halves per
    head) to llama.cpp's (interleaved pairs)."""
    half = weight.shape[0] // n_head // 2
    return weight.reshape(n_head, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


# ------------------------------------------------------------------- tokenizer


def _pre_tokenizer(tok_json: dict) -> str:
    """llama.cpp's name for the pre-tokenizer tokenizer.json describes."""
    pre = tok_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"  # llama.cpp's name for GPT-2's split
    if (
        kinds == ["Digits", "ByteLevel"]
        and steps[0].get("individual_digits")
        and steps[1].get("use_regex", True)
    ):
        return "smollm"  # SmolLM's: single digits, then GPT-2's split
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = (steps[0].get("pattern") or {}).get("Regex", "")
        if "\\p{N}{1,3}" in pattern:
            return "llama-bpe"  # Llama 3's
    raise ExportError(
        f"output.gguf: the tokenizer's pre-tokenizer ({'+'.join(map(str, kinds))}) is not one "
        "llama.cpp is known to reproduce (GPT-2, SmolLM or Llama 3 style); remove output.gguf"
    )


def _add_tokenizer(writer, folder: Path, vocab_size: int) -> None:
    import gguf
    from transformers import AutoTokenizer

    tok_json = _read_json(folder / "tokenizer.json")
    model = tok_json.get("model") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(tok_json.get("pre_tokenizer")):
        raise ExportError(
            "output.gguf: GGUF export needs a byte-level BPE tokenizer (tokenizer.json); "
            "remove output.gguf"
        )
    tok = AutoTokenizer.from_pretrained(str(folder))
    vocab = tok.get_vocab()
    if len(vocab) > vocab_size:
        raise ExportError(
            f"output.gguf: the tokenizer has {len(vocab)} tokens, the model {vocab_size}"
        )
    by_id = {i: t for t, i in vocab.items()}
    added = {t["content"]: t.get("special", False) for t in tok_json.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:  # the embedding's padding rows
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif token in added:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if added[token] else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(tok_json))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for attr, add in (
        ("bos_token_id", writer.add_bos_token_id),
        ("eos_token_id", writer.add_eos_token_id),
        ("unk_token_id", writer.add_unk_token_id),
        ("pad_token_id", writer.add_pad_token_id),
    ):
        value = getattr(tok, attr, None)
        if value is not None:
            add(int(value))
    writer.add_add_bos_token(bool(getattr(tok, "add_bos_token", False)))
    writer.add_add_space_prefix(False)
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)


# --------------------------------------------------------------------- writing


def _tensors(folder: Path):
    """(name, float32 array) for every weight in the folder's safetensors files."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ExportError(f"output.gguf: no safetensors weights in {folder}")
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (a safetensors file, not a dict)
                yield name, f.get_tensor(name).float().numpy()


def write(folder: Path, out: Path, qtype: str, name: str = "model") -> ExportReport:
    """One GGUF file of the model in `folder`, its 2-D weights in `qtype`."""
    import gguf
    from gguf.quants import quantize

    if qtype not in TYPES:
        raise ExportError(f"output.gguf.types: {qtype!r} is not one of {', '.join(TYPES)}")
    start = time.monotonic()
    folder, out = Path(folder), Path(out)
    config = _read_json(folder / "config.json")
    why = supported(config)
    if why:
        raise ExportError(why)
    n_layer = config["num_hidden_layers"]
    n_head = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // n_head
    theta, scaling = _rope(config)

    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_name(name)
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(hidden)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != hidden // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(theta)
    if scaling.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(_file_type(qtype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, folder, config["vocab_size"])

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layer)
    target = _quant_type(qtype)
    fallback: list[str] = []
    count = 0
    for hf_name, data in _tensors(folder):
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        if hf_name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue
        gname = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise ExportError(f"output.gguf: no GGUF name for the weight {hf_name}")
        if hf_name.endswith("q_proj.weight"):
            data = _rope_order(data, n_head)
        elif hf_name.endswith("k_proj.weight"):
            data = _rope_order(data, n_kv)
        kind = target
        if data.ndim != 2:
            kind = gguf.GGMLQuantizationType.F32
        elif qtype in ("q5_0", "q4_1", "q4_0") and gname in HIGH_PRECISION:
            kind = gguf.GGMLQuantizationType.Q8_0
        block = gguf.GGML_QUANT_SIZES[kind][0]
        if data.shape[-1] % block:
            fallback.append(gname)
            kind = gguf.GGMLQuantizationType.F16
        if kind == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gname, data.astype(np.float32))
        elif kind == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(gname, data.astype(np.float16))
        else:
            writer.add_tensor(gname, quantize(data, kind), raw_dtype=kind)
        count += 1
    out.parent.mkdir(parents=True, exist_ok=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return ExportReport(
        type=qtype,
        path=str(out),
        bytes=out.stat().st_size,
        seconds=round(time.monotonic() - start, 2),
        tensors=count,
        fallback=fallback,
    )


# ------------------------------------------------------------------ read-back


def load(path: Path, dtype=None):
    """(model, tokenizer) from a GGUF file, dequantized by transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=dtype or torch.float32
    )
    return model.eval(), tok


def held_out_loss(model, examples: list[tuple[list[int], list[int]]]) -> float:
    """Mean loss per predicted token over (input_ids, labels) pairs, -100 unscored."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in examples:
            inp = torch.tensor([ids])
            lab = torch.tensor([labels])
            logits = model(input_ids=inp).logits[0, :-1].float()
            target = lab[0, 1:]
            keep = target != -100
            if not keep.any():
                continue
            loss = torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum")
            total += float(loss)
            count += int(keep.sum())
    return total / count if count else math.nan


def _expected_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    import gguf

    config = _read_json(folder / "config.json")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    out = {}
    for hf_name, data in _tensors(folder):
        if hf_name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue
        gname = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gname:
            out[gname] = tuple(data.shape)
    return out


def check(
    path: Path,
    folder: Path,
    qtype: str,
    examples: list[tuple[list[int], list[int]]],
    reference_loss: Optional[float] = None,
    reference=None,
) -> CheckReport:
    """Read a GGUF file back and compare it with the folder it was written from.
    `reference`: the folder's model, already loaded (else loaded here when a
    loss is to be compared and `reference_loss` is not given)."""
    import gguf
    from transformers import AutoTokenizer

    path, folder = Path(path), Path(folder)
    report = CheckReport(type=qtype, tensors_ok=True, tokenizer_ok=True)
    report.tolerance = TOLERANCE[qtype]
    reader = gguf.GGUFReader(str(path))
    expected = _expected_shapes(folder)
    found = {t.name: t for t in reader.tensors}
    if set(found) != set(expected):
        report.tensors_ok = False
        missing = sorted(set(expected) - set(found))[:5]
        extra = sorted(set(found) - set(expected))[:5]
        report.problems.append(f"tensors differ: missing {missing}, unexpected {extra}")
    for gname, shape in expected.items():
        t = found.get(gname)
        if t is None:
            continue
        # GGUF lists dimensions fastest first: the reverse of numpy's order
        if tuple(int(x) for x in reversed(t.shape.tolist())) != shape:
            report.tensors_ok = False
            report.problems.append(f"{gname}: shape {list(t.shape)} for {list(shape)}")
        if len(shape) == 1 and t.tensor_type != gguf.GGMLQuantizationType.F32:
            report.tensors_ok = False
            report.problems.append(f"{gname}: {t.tensor_type.name}, not F32")

    model, tok = load(path)
    original = AutoTokenizer.from_pretrained(str(folder))
    texts = SAMPLE_TEXTS
    if reader.fields["tokenizer.ggml.pre"].contents() == "smollm":
        # transformers' GGUF reader leaves out SmolLM's split of numbers into
        # single digits (llama.cpp applies it): texts with digits would differ there
        texts = tuple(t for t in texts if not any(c.isdigit() for c in t))
    for text in texts:
        a = original(text, add_special_tokens=False)["input_ids"]
        b = tok(text, add_special_tokens=False)["input_ids"]
        if a != b:
            report.tokenizer_ok = False
            report.problems.append(f"tokenizer: {text!r} -> {b[:8]}..., expected {a[:8]}...")
    if original.chat_template:
        chat = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello"}]
        if original.apply_chat_template(chat, tokenize=False) != tok.apply_chat_template(
            chat, tokenize=False
        ):
            report.tokenizer_ok = False
            report.problems.append("tokenizer: the chat template renders differently")
    if examples:
        if reference_loss is None:
            if reference is None:
                reference = _load_folder(folder)
            reference_loss = held_out_loss(reference, examples)
        report.reference_eval_loss = reference_loss
        report.eval_loss = held_out_loss(model, examples)
        report.relative_increase = report.eval_loss / reference_loss - 1
        report.within_tolerance = report.relative_increase <= report.tolerance
    return report


def _load_folder(folder: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


# ------------------------------------------------------------ own process


def export_all(folder: Path, out_dir: Path, types, name: str, examples) -> list[dict]:
    """Write and check each type; the folder's held-out loss is computed once."""
    reference = _load_folder(folder) if examples else None
    ref_loss = held_out_loss(reference, examples) if examples else None
    done = []
    for qtype in types:
        made = write(folder, Path(out_dir) / f"model-{qtype}.gguf", qtype, name)
        checked = check(Path(made.path), folder, qtype, examples, ref_loss)
        done.append({"export": asdict(made), "check": checked.as_dict()})
    return done


def run_in_subprocess(folder: Path, out_dir: Path, types, name: str, examples) -> list[dict]:
    """export_all in a fresh Python process: the training worker's state (DeepSpeed's
    ZeRO-3 hooks on module and tensor creation, Ray's handlers) stays out of the
    models loaded for the check, and their memory goes back when it ends."""
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        request = Path(tmp) / "request.json"
        result = Path(tmp) / "result.json"
        request.write_text(
            json.dumps(
                {
                    "folder": str(folder),
                    "out_dir": str(out_dir),
                    "types": list(types),
                    "name": name,
                    "examples": [list(map(list, e)) for e in examples],
                }
            )
        )
        proc = subprocess.run(
            [sys.executable, "-m", "kubetune_trainer.gguf_export", str(request), str(result)],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise ExportError(f"output.gguf: the GGUF export failed: {tail[0][:500]}")
        return json.loads(result.read_text())


def main(argv=None) -> None:
    import sys

    request, result = (argv or sys.argv[1:])[:2]
    r = json.loads(Path(request).read_text())
    examples = [(ids, labels) for ids, labels in r["examples"]]
    done = export_all(Path(r["folder"]), Path(r["out_dir"]), r["types"], r["name"], examples)
    Path(result).write_text(json.dumps(done))


if __name__ == "__main__":
    main()
