"""Group relative policy optimization: rows of prompts, rewards from graders.

Data (dataset.format prompt): each usable row is one prompt (text, or chat
messages rendered with the generation prompt) and the row itself, whose fields
the grader's templates read as {{item.<field>}}. A batch unit is one prompt.

A training step does not train on the prompts themselves. `step_batches` turns
the step's micro-batches of prompts into rollouts, on every rank for its own
prompts:
  1. generate `generationsPerPrompt` completions per prompt with the model being
     trained (one batched `generate`, left-padded; under ZeRO-3 with several
     workers every rank runs the same number of forwards: `synced_gpus`);
  2. score each completion with the graders (kubetune_trainer.graders);
  3. advantages relative to the group of the same prompt: reward minus the
     group's mean, divided by its standard deviation (grpo) or not (drGrpo);
  4. before any weight moves: the log-probabilities of the sampling policy (for
     the clipped ratio when iterations > 1) and of the reference (for the KL);
then the recipe optimises on the rollouts `iterations` times (one optimiser
step per pass). The loss per completion token t of completion i:
    -min(ratio_t A_i, clip(ratio_t, 1 - eps, 1 + eps) A_i) + beta k3_t
with ratio_t = p(t) / p_old(t) and k3_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1,
averaged per completion then over completions (grpo), or summed over every
token and divided by maxNewTokens x completions (drGrpo, length-unbiased).

Evaluation: greedy answers to the split's prompts, scored by the same graders:
eval_reward (and per grader), and eval_loss = -eval_reward, so what minimises
eval_loss (early stopping, the best checkpoint) maximises the held-out reward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from .. import data as D
from ..data import IGNORE
from .base import Splits, TrainContext, completion_mask, left_pad, rollout_batch

NAME = "grpo"
STD_EPS = 1e-4  # added to a group's standard deviation before dividing by it


# ---------------------------------------------------------------------------- data
@dataclass
class PromptExample(D.Example):
    """A prompt's tokens (labels all IGNORE: nothing is learned from the prompt) and
    its row, for the graders."""

    item: dict = field(default_factory=dict)
    prompt: Any = None  # text or messages, as the row gave it


def missing_message(name: str) -> str:
    return f"missing '{name}', which the grader reads as {{{{item.{name}}}}}"


def tokenize(norm: dict, tokenizer) -> tuple[list[int], list[int]]:
    """The prompt's tokens as the model sees them before it answers."""
    prompt = norm["prompt"]
    if isinstance(prompt, str):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    else:
        text = D.template(tokenizer, prompt, generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids, [IGNORE] * len(ids)


def build_prompts(rows: list, tokenizer, max_prompt: int, fields: frozenset = frozenset()):
    """One PromptExample per usable row; a prompt longer than max_prompt tokens
    (maxSeqLength less maxNewTokens) keeps its last max_prompt tokens, counted.
    A row without one of `fields` (the item fields the grader's templates name)
    is counted and left out: its score would compare with nothing."""
    report = D.DataReport(rows=len(rows))
    label = rows.label if isinstance(rows, D.Rows) else (lambda i: f"row {i + 1}")
    out: list[PromptExample] = []
    for index, row in enumerate(rows):
        norm, why = D.normalize(row, "prompt")
        if norm is not None:
            missing = sorted(f for f in fields if norm["item"].get(f) is None)
            if missing:
                norm, why = None, missing_message(missing[0])
        if norm is None:
            report.reject(label(index), why, row)
            continue
        ids, labels = tokenize(norm, tokenizer)
        if len(ids) > max_prompt:
            report.truncated += 1
            ids, labels = ids[-max_prompt:], labels[-max_prompt:]
        report.usable += 1
        report.tokens += len(ids)
        out.append(PromptExample(ids, labels, item=norm["item"], prompt=norm["prompt"]))
    return out, report


# ---------------------------------------------------------------------------- the maths
def advantages(rewards, group: int, scale: bool):
    """Per completion: its reward less its group's mean (groups are consecutive
    runs of `group` completions), divided by the group's standard deviation
    (Bessel-corrected, + STD_EPS) when `scale`. Also: per group, whether all its
    rewards were equal (no advantage: the group teaches nothing)."""
    r = rewards.view(-1, group)
    mean = r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, keepdim=True)
    adv = r - mean
    if scale:
        adv = adv / (std + STD_EPS)
    return adv.reshape(-1), std.view(-1) < 1e-6


def k3(logp, ref):
    """Per token: the k3 estimator of KL(policy || reference), never negative."""
    import torch

    d = ref - logp
    return torch.exp(d) - d - 1


