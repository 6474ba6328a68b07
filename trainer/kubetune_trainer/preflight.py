"""Local checks of a FineTuneJob before any compute: paths, model folder, data.

`kubetune run` resolves every local path of a job here, once, and checks what
a worker would otherwise find out after Ray has started: the model folder, the
data files (1-based line numbers), the rows against the format, the tokenizer,
the chat template and how many examples `maxSeqLength` truncates.
`kubetune validate` runs the checks that need no tokenizer.

Relative paths (spec.model.uri, spec.dataset.train/validation.uri,
spec.output.uri, --output) are read from the working directory, the directory
kubetune runs in, not the job file's folder: the same rule as for any path given
on the command line, and the one that lets `kubetune run crds/examples/quickstart.yaml`
find `.cache/` from the repository root.

Importing this module is cheap (no torch): `kubetune validate` uses it.
"""

from __future__ import annotations

import copy
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from kubetune_api.validation import FieldError

from . import clean as C
from . import data as D
from . import gguf_export as G
from . import model as M
from . import objectives
from .prune import PruneError, kept_layers

SAMPLE_ROWS = 200  # rows tokenized for the length distribution
MAX_EXAMPLES = 3  # bad rows quoted per data source
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)
TRUNCATION_WARNING = 0.2  # share of truncated examples that earns a warning


def is_local(uri: Optional[str]) -> bool:
    return bool(uri) and ("://" not in uri or uri.startswith("file://"))


def local_path(uri: str) -> Path:
    return Path(uri[len("file://") :] if uri.startswith("file://") else uri)


def resolve(uri: Optional[str], base: Path) -> Optional[str]:
    """A relative or ~ path made absolute against `base`; URIs pass through."""
    if not uri or "://" in uri:
        return uri
    path = Path(uri).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


def resolve_job_paths(job: dict, base: Path) -> dict:
    """The one place a local job's paths become absolute (model, data, output),
    so the Ray workers, whose working directory is elsewhere, read and write
    where the user meant. Returns a copy; the input is not changed."""
    job = copy.deepcopy(job)
    spec = job.get("spec")
    if not isinstance(spec, dict):
        return job
    for section, keys in (
        ("model", [("uri",), ("fromCheckpoint",)]),
        ("dataset", [("train", "uri"), ("validation", "uri")]),
        ("output", [("uri",)]),
    ):
        node = spec.get(section)
        for key in keys:
            holder = node
            for part in key[:-1]:
                holder = holder.get(part) if isinstance(holder, dict) else None
            if isinstance(holder, dict) and isinstance(holder.get(key[-1]), str):
                holder[key[-1]] = resolve(holder[key[-1]], base)
    mixture = (spec.get("dataset") or {}).get("mixture")
    for src in mixture if isinstance(mixture, list) else ():
        if isinstance(src, dict) and isinstance(src.get("uri"), str):
            src["uri"] = resolve(src["uri"], base)
    return job


def display(uri: str) -> str:
    """Local locations print as plain paths, everywhere on the console."""
    return uri[len("file://") :] if uri.startswith("file://") else uri


@dataclass
class Report:
    errors: list[FieldError] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was checked, for the console
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.errors


def _missing_hint(field_path: str, raw: str, job_dir: Optional[Path], base: Path) -> str:
    if job_dir is not None and not Path(raw).is_absolute() and (job_dir / raw).exists():
        return (
            f"relative paths are read from the working directory ({base}), not the job "
            f"file's folder; use {(job_dir / raw).resolve()} or run kubetune from {job_dir}"
        )
    return f"check {field_path}; relative paths are read from the working directory ({base})"


