"""Checkpoints of one job: save (every rank its shards, rank 0 the commit) and
resume from the newest committed one.

A checkpoint is `checkpoints/step-N/` holding DeepSpeed's files (trainable
weights, optimizer and scheduler state per rank), `rng_state_R.pt` per rank,
`trainer_state.json` (step, data position, early-stopping state, first eval
loss), `config.json` (the trainer config that made it) and, for adapters,
`adapter/`. It counts only once `manifest.json` is written, last, by rank 0;
the manifest records every file's size and sha256 (each rank hashes its own
files before uploading them).

Resume trusts no file unchecked: rank 0 verifies the newest committed
checkpoint (sizes from one listing, then sha256 of the copy it downloads to
load anyway). One that fails is moved aside to checkpoints/quarantine/ and the
next newest is tried; with none intact the job starts from scratch. Every
rank then loads the one rank 0 picked. `skipped` says what was passed over and
why (progress.json and the first metrics row carry it).
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

from kubetune_api import storage as contract
from kubetune_api.storage import FileDigest

from .model import TRAINED_ADAPTER
from .storage import BackgroundWriter, JobStorage, now
from .worker import Worker

TAG = "ds"  # DeepSpeed's tag inside every checkpoint folder


REASON_MAX = 1000  # a reason goes into progress.json and the FineTuneJob's status
HASH_THREADS = 4


def local_digests(local: Path, names: Optional[list[str]] = None) -> dict[str, FileDigest]:
    """Size and sha256 of the files under a local checkpoint folder (all of them,
    or `names`), by path. Files are hashed side by side: hashlib lets go of the
    GIL, so a folder of shards takes the time of its biggest file, not the sum."""
    if names is None:
        names = [p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()]

    def one(name: str) -> FileDigest:
        with (local / name).open("rb") as f:
            return contract.file_digest(f)

    with ThreadPoolExecutor(max_workers=min(HASH_THREADS, len(names) or 1)) as pool:
        return dict(zip(names, pool.map(one, names), strict=True))


def merge_digests(per_rank: list[dict[str, FileDigest]]) -> dict[str, FileDigest]:
    """One digest per path. Two ranks that wrote the same path with different
    bytes leave no telling which upload won: that path goes unverified."""
    merged: dict[str, FileDigest] = {}
    clash: set[str] = set()
    for digests in per_rank:
        for name, d in digests.items():
            if merged.setdefault(name, d) != d:
                clash.add(name)
    return {k: v for k, v in merged.items() if k not in clash}


def verify_local(manifest: contract.CheckpointManifest, local: Path) -> Optional[str]:
    """verify_manifest on a downloaded copy: sizes and sha256 of every file."""
    sizes = {
        p.relative_to(local).as_posix(): p.stat().st_size for p in local.rglob("*") if p.is_file()
    }
    reason = contract.verify_manifest(manifest, sizes)  # missing or cut: no need to hash
    if reason is not None:
        return reason
    recorded = [n for n in manifest.files if n in (manifest.digests or {})]
    return contract.verify_manifest(manifest, sizes, local_digests(local, recorded).__getitem__)


def save_adapter(worker: Worker, path: Path) -> None:
    """Every rank takes part (ZeRO-3 gathers the sharded LoRA weights); rank 0 writes.
    Only the trained adapter: a frozen reference adapter beside it
    (objectives.reference) is the parent's and is loaded from there again."""
    module = worker.engine.module
    trainable = [p for p in module.parameters() if p.requires_grad]
    names = list(getattr(module, "peft_config", {}))
    only = {"selected_adapters": [TRAINED_ADAPTER]} if len(names) > 1 else {}
    with worker.gathered(trainable):
        if worker.rank == 0:
            module.save_pretrained(str(path), safe_serialization=True, **only)


