"""The scoreModel grader against a real OpenAI-compatible endpoint: SmolLM2-135M-Instruct
served through transformers by tests/harness/chat_server.py, which records what
arrives (the bearer token, requests in flight). No reply is stubbed: the score is
the model's greedy answer."""

from __future__ import annotations

import time

import pytest

from harness.chat_server import ChatServer
from kubetune_api.graders import api_key_env
from kubetune_trainer.graders import Graders
from model_fixtures import SMOL, prepare_quickstart

# Greedy SmolLM2-135M-Instruct answers this chat with "The answer is 1."
RATE = "Rate this answer from 0 to 9. Reply with one digit only. Answer: {{sample.output_text}}"
SAMPLE = {"output_text": "Paris is the capital of France."}


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    prepare_quickstart()
    server = ChatServer(SMOL, tmp_path_factory.mktemp("chat"), slow_seconds=6).start()
    yield server
    server.stop()


def judge(url: str, **extra) -> dict:
    return {
        "type": "scoreModel",
        "name": "judge",
        "endpoint": url,
        "model": "smollm2",
        "messages": [{"role": "user", "content": RATE}],
        "range": [0, 9],
        "maxTokens": 6,
        **extra,
    }


def test_the_models_number_is_the_score_and_the_key_is_sent(chat):
    chat.reset()
    spec = judge(chat.url, apiKeySecretRef={"name": "judge-key", "key": "api-key"})
    env = {api_key_env("judge"): "sk-test-123"}
    with Graders(spec, environ=env) as graders:
        scores = graders.score([SAMPLE], [{}])
    assert scores.total == [1.0], scores
    assert scores.errors == {"judge": 0} and scores.timeouts == {"judge": 0}
    assert chat.stats()["auth"] == ["Bearer sk-test-123"]


def test_requests_in_flight_never_exceed_max_concurrency(chat):
    chat.reset()
    spec = judge(chat.url, maxConcurrency=2, maxTokens=1)
    with Graders(spec, environ={}) as graders:
        scores = graders.score([SAMPLE] * 6, [{}] * 6)
    stats = chat.stats()
    assert stats["requests"] == 6
    assert stats["max_in_flight"] == 2, stats  # used, and never more
    assert stats["auth"] == [""] * 6  # no key configured, none sent
    assert sum(scores.errors.values()) + sum(scores.timeouts.values()) <= 6


def test_a_rate_limited_endpoint_is_retried(chat):
    chat.reset()
    with Graders(judge(chat.base + "/busy/v1", maxRetries=1), environ={}) as graders:
        scores = graders.score([SAMPLE], [{}])
    assert scores.total == [1.0] and scores.errors == {"judge": 0}
    assert chat.stats()["requests"] == 2  # the 429, then the answer
    chat.reset()
    with Graders(judge(chat.base + "/busy/v1", maxRetries=0), environ={}) as graders:
        scores = graders.score([SAMPLE], [{}])
    assert scores.errors == {"judge": 1} and "429" in scores.messages["judge"]


# last: the slow requests' late generations hold the model for a while
def test_a_slow_endpoint_is_a_counted_timeout_within_the_bound(chat):
    chat.reset()
    spec = {
        "type": "multi",
        "name": "all",
        "graders": {
            "judge": judge(chat.base + "/slow/v1", timeoutSeconds=1, maxConcurrency=2),
            "exact": {
                "type": "stringCheck",
                "name": "exact",
                "reference": "{{item.answer}}",
                "operation": "eq",
            },
        },
    }
    with Graders(spec, environ={}) as graders:
        start = time.monotonic()
        scores = graders.score([SAMPLE, {"output_text": "x"}], [{"answer": "x"}] * 2)
        took = time.monotonic() - start
    assert took < 1 + 1 + 1.0, took  # one wave of two: its timeout, the slack, no more
    assert scores.timeouts == {"judge": 2, "exact": 0}
    assert scores.per_grader["judge"] == [0.0, 0.0]
    assert scores.per_grader["exact"] == [0.0, 1.0]  # the other grader still scores
    assert "timeoutSeconds" in scores.messages["judge"]
