"""Runs the whole suite as two pytest processes side by side ("lanes") and
reports them as one run: what scripts/test.sh does when given no arguments.

The machine has two cores and the tiers use them unevenly: the cluster tier
and the envtest tier spend most of their time waiting (pod starts, polls,
grace periods, API round trips), the trainer tier computes. Each lane is an
ordinary pytest run of some tiers (its own servers, its own tmp folder); one
lane streams to the terminal, the other to a log printed when it ends; then
the slowest 30 tests of both, from each lane's JUnit XML, and one exit status
(non-zero when either lane failed or found no tests).

    python scripts/lanes.py [LOG_DIR] -- [extra pytest arguments]

LANES (environment) overrides the split: tiers joined by `,`, lanes by `;`,
e.g. `LANES="tests/cluster,tests/trainer;tests/unit,tests/envtest,tests/e2e"`.
A lane may also name one test file of a tier another lane runs: that lane then
leaves the file out (`--ignore`), so every test runs once. The first lane is
the one that streams.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
# The measured split (docs/testing.md, "Where the minutes go"): the trainer
# tier (~33 min of computing) beside the tiers that mostly wait on servers:
# envtest (~9 min) and e2e (~2), two trainer modules (~4 min) that even the
# lanes out, then the cluster tier (~17 min, pods) last: scripts/test.sh starts
# the lanes while the cluster tier's images still build.
DEFAULT_LANES = (
    "tests/unit,tests/trainer;tests/envtest,tests/e2e,"
    "tests/trainer/test_save_on_stop.py,tests/trainer/test_lineage.py,"
    "tests/trainer/test_start_reference.py,tests/trainer/test_kto.py,"
    "tests/trainer/test_gguf_llama_cpp.py,tests/trainer/test_distill.py,"
    "tests/trainer/test_freeze.py,tests/cluster"
)


def lanes_from(text: str) -> list[list[str]]:
    lanes = [[t.strip() for t in lane.split(",") if t.strip()] for lane in text.split(";")]
    lanes = [lane for lane in lanes if lane]
    tiers = sorted(p.name for p in (ROOT / "tests").iterdir() if p.is_dir() and p.name[0] != "_"
                   and any(p.glob("test_*.py")))  # fmt: skip
    named = [Path(t).name for lane in lanes for t in lane if not t.endswith(".py")]
    missing = [t for t in tiers if t not in named]
    if missing:
        # A tier left out of the split would silently never run in CI.
        sys.exit(f"lanes: LANES leaves out tests/{', tests/'.join(missing)}: {text!r}")
    for lane in lanes:
        for item in lane:
            if not (ROOT / item).exists():
                sys.exit(f"lanes: LANES names {item}, which does not exist: {text!r}")
            if item.endswith(".py") and str(Path(item).parent) in lane:
                sys.exit(f"lanes: {item} is in the same lane as its tier: {text!r}")
    return lanes


def pytest_args(lanes: list[list[str]], n: int) -> list[str]:
    """Lane n's paths, with `--ignore` for the files another lane runs."""
    mine = lanes[n]
    elsewhere = [f for i, lane in enumerate(lanes) if i != n for f in lane if f.endswith(".py")]
    ignore = [f"--ignore={f}" for f in elsewhere if str(Path(f).parent) in mine]
    return [*ignore, *mine]


def slowest(xmls: list[Path], n: int = 30) -> list[tuple[float, str]]:
    """The n longest tests (setup + call + teardown, JUnit's `time`) of all lanes."""
    rows = []
    for xml in xmls:
        if xml.exists():
            for case in ET.parse(xml).iter("testcase"):
                test = f"{case.get('classname', '')}::{case.get('name', '')}"
                rows.append((float(case.get("time", 0)), test))
    return sorted(rows, reverse=True)[:n]


@dataclass
class Lane:
    name: str
    tiers: list[str]
    xml: Path
    log: Optional[Path]  # None: streams to the terminal
    proc: Optional[subprocess.Popen] = None
    start: float = 0.0


def main(argv: list[str]) -> int:
    head, extra = (
        (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    )
    log_dir = Path(head[0] if head else os.environ.get("KUBETUNE_CACHE", "/tmp")) / "lanes"
    log_dir.mkdir(parents=True, exist_ok=True)
    py = ROOT / ".venv" / "bin" / "python"
    python = str(py) if py.exists() else sys.executable
    split = lanes_from(os.environ.get("LANES", DEFAULT_LANES))
    lanes = [
        Lane(
            f"lane{n}",
            tiers,
            log_dir / f"lane{n}.xml",
            None if n == 1 else log_dir / f"lane{n}.log",
        )
        for n, tiers in enumerate(split, start=1)
    ]
    t0 = time.monotonic()
    for lane in lanes:
        lane.xml.unlink(missing_ok=True)
        basetemp = Path(tempfile.gettempdir()) / f"kubetune-{lane.name}"
        cmd = [python, "-m", "pytest", "--durations=30", f"--junitxml={lane.xml}",
               f"--basetemp={basetemp}", *extra,
               *pytest_args(split, lanes.index(lane))]  # fmt: skip
        where = "" if lane.log is None else f" (log: {lane.log})"
        print(f"lanes: {lane.name}: {' '.join(lane.tiers)}{where}", flush=True)
        out = None if lane.log is None else lane.log.open("w")
        lane.start = time.monotonic()
        lane.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        if out is not None:
            out.close()  # the child has its own copy
    ended: dict[str, float] = {}
    while len(ended) < len(lanes):  # each lane's own time, not its place in line
        for lane in lanes:
            if lane.name not in ended and lane.proc.poll() is not None:
                ended[lane.name] = time.monotonic()
        time.sleep(0.5)
    results = []
    for lane in lanes:
        rc = lane.proc.wait()
        took = ended[lane.name] - lane.start
        if lane.log is not None:
            print(f"\n===== {lane.name} ({' '.join(lane.tiers)}): its output =====", flush=True)
            sys.stdout.write(lane.log.read_text(errors="replace"))
        results.append((lane, rc, took))
    print("\n===== slowest 30 tests of all lanes (setup + call + teardown) =====")
    for secs, test in slowest([lane.xml for lane in lanes]):
        print(f"{secs:8.1f}s {test}")
    print("\n===== lanes =====")
    worst = 0
    for lane, rc, took in results:
        state = "passed" if rc == 0 else f"FAILED (pytest exit {rc})"
        print(f"{lane.name}: {' '.join(lane.tiers)}: {state} in {took / 60:.1f} min")
        worst = worst or rc
    print(f"all lanes: {(time.monotonic() - t0) / 60:.1f} min wall", flush=True)
    return worst


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
