"""The MLflow client's credentials go to the tracking server only: a redirect to
another host (or port, or scheme) arrives without the Authorization header; a
redirect within the server keeps it. Two real HTTP servers on loopback."""

from __future__ import annotations

import http.server
import json
import threading

import pytest

from kubetune_trainer.tracking import MlflowClient


class _Recorder(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self.server.seen.append((self.path, self.headers.get("Authorization")))
        target = self.server.redirect_to
        if target and not self.path.startswith("/landed"):
            self.send_response(307)
            self.send_header("Location", target + "/landed" + self.path)
            self.end_headers()
            return
        body = json.dumps({"experiment": {"experiment_id": "7"}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def servers():
    made = []
    for _ in range(2):
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
        srv.seen, srv.redirect_to = [], None
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        made.append(srv)
    yield made
    for srv in made:
        srv.shutdown()
        srv.server_close()


def _url(srv) -> str:
    return f"http://127.0.0.1:{srv.server_address[1]}"


@pytest.mark.parametrize(
    ("environ", "header"),
    [
        ({"MLFLOW_TRACKING_TOKEN": "tok-123"}, "Bearer tok-123"),
        (
            {"MLFLOW_TRACKING_USERNAME": "u", "MLFLOW_TRACKING_PASSWORD": "p"},
            "Basic dTpw",
        ),
    ],
)
def test_authorization_never_follows_a_redirect_to_another_host(servers, environ, header):
    tracking, other = servers
    tracking.redirect_to = _url(other)  # the port differs: another origin
    client = MlflowClient(_url(tracking), environ, timeout=5)
    assert client.experiment_id("chat") == "7"  # the redirect was followed
    assert tracking.seen[0][1] == header
    assert [auth for _, auth in other.seen] == [None]
    assert other.seen[0][0].startswith("/landed/api/2.0/mlflow/experiments/get-by-name")


def test_a_redirect_within_the_server_keeps_authorization(servers):
    tracking, _ = servers
    tracking.redirect_to = _url(tracking)
    client = MlflowClient(_url(tracking), {"MLFLOW_TRACKING_TOKEN": "tok-123"}, timeout=5)
    assert client.experiment_id("chat") == "7"
    assert [auth for _, auth in tracking.seen] == ["Bearer tok-123", "Bearer tok-123"]
