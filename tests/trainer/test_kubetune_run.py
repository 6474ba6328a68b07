"""`kubetune run` as a person runs it: the real CLI in a subprocess, from a
directory that is not the job file's, with relative paths for model, data and
output.

- every preflight mistake stops the run before Ray starts, with the path, the
  1-based line and the fix, and says how long the checks took;
- a run interrupted by SIGINT (sent to the process group, as a terminal's
  Ctrl-C is) says where its last committed checkpoint is and how to resume,
  records it in progress.json, and the same command then says "resumed from
  step N" and finishes, with one plain line per log step (not a terminal).

Two Ray fits in all (the interrupted run and its resume), on a tiny model.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trainer_helpers as H
import yaml

from kubetune_api import storage as contract

pytestmark = [pytest.mark.trainer, pytest.mark.timeout(1800)]

KUBETUNE = str(Path(sys.executable).parent / "kubetune")
PREFLIGHT_SECONDS = 60  # far below a Ray start on this tier's machines; the line says the real time
# The interrupted run gets SIGINT once step 10's checkpoint is committed and stops
# about 2 steps later, with a checkpoint of the step it stopped at (save on stop);
# the resume trains on to STEPS with an evaluation at EVAL_AT.
# Room for a slow stop: the first run would train until step 40, and a newest
# checkpoint of step 20 still leaves the evaluation at step 30 to the resume.
STEPS, EVAL_AT = 40, 30


def _job(name: str, **spec) -> dict:
    job = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": "models/tiny"},
            "dataset": {
                "train": {"uri": "data/chat.jsonl"},
                "format": "chat",
                "validationSplit": 0.1,
                "maxSeqLength": 128,
            },
            "method": {"type": "lora", "lora": {"r": 4, "alpha": 8}},
            "hyperparameters": {
                "maxSteps": STEPS,
                "batchSize": 4,
                "precision": "fp32",
                "logEverySteps": 1,
            },
            "distributed": {"zeroStage": 2},
            "resources": {"workers": 1, "gpusPerWorker": 0, "cpuPerWorker": "1"},
            "evaluation": {"everySteps": EVAL_AT, "maxBatches": 2},
            "checkpointing": {"everySteps": 10, "keepLast": 2},
            "output": {"uri": "out"},
        },
    }
    for key, value in spec.items():
        job["spec"][key] = value
    return job


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """work/ holds models/ and data/ and is where kubetune runs; jobs/ is elsewhere."""
    root = tmp_path_factory.mktemp("kubetune-run")
    work = root / "work"
    H.tiny_model(work / "models/tiny")
    (work / "data").mkdir()
    H.write_jsonl(work / "data/chat.jsonl", H.chat_rows(64))
    (root / "jobs").mkdir()
    return work


def _write_job(work: Path, name: str, job: dict) -> str:
    path = work.parent / "jobs" / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return os.path.relpath(path, work)


def _kubetune(
    work: Path, *args: str, timeout: float = 300
) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    proc = subprocess.run(
        [KUBETUNE, *args], cwd=work, capture_output=True, text=True, timeout=timeout
    )
    return proc, time.monotonic() - t0


def _preflight_cases(work: Path) -> list[tuple[str, dict, list[str]]]:
    """(name, job, what the message must hold) per mistake."""
    (work / "data/response.jsonl").write_text(
        "".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) + "\n" for i in range(5))
    )
    lines = [json.dumps(r) for r in H.chat_rows(6)]
    lines[3] = '{"messages": [{"role": "user", "content": "hi"}'  # line 4, cut short
    (work / "data/broken.jsonl").write_text("\n".join(lines) + "\n")
    no_weights = work / "models/no-weights"
    no_weights.mkdir(parents=True, exist_ok=True)
    (no_weights / "config.json").write_text((work / "models/tiny/config.json").read_text())
    no_tok = work / "models/no-tokenizer"
    no_tok.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        (no_tok / name).write_bytes((work / "models/tiny" / name).read_bytes())
    strict = work / "models/strict-template"  # a template that refuses system turns
    strict.mkdir(parents=True, exist_ok=True)
    for f in (work / "models/tiny").iterdir():
        (strict / f.name).write_bytes(f.read_bytes())
    (strict / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('system turns are not supported') }}{% endif %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    system = {"role": "system", "content": "be brief"}
    H.write_jsonl(
        work / "data/roles.jsonl",
        [{"messages": [system, *r["messages"]]} for r in H.chat_rows(4)],
    )
    jobs_dir = work.parent / "jobs"
    (jobs_dir / "beside.jsonl").write_text((work / "data/chat.jsonl").read_text())
    return [
        (
            "missing-model",
            _job("missing-model", model={"uri": "models/nope"}),
            ["spec.model.uri: no such folder:", str(work / "models/nope"), "working directory"],
        ),
        (
            "no-weights",
            _job("no-weights", model={"uri": "models/no-weights"}),
            ["is not a model folder: no weights", "config.json"],
        ),
        (
            "missing-data",
            _job(
                "missing-data",
                dataset={"train": {"uri": "data/nope.jsonl"}, "format": "chat"},
            ),
            ["spec.dataset.train.uri: no such file:", str(work / "data/nope.jsonl")],
        ),
        (
            "data-beside-the-job",
            _job(
                "data-beside-the-job",
                dataset={"train": {"uri": "beside.jsonl"}, "format": "chat"},
            ),
            ["not the job file's folder", str(jobs_dir / "beside.jsonl")],
        ),
        (
            "wrong-keys",
            _job(
                "wrong-keys",
                dataset={"train": {"uri": "data/response.jsonl"}, "format": "prompt-completion"},
            ),
            ["keys found: prompt, response", "prompt, completion", "response.jsonl line 1"],
        ),
        (
            "bad-json-line",
            _job(
                "bad-json-line", dataset={"train": {"uri": "data/broken.jsonl"}, "format": "chat"}
            ),
            ["broken.jsonl line 4: invalid JSON", "fix or delete the line"],
        ),
        (
            "no-tokenizer",
            _job("no-tokenizer", model={"uri": "models/no-tokenizer"}),
            ["holds no tokenizer", "tokenizer.save_pretrained"],
        ),
        (
            "template",
            _job(
                "template",
                model={"uri": "models/strict-template"},
                dataset={"train": {"uri": "data/roles.jsonl"}, "format": "chat"},
            ),
            ["the chat template does not render", "roles.jsonl line", "not supported"],
        ),
    ]


def test_every_preflight_mistake_stops_before_ray_with_path_line_and_fix(workdir):
    timings = []
    for name, job, expected in _preflight_cases(workdir):
        rel = _write_job(workdir, name, job)
        proc, seconds = _kubetune(workdir, "run", rel, "--no-progress")
        text = proc.stdout + proc.stderr
        timings.append((name, seconds))
        assert proc.returncode == 2, f"{name}: {text}"
        for part in expected:
            assert part in text, f"{name}: {part!r} not in\n{text}"
        assert "__bad__" not in text and "checks passed" not in text, text
        found = re.search(r"problem\(s\) found in ([\d.]+)s, before starting Ray", text)
        assert found, text
        assert not (workdir / "out/default" / name / "local/progress.json").exists()
        assert seconds < PREFLIGHT_SECONDS, f"{name}: {seconds:.1f}s"
        print(f"{name}: exit 2 after {seconds:.1f}s (checks {found.group(1)}s)\n{text}")
    assert len(timings) == 8


def test_validate_reports_broken_data_and_warns_on_missing_paths(workdir):
    _preflight_cases(workdir)
    cluster = {"uri": "s3://bucket/runs"}  # validate checks a job for the cluster too
    bad = _write_job(
        workdir,
        "validate-bad",
        _job("v", dataset={"train": {"uri": "data/broken.jsonl"}}, output=cluster),
    )
    proc, _ = _kubetune(workdir, "validate", bad)
    assert proc.returncode == 1, proc.stdout
    assert "broken.jsonl line 4: invalid JSON" in proc.stdout
    missing = _write_job(
        workdir, "validate-missing", _job("v", model={"uri": "models/nope"}, output=cluster)
    )
    proc, _ = _kubetune(workdir, "validate", missing)
    assert proc.returncode == 0, proc.stdout
    assert f"warning: spec.model.uri: no such folder: {workdir / 'models/nope'}" in proc.stdout


STEP_LINE = re.compile(rf"^step (\d+)/{STEPS}  loss \d+\.\d{{4}}  lr \d\.\d\de[-+]\d\d  \d+ tok/s")


def test_relative_paths_sigint_then_resume(workdir):
    job_file = _write_job(workdir, "relative", _job("relative"))
    prefix = workdir / "out/default/relative/local"
    # a terminal's Ctrl-C reaches the whole foreground process group
    proc = subprocess.Popen(
        [KUBETUNE, "run", job_file],
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines, sent = [], None
    try:
        for line in proc.stdout:
            lines.append(line)
            if sent is None and "checkpoint step 10 committed" in line:
                os.killpg(proc.pid, signal.SIGINT)
                sent = time.monotonic()
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    first = "".join(lines)
    print(first)
    assert sent is not None, first
    assert rc == 128 + signal.SIGINT, first
    stop = [ln for ln in lines if "stopped by SIGINT" in ln]
    assert len(stop) == 1, first
    committed = json.loads((prefix / "progress.json").read_text())
    assert committed["phase"] == "Interrupted", committed
    # the way to step 1, phase by phase, in order, on one clock
    startup = committed["startup"]
    names = [ph["name"] for ph in startup]
    assert [n for n in contract.STARTUP_PHASES if n in names] == names, names
    assert {"workerStarted", "modelFetched", "dataPrepared", "engineReady", "firstStep"} <= set(
        names
    ), names
    seconds = [ph["seconds"] for ph in startup]
    assert seconds == sorted(seconds) and seconds[0] < 1.0 < seconds[-1], startup
    step = committed["lastCheckpoint"]["step"]
    assert step >= 10 and (prefix / f"checkpoints/step-{step:08d}/manifest.json").exists()
    # save on stop: the step in flight when the SIGINT came was committed, none lost
    assert committed["step"] == step > 10, committed
    assert any("saving a checkpoint at the end of the step in flight" in ln for ln in lines)
    assert step < EVAL_AT, f"stopped {step - 10}+ steps after the SIGINT: {first}"
    assert f"last committed checkpoint: step {step} in {prefix}/checkpoints/" in stop[0]
    assert stop[0].rstrip().endswith(f"resume with: kubetune run {job_file}"), stop[0]
    assert "file://" not in first and "\r" not in first

    proc2, seconds = _kubetune(workdir, "run", job_file, timeout=1200)
    second = proc2.stdout + proc2.stderr
    print(second)
    assert proc2.returncode == 0, second
    assert f"kubetune run: resumed from step {step} ({prefix}/checkpoints/" in second
    to_step_1 = [ln for ln in proc2.stdout.splitlines() if ln.startswith("  to step 1:")]
    assert len(to_step_1) == 1 and "engine ready" in to_step_1[0], second
    steps = [int(m.group(1)) for m in map(STEP_LINE.match, proc2.stdout.splitlines()) if m]
    assert steps == list(range(step + 1, STEPS + 1)), second  # one plain line per log step
    assert re.search(rf"^step {EVAL_AT}/{STEPS} .* eval \d+\.\d{{4}}", proc2.stdout, re.M), second
    assert "\r" not in second and "file://" not in second
    assert f"adapter:      {prefix}/adapter" in proc2.stdout
    assert (prefix / "adapter/adapter_model.safetensors").exists()
    assert json.loads((prefix / "outputs.json").read_text())["steps"] == STEPS
    # everything under the working directory's out/, nothing beside the job file
    assert not (workdir.parent / "jobs/out").exists()


def test_console_keeps_messages_on_their_own_lines_below_the_bar():
    from kubetune_trainer.local import Console

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    out = Terminal()
    console = Console(out, bar=True)
    console.draw("Training [###.....] 3/8")
    console.say("kubetune run: checkpoint step 3 committed: /x")
    console.draw("Training [####....] 4/8")
    console.end_bar()
    text = out.getvalue()
    # the bar is cleared before a message, which ends its own line, then redrawn
    assert text == (
        "Training [###.....] 3/8"
        "\r\033[K"
        "kubetune run: checkpoint step 3 committed: /x\n"
        "Training [###.....] 3/8"
        "\r\033[K"
        "Training [####....] 4/8"
        "\n"
    )
    plain = io.StringIO()
    console = Console(plain, bar=False)
    console.draw("Training [###.....] 3/8")
    console.say("a message")
    console.end_bar()
    assert plain.getvalue() == "a message\n"


def _records(storage, rows: list[dict], progress: dict, committed: list[int]) -> None:

    storage.write_metrics(rows)
    storage.write_json(contract.PROGRESS, progress)
    for step in committed:
        storage.write_json(f"{storage.checkpoint_rel(step)}/{contract.MANIFEST}", {"step": step})


def _row(step: int, time: str, **extra) -> dict:
    base = {"step": step, "loss": 2.0 - step / 10, "learning_rate": 1e-4}
    return {**base, "tokens_per_second": 100.0, "time": time, **extra}


def test_watcher_lines_bar_and_a_resume_that_skips_the_old_attempts_rows(tmp_path):
    from kubetune_trainer.local import Console, Watcher
    from kubetune_trainer.storage import JobStorage

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    storage = JobStorage(tmp_path.as_uri())
    old = [_row(s, f"2026-01-01T00:00:0{s}Z") for s in range(1, 6)]
    progress = {"phase": "Interrupted", "step": 5, "totalSteps": 8, "message": "stopped by SIGINT"}
    _records(storage, old, progress, [2])
    out = Terminal()
    watcher = Watcher(storage, Console(out, bar=True), resumed_step=2, interval=60)
    with watcher:
        watcher.poll()
        assert "step 3/8" not in out.getvalue()  # the old attempt's rows past step 2
        assert "stopped by SIGINT" not in out.getvalue()  # and its last message
        new = [*old[:2], _row(3, "2026-01-01T01:00:00Z"), _row(4, "2026-01-01T01:00:02Z")]
        progress = {"phase": "Training", "step": 4, "totalSteps": 8, "etaSeconds": 9}
        _records(storage, new, progress, [2, 4])
        watcher.poll()
    text = out.getvalue()
    lines = [ln.split("\r\033[K")[-1] for ln in text.split("\n")[:-1]]
    assert "step 3/8  loss 1.7000  lr 1.00e-04  100 tok/s" in lines, text
    assert "step 4/8  loss 1.6000  lr 1.00e-04  100 tok/s  eta 0m08s" in lines, text
    assert (
        f"kubetune run: checkpoint step 4 committed: {tmp_path}/checkpoints/step-00000004" in lines
    )
    assert "checkpoint step 2 committed" not in text  # the one resumed from is not news
    assert lines[-1].startswith("Training   [############............] 4/8  loss 1.600"), text
    assert text.endswith("\n")  # the bar is left as a finished line


def test_watcher_tells_a_skipped_checkpoint_and_follows_the_resume_back(tmp_path):
    """The CLI expected to resume from step 4 (the newest committed); the trainer
    found it damaged and resumed from 2: one line says so, and steps 3 and 4,
    trained again, print."""
    from kubetune_trainer.local import Console, Watcher
    from kubetune_trainer.storage import JobStorage

    storage = JobStorage(tmp_path.as_uri())
    old = [_row(s, f"2026-01-01T00:00:0{s}Z") for s in range(1, 6)]
    _records(storage, old, {"phase": "Failed", "step": 5, "totalSteps": 6}, [2, 4])
    out = io.StringIO()
    watcher = Watcher(storage, Console(out, bar=False), resumed_step=4, interval=60)
    moved = f"{tmp_path.as_uri()}/checkpoints/quarantine/step-00000004-20260101T010000Z"
    skipped = {"step": 4, "reason": "ds/x.pt: 10 bytes, the manifest says 90", "movedTo": moved}
    with watcher:
        watcher.poll()
        assert out.getvalue() == ""  # nothing new yet
        new = [*old[:2], _row(3, "2026-01-01T01:00:00Z"), _row(4, "2026-01-01T01:00:02Z")]
        progress = {"phase": "Training", "step": 4, "totalSteps": 6, "resumedFrom": 2}
        _records(storage, new, progress | {"skippedCheckpoints": [skipped]}, [2, 4])
        watcher.poll()
        watcher.poll()  # told once
    lines = out.getvalue().splitlines()
    assert lines == [
        "kubetune run: checkpoint step 4 failed verification (ds/x.pt: 10 bytes, the manifest "
        f"says 90); moved to {tmp_path}/checkpoints/quarantine/step-00000004-20260101T010000Z; "
        "resumed from step 2",
        "step 3/6  loss 1.7000  lr 1.00e-04  100 tok/s",
        "step 4/6  loss 1.6000  lr 1.00e-04  100 tok/s  eta 0m04s",
        f"kubetune run: checkpoint step 4 committed: {tmp_path}/checkpoints/step-00000004",
    ], out.getvalue()
