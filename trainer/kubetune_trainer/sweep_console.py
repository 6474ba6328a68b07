"""`kubetune run` with a sweep: a table of the trials while they run, and the
ranking at the end, both read from sweep.json (what the operator reads too)."""

from __future__ import annotations

import threading
from typing import Optional

from kubetune_api import sweep as S


def _short(path: str) -> str:
    return path.rsplit(".", 1)[-1]


def _value(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) and not float(v).is_integer() else f"{v:g}"


def trial_line(r: dict, metric: str) -> str:
    params = " ".join(f"{_short(k)}={_value(v)}" for k, v in sorted(r["params"].items()))
    value = r.get("metric")
    shown = f"{value:.4f}" if value is not None else "--"
    total = r.get("totalSteps") or "?"
    step = f"step {r.get('step', 0):>5}/{total:<5}"
    return f"{r['id']:<12} {params:<34} {step} {metric} {shown:<8} {r['state']}"


def ranking(record: dict) -> list[str]:
    """Done trials best first, then the others."""
    metric, mode = record["metric"], record["mode"]
    records = record.get("records") or []
    scored = [r for r in records if r.get("bestMetric") is not None]
    scored.sort(key=lambda r: r["bestMetric"], reverse=mode == "max")
    rest = [r for r in records if r.get("bestMetric") is None]
    lines = [f"kubetune run: sweep ranking by best {metric} ({mode}):"]
    for i, r in enumerate(scored + rest, 1):
        best = f"{r['bestMetric']:.4f}" if r.get("bestMetric") is not None else "--"
        mark = "  <- output" if r["id"] == record.get("bestTrial") else ""
        params = " ".join(f"{_short(k)}={_value(v)}" for k, v in sorted(r["params"].items()))
        lines.append(
            f"  {i:>2}. {r['id']:<12} {params:<34} best {best:<8} {r['state']:<8} "
            f"{r.get('step', 0)} steps{mark}"
        )
    total = sum(r.get("step", 0) for r in records)
    full = sum(r.get("totalSteps") or 0 for r in records if r["state"] == "Finished")
    lines.append(f"  steps trained, all trials: {total}" + (f" (finished: {full})" if full else ""))
    return lines


class SweepWatcher:
    """Prints one table line whenever a trial's step, metric or state changes."""

    def __init__(self, storage, console, interval: float = 1.0):
        self.storage, self.console, self.interval = storage, console, interval
        self.seen: dict[str, tuple] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="kubetune-sweep", daemon=True)
        self.header = False

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=10)
        self.poll()

    def _loop(self):
        while not self.stop.wait(self.interval):
            self.poll()

    def poll(self) -> Optional[dict]:
        try:
            record = self.storage.read_json(S.SWEEP)
        except Exception:  # noqa: BLE001  (a torn read: next tick)
            return None
        if not record:
            return None
        for r in record.get("records") or []:
            key = (r.get("step"), r.get("metric"), r["state"])
            if self.seen.get(r["id"]) == key:
                continue
            self.seen[r["id"]] = key
            if not self.header:
                self.header = True
                self.console.say(
                    f"kubetune run: sweep of {record['trials']} trials, "
                    f"{record['parallelTrials']} at a time ({record['algorithm']}):"
                )
            self.console.say("  " + trial_line(r, record["metric"]))
        return record
