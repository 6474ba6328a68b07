"""The fine-tuning recipe that runs in every Ray Train worker.

One readable file with a fixed shape (torchtune's): setup model, setup data,
setup optimizer and DeepSpeed engine, resume, train (log, evaluate, stop early,
checkpoint), save the final artifacts. Rank 0 writes the job's records; every
rank writes its own DeepSpeed shards.

A checkpoint is `checkpoints/step-N/` holding DeepSpeed's files (trainable
weights, optimizer and scheduler state per rank), `rng_state_R.pt` per rank,
`trainer_state.json` (step, data position, early-stopping state, first eval
loss), `config.json` (the trainer config that made it) and, for adapters,
`adapter/`. It counts only once `manifest.json` is written, last, by rank 0.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional

from kubetune_api import load_trainer_config
from kubetune_api import storage as contract

from . import data as D
from . import export
from . import lineage as L
from . import model as M
from . import parent as P
from . import preference as PF
from . import tracking as T
from .storage import BackgroundWriter, JobStorage, now

TAG = "ds"  # DeepSpeed's tag inside every checkpoint folder
HALT = "halt.json"  # see Recipe.halt_requested


def lr_lambda(kind: str, warmup: int, total: int):
    def f(step: int) -> float:
        if kind != "constant" and step < warmup:
            return (step + 1) / (warmup + 1)
        if kind in ("constant", "constant_with_warmup"):
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


class Recipe:
    def __init__(self, loop_config: dict):
        import ray.train
        import torch

        self.cfg = load_trainer_config(loop_config["trainer_config"])
        self.spec = self.cfg.spec
        self.hp = self.spec.hyperparameters
        torch.set_num_threads(max(1, int(loop_config.get("threads", 1))))
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.use_gpu = self.spec.resources.gpus_per_worker > 0 and torch.cuda.is_available()
        self.storage = JobStorage(self.cfg.storage_prefix, self.spec.output)
        self.writer = BackgroundWriter()  # rank 0's progress and metrics, off the step
        # Checkpoints are staged here before upload: in a pod, the scratch volume
        # the operator mounts (sized by spec.resources.scratchPerWorker).
        scratch = os.environ.get("KUBETUNE_SCRATCH_DIR") or None
        self.tmp = Path(tempfile.mkdtemp(prefix=f"kubetune-rank{self.rank}-", dir=scratch))
        self.log(f"staging checkpoints in {self.tmp}")
        self.t_start = time.monotonic()
        self.metrics: list[dict] = []
        # The committed step this attempt continued from (None: started fresh);
        # recorded in progress.json and on the first metrics row after it.
        self.resumed_from: Optional[int] = None
        self.state = {
            "step": 0,
            "best": None,
            "bad_evals": 0,
            "initial_eval_loss": None,
            "last_eval_loss": None,
            "train_loss": None,
            "tokens": 0,
            "stopped_early": False,
        }
        self.last_ckpt: Optional[contract.CheckpointPointer] = None
        self.halted = False  # a sweep stopped this trial: no outputs
        self.notice: Optional[str] = None
        self.parent: Optional[P.Parent] = None
        self.run_record: Optional[contract.RunRecord] = None
        self.tracker: Optional[T.MlflowTracker] = None

    # ------------------------------------------------------------------ helpers
    def log(self, msg: str) -> None:
        if self.rank == 0:
            print(f"kubetune: {msg}", flush=True)

    def allreduce(self, values: list[float]) -> list[float]:
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64)
        if self.use_gpu:
            t = t.cuda()
        if dist.is_initialized() and self.world > 1:
            dist.all_reduce(t)
        return t.cpu().tolist()

    def barrier(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized() and self.world > 1:
            dist.barrier()

    def progress(self, phase: contract.TrainPhase, message: Optional[str] = None) -> None:
        if self.rank != 0:
            return
        step, total = self.state["step"], self.total_steps
        done_now = step - self.start_step
        elapsed = time.monotonic() - self.t_train
        eta = int(elapsed / done_now * (total - step)) if done_now > 0 else None
        record = contract.ProgressRecord(
            phase=phase,
            step=step,
            total_steps=total,
            epoch=round(step / self.steps_per_epoch, 4),
            percent=round(100.0 * step / total, 2),
            eta_seconds=eta,
            tokens_per_second=self.tokens_per_second,
            last_checkpoint=self.last_ckpt,
            resumed_from=self.resumed_from,
            attempt=self.cfg.attempt,
            message=message or self.notice,
            updated_at=now(),
        )
        self.writer.submit(contract.PROGRESS, lambda: self.storage.write_progress(record))

    def write_metrics(self) -> None:
        rows = list(self.metrics)  # a snapshot: the list grows while the writer works
        self.writer.submit(contract.METRICS, lambda: self.storage.write_metrics(rows))
        if self.tracker is not None:
            self.tracker.log_rows(rows)

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        import deepspeed
        import torch
        from transformers import set_seed

        set_seed(self.hp.seed)  # the same adapter init on every rank and every attempt
        self.model_path = M.resolve_model_path(self.spec.model)
        self.parent = P.resolve(self.cfg)
        self.tokenizer = M.load_tokenizer(self.spec, self.model_path)
        self.setup_data()
        self.setup_records()
        model = M.load_model(self.spec, self.model_path, self.use_gpu, self.parent)
        self.head = M.LabelledHead(model)
        total_params, trainable = M.count_parameters(model)
        gpu_mem = torch.cuda.get_device_properties(0).total_memory if self.use_gpu else None
        self.stage, why = M.pick_zero_stage(self.spec, total_params, gpu_mem, self.world)
        # also progress.json's message while training: worker logs may not reach a console
        self.notice = (
            f"model {total_params / 1e6:.1f}M parameters, {trainable / 1e6:.2f}M trainable; "
            f"ZeRO stage {self.stage} ({why}); {self.world} worker(s), "
            f"{'GPU' if self.use_gpu else 'CPU'}"
        )
        self.log(self.notice)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params, lr=self.hp.learning_rate, weight_decay=self.hp.weight_decay
        )
        warmup = math.ceil(self.hp.warmup_ratio * self.total_steps)
        schedule = lr_lambda(self.hp.lr_scheduler, warmup, self.total_steps)
        ds_config = M.deepspeed_config(self.spec, self.stage, self.use_gpu)
        if not self.use_gpu and os.environ.get("KUBETUNE_DEEPSPEED_SHM") != "1":
            # On CPU DeepSpeed compiles a shared-memory all-reduce at init (needs
            # g++, ~1 min cold). gloo does the job; skip the build.
            # (importlib: the attribute deepspeed.comm.torch is PyTorch itself)
            import importlib

            ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
            if hasattr(ds_torch_comm, "build_shm_op"):
                ds_torch_comm.build_shm_op = lambda: None
        self.engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            config=ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
            dist_init_required=False,
        )
        self.device = self.engine.device
        set_seed(self.hp.seed + self.rank)  # dropout differs per rank; resume restores it

    def setup_data(self) -> None:
        ds, hp = self.spec.dataset, self.hp
        prepared = D.prepare(self.spec, self.tokenizer)
        self.log(prepared.train_report.summary("train"))
        if prepared.val_report:
            self.log(prepared.val_report.summary("validation"))
        if prepared.test_report:
            self.log(prepared.test_report.summary("test"))
        self.prepared = prepared
        self.train_ex, self.val_ex = prepared.train, prepared.val
        self.prepared_reports = (prepared.train_report, prepared.val_report)
        self.test_ex = prepared.test
        self.dpo = None
        if self.spec.method.objective == "dpo":
            from .dpo import Dpo

            self.dpo = Dpo(self)
        units = PF.sequences if self.dpo else D.sequences
        self.train_seqs = units(self.train_ex, ds.max_seq_length, ds.packing, hp.seed)
        self.val_seqs = units(self.val_ex, ds.max_seq_length, ds.packing, hp.seed)
        self.test_seqs = units(self.test_ex, ds.max_seq_length, ds.packing, hp.seed)
        per_micro = hp.batch_size * self.world
        self.micro_per_epoch = max(1, len(self.train_seqs) // per_micro)
        self.steps_per_epoch = max(1, self.micro_per_epoch // hp.gradient_accumulation_steps)
        self.total_steps = hp.max_steps or math.ceil((hp.epochs or 1.0) * self.steps_per_epoch)
        self.eval_enabled = self.spec.evaluation.enabled and bool(self.val_ex)
        self.tokens_per_second = None
        self.start_step = 0
        self.t_train = time.monotonic()

    def setup_records(self) -> None:
        """Rank 0: run.json (lineage) and the MLflow run, before the first step."""
        if self.rank != 0:
            return
        self.run_record = L.run_record(
            self.cfg,
            self.model_path,
            self.prepared_reports[0],
            self.prepared_reports[1],
            self.parent.lineage() if self.parent else None,
        )
        P.check_base(self.parent, self.run_record.base_model)
        record = self.run_record
        self.writer.submit(
            contract.RUN_RECORD, lambda: self.storage.write_record(contract.RUN_RECORD, record)
        )
        if self.parent is not None:
            how = "merged into the base" if self.parent.merge else "continued"
            self.log(f"starting from the parent {self.parent.kind} {self.parent.uri} ({how})")
        self.tracker = T.start_for_job(self.cfg, self.storage, record, self.log)

    def micro_batch(self, m: int) -> tuple[dict, int]:
        """Micro-batch number m (counted from the start of training) of this rank:
        the data position is a function of the step, so resuming needs no state."""
        hp = self.hp
        accum = hp.gradient_accumulation_steps
        epoch, k = divmod(m, self.steps_per_epoch * accum)
        if not hasattr(self, "_order") or self._order[0] != epoch:
            self._order = (epoch, D.epoch_order(len(self.train_seqs), hp.seed, epoch))
        order = self._order[1]
        n = len(order)
        base = k * hp.batch_size * self.world + self.rank * hp.batch_size
        seqs = [self.train_seqs[order[(base + j) % n]] for j in range(hp.batch_size)]
        collate = PF.collate if self.dpo else D.collate
        batch = collate(self.train_ex, seqs, self.tokenizer.pad_token_id, self.spec.dataset.packing)
        tokens = sum(len(self.train_ex[i].input_ids) for s in seqs for i in s)
        return {k2: v.to(self.device) for k2, v in batch.items()}, tokens

    # ------------------------------------------------------------------ resume
    def resume(self) -> None:
        import torch

        committed = self.storage.committed_checkpoints()
        if self.rank == 0:
            self.storage.clear_uncommitted(committed)  # half-written: never loaded
            self.metrics = [
                r
                for r in self.storage.read_metrics()
                if not committed or r["step"] <= committed[-1]
            ]
        self.barrier()
        if not committed:
            return
        step = committed[-1]
        rel = self.storage.checkpoint_rel(step)
        local = self.tmp / f"resume-{step}"
        self.storage.download_dir(rel, local)
        self.engine.load_checkpoint(str(local), tag=TAG, load_module_strict=False)
        state = json.loads((local / "trainer_state.json").read_text())
        self.state.update(state)
        rng = local / f"rng_state_{self.rank}.pt"
        if rng.exists() and state.get("world_size") == self.world:
            saved = torch.load(rng, weights_only=False)
            torch.set_rng_state(saved["torch"])
            random.setstate(saved["python"])
            if self.use_gpu and saved.get("cuda") is not None:
                torch.cuda.set_rng_state(saved["cuda"])
        self.start_step = self.resumed_from = step
        self.last_ckpt = contract.CheckpointPointer(step=step, uri=self.storage.uri(rel))
        shutil.rmtree(local, ignore_errors=True)
        self.log(f"resumed from committed checkpoint step {step} ({self.last_ckpt.uri})")

    # ------------------------------------------------------------------ evaluate
    def evaluate(self, examples=None, seqs=None, split: str = "validation") -> dict:
        import torch
        import torch.nn.functional as F

        if examples is None:
            examples, seqs = self.val_ex, self.val_seqs
        if self.dpo:
            return self.dpo.evaluate(examples, seqs, split)
        bs = self.hp.batch_size
        n = math.ceil(len(seqs) / bs)
        if self.spec.evaluation.max_batches:
            n = min(n, self.spec.evaluation.max_batches)
        per_rank = math.ceil(n / self.world)
        self.engine.eval()
        loss_sum = correct = count = 0.0
        with torch.no_grad():
            for j in range(per_rank):
                b = j * self.world + self.rank
                weight = 1.0 if b < n else 0.0  # ZeRO-3: every rank runs the same forwards
                part = seqs[(b % n) * bs : (b % n) * bs + bs]
                batch = D.collate(
                    examples, part, self.tokenizer.pad_token_id, self.spec.dataset.packing
                )
                batch = {k: v.to(self.device) for k, v in batch.items()}
                logits, target = self.head.logits(self.engine, batch)
                loss_sum += weight * F.cross_entropy(logits, target, reduction="sum").item()
                correct += weight * (logits.argmax(-1) == target).sum().item()
                count += weight * target.numel()
        self.engine.train()
        loss_sum, correct, count = self.allreduce([loss_sum, correct, count])
        loss = loss_sum / max(count, 1)
        return {
            "eval_loss": loss,
            "eval_perplexity": math.exp(min(loss, 50)),
            "eval_token_accuracy": correct / max(count, 1),
        }

    # ------------------------------------------------------------------ checkpoint
    def save_checkpoint(self) -> None:
        import torch

        step = self.state["step"]
        rel = self.storage.checkpoint_rel(step)
        self.progress(contract.TrainPhase.saving)
        local = self.tmp / f"ckpt-{step}"
        self.engine.save_checkpoint(str(local), tag=TAG, exclude_frozen_parameters=True)
        (local / "latest").unlink(missing_ok=True)
        torch.save(
            {
                "torch": torch.get_rng_state(),
                "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state() if self.use_gpu else None,
            },
            local / f"rng_state_{self.rank}.pt",
        )
        if self.spec.method.type != "full":
            self.save_adapter(local / "adapter")
        if self.rank == 0:
            state = {
                **self.state,
                "world_size": self.world,
                "total_steps": self.total_steps,
                "epoch": step / self.steps_per_epoch,
            }
            (local / "trainer_state.json").write_text(json.dumps(state, indent=2))
            (local / "config.json").write_text(json.dumps(self.cfg.to_dict(), indent=2))
        files = self.storage.upload_dir(local, rel)
        shutil.rmtree(local, ignore_errors=True)
        all_files = self.gather(files)
        if self.rank == 0:
            self.writer.flush()  # metrics up to this step are stored before the commit
            manifest = contract.CheckpointManifest(
                step=step,
                epoch=round(step / self.steps_per_epoch, 4),
                files=sorted({f for fs in all_files for f in fs}),
                eval_loss=self.state["last_eval_loss"],
                train_loss=self.state["train_loss"],
                world_size=self.world,
                zero_stage=self.stage,
                created_at=now(),
            )
            self.storage.write_record(f"{rel}/{contract.MANIFEST}", manifest)  # commit
            self.last_ckpt = contract.CheckpointPointer(step=step, uri=self.storage.uri(rel))
            for old in self.storage.committed_checkpoints()[: -self.spec.checkpointing.keep_last]:
                self.storage.delete(self.storage.checkpoint_rel(old))
            self.log(f"checkpoint step {step} committed")
        self.barrier()

    def gather(self, obj) -> list:
        import torch.distributed as dist

        if not (dist.is_initialized() and self.world > 1):
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def _gathered(self, params):
        import contextlib

        if self.stage == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        return contextlib.nullcontext()

    def save_adapter(self, path: Path) -> None:
        """Every rank takes part (ZeRO-3 gathers the sharded LoRA weights); rank 0 writes."""
        module = self.engine.module
        trainable = [p for p in module.parameters() if p.requires_grad]
        with self._gathered(trainable):
            if self.rank == 0:
                module.save_pretrained(str(path), safe_serialization=True)

    def save_full_model(self, path: Path) -> None:
        module = self.engine.module
        with self._gathered(list(module.parameters())):
            if self.rank == 0:
                module.save_pretrained(str(path), safe_serialization=True)
                self.tokenizer.save_pretrained(str(path))
                export.make_portable(path)

    # ------------------------------------------------------------------ train
    def train(self) -> None:
        hp, ev = self.hp, self.spec.evaluation
        accum = hp.gradient_accumulation_steps
        eval_every = ev.every_steps or self.spec.checkpointing.every_steps
        if self.dpo:
            from .dpo import reference_splits

            self.dpo.prepare_reference(reference_splits(self))
        if (
            self.eval_enabled
            and self.state["step"] == 0
            and self.state["initial_eval_loss"] is None
        ):
            self.progress(contract.TrainPhase.evaluating, "evaluating the base model")
            first = self.evaluate()
            self.state["initial_eval_loss"] = first["eval_loss"]
            self.log(f"held-out loss before training: {first['eval_loss']:.4f}")
            if self.rank == 0:
                self.metrics.append({"step": 0, "epoch": 0.0, **first, "time": now()})
        self.t_train = time.monotonic()
        self.progress(contract.TrainPhase.training)
        # the loss stays on the device until a log step: no sync per micro-batch
        loss_sum, n_losses, tokens, t_log = 0.0, 0, 0, time.monotonic()
        self.engine.train()
        while self.state["step"] < self.total_steps:
            step = self.state["step"]
            for a in range(accum):
                batch, n_tok = self.micro_batch(step * accum + a)
                loss = self.dpo.loss(batch) if self.dpo else self.head.loss(self.engine, batch)
                self.engine.backward(loss)
                self.engine.step()
                loss_sum, n_losses = loss_sum + loss.detach(), n_losses + 1
                tokens += n_tok
            step = self.state["step"] = step + 1
            last = step == self.total_steps
            row = None
            if step % hp.log_every_steps == 0 or last:
                total, n, tok = self.allreduce([float(loss_sum), n_losses, tokens])
                elapsed = time.monotonic() - t_log
                self.tokens_per_second = round(tok / max(elapsed, 1e-9), 1)
                self.state["tokens"] += int(tok)
                self.state["train_loss"] = total / n
                gn = self.engine.get_global_grad_norm()
                row = {
                    "step": step,
                    "epoch": round(step / self.steps_per_epoch, 4),
                    "loss": total / n,
                    "learning_rate": self.engine.get_lr()[0],
                    "grad_norm": float(gn) if gn is not None else None,
                    "tokens_per_second": self.tokens_per_second,
                    "tokens": self.state["tokens"],
                    "time": now(),
                }
                if self.dpo:
                    row.update(self.dpo.pop_metrics())
                loss_sum, n_losses, tokens, t_log = 0.0, 0, 0, time.monotonic()
            if self.eval_enabled and (step % eval_every == 0 or last):
                self.progress(contract.TrainPhase.evaluating)
                t_eval = time.monotonic()
                result = self.evaluate()
                t_log += time.monotonic() - t_eval  # evaluation is not training time
                self.state["last_eval_loss"] = result["eval_loss"]
                row = {
                    **(
                        row
                        or {
                            "step": step,
                            "epoch": round(step / self.steps_per_epoch, 4),
                            "time": now(),
                        }
                    ),
                    **result,
                }
                self.log(f"step {step}: eval loss {result['eval_loss']:.4f}")
                self.early_stopping(result)
            if row is not None and self.rank == 0:
                if self.resumed_from is not None and all(
                    r.get("resumed_from") != self.resumed_from for r in self.metrics
                ):
                    row["resumed_from"] = self.resumed_from
                self.metrics.append(row)
                self.write_metrics()
                reward = (
                    f" reward acc {row['reward_accuracy']:.2f} margin {row['reward_margin']:.3f}"
                    if row.get("reward_accuracy") is not None
                    else ""
                )
                self.log(
                    f"step {step}/{self.total_steps} loss {row.get('loss', float('nan')):.4f}"
                    f"{reward} lr {row.get('learning_rate') or 0:.2e} "
                    f"tok/s {self.tokens_per_second}"
                )
            if row is not None and not last and self.halt_requested():
                self.halted = True
                self.log(f"stopped by the sweep at step {step}: its metric trails the others'")
                break
            stop = self.state["stopped_early"]
            if step % self.spec.checkpointing.every_steps == 0 or last or stop:
                self.save_checkpoint()
            if row is not None:
                self.progress(contract.TrainPhase.training)
            if stop:
                self.log(f"early stopping at step {step}")
                break

    def halt_requested(self) -> bool:
        """A sweep's scheduler asks a trial to stop by writing HALT under its prefix
        (kubetune_trainer.sweep); every rank agrees on the answer at the same step."""
        seen = 0.0
        if self.rank == 0:
            seen = float(self.storage.read_json(HALT) is not None)
        return self.allreduce([seen])[0] > 0

    def early_stopping(self, result: dict) -> None:
        es = self.spec.early_stopping
        if not es.enabled:
            return
        value = result[es.metric]
        best = self.state["best"]
        better = best is None or (
            value < best - es.min_delta if es.mode == "min" else value > best + es.min_delta
        )
        if better:
            self.state["best"], self.state["bad_evals"] = value, 0
        else:
            self.state["bad_evals"] += 1
            if self.state["bad_evals"] >= es.patience:
                self.state["stopped_early"] = True

    # ------------------------------------------------------------------ finish
    def finish(self) -> None:
        # every rank takes part (ZeRO-3); reported once, never used for stopping
        test = self.evaluate(self.test_ex, self.test_seqs, "test") if self.test_ex else None
        if test:
            self.log("test: " + ", ".join(f"{k} {v:.4f}" for k, v in test.items()))
        outputs = contract.OutputsRecord(
            metrics=self.storage.uri(contract.METRICS),
            final_checkpoint=self.last_ckpt,
            initial_eval_loss=self.state["initial_eval_loss"],
            final_eval_loss=self.state["last_eval_loss"],
            final_train_loss=self.state["train_loss"],
            steps=self.state["step"],
            stopped_early=self.state["stopped_early"],
        )
        local = self.tmp / "final"
        artifacts: list[contract.ServableOutput] = []

        def publish(kind: contract.OutputKind, rel: str) -> str:
            self.storage.upload_dir(local / rel, rel)
            uri = self.storage.uri(rel)
            artifacts.append(export.describe(kind.value, uri, self.spec, local / rel))
            return uri

        final_dir = local / (
            contract.FULL_MODEL if self.spec.method.type == "full" else contract.ADAPTER
        )
        if self.spec.method.type == "full":
            self.save_full_model(local / contract.FULL_MODEL)
            if self.rank == 0:
                outputs.model = publish(contract.OutputKind.full, contract.FULL_MODEL)
        else:
            self.save_adapter(local / contract.ADAPTER)
            if self.rank == 0:
                self.tokenizer.save_pretrained(str(local / contract.ADAPTER))
                export.finish_adapter(local / contract.ADAPTER)
                outputs.adapter = publish(contract.OutputKind.adapter, contract.ADAPTER)
                if self.spec.output.merge_adapter:
                    self.progress(contract.TrainPhase.saving, "merging the adapter")
                    parent = self.parent
                    export.merge_adapter(
                        parent.local if parent and parent.kind == "model" else self.model_path,
                        self.spec,
                        local / contract.ADAPTER,
                        local / contract.MERGED,
                        parent.local if parent and parent.merge else None,
                    )
                    outputs.merged_model = publish(contract.OutputKind.merged, contract.MERGED)
        if self.rank == 0:
            if plot_loss(self.metrics, local / contract.LOSS_CURVE):
                self.storage.fs.put_file(
                    str(local / contract.LOSS_CURVE), self.storage.path(contract.LOSS_CURVE)
                )
                outputs.loss_curve = self.storage.uri(contract.LOSS_CURVE)
            from . import generation

            if self.spec.evaluation.generation:
                self.progress(contract.TrainPhase.evaluating, "answering held-out prompts")
            generation.add_outputs(outputs, test, generation.run(self, final_dir, local))
            self.writer.flush()
            sections = {"artifacts": artifacts}
            outputs = contract.outputs_record(outputs, sections)
            self.storage.write_record(contract.OUTPUTS, outputs)
            self.progress(contract.TrainPhase.succeeded)
            loss_png = local / contract.LOSS_CURVE
            T.finish_for_job(
                self.tracker,
                self.storage,
                outputs,
                {
                    contract.LOSS_CURVE: loss_png if loss_png.exists() else None,
                    contract.RUN_RECORD: json.dumps(self.run_record.to_dict(), indent=2).encode(),
                    contract.OUTPUTS: json.dumps(outputs.to_dict(), indent=2).encode(),
                },
            )
            self.tracker = None
        self.barrier()
        shutil.rmtree(self.tmp, ignore_errors=True)


def plot_loss(rows: list[dict], path: Path) -> bool:
    train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
    if not train and not evals:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=False), label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=False), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return True


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train's entry in each worker."""
    recipe = Recipe(loop_config)
    try:
        recipe.setup()
        recipe.resume()
        recipe.train()
        if recipe.halted:
            recipe.writer.flush()
            if recipe.tracker is not None:
                recipe.tracker.close("KILLED")
                recipe.tracker = None
        else:
            recipe.finish()
    except BaseException:
        if recipe.tracker is not None:
            recipe.tracker.close("FAILED")
        raise
    finally:
        # pending records are stored before Ray reports this worker done or failed,
        # so the driver's Failed record is never overwritten by a late one
        recipe.writer.close()
