"""The end of a run: outputs.json, built by a list of finishers.

Each finisher adds one part of outputs.json (its keys of OutputsRecord) and
returns them; every rank calls every finisher (ZeRO-3 gathers need them all),
and only rank 0's sections are written. A new thing to produce at the end is
one more finisher in FINISHERS and, if it is a new key, one more field of
kubetune_api.storage.OutputsRecord.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from kubetune_api import storage as contract
from kubetune_api.objectives import SUPERVISED_FORMATS

from . import calibration, evalgen, export, gguf_export
from . import data as D
from . import interpolate as I
from . import model as M
from .checkpoint import save_adapter
from .storage import JobStorage
from .worker import Worker


@dataclass
class Finish:
    """What the finishers read; they take nothing else from the run."""

    worker: Worker
    storage: JobStorage
    spec: Any
    tokenizer: Any
    model_path: str
    parent: Any  # kubetune_trainer.parent.Parent or None
    local: Path  # a scratch folder for the files before upload
    metrics: list[dict]
    held_out: dict[str, list]  # split -> rows, for evaluation by generation
    test: Optional[Callable[[], Optional[dict]]]  # the objective's test-split evaluation
    log: Callable[[str], None]
    progress: Callable[..., None]
    # evaluation.calibration / .retention after training: outputs.json's sections
    checks: Optional[Callable[[], dict]] = None
    # evaluation.retention: the retention set's regression of the model as the
    # engine holds it now, against the base's (every rank)
    retention: Optional[Callable[[], Optional[float]]] = None
    held_out_formats: dict[str, str] = field(default_factory=dict)  # split -> its format
    # the objective's evaluation of a split on the engine's model as it is now
    evaluate: Optional[Callable[[str], dict]] = None
    splits: tuple[str, ...] = ()  # the splits `evaluate` can score
    # method.task classification: the labels in id order (None: generation)
    labels: Optional[list[str]] = None
    final_dir: Optional[Path] = None  # set by final_weights
    sections: dict = field(default_factory=dict)


def test_metrics(f: Finish) -> dict:
    """dataset.test, evaluated once after training; reported, never used for stopping."""
    test = f.test() if f.test else None
    if not test:
        return {}
    f.log("test: " + ", ".join(f"{k} {v:.4f}" for k, v in test.items()))
    return {"test_metrics": {k.replace("eval_", "test_", 1): v for k, v in test.items()}}


def classification(f: Finish) -> dict:
    """method.task classification: the labels, and the validation split's accuracy,
    macro-F1 and label ECE before training (the metrics row of step 0: the base with
    its new head) and at the last evaluation (rank 0, from its metrics rows)."""
    if f.labels is None:
        return {}
    scored = [r for r in f.metrics if r.get("eval_accuracy") is not None]
    first = next((r for r in scored if r["step"] == 0), None)
    last = scored[-1] if scored and scored[-1]["step"] > 0 else None
    before, after = first or {}, last or {}
    record = contract.ClassificationRecord(
        labels=list(f.labels),
        examples=len(f.held_out.get("validation") or []) or None,
        accuracy_before=before.get("eval_accuracy"),
        accuracy=after.get("eval_accuracy"),
        f1_before=before.get("eval_f1"),
        f1=after.get("eval_f1"),
        ece_before=before.get("eval_label_ece"),
        ece=after.get("eval_label_ece"),
    )
    if last is not None:
        f.log(
            f"classification: accuracy {_num(record.accuracy_before)} before, "
            f"{record.accuracy:.4f} after; macro-F1 {_num(record.f1_before)} -> "
            f"{record.f1:.4f}; label ECE {_num(record.ece_before)} -> {record.ece:.4f}"
        )
    return {"classification": record}


def _num(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def held_out_checks(f: Finish) -> dict:
    """evaluation.calibration and .retention on the fine-tuned weights (every rank),
    before they are saved: a fitted temperature goes into the saved folders."""
    if f.checks is None:
        return {}
    f.progress(contract.TrainPhase.evaluating, "calibration and retention after training")
    return f.checks()


def stamp_temperature(f: Finish, rel: str) -> None:
    """calibration.saveTemperature: the fitted temperature into a saved folder's
    generation_config.json, before it is uploaded (rank 0)."""
    cal = f.sections.get("calibration")
    settings = f.spec.evaluation.calibration
    if cal is None or cal.temperature is None or not (settings and settings.save_temperature):
        return
    calibration.write_temperature(f.local / rel, cal.temperature)
    cal.saved_in.append(rel)


def save_full_model(f: Finish, path: Path) -> None:
    module = f.worker.engine.module
    with f.worker.gathered(list(module.parameters())):
        if f.worker.rank == 0:
            module.save_pretrained(str(path), safe_serialization=True)
            f.tokenizer.save_pretrained(str(path))
            export.make_portable(path)


def final_weights(f: Finish) -> dict:
    """The adapter (and the merged model), or the full model: uploaded and described."""
    out: dict = {}
    artifacts: list[contract.ServableOutput] = []

    def publish(kind: contract.OutputKind, rel: str) -> str:
        stamp_temperature(f, rel)
        f.storage.upload_dir(f.local / rel, rel)
        uri = f.storage.uri(rel)
        artifacts.append(export.describe(kind.value, uri, f.spec, f.local / rel, f.labels))
        return uri

    full = f.spec.method.type == "full"
    f.final_dir = f.local / (contract.FULL_MODEL if full else contract.ADAPTER)
    rank0 = f.worker.rank == 0
    if full:
        save_full_model(f, f.final_dir)
        if rank0:
            out["model"] = publish(contract.OutputKind.full, contract.FULL_MODEL)
    else:
        save_adapter(f.worker, f.final_dir)
        if rank0:
            f.tokenizer.save_pretrained(str(f.final_dir))
            export.finish_adapter(f.final_dir)
            out["adapter"] = publish(contract.OutputKind.adapter, contract.ADAPTER)
            if f.spec.output.merge_adapter:
                f.progress(contract.TrainPhase.saving, "merging the adapter")
                parent = f.parent
                export.merge_adapter(
                    parent.local if parent and parent.kind == "model" else f.model_path,
                    f.spec,
                    f.final_dir,
                    f.local / contract.MERGED,
                    parent.local if parent and parent.merge else None,
                    labels=f.labels,
                )
                out["merged_model"] = publish(contract.OutputKind.merged, contract.MERGED)
    out["artifacts"] = artifacts
    return out


def retention_at(f: Finish, alpha: float) -> Optional[float]:
    """evaluation.retention: the retention set's regression of the model as the
    engine holds it now (at weight `alpha`), against the base's; None without a
    retention set (or a base score: a resume that did not measure it)."""
    return f.retention() if f.retention is not None else None


def interpolation(f: Finish) -> dict:
    """output.interpolation (WiSE-FT, kubetune_trainer.interpolate): every weight
    scored with the objective's evaluation on the validation split (every rank),
    the chosen one saved and published under interpolated/ (rank 0)."""
    settings = f.spec.output.interpolation
    if settings is None:
        return {}
    if f.evaluate is None or "validation" not in f.splits:
        f.log("warning: output.interpolation: no validation examples to score: skipped")
        return {}
    import time

    t0 = time.monotonic()
    w = f.worker
    full = f.spec.method.type == "full"
    f.progress(contract.TrainPhase.evaluating, "scoring interpolated weights")
    module = w.engine.module
    if full:
        holds = w.stage < 3 or w.rank == 0
        base = None
        if holds:  # the model training started from, on the CPU
            base = M.load_model(f.spec, f.model_path, False, f.parent)
        mixer = I.FullMix(module, I.base_parameters(base) if base else {}, w.writable, holds)
        del base
    else:
        mixer = I.LoraMix(module)
    points: list[contract.InterpolationPoint] = []
    rel = f"{contract.INTERPOLATED}/{contract.FULL_MODEL if full else contract.ADAPTER}"
    with I.mixing(mixer):
        for alpha in sorted(settings.weights):
            mixer.set(alpha)
            result = f.evaluate("validation")
            points.append(I.point(alpha, result, retention_at(f, alpha)))
        retention = f.spec.evaluation.retention
        bound = retention.max_regression if retention is not None else None
        chosen, rule = I.choose(points, settings.select, settings.weight, bound)
        if full:  # every rank: ZeRO-3 gathers
            mixer.set(chosen)
            save_full_model(f, f.local / rel)
    if w.rank != 0:
        return {}
    out: dict = {}
    artifacts: list[contract.ServableOutput] = []

    def publish(kind: contract.OutputKind, rel: str) -> str:
        f.storage.upload_dir(f.local / rel, rel)
        uri = f.storage.uri(rel)
        described = export.describe(kind.value, uri, f.spec, f.local / rel)
        artifacts.append(described.model_copy(update={"interpolation_weight": chosen}))
        return uri

    if full:
        out["model"] = publish(contract.OutputKind.full, rel)
    else:
        f.progress(contract.TrainPhase.saving, f"saving the adapter at weight {chosen:g}")
        I.scale_adapter(f.final_dir, f.local / rel, chosen)
        out["adapter"] = publish(contract.OutputKind.adapter, rel)
        if f.spec.output.merge_adapter:
            parent = f.parent
            merged = f"{contract.INTERPOLATED}/{contract.MERGED}"
            export.merge_adapter(
                parent.local if parent and parent.kind == "model" else f.model_path,
                f.spec,
                f.local / rel,
                f.local / merged,
                parent.local if parent and parent.merge else None,
            )
            out["merged_model"] = publish(contract.OutputKind.merged, merged)
    record = contract.InterpolationRecord(
        rule=rule,
        select=settings.select,
        chosen=chosen,
        weights=points,
        seconds=round(time.monotonic() - t0, 3),
        **out,
    )
    for line in I.curve_lines(record):
        f.log(f"interpolation {line}")
    return {
        "interpolation": record,
        "artifacts": [*f.sections.get("artifacts", []), *artifacts],
    }


GGUF_HELD_OUT_ROWS = 64  # validation rows scored for each GGUF file's read-back check
GGUF_MAX_TOKENS = 512
SFT_FORMATS = SUPERVISED_FORMATS


def gguf_files(f: Finish) -> dict:
    """output.gguf: each type's file written from the merged or full model, read back
    and checked (gguf_export.check), uploaded under gguf/ and described. A file that
    does not read back fails the job; a held-out loss beyond the type's tolerance
    warns, or fails with output.gguf.enforceTolerance."""
    settings = f.spec.output.gguf
    if not settings or f.worker.rank != 0:
        return {}
    full = f.spec.method.type == "full"
    kind = contract.OutputKind.full if full else contract.OutputKind.merged
    folder = f.local / (contract.FULL_MODEL if full else contract.MERGED)
    f.progress(contract.TrainPhase.saving, "writing GGUF files")
    examples = gguf_held_out(f)
    name = export.base_model_name(f.spec)
    done = gguf_export.run_in_subprocess(
        folder, f.local / contract.GGUF, settings.types, name, examples
    )
    entries, artifacts = [], []
    for item in done:
        made = gguf_export.ExportReport(**item["export"])
        checked = gguf_export.CheckReport(**item["check"])
        qtype = made.type
        rel = f"{contract.GGUF}/model-{qtype}.gguf"
        if not (checked.tensors_ok and checked.tokenizer_ok):
            raise gguf_export.ExportError(
                f"output.gguf: the {qtype} file does not read back as written: "
                + "; ".join(checked.problems)
            )
        line = f"gguf {qtype}: {made.bytes / 2**20:.1f} MiB in {made.seconds:.1f} s"
        if checked.eval_loss is not None:
            line += (
                f", held-out loss {checked.eval_loss:.4f} vs {checked.reference_eval_loss:.4f} "
                f"({100 * checked.relative_increase:+.2f}%, tolerance "
                f"{100 * checked.tolerance:g}%)"
            )
        if made.fallback:
            line += f"; kept at f16 (rows not a multiple of 32): {', '.join(made.fallback)}"
        f.log(line)
        if checked.within_tolerance is False:
            why = (
                f"output.gguf: the {qtype} file's held-out loss is "
                f"{100 * checked.relative_increase:+.2f}% from the safetensors model's, beyond "
                f"its tolerance of {100 * checked.tolerance:g}%"
            )
            if settings.enforce_tolerance:
                raise gguf_export.ExportError(
                    why + ": pick a wider type or set output.gguf.enforceTolerance: false"
                )
            f.log("warning: " + why)
        uri = f.storage.uri(rel)
        entries.append(
            contract.GgufFile(
                uri=uri,
                bytes=made.bytes,
                seconds=made.seconds,
                fallback=made.fallback,
                **checked.as_dict(),
            )
        )
        artifacts.append(
            contract.ServableOutput(
                kind=kind.value,
                uri=uri,
                format=contract.OutputFormat.gguf.value,
                precision=qtype,
                base_model=export.base_model_name(f.spec),
                files=[Path(rel).name],
            )
        )
    f.storage.upload_dir(f.local / contract.GGUF, contract.GGUF)
    return {"gguf": entries, "artifacts": [*f.sections.get("artifacts", []), *artifacts]}


def gguf_held_out(f: Finish) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of the first validation rows, tokenized as training does;
    none for formats without a single target (preference, feedback, prompts)."""
    rows = (f.held_out.get("validation") or [])[:GGUF_HELD_OUT_ROWS]
    if not rows or f.spec.dataset.format not in SFT_FORMATS:
        return []
    max_len = min(f.spec.dataset.max_seq_length, GGUF_MAX_TOKENS)
    examples, _ = D.build_examples(rows, f.spec.dataset.format, f.tokenizer, max_len)
    return [(e.input_ids, e.labels) for e in examples]


