"""`kubetune run FILE`: the same FineTuneJobs on this machine, on a local Ray.

A file may hold several FineTuneJobs (an SFT job, then a DPO job continuing it
through spec.model.fromJob): all of them run, parents first
(kubetune_api.jobfile.plan, the order `kubetune validate` checks too), or the
one --name picks after its in-file parents; a parent that already finished under
the output folder is reused. The order and the reason are printed before
anything starts; when a job fails, the jobs that continue it are not started
(the others still run), and the exit status is the first failure's.

For each job, in order: make its paths absolute against the working directory
(preflight.resolve_job_paths: model, data and output, in one place), validate
it, check the model folder, data, tokenizer and template (preflight), and only
then start Ray. Results go to {output}/{namespace}/{name}/local, where output
is spec.output.uri, else --output, else ./runs. Running the same file again
resumes from the newest committed checkpoint; a finished run prints its
summary again. The first SIGINT/SIGTERM asks the ranks to commit a checkpoint at
the end of the step in flight (spec.checkpointing.saveOnStop), a second one stops
at once; either way the run is recorded in progress.json with how to resume.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, TextIO

import yaml

from kubetune_api import jobfile, load_trainer_config, spec_to_trainer_config
from kubetune_api import storage as contract
from kubetune_api import sweep as S
from kubetune_api.validation import validate_document

from . import clean as C
from . import heldout
from . import preflight as P
from .driver import ensure_env, run
from .evalgen import summary_lines
from .freeze import summary_line as freeze_summary_line
from .prune import summary_line
from .stop import StopFiles
from .storage import JobStorage, now
from .sweep_console import SweepWatcher, ranking

EXIT_INVALID = 2  # the job file or a preflight check: nothing ran


@dataclass(frozen=True)
class LocalRun:
    """What `kubetune run` was asked to do (the CLI builds it from its arguments)."""

    file: str  # the job file, "-" for stdin
    name: Optional[str] = None  # which FineTuneJob when the file holds several
    output: Optional[str] = None  # results when spec.output.uri is unset (default ./runs)
    progress: Optional[bool] = None  # a bar: None = only on a terminal; False = plain lines
    base: Optional[Path] = None  # relative paths are read from here (default: working dir)

    def command(self) -> str:
        """The command line that runs this again (and so resumes)."""
        parts = ["kubetune", "run", self.file]
        if self.name:
            parts += ["--name", self.name]
        if self.output:
            parts += ["--output", self.output]
        return shlex.join(parts)


def load_documents(path: str) -> list:
    """Every YAML document in FILE (- for stdin), as written."""
    text = sys.stdin.read() if path == "-" else Path(path).read_text()
    return list(yaml.safe_load_all(text))


def _fmt_time(seconds) -> str:
    if seconds is None:
        return "--"
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s"


class Console:
    """The run's one voice: whole lines always; on a terminal (and unless turned
    off) a progress bar redrawn in place below them. Thread-safe."""

    def __init__(self, stream: TextIO, bar: bool):
        self.stream, self.bar = stream, bar
        self.lock = threading.Lock()
        self.bar_text = ""

    def say(self, text: str, stream: Optional[TextIO] = None) -> None:
        with self.lock:
            self._clear()
            target = stream or self.stream
            if target is not self.stream:
                self.stream.flush()
            target.write(text.rstrip("\n") + "\n")
            target.flush()
            self._draw()

    def draw(self, text: str) -> None:
        with self.lock:
            self._clear()
            self.bar_text = text
            self._draw()

    def end_bar(self) -> None:
        """Leave the last bar as a finished line."""
        with self.lock:
            if self.bar and self.bar_text:
                self.stream.write("\n")
                self.stream.flush()
            self.bar_text = ""

    def _clear(self) -> None:
        if self.bar and self.bar_text:
            self.stream.write("\r\033[K")

    def _draw(self) -> None:
        if self.bar and self.bar_text:
            self.stream.write(self.bar_text)
            self.stream.flush()


def _skipped(progress: dict) -> list[dict]:
    return [s for s in progress.get("skippedCheckpoints") or [] if isinstance(s, dict)]


class Watcher:
    """Follows progress.json and metrics.jsonl (what the operator reads too) and
    tells the console: one line per log step, eval and committed checkpoint,
    plus the bar on a terminal."""

    def __init__(self, storage, console: Console, resumed_step: int, interval: float = 1.0):
        self.storage, self.console, self.interval = storage, console, interval
        self.printed_step = resumed_step if resumed_step else -1
        self.checkpoint_step = resumed_step
        self.messages: set = set()
        self.stale: set = set()
        self.skipped: set = set()  # skippedCheckpoints entries already told (as JSON)
        self.total: Optional[int] = None
        self.first_row: Optional[dict] = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="kubetune-console", daemon=True)
        self.t0 = time.monotonic()
        self.progress: dict = {}
        self.last_row: dict = {}

    def __enter__(self):
        # what an earlier attempt left is not news: its last message, and its
        # metrics rows past the checkpoint this run resumes from (the workers
        # rewrite them away at their first log step)
        before = self.storage.read_json(contract.PROGRESS) or {}
        self.messages.add(before.get("message"))
        self.skipped = {json.dumps(s, sort_keys=True) for s in _skipped(before)}
        self.total = before.get("totalSteps")
        # all of them: a resume that falls back to an older checkpoint prints rows
        # below the step this run expected to resume from
        self.stale = {(r["step"], r.get("time")) for r in self.storage.read_metrics()}
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=10)
        self.poll()  # what the last second brought
        self.console.end_bar()

    def _loop(self):
        while not self.stop.wait(self.interval):
            self.poll()

    def poll(self) -> None:
        try:
            progress = self.storage.read_json(contract.PROGRESS) or {}
            rows = self.storage.read_metrics()
        except Exception:  # noqa: BLE001  (a torn read: try again next tick)
            return
        self.progress = progress
        message = progress.get("message")
        if message and message not in self.messages and progress.get("phase") != "Failed":
            self.messages.add(message)  # a failure is the driver's to tell
            self.console.say(f"kubetune run: {message}")
        self._skipped_checkpoints(progress)
        total = self.total = progress.get("totalSteps") or self.total
        for row in rows:
            if row["step"] <= self.printed_step or (row["step"], row.get("time")) in self.stale:
                continue
            self.printed_step = row["step"]
            self.last_row = row
            self.console.say(self._row_line(row, total, self._eta(row, total, progress)))
        for step in self.storage.committed_checkpoints():
            if step > self.checkpoint_step:
                self.checkpoint_step = step
                where = P.display(self.storage.uri(self.storage.checkpoint_rel(step)))
                self.console.say(f"kubetune run: checkpoint step {step} committed: {where}")
        if self.console.bar:
            self.console.draw(self._bar(progress))

    def _skipped_checkpoints(self, progress: dict) -> None:
        """The trainer passed over damaged checkpoints: say so, and follow it back
        to the one it resumed from (or to the start)."""
        new = [s for s in _skipped(progress) if json.dumps(s, sort_keys=True) not in self.skipped]
        if not new:
            return
        resumed = progress.get("resumedFrom")
        then = f"resumed from step {resumed}" if resumed else "started from scratch"
        for s in new:
            self.skipped.add(json.dumps(s, sort_keys=True))
            where = P.display(s["movedTo"]) if s.get("movedTo") else "left in place"
            self.console.say(
                f"kubetune run: checkpoint step {s.get('step')} failed verification "
                f"({s.get('reason')}); moved to {where}; {then}"
            )
        self.printed_step = min(self.printed_step, resumed or -1)
        self.checkpoint_step = min(self.checkpoint_step, resumed or 0)

    def _eta(self, row: dict, total, progress: dict):
        """From the rows' own times (several rows may arrive in one poll), else
        progress.json's estimate when it describes this very step."""
        if row.get("loss") is None and row["step"] == 0:
            return None
        if self.first_row is None:
            self.first_row = row
        first = self.first_row
        if total and row["step"] > first["step"] and row.get("time") and first.get("time"):
            from datetime import datetime

            spent = (
                datetime.fromisoformat(row["time"].replace("Z", "+00:00"))
                - datetime.fromisoformat(first["time"].replace("Z", "+00:00"))
            ).total_seconds()
            if spent > 0:  # the times have whole seconds
                return spent / (row["step"] - first["step"]) * (total - row["step"])
        return progress.get("etaSeconds") if progress.get("step") == row["step"] else None

    @staticmethod
    def _row_line(row: dict, total, eta) -> str:
        if row.get("loss") is None and row["step"] == 0:
            return f"kubetune run: held-out loss before training: {row['eval_loss']:.4f}"
        parts = [f"step {row['step']}/{total or '?'}"]
        if row.get("loss") is not None:
            parts.append(f"loss {row['loss']:.4f}")
        if row.get("learning_rate") is not None:
            parts.append(f"lr {row['learning_rate']:.2e}")
        if row.get("tokens_per_second") is not None:
            parts.append(f"{row['tokens_per_second']:.0f} tok/s")
        if row.get("reward_accuracy") is not None:
            parts.append(f"reward acc {row['reward_accuracy']:.2f}")
            parts.append(f"margin {row['reward_margin']:.3f}")
        if row.get("kl") is not None:  # kto
            parts.append(f"kl {row['kl']:.3f}")
            for key, word in (("rewards_desirable", "up"), ("rewards_undesirable", "down")):
                if row.get(key) is not None:
                    parts.append(f"reward {word} {row[key]:.3f}")
        if row.get("distill_kl") is not None:  # distill, logits mode
            parts.append(f"kl {row['distill_kl']:.4f}")
        if row.get("eval_loss") is not None:
            parts.append(f"eval {row['eval_loss']:.4f}")
        if row.get("eval_agreement") is not None:
            parts.append(f"agree {row['eval_agreement']:.2f}")
        if row.get("eval_reward_accuracy") is not None:
            parts.append(f"eval reward acc {row['eval_reward_accuracy']:.2f}")
        if row.get("eval_ranking_accuracy") is not None:
            parts.append(f"eval ranked {row['eval_ranking_accuracy']:.2f}")
        if total and row["step"] < total and eta is not None:
            parts.append(f"eta {_fmt_time(eta)}")
        return "  ".join(parts)

    def _bar(self, p: dict) -> str:
        step, total = p.get("step", 0), p.get("totalSteps") or 0
        width = 24
        filled = int(width * step / total) if total else 0
        phase = p.get("phase", "Starting")
        text = f"{phase:<10} [{'#' * filled}{'.' * (width - filled)}] {step}/{total or '?'}"
        if self.last_row.get("loss") is not None:
            text += f"  loss {self.last_row['loss']:.3f}"
        if p.get("tokensPerSecond"):
            text += f"  {p['tokensPerSecond']:.0f} tok/s"
        text += f"  elapsed {_fmt_time(time.monotonic() - self.t0)}"
        text += f"  eta {_fmt_time(p.get('etaSeconds'))}"
        return text


