"""Outputs a serving engine loads: the merged model, the adapter, a full fine-tune.

transformers 5 writes files that the 4.x line (still what most serving stacks
run) misreads or refuses:

- config.json nests the rotary settings in `rope_parameters`; 4.x reads the
  top-level `rope_theta` and `rope_scaling` and, finding neither, silently
  uses its default base (10000 for Llama) — a model that loads and serves
  wrong outputs. 4.x also names the weights' dtype `torch_dtype`.
- tokenizer_config.json names the class `TokenizersBackend`, which 4.x does not
  have (`Tokenizer class TokenizersBackend does not exist`); its generic class
  for a tokenizer.json is `PreTrainedTokenizerFast`, which 5 keeps as an alias.
- 5 lists extra special tokens in `extra_special_tokens`, a name that 4.x
  reads as a dict of named tokens; 4.x's list is `additional_special_tokens`.
- special_tokens_map.json is not written at all; older loaders read it.
- the chat template lives only in chat_template.jinja; loaders before 4.43
  read it from tokenizer_config.json.

`make_portable` adds what 4.x needs beside what 5 wrote, so both lines load
the same values (tests/trainer/test_serving_outputs.py loads them in a 4.57
venv built by scripts/compat-env.sh and compares config values, token ids,
chat template output and logits). Only keys are added or renamed to names
both lines read; no value is recomputed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from kubetune_api import storage as contract

from . import prune
from .model import label_config, torch_dtype

SPECIAL_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
    "additional_special_tokens",
)
# Keys transformers 5 records about how the files were loaded, not what they hold.
LOAD_TIME_KEYS = ("is_local", "local_files_only")


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _write(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def portable_config(cfg: dict) -> dict:
    """config.json readable by transformers 4.x and 5 with the same values."""
    out = dict(cfg)
    rope = cfg.get("rope_parameters")
    # A per-layer-type mapping (Gemma 3 style) has model-specific 4.x keys: left as is.
    if isinstance(rope, dict) and ("rope_theta" in rope or "rope_type" in rope):
        if "rope_theta" in rope:
            out.setdefault("rope_theta", rope["rope_theta"])
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        kind = scaling.get("rope_type", "default")
        if kind != "default" and out.get("rope_scaling") is None:
            # only keys 5 also knows: it folds rope_scaling back into rope_parameters
            out["rope_scaling"] = scaling
        if "partial_rotary_factor" in rope:
            out.setdefault("partial_rotary_factor", rope["partial_rotary_factor"])
    if "dtype" in cfg:
        out.setdefault("torch_dtype", cfg["dtype"])
    return out


def portable_tokenizer_config(cfg: dict, chat_template: str | None) -> dict:
    out = {k: v for k, v in cfg.items() if k not in LOAD_TIME_KEYS}
    if out.get("tokenizer_class") == "TokenizersBackend":
        out["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = out.get("extra_special_tokens")
    if isinstance(extra, list):
        del out["extra_special_tokens"]
        if extra:
            out["additional_special_tokens"] = extra
    if chat_template is not None and "chat_template" not in out:
        out["chat_template"] = chat_template
    return out


def special_tokens_map(tok_cfg: dict) -> dict:
    return {k: tok_cfg[k] for k in SPECIAL_TOKENS if tok_cfg.get(k) is not None}


def make_portable(folder: Path) -> None:
    """Rewrite a saved model or tokenizer folder so transformers 4.x and 5 load it
    alike (see the module docstring). Idempotent."""
    folder = Path(folder)
    cfg = _read(folder / "config.json")
    if cfg is not None and "model_type" in cfg:  # an adapter's folder has no model config
        _write(folder / "config.json", portable_config(cfg))
    tok_cfg = _read(folder / "tokenizer_config.json")
    if tok_cfg is not None:
        template_file = folder / "chat_template.jinja"
        template = template_file.read_text() if template_file.exists() else None
        tok_cfg = portable_tokenizer_config(tok_cfg, template)
        _write(folder / "tokenizer_config.json", tok_cfg)
        if not (folder / "special_tokens_map.json").exists():
            _write(folder / "special_tokens_map.json", special_tokens_map(tok_cfg))


def merge_adapter(
    model_path: str,
    spec,
    adapter_dir: Path,
    out: Path,
    parent_adapter: str | None = None,
    labels: list[str] | None = None,
) -> None:
    """The base model with the adapter merged, as safetensors in the training
    precision, with the tokenizer, chat template, special tokens and generation
    config, loadable by transformers 4.x and 5. `parent_adapter`: merged into the
    base first, as training merged it before continuing.

    The merge itself runs in fp32 on the CPU (W + BA rounded once, at the end),
    then the weights are cast: a bf16 model is half the bytes of fp32 and what
    the job trained in. `labels` (method.task classification): the base is
    AutoModelForSequenceClassification with those labels, and the adapter's saved
    head (`score`) replaces its new one."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = spec.model
    kwargs = {
        "revision": m.revision,
        "trust_remote_code": m.trust_remote_code,
        "dtype": torch.float32,
    }
    if m.gguf_file:
        kwargs["gguf_file"] = m.gguf_file
    if labels is not None:
        from transformers import AutoModelForSequenceClassification

        pad_id = AutoTokenizer.from_pretrained(str(adapter_dir)).pad_token_id
        kwargs.update(label_config(labels, pad_id))
        base = AutoModelForSequenceClassification.from_pretrained(model_path, **kwargs)
    else:
        base = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    if parent_adapter:
        base = PeftModel.from_pretrained(base, parent_adapter).merge_and_unload()
    prune.apply(base, spec)  # the adapter was trained on the pruned model
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    dtype = torch_dtype(spec.hyperparameters.precision)
    merged = merged.to(dtype)
    merged.config.dtype = dtype
    merged.config.use_cache = True  # training turned it off; generation wants it
    merged.save_pretrained(str(out), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(adapter_dir)).save_pretrained(str(out))
    make_portable(out)


