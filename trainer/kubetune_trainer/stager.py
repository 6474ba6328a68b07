"""The driver's side of staging (kubetune_trainer.staging): before any worker
starts, fetch the job's model, its parent's outputs, a distill teacher and its
data once into the attempt's stage folder, hash every file into the manifest,
then mark it complete."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Optional

from . import parent as P
from .staging import COMPLETE, MANIFEST, hashes, key, mark_verified, remote, stage_dir
from .storage import filesystem


class Stager:
    """Fetch each source once, hash it, then mark the stage complete."""

    def __init__(self, root: Path):
        self.root = root
        self.entries: dict[str, dict] = {}
        self.parent: Optional[dict] = None

    def start(self) -> None:
        """An empty stage. Its siblings are older attempts' (this one owns the job's
        prefix, so no newer one runs): what a killed driver left goes too."""
        if self.root.parent.is_dir():
            for old in self.root.parent.iterdir():
                shutil.rmtree(old, ignore_errors=True)
        self.root.mkdir(parents=True)

    def add(self, uri: str, access, role: str, environ=None) -> None:
        """Fetch a file or folder URI (once, however often it is named)."""
        uri = uri.rstrip("/")
        if uri in self.entries:
            return
        fs, path = filesystem(uri, access, role, environ)
        dest = self.root / key(uri)
        dest.mkdir()
        if fs.isdir(path):
            fs.get(path.rstrip("/") + "/", str(dest) + "/", recursive=True)
            file = None
        else:
            file = path.rstrip("/").rsplit("/", 1)[-1]
            fs.get(path, str(dest / file))
        self.entries[uri] = {"dir": dest.name, "file": file, "files": hashes(dest)}

    def finish(self) -> None:
        body = {"entries": self.entries, "parent": self.parent}
        (self.root / MANIFEST).write_text(json.dumps(body, indent=1, sort_keys=True) + "\n")
        (self.root / COMPLETE).write_text(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        for uri, entry in self.entries.items():  # just hashed: this process reads them as is
            folder = self.root / entry["dir"]
            mark_verified(self.root, uri, folder / entry["file"] if entry["file"] else folder)


def data_sources(spec) -> list:
    ds = spec.dataset
    every = (*ds.train_sources(), ds.validation, ds.test)
    return [s for s in every if s is not None and remote(s.uri)]


def teacher_uri(spec) -> Optional[str]:
    """A distill job's teacher, when it is a folder in object storage."""
    if getattr(spec.method.objective, "value", spec.method.objective) != "distill":
        return None
    teacher = getattr(spec.method.distill, "teacher", None)
    uri = teacher.uri if teacher is not None else None
    return uri if remote(uri) else None


def stage_job(config, environ=None, log=print) -> Optional[Path]:
    """The job's model, parent and data in the stage folder; None (nothing done)
    without one (KUBETUNE_STAGE_DIR unset: no staging claim)."""
    root = stage_dir(environ)
    if root is None:
        return None
    t0 = time.monotonic()
    spec = config.spec
    stager = Stager(root)
    stager.start()
    if remote(spec.model.uri):
        stager.add(spec.model.uri, spec.model, "MODEL", environ)
    if config.parent is not None:
        # where the workers' parent.resolve would look, found once, here
        target, record_uri = P.locate(config, environ)
        if remote(target):
            stager.add(target, spec.model, "MODEL", environ)
        record = None
        if record_uri:
            record = P.read_json_uri(record_uri, spec.model, environ)
        stager.parent = {"target": target, "record": record_uri, "runRecord": record}
    teacher = teacher_uri(spec)
    if getattr(config, "teacher", None) is not None:  # teacher.fromJob: the model it saved
        teacher = P.locate_teacher(config, environ)
        teacher = teacher if remote(teacher) else None
    if teacher:
        stager.add(teacher, spec.model, "MODEL", environ)  # with spec.model's access
    for source in data_sources(spec):
        stager.add(source.uri, spec.dataset, "DATASET", environ)
    stager.finish()
    files = sum(len(e["files"]) for e in stager.entries.values())
    log(
        f"kubetune: staged {len(stager.entries)} source(s), {files} file(s) in {root} "
        f"in {time.monotonic() - t0:.1f}s"
    )
    return root
