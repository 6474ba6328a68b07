"""kubetune_openai's pure parts: request -> FineTuneJob, FineTuneJob -> OpenAI's job,
event and checkpoint objects, statuses, ids, pages, the catalog and upload checks."""

from __future__ import annotations

import io
import json
import re

import pytest

from kubetune_api.validation import validate_document
from kubetune_openai import datafile
from kubetune_openai import mapping as M

FILE = "file-" + "a" * 24
PREF = "file-" + "b" * 24
SETTINGS = M.Settings(
    "s3://bucket/files", "s3://bucket/runs", "http://s3:9000", "us-east-1", "creds"
)
FILES = {
    FILE: {"format": "chat", "uri": "s3://bucket/files/ns/f/upload.jsonl"},
    PREF: {"format": "preference", "uri": "s3://bucket/files/ns/p/train.jsonl"},
}
BASE = {"name": "HuggingFaceTB/SmolLM2-135M-Instruct"}
CHAT_ROW = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}


def _job(body: dict, defaults=None, name="ftjob-" + "0" * 24) -> dict:
    req = M.parse_create({"model": "smollm2", "training_file": FILE} | body)
    job = M.build_job(
        req,
        name=name,
        namespace="team-a",
        settings=SETTINGS,
        files=FILES,
        base_id="smollm2",
        model=dict(BASE),
        defaults=defaults,
    )
    job["metadata"] |= {"uid": "u-1", "creationTimestamp": "2026-01-01T00:00:00Z"}
    return job


def test_a_supervised_request_becomes_a_valid_finetunejob():
    job = _job(
        {
            "suffix": "support",
            "seed": 7,
            "metadata": {"team": "search"},
            "method": {
                "type": "supervised",
                "supervised": {
                    "hyperparameters": {
                        "n_epochs": 3,
                        "batch_size": 8,
                        "learning_rate_multiplier": 0.5,
                    }
                },
            },
        },
        defaults={"resources": {"workers": 2}, "hyperparameters": {"maxSteps": 100}},
    )
    result = validate_document(job)
    assert result.ok, [str(e) for e in result.errors]
    spec = job["spec"]
    assert spec["model"] == BASE and spec["resources"] == {"workers": 2}
    assert spec["dataset"] == {
        "train": {"uri": "s3://bucket/files/ns/f/upload.jsonl"},
        "format": "chat",
        "endpoint": "http://s3:9000",
        "region": "us-east-1",
        "secretRef": {"name": "creds"},
        "validationSplit": 0.0,
    }
    assert spec["evaluation"] == {"enabled": False}  # OpenAI trains on the whole file
    # n_epochs replaces the catalog's maxSteps; the multiplier scales kubetune's LoRA default
    assert spec["hyperparameters"] == {
        "epochs": 3,
        "batchSize": 8,
        "seed": 7,
        "learningRate": pytest.approx(1e-4),
    }
    assert spec["output"]["uri"] == "s3://bucket/runs"
    assert job["metadata"]["labels"] == {M.LABEL_API: "v1"}
    obj = M.job_object(job)
    assert obj["hyperparameters"] == {
        "n_epochs": 3,
        "batch_size": 8,
        "learning_rate_multiplier": 0.5,
    }
    assert obj["method"] == {
        "type": "supervised",
        "supervised": {"hyperparameters": obj["hyperparameters"]},
    }
    assert (obj["status"], obj["model"], obj["seed"]) == ("validating_files", "smollm2", 7)
    assert obj["metadata"] == {"team": "search"} and obj["user_provided_suffix"] == "support"
    assert obj["created_at"] == 1767225600 and obj["organization_id"] == "team-a"


def test_auto_hyperparameters_leave_kubetune_defaults_and_say_what_they_are():
    job = _job({"hyperparameters": {"n_epochs": "auto", "batch_size": "auto"}})
    assert job["spec"]["hyperparameters"] == {}
    hyper = M.job_object(job)["hyperparameters"]
    assert hyper == {"n_epochs": 1, "batch_size": 4, "learning_rate_multiplier": 1.0}


