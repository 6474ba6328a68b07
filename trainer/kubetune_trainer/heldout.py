"""Held-out checks before and after training: calibration and retention.

evaluation.calibration scores the validation split's answer tokens (the labelled
tokens of a supervised format) and evaluation.retention a general-purpose set in
its own format; both on the DeepSpeed engine, every rank on its shard, reduced
over the ranks, so ZeRO-3 and several workers need nothing else. `before` runs
on the base model before the first step (its numbers ride in the trainer state
and survive a resume), `after` on the fine-tuned weights before they are saved,
so a fitted temperature can go into the saved generation config.

The retention loss is the eval loss (mean cross-entropy over labelled tokens) of
the retention set; its regression is the relative rise (after - before) / before,
and evaluation.retention.maxRegression bounds it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

from kubetune_api import storage as contract

from . import calibration as C
from . import data as D
from .worker import Worker


class RetentionRegressed(RuntimeError):
    """evaluation.retention.failOnRegression: the bound was exceeded."""


def retention_examples(spec, tokenizer, environ=None) -> list:
    """The retention set's first maxExamples usable rows, tokenized as training does."""
    r = spec.evaluation.retention
    rows = D.read_rows(r.dataset, spec.dataset, environ)
    examples, report = D.build_examples(
        rows, r.dataset.format, tokenizer, spec.dataset.max_seq_length
    )
    if not examples:
        raise D.DataError(
            "evaluation.retention.dataset has no usable rows (check its uri and format). "
            + report.summary("retention")
        )
    return examples[: r.max_examples]


def retention_rows(spec, environ=None) -> list:
    """The retention set's rows (for evaluation by generation)."""
    return D.read_rows(spec.evaluation.retention.dataset, spec.dataset, environ)


