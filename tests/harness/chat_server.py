"""An OpenAI-compatible chat completions server over a real model (transformers),
for the scoreModel grader's tests: `POST <prefix>/v1/chat/completions` answers
with the model's greedy reply to the chat (its chat template); every request is
recorded: `GET /stats` returns the Authorization headers seen, the most requests
in flight at once and the count; `POST /reset` starts them again.

Prefixes change the behaviour, not the reply: `/slow/v1` sleeps --slow-seconds
before answering (a judge that is too slow); `/busy/v1` answers 429 to every
other request (a rate-limited endpoint). `python tests/harness/chat_server.py
MODEL_DIR PORT` runs it; `ChatServer` starts it on a free port.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

if __package__:
    from .procs import LOOPBACK, Server, free_port
else:  # run as a script
    LOOPBACK = "127.0.0.1"


class _State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self.requests = 0
        self.auth: list[str] = []
        self.busy_turn = 0


def serve(model_dir: str, port: int, slow_seconds: float) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    generate_lock = threading.Lock()  # one generation at a time; requests queue
    state = _State()

    def reply(messages: list[dict], max_tokens: int) -> str:
        ids = tok.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with generate_lock, torch.no_grad():
            out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False)
        return tok.decode(out[0][ids["input_ids"].shape[1] :], skip_special_tokens=True)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def _json(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/health":
                return self._json(200, {"ok": True})
            if self.path == "/stats":
                with state.lock:
                    return self._json(
                        200,
                        {
                            "requests": state.requests,
                            "max_in_flight": state.max_in_flight,
                            "auth": state.auth,
                        },
                    )
            self._json(404, {"error": "not found"})

        def do_POST(self) -> None:
            if self.path == "/reset":  # a test's own counts
                with state.lock:
                    state.requests = state.max_in_flight = state.busy_turn = 0
                    state.auth = []
                return self._json(200, {"ok": True})
            if not self.path.endswith("/v1/chat/completions"):
                return self._json(404, {"error": "not found"})
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with state.lock:
                state.requests += 1
                state.in_flight += 1
                state.max_in_flight = max(state.max_in_flight, state.in_flight)
                state.auth.append(self.headers.get("Authorization", ""))
                state.busy_turn += self.path.startswith("/busy/")
                refuse = self.path.startswith("/busy/") and state.busy_turn % 2 == 1
            try:
                if refuse:
                    status, payload = 429, {"error": {"message": "slow down"}}
                else:
                    if self.path.startswith("/slow/"):
                        time.sleep(slow_seconds)
                    text = reply(body["messages"], int(body.get("max_tokens") or 16))
                    status, payload = (
                        200,
                        {
                            "object": "chat.completion",
                            "model": body.get("model"),
                            "choices": [
                                {
                                    "index": 0,
                                    "message": {"role": "assistant", "content": text},
                                    "finish_reason": "length",
                                }
                            ],
                        },
                    )
            finally:
                # out of flight before the answer is sent: a client may send its next
                # request the moment it reads this answer, before this thread runs again
                with state.lock:
                    state.in_flight -= 1
            # a client that gave up (a timeout) has closed its end: fine
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self._json(status, payload)

    server = ThreadingHTTPServer((LOOPBACK, port), Handler)
    server.daemon_threads = True
    print(f"chat server on {LOOPBACK}:{port}", flush=True)
    server.serve_forever()


if __package__:

    class ChatServer:
        """The server in its own process, on a free port; `url` is the API base."""

        def __init__(self, model_dir: Path, log_dir: Path, slow_seconds: float = 5.0):
            self.port = free_port()
            self.base = f"http://{LOOPBACK}:{self.port}"
            self.url = f"{self.base}/v1"
            self.server = Server(
                "chat-server",
                [sys.executable, __file__, str(model_dir), str(self.port), str(slow_seconds)],
                log_dir,
            )

        def start(self, timeout: float = 180) -> ChatServer:
            self.server.start()
            self.server.wait_ready(self._healthy, timeout, "answering /health")
            return self

        def _healthy(self) -> bool:
            try:
                with urllib.request.urlopen(f"{self.base}/health", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        def reset(self) -> None:
            request = urllib.request.Request(f"{self.base}/reset", b"", method="POST")
            urllib.request.urlopen(request, timeout=10).close()

        def stats(self) -> dict:
            with urllib.request.urlopen(f"{self.base}/stats", timeout=10) as r:
                return json.loads(r.read())

        def stop(self) -> None:
            self.server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("port", type=int)
    parser.add_argument("slow_seconds", type=float, nargs="?", default=5.0)
    args = parser.parse_args()
    serve(args.model_dir, args.port, args.slow_seconds)