def check_model(
    model: dict, raw: Optional[str], base: Path, job_dir: Optional[Path], report: Report
) -> Optional[Path]:
    """The model folder holds a config and weights (or the GGUF file named)."""
    uri = model.get("uri")
    if not is_local(uri):
        return None
    path = local_path(uri)
    gguf = model.get("ggufFile")
    if not path.exists():
        report.errors.append(
            FieldError(
                "spec.model.uri",
                f"no such folder: {path}",
                _missing_hint("spec.model.uri", raw or uri, job_dir, base),
            )
        )
        return None
    if path.is_file():
        hint = (
            f"set spec.model.uri to {path.parent} and spec.model.ggufFile to {path.name}"
            if path.suffix == ".gguf"
            else "point spec.model.uri at the folder that holds config.json and the weights"
        )
        report.errors.append(FieldError("spec.model.uri", f"{path} is a file, not a folder", hint))
        return None
    names = sorted(p.name for p in path.iterdir())
    if gguf:
        if gguf not in names:
            found = [n for n in names if n.endswith(".gguf")]
            report.errors.append(
                FieldError(
                    "spec.model.ggufFile",
                    f"no file {gguf} in {path}",
                    f"GGUF files there: {', '.join(found)}" if found else "check the file name",
                )
            )
            return None
        report.notes.append(f"model: {path} ({gguf})")
        return path
    problems = []
    if "config.json" not in names:
        problems.append("no config.json")
    weights = [n for n in names if n.endswith(WEIGHT_SUFFIXES)]
    if not weights:
        problems.append("no weights (*.safetensors or *.bin)")
    if problems:
        shown = ", ".join(names[:8]) + (", …" if len(names) > 8 else "") if names else "nothing"
        hint = "a Hugging Face model folder (save_pretrained) holds config.json and the weights"
        if weights and all(n.endswith(".gguf") for n in weights):
            hint = f"set spec.model.ggufFile: {weights[0]}"
        report.errors.append(
            FieldError(
                "spec.model.uri",
                f"{path} is not a model folder: {' and '.join(problems)} (it holds {shown})",
                hint,
            )
        )
        return None
    tokenizer_files = [n for n in names if n in TOKENIZER_FILES]
    if not tokenizer_files:
        report.errors.append(
            FieldError(
                "spec.model.uri",
                f"{path} holds no tokenizer ({', '.join(TOKENIZER_FILES[:3])}, …)",
                "save the tokenizer into the model folder (tokenizer.save_pretrained)",
            )
        )
        return None
    report.notes.append(f"model: {path} ({', '.join(weights[:3])})")
    return path


def _data_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(
            p for p in path.rglob("*") if p.suffix.lower() in (".jsonl", ".json", ".parquet")
        )
    return [path]


def read_local(
    field_path: str, uri: str, raw: Optional[str], base: Path, job_dir, report: Report
) -> Optional[D.Rows]:
    """Rows of a local file or folder; None (and errors) when it cannot be read."""
    path = local_path(uri)
    if not path.exists():
        report.errors.append(
            FieldError(
                field_path,
                f"no such file: {path}",
                _missing_hint(field_path, raw or uri, job_dir, base),
            )
        )
        return None
    files = _data_files(path)
    if not files:
        report.errors.append(
            FieldError(field_path, f"no .jsonl, .json or .parquet file in {path}", "add data")
        )
        return None
    rows = D.Rows()
    for f in files:
        try:
            if f.suffix.lower() == ".parquet":
                import pyarrow.parquet as pq

                table = pq.read_table(f).to_pylist()
                part = D.Rows(table, (f"{f.name} row {i}" for i in range(1, len(table) + 1)))
            else:
                part = D.parse_text(f.read_text(encoding="utf-8"), f.name)
        except (D.DataError, UnicodeDecodeError, OSError, ValueError) as exc:
            report.errors.append(FieldError(field_path, f"{f}: {exc}", "fix the file"))
            continue
        bad = [i for i, r in enumerate(part) if isinstance(r, D.BadLine)]
        for i in bad[:MAX_EXAMPLES]:
            report.errors.append(
                FieldError(
                    field_path,
                    f"{f} line {part.where[i].rsplit(' ', 1)[-1]}: invalid JSON, {part[i].message}",
                    "each line of a .jsonl file must be one JSON object: fix or delete the line",
                )
            )
        if len(bad) > MAX_EXAMPLES:
            report.errors.append(
                FieldError(field_path, f"{f}: {len(bad) - MAX_EXAMPLES} more invalid line(s)")
            )
        rows.extend(part)
        rows.where.extend(part.where)
    return rows


def format_field(field_path: str) -> str:
    """The field that sets the format of the source at field_path (….uri)."""
    if field_path.startswith("spec.dataset.mixture["):
        return field_path.removesuffix(".uri") + ".format"
    return "spec.dataset.format"


def check_format(
    field_path: str, name: str, rows: D.Rows, fmt: str, report: Report
) -> list[tuple[str, dict]]:
    """Every row mapped to the format; (label, normalised row) of the usable ones."""
    usable, bad = [], []
    for i, row in enumerate(rows):
        if isinstance(row, D.BadLine):
            continue  # already an error of its own
        norm, why = D.normalize(row, fmt)
        if norm is None:
            bad.append((rows.label(i), why, row))
        else:
            usable.append((rows.label(i), norm))
    if bad:
        lines = [f"{where}: {why} ({D.describe_keys(row)})" for where, why, row in bad]
        shown = "; ".join(lines[:MAX_EXAMPLES])
        more = f"; and {len(bad) - MAX_EXAMPLES} more" if len(bad) > MAX_EXAMPLES else ""
        expected = f"format {fmt!r}, which reads the keys {D.EXPECTED_KEYS.get(fmt, '?')}"
        if not usable:
            report.errors.append(
                FieldError(
                    field_path,
                    f"no row of {name} fits {expected}: {shown}{more}",
                    f"rename the keys in the data, or set {format_field(field_path)} to the "
                    "data's format (text, prompt-completion, chat, alpaca, sharegpt, preference, "
                    "feedback, prompt, classification)",
                )
            )
        else:
            report.warnings.append(
                f"{name}: {len(bad)} of {len(rows)} rows do not fit {expected}, and are "
                f"skipped: {shown}{more}"
            )
    return usable