class HeldOutChecks:
    """evaluation.calibration and evaluation.retention of one run (every rank)."""

    def __init__(
        self,
        spec,
        worker: Worker,
        pad_id: int,
        validation: Optional[tuple[list, list]],
        retention: Optional[list],
        log: Callable[[str], None],
    ):
        ev, ds = spec.evaluation, spec.dataset
        self.calibration = ev.calibration if validation else None
        self.retention = ev.retention
        self.worker, self.pad_id, self.log = worker, pad_id, log
        self.batch_size = spec.hyperparameters.batch_size
        self.max_batches = ev.max_batches
        self.packing = ds.packing
        self.validation = validation
        self.retention_set = None
        if retention:
            units = D.sequences(retention, ds.max_seq_length, ds.packing, 0)
            self.retention_set = (retention, units)

    @property
    def wanted(self) -> bool:
        return self.calibration is not None or self.retention_set is not None

    # ------------------------------------------------------------------ scoring
    def score(
        self,
        examples,
        units,
        max_batches: Optional[int],
        temperature: float = 1.0,
        keep: int = 0,
    ) -> tuple[float, list[float], list]:
        """(mean loss, summed calibration bins, this rank's cached (logits, target)
        of at most `keep` tokens) over a split, every rank on its shard."""
        import torch
        import torch.nn.functional as F

        w = self.worker
        w.engine.eval()
        loss_sum = count = 0.0
        bins = [0.0] * (3 * C.BINS)
        cached, kept = [], 0
        with torch.no_grad():
            for weight, lo, hi in w.eval_shards(len(units), self.batch_size, max_batches):
                batch = w.to_device(D.collate(examples, units[lo:hi], self.pad_id, self.packing))
                logits, target = w.head.logits(w.engine, batch)
                loss_sum += weight * F.cross_entropy(logits, target, reduction="sum").item()
                count += weight * target.numel()
                if weight:
                    part = C.bin_stats(logits, target, temperature)
                    bins = [a + b for a, b in zip(bins, part, strict=True)]
                    if kept < keep and target.numel():
                        take = min(keep - kept, target.numel())
                        cached.append((logits[:take].half().cpu(), target[:take].cpu()))
                        kept += take
        w.engine.train()
        reduced = w.allreduce([loss_sum, count, *bins])
        return reduced[0] / max(reduced[1], 1), reduced[2:], cached

    def _calibration(self, fit: bool) -> dict:
        examples, units = self.validation
        keep = C.TEMPERATURE_TOKENS if fit else 0
        _loss, bins, cached = self.score(examples, units, self.max_batches, keep=keep)
        out = C.summarize(bins)
        if not fit:
            return out

        def mean_nll(t: float) -> float:
            total, n = self.worker.allreduce(list(C.nll_sum(cached, t)))
            return total / max(n, 1)

        t = C.fit_temperature(mean_nll)
        _, n = self.worker.allreduce([0.0, float(sum(c[1].numel() for c in cached))])
        _loss, bins_t, _ = self.score(examples, units, self.max_batches, temperature=t)
        out |= {
            "temperature": t,
            "temperature_tokens": int(n),
            "ece_at_temperature": C.summarize(bins_t)["ece"],
            "nll": mean_nll(1.0),
            "nll_at_temperature": mean_nll(t),
        }
        return out

    # ------------------------------------------------------------------ before / after
    def before(self) -> dict:
        """The base model's numbers (kept in the trainer state)."""
        out: dict = {}
        if self.calibration is not None:
            out["ece"] = self._calibration(fit=False)["ece"]
            self.log(f"calibration before training: ECE {out['ece']:.4f}")
        if self.retention_set is not None:
            out["retention_loss"] = self.score(*self.retention_set, None)[0]
            self.log(f"retention loss before training: {out['retention_loss']:.4f}")
        return out

    def regression(self, before: dict) -> Optional[float]:
        """The retention set's relative rise of the loss, the model as it is now
        against the base's (None when the base was not scored)."""
        first = before.get("retention_loss")
        if not first:
            return None
        return (self.score(*self.retention_set, None)[0] - first) / first

    def after(self, before: dict) -> dict:
        """outputs.json's `calibration` and `retention` sections, and the metrics
        (metrics.jsonl's last row gets them)."""
        sections: dict = {}
        if self.calibration is not None:
            cal = self._calibration(fit=self.calibration.fit_temperature)
            record = contract.CalibrationRecord(
                tokens=cal["tokens"],
                bins=C.BINS,
                ece_before=before.get("ece"),
                ece=cal["ece"],
                accuracy=cal["accuracy"],
                confidence=cal["confidence"],
                temperature=cal.get("temperature"),
                temperature_tokens=cal.get("temperature_tokens"),
                ece_at_temperature=cal.get("ece_at_temperature"),
            )
            sections["calibration"] = record
            line = f"calibration: ECE {_num(record.ece_before)} before, {record.ece:.4f} after"
            if record.temperature is not None:
                line += (
                    f"; temperature {record.temperature:.3f} (NLL {cal['nll']:.4f} → "
                    f"{cal['nll_at_temperature']:.4f} on {record.temperature_tokens} tokens): "
                    f"ECE {record.ece_at_temperature:.4f}"
                )
            self.log(line)
        if self.retention_set is not None:
            r = self.retention
            loss = self.score(*self.retention_set, None)[0]
            first = before.get("retention_loss")
            regression = (loss - first) / first if first else None
            exceeded = (
                regression is not None
                and r.max_regression is not None
                and regression > r.max_regression
            )
            examples = self.retention_set[0]
            record = contract.RetentionRecord(
                examples=len(examples),
                tokens=sum(sum(1 for x in e.labels if x != D.IGNORE) for e in examples),
                loss_before=first,
                loss_after=loss,
                regression=regression,
                max_regression=r.max_regression,
                exceeded=exceeded,
                fail_on_regression=r.fail_on_regression,
            )
            sections["retention"] = record
            self.log("retention: " + record.describe())
        return sections


def _num(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def summary_lines(outputs: dict) -> list[str]:
    """`kubetune run`'s lines for outputs.json's calibration and retention."""
    lines = []
    if outputs.get("calibration"):
        c = contract.CalibrationRecord.model_validate(outputs["calibration"])
        line = (
            f"  calibration error (ECE, {c.bins} bins, {c.tokens} answer tokens): "
            f"before {_num(c.ece_before)} -> after {c.ece:.4f}"
        )
        if c.temperature is not None:
            line += f"; at temperature {c.temperature:.3f}: {c.ece_at_temperature:.4f}"
        lines.append(line)
        if c.saved_in:
            lines.append(
                f"  temperature saved in generation_config.json of: {', '.join(c.saved_in)}"
            )
    if outputs.get("retention"):
        r = contract.RetentionRecord.model_validate(outputs["retention"])
        lines.append(f"  retention ({r.examples} rows): {r.describe()}")
    return lines