def loss_curve(f: Finish) -> dict:
    if f.worker.rank != 0:
        return {}
    path = f.local / contract.LOSS_CURVE
    if not plot_loss(f.metrics, path):
        return {}
    f.storage.fs.put_file(str(path), f.storage.path(contract.LOSS_CURVE))
    return {"loss_curve": f.storage.uri(contract.LOSS_CURVE)}


def generation(f: Finish) -> dict:
    """evaluation.generation: answers before and after training (rank 0)."""
    settings = f.spec.evaluation.generation
    if f.worker.rank != 0:
        return {}
    if settings:
        f.progress(contract.TrainPhase.evaluating, "answering held-out prompts")
    use_gpu = f.worker.use_gpu
    record = evalgen.run(
        settings,
        f.held_out,
        f.spec.dataset.format,
        f.tokenizer,
        {
            "before": lambda: evalgen.load_base(f.model_path, f.spec, use_gpu),
            "after": lambda: evalgen.load_final(f.model_path, f.spec, f.final_dir, use_gpu),
        },
        f.storage,
        f.local,
        f.log,
        # prompt rows are scored by the job's grader (objective grpo)
        grader=f.spec.method.grpo.grader if f.spec.method.grpo else None,
        base_dir=D.data_dir(f.spec),
        formats=f.held_out_formats,
    )
    return {"generation": record} if record else {}


FINISHERS: list[Callable[[Finish], dict]] = [
    test_metrics,
    classification,
    held_out_checks,
    final_weights,
    interpolation,
    gguf_files,
    loss_curve,
    generation,
]


def finish(f: Finish, summary: contract.OutputsRecord) -> contract.OutputsRecord:
    """Run every finisher (every rank); outputs.json's record (rank 0's is the one)."""
    for finisher in FINISHERS:
        f.sections.update(finisher(f))
    return contract.outputs_record(summary, f.sections)


def plot_loss(rows: list[dict], path: Path) -> bool:
    train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
    if not train and not evals:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=False), label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=False), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return True
