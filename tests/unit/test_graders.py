"""Graders (kubetune_trainer.graders) on their own: each type's scores, templates,
a multi grader's weights, and python graders that hang, raise, allocate without
bound or reach for the network: each scores 0, is counted, and the call returns
within its bounds while the other samples still score."""

from __future__ import annotations

import socket
import time

import pytest
from pydantic import TypeAdapter, ValidationError

from kubetune_api.graders import Grader, api_key_env, render, template_fields
from kubetune_trainer.graders import GraderError, Graders


def check(op: str, reference: str = "{{item.answer}}") -> dict:
    return {"type": "stringCheck", "name": "check", "reference": reference, "operation": op}


def score(spec: dict, outputs: list[str], items: list[dict], **kw):
    with Graders(spec, **kw) as graders:
        return graders.score([{"output_text": o} for o in outputs], items)


@pytest.mark.parametrize(
    "op,expected",
    [
        ("eq", [1.0, 0.0, 0.0, 0.0]),
        ("ne", [0.0, 1.0, 1.0, 1.0]),
        ("like", [1.0, 0.0, 1.0, 0.0]),
        ("ilike", [1.0, 0.0, 1.0, 1.0]),
    ],
)
def test_string_check_operations(op, expected):
    outputs = ["Paris", "Rome", "It is Paris.", "PARIS!"]
    assert score(check(op), outputs, [{"answer": "Paris"}] * 4).total == expected


def test_templates_read_the_sample_and_the_row():
    text = "{{item.q}} -> {{ sample.output_text }} (not {{item.missing}}) {json: 1}"
    assert template_fields(text) == {"q", "missing"}
    assert render(text, {"output_text": "4"}, {"q": 2}) == "2 -> 4 (not ) {json: 1}"
    spec = check("eq", reference="{{item.prefix}}-{{item.answer}}")
    assert score(spec, ["a-1"], [{"prefix": "a", "answer": 1}]).total == [1.0]
    with Graders(spec) as graders:
        assert graders.fields() == {"prefix", "answer"}


@pytest.mark.parametrize(
    "bad", ["{{sample.text}}", "{{item.a.b}}", "{{ item }}", "{{item.answer}", "{{{item.x}}"]
)
def test_other_placeholders_are_refused(bad):
    with pytest.raises(ValidationError, match="a template may only use"):
        TypeAdapter(Grader).validate_python(check("eq", reference=bad))


@pytest.mark.parametrize(
    "metric", ["fuzzyMatch", "bleu", "gleu", "rouge1", "rouge2", "rouge3", "rougeL"]
)
def test_text_similarity_ranks_closer_text_higher(metric):
    spec = {
        "type": "textSimilarity",
        "name": "sim",
        "reference": "{{item.answer}}",
        "evaluationMetric": metric,
    }
    answer = "the cat sat on the mat by the door"
    outputs = [answer, "the cat sat on the mat by a window", "dogs run fast in green parks"]
    got = score(spec, outputs, [{"answer": answer}] * 3).total
    assert got[0] == pytest.approx(1.0)
    assert got[0] > got[1] > got[2] >= 0.0, got


def test_multi_weights_sum_and_report_each_leaf():
    spec = {
        "type": "multi",
        "name": "all",
        "graders": {
            "exact": {**check("eq"), "name": "exact"},
            "has": {**check("like"), "name": "has"},
        },
        "weights": {"exact": 2.0},  # has: 1 (not listed)
    }
    got = score(spec, ["4", "x4", "5"], [{"answer": "4"}] * 3)
    assert got.per_grader == {"exact": [1.0, 0.0, 0.0], "has": [1.0, 1.0, 0.0]}
    assert got.total == [3.0, 1.0, 0.0]
    assert got.errors == {"exact": 0, "has": 0} and got.timeouts == {"exact": 0, "has": 0}


BAD = """
import socket, subprocess

def grade(sample, item):
    text = sample["output_text"]
    if text == "hang":
        while True:
            pass
    if text == "raise":
        raise ValueError("cannot grade this")
    if text == "hog":
        hoard = []
        while True:
            hoard.append(bytearray(16 * 1024 * 1024))
    if text == "net":
        socket.create_connection(("127.0.0.1", item["port"]), timeout=1).close()
        return 0.75  # reached the test's listening socket: the sandbox leaks
    if text == "spawn":
        subprocess.run(["true"])
    print("graded", text)  # prints must not disturb the protocol
    return 1.0 if text == item["answer"] else 0.25
"""


def python_grader(**extra) -> dict:
    return {
        "type": "python",
        "name": "fmt",
        "source": BAD,
        "timeoutSeconds": 1,
        "memoryMiB": 256,
        "maxConcurrency": 2,
        **extra,
    }


