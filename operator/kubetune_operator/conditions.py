"""Conditions and phase, the Kubernetes way: lastTransitionTime moves only when
a condition's status flips; exactly one phase condition is True."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from enum import Enum
from typing import Optional

from .states import PHASE_CONDITION, TERMINAL, Cond, Phase, Reason


def _plain(value):
    """Status holds plain strings (YAML and JSON dumpers see no enum types)."""
    return value.value if isinstance(value, Enum) else value


def rfc3339(now: datetime) -> str:
    return now.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: Optional[str]) -> Optional[datetime]:
    if not text:
        return None
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)


def set_condition(
    conditions: list[dict],
    type_: Cond | str,
    status: str,
    reason: Reason | str,
    message: str,
    now: datetime,
    generation: Optional[int],
) -> list[dict]:
    """Kubernetes convention: lastTransitionTime moves only when status flips."""
    type_, reason = _plain(type_), _plain(reason)
    out = []
    found = False
    for c in conditions:
        if c.get("type") != type_:
            out.append(c)
            continue
        found = True
        same = c.get("status") == status
        new = {
            "type": type_,
            "status": status,
            "reason": reason,
            "message": message[:4096],
            "lastTransitionTime": c.get("lastTransitionTime") if same else rfc3339(now),
            "observedGeneration": generation,
        }
        out.append({k: v for k, v in new.items() if v is not None})
    if not found:
        new = {
            "type": type_,
            "status": status,
            "reason": reason,
            "message": message[:4096],
            "lastTransitionTime": rfc3339(now),
            "observedGeneration": generation,
        }
        out.append({k: v for k, v in new.items() if v is not None})
    return out


def get_condition(status: dict, type_: Cond | str) -> Optional[dict]:
    type_ = _plain(type_)
    for c in status.get("conditions") or []:
        if c.get("type") == type_:
            return c
    return None


def with_phase(
    status: dict,
    phase: Phase | str,
    reason: Reason | str,
    message: str,
    now: datetime,
    generation: Optional[int],
) -> dict:
    """Set phase, reason, message and the matching phase conditions."""
    phase, reason = Phase(_plain(phase)), _plain(reason)
    out = dict(status)
    out["phase"] = phase.value
    out["reason"] = reason
    out["message"] = message[:4096]
    conds = list(out.get("conditions") or [])
    for ph, ctype in PHASE_CONDITION.items():
        if ph is phase:
            conds = set_condition(conds, ctype, "True", reason, message, now, generation)
        elif get_condition({"conditions": conds}, ctype) is not None:
            conds = set_condition(
                conds, ctype, "False", reason, f"the job is {phase.value} now", now, generation
            )
    out["conditions"] = conds
    if phase in TERMINAL and not out.get("completionTime"):
        out["completionTime"] = rfc3339(now)
    return out


def status_changed(old: dict, new: dict) -> bool:
    """Ignore what moves on its own (nothing here does): plain deep comparison."""
    return json.dumps(old, sort_keys=True) != json.dumps(new, sort_keys=True)
