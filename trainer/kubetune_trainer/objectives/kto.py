"""Kahneman-Tversky optimization: single answers rated thumbs up or thumbs down.

Data (dataset.format feedback, normalised by data): {prompt, completion, label}.
Each usable row k becomes two examples side by side: at 2k its own prompt and
completion, at 2k + 1 its prompt with the completion of another row (the next
one, in file order, whose prompt differs). The second is never trained towards:
it only estimates the KL term. The unit of batching is that pair, so the units,
collation and per-answer log-probabilities DPO uses serve as they are
(objectives/paired.py).

Loss (the KTO paper, eq. 7; TRL's KTOTrainer computes the same): with
r = log pi(y|x) - log ref(y|x) summed over the answer's tokens and z the KL
estimate of the micro-batch,
    thumbs up:    desirableWeight   x (1 - sigmoid(beta x (r - z)))
    thumbs down:  undesirableWeight x (1 - sigmoid(beta x (z - r)))
averaged over the rated answers of the micro-batch. z is the mean of r over the
mismatched answers (2k + 1) of the micro-batch, clamped at 0 and detached: no
gradient flows through it (the paper's choice; TRL averages it over the processes
as well, here each worker keeps its own micro-batch's, as the paper describes).

The reference is Paired's, as for DPO: the policy the job starts
from (objectives.reference: the adapter switched off, a continued parent's adapter
kept frozen beside the trained one), or for full fine-tuning log-probabilities
stored before the first step (reference_logps.json, read back on a resume).

Evaluation: eval_loss (the loss above), the mean rewards of thumbs-up and
thumbs-down answers, eval_kl, and eval_ranking_accuracy: over every held-out
prompt that has at least one thumbs-up and one thumbs-down answer, each
(up, down) pair of its answers counts once, and is ranked right when the
thumbs-up answer's reward (beta x r) is the higher, a tie counting half. So it is
0.5 before training (every reward is 0 there) and says whether training moved
held-out answers the way the ratings point. The reward rather than the model's
own log-probabilities, because those are mostly how predictable an answer is
whatever the prompt (a tiny model trained for 18 steps ranks the same share of
pairs right by them before and after, while its rewards separate): the reference
takes that part out, and what is left is what the job changed, which is what
KTO trains. Missing when no held-out prompt has both kinds of answer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

from .. import data as D
from .base import Splits, TrainContext
from .paired import Paired, sequence_logps, tokenize_answer

NAME = "kto"
# The KTO paper's advice: desirableWeight x n_up / (undesirableWeight x n_down) in here.
BALANCE = (1.0, 4 / 3)


@dataclass
class Rated(D.Example):
    """An example with its rating (thumbs up: desirable) and its prompt's number in
    the split (rows with the same prompt share it)."""

    desirable: bool = True
    group: int = 0


# ---------------------------------------------------------------------------- data
def _tokenize(prompt, completion, tokenizer) -> tuple[list[int], list[int]]:
    """A prompt with an answer, text or messages (another row's answer may be the
    other kind: it is converted)."""
    if isinstance(prompt, list) and isinstance(completion, str):
        completion = [{"role": "assistant", "content": completion}]
    elif isinstance(prompt, str) and isinstance(completion, list):
        prompt = [{"role": "user", "content": prompt}] if prompt.strip() else []
    return tokenize_answer(prompt, completion, tokenizer)


def tokenize(norm: dict, tokenizer) -> tuple[list[int], list[int]]:
    return _tokenize(norm["prompt"], norm["completion"], tokenizer)


def _mismatched(norms: list[dict], k: int) -> int:
    """The row whose answer goes with row k's prompt for the KL estimate: the next one
    (cyclically) with another prompt; the next one at all when every prompt is the same."""
    n = len(norms)
    for step in range(1, n):
        j = (k + step) % n
        if norms[j]["prompt"] != norms[k]["prompt"]:
            return j
    return (k + 1) % n


def build_rated(rows: list, tokenizer, max_len: int) -> tuple[list[Rated], D.DataReport]:
    """Examples: the rated answer at 2k, the mismatched one at 2k + 1. Each is cut to
    max_len tokens (the end of the answer goes); a row is counted truncated once."""
    report = D.DataReport(rows=len(rows))
    label = rows.label if isinstance(rows, D.Rows) else (lambda i: f"row {i + 1}")
    kept: list[tuple[int, dict]] = []
    for index, row in enumerate(rows):
        norm, why = D.normalize(row, "feedback")
        if norm is None:
            report.reject(label(index), why, row)
        else:
            kept.append((index, norm))
    norms = [norm for _i, norm in kept]
    groups: dict[str, int] = {}
    out: list[Rated] = []
    for k, (index, norm) in enumerate(kept):
        group = groups.setdefault(json.dumps(norm["prompt"]), len(groups))
        other = norms[_mismatched(norms, k)]["completion"]
        pair, cut = [], False
        for answer in (norm["completion"], other):
            ids, labels = _tokenize(norm["prompt"], answer, tokenizer)
            if len(ids) > max_len:
                cut = True
                ids, labels = ids[:max_len], labels[:max_len]
            labels[0] = D.IGNORE
            pair.append(Rated(ids, labels, desirable=norm["label"], group=group))
        if all(x == D.IGNORE for x in pair[0].labels):
            why = "no tokens left to learn from after truncation"
            report.reject(label(index), why, rows[index])
            continue
        report.truncated += cut
        report.usable += 1
        for ex in pair:
            report.tokens += len(ex.input_ids)
        report.loss_tokens += sum(1 for x in pair[0].labels if x != D.IGNORE)
        out.extend(pair)
    return out, report


# ---------------------------------------------------------------------------- loss
def kto_loss(pi, ref, kl_pi, kl_ref, desirable, beta: float, w_up: float, w_down: float):
    """Per rated answer: (loss, reward), and the KL estimate z of the micro-batch.
    pi/ref: summed log-probabilities of the rated answers under the policy and the
    reference; kl_pi/kl_ref: the same for the mismatched answers; desirable: bools."""
    import torch

    z = (kl_pi - kl_ref).mean().clamp(min=0).detach()
    logratio = pi - ref
    up = w_up * (1 - torch.sigmoid(beta * (logratio - z)))
    down = w_down * (1 - torch.sigmoid(beta * (z - logratio)))
    return torch.where(desirable, up, down), beta * logratio.detach(), z


def ranking_accuracy(scores: dict[int, float], examples: list[Rated]) -> Optional[float]:
    """Over the (thumbs-up, thumbs-down) pairs of answers to the same prompt among the
    scored examples: the share where the thumbs-up answer scores higher, a tie counting
    half. None: no pair."""
    up: dict[int, list[float]] = {}
    down: dict[int, list[float]] = {}
    for i, score in scores.items():
        ex = examples[i]
        (up if ex.desirable else down).setdefault(ex.group, []).append(score)
    right = total = 0
    for group, ups in up.items():
        for u in ups:
            for d in down.get(group, ()):
                right += 1.0 if u > d else 0.5 if u == d else 0.0
                total += 1
    return right / total if total else None


# ---------------------------------------------------------------------------- objective
class Kto(Paired):
    """KTO's examples, loss and metrics; the units, collation and reference are Paired's
    (shared with DPO)."""

    name = NAME

    def __init__(self, spec):
        super().__init__(spec)
        self.cfg = spec.method.kto
        self.splits: Splits = {}

    # ---------------------------------------------------------------- data
    def build_examples(self, rows, fmt, tokenizer, max_len):
        return build_rated(rows, tokenizer, max_len)

    def tokenize(self, norm, tokenizer):
        return tokenize(norm, tokenizer)

    # ---------------------------------------------------------------- setup
    def setup(self, ctx: TrainContext, splits: Splits) -> None:
        super().setup(ctx, splits)
        self.splits = splits
        train = splits["train"][0][0::2]
        n_up = sum(ex.desirable for ex in train)
        n_down = len(train) - n_up
        c = self.cfg
        ratio = c.desirable_weight * n_up / (c.undesirable_weight * n_down) if n_down else None
        if ratio is not None and not BALANCE[0] <= ratio <= BALANCE[1]:
            ctx.log(
                f"kto: {n_up} thumbs-up and {n_down} thumbs-down rows weigh "
                f"{ratio:.2f} : 1 (desirableWeight x up / (undesirableWeight x down)); the KTO "
                "paper advises 1 to 4/3: set method.kto.desirableWeight to about "
                f"{c.undesirable_weight * n_down / max(n_up, 1):.2f}"
            )

    # ---------------------------------------------------------------- batches
    def _rated(self, batch: dict, examples: list[Rated], split: str):
        """(losses, stats, reward per rated example id)."""
        import torch

        w = self.ctx.worker
        pi, _counts = sequence_logps(w.head, w.engine, batch)
        ref = self._reference_logps(batch, split)
        ids = batch["example_ids"][0::2].tolist()
        desirable = torch.tensor([examples[i].desirable for i in ids], device=pi.device)
        c = self.cfg
        losses, rewards, z = kto_loss(
            pi[0::2],
            ref[0::2],
            pi[1::2],
            ref[1::2],
            desirable,
            c.beta,
            c.desirable_weight,
            c.undesirable_weight,
        )
        up = desirable.to(rewards.dtype)
        stats = torch.stack(
            [
                losses.detach().sum(),
                (rewards * up).sum(),
                up.sum(),
                (rewards * (1 - up)).sum(),
                (1 - up).sum(),
                z,
                torch.ones_like(z),
                torch.tensor(float(losses.numel()), device=losses.device),
            ]
        )
        return losses, stats, dict(zip(ids, rewards.tolist(), strict=True))

    @staticmethod
    def _means(stats: list[float], prefix: str) -> dict:
        loss, r_up, n_up, r_down, n_down, z, batches, n = stats
        out = {f"{prefix}kl": z / max(batches, 1)}
        if n_up:
            out[f"{prefix}rewards_desirable"] = r_up / n_up
        if n_down:
            out[f"{prefix}rewards_undesirable"] = r_down / n_down
        return out

    # ---------------------------------------------------------------- train
    def loss(self, batch: dict):
        losses, stats, _ = self._rated(batch, self.splits["train"][0], "train")
        self._stats = stats if self._stats is None else self._stats + stats
        return losses.mean()

    def metrics(self) -> dict:
        """Means since the last metrics row, over every worker."""
        if self._stats is None:
            return {}
        stats = self.ctx.worker.allreduce([float(x) for x in self._stats])
        self._stats = None
        return self._means(stats, "")

    def describe(self, row: dict) -> str:
        if row.get("kl") is None:
            return ""
        up, down = row.get("rewards_desirable"), row.get("rewards_undesirable")
        text = f" kl {row['kl']:.3f}"
        if up is not None:
            text += f" reward up {up:.3f}"
        if down is not None:
            text += f" down {down:.3f}"
        return text

    def evaluate(self, examples, units, split: str) -> dict:
        import torch

        c = self.ctx
        w = c.worker
        total = torch.zeros(8, dtype=torch.float64)
        scores: dict[int, float] = {}
        w.engine.eval()
        with torch.no_grad():
            for weight, lo, hi in w.eval_shards(len(units), c.batch_size, c.max_batches):
                batch = self._collate(examples, units[lo:hi])
                _, stats, rewards = self._rated(batch, examples, split)
                total += weight * stats.double().cpu()
                if weight:
                    scores.update(rewards)
        w.engine.train()
        stats = w.allreduce(total.tolist())
        merged: dict[int, float] = {}
        for part in w.gather(scores):
            merged.update(part)
        out = {"eval_loss": stats[0] / max(stats[7], 1), **self._means(stats, "eval_")}
        accuracy = ranking_accuracy(merged, examples)
        if accuracy is not None:
            out["eval_ranking_accuracy"] = accuracy
        return out