def summary(storage) -> str:
    out = storage.read_json(contract.OUTPUTS) or {}
    lines = [f"kubetune run: finished {out.get('steps')} steps; results in {_where(storage)}"]
    record = storage.read_json(S.SWEEP)
    if record:
        lines = ranking(record) + [
            f"kubetune run: the best trial ({record.get('bestTrial')}) is the output; "
            f"results in {_where(storage)}"
        ]
        if storage.fs.exists(storage.path(S.SWEEP_PLOT)):
            lines.append(f"  {'sweep plot:':<14}{P.display(storage.uri(S.SWEEP_PLOT))}")
    pruned = out.get("pruned")
    if pruned:
        lines.append("  " + summary_line(pruned))
    if out.get("parameters"):
        lines.append("  " + freeze_summary_line(out["parameters"]))
    cleaned = storage.read_json(contract.CLEAN)
    if cleaned:
        lines.append(
            f"  {'data clean:':<14}{P.display(storage.uri(contract.CLEAN))} "
            f"(action {cleaned['action']})"
        )
        lines += [f"  {'':<14}{line}" for line in C.summary(cleaned)]
    before, after = out.get("initialEvalLoss"), out.get("finalEvalLoss")
    if before is not None and after is not None:
        verdict = "better" if after < before else "NOT better"
        lines.append(f"  held-out loss: before {before:.4f} -> after {after:.4f} ({verdict})")
    lines += heldout.summary_lines(out)
    lines += classification_lines(out)
    lines += mixture_lines(out)
    for key, label in (
        ("adapter", "adapter"),
        ("mergedModel", "merged model"),
        ("model", "model"),
        ("metrics", "metrics"),
        ("lossCurve", "loss curve"),
    ):
        if out.get(key):
            lines.append(f"  {label + ':':<14}{P.display(out[key])}")
    for g in out.get("gguf") or []:
        score = ""
        if g.get("relativeIncrease") is not None:
            ok = "within" if g.get("withinTolerance") else "BEYOND"
            score = (
                f", held-out loss {g['evalLoss']:.4f} ({100 * g['relativeIncrease']:+.2f}%, "
                f"{ok} {100 * g['tolerance']:g}%)"
            )
        lines.append(
            f"  {'gguf ' + g['type'] + ':':<14}{P.display(g['uri'])} "
            f"({g['bytes'] / 2**20:.1f} MiB{score})"
        )
    wise = out.get("interpolation")
    if wise:
        published = wise.get("model") or wise.get("mergedModel") or wise.get("adapter")
        lines.append(
            f"  {'interpolated:':<14}{P.display(published)} (weight {wise['chosen']:g}: "
            f"{wise['rule']})"
        )
        for p in wise["weights"]:
            mark = "  <- published" if p["alpha"] == wise["chosen"] else ""
            lines.append(
                f"  {'':<14}weight {p['alpha']:.2f}: held-out loss {p['evalLoss']:.4f}{mark}"
            )
    lines += distill_lines(storage)
    if out.get("stoppedEarly"):
        lines.append("  stopped early (no improvement)")
    if storage.read_json(contract.RUN_RECORD):
        lines.append(f"  {'run record:':<14}{P.display(storage.uri(contract.RUN_RECORD))}")
    track = storage.read_json(contract.TRACKING)
    if track and track.get("reachable"):
        lines.append(f"  {'mlflow run:':<14}{track.get('url')}")
    elif track:
        lines.append(f"  {'mlflow:':<14}not reachable: {track.get('message')}")
    lines += startup_lines(storage)
    lines += summary_lines(out, storage, show=P.display)
    return "\n".join(lines)


