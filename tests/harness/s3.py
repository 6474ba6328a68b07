"""An S3-compatible server: versitygw's posix backend on a temp dir."""

from __future__ import annotations

import secrets
import urllib.error
import urllib.request
from pathlib import Path

from . import bins
from .procs import LOOPBACK, Server, free_port

REGION = "us-east-1"


class S3Server:
    def __init__(self, workdir: Path, log_dir: Path, host: str = LOOPBACK) -> None:
        self.workdir = Path(workdir)
        self.port = free_port()
        # host: the address pods reach it on, in the cluster tier (the node's).
        self.endpoint = f"http://{host}:{self.port}"
        self.access_key = "kubetune" + secrets.token_hex(4)
        self.secret_key = secrets.token_hex(20)
        self.region = REGION
        data = self.workdir / "data"
        sidecar = self.workdir / "meta"
        for d in (data, sidecar):
            d.mkdir(parents=True, exist_ok=True)
        self.server = Server(
            "versitygw",
            [
                bins.find("versitygw"),
                f"--port={host}:{self.port}",
                f"--region={REGION}",
                "--health=/health",
                "posix",
                f"--sidecar={sidecar}",
                data,
            ],
            log_dir,
            # Credentials via env, so they never show in `ps`.
            env={"ROOT_ACCESS_KEY": self.access_key, "ROOT_SECRET_KEY": self.secret_key},
        )

    @property
    def log(self) -> Path:
        return self.server.log

    def start(self, timeout: float = 30) -> S3Server:
        self.server.start()

        def ready() -> bool:
            with urllib.request.urlopen(f"{self.endpoint}/health", timeout=2) as r:
                return r.status == 200

        self.server.wait_ready(ready, timeout, "ready (/health)")
        return self

    def stop(self) -> None:
        self.server.stop()

    def storage_options(self) -> dict:
        """fsspec/s3fs options for this server."""
        return {
            "key": self.access_key,
            "secret": self.secret_key,
            "client_kwargs": {"endpoint_url": self.endpoint, "region_name": self.region},
        }

    def create_bucket(self, name: str) -> None:
        # Not fs.mkdir(): s3fs sends LocationConstraint=us-east-1, which S3
        # (AWS and versitygw alike) rejects as an invalid location constraint.
        self.filesystem().call_s3("create_bucket", Bucket=name)

    def filesystem(self):
        import s3fs

        # skip_instance_cache: every fixture gets its own client, no cross-test state.
        return s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options())