def test_dpo_needs_a_preference_file_and_maps_beta():
    req = {
        "training_file": PREF,
        "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2}}},
    }
    job = _job(req)
    assert job["spec"]["method"] == {"objective": "dpo", "dpo": {"beta": 0.2}}
    assert job["spec"]["dataset"]["format"] == "preference"
    assert validate_document(job).ok
    obj = M.job_object(job)
    assert obj["method"]["type"] == "dpo" and obj["method"]["dpo"]["hyperparameters"]["beta"] == 0.2
    with pytest.raises(M.ApiError, match="holds chat rows; method dpo trains on preference") as exc:
        _job({"method": {"type": "dpo"}})
    assert exc.value.param == "training_file"
    with pytest.raises(M.ApiError, match="holds preference rows"):
        _job({"training_file": PREF})


@pytest.mark.parametrize(
    "objective, method, rate",
    [
        ("grpo", "reinforcement", 2e-5),
        ("kto", "supervised", 1e-5),
        ("dpo", "dpo", 1e-5),
        ("distill", "supervised", 1e-4),
    ],
)
def test_jobs_made_with_kubectl_list_under_their_objectives_method(objective, method, rate):
    """A GRPO job lists as OpenAI's reinforcement, KTO (no OpenAI counterpart) as
    supervised with kubetune.objective saying which; the learning-rate multiplier
    is against the job's own objective's default."""
    from kubetune_api import objectives

    job = _job({})
    spec = job["spec"]
    spec["dataset"]["format"] = {
        "grpo": "prompt",
        "kto": "feedback",
        "dpo": "preference",
        "distill": "chat",
    }[objective]
    spec["method"] = {"objective": objective}
    if objective == "grpo":
        spec["method"]["grpo"] = {
            "grader": {
                "type": "stringCheck",
                "name": "exact",
                "reference": "{{item.a}}",
                "operation": "eq",
            }
        }
    spec["hyperparameters"]["learningRate"] = rate
    assert validate_document(job).ok, validate_document(job)
    job["metadata"]["annotations"] = {}  # no OpenAI request recorded: made with kubectl
    obj = M.job_object(job)
    assert obj["method"]["type"] == method, obj["method"]
    assert obj["kubetune"]["objective"] == objective
    default = objectives.BY_NAME[objective].learning_rate["lora"]
    multiplier = obj["method"][method]["hyperparameters"]["learning_rate_multiplier"]
    assert multiplier == pytest.approx(rate / default)


@pytest.mark.parametrize(
    "body, param, text",
    [
        ({"method": {"type": "reinforcement"}}, "method.type", "not supported"),
        ({"integrations": [{"type": "wandb"}]}, "integrations", "spec.tracking"),
        ({"suffix": "a:b"}, "suffix", "':'"),
        ({"seed": -1}, "seed", "seed"),
        ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs", "at least 1"),
        ({"hyperparameters": {"n_epochs": 1.5}}, "hyperparameters.n_epochs", "an integer"),
        ({"hyperparameters": {"beta": 1}}, "hyperparameters.beta", "not a hyperparameter"),
        ({"training_file": "train.jsonl"}, "training_file", "Invalid file id"),
        ({"metadata": {"k": 1}}, "metadata", "values"),
        ({"extra": 1}, "extra", "Unrecognized"),
        (
            {"method": {"type": "supervised", "dpo": {}}},
            "method",
            "method.dpo is set but method.type is supervised",
        ),
    ],
)
def test_bad_requests_name_the_field(body, param, text):
    with pytest.raises(M.ApiError) as exc:
        M.parse_create({"model": "smollm2", "training_file": FILE} | body)
    assert exc.value.status == 400 and exc.value.param == param and text in exc.value.message
    assert exc.value.body()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "phase, status",
    [
        (None, "validating_files"),
        ("Pending", "validating_files"),
        ("Queued", "queued"),
        ("Starting", "queued"),
        ("Running", "running"),
        ("Suspended", "paused"),
        ("Succeeded", "succeeded"),
        ("Failed", "failed"),
    ],
)
def test_status_follows_the_phase(phase, status):
    job = _job({})
    job["status"] = {"phase": phase}
    assert M.openai_status(job) == status
    job["metadata"]["annotations"][M.ANN_CANCELLED] = "2026-01-01T00:05:00Z"
    assert M.openai_status(job) == ("succeeded" if phase == "Succeeded" else "cancelled")


