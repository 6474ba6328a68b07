"""Clean, leak-free data: duplicates, leakage between splits, PII (spec.dataset.clean).

`scan` takes the normalised rows of each split (None for a row that is not
usable) and returns a report, a plain dict saved as clean.json under the job's
prefix and summed up by `kubetune validate`, `kubetune run` and the trainer:

- exact duplicates: rows whose text, normalised (NFKC, case folded, white space
  collapsed, roles kept), hashes the same as an earlier row of the same split;
- near duplicates: rows whose word 3-grams share at least
  nearDuplicateThreshold of their union (Jaccard) with an earlier row of the
  split. MinHash LSH (datasketch) finds the candidates; each candidate pair is
  confirmed on the exact 3-gram sets, so a reported pair is never a hash
  accident. Rows with fewer than MIN_SHINGLES 3-grams ("Hello" / "Hi") are too
  short to be near anything and count only as exact duplicates;
- leaked rows: train rows equal or near (the same test) to a row of validation
  or test;
- PII: emails, phone numbers, payment card numbers and keys (access keys, API
  tokens, private keys, long random values assigned to key/token/secret), each
  pattern confirmed (digit counts, a Luhn check, an entropy bound) before it
  counts. A hit names the row, the field and the kind, and shows the value
  masked; the value itself is never printed or saved.

Duplicates and leaks are judged on the text before redaction. Pure: no I/O, no
torch; `kubetune validate` runs it.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
import unicodedata
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any, Optional

KINDS = ("email", "phone", "card", "key")
ACTIONS = ("report", "drop", "redact")
HELD_OUT = ("validation", "test")
SHINGLE = 3  # words per shingle
MIN_SHINGLES = 3  # fewer: the row is compared for exact equality only
NUM_PERM = 128
SEED = 1  # MinHash permutations: fixed, so every rank and every run agrees
LISTED = 1000  # findings listed per kind and split; the counts are always whole
PLACEHOLDER = {kind: f"<{kind.upper()}>" for kind in KINDS}

# ---------------------------------------------------------------------------- text


def fields(norm: dict) -> Iterator[tuple[str, str]]:
    """(field path, text) of every string a normalised row trains on: text, prompt,
    completion, chosen, rejected and message contents (roles prefix them in
    `canonical`). A prompt row's `item` (the grader's reference fields) is not
    trained on and is left out."""

    def walk(value: Any, path: str) -> Iterator[tuple[str, str]]:
        if isinstance(value, str):
            yield path, value
        elif isinstance(value, list):
            for i, item in enumerate(value):
                yield from walk(item, f"{path}[{i}]")
        elif isinstance(value, dict) and "content" in value:
            yield from walk(value["content"], f"{path}.content")

    for key, value in norm.items():
        if key in ("item", "label"):
            continue
        yield from walk(value, key)


def canonical(norm: dict) -> str:
    """The text two rows are compared on: every trained string with its field's
    role, NFKC-normalised, case folded, white space collapsed."""
    parts = []
    for key, value in norm.items():
        if key in ("item", "label"):
            continue
        if isinstance(value, list):
            parts += [f"{m.get('role')}: {m.get('content')}" for m in value if isinstance(m, dict)]
        elif isinstance(value, str):
            parts.append(f"{key}: {value}")
    text = unicodedata.normalize("NFKC", "\n".join(parts)).casefold()
    return " ".join(text.split())


def digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def shingles(text: str) -> set[str]:
    words = re.findall(r"\w+", text)
    return {" ".join(words[i : i + SHINGLE]) for i in range(len(words) - SHINGLE + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


# ---------------------------------------------------------------------------- PII


def luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card_network(digits: str) -> bool:
    """An issuer prefix of the common networks (Visa, Mastercard, Amex, Discover,
    JCB, Diners): with the Luhn check it keeps ids and long numbers out."""
    n, p2, p4 = len(digits), int(digits[:2]), int(digits[:4])
    return (
        (digits[0] == "4" and n in (13, 16, 19))
        or ((51 <= p2 <= 55 or 2221 <= p4 <= 2720) and n == 16)
        or (p2 in (34, 37) and n == 15)
        or ((digits.startswith("6011") or p2 == 65) and n in (16, 19))
        or (3528 <= p4 <= 3589 and n in (16, 19))
        or ((p2 in (36, 38) or 300 <= int(digits[:3]) <= 305) and n == 14)
    )


def entropy(text: str) -> float:
    """Shannon entropy, bits per character."""
    counts = Counter(text)
    return -sum(c / len(text) * math.log2(c / len(text)) for c in counts.values())


_EMAIL = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9](?:[A-Za-z0-9._%+-]{0,62}[A-Za-z0-9])?"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w@])"
)
# Domains reserved for documentation and tests (RFC 2606, RFC 6761): an address
# there ("user@example.com" in a code sample) belongs to no one.
_RESERVED = re.compile(
    r"@(?:[\w-]+\.)*(?:example\.(?:com|net|org)|[\w-]+\.(?:example|test|invalid|localhost))$"
    r"|@(?:example|test|invalid|localhost)$",
    re.IGNORECASE,
)
_CARD = re.compile(r"(?<![\w.-])\d(?:[ -]?\d){12,18}(?![\w-]|\.\d)")
# A phone number: an optional +country code, an optional (area), then groups of
# digits joined by single separators; `_phone` decides on the digit count. Like a
# card number, it may end a sentence (a full stop after it), not a longer number.
_PHONE = re.compile(
    r"(?<![\w+.-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,5}(?:[ .-]\d{2,5}){1,4}"
    r"(?![\w-]|\.\d)"
    r"|(?<![\w+])\+\d{8,15}(?!\w)"
)
_IPV4 = re.compile(r"^\d{1,3}(?:\.\d{1,3}){3}$")
_DATE = re.compile(r"^\d{4}[-./]\d{1,2}[-./]\d{1,2}$|^\d{1,2}[-./]\d{1,2}[-./]\d{2,4}$")
_KEYS = [
    re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),  # AWS access key id
    re.compile(r"\bsk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}"),  # OpenAI/Anthropic style
    re.compile(r"\b[rs]k_(?:live|test)_[A-Za-z0-9]{16,}\b"),  # Stripe
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}\b"),  # GitHub tokens
    re.compile(r"\bgithub_pat_[A-Za-z0-9_]{40,}\b"),
    re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}\b"),  # Slack
    re.compile(r"\bAIza[0-9A-Za-z_-]{35}\b"),  # Google API key
    re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"),  # Hugging Face token
    re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----"),  # PEM private key
]
# key = value, where the value is long and random-looking (entropy checked)
_ASSIGNED = re.compile(
    r"(?i)\b(?:api[_-]?key|access[_-]?key|secret(?:[_-]?key)?|token|password|passwd|"
    r"private[_-]?key|client[_-]?secret)\b[\"']?\s*[:=]\s*[\"']?(?P<value>[A-Za-z0-9/+_=.-]{16,})"
)


def _phone(match: str) -> bool:
    digits = re.sub(r"\D", "", match)
    if not 10 <= len(digits) <= 15 and not (match.startswith("+") and len(digits) >= 8):
        return False
    # dates, IP addresses, versions and grouped amounts are not phone numbers
    if _IPV4.match(match) or _DATE.match(match):
        return False
    if re.fullmatch(r"\d{1,3}(?:,\d{3})+|\d{1,3}(?: \d{3}){2,}", match):
        return False
    return not (match.count(".") >= 2 and not re.search(r"[ ()+-]", match) and len(digits) < 10)


def _secret_value(value: str) -> bool:
    """A value assigned to a key/token/secret name that looks generated: letters
    and digits mixed, and at least 3.5 bits of entropy per character."""
    return (
        len(value) >= 16
        and bool(re.search(r"\d", value))
        and bool(re.search(r"[A-Za-z]", value))
        and entropy(value) >= 3.5
    )


def find_pii(text: str, kinds: Sequence[str] = KINDS) -> list[tuple[str, int, int]]:
    """(kind, start, end) of each PII span in `text`, in order, not overlapping.
    Cards are matched before phone numbers (a card number is no phone number)."""
    spans: list[tuple[str, int, int]] = []

    def free(start: int, end: int) -> bool:
        return all(end <= s or start >= e for _, s, e in spans)

    if "key" in kinds:
        for pattern in _KEYS:
            for m in pattern.finditer(text):
                if free(m.start(), m.end()):
                    spans.append(("key", m.start(), m.end()))
        for m in _ASSIGNED.finditer(text):
            start, end = m.span("value")
            if _secret_value(m["value"]) and free(start, end):
                spans.append(("key", start, end))
    if "email" in kinds:
        for m in _EMAIL.finditer(text):
            if not _RESERVED.search(m.group()) and free(m.start(), m.end()):
                spans.append(("email", m.start(), m.end()))
    if "card" in kinds:
        for m in _CARD.finditer(text):
            digits = re.sub(r"\D", "", m.group())
            valid = 13 <= len(digits) <= 19 and luhn(digits) and _card_network(digits)
            if valid and free(m.start(), m.end()):
                spans.append(("card", m.start(), m.end()))
    if "phone" in kinds:
        for m in _PHONE.finditer(text):
            if _phone(m.group()) and free(m.start(), m.end()):
                spans.append(("phone", m.start(), m.end()))
    return sorted(spans, key=lambda s: s[1])


def mask(kind: str, value: str) -> str:
    """A hit as the report shows it: enough to find it in the file, not to use it."""
    if kind == "email":
        local, _, domain = value.partition("@")
        return f"{local[:1]}***@***.{domain.rsplit('.', 1)[-1]}"
    if kind in ("card", "phone"):
        digits = re.sub(r"\D", "", value)
        return f"{'*' * (len(digits) - 2)}{digits[-2:]} ({len(digits)} digits)"
    return f"{value[:4]}*** ({len(value)} characters)"


def redact(text: str, kinds: Sequence[str] = KINDS) -> tuple[str, int]:
    """`text` with each PII span replaced by its placeholder (<EMAIL>, ...), and the
    number of spans replaced."""
    spans = find_pii(text, kinds)
    for kind, start, end in reversed(spans):
        text = text[:start] + PLACEHOLDER[kind] + text[end:]
    return text, len(spans)


# The raw fields each format trains on (data.normalize reads them; `fields` scans them).
# Others (a prompt row's grader references, labels, ids) are neither scanned nor redacted.
TRAINED_FIELDS = {
    "text": ("text",),
    "prompt-completion": ("prompt", "completion"),
    "chat": ("messages",),
    "alpaca": ("instruction", "input", "output"),
    "sharegpt": ("conversations",),
    "preference": ("prompt", "chosen", "rejected"),
    "feedback": ("prompt", "completion"),
    "prompt": ("prompt", "messages"),
    "classification": ("text",),
}


def redact_fields(row: Any, fmt: str, kinds: Sequence[str] = KINDS) -> tuple[Any, int]:
    """A raw row with the strings of the fields its format trains on redacted (the
    fields the scan counted PII in); its other fields as they were."""
    keys = TRAINED_FIELDS.get(fmt)
    if not isinstance(row, dict) or keys is None:
        return redact_row(row, kinds)  # a format without a list: every string
    out, n = dict(row), 0
    for key in keys:
        if key in out:
            out[key], k = redact_row(out[key], kinds)
            n += k
    return out, n


def redact_row(row: Any, kinds: Sequence[str] = KINDS) -> tuple[Any, int]:
    """A raw value (any shape) with every string in it redacted."""
    if isinstance(row, str):
        return redact(row, kinds)
    if isinstance(row, list):
        out, n = [], 0
        for item in row:
            new, k = redact_row(item, kinds)
            out.append(new)
            n += k
        return out, n
    if isinstance(row, dict):
        out, n = {}, 0
        for key, item in row.items():
            out[key], k = redact_row(item, kinds)
            n += k
        return out, n
    return row, 0


# ---------------------------------------------------------------------------- scan


class _Index:
    """The rows of one split by exact digest and by MinHash LSH."""

    def __init__(self, threshold: float):
        from datasketch import MinHashLSH

        self.threshold = threshold
        self.near = threshold < 1.0
        self.lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM) if self.near else None
        self.first: dict[str, int] = {}
        self.sets: dict[int, set] = {}

    def match(self, row: tuple) -> Optional[tuple[int, float]]:
        """(index, similarity) of the indexed row this one equals, else of the most
        similar one at or above the threshold (the earliest of equals)."""
        _, key, grams, sig = row
        if key in self.first:
            return self.first[key], 1.0
        if sig is None or not self.near:
            return None
        best = None
        for j in self.lsh.query(sig):
            sim = jaccard(grams, self.sets[j])
            if sim >= self.threshold and (best is None or (sim, -j) > (best[1], -best[0])):
                best = (j, sim)
        return best

    def add(self, row: tuple) -> None:
        index, key, grams, sig = row
        self.first.setdefault(key, index)
        if sig is not None and self.near and index not in self.sets:
            self.sets[index] = grams
            self.lsh.insert(index, sig)


def _rows(norms: Sequence[Optional[dict]], near: bool) -> list[tuple]:
    """(position, digest, 3-grams, MinHash or None) of each usable row; the MinHash
    only for rows long enough to be compared for nearness."""
    from datasketch import MinHash

    empty = MinHash(num_perm=NUM_PERM, seed=SEED)  # its permutations are made once
    out = []
    for i, norm in enumerate(norms):
        if norm is None:
            continue
        text = canonical(norm)
        grams = shingles(text)
        sig = None
        if near and len(grams) >= MIN_SHINGLES:
            sig = empty.copy()
            sig.update_batch([g.encode("utf-8") for g in sorted(grams)])
        out.append((i, digest(text), grams, sig))
    return out


def _label(labels: Optional[Sequence[str]], i: int) -> str:
    return labels[i] if labels is not None and i < len(labels) else f"row {i + 1}"


def scan(
    splits: dict[str, Sequence[Optional[dict]]],
    labels: Optional[dict[str, Sequence[str]]] = None,
    threshold: float = 0.8,
    kinds: Sequence[str] = KINDS,
    action: str = "report",
) -> dict:
    """The cleaning report of the normalised rows of each split (None: an unusable
    row, skipped but counted in `rows`). Row numbers are 0-based positions in the
    split; `where` is the file and line. Which rows `action` drops, per split,
    is in `drop` (and nothing is dropped for action report)."""
    t0 = time.monotonic()
    labels = labels or {}
    prepared = {name: _rows(rows, threshold < 1.0) for name, rows in splits.items()}

    report: dict = {
        "action": action,
        "nearDuplicateThreshold": threshold,
        "pii": list(kinds),
        "method": f"exact: sha256 of the normalised text; near: MinHash LSH ({NUM_PERM} "
        f"permutations, word {SHINGLE}-grams, rows of {MIN_SHINGLES}+ 3-grams), confirmed "
        "by exact Jaccard",
        "splits": {},
    }
    indexes = {}
    for name, items in prepared.items():
        where = labels.get(name)
        index = _Index(threshold)
        exact, near = [], []
        for row in items:
            i, key = row[0], row[1]
            hit = index.match(row)
            if hit is not None:
                j, sim = hit
                index.first.setdefault(key, i)  # a later copy of this row is exact
                entry = {"row": i, "where": _label(where, i), "of": j, "ofWhere": _label(where, j)}
                if index.first[key] != i:
                    exact.append(entry)
                else:
                    near.append({**entry, "similarity": round(sim, 4)})
                continue
            index.add(row)
        indexes[name] = index
        pii = []
        for i, norm in enumerate(splits[name]):
            if norm is None:
                continue
            for path, text in fields(norm):
                for kind, start, end in find_pii(text, kinds):
                    pii.append(
                        {
                            "row": i,
                            "where": _label(where, i),
                            "field": path,
                            "kind": kind,
                            "masked": mask(kind, text[start:end]),
                        }
                    )
        report["splits"][name] = {
            "rows": len(splits[name]),
            "exactDuplicates": exact,
            "nearDuplicates": near,
            "leaked": [],
            "pii": pii,
        }

    if "train" in prepared:
        train = report["splits"]["train"]
        where = labels.get("train")
        for row in prepared["train"]:
            i = row[0]
            for held in HELD_OUT:
                if held not in indexes:
                    continue
                hit = indexes[held].match(row)
                if hit is None:
                    continue
                j, sim = hit
                train["leaked"].append(
                    {
                        "row": i,
                        "where": _label(where, i),
                        "split": held,
                        "heldOutRow": j,
                        "heldOutWhere": _label(labels.get(held), j),
                        "similarity": round(sim, 4),
                    }
                )
                break

    for _name, part in report["splits"].items():
        drop: set[int] = set()
        if action in ("drop", "redact"):
            drop |= {e["row"] for e in part["exactDuplicates"] + part["nearDuplicates"]}
            drop |= {e["row"] for e in part["leaked"]}
        if action == "drop":
            drop |= {e["row"] for e in part["pii"]}
        by_kind = Counter(e["kind"] for e in part["pii"])
        part["counts"] = {
            "rows": part["rows"],
            "exactDuplicates": len(part["exactDuplicates"]),
            "nearDuplicates": len(part["nearDuplicates"]),
            "leaked": len(part["leaked"]),
            "pii": {kind: by_kind.get(kind, 0) for kind in kinds},
            "piiRows": len({e["row"] for e in part["pii"]}),
            "dropped": len(drop),
            "redacted": sum(by_kind.values()) if action == "redact" else 0,
            "kept": part["rows"] - len(drop),
        }
        part["drop"] = sorted(drop)
        for key in ("exactDuplicates", "nearDuplicates", "leaked", "pii"):
            if len(part[key]) > LISTED:
                part[key] = part[key][:LISTED]
                part["counts"][f"{key}Listed"] = LISTED
    report["seconds"] = round(time.monotonic() - t0, 3)
    return report


def summary(report: dict) -> list[str]:
    """One line per split, counts only: what the console and the logs show."""
    lines = []
    for name, part in report["splits"].items():
        c = part["counts"]
        pii = ", ".join(f"{c['pii'][k]} {k}" for k in KINDS if c["pii"].get(k)) or "none"
        text = (
            f"{name}: {c['rows']} rows, {c['exactDuplicates']} exact and "
            f"{c['nearDuplicates']} near duplicates"
        )
        if name == "train":
            text += f", {c['leaked']} leaked into validation/test"
        text += f"; PII {pii}"
        if report["action"] != "report":
            text += f"; {c['dropped']} dropped, {c['kept']} kept"
            if c["redacted"]:
                text += f", {c['redacted']} PII spans redacted"
        lines.append(text)
    return lines


def found(report: dict) -> int:
    """How many findings (duplicates, leaks, PII hits) the report holds."""
    return sum(
        c["exactDuplicates"] + c["nearDuplicates"] + c["leaked"] + sum(c["pii"].values())
        for c in (p["counts"] for p in report["splits"].values())
    )


def apply(
    rows: list, part: dict, action: str, kinds: Sequence[str], fmt: str
) -> tuple[list, list[int]]:
    """The raw rows of one split (of format `fmt`) after `action` (drop: the report's
    rows go; redact: they go too, and PII spans in the trained fields of the rest are
    replaced); and the kept positions."""
    if action == "report":
        return rows, list(range(len(rows)))
    drop = set(part["drop"])
    kept = [i for i in range(len(rows)) if i not in drop]
    out = [rows[i] for i in kept]
    if action == "redact":
        out = [redact_fields(r, fmt, kinds)[0] for r in out]
    return out, kept
