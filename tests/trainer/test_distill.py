"""Distillation: the KL terms against hand-computed values, the teacher's source, the
tokenizer check, and fits on the shared local Ray: a student pulled towards a teacher's
distributions (logits mode), and the teacher's answers generated once, cached under the
job's prefix and read back on a resume (sequence mode)."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import pytest
import torch
import trainer_helpers as H

from kubetune_trainer.objectives import distill as Dl

pytestmark = [pytest.mark.trainer, pytest.mark.timeout(600)]


# ---------------------------------------------------------------------------- loss


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))


def _softmax(xs: list[float], t: float) -> list[float]:
    e = [math.exp(x / t) for x in xs]
    return [v / sum(e) for v in e]


def test_token_kl_forward_and_reverse_match_hand_computed_values():
    student = torch.tensor([[1.0, 2.0, 0.5], [0.0, 0.0, 0.0]])
    teacher = torch.tensor([[3.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    for t in (1.0, 2.0):
        s = [_softmax(r, t) for r in student.tolist()]
        q = [_softmax(r, t) for r in teacher.tolist()]
        fwd = Dl.token_kl(student, teacher, t, "forwardKL").tolist()
        rev = Dl.token_kl(student, teacher, t, "reverseKL").tolist()
        assert fwd == pytest.approx([_kl(q[0], s[0]), 0.0], abs=1e-6)
        assert rev == pytest.approx([_kl(s[0], q[0]), 0.0], abs=1e-6)
        assert fwd[0] != pytest.approx(rev[0], abs=1e-3)  # the two directions differ


def test_distill_loss_weighs_the_kl_by_t_squared_against_cross_entropy():
    student = torch.tensor([[1.0, 2.0, 0.5], [0.2, -1.0, 0.3]], requires_grad=True)
    teacher = torch.tensor([[3.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    target = torch.tensor([0, 1])
    t, weight = 2.0, 0.25
    total, kl, ce = Dl.distill_loss(student, teacher, target, t, "forwardKL", weight)
    s = [_softmax(r, t) for r in student.tolist()]
    q = [_softmax(r, t) for r in teacher.tolist()]
    want_kl = (_kl(q[0], s[0]) + _kl(q[1], s[1])) / 2
    p1 = [_softmax(r, 1.0) for r in student.tolist()]
    want_ce = -(math.log(p1[0][0]) + math.log(p1[1][1])) / 2
    assert kl.item() == pytest.approx(want_kl, abs=1e-6)
    assert ce.item() == pytest.approx(want_ce, abs=1e-6)
    assert total.item() == pytest.approx(weight * t * t * want_kl + (1 - weight) * want_ce, 1e-6)
    total.backward()
    assert student.grad is not None and not kl.requires_grad
    # weight 1: the data's answers do not count; a student equal to the teacher costs 0
    same, _, _ = Dl.distill_loss(teacher, teacher, target, t, "reverseKL", 1.0)
    assert same.item() == pytest.approx(0.0, abs=1e-7)


def test_distill_loss_takes_the_kl_on_every_position_and_the_ce_on_labelled_ones():
    """tokens all: prompt positions (target IGNORE) count in the KL, not in the CE."""
    from kubetune_trainer import data as D

    student = torch.tensor([[1.0, 2.0, 0.5], [0.2, -1.0, 0.3], [0.0, 0.5, 1.0]])
    teacher = torch.tensor([[3.0, 0.0, -1.0], [0.0, 1.0, 0.0], [1.0, 1.0, -2.0]])
    target = torch.tensor([D.IGNORE, 1, D.IGNORE])
    total, kl, ce = Dl.distill_loss(student, teacher, target, 1.0, "forwardKL", 0.5)
    s = [_softmax(r, 1.0) for r in student.tolist()]
    q = [_softmax(r, 1.0) for r in teacher.tolist()]
    want_kl = sum(_kl(q[i], s[i]) for i in range(3)) / 3
    assert kl.item() == pytest.approx(want_kl, abs=1e-6)
    assert ce.item() == pytest.approx(-math.log(s[1][1]), abs=1e-6)
    assert total.item() == pytest.approx(0.5 * want_kl + 0.5 * ce.item(), abs=1e-6)
    # no labelled position at all: the KL alone, and a CE of 0
    _, kl2, ce2 = Dl.distill_loss(
        student, teacher, torch.full((3,), D.IGNORE), 1.0, "forwardKL", 0.5
    )
    assert kl2.item() == pytest.approx(want_kl, abs=1e-6) and ce2.item() == 0.0


def test_next_token_positions_of_padded_and_packed_batches():
    from kubetune_trainer import data as D

    pad, ig = 0, D.IGNORE
    examples = [
        D.Example([5, 6, 7, 8], [ig, ig, 7, 8]),  # a prompt of 2, an answer of 2
        D.Example([9, 0, 3], [ig, 0, 3]),  # its answer holds the pad id: a real token
        D.Example([4, 4], [ig, 4]),
    ]
    padded = D.collate(examples, [[0], [2]], pad, packing=False)
    assert D.next_token_positions(padded, pad).tolist() == [
        [True, True, True],
        [True, False, False],
    ]
    packed = D.collate(examples, [[0, 2], [1]], pad, packing=True)
    # row 0: 5 6 7 8 | 4 4 (position 3 -> 4 crosses into the next example);
    # row 1: 9 0 3, then three pads (unlabelled pad ids at the end: padding)
    assert D.next_token_positions(packed, pad).tolist() == [
        [True, True, True, False, True],
        [True, True, False, False, False],
    ]


def test_teacher_source_is_spec_model_without_parent_or_pruning():
    from kubetune_api.models import ModelSource, TeacherSource

    model = ModelSource(name="org/student", revision="v2", from_job="parent-job")
    default = Dl.teacher_source(model, None)
    assert default.name == "org/student" and default.revision == "v2"
    assert default.from_job is None and default.from_checkpoint is None
    if "prune" in type(model).model_fields:  # spec.model.prune, where the spec has it
        assert default.prune is None
    other = Dl.teacher_source(model, TeacherSource(uri="s3://models/big"))
    assert other.uri == "s3://models/big" and other.name is None and other.revision is None


def test_a_teacher_with_another_tokenizer_is_refused_by_name(tmp_path):
    from transformers import AutoTokenizer

    from model_fixtures import tiny_tokenizer

    H.prepare_quickstart()
    smol = AutoTokenizer.from_pretrained(H.SMOL)
    Dl.check_vocabulary(smol, smol, "same")  # the same vocabulary: fine
    with pytest.raises(Dl.TeacherError, match="method.distill.teacher: the teacher other"):
        Dl.check_vocabulary(smol, tiny_tokenizer(), "other")


def test_kubetune_run_console_shows_distill_metrics():
    from kubetune_trainer.local import Watcher

    row = {
        "step": 4,
        "loss": 0.41,
        "distill_kl": 0.125,
        "eval_loss": 0.45,
        "eval_agreement": 0.75,
        "teacher_eval_loss": 0.3,
    }
    line = Watcher._row_line(row, 8, None)
    assert "kl 0.1250" in line and "eval 0.4500" in line and "agree 0.75" in line


# ---------------------------------------------------------------------------- training


def _models(tmp_path: Path) -> tuple[Path, Path]:
    """A student with random weights, and a teacher (the same size, the same tokenizer)
    that puts almost all its probability on the letter "a" after every token: far apart
    at step 0, and a top-1 answer the student can learn in a few steps."""
    return H.tiny_model(tmp_path / "student"), H.peaked_model(tmp_path / "teacher", "a")


def test_logit_distillation_with_an_on_policy_share_pulls_the_student_to_the_teacher(
    ray_local, tmp_path
):
    student, teacher = _models(tmp_path)
    train = H.write_jsonl(tmp_path / "chat.jsonl", H.chat_rows(80))
    j = H.job(
        student,
        train,
        tmp_path.joinpath("out").as_uri(),
        dataset={"format": "chat", "maxSeqLength": 64, "validationSplit": 0.15},
        method={
            "type": "full",
            "objective": "distill",
            "distill": {
                "teacher": {"uri": str(teacher)},
                "weight": 1.0,
                # every other micro-batch: the student's own answers (GKD)
                "onPolicyFraction": 0.5,
                "maxNewTokens": 8,
            },
        },
        hyperparameters={"maxSteps": 8, "learningRate": 1e-2, "batchSize": 4},
        evaluation={"everySteps": 4, "maxBatches": 2},
        checkpointing={"everySteps": 8},
    )
    cfg = H.trainer_config(j)
    t0 = time.monotonic()
    H.fit(cfg)
    rows = H.metric_rows(cfg)
    print(f"distill logits fit: {time.monotonic() - t0:.1f}s")
    for s in (0, 4, 8):
        r = rows[s]
        print(
            f"step {s}: eval_loss {r['evalLoss']:.4f} agreement {r['evalAgreement']:.3f} "
            f"kl {r['evalDistillKl']:.4f} teacher {r['teacherEvalLoss']:.4f}"
        )
    first, last = rows[0], rows[8]
    # the student learns the teacher's distributions: the KL falls, top-1 agreement rises
    assert last["evalDistillKl"] < 0.5 * first["evalDistillKl"]
    assert last["evalAgreement"] >= first["evalAgreement"] + 0.2
    # the teacher is frozen: its held-out loss is the same at every evaluation
    assert last["teacherEvalLoss"] == pytest.approx(first["teacherEvalLoss"], rel=1e-5)
    assert rows[1]["teacherParameters"] > 0 and rows[1]["studentParameters"] > 0
    assert rows[1]["teacherTokensPerSecond"] > 0
    # `kubetune run`'s summary: the two models' sizes and speeds, losses and agreement
    from kubetune_trainer.local import summary
    from kubetune_trainer.storage import JobStorage

    text = summary(JobStorage(cfg.storage_prefix, cfg.spec.output))
    print(text)
    assert "distillation: teacher" in text and "tokens/s teacher" in text
    assert f"agreement with the teacher {first['evalAgreement']:.3f} -> " in text
    # micro-batches 1, 3, 5 and 7 (counted from 0) were the student's own answers
    assert [rows[k].get("distillOnPolicyBatches") for k in range(1, 9)] == [0, 1] * 4
    for step in range(1, 9):
        assert rows[step]["distillKl"] >= 0 and rows[step]["distillCe"] > 0, step
        assert rows[step]["loss"] == pytest.approx(rows[step]["distillKl"], rel=1e-4)  # weight 1


def test_sequence_distillation_caches_the_teachers_answers(ray_local, tmp_path):
    from transformers import AutoModelForCausalLM

    student, teacher = _models(tmp_path)
    rows = H.chat_rows(12)
    train = H.write_jsonl(tmp_path / "chat.jsonl", rows)
    out = tmp_path / "out"
    spec = dict(
        dataset={"format": "chat", "maxSeqLength": 96, "validationSplit": 0.0},
        method={
            "type": "lora",
            "objective": "distill",
            "lora": {"r": 4, "alpha": 8},
            "distill": {"teacher": {"uri": str(teacher)}, "mode": "sequence", "maxNewTokens": 6},
        },
        hyperparameters={"maxSteps": 2, "learningRate": 1e-3, "batchSize": 4},
        checkpointing={"everySteps": 2},
    )
    cfg = H.trainer_config(H.job(student, train, out.as_uri(), **spec))
    t0 = time.monotonic()
    H.fit(cfg)
    print(f"distill sequence fit: {time.monotonic() - t0:.1f}s")
    folder = Path(H.local(cfg, "distill"))
    cached = list(folder.glob("answers-*.json"))
    assert len(cached) == 1
    answers = json.loads(cached[0].read_text())["answers"]
    assert len(answers) == 12 and all(1 <= len(a["answer"]) <= 6 for a in answers.values())

    # each answer is the teacher's greedy continuation of its example's prompt
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    for key in ("0", "5"):
        prompt, answer = answers[key]["prompt"], answers[key]["answer"]
        with torch.no_grad():
            gen = model.generate(
                torch.tensor([prompt]), max_new_tokens=6, do_sample=False, pad_token_id=0
            )
        assert answer == gen[0, len(prompt) :].tolist(), key

    # a resumed attempt, or a rerun on the prefix, sets the objective up again: with the
    # same fingerprint it reads the file instead of generating (an answer edited in the
    # file is what its example gets) and leaves the file as it was
    from kubetune_trainer import data as D
    from kubetune_trainer.objectives.base import TrainContext
    from kubetune_trainer.storage import JobStorage
    from kubetune_trainer.worker import Worker

    doc = json.loads(cached[0].read_text())
    doc["answers"]["0"]["answer"] = [42, 43]
    cached[0].write_text(json.dumps(doc))
    stamp = os.stat(cached[0]).st_mtime_ns
    worker = Worker(0, 1, use_gpu=False)
    worker.device = torch.device("cpu")
    objective = Dl.Distill(cfg.spec)
    objective.ctx = TrainContext(
        worker=worker,
        storage=JobStorage(cfg.storage_prefix, cfg.spec.output),
        log=print,
        progress=lambda *a: None,
        model_path=str(student),
        pad_id=0,
        packing=False,
        batch_size=4,
        max_batches=None,
        start_step=2,
    )
    prompts = [doc["answers"][str(k)]["prompt"] for k in range(12)]
    examples = [D.Example(p + [7], [D.IGNORE] * len(p) + [7]) for p in prompts]
    units = [[k] for k in range(12)]
    objective._answer({"train": (examples, units)}, cached[0].stem.removeprefix("answers-"))
    assert examples[0].input_ids == prompts[0] + [42, 43]
    assert examples[0].labels == [D.IGNORE] * len(prompts[0]) + [42, 43]
    assert examples[5].input_ids == prompts[5] + answers["5"]["answer"]
    assert os.stat(cached[0]).st_mtime_ns == stamp
    assert list(folder.glob("answers-*.json")) == cached


# ---------------------------------------------------------------------------- teacher.fromJob


def test_a_teacher_job_that_saved_an_adapter_only_is_refused_by_name(tmp_path):
    from types import SimpleNamespace

    from kubetune_api.trainer_config import JobRef, ParentSource
    from kubetune_trainer.parent import ParentError, locate_teacher

    prefix = tmp_path / "big"
    prefix.mkdir()
    access = SimpleNamespace(endpoint=None, region=None, secret_ref=None)
    config = SimpleNamespace(
        teacher=ParentSource(
            job=JobRef(name="big", namespace="default", uid="local"), uri=prefix.as_uri()
        ),  # fmt: skip
        spec=SimpleNamespace(model=access),
    )
    with pytest.raises(ParentError, match="FineTuneJob big has not finished"):
        locate_teacher(config)
    (prefix / "outputs.json").write_text(json.dumps({"adapter": "file:///x/adapter"}))
    with pytest.raises(ParentError, match="teacher.fromJob: FineTuneJob big saved an adapter"):
        locate_teacher(config)
    (prefix / "outputs.json").write_text(json.dumps({"model": "file:///x/model"}))
    assert locate_teacher(config) == "file:///x/model"


def test_a_teacher_job_in_the_same_file_runs_first_and_teaches(ray_local, tmp_path, capsys):
    """One file, the student first: `kubetune run` trains the teacher job (a full
    fine-tune) and then the student, whose teacher is the model that job saved."""
    import yaml
    from transformers import AutoModelForCausalLM

    from kubetune_trainer.local import LocalRun, run_local

    base = H.tiny_model(tmp_path / "tiny")  # the student's: 2 layers
    big = H.tiny_model(tmp_path / "tiny4", num_hidden_layers=4)  # the teacher job's
    data = H.write_jsonl(tmp_path / "chat.jsonl", H.chat_rows(24))
    common = {
        "hyperparameters": {"maxSteps": 2, "logEverySteps": 1},
        "evaluation": {"enabled": False},
        "checkpointing": {"everySteps": 100, "keepLast": 1},
    }
    runs = (tmp_path / "runs").as_uri()
    teacher = H.job(big, data, runs, name="teacher", method={"type": "full"}, **common)
    student = H.job(
        base,
        data,
        runs,
        name="student",
        method={
            "type": "lora",
            "objective": "distill",
            "distill": {"teacher": {"fromJob": "teacher"}, "weight": 1.0},
        },
        **common,
    )
    for doc in (teacher, student):
        del doc["metadata"]["uid"]  # a local run's uid, as a file without one gets
    (tmp_path / "jobs.yaml").write_text(yaml.safe_dump_all([student, teacher]))
    assert run_local(LocalRun(file=str(tmp_path / "jobs.yaml"), progress=False)) == 0
    out = capsys.readouterr().out
    assert "after teacher: spec.method.distill.teacher.fromJob names it" in out, out[-3000:]
    model = tmp_path / "runs/default/teacher/local/model"
    prefix = tmp_path / "runs/default/student/local"
    config = json.loads((prefix / "config.json").read_text())
    assert config["teacher"]["job"]["name"] == "teacher"
    rows = [json.loads(x) for x in (prefix / "metrics.jsonl").read_text().splitlines()]
    sizes = next(r for r in rows if r.get("teacherParameters"))
    # the teacher is the 4-layer model that job saved, not spec.model (2 layers)
    saved = AutoModelForCausalLM.from_pretrained(model)
    assert sizes["teacherParameters"] == sum(p.numel() for p in saved.parameters())
    assert sizes["studentParameters"] < sizes["teacherParameters"]