def policy_loss(
    logp,
    old_logp,
    ref_logp,
    adv,
    seq,
    n_seq: int,
    *,
    epsilon: float,
    beta: float,
    loss_type: str,
    max_new_tokens: int,
):
    """The loss of a batch of completion tokens, flattened: per token its
    log-probability under the policy (with grad), under the sampling policy and
    under the reference (ref_logp None: beta is 0), and `seq` the completion it
    belongs to (0..n_seq-1, whose advantage is adv[seq]). Returns (loss, per-token
    KL, per-token clipped mask)."""
    import torch

    ratio = torch.exp(logp - old_logp)
    a = adv[seq]
    unclipped = ratio * a
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * a
    per_token = -torch.min(unclipped, clipped)
    kl = k3(logp, ref_logp) if ref_logp is not None else torch.zeros_like(logp)
    if beta:
        per_token = per_token + beta * kl
    if loss_type == "drGrpo":
        loss = per_token.sum() / (n_seq * max_new_tokens)
    else:
        sums = torch.zeros(n_seq, dtype=per_token.dtype, device=per_token.device)
        counts = torch.zeros_like(sums)
        sums = sums.index_add(0, seq, per_token)
        counts = counts.index_add(0, seq, torch.ones_like(per_token))
        loss = (sums / counts.clamp(min=1)).mean()
    return loss, kl.detach(), (unclipped != clipped).detach()


# ---------------------------------------------------------------------------- rollouts
def token_logps(head, forward, batch: dict, temperature: float):
    """Per completion token (flattened, in row order): its log-probability under
    softmax(logits / temperature), and the row it belongs to."""
    import torch.nn.functional as F

    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "labels")}
    logits, target = head.logits(forward, inputs)
    keep = batch["labels"][:, 1:] != IGNORE
    rows = keep.nonzero()[:, 0]
    return -F.cross_entropy(logits / temperature, target, reduction="none"), rows