def classification_lines(out: dict) -> list[str]:
    """method.task classification: the labels, and accuracy, macro-F1 and label ECE
    before -> after (outputs.json's classification)."""
    c = out.get("classification")
    if not c:
        return []

    def pair(key: str) -> str:
        before, after = c.get(f"{key}Before"), c.get(key)
        if after is None:
            return "n/a"
        return (f"{before:.4f} -> " if before is not None else "") + f"{after:.4f}"

    return [
        f"  {'labels:':<14}{len(c['labels'])} ({', '.join(c['labels'][:12])}"
        + (", ..." if len(c["labels"]) > 12 else "")
        + ")",
        f"  {'classifier:':<14}accuracy {pair('accuracy')}, macro-F1 {pair('f1')}, "
        f"label ECE {pair('ece')}",
    ]


def mixture_lines(out: dict) -> list[str]:
    """dataset.mixture: per source its share, the examples trained and the held-out
    loss before -> after (outputs.json's mixture)."""
    lines = []
    for s in out.get("mixture") or []:
        text = f"{s['id']} ({s['format']}): share {s['weight']:.1%}"
        if s.get("trainedExamples") is not None:
            text += f", {s['trainedExamples']} examples trained ({s['trainExamples']} in the set)"
        before, after = s.get("initialEvalLoss"), s.get("finalEvalLoss")
        if before is not None and after is not None:
            text += f", held-out loss {before:.4f} -> {after:.4f}"
        elif after is not None:
            text += f", held-out loss {after:.4f}"
        label = "" if lines else "mixture:"
        lines.append(f"  {label:<14}{text}")
    return lines


