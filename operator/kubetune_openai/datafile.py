"""Uploads with purpose `fine-tune`: checked at upload, line by line, with the
row checks `kubetune validate` and the trainer use (kubetune_trainer.data's
normalize), so a file that is accepted here trains.

OpenAI's formats are read as they are:
  chat               {"messages": [{role, content}, ...]}               supervised
  prompt-completion  {"prompt": str, "completion": str}                  supervised
  preference         {"input": {"messages": [...]}, "preferred_output": [...],
                      "non_preferred_output": [...]}                      dpo
A preference file is stored as uploaded and, beside it, as the trainer's
preference rows ({prompt, chosen, rejected}); the trainer reads the latter.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import IO, Optional

from .mapping import bad_request

MAX_SHOWN = 3  # bad lines quoted in one error

OPENAI_PREFERENCE = ("input", "preferred_output", "non_preferred_output")
SHAPES = (
    "chat rows {messages: [...]}, preference rows {input: {messages}, preferred_output, "
    "non_preferred_output} or prompt-completion rows {prompt, completion}"
)


@dataclass
class Checked:
    format: str  # the FineTuneJob's dataset.format
    rows: int
    converted: Optional[bytes] = None  # the trainer's rows, when they differ from the upload


def _row_format(row: dict) -> Optional[str]:
    if "messages" in row:
        return "chat"
    if any(k in row for k in OPENAI_PREFERENCE):
        return "openai-preference"
    if "chosen" in row or "rejected" in row:
        return "preference"
    if "prompt" in row or "completion" in row:
        return "prompt-completion"
    return None


def from_openai_preference(row: dict) -> dict:
    """OpenAI's preference row -> the trainer's {prompt, chosen, rejected} (messages)."""
    inp = row.get("input")
    prompt = inp.get("messages") if isinstance(inp, dict) else None
    return {
        "prompt": prompt,
        "chosen": row.get("preferred_output"),
        "rejected": row.get("non_preferred_output"),
    }


def check(stream: IO[bytes], filename: str) -> Checked:
    """Read a JSONL upload; raise a 400 ApiError naming the lines at fault and why."""
    from kubetune_trainer import data as D

    problems: list[str] = []
    more = 0
    fmt: Optional[str] = None
    rows = 0
    converted: list[str] = []

    def bad(n: int, why: str) -> None:
        nonlocal more
        if len(problems) < MAX_SHOWN:
            problems.append(f"line {n}: {why}")
        else:
            more += 1

    for n, raw in enumerate(stream, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            bad(n, f"not UTF-8 text (byte {exc.start + 1})")
            continue
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            bad(n, f"invalid JSON, column {exc.colno}: {exc.msg}")
            continue
        if not isinstance(row, dict):
            bad(n, f"not a JSON object ({D.describe_keys(row)})")
            continue
        shape = _row_format(row)
        if shape is None:
            bad(n, f"fits none of the formats ({D.describe_keys(row)})")
            continue
        if fmt is None:
            fmt = shape
        elif shape != fmt:
            bad(n, f"a {shape} row in a file of {fmt} rows (line 1 decides)")
            continue
        trainer_row = from_openai_preference(row) if shape == "openai-preference" else row
        trainer_fmt = "preference" if shape == "openai-preference" else shape
        _norm, why = D.normalize(trainer_row, trainer_fmt)
        if why is not None:
            bad(n, f"{why} ({D.describe_keys(row)})")
            continue
        rows += 1
        if shape == "openai-preference":
            converted.append(json.dumps(trainer_row, ensure_ascii=False))
    if problems:
        shown = "; ".join(problems) + (f"; and {more} more" if more else "")
        raise bad_request(
            f"Invalid file format for fine-tuning: {filename}: {shown}. Each line must be one "
            f"JSON object, every line of the same format: {SHAPES}",
            "file",
            "invalid_file_format",
        )
    if not rows:
        raise bad_request(
            f"Invalid file format for fine-tuning: {filename} holds no rows", "file", "empty_file"
        )
    if fmt == "openai-preference":
        return Checked("preference", rows, ("\n".join(converted) + "\n").encode())
    return Checked(fmt or "chat", rows)