def check_grader_fields(spec: dict, name: str, usable: list, report: Report) -> None:
    """dataset.format prompt: the item fields method.grpo.grader's templates name
    ({{item.answer}}) against the rows. No row with a field: an error; some rows
    without it: a warning (those rows are left out)."""
    from kubetune_api import graders

    grader = ((spec.get("method") or {}).get("grpo") or {}).get("grader")
    if not grader or not usable:
        return
    try:
        names = sorted(graders.fields(grader))
    except ValueError:
        return  # an invalid grader is the spec check's to report
    for key in names:
        lacking = [where for where, norm in usable if norm["item"].get(key) is None]
        if not lacking:
            continue
        if len(lacking) == len(usable):
            report.errors.append(
                FieldError(
                    "spec.method.grpo.grader",
                    f"the grader reads {{{{item.{key}}}}}, but no row of {name} has the "
                    f"field '{key}'",
                    f"add '{key}' to the rows (the reference the grader compares with), or "
                    "change the grader's template to a field the rows have",
                )
            )
        else:
            shown = ", ".join(lacking[:MAX_EXAMPLES])
            report.warnings.append(
                f"{name}: {len(lacking)} of {len(usable)} rows lack '{key}', which the "
                f"grader reads as {{{{item.{key}}}}}; they are left out: {shown}"
            )


def check_files(job: dict, base: Path, job_dir: Optional[Path] = None, raw: Optional[dict] = None):
    """What needs no tokenizer: model folder, data files, rows against the format.
    `job` has resolved paths; `raw` is the job as written (for messages).
    Returns (report, {name: usable rows})."""
    t0 = time.monotonic()
    report = Report()
    spec = job.get("spec") or {}
    raw_spec = (raw or {}).get("spec") or {}
    model = spec.get("model") or {}
    check_model(model, (raw_spec.get("model") or {}).get("uri"), base, job_dir, report)
    dataset = spec.get("dataset") or {}
    fmt = dataset.get("format") or "chat"
    usable, raw_rows = {}, {}
    # (part, its source, the source as written, its format): one source per split, or
    # dataset.mixture's sources, each in its own format
    parts = [
        (part, dataset.get(part), (raw_spec.get("dataset") or {}).get(part), fmt)
        for part in ("train", "validation", "test")
    ]
    mixture = dataset.get("mixture")
    raw_mixture = (raw_spec.get("dataset") or {}).get("mixture")
    for i, src in enumerate(mixture if isinstance(mixture, list) else ()):
        raw_src = raw_mixture[i] if isinstance(raw_mixture, list) and i < len(raw_mixture) else {}
        own = src.get("format") if isinstance(src, dict) else None
        parts.append((f"mixture[{i}]", src, raw_src, own if isinstance(own, str) else fmt))
    for part, src, raw_src, src_fmt in parts:
        if not isinstance(src, dict) or not is_local(src.get("uri")):
            continue
        field_path = f"spec.dataset.{part}.uri"
        raw_uri = (raw_src if isinstance(raw_src, dict) else {}).get("uri")
        rows = read_local(field_path, src["uri"], raw_uri, base, job_dir, report)
        if rows is None:
            continue
        raw_rows[part] = rows
        name = f"mixture source {src.get('id')}" if part.startswith("mixture") else part
        usable[part] = check_format(field_path, name, rows, src_fmt, report)
        if src_fmt == "prompt":
            check_grader_fields(spec, part, usable[part], report)
        report.notes.append(
            f"{name}: {display(src['uri'])} ({len(rows)} rows, {len(usable[part])} fit "
            f"format {src_fmt})"
        )
    if fmt == "classification" and usable.get("train"):
        check_labels(usable, report)
    if isinstance(dataset.get("clean"), dict) and "train" in raw_rows:
        check_clean(spec, raw_rows, report)
    report.seconds = time.monotonic() - t0
    return report, usable


