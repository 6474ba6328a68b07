"""Knowledge distillation: a student learns from a frozen teacher model.

Data: the supervised formats SFT trains on, tokenized as SFT does (the loss is on
the response tokens). The teacher is method.distill.teacher (a Hugging Face id
or a folder of weights, read with spec.model's access), or spec.model itself
when unset: the base model without its parent (fromJob / fromCheckpoint) and
without pruning, so the student (a pruned copy, an adapter, a fine-tune) learns
what the full model answers. It must share the student's tokenizer: the same
vocabulary, token for token (checked when it loads). It runs frozen, in eval
mode and without gradients; under ZeRO-3 on its own DeepSpeed engine, its
weights partitioned over the workers like the student's (reference.place_frozen,
as GRPO's frozen reference copy), else on the worker's device.

Two modes (method.distill.mode):

- logits: on every response token the student's next-token distribution is
  pulled towards the teacher's. With temperature T, p_t = softmax(teacher / T),
  p_s = softmax(student / T) over the vocabulary, per token
      forwardKL:  KL(p_t || p_s) = sum p_t (log p_t - log p_s)
      reverseKL:  KL(p_s || p_t) = sum p_s (log p_s - log p_t)
  averaged over the micro-batch's response tokens and multiplied by T^2 (so the
  gradients keep their size as T grows; Hinton et al.). The loss is
      weight x T^2 x KL + (1 - weight) x cross-entropy on the data's own answers.
  tokens picks the positions of the KL: responses (the default), the response
  tokens, where the next-token loss is; all, every next token of each example,
  the prompt's included (the next-token loss stays on the responses). A pruned
  student, which must relearn the language as well as the task, gets more of the
  teacher's signal per step from all. The student's own answers (onPolicyFraction)
  take the KL on the answer tokens whatever tokens says.
  Train rows: distill_kl (the KL per token at T, without the T^2), distill_ce.
- sequence: before the first step the teacher answers every training prompt
  once (greedy, up to maxNewTokens; the prompt is each example's tokens before
  its first labelled one, so a multi-turn chat keeps its first turn), and the
  student trains on prompt + teacher answer with the next-token loss. The
  answers are stored under the job's prefix as distill/answers-<fingerprint>.json,
  the fingerprint a hash of the teacher (its source, config and a checksum of its
  weights), the prompts' tokens and the generation settings: a resumed attempt,
  or a rerun on the same prefix, reads them back instead of generating again.

Evaluation, on the held-out split's own answers: eval_loss (the student's
next-token loss, comparable with SFT's), eval_perplexity, eval_token_accuracy,
eval_agreement (the share of response tokens where the student's most likely
next token is the teacher's), eval_distill_kl (the KL of the configured
direction at temperature 1) and teacher_eval_loss (the teacher's own next-token
loss on the same tokens: what the student is working towards). Train rows also
carry teacher_tokens_per_second (the teacher's forwards), and the first row of
an attempt teacher_parameters and student_parameters.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from typing import Any, Optional

from kubetune_api import storage as contract

from .. import data as D
from .. import model as M
from .base import (
    FixedExamples,
    Splits,
    SupervisedData,
    TrainContext,
    completion_mask,
    left_pad,
    rollout_batch,
)
from .reference import place_frozen

NAME = "distill"
ANSWERS = "distill/answers-{fingerprint}.json"


class TeacherError(ValueError):
    pass


# ---------------------------------------------------------------------------- loss
def token_kl(student_logits, teacher_logits, temperature: float, loss: str):
    """The KL of each row (token) between the two next-token distributions at
    `temperature`: forwardKL is KL(teacher || student), reverseKL KL(student || teacher)."""
    import torch.nn.functional as F

    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if loss == "reverseKL":
        return (s.exp() * (s - t)).sum(-1)
    return (t.exp() * (t - s)).sum(-1)


def distill_loss(student_logits, teacher_logits, target, temperature: float, loss: str, weight):
    """(loss, kl, ce) of a set of token positions: weight x T^2 x mean KL over all of
    them + (1 - weight) x cross-entropy over those with a label (target not IGNORE:
    tokens all's prompt positions have none); kl (per token at T) and ce come back
    detached."""
    import torch.nn.functional as F

    labelled = target != D.IGNORE
    zero = student_logits.sum() * 0.0
    if target.numel() == 0:
        return zero, zero.detach(), zero.detach()
    kl = token_kl(student_logits, teacher_logits, temperature, loss).mean()
    if labelled.any():
        ce = F.cross_entropy(student_logits[labelled].float(), target[labelled])
    else:
        ce = zero
    total = weight * temperature**2 * kl + (1 - weight) * ce
    return total, kl.detach(), ce.detach()


# ---------------------------------------------------------------------------- teacher
def teacher_source(model, teacher, job_model: Optional[str] = None):
    """spec.model with the teacher's name, uri and revision (or, for teacher.fromJob,
    `job_model`: the whole model that job saved); unset: spec.model itself. Either
    way without a parent and without pruning (where the spec has that field)."""
    update: dict[str, Any] = {"from_job": None, "from_checkpoint": None, "merge_parent": False}
    if "prune" in type(model).model_fields:
        update["prune"] = None
    if job_model:
        update.update(name=None, uri=job_model, revision=None, gguf_file=None)
    elif teacher is not None and (teacher.name or teacher.uri):
        update.update(name=teacher.name, uri=teacher.uri, revision=teacher.revision)
        update["gguf_file"] = None
    elif teacher is not None and teacher.revision:
        update["revision"] = teacher.revision
    return model.model_copy(update=update)


def describe_source(source) -> str:
    what = source.name or source.uri
    return f"{what}@{source.revision}" if source.revision else str(what)


def check_vocabulary(student_tok, teacher_tok, teacher_name: str) -> None:
    """The two tokenizers must map the same strings to the same ids."""
    s, t = student_tok.get_vocab(), teacher_tok.get_vocab()
    if s == t:
        return
    differ = sorted(set(s.items()) ^ set(t.items()))[:3]
    raise TeacherError(
        f"method.distill.teacher: the teacher {teacher_name} has a vocabulary of {len(t)} "
        f"tokens, the student {len(s)}, and they differ (e.g. {differ}): distillation "
        "compares next-token distributions, so the two must share the tokenizer. Pick a "
        "teacher of the student's family (same tokenizer), or use mode sequence with a "
        "teacher that shares it"
    )


def prompt_of(ex: D.Example) -> Optional[list[int]]:
    """The tokens before the first labelled one (None: nothing before it, or no label)."""
    for j, label in enumerate(ex.labels):
        if label != D.IGNORE:
            return list(ex.input_ids[:j]) if j > 0 else None
    return None


def answered(prompt: list[int], answer: list[int], max_len: int) -> D.Example:
    ids = (prompt + answer)[:max_len]
    labels = ([D.IGNORE] * len(prompt) + answer)[:max_len]
    return D.Example(ids, labels)


def fingerprint(source, teacher_model, prompts: list, max_new_tokens: int) -> str:
    """What the cached answers depend on: the teacher, the prompts, the generation."""
    import torch

    h = hashlib.sha256()
    h.update(describe_source(source).encode())
    h.update(json.dumps(teacher_model.config.to_dict(), sort_keys=True, default=str).encode())
    with torch.no_grad():
        checksum = sum(float(p.double().sum()) for p in teacher_model.parameters())
    h.update(repr(round(checksum, 6)).encode())
    h.update(json.dumps({"greedy": True, "maxNewTokens": max_new_tokens}).encode())
    h.update(json.dumps(prompts).encode())
    return h.hexdigest()[:20]


# ---------------------------------------------------------------------------- objective
class Distill(SupervisedData, FixedExamples):
    name = NAME

    def __init__(self, spec):
        self.spec = spec
        self.cfg = spec.method.distill
        # the settings' enums, as their values (the spec may hold either)
        self.mode = getattr(self.cfg.mode, "value", self.cfg.mode)
        self.loss_kind = getattr(self.cfg.loss, "value", self.cfg.loss)
        self.tokens = getattr(self.cfg.tokens, "value", self.cfg.tokens)
        self.ctx: Optional[TrainContext] = None
        self.teacher = None
        self.t_head = None
        self._stats = None
        self._teacher_time = 0.0
        self._teacher_tokens = 0
        self._sizes: Optional[dict] = None
        self._micro = 0  # micro-batches trained so far (onPolicyFraction's count)
        self._on_policy_batches = 0

    # ---------------------------------------------------------------- setup
    def setup(self, ctx: TrainContext, splits: Splits) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.ctx = ctx
        spec, w = self.spec, ctx.worker
        self._micro = ctx.start_step * spec.hyperparameters.gradient_accumulation_steps
        source = teacher_source(spec.model, self.cfg.teacher, ctx.teacher_uri)
        path = M.resolve_model_path(source)
        kwargs: dict = {"revision": source.revision, "trust_remote_code": source.trust_remote_code}
        if source.gguf_file:
            kwargs["gguf_file"] = source.gguf_file
        student_tok = M.load_tokenizer(spec, ctx.model_path)
        self.tokenizer = student_tok
        check_vocabulary(
            student_tok, AutoTokenizer.from_pretrained(path, **kwargs), describe_source(source)
        )
        precision = spec.hyperparameters.precision if spec.method.type != "qlora" else "bf16"
        model = AutoModelForCausalLM.from_pretrained(path, dtype=M.torch_dtype(precision), **kwargs)
        model.requires_grad_(False)
        model.eval()
        teacher_params, _ = M.count_parameters(model)
        student_params, _ = M.count_parameters(w.engine.module)
        self._sizes = {"teacher_parameters": teacher_params, "student_parameters": student_params}
        self.vocab = min(
            model.get_output_embeddings().weight.shape[0],
            _output_size(w.engine.module),
        )
        ctx.log(
            f"distill: teacher {describe_source(source)} ({teacher_params / 1e6:.1f}M "
            f"parameters), student {student_params / 1e6:.1f}M; mode {self.mode}"
        )
        fp = None
        if self.mode == "sequence":
            fp = fingerprint(
                source,
                model,
                [prompt_of(ex) for ex in splits["train"][0]],
                self.cfg.max_new_tokens,
            )
        self.t_head = M.LabelledHead(model)
        self.teacher = place_frozen(model, w)
        if fp is not None:
            self._answer(splits, fp)

    def _answer(self, splits: Splits, fp: str) -> None:
        """Sequence mode: the train split's examples become prompt + teacher answer,
        read from the cache when its fingerprint matches, else generated and stored."""
        c, w = self.ctx, self.ctx.worker
        examples, units = splits["train"]
        rel = ANSWERS.format(fingerprint=fp)
        cached = None
        if w.rank == 0:
            cached = c.storage.read_json(rel)
        cached = w.gather(cached)[0]
        if cached is not None:
            answers = {int(k): v["answer"] for k, v in cached["answers"].items()}
            c.log(f"distill: {len(answers)} teacher answers read from {c.storage.uri(rel)}")
        else:
            c.progress(contract.TrainPhase.loading, "the teacher answers the training prompts")
            t0 = time.monotonic()
            answers = self._generate(examples)
            if w.rank == 0:
                entries = {
                    str(k): {"prompt": prompt_of(examples[k]), "answer": v}
                    for k, v in sorted(answers.items())
                }
                c.storage.write_json(rel, {"fingerprint": fp, "answers": entries})
            w.barrier()
            c.log(
                f"distill: the teacher answered {len(answers)} prompts in "
                f"{time.monotonic() - t0:.1f}s; stored in {c.storage.uri(rel)}"
            )
        ds = self.spec.dataset
        for i, answer in answers.items():
            prompt = prompt_of(examples[i])
            if prompt is None or not answer:
                continue
            ex = answered(prompt, answer, ds.max_seq_length)
            if any(x != D.IGNORE for x in ex.labels[1:]):  # else the prompt filled it: keep
                examples[i] = ex
        units[:] = self.units(
            examples, ds.max_seq_length, ds.packing, self.spec.hyperparameters.seed
        )

    def _generate(self, examples: list[D.Example]) -> dict[int, list[int]]:
        """Greedy answers of the teacher to every example's prompt, each rank a share
        (every rank runs as many generate calls: ZeRO-3 gathers weights in them)."""
        import torch

        c, w = self.ctx, self.ctx.worker
        todo = [i for i, ex in enumerate(examples) if prompt_of(ex) is not None]
        mine = todo[w.rank :: w.world]
        size = max(1, c.batch_size)
        calls = math.ceil(math.ceil(len(todo) / w.world) / size) if todo else 0
        module = self.teacher.module if hasattr(self.teacher, "module") else self.teacher
        eos = self.tokenizer.eos_token_id
        out: dict[int, list[int]] = {}
        for k in range(calls):
            batch = mine[k * size : (k + 1) * size]
            prompts = [prompt_of(examples[i]) for i in batch] or [prompt_of(examples[todo[0]])]
            ids, mask = left_pad(prompts, c.pad_id)
            with torch.no_grad():
                gen = module.generate(
                    input_ids=ids.to(w.device),
                    attention_mask=mask.to(w.device),
                    max_new_tokens=self.cfg.max_new_tokens,
                    do_sample=False,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                    pad_token_id=c.pad_id,
                    eos_token_id=eos,
                    use_cache=True,
                    synced_gpus=w.stage == 3 and w.world > 1,
                )
            rows = gen[:, ids.shape[1] :].tolist()[: len(batch)]  # a placeholder call: none
            for i, row in zip(batch, rows, strict=True):
                if eos in row:
                    row = row[: row.index(eos) + 1]  # the answer ends with its eos
                out[i] = row
        merged: dict[int, list[int]] = {}
        for part in w.gather(out):
            merged.update(part)
        return merged

    # ---------------------------------------------------------------- on-policy (GKD)
    def step_batches(self, batches: list[tuple[dict, int]]) -> list[tuple[dict, int]]:
        """With onPolicyFraction f, micro-batch k (counted from the start of training,
        the same on every rank and after a resume) is replaced by the student's own
        answers to its prompts when floor((k + 1) f) > floor(k f)."""
        f = self.cfg.on_policy_fraction
        if self.mode != "logits" or not f:
            return batches
        out = []
        for batch, n_tok in batches:
            k = self._micro
            self._micro += 1
            if math.floor((k + 1) * f) > math.floor(k * f):
                batch, n_tok = self._on_policy(batch)
            out.append((batch, n_tok))
        return out

    def _on_policy(self, batch: dict) -> tuple[dict, int]:
        """The student's sampled answers (temperature 1, up to maxNewTokens) to the
        prompts of a micro-batch's rows (a packed row: its first example's), as a
        batch labelled on those answers; the loss takes only the KL on it."""
        import torch

        w, c = self.ctx.worker, self.ctx
        keep = self.spec.dataset.max_seq_length - self.cfg.max_new_tokens
        prompts = []
        for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist(), strict=True):
            j = next((t for t, x in enumerate(labels) if x != D.IGNORE), 1)
            prompts.append(ids[: max(j, 1)][-keep:])
        p_ids, p_mask = left_pad(prompts, c.pad_id)
        p_ids, p_mask = p_ids.to(w.device), p_mask.to(w.device)
        eos = self.tokenizer.eos_token_id
        w.engine.eval()
        with torch.no_grad():
            out = w.engine.module.generate(
                input_ids=p_ids,
                attention_mask=p_mask,
                max_new_tokens=self.cfg.max_new_tokens,
                do_sample=True,
                temperature=1.0,
                top_p=1.0,
                top_k=0,
                pad_token_id=c.pad_id,
                eos_token_id=eos,
                use_cache=True,
                synced_gpus=w.stage == 3 and w.world > 1,
            )
        w.engine.train()
        completions = out[:, p_ids.shape[1] :]
        if completions.shape[1] == 0:  # every row stopped at once
            completions = torch.full((len(prompts), 1), eos, dtype=torch.long, device=w.device)
        comp_mask = completion_mask(completions, eos)
        made = rollout_batch(p_ids, p_mask, completions, comp_mask)
        made["_on_policy"] = True
        self._on_policy_batches += 1
        return made, int(made["attention_mask"].sum())

    # ---------------------------------------------------------------- teacher forward
    def _teacher_logits(self, batch: dict, keep=None):
        """The teacher's logits at the labelled positions, or at `keep`'s."""
        import torch

        t0 = time.perf_counter()
        with torch.no_grad():
            if keep is None:
                logits, _ = self.t_head.logits(self.teacher, batch)
            else:
                logits = self.t_head.logits_at(self.teacher, batch, keep)
        if logits.is_cuda:
            torch.cuda.synchronize()
        self._teacher_time += time.perf_counter() - t0
        self._teacher_tokens += (
            int((batch["attention_mask"] > 0).sum())
            if ("attention_mask" in batch)
            else int(batch["input_ids"].numel())
        )
        return logits[:, : self.vocab]

    # ---------------------------------------------------------------- training
    def loss(self, batch: dict):
        import torch

        w = self.ctx.worker
        if self.mode == "sequence":
            return w.head.loss(w.engine, batch)
        # the student's own answers (GKD): the KL only, no next-token loss on them
        on_policy = batch.pop("_on_policy", False)
        weight = 1.0 if on_policy else self.cfg.weight
        if self.tokens == "all" and not on_policy:
            # every next token of each example; the prompts' positions have no label
            keep = D.next_token_positions(batch, self.ctx.pad_id)
            logits = w.head.logits_at(w.engine, batch, keep)
            target = batch["labels"][:, 1:][keep]
            teacher = self._teacher_logits(batch, keep)
        else:
            logits, target = w.head.logits(w.engine, batch)
            teacher = self._teacher_logits(batch)
        c = self.cfg
        total, kl, ce = distill_loss(
            logits[:, : self.vocab], teacher, target, c.temperature, self.loss_kind, weight
        )
        labelled = float((target != D.IGNORE).sum())
        stats = torch.stack(
            [
                kl * target.numel(),
                ce * labelled,
                kl.new_tensor(float(target.numel())),
                kl.new_tensor(labelled),
            ]
        )
        self._stats = stats if self._stats is None else self._stats + stats
        return total

    def metrics(self) -> dict:
        out: dict = {}
        if self._sizes:
            out.update(self._sizes)
            self._sizes = None
        if self._stats is not None:
            kl, ce, n, n_ce = self.ctx.worker.allreduce([float(x) for x in self._stats])
            self._stats = None
            out.update(distill_kl=kl / max(n, 1), distill_ce=ce / max(n_ce, 1))
        if self.cfg.on_policy_fraction and self.mode == "logits":
            (n,) = self.ctx.worker.allreduce([self._on_policy_batches])
            out["distill_on_policy_batches"] = int(n)
            self._on_policy_batches = 0
        tokens, seconds = self.ctx.worker.allreduce([self._teacher_tokens, self._teacher_time])
        if seconds > 0:
            out["teacher_tokens_per_second"] = round(tokens / seconds * self.ctx.worker.world, 1)
        self._teacher_tokens, self._teacher_time = 0, 0.0
        return out

    def describe(self, row: dict) -> str:
        if row.get("distill_kl") is None:
            return ""
        return f" kl {row['distill_kl']:.4f} ce {row['distill_ce']:.4f}"

    def evaluate(self, examples, units, split: str) -> dict:
        import torch
        import torch.nn.functional as F

        c = self.ctx
        w = c.worker
        w.engine.eval()
        sums = [0.0] * 6  # ce, correct, agree, kl, teacher ce, tokens
        with torch.no_grad():
            for weight, lo, hi in w.eval_shards(len(units), c.batch_size, c.max_batches):
                batch = w.to_device(D.collate(examples, units[lo:hi], c.pad_id, c.packing))
                logits, target = w.head.logits(w.engine, batch)
                logits = logits[:, : self.vocab]
                teacher = self._teacher_logits(batch)
                kl = token_kl(logits, teacher, 1.0, self.loss_kind)
                for k, v in enumerate(
                    (
                        F.cross_entropy(logits, target, reduction="sum").item(),
                        (logits.argmax(-1) == target).sum().item(),
                        (logits.argmax(-1) == teacher.argmax(-1)).sum().item(),
                        kl.sum().item(),
                        F.cross_entropy(teacher.float(), target, reduction="sum").item(),
                        target.numel(),
                    )
                ):
                    sums[k] += weight * v
        self._teacher_tokens, self._teacher_time = 0, 0.0  # throughput counts training
        w.engine.train()
        ce, correct, agree, kl, t_ce, n = w.allreduce(sums)
        n = max(n, 1)
        return {
            "eval_loss": ce / n,
            "eval_perplexity": math.exp(min(ce / n, 50)),
            "eval_token_accuracy": correct / n,
            "eval_agreement": agree / n,
            "eval_distill_kl": kl / n,
            "teacher_eval_loss": t_ce / n,
        }


def _output_size(module) -> int:
    """The student's vocabulary width (its head's rows; ZeRO-3 keeps the full shape in
    ds_shape)."""
    head = module.get_output_embeddings()
    weight = head.weight
    shape = getattr(weight, "ds_shape", None) or weight.shape
    return int(shape[0])