# ---------------------------------------------------------------------------- objective
class Grpo:
    name = NAME

    def __init__(self, spec):
        self.spec = spec
        self.cfg = spec.method.grpo
        self.updates_per_step = self.cfg.iterations
        # the KL term needs the starting policy while training (full fine-tuning: a
        # frozen copy); beta 0 needs no reference at all
        self.reference_use = "online" if self.cfg.beta else None
        self.ctx: Optional[TrainContext] = None
        self.graders = None
        self.tokenizer = None
        self._stats: dict[str, float] = {}
        self._per_grader: dict[str, float] = {}
        self._fails: dict[str, dict[str, int]] = {"errors": {}, "timeouts": {}}

    # ---------------------------------------------------------------- data
    def _max_prompt(self, max_len: int) -> int:
        return max(1, max_len - self.cfg.max_new_tokens)

    def build_examples(self, rows, fmt, tokenizer, max_len):
        self.tokenizer = tokenizer
        fields = frozenset(grader_fields(self.cfg.grader))
        return build_prompts(rows, tokenizer, self._max_prompt(max_len), fields)

    def tokenize(self, norm, tokenizer):
        ids, labels = tokenize(norm, tokenizer)
        # the completion shares maxSeqLength with its prompt
        return ids + [0] * self.cfg.max_new_tokens, labels + [0] * self.cfg.max_new_tokens

    def units(self, examples, max_len, packing, seed):
        return [[i] for i in range(len(examples))]

    def collate(self, examples, units, pad_id, packing):
        import torch

        return {"example_ids": torch.tensor([i for u in units for i in u], dtype=torch.long)}

    # ---------------------------------------------------------------- setup
    def setup(self, ctx: TrainContext, splits: Splits) -> None:
        from ..graders import Graders

        self.ctx = ctx
        self.splits = splits
        base_dir = D.data_dir(self.spec)
        self.graders = Graders(self.cfg.grader, base_dir=base_dir)
        self.reference = make_reference(ctx) if self.cfg.beta else None
        ctx.log(
            f"grpo: {self.cfg.generations_per_prompt} completions per prompt, at most "
            f"{self.cfg.max_new_tokens} tokens, loss {self.cfg.loss_type}, beta {self.cfg.beta}, "
            f"{self.cfg.iterations} pass(es) per batch of rollouts"
        )

    def close(self) -> None:
        if self.graders is not None:
            self.graders.close()
            self.graders = None

    # ---------------------------------------------------------------- rollouts
    def _generate(self, examples: list[PromptExample], n: int, greedy: bool):
        """Completions of each prompt, n per prompt (consecutive), as token tensors."""
        import torch

        w, c = self.ctx.worker, self.cfg
        pad = self.ctx.pad_id
        prompts = [ex.input_ids for ex in examples for _ in range(n)]
        ids, mask = left_pad(prompts, pad)
        ids, mask = ids.to(w.device), mask.to(w.device)
        kwargs: dict = {"max_new_tokens": c.max_new_tokens}
        if greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=c.temperature, top_p=c.top_p, top_k=0)
        model = w.engine.module
        w.engine.eval()
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                pad_token_id=pad,
                eos_token_id=self.tokenizer.eos_token_id,
                use_cache=True,
                synced_gpus=w.stage == 3 and w.world > 1,
                **kwargs,
            )
        w.engine.train()
        completions = out[:, ids.shape[1] :]
        if completions.shape[1] == 0:  # every row stopped at once
            completions = torch.full((len(prompts), 1), pad, dtype=torch.long, device=w.device)
        comp_mask = completion_mask(completions, self.tokenizer.eos_token_id)
        return ids, mask, completions, comp_mask

    def _score(self, examples, completions, comp_mask, n: int):
        texts = [
            self.tokenizer.decode(row[m.bool()], skip_special_tokens=True)
            for row, m in zip(completions.cpu(), comp_mask.cpu(), strict=True)
        ]
        items = [ex.item for ex in examples for _ in range(n)]
        scores = self.graders.score([{"output_text": t} for t in texts], items)
        return texts, scores

    def _reference_logps(self, batch: dict):
        """The reference policy's token log-probabilities (the one place it is called)."""
        import torch

        w = self.ctx.worker
        with torch.no_grad(), self.reference.active():
            logps, _ = token_logps(w.head, w.engine, batch, self.cfg.temperature)
        return logps.detach()

    def step_batches(self, batches: list[tuple[dict, int]]) -> list[tuple[dict, int]]:
        """The step's micro-batches of prompts → rollouts, `iterations` times over."""
        import torch

        c, w = self.cfg, self.ctx.worker
        examples = self.splits["train"][0]
        g = c.generations_per_prompt
        rollouts = []
        for batch, _tokens in batches:
            exs = [examples[i] for i in batch["example_ids"].tolist()]
            p_ids, p_mask, comp, comp_mask = self._generate(exs, g, greedy=False)
            _texts, scores = self._score(exs, comp, comp_mask, g)
            rewards = torch.tensor(scores.total, dtype=torch.float32)
            adv, flat = advantages(rewards, g, scale=c.loss_type == "grpo")
            rb = rollout_batch(p_ids, p_mask, comp, comp_mask)
            rb["advantages"] = adv.to(w.device)
            with torch.no_grad():
                if c.iterations > 1:
                    w.engine.eval()
                    rb["old_logps"], _ = token_logps(w.head, w.engine, rb, c.temperature)
                    w.engine.train()
                if c.beta:
                    rb["ref_logps"] = self._reference_logps(rb)
            self._record(rewards, g, flat, comp_mask, scores)
            rollouts.append((rb, int(p_mask.sum() + comp_mask.sum())))
        return [r for _ in range(c.iterations) for r in rollouts]

    def _record(self, rewards, g: int, flat, comp_mask, scores) -> None:
        s = self._stats
        n = rewards.numel()
        for key, v in (
            ("n", n),
            ("reward", float(rewards.sum())),
            ("reward_sq", float((rewards**2).sum())),
            ("group_std", float(rewards.view(-1, g).std(dim=1).sum())),
            ("groups", n // g),
            ("zero_std", float(flat.sum())),
            ("length", float(comp_mask.sum())),
        ):
            s[key] = s.get(key, 0.0) + v
        for name, vals in scores.per_grader.items():
            self._per_grader[name] = self._per_grader.get(name, 0.0) + sum(vals)
        for kind, counts in (("errors", scores.errors), ("timeouts", scores.timeouts)):
            for name, k in counts.items():
                self._fails[kind][name] = self._fails[kind].get(name, 0) + k

    # ---------------------------------------------------------------- train
    def loss(self, batch: dict):
        c, w = self.cfg, self.ctx.worker
        logp, seq = token_logps(w.head, w.engine, batch, c.temperature)
        old = batch.get("old_logps")
        old = logp.detach() if old is None else old
        loss, kl, clipped = policy_loss(
            logp,
            old,
            batch.get("ref_logps"),
            batch["advantages"],
            seq,
            batch["input_ids"].shape[0],
            epsilon=c.epsilon,
            beta=c.beta,
            loss_type=c.loss_type,
            max_new_tokens=c.max_new_tokens,
        )
        s = self._stats
        s["kl"] = s.get("kl", 0.0) + float(kl.sum())
        s["clipped"] = s.get("clipped", 0.0) + float(clipped.float().sum())
        s["tokens"] = s.get("tokens", 0.0) + kl.numel()
        return loss

    def metrics(self) -> dict:
        """Means since the last metrics row over every worker; grader failures as
        counts per grader since the last row."""
        names = sorted(self._per_grader)  # every rank scored: the same names everywhere
        keys = ("n", "reward", "reward_sq", "group_std", "groups", "zero_std", "length")
        keys += ("kl", "clipped", "tokens")
        values = [self._stats.get(k, 0.0) for k in keys]
        values += [self._per_grader.get(k, 0.0) for k in names]
        values += [self._fails[kind].get(k, 0) for kind in ("errors", "timeouts") for k in names]
        got = self.ctx.worker.allreduce(values)
        self._stats, self._per_grader = {}, {}
        self._fails = {"errors": {}, "timeouts": {}}
        s = dict(zip(keys, got[: len(keys)], strict=True))
        if not s["n"]:
            return {}
        k = len(names)
        per = got[len(keys) : len(keys) + k]
        errors = got[len(keys) + k : len(keys) + 2 * k]
        timeouts = got[len(keys) + 2 * k :]
        n, tokens = s["n"], max(s["tokens"], 1)
        return {
            "reward": s["reward"] / n,
            "reward_std": s["group_std"] / max(s["groups"], 1),
            "rewards_per_grader": {name: v / n for name, v in zip(names, per, strict=True)},
            "kl": s["kl"] / tokens,
            "completion_length": s["length"] / n,
            "frac_reward_zero_std": s["zero_std"] / max(s["groups"], 1),
            "grader_errors": {name: int(v) for name, v in zip(names, errors, strict=True)},
            "grader_timeouts": {name: int(v) for name, v in zip(names, timeouts, strict=True)},
        }

    def describe(self, row: dict) -> str:
        if row.get("reward") is None:
            return ""
        text = f" reward {row['reward']:.3f} (std {row['reward_std']:.3f}) kl {row['kl']:.4f}"
        text += f" len {row['completion_length']:.1f}"
        fails = sum((row.get("grader_errors") or {}).values())
        fails += sum((row.get("grader_timeouts") or {}).values())
        return text + (f" grader failures {fails}" if fails else "")

    # ---------------------------------------------------------------- evaluate
    def evaluate(self, examples, units, split: str) -> dict:
        """Greedy answers to the split's prompts, scored: eval_reward and the rest."""
        c = self.ctx
        w = c.worker
        sums = {"n": 0.0, "reward": 0.0, "reward_sq": 0.0, "length": 0.0}
        per: dict[str, float] = {}
        fails: dict[str, dict[str, int]] = {"errors": {}, "timeouts": {}}
        for weight, lo, hi in w.eval_shards(len(units), c.batch_size, c.max_batches):
            exs = [examples[i] for u in units[lo:hi] for i in u]
            if not exs:  # past the end: still generate, as every rank must (ZeRO-3)
                exs, weight = [examples[units[0][0]]], 0.0
            _p, _m, comp, comp_mask = self._generate(exs, 1, greedy=True)
            _texts, scores = self._score(exs, comp, comp_mask, 1)
            sums["n"] += weight * len(scores.total)
            sums["reward"] += weight * sum(scores.total)
            sums["reward_sq"] += weight * sum(x * x for x in scores.total)
            sums["length"] += weight * float(comp_mask.sum())
            for name, vals in scores.per_grader.items():
                per[name] = per.get(name, 0.0) + weight * sum(vals)
            for kind, counts in (("errors", scores.errors), ("timeouts", scores.timeouts)):
                for name, k in counts.items():
                    fails[kind][name] = fails[kind].get(name, 0) + int(weight * k)
        # every rank scored at least one batch: the same graders' names everywhere
        names = sorted(per)
        values = list(sums.values()) + [per.get(k, 0.0) for k in names]
        values += [fails[kind].get(k, 0) for kind in ("errors", "timeouts") for k in names]
        got = w.allreduce(values)
        n, reward, reward_sq, length = got[:4]
        n = max(n, 1)
        mean = reward / n
        k = len(names)
        out = {
            "eval_loss": -mean,
            "eval_reward": mean,
            "eval_reward_std": math.sqrt(max(reward_sq / n - mean * mean, 0.0)),
            "eval_rewards_per_grader": {
                name: v / n for name, v in zip(names, got[4 : 4 + k], strict=True)
            },
            "eval_completion_length": length / n,
        }
        errors, timeouts = got[4 + k : 4 + 2 * k], got[4 + 2 * k :]
        out["eval_grader_errors"] = {nm: int(v) for nm, v in zip(names, errors, strict=True)}
        out["eval_grader_timeouts"] = {nm: int(v) for nm, v in zip(names, timeouts, strict=True)}
        return out


# ---------------------------------------------------------------------------- helpers
def grader_fields(grader) -> set[str]:
    """The item fields the grader's templates name (kubetune_api.graders.fields)."""
    from kubetune_api import graders

    return graders.fields(grader)


def make_reference(ctx: TrainContext):
    """The reference policy: where the job starts (kubetune_trainer.objectives.reference)."""
    from .reference import Reference

    return Reference(ctx)
