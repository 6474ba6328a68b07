"""A file of several FineTuneJobs (kubetune_api.jobfile): the order `kubetune run`
runs them in, what --name picks, and the problems `kubetune run` and
`kubetune validate` both refuse, each naming its document. Which reference
model each method and parent get (objectives.reference.mode_for)."""

from __future__ import annotations

import io
import json
import types
from contextlib import redirect_stdout

import pytest
import yaml

from kubetune_api import jobfile
from kubetune_cli.main import main as cli
from kubetune_trainer.local import LocalRun, run_local
from kubetune_trainer.objectives import reference as R


def job(name, parent=None, namespace=None, kind="FineTuneJob") -> dict:
    meta = {"name": name} if name else {}
    if namespace:
        meta["namespace"] = namespace
    model = {"uri": "models/tiny", **({"fromJob": parent} if parent else {})}
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": kind,
        "metadata": meta,
        "spec": {
            "model": model,
            "dataset": {"train": {"uri": "data/chat.jsonl"}, "format": "chat"},
            "method": {"type": "lora"},
        },
    }


def names(plan) -> list[str]:
    assert plan.ok, plan.errors
    return [e.name for e in plan.order]


def test_parents_first_otherwise_file_order():
    docs = [job("dpo", "sft"), job("other"), job("kto", "dpo"), job("sft")]
    plan = jobfile.plan(docs)
    assert names(plan) == ["other", "sft", "dpo", "kto"]
    lines = plan.describe()
    assert lines[1] == "  2. sft (document 4)"
    assert lines[2] == "  3. dpo (document 1), after sft: spec.model.fromJob names it"
    # a parent outside the file is no edge (kubetune run looks for its finished run)
    assert names(jobfile.plan([job("b", "elsewhere"), job("a")])) == ["b", "a"]
    # other kinds are skipped; a namespace keeps apart jobs of the same name
    docs = [job("x", kind="ConfigMap"), job("b", "a", "team"), job("a", namespace="team"), job("a")]
    assert [(e.namespace, e.name) for e in jobfile.plan(docs).order] == [
        ("team", "a"),
        ("team", "b"),
        ("default", "a"),
    ]


def test_name_picks_the_job_and_its_in_file_parents():
    docs = [job("dpo", "sft"), job("other"), job("kto", "dpo"), job("sft")]
    assert names(jobfile.plan(docs, "kto")) == ["sft", "dpo", "kto"]
    assert names(jobfile.plan(docs, "sft")) == ["sft"]
    plan = jobfile.plan(docs, "nope", "chain.yaml")
    [(document, error)] = plan.errors
    assert document == 0 and error.path == "--name"
    assert "chain.yaml holds no FineTuneJob named 'nope'" in error.message
    assert "dpo, kto, other, sft" in error.message


def test_cycles_duplicates_and_nameless_jobs_are_refused_naming_the_document():
    plan = jobfile.plan([job("a", "c"), job("b", "a"), job("c", "b"), job("d")])
    assert not plan.ok and not plan.order
    assert [d for d, _ in plan.errors] == [1, 2, 3]
    assert "a (document 1) -> c (document 3) -> b (document 2) -> a (document 1)" in str(
        plan.errors[0][1]
    )
    [(document, error)] = jobfile.plan([job("a", "a")]).errors
    assert document == 1 and "a (document 1) -> a (document 1)" in error.message
    [(document, error)] = jobfile.plan([job("a"), job("b"), job("a", "b")]).errors
    assert document == 3 and error.path == "metadata.name"
    assert "documents 1 and 3 are both FineTuneJob default/a" in error.message
    [(document, error)] = jobfile.plan([job("a"), job(None)]).errors
    assert document == 2 and "document 2 has no name" in error.message
    [(document, error)] = jobfile.plan([job("a", kind="ConfigMap")], file="x.yaml").errors
    assert document == 0 and "x.yaml holds no FineTuneJob" in error.message


def test_a_failed_job_stops_what_continues_it():
    docs = [job("sft"), job("dpo", "sft"), job("kto", "dpo"), job("other")]
    order = jobfile.plan(docs).order
    assert [e.name for e in jobfile.dependents(order, order[0])] == ["dpo", "kto"]
    assert jobfile.dependents(order, order[3]) == []


def test_kubetune_run_and_validate_refuse_the_same_file(tmp_path, capsys):
    path = tmp_path / "chain.yaml"
    path.write_text(yaml.safe_dump_all([job("a", "b"), job("b", "a"), job("c"), job("c")]))
    err = io.StringIO()
    assert run_local(LocalRun(file=str(path)), io.StringIO(), err) == 2
    text = err.getvalue()
    assert f"{path} #1: spec.model.fromJob: the jobs continue each other in a loop" in text
    assert f"{path} #4: metadata.name: documents 3 and 4 are both" in text
    assert text.rstrip().endswith("nothing was trained")
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert cli(["validate", "-o", "json", str(path)]) == 1
    reports = json.loads(buf.getvalue())
    bad = {r["document"]: [e["path"] for e in r["errors"]] for r in reports if not r["valid"]}
    assert bad == {1: ["spec.model.fromJob"], 2: ["spec.model.fromJob"], 4: ["metadata.name"]}
    # --name of a job the file does not hold: nothing runs, the names it has are said
    path.write_text(yaml.safe_dump_all([job("sft"), job("dpo", "sft")]))
    err = io.StringIO()
    assert run_local(LocalRun(file=str(path), name="kto"), io.StringIO(), err) == 2
    assert "holds no FineTuneJob named 'kto' (it holds: dpo, sft)" in err.getvalue()


@pytest.mark.parametrize(
    "method,parent,use,mode",
    [
        ("lora", None, "stored", R.ADAPTER_OFF),
        ("qlora", ("adapter", False), "online", R.PARENT_ADAPTER),
        ("lora", ("adapter", True), "stored", R.ADAPTER_OFF),  # merged first
        ("lora", ("model", False), "online", R.ADAPTER_OFF),  # a full fine-tune's weights
        ("full", ("adapter", True), "online", R.COPY),
        ("full", None, "stored", R.STORED),
        ("lora", ("adapter", False), None, None),  # the objective has no reference
    ],
)
def test_reference_mode_follows_method_and_parent(method, parent, use, mode):
    p = types.SimpleNamespace(kind=parent[0], merge=parent[1], uri="u") if parent else None
    assert R.mode_for(method, p, use) == mode
    assert (R.describe(mode, p) != "") == (mode is not None)


def test_a_distillation_teacher_in_the_file_runs_first():
    student = job("student")
    student["spec"]["method"] = {
        "type": "full",
        "objective": "distill",
        "distill": {"teacher": {"fromJob": "teacher"}},
    }
    plan = jobfile.plan([student, job("teacher")])
    assert names(plan) == ["teacher", "student"]
    assert plan.describe()[1].endswith(
        "after teacher: spec.method.distill.teacher.fromJob names it"
    )