class Checkpoints:
    def __init__(
        self,
        worker: Worker,
        storage: JobStorage,
        writer: BackgroundWriter,
        tmp: Path,
        keep_last: int,
        adapter: bool,
        log: Callable[[str], None],
    ):
        self.worker, self.storage, self.writer, self.tmp = worker, storage, writer, tmp
        self.keep_last, self.adapter, self.log = keep_last, adapter, log
        self.last: Optional[contract.CheckpointPointer] = None
        self.skipped: list[contract.SkippedCheckpoint] = []  # rank 0's, by resume()

    def pick(self) -> Optional[int]:
        """Rank 0: the newest committed checkpoint that passes verification,
        downloaded to tmp/resume-N; the ones that fail are moved aside."""
        storage = self.storage
        committed = storage.committed_checkpoints()
        storage.clear_uncommitted(committed)  # half-written: never loaded
        for step in reversed(committed):
            rel = storage.checkpoint_rel(step)
            local = self.tmp / f"resume-{step}"
            manifest = storage.read_manifest(step)
            if manifest is None:
                reason = f"{contract.MANIFEST}: not a checkpoint manifest"
            else:  # a listing first: a missing or cut file costs no download
                reason = contract.verify_manifest(manifest, storage.stored_sizes(rel))
            if reason is None:
                storage.download_dir(rel, local)
                reason = verify_local(manifest, local)
            if reason is None:
                return step
            shutil.rmtree(local, ignore_errors=True)
            skipped = contract.SkippedCheckpoint(step=step, reason=reason[:REASON_MAX])
            try:
                skipped.moved_to = storage.quarantine(skipped)
                where = f"moved to {skipped.moved_to}"
            except Exception as exc:  # noqa: BLE001  (skipped all the same; saving that step again replaces it)
                where = f"left in place, moving it failed: {type(exc).__name__}: {exc}"
            self.skipped.append(skipped)
            self.log(
                f"checkpoint step {step} failed verification ({skipped.reason}); "
                f"{where}; trying the next newest"
            )
        return None

    def resume(self, state: dict) -> Optional[int]:
        """Load the newest intact committed checkpoint into the engine and `state`;
        its step, or None when there is none (then training starts from scratch).
        Rank 0 picks it (dropping half-written ones, moving damaged ones aside)."""
        import torch

        w = self.worker
        picked = self.pick() if w.rank == 0 else None
        step = w.gather(picked)[0]  # every rank loads what rank 0 picked
        skipped = ", ".join(str(s.step) for s in self.skipped)
        if step is None:
            if skipped:
                self.log(
                    f"no intact committed checkpoint (skipped step(s) {skipped}): "
                    "starting from scratch"
                )
            return None
        rel = self.storage.checkpoint_rel(step)
        local = self.tmp / f"resume-{step}"
        if w.rank != 0:
            self.storage.download_dir(rel, local)
        w.engine.load_checkpoint(str(local), tag=TAG, load_module_strict=False)
        saved_state = json.loads((local / "trainer_state.json").read_text())
        state.update(saved_state)
        rng = local / f"rng_state_{w.rank}.pt"
        if rng.exists() and saved_state.get("world_size") == w.world:
            saved = torch.load(rng, weights_only=False)
            torch.set_rng_state(saved["torch"])
            random.setstate(saved["python"])
            if w.use_gpu and saved.get("cuda") is not None:
                torch.cuda.set_rng_state(saved["cuda"])
        self.last = contract.CheckpointPointer(step=step, uri=self.storage.uri(rel))
        shutil.rmtree(local, ignore_errors=True)
        also = f"; skipped damaged step(s) {skipped}" if skipped else ""
        self.log(f"resumed from committed checkpoint step {step} ({self.last.uri}){also}")
        return step

    def save(self, state: dict, trainer_state: dict, config: dict, epoch: float) -> None:
        """Every rank: its shards and RNG state; rank 0: trainer_state.json, config.json
        and, once every rank's files are stored, the manifest (the commit)."""
        import torch

        w = self.worker
        step = state["step"]
        rel = self.storage.checkpoint_rel(step)
        local = self.tmp / f"ckpt-{step}"
        w.engine.save_checkpoint(str(local), tag=TAG, exclude_frozen_parameters=True)
        (local / "latest").unlink(missing_ok=True)
        torch.save(
            {
                "torch": torch.get_rng_state(),
                "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state() if w.use_gpu else None,
            },
            local / f"rng_state_{w.rank}.pt",
        )
        if self.adapter:
            save_adapter(w, local / "adapter")
        if w.rank == 0:
            (local / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
            (local / "config.json").write_text(json.dumps(config, indent=2))
        # hashed while it uploads (just written: read back from the page cache)
        with ThreadPoolExecutor(max_workers=1) as hashing:
            digests_of = hashing.submit(local_digests, local)
            files = self.storage.upload_dir(local, rel)
            digests = digests_of.result()
        shutil.rmtree(local, ignore_errors=True)
        all_files = w.gather((files, digests))
        if w.rank == 0:
            self.writer.flush()  # metrics up to this step are stored before the commit
            manifest = contract.CheckpointManifest(
                step=step,
                attempt=self.storage.attempt,
                epoch=round(epoch, 4),
                files=sorted({f for fs, _ in all_files for f in fs}),
                digests=merge_digests([d for _, d in all_files]),
                eval_loss=state["last_eval_loss"],
                train_loss=state["train_loss"],
                world_size=w.world,
                zero_stage=w.stage,
                created_at=now(),
            )
            self.storage.commit_checkpoint(rel, manifest)  # refused once a newer attempt owns it
            self.last = contract.CheckpointPointer(step=step, uri=self.storage.uri(rel))
            for old in self.storage.committed_checkpoints()[: -self.keep_last]:
                self.storage.delete(self.storage.checkpoint_rel(old))
            self.log(f"checkpoint step {step} committed")
        w.barrier()
