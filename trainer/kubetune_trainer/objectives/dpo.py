"""Direct preference optimization: rows of prompt, chosen and rejected.

Data (dataset.format preference, normalised by data): each usable row becomes
two examples side by side, chosen at 2k and rejected at 2k + 1, with loss labels
on the response only. The unit of batching is the pair: both answers sit in the
same micro-batch (one packed row, or two padded rows), so one forward scores both.

The units, their collation and the reference are objectives.paired's (shared
with KTO): the reference is the policy the job starts from, so step 0 has rewards
0 and a loss of log 2 (with a continued parent's adapter too); for full
fine-tuning its log-probabilities are stored before the first step.
"""

from __future__ import annotations

from .. import data as D
from .paired import (  # noqa: F401  (REFERENCE, sequences, collate, fingerprint: DPO's too)
    REFERENCE,
    Paired,
    collate,
    fingerprint,
    sequence_logps,
    sequences,
    tokenize_answer,
)

NAME = "dpo"
KEYS = "prompt, chosen, rejected"


# ---------------------------------------------------------------------------- pairs
def tokenize(norm: dict, tokenizer) -> tuple[list[int], list[int]]:
    """The longer of the two answers with its prompt: each is cut to maxSeqLength on
    its own, so this is the length that counts against it."""
    chosen = tokenize_answer(norm["prompt"], norm["chosen"], tokenizer)
    rejected = tokenize_answer(norm["prompt"], norm["rejected"], tokenizer)
    return max(chosen, rejected, key=lambda t: len(t[0]))


def build_pairs(rows: list, tokenizer, max_len: int) -> tuple[list[D.Example], D.DataReport]:
    """Examples chosen at 2k, rejected at 2k + 1. Each answer is cut to max_len tokens
    (the prompt is kept, the end of the answer goes); a pair is counted truncated once."""
    report = D.DataReport(rows=len(rows))
    label = rows.label if isinstance(rows, D.Rows) else (lambda i: f"row {i + 1}")
    out: list[D.Example] = []
    for index, row in enumerate(rows):
        norm, why = D.normalize(row, "preference")
        if norm is None:
            report.reject(label(index), why, row)
            continue
        pair, cut = [], False
        for answer in (norm["chosen"], norm["rejected"]):
            ids, labels = tokenize_answer(norm["prompt"], answer, tokenizer)
            if len(ids) > max_len:
                cut = True
                ids, labels = ids[:max_len], labels[:max_len]
            labels[0] = D.IGNORE
            pair.append(D.Example(ids, labels))
        if any(all(x == D.IGNORE for x in ex.labels) for ex in pair):
            report.reject(label(index), "no tokens left to learn from after truncation", row)
            continue
        report.truncated += cut
        report.usable += 1
        for ex in pair:
            report.tokens += len(ex.input_ids)
            report.loss_tokens += sum(1 for x in ex.labels if x != D.IGNORE)
        out.extend(pair)
    return out, report


def build_examples(rows: list, fmt: str, tokenizer, max_len: int):
    """The objective's example builder (data.prepare's `build`): pairs."""
    return build_pairs(rows, tokenizer, max_len)


# ---------------------------------------------------------------------------- loss
def dpo_loss(
    pi_c,
    pi_r,
    ref_c,
    ref_r,
    beta: float,
    loss_type: str,
    label_smoothing: float,
    n_c=None,
    n_r=None,
):
    """Per pair: (loss, reward of chosen, reward of rejected). Log-probabilities are
    sums over the response tokens; ipo averages them per token (n_c, n_r) as the IPO
    paper does. Rewards are beta x (policy - reference) summed log-probabilities."""
    import torch.nn.functional as F

    if loss_type == "ipo":
        logits = (pi_c / n_c - pi_r / n_r) - (ref_c / n_c - ref_r / n_r)
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        logits = (pi_c - pi_r) - (ref_c - ref_r)
        if loss_type == "hinge":
            losses = F.relu(1 - beta * logits)
        else:
            losses = (
                -F.logsigmoid(beta * logits) * (1 - label_smoothing)
                - F.logsigmoid(-beta * logits) * label_smoothing
            )
    return losses, beta * (pi_c - ref_c).detach(), beta * (pi_r - ref_r).detach()


# ---------------------------------------------------------------------------- objective
class Dpo(Paired):
    """Loss per micro-batch, running statistics for the metrics rows, evaluation;
    the units and the reference are Paired's."""

    name = NAME

    def __init__(self, spec):
        super().__init__(spec)
        self.cfg = spec.method.dpo

    # ---------------------------------------------------------------- data
    def build_examples(self, rows, fmt, tokenizer, max_len):
        return build_examples(rows, fmt, tokenizer, max_len)

    def tokenize(self, norm, tokenizer):
        return tokenize(norm, tokenizer)

    # ---------------------------------------------------------------- batches
    def _pairs(self, batch: dict, split: str):
        import torch

        w = self.ctx.worker
        pi, counts = sequence_logps(w.head, w.engine, batch)
        ref = self._reference_logps(batch, split)
        c = self.cfg
        losses, rc, rr = dpo_loss(
            pi[0::2],
            pi[1::2],
            ref[0::2],
            ref[1::2],
            c.beta,
            c.loss_type,
            c.label_smoothing,
            counts[0::2],
            counts[1::2],
        )
        stats = torch.stack(
            [
                losses.detach().sum(),
                rc.sum(),
                rr.sum(),
                (rc > rr).float().sum(),
                (rc - rr).sum(),
                torch.tensor(float(losses.numel()), device=losses.device),
            ]
        )
        return losses, stats

    # ---------------------------------------------------------------- train
    def loss(self, batch: dict):
        losses, stats = self._pairs(batch, "train")
        self._stats = stats if self._stats is None else self._stats + stats
        return losses.mean()

    def metrics(self) -> dict:
        """Means since the last metrics row, over every worker."""
        if self._stats is None:
            return {}
        stats = [float(x) for x in self._stats]
        loss, rc, rr, acc, margin, n = self.ctx.worker.allreduce(stats)
        self._stats = None
        n = max(n, 1)
        return {
            "rewards_chosen": rc / n,
            "rewards_rejected": rr / n,
            "reward_accuracy": acc / n,
            "reward_margin": margin / n,
        }

    def describe(self, row: dict) -> str:
        if row.get("reward_accuracy") is None:
            return ""
        return f" reward acc {row['reward_accuracy']:.2f} margin {row['reward_margin']:.3f}"

    def evaluate(self, examples, units, split: str) -> dict:
        import torch

        c = self.ctx
        w = c.worker
        total = torch.zeros(6, dtype=torch.float64)
        w.engine.eval()
        with torch.no_grad():
            for weight, lo, hi in w.eval_shards(len(units), c.batch_size, c.max_batches):
                _, stats = self._pairs(self._collate(examples, units[lo:hi]), split)
                total += weight * stats.double().cpu()
        w.engine.train()
        loss, rc, rr, acc, margin, count = w.allreduce(total.tolist())
        count = max(count, 1)
        return {
            "eval_loss": loss / count,
            "eval_rewards_chosen": rc / count,
            "eval_rewards_rejected": rr / count,
            "eval_reward_accuracy": acc / count,
            "eval_reward_margin": margin / count,
        }