def test_a_succeeded_job_names_its_model_and_a_failed_one_its_error():
    job = _job({"suffix": "support"})
    job["status"] = {"phase": "Succeeded", "completionTime": "2026-01-01T01:00:00Z"}
    obj = M.job_object(job, trained_tokens=640)
    assert obj["fine_tuned_model"] == f"ft:smollm2:team-a:support:{job['metadata']['name']}"
    assert obj["finished_at"] == 1767229200 and obj["trained_tokens"] == 640
    ft = M.parse_ft_name(obj["fine_tuned_model"])
    assert (ft.base, ft.namespace, ft.suffix, ft.job_id) == (
        "smollm2",
        "team-a",
        "support",
        job["metadata"]["name"],
    )
    assert M.parse_ft_name(obj["fine_tuned_model"] + ":ckpt-step-20").checkpoint_step == 20
    job["status"] = {"phase": "Failed", "reason": "BackoffLimitExceeded", "message": "exit 1"}
    obj = M.job_object(job)
    assert obj["fine_tuned_model"] is None and obj["trained_tokens"] is None
    assert obj["error"] == {"code": "BackoffLimitExceeded", "message": "exit 1", "param": None}
    with pytest.raises(M.ApiError, match="not a fine-tuned model name"):
        M.parse_ft_name("ft:smollm2:team-a")


def test_a_job_continuing_a_parent_takes_its_base_and_names_it_in_from_job():
    parent = _job({})
    parent["spec"]["model"] |= {"fromJob": "older", "mergeParent": True}
    assert M.parent_model(parent) == BASE | {"fromJob": parent["metadata"]["name"]}


def test_job_ids_are_names_and_other_text_is_not_found():
    assert M.job_name("ftjob-abc123") == "ftjob-abc123"
    assert M.new_job_name().startswith("ftjob-") and len(M.new_job_name()) == 30
    for bad in ("abc", "ftjob-", "ftjob-A", "ftjob-../x", "ftjob-" + "a" * 60):
        with pytest.raises(M.ApiError) as exc:
            M.job_name(bad)
        assert exc.value.status == 404


def test_events_are_newest_first_with_metrics_and_page_by_id():
    job = _job({"suffix": "s"})
    job["status"] = {
        "phase": "Succeeded",
        "startTime": "2026-01-01T00:00:01Z",
        "completionTime": "2026-01-01T00:01:00Z",
        "progress": {"totalSteps": 20},
    }
    kube_events = [
        {
            "reason": "RayJobCreated",
            "message": "created RayJob",
            "type": "Normal",
            "lastTimestamp": "2026-01-01T00:00:02Z",
            "metadata": {"uid": "e1"},
        },
        {
            "reason": "Retrying",
            "message": "attempt 2",
            "type": "Warning",
            "lastTimestamp": "2026-01-01T00:00:30Z",
            "metadata": {"uid": "e2"},
        },
    ]
    rows = [
        {"step": 10, "loss": 2.0, "time": "2026-01-01T00:00:20Z"},
        {"step": 20, "loss": 1.5, "evalLoss": 1.7, "time": "2026-01-01T00:00:40Z"},
        {"step": 21},  # nothing to report
    ]
    events = M.job_events(job, kube_events, rows)
    assert [e["message"] for e in events] == [
        "The job has successfully completed",
        f"New fine-tuned model created: {M.job_fine_tuned_model(job)}",
        "Step 20/20: training loss=1.5000, validation loss=1.7000",
        "Retrying: attempt 2",
        "Step 10/20: training loss=2.0000",
        "RayJobCreated: created RayJob",
        f"Created fine-tuning job: {job['metadata']['name']}",
    ]
    assert events[3]["level"] == "warn" and events[2]["type"] == "metrics"
    assert events[2]["data"] == {
        "step": 20,
        "total_steps": 20,
        "train_loss": 1.5,
        "valid_loss": 1.7,
    }
    assert len({e["id"] for e in events}) == len(events)
    assert M.job_events(job, kube_events, rows) == events  # ids are stable across reads
    first = M.page(events, None, 3)
    second = M.page(events, first["data"][-1]["id"], 3)
    third = M.page(events, second["data"][-1]["id"], 3)
    assert first["has_more"] and second["has_more"] and not third["has_more"]
    assert first["data"] + second["data"] + third["data"] == events
    assert M.page(events, "ftevent-gone", 3) == {"object": "list", "data": [], "has_more": False}