def check_labels(usable: dict, report: Report) -> None:
    """dataset.format classification: two labels at least in the training rows, and
    no held-out row with a label they lack (the trainer stops on either)."""
    labels = D.label_names([norm for _, norm in usable["train"]])
    report.notes.append(f"train: {len(labels)} labels ({', '.join(labels[:12])})")
    if len(labels) < 2:
        report.errors.append(
            FieldError(
                "spec.dataset.train.uri",
                f"method.task classification needs two labels at least; the training rows "
                f"have {len(labels)}",
                "add rows of another label",
            )
        )
    known = set(labels)
    for part in ("validation", "test"):
        unseen = [
            (w, n["label"]) for w, n in usable.get(part) or [] if str(n["label"]) not in known
        ]
        if unseen:
            shown = "; ".join(f"{w}: {label!r}" for w, label in unseen[:MAX_EXAMPLES])
            report.errors.append(
                FieldError(
                    f"spec.dataset.{part}.uri",
                    f"{len(unseen)} row(s) have a label no training row has ({shown})",
                    "fix their labels, or add training rows with them",
                )
            )


def check_clean(spec: dict, raw_rows: dict, report: Report) -> Optional[dict]:
    """spec.dataset.clean on the local data, split as the trainer splits it: the
    counts as notes, and a warning for what action report leaves in. Returns the
    report (None when the spec does not resolve: its errors are reported elsewhere)."""
    from kubetune_api.validation import SpecError, resolve_spec

    try:
        resolved = resolve_spec(spec)
    except (SpecError, ValueError):
        return None
    ds = resolved.dataset
    splits = {"train": raw_rows["train"]}
    if ds.validation is not None:
        if "validation" not in raw_rows:
            report.notes.append("clean: validation is not on this machine; leaks not checked")
        else:
            splits["validation"] = raw_rows["validation"]
    else:
        splits["train"], held = D.split_validation(
            raw_rows["train"], ds.validation_split, resolved.hyperparameters.seed
        )
        if held:
            splits["validation"] = held
    if ds.test is not None and "test" in raw_rows:
        splits["test"] = raw_rows["test"]
    _, cleaned = D.clean_splits(splits, ds.format, ds.clean)
    for line in C.summary(cleaned):
        report.notes.append(f"clean: {line}")
    n = C.found(cleaned)
    if n and cleaned["action"] == "report":
        report.warnings.append(
            f"dataset.clean found {n} duplicate, leaked or PII finding(s) and action is "
            "report: the job trains on them; set spec.dataset.clean.action to drop (or "
            "redact) to leave them out"
        )
    return cleaned


def load_tokenizer(spec, path: str):
    """The tokenizer the workers load. A folder whose tokenizer is the generic fast
    one loads without importing torch (AutoTokenizer builds the same object),
    which keeps the check to a few seconds."""
    m = spec.model
    folder = Path(path)
    config = folder / "tokenizer_config.json"
    if (
        not m.gguf_file
        and not m.trust_remote_code
        and (folder / "tokenizer.json").exists()
        and config.exists()
    ):
        cls = json.loads(config.read_text()).get("tokenizer_class")
        if cls in ("TokenizersBackend", "PreTrainedTokenizerFast"):
            from transformers import PreTrainedTokenizerFast

            tok = PreTrainedTokenizerFast.from_pretrained(str(folder))
            if tok.pad_token_id is None:
                tok.pad_token = tok.eos_token
            return tok
    return M.load_tokenizer(spec, path)


