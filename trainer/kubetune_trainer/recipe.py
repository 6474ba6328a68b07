"""The fine-tuning recipe that runs in every Ray Train worker.

One readable file with a fixed shape (torchtune's): setup (model, data, the
objective, the DeepSpeed engine) -> resume -> train (log, evaluate, stop early,
checkpoint) -> finish (outputs.finish's finishers). Components are passed in:
the objective (kubetune_trainer.objectives) builds the examples, the batches,
the loss and the evaluation, and the recipe never asks which one it runs; the
Worker holds the rank, the collectives and the engine; Checkpoints saves and
resumes. Rank 0 writes the job's records; every rank writes its own DeepSpeed
shards.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional

from kubetune_api import load_trainer_config
from kubetune_api import storage as contract
from kubetune_api.objectives import SUPERVISED_FORMATS
from kubetune_api.sweep_space import mode_for

from . import clean as C
from . import data as D
from . import freeze as F
from . import gguf_export as G
from . import heldout as H
from . import lineage as L
from . import model as M
from . import objectives
from . import outputs as O
from . import parent as P
from . import tracking as T
from .checkpoint import Checkpoints
from .objectives import reference as R
from .stop import StopFiles
from .storage import BackgroundWriter, JobStorage, now
from .worker import Worker


class Recipe:
    def __init__(self, loop_config: dict):
        import ray.train
        import torch

        self.cfg = load_trainer_config(loop_config["trainer_config"])
        self.spec = self.cfg.spec
        self.hp = self.spec.hyperparameters
        torch.set_num_threads(max(1, int(loop_config.get("threads", 1))))
        ctx = ray.train.get_context()
        use_gpu = self.spec.resources.gpus_per_worker > 0 and torch.cuda.is_available()
        self.worker = Worker(ctx.get_world_rank(), ctx.get_world_size(), use_gpu)
        self.rank, self.world = self.worker.rank, self.worker.world
        self.objective = objectives.for_spec(self.spec)
        self.storage = JobStorage(
            self.cfg.storage_prefix, self.spec.output, attempt=self.cfg.attempt
        )
        self.writer = BackgroundWriter()  # rank 0's progress and metrics, off the step
        # Checkpoints are staged here before upload: in a pod, the scratch volume
        # the operator mounts (sized by spec.resources.scratchPerWorker).
        scratch = os.environ.get("KUBETUNE_SCRATCH_DIR") or None
        self.tmp = Path(tempfile.mkdtemp(prefix=f"kubetune-rank{self.rank}-", dir=scratch))
        self.log(f"staging checkpoints in {self.tmp}")
        self.checkpoints = Checkpoints(
            self.worker,
            self.storage,
            self.writer,
            self.tmp,
            self.spec.checkpointing.keep_last,
            adapter=self.spec.method.type != "full",
            log=self.log,
        )
        self.t_start = time.monotonic()
        self.startup: list[contract.StartupPhase] = []
        self.reached("workerStarted")
        self.metrics: list[dict] = []
        # The committed step this attempt continued from (None: started fresh);
        # recorded in progress.json and on the first metrics row after it.
        self.resumed_from: Optional[int] = None
        self.resume_note: dict = {}  # rank 0: what resume() adds to the next metrics row
        self.state = {
            "step": 0,
            "best": None,
            "bad_evals": 0,
            "initial_eval_loss": None,
            "last_eval_loss": None,
            "train_loss": None,
            "tokens": 0,
            "stopped_early": False,
            # evaluation.calibration / .retention on the base model (heldout.before)
            "checks_before": None,
            # dataset.mixture: each source's held-out loss before training and at the
            # latest evaluation
            "initial_eval_loss_per_source": None,
            "last_eval_loss_per_source": None,
        }
        self.halted = False  # a sweep stopped this trial: no outputs
        # Save on stop (kubetune_trainer.stop): a request newer than this rank's
        # start ends training after the step in flight, with a committed checkpoint.
        self.stop_files = StopFiles(loop_config.get("stop_dir"))
        self.save_on_stop = self.spec.checkpointing.save_on_stop
        self.t_created = time.time()
        self.stopped: Optional[int] = None  # the step a stop request ended training at
        self.notice: Optional[str] = None
        self.pruned = None  # kubetune_trainer.prune.PruneReport, with spec.model.prune
        self.freeze: Optional[F.Plan] = None  # spec.method.full: what trains, how fast
        self.parameters: Optional[contract.ParameterCounts] = None
        self.trainable = 0  # parameters the optimizer updates (set by setup)
        self.parent: Optional[P.Parent] = None
        self.reference_copy = None  # objectives.reference.prepare: full fine-tuning, online
        self.run_record: Optional[contract.RunRecord] = None
        self.tracker: Optional[T.MlflowTracker] = None

    # ------------------------------------------------------------------ records
    def log(self, msg: str) -> None:
        if self.rank == 0:
            print(f"kubetune: {msg}", flush=True)

    def reached(self, name: str) -> None:
        """The end of a startup phase (contract.STARTUP_PHASES), on rank 0's clock."""
        if self.rank == 0 and name not in {ph.name for ph in self.startup}:
            seconds = round(time.monotonic() - self.t_start, 3)
            self.startup.append(contract.StartupPhase(name=name, time=now(), seconds=seconds))
            if name != "workerStarted":
                self.log(f"startup: {name} after {seconds:.1f}s")

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
            last_checkpoint=self.checkpoints.last,
            resumed_from=self.resumed_from,
            skipped_checkpoints=self.checkpoints.skipped or None,
            attempt=self.cfg.attempt,
            message=message or self.notice,
            startup=list(self.startup),
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
        import torch
        from transformers import set_seed

        set_seed(self.hp.seed)  # the same adapter init on every rank and every attempt
        self.model_path = M.resolve_model_path(self.spec.model)
        self.parent = P.resolve(self.cfg)
        self.tokenizer = M.load_tokenizer(self.spec, self.model_path)
        self.reached("modelFetched")
        self.setup_data()
        self.setup_records()
        self.reached("dataPrepared")
        pruned: list = []
        model = M.load_model(
            self.spec,
            self.model_path,
            self.worker.use_gpu,
            self.parent,
            on_prune=pruned.append,
            labels=self.labels,
            pad_id=self.tokenizer.pad_token_id,
        )
        self.pruned = pruned[0] if pruned else None
        if self.spec.output.gguf:  # known before training, not after
            why = G.supported(model.config.to_dict())
            if why:
                raise G.ExportError(why)
        self.freeze = F.apply(model, self.spec)  # before DeepSpeed: frozen parts take no state
        total_params, trainable = M.count_parameters(model)
        self.trainable = trainable
        self.parameters = self.parameter_counts(model, total_params, trainable)
        use_gpu = self.worker.use_gpu
        gpu_mem = torch.cuda.get_device_properties(0).total_memory if use_gpu else None
        stage, why = M.pick_zero_stage(
            self.spec, total_params, gpu_mem, self.world, trainable if self.freeze else None
        )
        # the objective's reference model: loaded before DeepSpeed so ZeRO places it
        self.reference_copy = R.prepare(
            model, self.spec.method.type, self.parent, R.use_of(self.objective)
        )
        # also progress.json's message while training: worker logs may not reach a console
        self.notice = (
            f"model {total_params / 1e6:.1f}M parameters, {trainable / 1e6:.2f}M trainable; "
            f"ZeRO stage {stage} ({why}); {self.world} worker(s), "
            f"{'GPU' if use_gpu else 'CPU'}"
        )
        if self.pruned is not None:
            self.notice = f"{self.pruned.line()}; {self.notice}"
        self.reached("modelLoaded")
        self.log(self.notice)
        if self.freeze is not None or self.parameters.adapter_layers is not None:
            self.log(F.summary_line(self.parameters.to_dict()))
        ds_config = M.deepspeed_config(self.spec, stage, use_gpu)
        per_step = self.objective.updates_per_step
        updates = self.total_steps * per_step  # the schedule's steps
        groups = self.freeze.optimizer_groups(per_step) if self.freeze else None
        self.worker.init_engine(model, ds_config, stage, self.hp, updates, groups)
        self.reached("engineReady")
        set_seed(self.hp.seed + self.rank)  # dropout differs per rank; resume restores it

    def parameter_counts(self, model, total: int, trainable: int) -> contract.ParameterCounts:
        """outputs.json's `parameters`: the counts, and what method.full or
        method.lora.layers chose."""
        if self.freeze is not None:
            return self.freeze.record()
        lora = self.spec.method.lora
        # a parent's adapter that continues keeps its own layers
        continued = (
            self.parent is not None and self.parent.kind == "adapter" and not self.parent.merge
        )
        chose = lora is not None and lora.layers is not None and self.spec.method.type != "full"
        adapter_layers = list(lora.layers) if chose and not continued else None
        return contract.ParameterCounts(
            total=total,
            trainable=trainable,
            layers=getattr(model.config, "num_hidden_layers", None),
            adapter_layers=adapter_layers,
        )

    def trainable_at(self, step: int) -> int:
        """Parameters the optimizer step `step` (0-based) updated."""
        return self.freeze.trainable_at(step) if self.freeze is not None else self.trainable

    def setup_data(self) -> None:
        ds, hp, obj = self.spec.dataset, self.hp, self.objective
        prepared = D.prepare(self.spec, self.tokenizer, build=obj.build_examples)
        self.log(prepared.train_report.summary("train"))
        if prepared.val_report:
            self.log(prepared.val_report.summary("validation"))
        if prepared.test_report:
            self.log(prepared.test_report.summary("test"))
        if prepared.clean is not None and self.rank == 0:
            report = prepared.clean  # counts in the log; rows and masked values in clean.json
            for line in C.summary(report):
                self.log(f"dataset.clean ({report['action']}): {line}")
            self.writer.submit(
                contract.CLEAN, lambda: self.storage.write_json(contract.CLEAN, report)
            )
        self.prepared = prepared
        # method.task classification: the labels in id order, as the data gave them
        self.labels = getattr(obj, "labels", None)
        self.sources = prepared.sources  # dataset.mixture's (empty: one source)
        for line in D.describe_mixture(self.sources):
            self.log(f"dataset.mixture: {line}")
        self.splits: objectives.Splits = {}
        # dataset.mixture: each source's range of units, per split
        self.source_spans: dict[str, list] = {}
        for name, examples in (
            ("train", prepared.train),
            ("validation", prepared.val),
            ("test", prepared.test),
        ):
            if examples or name == "train":
                if self.sources and name != "test":
                    spans = [s.train if name == "train" else s.val for s in self.sources]
                    units, self.source_spans[name] = D.source_units(
                        obj.units, examples, spans, ds.max_seq_length, ds.packing, hp.seed
                    )
                    if name == "validation":  # a cut-short evaluation sees every source
                        units, self.source_spans[name] = D.interleave(
                            units, self.source_spans[name]
                        )
                else:
                    units = obj.units(examples, ds.max_seq_length, ds.packing, hp.seed)
                self.splits[name] = (examples, units)
        self.train_ex, self.train_seqs = self.splits["train"]
        epoch_units = len(self.train_seqs)
        if self.sources:
            spans = self.source_spans["train"]
            self.mix_counts = D.mixture_counts(
                spans, [len(s.train) for s in self.sources], [s.weight for s in self.sources]
            )
            epoch_units = sum(self.mix_counts)
            self.unit_source = [0] * len(self.train_seqs)
            for i, span in enumerate(spans):
                for u in span:
                    self.unit_source[u] = i
        per_micro = hp.batch_size * self.world
        self.micro_per_epoch = max(1, epoch_units // per_micro)
        self.steps_per_epoch = max(1, self.micro_per_epoch // hp.gradient_accumulation_steps)
        self.total_steps = hp.max_steps or math.ceil((hp.epochs or 1.0) * self.steps_per_epoch)
        self.eval_enabled = self.spec.evaluation.enabled and "validation" in self.splits
        retention = self.spec.evaluation.retention
        self.retention_rows = (
            H.retention_rows(self.spec) if retention and retention.generation else []
        )
        self.checks = H.HeldOutChecks(
            self.spec,
            self.worker,
            self.tokenizer.pad_token_id,
            self.splits.get("validation") if ds.format in SUPERVISED_FORMATS else None,
            H.retention_examples(self.spec, self.tokenizer) if retention else None,
            self.log,
        )
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
            self.prepared.train_report,
            self.prepared.val_report,
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

    def epoch_order(self, epoch: int) -> list[int]:
        """The units of an epoch in the order trained (one source, or a mixture's)."""
        if not hasattr(self, "_order") or self._order[0] != epoch:
            if self.sources:
                spans = self.source_spans["train"]
                order = D.mixture_order(spans, self.mix_counts, self.hp.seed, epoch)
            else:
                order = D.epoch_order(len(self.train_seqs), self.hp.seed, epoch)
            self._order = (epoch, order)
        return self._order[1]

    def source_examples(self, step: int) -> dict[str, int]:
        """dataset.mixture: the examples of each source trained through `step`, all
        ranks together. Like the batches, a function of the step: counted from the
        epoch orders (on from the last count), so a resumed run counts the same."""
        hp = self.hp
        per_micro = hp.batch_size * self.world
        per_epoch = self.steps_per_epoch * hp.gradient_accumulation_steps
        start, counts = getattr(self, "_counted", (0, [0] * len(self.sources)))
        order: tuple = (None, [])
        for m in range(start, step * hp.gradient_accumulation_steps):
            epoch, k = divmod(m, per_epoch)
            if order[0] != epoch:
                spans = self.source_spans["train"]
                order = (epoch, D.mixture_order(spans, self.mix_counts, hp.seed, epoch))
            units = order[1]
            for p in range(k * per_micro, (k + 1) * per_micro):
                u = units[p % len(units)]
                counts[self.unit_source[u]] += len(self.train_seqs[u])
        self._counted = (max(start, step * hp.gradient_accumulation_steps), counts)
        return {s.id: n for s, n in zip(self.sources, counts, strict=True)}

    def micro_batch(self, m: int) -> tuple[dict, int]:
        """Micro-batch number m (counted from the start of training) of this rank:
        the data position is a function of the step, so resuming needs no state."""
        hp = self.hp
        accum = hp.gradient_accumulation_steps
        epoch, k = divmod(m, self.steps_per_epoch * accum)
        order = self.epoch_order(epoch)
        n = len(order)
        base = k * hp.batch_size * self.world + self.rank * hp.batch_size
        seqs = [self.train_seqs[order[(base + j) % n]] for j in range(hp.batch_size)]
        batch = self.objective.collate(
            self.train_ex, seqs, self.tokenizer.pad_token_id, self.spec.dataset.packing
        )
        tokens = sum(len(self.train_ex[i].input_ids) for s in seqs for i in s)
        return self.worker.to_device(batch), tokens

    # ------------------------------------------------------------------ resume
    def resume(self) -> None:
        step = self.checkpoints.resume(self.state)
        if self.rank == 0:
            self.metrics = self.storage.resumed_metrics(step)
            # said once, on this attempt's first row
            self.resume_note = {
                k: v
                for k, v in (
                    ("resumed_from", step),
                    ("skipped_checkpoints", [s.step for s in self.checkpoints.skipped]),
                )
                if v
            }
        if step is not None:
            self.start_step = self.resumed_from = step

    # ------------------------------------------------------------------ evaluate
    def evaluate(self, split: str = "validation") -> dict:
        examples, units = self.splits[split]
        result = self.objective.evaluate(examples, units, split)
        if split in self.source_spans:  # dataset.mixture: each source's own held-out loss
            per_source = {}
            for source, span in zip(self.sources, self.source_spans[split], strict=False):
                if len(span):
                    own = [units[u] for u in span]
                    per_source[source.id] = self.objective.evaluate(examples, own, split)[
                        "eval_loss"
                    ]
            result["eval_loss_per_source"] = per_source
        return result

    def save_checkpoint(self) -> None:
        self.progress(contract.TrainPhase.saving)
        step = self.state["step"]
        trainer_state = {
            **self.state,
            "world_size": self.world,
            "total_steps": self.total_steps,
            "epoch": step / self.steps_per_epoch,
        }
        self.checkpoints.save(
            self.state, trainer_state, self.cfg.to_dict(), step / self.steps_per_epoch
        )

    # ------------------------------------------------------------------ train
    def train(self) -> None:
        hp, ev = self.hp, self.spec.evaluation
        accum = hp.gradient_accumulation_steps
        eval_every = ev.every_steps or self.spec.checkpointing.every_steps
        engine = self.worker.engine
        self.objective.setup(
            objectives.TrainContext(
                worker=self.worker,
                storage=self.storage,
                log=self.log,
                progress=self.progress,
                model_path=self.model_path,
                pad_id=self.tokenizer.pad_token_id,
                packing=self.spec.dataset.packing,
                batch_size=hp.batch_size,
                max_batches=ev.max_batches,
                start_step=self.state["step"],
                method=self.spec.method.type,
                parent=self.parent,
                reference_use=R.use_of(self.objective),
                reference_copy=self.reference_copy,
                teacher_uri=P.locate_teacher(self.cfg),
            ),
            self.splits,
        )
        if (
            self.eval_enabled
            and self.state["step"] == 0
            and self.state["initial_eval_loss"] is None
        ):
            self.progress(contract.TrainPhase.evaluating, "evaluating the base model")
            first = self.evaluate()
            self.state["initial_eval_loss"] = first["eval_loss"]
            self.state["initial_eval_loss_per_source"] = first.get("eval_loss_per_source")
            self.log(f"held-out loss before training: {first['eval_loss']:.4f}")
            self.reached("baseEvaluated")
            if self.rank == 0:
                self.metrics.append(
                    {"step": 0, "epoch": 0.0, **first, "attempt": self.cfg.attempt, "time": now()}
                )
        if self.checks.wanted and self.state["step"] == 0 and not self.state["checks_before"]:
            self.progress(contract.TrainPhase.evaluating, "calibration and retention of the base")
            self.state["checks_before"] = self.checks.before()
        self.t_train = time.monotonic()
        self.progress(contract.TrainPhase.training)
        # the loss stays on the device until a log step: no sync per micro-batch
        loss_sum, n_losses, tokens, t_log = 0.0, 0, 0, time.monotonic()
        engine.train()
        while self.state["step"] < self.total_steps:
            step = self.state["step"]
            made = [self.micro_batch(step * accum + a) for a in range(accum)]
            for batch, n_tok in self.objective.step_batches(made):
                loss = self.objective.loss(batch)
                engine.backward(loss)
                engine.step()
                loss_sum, n_losses = loss_sum + loss.detach(), n_losses + 1
                tokens += n_tok
            step = self.state["step"] = step + 1
            self.reached("firstStep")
            last = step == self.total_steps
            row = None
            if step % hp.log_every_steps == 0 or last:
                total, n, tok = self.worker.allreduce([float(loss_sum), n_losses, tokens])
                elapsed = time.monotonic() - t_log
                self.tokens_per_second = round(tok / max(elapsed, 1e-9), 1)
                self.state["tokens"] += int(tok)
                self.state["train_loss"] = total / n
                gn = engine.get_global_grad_norm()
                row = {
                    "step": step,
                    "epoch": round(step / self.steps_per_epoch, 4),
                    "loss": total / n,
                    "learning_rate": engine.get_lr()[0],
                    "grad_norm": float(gn) if gn is not None else None,
                    "tokens_per_second": self.tokens_per_second,
                    "tokens": self.state["tokens"],
                    "trainable_parameters": self.trainable_at(step - 1),
                    "time": now(),
                }
                row.update(self.objective.metrics())
                if self.sources and self.rank == 0:
                    row["train_examples_per_source"] = self.source_examples(step)
                loss_sum, n_losses, tokens, t_log = 0.0, 0, 0, time.monotonic()
            if self.eval_enabled and (step % eval_every == 0 or last):
                self.progress(contract.TrainPhase.evaluating)
                t_eval = time.monotonic()
                result = self.evaluate()
                t_log += time.monotonic() - t_eval  # evaluation is not training time
                self.state["last_eval_loss"] = result["eval_loss"]
                self.state["last_eval_loss_per_source"] = result.get("eval_loss_per_source")
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
                if result.get("eval_loss_per_source"):
                    self.log(
                        f"step {step}: eval loss per source "
                        + ", ".join(
                            f"{k} {v:.4f}" for k, v in result["eval_loss_per_source"].items()
                        )
                    )
                self.early_stopping(result)
            if row is not None and self.rank == 0:
                row.update(self.resume_note)
                self.resume_note = {}
                row["attempt"] = self.cfg.attempt
                self.metrics.append(row)
                self.write_metrics()
                self.log(
                    f"step {step}/{self.total_steps} loss {row.get('loss', float('nan')):.4f}"
                    f"{self.objective.describe(row)} lr {row.get('learning_rate') or 0:.2e} "
                    f"tok/s {self.tokens_per_second}"
                )
            if row is not None and not last and self.halt_requested():
                self.halted = True
                self.log(f"stopped by the sweep at step {step}: its metric trails the others'")
                break
            stop = self.state["stopped_early"]
            asked = not last and self.stop_requested()
            if step % self.spec.checkpointing.every_steps == 0 or last or stop or asked:
                self.save_checkpoint()
            if asked:
                self.stop_at(step)
                break
            if row is not None:
                self.progress(contract.TrainPhase.training)
            if stop:
                self.log(f"early stopping at step {step}")
                break

    def stop_requested(self) -> bool:
        """A stop request on any rank's machine (kubetune_trainer.stop); every rank
        agrees on the answer at the same step."""
        if not self.save_on_stop:
            return False
        seen = float(self.stop_files.requested_since(self.t_created))
        return self.worker.allreduce([seen])[0] > 0

    def stop_at(self, step: int) -> None:
        """After the checkpoint of `step` is committed (save ends with a barrier)."""
        self.stopped = step
        self.stop_files.saved(step)
        self.log(f"stopped on request at step {step}: checkpoint step {step} committed")
        self.progress(
            contract.TrainPhase.interrupted,
            f"stopped on request at step {step} (its pod is stopping); checkpoint step "
            f"{step} committed: the next run resumes there",
        )

    def halt_requested(self) -> bool:
        """A sweep's scheduler asks a trial to stop by writing HALT under its prefix
        (kubetune_trainer.sweep); every rank agrees on the answer at the same step."""
        seen = 0.0
        if self.rank == 0:
            seen = float(self.storage.read_json(contract.HALT) is not None)
        return self.worker.allreduce([seen])[0] > 0

    def early_stopping(self, result: dict) -> None:
        es = self.spec.early_stopping
        if not es.enabled:
            return
        value = result[es.metric]
        best = self.state["best"]
        # resolve_spec fills the mode; an unresolved spec still goes the metric's way
        mode = mode_for(es.metric, es.mode)
        better = best is None or (
            value < best - es.min_delta if mode == "min" else value > best + es.min_delta
        )
        if better:
            self.state["best"], self.state["bad_evals"] = value, 0
        else:
            self.state["bad_evals"] += 1
            if self.state["bad_evals"] >= es.patience:
                self.state["stopped_early"] = True

    # ------------------------------------------------------------------ finish
    def mixture_record(self) -> Optional[list[contract.MixtureRecord]]:
        if not self.sources:
            return None
        seen = self.source_examples(self.state["step"]) if self.rank == 0 else {}
        before = self.state["initial_eval_loss_per_source"] or {}
        after = self.state["last_eval_loss_per_source"] or {}
        return [
            contract.MixtureRecord(
                id=s.id,
                format=s.format,
                weight=round(s.weight, 6),
                train_examples=len(s.train),
                validation_examples=len(s.val),
                trained_examples=seen.get(s.id),
                initial_eval_loss=before.get(s.id),
                final_eval_loss=after.get(s.id),
            )
            for s in self.sources
        ]

    def finish(self) -> None:
        summary = contract.OutputsRecord(
            metrics=self.storage.uri(contract.METRICS),
            final_checkpoint=self.checkpoints.last,
            initial_eval_loss=self.state["initial_eval_loss"],
            final_eval_loss=self.state["last_eval_loss"],
            final_train_loss=self.state["train_loss"],
            steps=self.state["step"],
            stopped_early=self.state["stopped_early"],
            attempt=self.cfg.attempt,
            pruned=self.pruned.record() if self.pruned is not None else None,
            parameters=self.parameters,
            mixture=self.mixture_record(),
        )
        local = self.tmp / "final"
        held_out = {"validation": self.prepared.val_rows, "test": self.prepared.test_rows}
        formats = {}
        if self.retention_rows:  # evaluation.retention.generation
            held_out["retention"] = self.retention_rows
            formats["retention"] = self.spec.evaluation.retention.dataset.format
        before = self.state.get("checks_before") or {}
        outputs = O.finish(
            O.Finish(
                worker=self.worker,
                storage=self.storage,
                spec=self.spec,
                tokenizer=self.tokenizer,
                model_path=self.model_path,
                parent=self.parent,
                local=local,
                metrics=self.metrics,
                held_out=held_out,
                held_out_formats=formats,
                checks=(lambda: self.checks.after(before)) if self.checks.wanted else None,
                retention=(
                    (lambda: self.checks.regression(before))
                    if self.checks.retention_set is not None
                    else None
                ),
                test=(lambda: self.evaluate("test")) if "test" in self.splits else None,
                evaluate=self.evaluate,
                splits=tuple(self.splits),
                labels=self.labels,
                log=self.log,
                progress=self.progress,
            ),
            summary,
        )
        retention = outputs.retention
        gate = retention is not None and retention.exceeded and retention.fail_on_regression
        if self.rank == 0:
            self.writer.flush()
            self.storage.write_record(contract.OUTPUTS, outputs)
        if gate:  # every rank knows (the losses are all-reduced): every rank stops here
            raise H.RetentionRegressed(
                "evaluation.retention: the retention "
                + retention.describe()
                + " and failOnRegression is set (the outputs are saved; raise "
                "evaluation.retention.maxRegression or train less far to pass)"
            )
        if self.rank == 0:
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
        self.worker.barrier()
        shutil.rmtree(self.tmp, ignore_errors=True)


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train's entry in each worker."""
    recipe = Recipe(loop_config)
    try:
        with recipe.stop_files.running():
            recipe.setup()
            recipe.resume()
            recipe.train()
            if recipe.halted or recipe.stopped is not None:
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