def portable_adapter_config(cfg: dict) -> dict:
    """adapter_config.json as peft and vLLM's LoRA loader read it: concrete
    target module names (peft resolves `all-linear` when it wraps the model;
    vLLM matches names) in a stable order."""
    out = dict(cfg)
    targets = out.get("target_modules")
    if isinstance(targets, list | set | tuple):
        out["target_modules"] = sorted(targets)
    return out


def finish_adapter(folder: Path) -> None:
    folder = Path(folder)
    cfg = _read(folder / "adapter_config.json")
    if cfg is not None:
        _write(folder / "adapter_config.json", portable_adapter_config(cfg))
    make_portable(folder)


def base_model_name(spec) -> str:
    m = spec.model
    name = m.name or contract.strip_userinfo(m.uri)
    return f"{name}@{m.revision}" if m.name and m.revision else name


def describe(
    kind: str, uri: str, spec, folder: Path, labels: Optional[list[str]] = None
) -> contract.ServableOutput:
    """outputs.json's entry for one saved folder: what it is and how to load it
    (`labels`: a classifier's, method.task classification)."""
    folder = Path(folder)
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    rank = None
    base = base_model_name(spec)
    if kind == contract.OutputKind.adapter.value:
        fmt = contract.OutputFormat.peft_lora.value
        rank = (_read(folder / "adapter_config.json") or {}).get("r")
        if spec.model.prune is not None:  # it fits the pruned model only: say so
            choice = ", ".join(f"{k}: {v}" for k, v in spec.model.prune.to_dict().items())
            base = f"{base} pruned ({choice})"
    else:
        fmt = contract.OutputFormat.huggingface.value
    return contract.ServableOutput(
        kind=kind,
        uri=uri,
        format=fmt,
        precision=spec.hyperparameters.precision,
        base_model=base,
        lora_rank=rank,
        files=files,
        labels=list(labels) if labels else None,
    )