def _percentile(sorted_values: list[int], q: float) -> int:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def check_tokens(spec, usable: dict, report: Report) -> None:
    """Tokenizer loads, the template renders, the sample's lengths against maxSeqLength."""
    if spec.model.uri and not is_local(spec.model.uri):
        return  # fetched by the workers; nothing to read here
    try:
        path = M.resolve_model_path(spec.model)
        tok = load_tokenizer(spec, path)
    except Exception as exc:  # noqa: BLE001  (any loader error is the user's to see)
        report.errors.append(
            FieldError(
                "spec.model",
                f"the tokenizer does not load: {type(exc).__name__}: {str(exc)[:300]}",
                "the model folder needs tokenizer.json or the tokenizer files saved with it",
            )
        )
        return
    max_len = spec.dataset.max_seq_length
    objective = objectives.for_spec(spec)
    for part, rows in usable.items():
        if not rows:
            continue
        sample = rows if len(rows) <= SAMPLE_ROWS else random.Random(0).sample(rows, SAMPLE_ROWS)
        lengths, failed = [], []
        for where, norm in sample:
            try:
                ids, _labels = objective.tokenize(norm, tok)
            except Exception as exc:  # noqa: BLE001  (a template error names the row)
                failed.append(f"{where}: {type(exc).__name__}: {str(exc)[:200]}")
                continue
            lengths.append(len(ids))
        if failed:
            report.errors.append(
                FieldError(
                    f"spec.dataset.{part}",
                    f"the chat template does not render {len(failed)} of {len(sample)} sampled "
                    f"rows: {'; '.join(failed[:MAX_EXAMPLES])}",
                    "fix those rows, or use a model whose tokenizer has a chat template for "
                    "these roles",
                )
            )
        if not lengths:
            continue
        lengths.sort()
        over = sum(1 for n in lengths if n > max_len)
        share = over / len(lengths)
        label = part
        if part.startswith("mixture[") and spec.dataset.mixture:
            label = f"mixture source {spec.dataset.mixture[int(part[8:-1])].id}"
        report.notes.append(
            f"{label} tokens per example (sample of {len(lengths)}): median "
            f"{_percentile(lengths, 0.5)}, p90 {_percentile(lengths, 0.9)}, max {lengths[-1]}; "
            f"{share:.0%} longer than maxSeqLength {max_len} (truncated)"
        )
        if share >= TRUNCATION_WARNING:
            report.warnings.append(
                f"{part}: {share:.0%} of sampled examples are longer than "
                f"spec.dataset.maxSeqLength {max_len} and will be truncated (p90 is "
                f"{_percentile(lengths, 0.9)} tokens): raise maxSeqLength if the ends matter"
            )


def check_gguf(spec, report: Report) -> None:
    """output.gguf on a local model: an architecture the export converts, known now
    rather than after training."""
    if not spec.output.gguf or (spec.model.uri and not is_local(spec.model.uri)):
        return
    try:
        path = Path(M.resolve_model_path(spec.model)) / "config.json"
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return  # a GGUF model file or a hub name: the trainer checks it once loaded
    why = G.supported(config)
    if why:
        what, _, fix = why.removeprefix("output.gguf: ").partition("; ")
        report.errors.append(FieldError("spec.output.gguf", what, fix))


def check_prune(spec, report: Report) -> None:
    """model.prune on a local model: the layers it keeps exist, known before Ray starts."""
    prune = spec.model.prune
    if prune is None or (spec.model.uri and not is_local(spec.model.uri)):
        return
    try:
        path = Path(M.resolve_model_path(spec.model)) / "config.json"
        total = json.loads(path.read_text())["num_hidden_layers"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # a GGUF model file or a hub name: the trainer checks it once loaded
    try:
        kept_layers(prune, total)
    except PruneError as err:
        report.errors.append(FieldError(err.field, err.what, err.fix))


def preflight(config, job: dict, base: Path, job_dir: Optional[Path], raw: dict) -> Report:
    """Everything `kubetune run` checks before Ray starts; cheap checks first, and
    the tokenizer only when they pass."""
    t0 = time.monotonic()
    report, usable = check_files(job, base, job_dir, raw)
    if report.ok:
        check_tokens(config.spec, usable, report)
        check_gguf(config.spec, report)
        check_prune(config.spec, report)
    report.seconds = time.monotonic() - t0
    return report


def validate_findings(doc: Any, base: Path, job_dir: Optional[Path] = None) -> Report:
    """For `kubetune validate`: the checks that need no tokenizer, on a valid
    document. A file that is there but broken is an error. One that is not
    there is a warning: validate cannot know whether the job is meant for this
    machine or for pods that mount the path (`kubetune run` stops on it)."""
    if not isinstance(doc, dict):
        return Report()
    job = resolve_job_paths(doc, base)
    report, _ = check_files(job, base, job_dir, doc)
    kept = []
    for err in report.errors:
        if err.message.startswith(("no such file", "no such folder")):
            report.warnings.append(
                f"{err} (not on this machine: `kubetune run` stops here; fine if the path "
                "exists in the cluster's pods)"
            )
        else:
            kept.append(err)
    report.errors = kept
    return report


def local_findings(doc: Any, file: str) -> tuple[list[dict], list[str], list[str]]:
    """`kubetune validate`'s look at what this machine can see (registered under the
    CLI's kubetune.validate_checks): local model folders and data files of one valid
    document, the checks that need no tokenizer. (errors as FieldError dicts,
    warnings, notes: dataset.clean's counts)"""
    job_dir = None if file == "-" else Path(file).resolve().parent
    report = validate_findings(doc, Path.cwd(), job_dir)
    notes = [n for n in report.notes if n.startswith("clean:")]
    return [e.to_dict() for e in report.errors], report.warnings, notes