def distill_lines(storage) -> list[str]:
    """Objective distill: the teacher against the student (metrics.jsonl's rows)."""
    rows = storage.read_metrics()
    sizes = next((r for r in rows if r.get("teacher_parameters") is not None), None)
    evals = [r for r in rows if r.get("eval_agreement") is not None]
    if sizes is None and not evals:
        return []
    lines = []
    if sizes is not None:
        speeds = [r for r in rows if r.get("teacher_tokens_per_second") is not None]
        speed = ""
        if speeds:
            last = speeds[-1]
            speed = f"; tokens/s teacher {last['teacher_tokens_per_second']:.0f}"
            if last.get("tokens_per_second") is not None:
                speed += f", student {last['tokens_per_second']:.0f} (forward and backward)"
        lines.append(
            f"  {'distillation:':<14}teacher {sizes['teacher_parameters'] / 1e6:.1f}M "
            f"parameters, student {sizes['student_parameters'] / 1e6:.1f}M{speed}"
        )
    if evals:
        first, last = evals[0], evals[-1]
        lines.append(
            f"  {'':<14}held-out loss teacher {last['teacher_eval_loss']:.4f}, student "
            f"{last['eval_loss']:.4f}; agreement with the teacher {first['eval_agreement']:.3f}"
            f" -> {last['eval_agreement']:.3f}"
        )
    return lines


