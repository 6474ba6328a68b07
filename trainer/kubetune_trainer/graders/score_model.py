"""scoreModel graders: a model behind an OpenAI-compatible chat completions endpoint.

Plain HTTP with urllib (as kubetune_trainer.tracking talks to MLflow). At most
maxConcurrency requests are in flight per grader (a pool of that many threads,
kept across calls: a request given up on holds its thread until it ends). Each
sample gets timeoutSeconds in all from when its request is sent, retries on
429, 5xx and dropped connections included, with a short backoff. The first
number in the reply, clamped to range, is the score; a reply without one, a
refused request or a timeout scores 0 and is counted.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Optional

from kubetune_api.graders import render

from .python import ERROR, OK, TIMEOUT

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
RETRY_STATUS = {429, 500, 502, 503, 504}


class _Timeout(Exception):
    pass


class ScoreModelGrader:
    def __init__(self, spec, api_key: Optional[str]):
        self.spec = spec
        self.url = spec.endpoint.rstrip("/") + "/chat/completions"
        self.api_key = api_key
        self.low, self.high = spec.score_range
        self.timeout = spec.timeout_seconds
        self.last_error: Optional[str] = None
        self._pool = ThreadPoolExecutor(spec.max_concurrency, thread_name_prefix=spec.name)

    def _body(self, sample: dict, item: dict) -> bytes:
        messages = [
            {"role": m.role, "content": render(m.content, sample, item)} for m in self.spec.messages
        ]
        return json.dumps(
            {
                "model": self.spec.model,
                "messages": messages,
                "max_tokens": self.spec.max_tokens,
                "temperature": self.spec.temperature,
            }
        ).encode()

    def _post(self, body: bytes, deadline: float) -> str:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        attempt = 0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Timeout()
            try:
                request = urllib.request.Request(self.url, body, headers, method="POST")
                with urllib.request.urlopen(request, timeout=left) as response:
                    reply = json.loads(response.read())
                return reply["choices"][0]["message"]["content"] or ""
            except urllib.error.HTTPError as exc:
                if exc.code not in RETRY_STATUS or attempt >= self.spec.max_retries:
                    raise RuntimeError(f"the endpoint answered HTTP {exc.code}") from None
            except (TimeoutError, _Timeout):
                raise _Timeout() from None
            except urllib.error.URLError as exc:
                if isinstance(exc.reason, TimeoutError):
                    raise _Timeout() from None
                if attempt >= self.spec.max_retries:
                    raise RuntimeError(f"cannot reach the endpoint: {exc.reason}") from None
            except ConnectionError as exc:
                if attempt >= self.spec.max_retries:
                    raise RuntimeError(f"the connection failed: {exc}") from None
            attempt += 1
            time.sleep(min(0.25 * 2**attempt, max(0.0, deadline - time.monotonic())))

    def _one(self, sample: dict, item: dict) -> tuple[float, str]:
        try:
            text = self._post(self._body(sample, item), time.monotonic() + self.timeout)
        except _Timeout:
            self.last_error = f"no answer within timeoutSeconds ({self.timeout:g})"
            return 0.0, TIMEOUT
        except (RuntimeError, KeyError, IndexError, TypeError, ValueError) as exc:
            self.last_error = str(exc)[:300]
            return 0.0, ERROR
        found = _NUMBER.search(text)
        if not found:
            self.last_error = f"the reply holds no number: {text[:80]!r}"
            return 0.0, ERROR
        return min(self.high, max(self.low, float(found.group()))), OK

    def score(self, samples: list[dict], items: list[dict]) -> list[tuple[float, str]]:
        out: list[tuple[float, str]] = [(0.0, TIMEOUT)] * len(samples)
        futures = [self._pool.submit(self._one, s, i) for s, i in zip(samples, items, strict=True)]
        # at most maxConcurrency at a time, each within its timeout (a second of slack
        # for the last backoff and the parsing)
        waves = -(-len(samples) // self.spec.max_concurrency)
        end = time.monotonic() + waves * (self.timeout + 1.0)
        for i, future in enumerate(futures):
            try:
                out[i] = future.result(timeout=max(0.0, end - time.monotonic()))
            except FutureTimeout:
                future.cancel()
                self.last_error = f"no answer within timeoutSeconds ({self.timeout:g})"
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
