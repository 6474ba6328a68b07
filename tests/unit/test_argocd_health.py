"""The Argo CD health check, run by a real Lua interpreter (lupa embeds Lua)."""

from pathlib import Path

import lupa
import pytest

SCRIPT = (Path(__file__).resolve().parents[2] / "docs/argocd/finetunejob-health.lua").read_text()


def health(obj: dict) -> dict:
    lua = lupa.LuaRuntime(unpack_returned_tuples=True)
    run = lua.eval(f"function(obj)\n{SCRIPT}\nend")
    result = run(lua.table_from(obj, recursive=True))
    return dict(result)


def job(status=None, generation=1):
    obj = {"metadata": {"name": "j", "generation": generation}, "spec": {}}
    if status is not None:
        obj["status"] = status
    return obj


@pytest.mark.parametrize(
    "phase, expected",
    [
        ("Pending", "Progressing"),
        ("Starting", "Progressing"),
        ("Running", "Progressing"),
        ("Queued", "Suspended"),
        ("Suspended", "Suspended"),
        ("Succeeded", "Healthy"),
        ("Failed", "Degraded"),
    ],
)
def test_phase_maps_to_health(phase, expected):
    assert health(job({"phase": phase, "observedGeneration": 1}))["status"] == expected


def test_no_status_yet_is_progressing():
    assert health(job()) == {
        "status": "Progressing",
        "message": "Waiting for the kubetune operator",
    }


def test_stale_generation_is_progressing_even_if_succeeded():
    result = health(job({"phase": "Succeeded", "observedGeneration": 1}, generation=2))
    assert result["status"] == "Progressing"


def test_message_carries_progress_loss_and_failure_reason():
    running = health(
        job(
            {
                "phase": "Running",
                "observedGeneration": 1,
                "progress": {"display": "120/600 (20%)"},
                "metrics": {"displayLoss": "1.234"},
            }
        )
    )
    assert running["message"] == "Running 120/600 (20%), loss 1.234"
    failed = health(
        job(
            {
                "phase": "Failed",
                "observedGeneration": 1,
                "reason": "BackoffLimitExceeded",
                "message": "3 attempts failed",
            }
        )
    )
    assert failed == {"status": "Degraded", "message": "BackoffLimitExceeded: 3 attempts failed"}
