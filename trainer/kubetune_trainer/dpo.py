"""Direct preference optimization inside the recipe's DeepSpeed loop.

The reference model is the base model and costs no second copy: with adapters
it is the same weights with the adapter disabled (peft's `disable_adapter`); for
full fine-tuning its log-probabilities are computed once, before the first step,
and stored beside the checkpoints (`reference_logps.json`), so a resumed run
reads them back instead of scoring with weights that have already moved.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Optional

from kubetune_api import storage as contract

from . import preference as P
from .data import IGNORE

REFERENCE = "reference_logps.json"


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


def sequence_logps(head, forward, batch: dict):
    """(summed log-probability, response tokens) per example slot of a pair batch."""
    import torch
    import torch.nn.functional as F

    inputs = {k: v for k, v in batch.items() if k not in ("segments", "example_ids")}
    logits, target = head.logits(forward, inputs)
    keep = batch["labels"][:, 1:] != IGNORE
    slot = batch["segments"][:, 1:][keep]
    token_logp = -F.cross_entropy(logits, target, reduction="none")
    n = batch["example_ids"].numel()
    sums = torch.zeros(n, dtype=token_logp.dtype, device=token_logp.device)
    counts = torch.zeros(n, dtype=token_logp.dtype, device=token_logp.device)
    sums = sums.index_add(0, slot, token_logp)
    counts = counts.index_add(0, slot, torch.ones_like(token_logp))
    return sums, counts


def fingerprint(model_path: str, examples) -> str:
    h = hashlib.sha256(str(model_path).encode())
    for ex in examples:
        h.update(json.dumps([ex.input_ids, ex.labels]).encode())
    return h.hexdigest()[:16]


class Dpo:
    """The DPO objective for one Recipe: loss per micro-batch, running statistics
    for the metrics rows, evaluation, and the stored reference for full fine-tuning."""

    def __init__(self, recipe):
        self.r = recipe
        self.cfg = recipe.spec.method.dpo
        self.adapter = recipe.spec.method.type != "full"
        self.reference: dict[str, list[float]] = {}  # split -> log-prob per example
        self._stats = None

    # ---------------------------------------------------------------- reference
    def _reference_logps(self, batch: dict, split: str):
        import torch

        r = self.r
        if self.adapter:
            with torch.no_grad(), r.engine.module.disable_adapter():
                logps, _ = sequence_logps(r.head, r.engine, batch)
            return logps.detach()
        table = self.reference[split]
        ids = batch["example_ids"].tolist()
        return torch.tensor([table[i] for i in ids], dtype=torch.float32, device=r.device)

    def prepare_reference(self, splits: dict) -> None:
        """Full fine-tuning: the base model's log-probabilities of every example, once.
        Called before the first step; a later attempt reads the stored file."""
        if self.adapter:
            return
        r = self.r
        want = {name: fingerprint(r.model_path, ex) for name, (ex, _seqs) in splits.items()}
        stored = r.storage.read_json(REFERENCE)
        if stored and stored.get("fingerprints") == want:
            self.reference = stored["logps"]
            r.log(f"reference log-probabilities read from {REFERENCE}")
            return
        if r.state["step"] > 0:
            raise RuntimeError(
                f"{REFERENCE} is missing or was made for other data, and the weights have "
                "moved since step 0: start a new FineTuneJob"
            )
        r.progress(contract.TrainPhase.evaluating, "computing reference log-probabilities")
        for name, (examples, seqs) in splits.items():
            self.reference[name] = self._score_all(examples, seqs)
        if r.rank == 0:
            r.storage.write_json(REFERENCE, {"fingerprints": want, "logps": self.reference})
        r.barrier()
        r.log(
            f"reference log-probabilities of {sum(map(len, self.reference.values()))} "
            f"answers stored in {REFERENCE}"
        )

    def _score_all(self, examples, seqs) -> list[float]:
        import torch

        r = self.r
        bs = r.hp.batch_size
        n = math.ceil(len(seqs) / bs)
        per_rank = math.ceil(n / r.world)
        found: dict[int, float] = {}
        r.engine.eval()
        with torch.no_grad():
            for j in range(per_rank):
                b = (j * r.world + r.rank) % n  # ZeRO-3: every rank runs the same forwards
                batch = self.collate(examples, seqs[b * bs : b * bs + bs])
                logps, _ = sequence_logps(r.head, r.engine, batch)
                for i, v in zip(batch["example_ids"].tolist(), logps.tolist(), strict=True):
                    found[i] = v
        r.engine.train()
        merged: dict[int, float] = {}
        for part in r.gather(found):
            merged.update(part)
        return [merged[i] for i in range(len(examples))]

    # ---------------------------------------------------------------- batches
    def collate(self, examples, seqs) -> dict:
        r = self.r
        batch = P.collate(examples, seqs, r.tokenizer.pad_token_id, r.spec.dataset.packing)
        return {k: v.to(r.device) for k, v in batch.items()}

    def _pairs(self, batch: dict, split: str):
        import torch

        pi, counts = sequence_logps(self.r.head, self.r.engine, batch)
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

    def pop_metrics(self) -> dict:
        """Means since the last metrics row, over every worker."""
        if self._stats is None:
            return {}
        loss, rc, rr, acc, margin, n = self.r.allreduce([float(x) for x in self._stats])
        self._stats = None
        n = max(n, 1)
        return {
            "rewards_chosen": rc / n,
            "rewards_rejected": rr / n,
            "reward_accuracy": acc / n,
            "reward_margin": margin / n,
        }

    def evaluate(self, examples, seqs, split: str = "validation") -> dict:
        import torch

        r = self.r
        bs = r.hp.batch_size
        n = math.ceil(len(seqs) / bs)
        if r.spec.evaluation.max_batches:
            n = min(n, r.spec.evaluation.max_batches)
        per_rank = math.ceil(n / r.world)
        total = torch.zeros(6, dtype=torch.float64)
        r.engine.eval()
        with torch.no_grad():
            for j in range(per_rank):
                b = j * r.world + r.rank
                weight = 1.0 if b < n else 0.0
                batch = self.collate(examples, seqs[(b % n) * bs : (b % n) * bs + bs])
                _, stats = self._pairs(batch, split)
                total += weight * stats.double().cpu()
        r.engine.train()
        loss, rc, rr, acc, margin, count = r.allreduce(total.tolist())
        count = max(count, 1)
        return {
            "eval_loss": loss / count,
            "eval_rewards_chosen": rc / count,
            "eval_rewards_rejected": rr / count,
            "eval_reward_accuracy": acc / count,
            "eval_reward_margin": margin / count,
        }


def reference_splits(recipe) -> dict:
    out = {"train": (recipe.train_ex, recipe.train_seqs)}
    if recipe.val_ex:
        out["validation"] = (recipe.val_ex, recipe.val_seqs)
    test: Optional[list] = getattr(recipe, "test_ex", None)
    if test:
        out["test"] = (test, recipe.test_seqs)
    return out