def test_checkpoints_come_from_status_with_their_step_metrics():
    job = _job({"suffix": "s"})
    job["status"] = {
        "checkpoints": [
            {
                "step": 10,
                "uri": "s3://bucket/runs/c10",
                "evalLoss": 2.2,
                "time": "2026-01-01T00:00:10Z",
            },
            {"step": 20, "uri": "s3://bucket/runs/c20"},
        ]
    }
    ckpts = M.job_checkpoints(job, [{"step": 10, "loss": 2.0}, {"step": 20, "loss": 1.5}])
    assert [c["step_number"] for c in ckpts] == [20, 10]
    assert ckpts[1]["metrics"] == {
        "step": 10,
        "train_loss": 2.0,
        "valid_loss": 2.2,
        "full_valid_loss": 2.2,
    }
    assert ckpts[1]["created_at"] == 1767225610
    assert ckpts[0]["fine_tuned_model_checkpoint"].endswith(":ckpt-step-20")
    assert M.checkpoint_uri(job, 20) == "s3://bucket/runs/c20" and M.checkpoint_uri(job, 30) is None


def test_the_server_reads_metrics_only_under_its_own_output_uri():
    job = _job({})
    assert M.job_prefix(SETTINGS, job) == f"s3://bucket/runs/team-a/{job['metadata']['name']}/u-1"
    job["spec"]["output"]["uri"] = "s3://someone-else/runs"
    assert M.job_prefix(SETTINGS, job) is None


def test_catalog_entries_are_checked():
    good = {"models": [{"id": "smollm2", "model": BASE, "spec": {"resources": {"workers": 1}}}]}
    assert M.parse_catalog(good, "cm")["smollm2"].model == BASE
    for doc, text in [
        ({}, "must hold `models:`"),
        ({"models": [{"id": "a:b", "model": BASE}]}, "no ':'"),
        ({"models": [{"id": "a", "model": {}}]}, "name or uri"),
        ({"models": [{"id": "a", "model": BASE, "spec": {"model": {}}}]}, "but model"),
        ({"models": [{"id": "a", "model": BASE}, {"id": "a", "model": BASE}]}, "twice"),
    ]:
        with pytest.raises(ValueError, match=text):
            M.parse_catalog(doc, "cm")


def _lines(*rows) -> io.BytesIO:
    return io.BytesIO(
        b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)
    )


def test_uploads_are_checked_line_by_line():
    assert datafile.check(_lines(CHAT_ROW, b"", CHAT_ROW), "t.jsonl") == datafile.Checked("chat", 2)
    pc = {"prompt": "2+2=", "completion": "4"}
    assert datafile.check(_lines(pc), "t.jsonl").format == "prompt-completion"
    cases = [
        ((CHAT_ROW, b'{"messages": [}'), "t.jsonl: line 2: invalid JSON, column 15"),
        (({"messages": [{"role": "user", "content": "x"}]},), "line 1: no assistant turn"),
        (({"messages": [{"role": "tool", "content": "x"}]},), "line 1: unknown role 'tool'"),
        (([1, 2],), "line 1: not a JSON object"),
        (({"text": "plain"},), "line 1: fits none of the formats (keys found: text)"),
        ((CHAT_ROW, pc), "line 2: a prompt-completion row in a file of chat rows"),
        ((b"\xff\xfe",), "line 1: not UTF-8 text"),
    ]
    for rows, text in cases:
        with pytest.raises(M.ApiError) as exc:
            datafile.check(_lines(*rows), "t.jsonl")
        assert text in exc.value.message, exc.value.message
        assert exc.value.status == 400 and exc.value.code == "invalid_file_format"
    with pytest.raises(M.ApiError, match="and 2 more"):
        datafile.check(_lines(*[b"{"] * 5), "t.jsonl")
    with pytest.raises(M.ApiError, match="holds no rows"):
        datafile.check(_lines(b""), "t.jsonl")


