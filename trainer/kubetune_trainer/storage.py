"""The job's storage prefix through fsspec: records, checkpoints, artifacts.

Layout and record types are kubetune_api.storage's (the operator reads them).
Credentials come from the environment (KUBETUNE_OUTPUT_* etc.) through
kubetune_api.storage.storage_options and are never written anywhere.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from kubetune_api import storage as contract
from kubetune_api.models import StorageAccess


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def filesystem(uri: str, access: Optional[StorageAccess], role: str, environ=None):
    """(fs, path) for a URI; plain paths are local files."""
    import fsspec

    environ = os.environ if environ is None else environ
    opts = contract.storage_options(uri, access, role, environ)
    fs, path = fsspec.core.url_to_fs(uri, **opts)
    return fs, path


def to_uri(path_or_uri: str) -> str:
    """Relative and absolute local paths become file:// URIs; URIs pass through."""
    if "://" in path_or_uri:
        return path_or_uri
    return Path(path_or_uri).expanduser().resolve().as_uri()


class FencedOut(RuntimeError):
    """A newer attempt owns the job's prefix (attempt.json): this one must stop."""


class JobStorage:
    """Everything the trainer writes under `{prefix}`. `attempt`: the attempt this
    process belongs to; its commits are refused once a newer one owns the prefix."""

    def __init__(
        self,
        prefix: str,
        access: Optional[StorageAccess] = None,
        environ=None,
        attempt: Optional[int] = None,
    ):
        self.prefix = prefix.rstrip("/")
        self.attempt = attempt
        self.fs, self.root = filesystem(self.prefix, access, "OUTPUT", environ)
        self.root = self.root.rstrip("/")

    # -- paths
    def uri(self, *parts: str) -> str:
        return contract.join(self.prefix, *parts)

    def path(self, *parts: str) -> str:
        return contract.join(self.root, *parts)

    # -- records
    def write_text(self, rel: str, text: str) -> None:
        path = self.path(rel)
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        tmp = path + ".tmp"
        with self.fs.open(tmp, "w") as f:
            f.write(text)
        # rename is atomic on local files; object stores write whole objects anyway
        self.fs.mv(tmp, path)

    def read_json(self, rel: str) -> Optional[dict]:
        try:
            with self.fs.open(self.path(rel), "r") as f:
                return json.load(f)
        except FileNotFoundError:
            return None

    def read_record(self, rel: str, model):
        """A record of the storage contract (kubetune_api.storage), parsed into its
        model; None when it is not there."""
        data = self.read_json(rel)
        return None if data is None else model.model_validate(data)

    def write_json(self, rel: str, data: dict) -> None:
        self.write_text(rel, json.dumps(data, indent=2, sort_keys=True) + "\n")

    def write_record(self, rel: str, record) -> None:
        self.write_json(rel, record.to_dict())

    def write_progress(self, record: contract.ProgressRecord) -> None:
        self.write_record(contract.PROGRESS, record)

    def read_metrics(self) -> list[dict]:
        """Rows as the trainer keeps them in memory (snake_case keys)."""
        try:
            with self.fs.open(self.path(contract.METRICS), "r") as f:
                return [
                    contract.MetricsRow.model_validate(json.loads(line)).model_dump(
                        exclude_none=True
                    )
                    for line in f
                    if line.strip()
                ]
        except FileNotFoundError:
            return []

    def resumed_metrics(self, step: Optional[int]) -> list[dict]:
        """The rows an attempt resuming from checkpoint `step` (None: starting
        fresh) continues from: those up to that step (none without one: every
        step is trained again), leaving out any an older attempt wrote after a
        newer one took over (contract.row_counts)."""
        if step is None:
            return []
        fence = self.read_fence()
        return [
            r
            for r in self.read_metrics()
            if r["step"] <= step and contract.row_counts(r["step"], r.get("attempt"), fence)
        ]

    def write_metrics(self, rows: list[dict]) -> None:
        """Rows in the storage contract's shape (MetricsRow, camelCase), which
        also rejects a key the contract does not know. Object stores cannot
        append: the file is rewritten whole (it is small)."""
        lines = (json.dumps(contract.MetricsRow.model_validate(r).to_dict()) + "\n" for r in rows)
        self.write_text(contract.METRICS, "".join(lines))

    # -- the fence (attempt.json; see kubetune_api.storage)
    def read_fence(self) -> Optional[contract.AttemptRecord]:
        return self.read_record(contract.ATTEMPT, contract.AttemptRecord)

    def fenced_out(self) -> Optional[contract.AttemptRecord]:
        """The fence when a newer attempt than this one owns the prefix, else None."""
        fence = self.read_fence()
        if self.attempt is not None and contract.newer_owner(fence, self.attempt):
            return fence
        return None

    def fenced_message(self, fence: contract.AttemptRecord, doing: str) -> str:
        return (
            f"attempt {self.attempt} no longer owns {self.prefix}: attempt {fence.attempt} "
            f"took over at {fence.started_at} ({contract.ATTEMPT}); this attempt stops "
            f"{doing} (a retry replaced it; nothing to fix)"
        )

    def take_over(self) -> contract.AttemptRecord:
        """The driver's first write: this attempt owns the prefix from now on, with
        the checkpoints that count now (committed by older attempts before this
        moment). Raises FencedOut when a newer attempt already owns it."""
        fence = self.fenced_out()
        if fence is not None:
            raise FencedOut(self.fenced_message(fence, "before it starts"))
        record = contract.AttemptRecord(
            attempt=self.attempt or 1, started_at=now(), inherited=self.committed_checkpoints()
        )
        self.write_record(contract.ATTEMPT, record)
        return record

    def commit_checkpoint(self, rel: str, manifest: contract.CheckpointManifest) -> None:
        """Write a checkpoint's manifest (the commit), unless a newer attempt owns
        the prefix: then raise FencedOut and commit nothing. Readers ignore a
        commit that slips past this check anyway (contract.checkpoint_counts)."""
        fence = self.fenced_out()
        if fence is not None:
            doing = f"without committing checkpoint step {manifest.step}"
            raise FencedOut(self.fenced_message(fence, doing))
        self.write_record(f"{rel}/{contract.MANIFEST}", manifest)

    # -- checkpoints
    def committed_checkpoints(self) -> list[int]:
        """Steps with a manifest that counts under the fence, oldest first. Folders
        without one, and commits of an older attempt after a newer one started,
        are ignored (and removed by clear_uncommitted)."""
        base = self.path(contract.CHECKPOINTS)
        try:
            entries = self.fs.ls(base, detail=False)
        except FileNotFoundError:
            return []
        fence = self.read_fence()
        steps = []
        for entry in entries:
            step = contract.parse_checkpoint_dir(entry)
            if step is None:
                continue
            try:
                with self.fs.open(contract.join(entry, contract.MANIFEST), "r") as f:
                    manifest = json.load(f)
            except FileNotFoundError:
                continue
            except ValueError:  # there but unreadable: committed, by an unknown attempt
                manifest = {}
            if contract.checkpoint_counts(step, manifest.get("attempt"), fence):
                steps.append(step)
        return sorted(steps)

    def checkpoint_rel(self, step: int) -> str:
        return f"{contract.CHECKPOINTS}/step-{step:08d}"

    def read_manifest(self, step: int) -> Optional[contract.CheckpointManifest]:
        """The committed checkpoint's manifest; None when it is gone or not the
        contract's shape (such a checkpoint cannot be trusted either)."""
        try:
            rel = f"{self.checkpoint_rel(step)}/{contract.MANIFEST}"
            return self.read_record(rel, contract.CheckpointManifest)
        except ValueError:  # not JSON, or not a manifest (pydantic's error is one too)
            return None

    def stored_sizes(self, rel: str) -> dict[str, int]:
        """Every file under `rel`: path relative to it -> bytes (one listing, no reads)."""
        base = self.path(rel).rstrip("/")
        try:
            found = self.fs.find(base, detail=True)
        except FileNotFoundError:
            return {}
        return {path[len(base) + 1 :]: int(info["size"]) for path, info in found.items()}

    def quarantine(self, skipped: contract.SkippedCheckpoint) -> str:
        """Move a committed checkpoint that failed verification aside, to
        checkpoints/quarantine/step-N-<time>/ with skipped.json saying why; its
        URI. The manifest moves first: from then on the step is not committed, and
        a crash halfway leaves an uncommitted folder, which the next start clears.
        Object stores move by copy and delete, object by object."""
        rel = self.checkpoint_rel(skipped.step)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        dest_rel = f"{contract.CHECKPOINTS}/{contract.QUARANTINE}/step-{skipped.step:08d}-{stamp}"
        names = sorted(self.stored_sizes(rel), key=lambda n: n != contract.MANIFEST)
        for name in names:
            dest = self.path(dest_rel, name)
            self.fs.makedirs(dest.rsplit("/", 1)[0], exist_ok=True)
            self.fs.mv(self.path(rel, name), dest)
        self.delete(rel)  # what is left: empty local folders
        record = skipped.model_copy(update={"moved_to": self.uri(dest_rel)})
        self.write_record(f"{dest_rel}/{contract.SKIPPED}", record)
        return record.moved_to

    def upload_dir(self, local: Path, rel: str) -> list[str]:
        files = sorted(p for p in Path(local).rglob("*") if p.is_file())
        names = []
        for p in files:
            name = p.relative_to(local).as_posix()
            dest = self.path(rel, name)
            self.fs.makedirs(dest.rsplit("/", 1)[0], exist_ok=True)
            self.fs.put_file(str(p), dest)
            names.append(name)
        return names

    def download_dir(self, rel: str, local: Path) -> None:
        src = self.path(rel)
        for path in self.fs.find(src):
            name = path[len(src.rstrip("/")) + 1 :]
            dest = Path(local) / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(path, str(dest))

    def delete(self, rel: str) -> None:
        path = self.path(rel)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def clear_uncommitted(self, committed: list[int]) -> None:
        base = self.path(contract.CHECKPOINTS)
        try:
            entries = self.fs.ls(base, detail=False)
        except FileNotFoundError:
            return
        for entry in entries:
            step = contract.parse_checkpoint_dir(entry)
            if step is not None and step not in committed:
                self.fs.rm(entry, recursive=True)