STARTUP_LABELS = {
    "modelFetched": "model fetched",
    "dataPrepared": "data prepared",
    "modelLoaded": "model loaded",
    "engineReady": "engine ready",
    "baseEvaluated": "base model evaluated",
    "firstStep": "first step",
}


def startup_lines(storage) -> list[str]:
    """The way to step 1 (progress.json's startup), each phase's own seconds."""
    try:
        record = contract.ProgressRecord.model_validate(storage.read_json(contract.PROGRESS))
    except ValueError:
        return []
    parts, prev = [], 0.0
    for phase in record.startup or []:
        if phase.name in STARTUP_LABELS:
            parts.append(f"{STARTUP_LABELS[phase.name]} {phase.seconds - prev:.1f}s")
            prev = phase.seconds
    if not parts:
        return []
    return [f"  {'to step 1:':<14}{prev:.1f}s from the worker's start: {', '.join(parts)}"]


def _where(storage) -> str:
    return P.display(storage.prefix)


class Interrupted(BaseException):
    """SIGINT or SIGTERM: a BaseException, so no `except Exception` on the way
    (the driver's, Ray's) mistakes it for a training failure."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _Signals:
    """The first SIGINT/SIGTERM raises Interrupted in the main thread; a second
    one, while the first is being handled, ends the process at once."""

    def __init__(self):
        self.received: Optional[int] = None
        self.previous: dict = {}

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous.setdefault(sig, signal.getsignal(sig))
            signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.received is not None:
            os._exit(128 + signum)
        self.received = signum
        raise Interrupted(signum)


def _save_on_stop(config, stop_files, finished, console, exc, err) -> None:
    """The first SIGINT/SIGTERM of a training run: ask for a checkpoint at the end
    of the step in flight and wait for the ranks to stop (at most the grace period
    the job allows its pods); a second signal ends the process at once."""
    ckpt = config.spec.checkpointing
    if not ckpt.save_on_stop or config.spec.sweep is not None or finished.is_set():
        return
    console.end_bar()
    console.say(
        f"kubetune run: {exc}: saving a checkpoint at the end of the step in flight "
        f"(up to {ckpt.termination_grace_period_seconds}s; press Ctrl-C again to stop at once)",
        err,
    )
    stop_files.request(str(exc))
    deadline = time.monotonic() + ckpt.termination_grace_period_seconds
    while not finished.wait(0.2) and time.monotonic() < deadline:
        pass


def _record_interruption(storage, config, signum: int, command: str) -> str:
    """progress.json says Interrupted (with the last committed checkpoint); the
    returned line says where that checkpoint is and how to resume."""
    prev = storage.read_json(contract.PROGRESS) or {}
    committed = storage.committed_checkpoints()
    pointer = None
    if committed:
        rel = storage.checkpoint_rel(committed[-1])
        pointer = contract.CheckpointPointer(step=committed[-1], uri=storage.uri(rel))
    name = signal.Signals(signum).name
    # a run stopped while its workers start has only the driver's Loading record
    step = max(prev.get("step") or 0, committed[-1] if committed else 0)
    total = prev.get("totalSteps")
    record = contract.ProgressRecord(
        phase=contract.TrainPhase.interrupted,
        step=step,
        total_steps=total,
        last_checkpoint=pointer,
        attempt=config.attempt,
        # how far this attempt's workers got on their way to step 1
        startup=prev.get("startup") if prev.get("attempt") == config.attempt else None,
        message=f"stopped by {name}; run `{command}` to resume",
        updated_at=now(),
    )
    # A worker's writer may still land one record after Ray's shutdown: write
    # ours until it is the one that stays.
    for _ in range(5):
        storage.write_progress(record)
        time.sleep(0.3)
        if (storage.read_json(contract.PROGRESS) or {}).get(
            "phase"
        ) == contract.TrainPhase.interrupted.value:
            break
    at = f" at step {step}/{total}" if total else " while starting"
    if pointer:
        where = f"last committed checkpoint: step {pointer.step} in {P.display(pointer.uri)}"
    else:
        where = "no checkpoint committed yet (the next run starts at step 0)"
    return f"kubetune run: stopped by {name}{at}; {where}; resume with: {command}"


TEACHER_FROM_JOB = ("method", "distill", "teacher", "fromJob")


def local_parent(
    job: dict, default_out: str, path: tuple[str, ...] = ("model", "fromJob")
) -> tuple[Optional[dict], Optional[str]]:
    """spec.model.fromJob (or the FineTuneJob another `path` under spec names, e.g.
    method.distill.teacher.fromJob) on this machine: the job of that name that
    `kubetune run` finished under the same output folder; (parent, None) or
    (None, the problem)."""
    spec = job.get("spec") or {}
    node = spec
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
    name = node if isinstance(node, str) and node else None
    field = "spec." + ".".join(path)
    if not name:
        return None, None
    namespace = (job.get("metadata") or {}).get("namespace") or "default"
    out = (spec.get("output") or {}).get("uri") or default_out
    prefix = contract.job_prefix(out, namespace, name, "local")
    phase = (JobStorage(prefix).read_json(contract.PROGRESS) or {}).get("phase")
    if phase != contract.TrainPhase.succeeded.value:
        found = f"it is {phase}" if phase else "no run of it was found"
        return None, (
            f"{field}: FineTuneJob {name} has not Succeeded under "
            f"{P.display(prefix)} ({found}): run it first with `kubetune run`"
        )
    return {"name": name, "uid": "local", "uri": prefix}, None


def main(args) -> int:
    """`kubetune run` (registered as the CLI's `run` command): the parsed arguments
    become a typed LocalRun."""
    return run_local(
        LocalRun(
            file=args.file,
            name=args.name,
            output=args.output,
            progress=False if args.no_progress else None,
        )
    )


def run_local(opts: LocalRun, out: Optional[TextIO] = None, err: Optional[TextIO] = None) -> int:
    """`kubetune run`: every FineTuneJob of FILE in dependency order (or --name's,
    after its in-file parents). 0 all done, else the first failure's status: 1
    training failed, 2 invalid job or preflight (for a file's plan or any of its
    jobs: nothing ran), 3 data error in the workers, 128+signal when stopped."""
    out, err = out or sys.stdout, err or sys.stderr
    t0 = time.monotonic()
    base = (opts.base or Path.cwd()).resolve()
    try:
        docs = load_documents(opts.file)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        err.write(f"kubetune run: {exc}\n")
        return EXIT_INVALID
    found = jobfile.plan(docs, opts.name, opts.file)
    if not found.ok:
        for document, e in found.errors:
            where = f"{opts.file} #{document}: " if document else ""
            err.write(f"  {where}{e}\n")
        err.write("kubetune run: nothing was trained\n")
        return EXIT_INVALID
    # every job validated before the first one trains: a typo in the last job of a
    # chain is found now, not after the first job's minutes of training
    jobs = []
    for entry in found.order:
        # validated with its paths resolved: relative ones are this machine's, read from `base`
        job = P.resolve_job_paths(entry.doc, base)
        result = validate_document(job)
        if not result.ok:
            for e in result.errors:
                err.write(f"  {e}\n")
            err.write(
                f"kubetune run: {opts.file} #{entry.document} ({entry.name}) is not a valid "
                "FineTuneJob; nothing was trained\n"
            )
            return EXIT_INVALID
        jobs.append((entry, job, result))
    if found.jobs > 1:
        picked = f" (--name {opts.name} and the jobs it continues)" if opts.name else ""
        out.write(
            f"kubetune run: {opts.file} holds {found.jobs} FineTuneJobs; running "
            f"{len(jobs)}{picked}, parents first (spec.model.fromJob):\n"
            + "".join(line + "\n" for line in found.describe())
        )
        out.flush()
    ray_was_up = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    failed: dict[tuple, tuple[str, int]] = {}  # (namespace, name) -> (failed job, status)
    first_rc = 0
    try:
        for k, (entry, job, result) in enumerate(jobs):
            key = (entry.namespace, entry.name)
            parents = [(entry.namespace, p) for _f, p in entry.parents]
            blocked = next((failed[p] for p in parents if p in failed), None)
            if blocked:
                failed[key] = blocked
                err.write(
                    f"kubetune run: {entry.name} not started: it continues {blocked[0]}, "
                    f"which failed (exit {blocked[1]})\n"
                )
                continue
            rc = _run_job(opts, entry.doc, job, result, base, out, err, t0, k == len(jobs) - 1)
            if rc >= 128:  # stopped by a signal: nothing more starts
                rest = [e.name for e, _j, _r in jobs[k + 1 :]]
                if rest:
                    err.write(f"kubetune run: not started: {', '.join(rest)}\n")
                return rc
            if rc != 0:
                failed[key] = (entry.name, rc)
                first_rc = first_rc or rc
    finally:
        if len(jobs) > 1 and not ray_was_up and "ray" in sys.modules:
            sys.modules["ray"].shutdown()
    if len(jobs) > 1 and failed:
        names = ", ".join(name for _ns, name in failed)
        err.write(f"kubetune run: failed or not started: {names}\n")
    return first_rc


def _run_job(opts, raw, job, result, base, out, err, t0, last: bool) -> int:
    """One FineTuneJob of the file (validated). `last`: the local Ray this run
    started may stop after it (between jobs it stays up)."""
    output = P.resolve(opts.output or "runs", base)
    default_out = output if "://" in output else Path(output).as_uri()
    parent, problem = local_parent(job, default_out)
    teacher, teacher_problem = local_parent(job, default_out, TEACHER_FROM_JOB)
    if problem or teacher_problem:
        err.write(f"  {problem or teacher_problem}\nkubetune run: nothing was trained\n")
        return EXIT_INVALID
    config = load_trainer_config(
        spec_to_trainer_config(job, default_output_uri=default_out, parent=parent, teacher=teacher)
    )
    storage = JobStorage(config.storage_prefix, config.spec.output)
    bar = opts.progress is not False and out.isatty()
    console = Console(out, bar)
    for w in result.warnings:
        console.say(f"kubetune run: warning: {w}", err)
    done = storage.read_json(contract.PROGRESS) or {}
    if done.get("phase") == contract.TrainPhase.succeeded.value and storage.read_json(
        contract.OUTPUTS
    ):
        console.say(summary(storage))
        console.say(f"  (already finished; delete {_where(storage)} to train again)")
        return 0

    signals = _Signals()
    signals.install()
    try:
        return _run(opts, config, job, raw, base, storage, console, signals, t0, err, last)
    except Interrupted as exc:
        console.end_bar()
        if "ray" in sys.modules:
            sys.modules["ray"].shutdown()
        console.say(_record_interruption(storage, config, exc.signum, opts.command()), err)
        return 128 + exc.signum
    finally:
        signals.restore()


def _run(opts, config, job, raw, base, storage, console, signals, t0, err, last=True) -> int:
    console.say(f"kubetune run: {config.job.name}: results in {_where(storage)}")
    job_dir = None if opts.file == "-" else Path(opts.file).resolve().parent
    report = P.preflight(config, job, base, job_dir, raw)
    for note in report.notes:
        console.say(f"  {note}")
    for w in report.warnings:
        console.say(f"kubetune run: warning: {w}", err)
    if not report.ok:
        for e in report.errors:
            console.say(f"  {e}", err)
        console.say(
            f"kubetune run: {len(report.errors)} problem(s) found in {report.seconds:.1f}s, "
            "before starting Ray; nothing was trained",
            err,
        )
        return EXIT_INVALID
    committed = storage.committed_checkpoints()
    resumed = committed[-1] if committed else 0
    if resumed:
        ckpt = storage.uri(storage.checkpoint_rel(resumed))
        console.say(f"kubetune run: resumed from step {resumed} ({P.display(ckpt)})")
    console.say(
        f"kubetune run: checks passed in {report.seconds:.1f}s; starting Ray "
        f"({config.spec.resources.workers} worker(s))"
    )
    import logging

    import ray

    ensure_env()
    # A caller that already holds a Ray (a notebook, a test session) keeps it.
    own_ray = not ray.is_initialized()
    # A terminal's Ctrl-C reaches the whole process group: Ray's processes, started
    # here, inherit SIGINT blocked, so they train on while the ranks save; the
    # first Ctrl-C is this process's to handle (_save_on_stop).
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        if own_ray:
            ray.init(
                num_cpus=os.cpu_count(),
                include_dashboard=False,
                log_to_driver=False,
                logging_level=logging.ERROR,
            )
    except Exception as exc:  # noqa: BLE001  (Ray's own words, on one line, no traceback)
        console.say(f"kubetune run: the local Ray did not start: {exc}", err)
        console.say(f"kubetune run: nothing was trained; `{opts.command()}` tries again", err)
        return 1
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    signals.install()  # ray.init installs its own handlers; ours decide
    # fit() runs in a thread: Ray Train installs its own SIGINT handler when
    # called from the main thread (an abort that exits 1 without a word), and
    # the main thread must stay free to stop everything on a signal.
    stopping = threading.Event()
    result: dict = {}
    # the first Ctrl-C asks the ranks to commit a checkpoint at the end of the
    # step in flight (kubetune_trainer.stop); a second one stops at once
    stop_files = StopFiles(tempfile.mkdtemp(prefix="kubetune-stop-"))

    # Not Thread.is_alive(): a signal that interrupts Thread.join leaves the thread
    # marked stopped while it still runs (CPython's bpo-45274 handling).
    finished = threading.Event()

    def train() -> None:
        try:
            result["rc"] = run(
                config,
                quiet=True,
                check=False,
                log=lambda text: console.say(text, err),
                stopping=stopping,
                stop_dir=str(stop_files.dir),
            )
        finally:
            finished.set()

    worker = threading.Thread(target=train, name="kubetune-fit", daemon=True)
    if config.spec.sweep is not None:
        watcher = SweepWatcher(storage, console)
    else:
        watcher = Watcher(storage, console, resumed)
    try:
        with watcher:
            worker.start()
            while not finished.wait(0.2):
                pass
    except Interrupted as exc:
        _save_on_stop(config, stop_files, finished, console, exc, err)
        stopping.set()
        raise
    finally:
        if (own_ray and last) or stopping.is_set():
            ray.shutdown()
        shutil.rmtree(stop_files.dir, ignore_errors=True)
    rc = result.get("rc", 1)
    if rc != 0:
        console.say(
            f"kubetune run: failed (exit {rc}); records in {_where(storage)}; "
            f"after fixing the cause, `{opts.command()}` resumes from the last checkpoint",
            err,
        )
        return rc
    console.say(summary(storage))
    console.say(f"kubetune run: done in {_fmt_time(time.monotonic() - t0)}")
    return 0