def test_openai_preference_rows_become_the_trainers_preference_rows():
    from kubetune_trainer import data as D

    row = {
        "input": {"messages": [{"role": "user", "content": "capital of France?"}]},
        "preferred_output": [{"role": "assistant", "content": "Paris"}],
        "non_preferred_output": [{"role": "assistant", "content": "Lyon"}],
    }
    checked = datafile.check(_lines(row, row), "pref.jsonl")
    assert checked.format == "preference" and checked.rows == 2
    converted = [json.loads(line) for line in checked.converted.decode().splitlines()]
    assert converted[0] == {
        "prompt": [{"role": "user", "content": "capital of France?"}],
        "chosen": [{"role": "assistant", "content": "Paris"}],
        "rejected": [{"role": "assistant", "content": "Lyon"}],
    }
    norm, why = D.normalize(converted[0], "preference")
    assert why is None and norm["chosen"] == [{"role": "assistant", "content": "Paris"}]
    same = row | {"non_preferred_output": row["preferred_output"]}
    with pytest.raises(M.ApiError, match="line 1: 'chosen' and 'rejected' are the same"):
        datafile.check(_lines(same), "pref.jsonl")


def test_the_docs_table_covers_every_method_and_create_field_of_the_pinned_client():
    import inspect
    from pathlib import Path

    from openai.resources import files
    from openai.resources.fine_tuning import checkpoints, jobs
    from openai.resources.fine_tuning.alpha import graders
    from openai.types.fine_tuning import FineTuningJob, job_create_params

    doc = (Path(__file__).resolve().parents[2] / "docs/openai-compatible.md").read_text()
    resources = {
        "files": files.Files,
        "fine_tuning.jobs": jobs.Jobs,
        "fine_tuning.jobs.checkpoints": jobs.Checkpoints,
        "fine_tuning.checkpoints.permissions": checkpoints.Permissions,
        "fine_tuning.alpha.graders": graders.Graders,
    }
    rows = [line for line in doc.splitlines() if line.startswith("| `")]
    for prefix, cls in resources.items():
        for name, _ in inspect.getmembers(cls, inspect.isfunction):
            if name.startswith("_") or name.startswith("with_"):
                continue
            assert any(
                re.search(rf"`{re.escape(prefix)}\.([a-z_/]*\b{name}\b[a-z_/]*)[(`]", row)
                for row in rows
            ), f"{prefix}.{name} is not in docs/openai-compatible.md's table"
    for field in job_create_params.JobCreateParams.__annotations__:
        assert any(row.startswith(f"| `{field}") for row in rows), field
    for field in ("n_epochs", "batch_size", "learning_rate_multiplier", "beta", "reinforcement"):
        assert field in doc, field
    for field in FineTuningJob.model_fields:
        assert f"`{field}`" in doc, f"job field {field} is not in docs/openai-compatible.md"


def test_kubetune_api_says_which_settings_are_missing(monkeypatch, capsys):
    from kubetune_cli.main import main

    for name in ("KUBETUNE_API_FILES_URI", "KUBETUNE_API_OUTPUT_URI"):
        monkeypatch.delenv(name, raising=False)
    assert main(["api", "--files-uri", "s3://bucket/files"]) == 2
    assert "set --output-uri" in capsys.readouterr().err


def test_expires_after_is_checked_and_honoured():
    import time

    from kubetune_openai import server

    assert server._expires_at({}) is None
    at = server._expires_at({"anchor": "created_at", "seconds": "3600"})
    assert abs(at - (time.time() + 3600)) < 5
    for bad in ({"anchor": "now", "seconds": "3600"}, {"anchor": "created_at", "seconds": "60"}):
        with pytest.raises(M.ApiError, match="expires_after"):
            server._expires_at(bad)
    assert server._expired({"expires_at": int(time.time()) - 1})
    assert not server._expired({"expires_at": None}) and not server._expired({"expires_at": at})
