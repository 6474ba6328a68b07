"""scripts/lanes.py: how CI splits the suite into two pytest runs; every tier runs,
and a file moved to another lane runs there and only there."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("lanes", ROOT / "scripts" / "lanes.py")
lanes = importlib.util.module_from_spec(_spec)
sys.modules["lanes"] = lanes  # its dataclass looks itself up there
_spec.loader.exec_module(lanes)

ALL = "tests/unit,tests/envtest,tests/e2e,tests/trainer;tests/cluster"


def test_the_default_split_names_every_tier():
    split = lanes.lanes_from(lanes.DEFAULT_LANES)
    tiers = {p.name for p in (ROOT / "tests").iterdir() if any(p.glob("test_*.py"))}
    assert {Path(t).name for lane in split for t in lane if not t.endswith(".py")} == tiers


def test_a_split_that_leaves_out_a_tier_is_refused():
    with pytest.raises(SystemExit, match="leaves out tests/e2e"):
        lanes.lanes_from("tests/unit,tests/envtest,tests/trainer;tests/cluster")


def test_a_file_moved_to_another_lane_runs_only_there():
    split = lanes.lanes_from(ALL + ",tests/trainer/test_dpo.py")
    assert lanes.pytest_args(split, 0) == [
        "--ignore=tests/trainer/test_dpo.py",
        "tests/unit",
        "tests/envtest",
        "tests/e2e",
        "tests/trainer",
    ]
    assert lanes.pytest_args(split, 1) == ["tests/cluster", "tests/trainer/test_dpo.py"]


@pytest.mark.parametrize(
    "text, why",
    [
        (ALL + ",tests/trainer/test_nothing.py", "does not exist"),
        (ALL.replace("tests/trainer;", "tests/trainer,tests/trainer/test_dpo.py;"), "same lane"),
    ],
)
def test_a_file_that_cannot_be_split_out_is_refused(text, why):
    with pytest.raises(SystemExit, match=why):
        lanes.lanes_from(text)