@pytest.mark.parametrize("netns", [True, False], ids=["network-namespace", "audit-hook"])
def test_python_graders_that_hang_raise_or_hog_are_counted_and_bounded(netns, monkeypatch):
    if not netns:
        monkeypatch.setenv("KUBETUNE_GRADER_NO_NETNS", "1")
    outputs = ["4", "hang", "raise", "hog", "net", "5", "4"]
    listener = socket.create_server(("127.0.0.1", 0))  # what "net" tries to reach
    items = [{"answer": "4", "port": listener.getsockname()[1]}] * 7
    # 3 s: room for the hog to reach its memory cap on a loaded machine (at 1 s
    # it once ran over in CI and counted as a timeout); the hang still runs over
    with listener, Graders(python_grader(timeoutSeconds=3)) as graders:
        start = time.monotonic()
        got = graders.score([{"output_text": o} for o in outputs], items)
        took = time.monotonic() - start
        assert graders.isolation() == {"fmt": "network-namespace" if netns else "audit-hook"}
        # the workers are reused, the killed one replaced: a second call scores too
        again = graders.score([{"output_text": "4"}] * 3, [{"answer": "4"}] * 3)
    assert got.per_grader["fmt"] == [1.0, 0.0, 0.0, 0.0, 0.0, 0.25, 1.0]
    assert got.timeouts == {"fmt": 1}
    assert got.errors == {"fmt": 3}  # raise, hog (MemoryError), net
    # 7 samples on 2 workers: the hang costs its 3 s timeout, the rest (a new
    # worker's start included) take well under that
    assert took < 3 + 4.0, took
    assert again.total == [1.0, 1.0, 1.0] and again.errors == {"fmt": 0}


def test_the_audit_hook_refuses_subprocesses(monkeypatch):
    monkeypatch.setenv("KUBETUNE_GRADER_NO_NETNS", "1")
    got = score(python_grader(), ["spawn", "4"], [{"answer": "4"}] * 2)
    assert got.per_grader["fmt"] == [0.0, 1.0] and got.errors == {"fmt": 1}
    assert "subprocess" in got.messages["fmt"]


def test_a_source_that_does_not_load_errors_every_sample_once():
    spec = python_grader(source="def grade(sample, item):\n    return (\n")
    got = score(spec, ["a", "b", "c"], [{}] * 3)
    assert got.errors == {"fmt": 3} and got.total == [0.0] * 3
    assert "SyntaxError" in got.messages["fmt"]


def test_a_python_grader_from_a_file_beside_the_data(tmp_path):
    (tmp_path / "graders").mkdir()
    (tmp_path / "graders" / "len.py").write_text(
        "def grade(sample, item):\n    return len(sample['output_text']) / 10\n"
    )
    spec = {"type": "python", "name": "len", "file": "graders/len.py"}
    assert score(spec, ["abcde"], [{}], base_dir=str(tmp_path)).total == [0.5]
    with pytest.raises(GraderError, match="cannot read file graders/nope.py"):
        Graders({**spec, "file": "graders/nope.py"}, base_dir=str(tmp_path))


def test_a_file_is_read_beside_the_training_data(tmp_path):
    from types import SimpleNamespace

    from kubetune_api.models import Dataset
    from kubetune_trainer.graders import data_files

    (tmp_path / "train.jsonl").write_text("{}\n")
    (tmp_path / "fmt.py").write_text("def grade(sample, item):\n    return 0.5\n")
    spec = {"type": "python", "name": "fmt", "file": "fmt.py"}
    for uri in (str(tmp_path / "train.jsonl"), tmp_path.as_uri() + "/train.jsonl", str(tmp_path)):
        job = SimpleNamespace(dataset=Dataset(train={"uri": uri}))
        assert score(spec, ["x"], [{}], **data_files(job, environ={})).total == [0.5], uri


def test_a_config_map_source_is_only_found_where_the_operator_mounts_it():
    spec = {"type": "python", "name": "fmt", "configMapRef": {"name": "graders", "key": "f.py"}}
    with pytest.raises(GraderError, match="for kubetune run use file:"):
        Graders(spec)


def test_a_score_model_grader_needs_its_key_in_the_environment():
    spec = {
        "type": "scoreModel",
        "name": "judge-1",
        "endpoint": "http://127.0.0.1:9/v1",
        "model": "m",
        "messages": [{"role": "user", "content": "{{sample.output_text}}"}],
        "apiKeySecretRef": {"name": "judge", "key": "api-key"},
    }
    assert api_key_env("judge-1") == "KUBETUNE_GRADER_JUDGE_1_API_KEY"
    with pytest.raises(GraderError, match="KUBETUNE_GRADER_JUDGE_1_API_KEY"):
        Graders(spec, environ={})
    # an endpoint that refuses connections: errors counted, never raised
    with Graders({**spec, "maxRetries": 0}, environ={api_key_env("judge-1"): "k"}) as graders:
        got = graders.score([{"output_text": "x"}] * 2, [{}] * 2)
    assert got.errors == {"judge-1": 2} and got.total == [0.0, 0.0]