class BackgroundWriter:
    """Writes records (progress.json, metrics.jsonl) off the training step: an
    object-store PUT costs tens of milliseconds, a GPU step may cost less. Per key
    only the newest pending write is kept (each one is a whole snapshot); flush()
    waits for everything submitted and re-raises the first error, so a storage
    failure still fails the run, at the next flush or submit."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._pending: dict[str, Callable[[], None]] = {}
        self._busy = False
        self._error: Optional[BaseException] = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="kubetune-writer", daemon=True)
        self._thread.start()

    def submit(self, key: str, write: Callable[[], None]) -> None:
        with self._cv:
            self._raise()
            self._pending.pop(key, None)  # the newer snapshot goes to the back of the line
            self._pending[key] = write
            self._cv.notify_all()

    def flush(self) -> None:
        with self._cv:
            while self._pending or self._busy:
                self._cv.wait()
            self._raise()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            with self._cv:
                self._closed = True
                self._cv.notify_all()
            self._thread.join(timeout=60)

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._closed:
                    self._cv.wait()
                if not self._pending:
                    return
                key = next(iter(self._pending))
                write = self._pending.pop(key)
                self._busy = True
            try:
                write()
            except BaseException as exc:  # noqa: BLE001  (handed to the training thread)
                with self._cv:
                    self._error = self._error or exc
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()


def wait_for(predicate, timeout: float, interval: float = 0.5) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
