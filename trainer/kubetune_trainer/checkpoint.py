"""Checkpoints of one job: save (every rank its shards, rank 0 the commit) and
resume from the newest committed one.

A checkpoint is `checkpoints/step-N/` holding DeepSpeed's files (trainable
weights, optimizer and scheduler state per rank), `rng_state_R.pt` per rank,
`trainer_state.json` (step, data position, early-stopping state, first eval
loss), `config.json` (the trainer config that made it) and, for adapters,
`adapter/`. It counts only once `manifest.json` is written, last, by rank 0.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Optional

from kubetune_api import storage as contract

from .storage import BackgroundWriter, JobStorage, now
from .worker import Worker

TAG = "ds"  # DeepSpeed's tag inside every checkpoint folder


def save_adapter(worker: Worker, path: Path) -> None:
    """Every rank takes part (ZeRO-3 gathers the sharded LoRA weights); rank 0 writes."""
    module = worker.engine.module
    trainable = [p for p in module.parameters() if p.requires_grad]
    with worker.gathered(trainable):
        if worker.rank == 0:
            module.save_pretrained(str(path), safe_serialization=True)


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

    def resume(self, state: dict) -> Optional[int]:
        """Load the newest committed checkpoint into the engine and `state`; its step,
        or None when there is none. Rank 0 also drops half-written ones."""
        import torch

        w = self.worker
        committed = self.storage.committed_checkpoints()
        if w.rank == 0:
            self.storage.clear_uncommitted(committed)  # half-written: never loaded
        w.barrier()
        if not committed:
            return None
        step = committed[-1]
        rel = self.storage.checkpoint_rel(step)
        local = self.tmp / f"resume-{step}"
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
        self.log(f"resumed from committed checkpoint step {step} ({self.last.uri})")
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
        files = self.storage.upload_dir(local, rel)
        shutil.rmtree(local, ignore_errors=True)
        all_files = w.gather(files)
        if w.rank == 0:
            self.writer.flush()  # metrics up to this step are stored before the commit
            manifest = contract.CheckpointManifest(
                step=step,
                attempt=self.storage.attempt,
                epoch=round(epoch, 4),
                files=sorted({f for fs in all_files for f in fs}),
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
