"""The platform's object store, as this server sees it: uploaded files under
`{files uri}/{namespace}/{file id}/` and the metrics the trainer writes under a
job's prefix. Blocking (fsspec); the server calls it in worker threads.

A file is there once its record (`file.json`) is: it is written last, after the
data, so a crash mid-upload leaves nothing a caller can list or train on.

    {files uri}/{namespace}/{file id}/upload.jsonl   the bytes as uploaded
    {files uri}/{namespace}/{file id}/train.jsonl    the trainer's rows (preference files)
    {files uri}/{namespace}/{file id}/file.json      the record (written last)
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from typing import Any, Optional

from kubetune_api import storage

RECORD = "file.json"
UPLOAD = "upload.jsonl"
TRAIN = "train.jsonl"
METRICS_TAIL_BYTES = 4 * 1024 * 1024


class Store:
    def __init__(
        self,
        files_uri: str,
        endpoint: Optional[str],
        region: Optional[str],
        environ: Mapping[str, str],
    ):
        import fsspec

        scheme, rest = storage.split_uri(files_uri)
        self.scheme = scheme
        self.root = rest.rstrip("/")
        opts: dict[str, Any] = {}
        if scheme == "s3":
            client: dict = {}
            if endpoint:
                client["endpoint_url"] = endpoint
            if region:
                client["region_name"] = region
            key = environ.get("KUBETUNE_API_AWS_ACCESS_KEY_ID") or environ.get("AWS_ACCESS_KEY_ID")
            secret = environ.get("KUBETUNE_API_AWS_SECRET_ACCESS_KEY") or environ.get(
                "AWS_SECRET_ACCESS_KEY"
            )
            if key and secret:
                opts |= {"key": key, "secret": secret}
            if client:
                opts["client_kwargs"] = client
            opts |= {
                "use_listings_cache": False,
                "config_kwargs": {"connect_timeout": 5, "read_timeout": 30},
            }
        self.fs = fsspec.filesystem(scheme, **opts)

    # ------------------------------------------------------------------ files

    def _dir(self, namespace: str, file_id: str = "") -> str:
        return "/".join(p for p in (self.root, namespace, file_id) if p)

    def uri(self, path: str) -> str:
        return f"{self.scheme}://{path}" if self.scheme != "file" else path

    def put(
        self, namespace: str, file_id: str, record: dict, upload_path: str, train: Optional[bytes]
    ):
        folder = self._dir(namespace, file_id)
        self.fs.put_file(upload_path, f"{folder}/{UPLOAD}")
        data = f"{folder}/{UPLOAD}"
        if train is not None:
            data = f"{folder}/{TRAIN}"
            self.fs.pipe_file(data, train)
        full = record | {"uri": self.uri(data)}
        self.fs.pipe_file(f"{folder}/{RECORD}", json.dumps(full).encode())
        return full

    def get(self, namespace: str, file_id: str) -> Optional[dict]:
        try:
            raw = self.fs.cat_file(f"{self._dir(namespace, file_id)}/{RECORD}")
        except FileNotFoundError:
            return None
        return json.loads(raw)

    def list(self, namespace: str) -> list[dict]:
        try:
            entries = self.fs.ls(self._dir(namespace), detail=False)
        except FileNotFoundError:
            return []
        records = []
        for entry in entries:
            rec = self.get(namespace, entry.rstrip("/").rsplit("/", 1)[-1])
            if rec is not None:
                records.append(rec)
        return records

    def content(self, namespace: str, file_id: str) -> bytes:
        return self.fs.cat_file(f"{self._dir(namespace, file_id)}/{UPLOAD}")

    def delete(self, namespace: str, file_id: str) -> None:
        folder = self._dir(namespace, file_id)
        self.fs.rm_file(f"{folder}/{RECORD}")  # gone for callers first
        for name in (UPLOAD, TRAIN):
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(f"{folder}/{name}")

    # ------------------------------------------------------------------ metrics

    def metrics(self, prefix: str) -> list[dict]:
        """Rows of metrics.jsonl under a job prefix (its last few MiB), camelCase keys."""
        from kubetune_operator.storage_reader import camel

        _, path = storage.split_uri(storage.join(prefix, storage.METRICS))
        try:
            size = self.fs.size(path)
        except FileNotFoundError:
            return []
        start = max(0, size - METRICS_TAIL_BYTES)
        with self.fs.open(path, "rb") as f:
            f.seek(start)
            lines = f.read().decode("utf-8", "replace").splitlines()
        if start:
            lines = lines[1:]
        rows = []
        for line in lines:
            try:
                rows.append(camel(json.loads(line)))
            except ValueError:
                continue  # a half-appended last line
        return rows
