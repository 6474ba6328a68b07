"""A data file with planted duplicates, near duplicates, leaked rows and PII, for
spec.dataset.clean's tests (tests/unit/test_clean.py, tests/trainer/test_clean_run.py)."""

from __future__ import annotations

import json
import random

# Made-up words: two random rows share (almost) no word 3-gram.
_SYLLABLES = ["ka", "lo", "mi", "ru", "te", "ba", "zo", "ne", "vi", "pu", "da", "se"]


def _words(rng: random.Random, n: int) -> str:
    return " ".join(
        "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))) for _ in range(n)
    )


def _chat(user: str, assistant: str) -> dict:
    return {
        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    }


# Text that looks like PII to a careless scan and is not: none of it may be reported.
DECOYS = [
    "Write to user@example.com or admin@mail.example.org for the demo.",
    "The release 1.2.3.4 shipped on 2024-01-15 and again on 15/01/2024.",
    "Ping 192.168.100.200 before the call.",
    "It cost 1,234,567 dollars, or 1 234 567 in the other notation.",
    "Order 1234 5678 9012 3456 is not a card (no Luhn).",
    "The password = hunter2 is too short to be a generated secret.",
    "My token is 42 and the key = value pair is plain.",
    "Call extension 4021 at 9 am; room 12-34.",
]

# (row in train, field, kind, text): the PII planted, one per row.
PLANTED_PII = [
    (30, "email", "Mail maria.lopez@fastmail.fm about the invoice."),
    (31, "phone", "Her number is +1 (415) 555-0132 after six."),
    (32, "phone", "Ring 020 7946 0958 in London."),
    (33, "card", "Charge 4111 1111 1111 1111 for the order."),
    (34, "card", "Amex 3782-822463-10005 expires soon."),
    (35, "key", "export AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE"),
    (36, "key", "token ghp_a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8 pushed"),
    (37, "key", "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA"),
    (38, "key", 'api_key = "f3Kq9ZxT1mVb7RcW2yLp8Hs4"'),
    (39, "key", "use sk-proj-Xy7Kp2Lm9Qr4Tv8Wz1Ab3Cd5 in the client"),
]


def planted() -> tuple[list[dict], list[dict]]:
    """(train, validation) chat rows: 30 distinct train rows, 10 PII rows, then the
    planted duplicates and leaks; 10 distinct validation rows."""
    rng = random.Random(0)
    train = [_chat(_words(rng, 8), _words(rng, 30)) for _ in range(30)]
    for i, decoy in enumerate(DECOYS):  # decoys ride in ordinary rows
        train[20 + i]["messages"][1]["content"] += " " + decoy
    for _, _, text in PLANTED_PII:
        train.append(_chat(_words(rng, 6), text + " " + _words(rng, 10)))
    validation = [_chat(_words(rng, 8), _words(rng, 30)) for _ in range(10)]
    # 40, 41: exact duplicates of 3 and 4 (41 differs only in case and spaces)
    train.append(json.loads(json.dumps(train[3])))
    shouted = json.loads(json.dumps(train[4]))
    for m in shouted["messages"]:
        m["content"] = "  " + m["content"].upper().replace(" ", "   ") + " "
    train.append(shouted)
    # 42, 43: near duplicates of 5 and 6 (one word replaced, one word dropped)
    near = json.loads(json.dumps(train[5]))
    words = near["messages"][1]["content"].split()
    words[-1] = "changed"
    near["messages"][1]["content"] = " ".join(words)
    train.append(near)
    near = json.loads(json.dumps(train[6]))
    words = near["messages"][1]["content"].split()
    del words[-1]
    near["messages"][1]["content"] = " ".join(words)
    train.append(near)
    # 44, 45: leaked: validation row 2 as it is, validation row 7 with one word changed
    train.append(json.loads(json.dumps(validation[2])))
    leak = json.loads(json.dumps(validation[7]))
    words = leak["messages"][1]["content"].split()
    words[-1] = "edited"
    leak["messages"][1]["content"] = " ".join(words)
    train.append(leak)
    return train, validation
