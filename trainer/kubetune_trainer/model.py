"""Model: where the weights come from, the fine-tuning method, ZeRO stage choice."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from . import freeze as freeze_mod
from . import prune as prune_mod
from . import staging
from .data import IGNORE
from .storage import filesystem

# the name peft gives the adapter training creates or continues (get_peft_model,
# PeftModel.from_pretrained); objectives.reference loads a frozen one beside it
TRAINED_ADAPTER = "default"


def cache_root() -> Path:
    return Path(os.environ.get("KUBETUNE_CACHE", Path.home() / ".cache" / "kubetune"))


def resolve_model_path(source, environ=None) -> str:
    """A local folder or Hugging Face id that from_pretrained can read. Object-store
    URIs are fetched once per node into the cache (a marker file says complete),
    or read from the job's stage (kubetune_trainer.staging) when there is one."""
    if source.name:
        return source.name
    uri = source.uri
    if "://" not in uri:
        return str(Path(uri).expanduser().resolve())
    if uri.startswith("file://"):
        return uri[len("file://") :]
    staged = staging.local(uri, environ)  # the job's stage, when the pods share one
    if staged is not None:
        return staged
    dest = cache_root() / "models" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    done = dest / ".kubetune-complete"
    if done.exists():
        return str(dest)
    lock = dest.with_suffix(".lock")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:  # another worker on this node is fetching it
        while not done.exists():
            if not lock.exists() and not done.exists():
                return resolve_model_path(source, environ)
            time.sleep(1)
        return str(dest)
    try:
        fs, path = filesystem(uri, source, "MODEL", environ)
        fs.get(path.rstrip("/") + "/", str(dest) + "/", recursive=True)
        done.touch()
    finally:
        os.close(fd)
        lock.unlink(missing_ok=True)
    return str(dest)


def load_tokenizer(spec, path: str):
    from transformers import AutoTokenizer

    m = spec.model
    kwargs = {"revision": m.revision, "trust_remote_code": m.trust_remote_code}
    if m.gguf_file:
        kwargs["gguf_file"] = m.gguf_file
    tok = AutoTokenizer.from_pretrained(path, **kwargs)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def torch_dtype(precision: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def label_config(labels: list[str], pad_id) -> dict:
    """method.task classification: the from_pretrained arguments of the head (the
    labels' ids in both directions; the pad id the model pools before)."""
    return {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {name: i for i, name in enumerate(labels)},
        "pad_token_id": pad_id,
    }


def load_model(
    spec, path: str, use_gpu: bool, parent=None, on_prune=None, labels=None, pad_id=None
):
    """The model ready for DeepSpeed: base weights, peft adapters when lora/qlora.

    `parent` (kubetune_trainer.parent.Parent): a fully fine-tuned parent's
    weights replace the base; a parent adapter is merged into the base first
    (parent.merge) or becomes the adapter that training continues. Then
    spec.model.prune drops decoder layers (kubetune_trainer.prune), before the
    adapters are added; `on_prune` receives its PruneReport. method.task
    classification: AutoModelForSequenceClassification on the same checkpoint, a
    new head (`score`) over `labels` that pools the last token before `pad_id`;
    LoRA's task SEQ_CLS keeps the head trainable and saved with the adapter. With qlora the
    weights are 4-bit from the load on: dropping layers then gives the same
    model as dropping them first, as each weight is quantized on its own."""
    if parent is not None and parent.kind == "model":
        path = parent.local
    import torch
    from transformers import AutoModelForCausalLM

    m, method, hp = spec.model, spec.method, spec.hyperparameters
    kwargs = {
        "revision": m.revision,
        "trust_remote_code": m.trust_remote_code,
        "dtype": torch_dtype(hp.precision) if method.type != "qlora" else torch.bfloat16,
    }
    if m.gguf_file:
        kwargs["gguf_file"] = m.gguf_file
    if method.type == "qlora":
        if not use_gpu:
            raise RuntimeError("qlora needs a GPU (bitsandbytes); the spec validation rejects this")
        from transformers import BitsAndBytesConfig

        q = method.quantization
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=q.quant_type,
            bnb_4bit_use_double_quant=q.double_quant,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    classify = spec.method.task == "classification"
    if classify:
        from transformers import AutoModelForSequenceClassification

        kwargs.update(label_config(labels, pad_id))
        model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.config.use_cache = False  # training; also lets packed position ids work
    adapter = parent.local if parent is not None and parent.kind == "adapter" else None
    if adapter and parent.merge:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        adapter = None
    if m.prune is not None:
        if adapter:  # the API refuses it (rule prune-parent-needs-merge)
            raise prune_mod.PruneError(
                "spec.model.mergeParent",
                "a parent's adapter cannot continue on a pruned model",
                "set it to true",
            )
        report = prune_mod.apply(model, spec)
        if on_prune is not None:
            on_prune(report)
    if hp.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if method.type == "full":
        return model
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

    if method.type == "qlora":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=hp.gradient_checkpointing
        )
    elif hp.gradient_checkpointing:
        model.enable_input_require_grads()
    if adapter:
        # the parent's own LoRA config (rank, targets) comes with it
        return PeftModel.from_pretrained(model, adapter, is_trainable=True)
    lc = method.lora
    targets = lc.target_modules
    targets = "all-linear" if targets == ["all-linear"] else list(targets)
    layers = None
    if lc.layers is not None:
        field = "spec.method.lora.layers"
        blocks = freeze_mod.decoder_blocks(model, field)
        layers = freeze_mod.check_layers(field, lc.layers, len(blocks))
        if targets == "all-linear":  # peft takes layers_to_transform with names only
            targets = sorted(
                {
                    n.rsplit(".", 1)[-1]
                    for n, m in blocks.named_modules()
                    if isinstance(m, torch.nn.Linear)
                }
            )
    model = get_peft_model(
        model,
        LoraConfig(
            r=lc.r,
            lora_alpha=lc.alpha,
            lora_dropout=lc.dropout,
            target_modules=targets,
            modules_to_save=list(lc.modules_to_save) or None,
            layers_to_transform=layers,
            task_type="SEQ_CLS" if classify else "CAUSAL_LM",
        ),
    )
    return model


def count_parameters(model) -> tuple[int, int]:
    total = trainable = 0
    for p in model.parameters():
        n = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
        total += n
        if p.requires_grad:
            trainable += n
    return total, trainable


def pick_zero_stage(
    spec, n_params: int, gpu_memory_bytes: int | None, world: int, trainable: int | None = None
) -> tuple[int, str]:
    """The ZeRO stage for zeroStage: auto, and why. Bytes per parameter (mixed
    precision Adam): weights 2, gradients 2, optimizer state 12 (fp32 master +
    two moments) for trainable parameters; ZeRO-1 shards the 12, ZeRO-2 also
    the gradients, ZeRO-3 everything. `trainable`: a full fine-tune's count
    when method.full leaves layers frozen (else all of them)."""
    d = spec.distributed
    if d.zero_stage != "auto":
        return int(d.zero_stage), "set in the spec"
    if d.offload_parameters:
        return 3, "parameter offload needs ZeRO-3"
    full = spec.method.type == "full"
    trainable = (trainable or n_params) if full else max(1, n_params // 100)
    weights = n_params * (0.5 if spec.method.type == "qlora" else 2)
    if gpu_memory_bytes is None:
        return 2, "CPU training: ZeRO-2 shards optimizer state and gradients across workers"
    budget = 0.8 * gpu_memory_bytes
    if not full:
        if weights + 16 * trainable < budget:
            return 2, f"{n_params / 1e6:.0f}M parameters with adapters fit one GPU: ZeRO-2"
        return 3, f"{n_params / 1e6:.0f}M frozen parameters do not fit one GPU: ZeRO-3"
    if weights + 2 * trainable + 12 * trainable / world < budget:
        return 1, f"{n_params / 1e6:.0f}M parameters: optimizer sharding suffices (ZeRO-1)"
    if weights + (14 * trainable) / world < budget:
        return 2, f"{n_params / 1e6:.0f}M parameters: gradients sharded too (ZeRO-2)"
    return 3, f"{n_params / 1e6:.0f}M parameters need sharded weights (ZeRO-3)"


def deepspeed_config(spec, stage: int, use_gpu: bool) -> dict:
    hp, d = spec.hyperparameters, spec.distributed
    cfg: dict = {
        "train_micro_batch_size_per_gpu": hp.batch_size,
        "gradient_accumulation_steps": hp.gradient_accumulation_steps,
        "gradient_clipping": hp.max_grad_norm,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_optimization": {"stage": stage},
        # a torch optimizer is passed in: nothing to compile, also with offload
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
    }
    if hp.precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif hp.precision == "fp16":
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    z = cfg["zero_optimization"]
    if d.offload_optimizer and stage >= 2:
        z["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    if d.offload_parameters and stage == 3:
        z["offload_param"] = {"device": "cpu", "pin_memory": use_gpu}
    if stage == 3:
        z["stage3_gather_16bit_weights_on_model_save"] = False
    return cfg


class LabelledHead:
    """Runs the language-model head only at positions that have a label.

    The logits of every other position (prompt turns, padding, the first token
    of a packed example) are never used, and on chat data they are most of the
    positions; the head (vocabulary x hidden) and the cross-entropy over the
    vocabulary are a large share of a small model's step. A forward pre-hook on
    the output embeddings picks the labelled hidden states, so the model's own
    head code (soft-capping, logit scaling) still runs, on fewer rows.
    """

    def __init__(self, model):
        self.keep = None
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.enabled = head is not None
        if self.enabled:
            head.register_forward_pre_hook(self._select)

    def _select(self, module, args):
        if self.keep is None:
            return None
        return (args[0][self.keep], *args[1:])

    def logits(self, forward, batch: dict):
        """(logits, targets) of the labelled positions: forward(**inputs) runs the
        model (or the DeepSpeed engine) on the batch without its labels."""
        target = batch["labels"][:, 1:]
        keep = target != IGNORE
        return self.logits_at(forward, batch, keep), target[keep]

    def logits_at(self, forward, batch: dict, keep):
        """The logits of the positions t where keep[:, t] ([batch, length - 1]: position
        t predicts token t + 1), in row-major order."""
        import torch.nn.functional as F

        inputs = {k: v for k, v in batch.items() if k != "labels"}
        if self.enabled:
            self.keep = F.pad(keep, (0, 1), value=False)
        try:
            logits = forward(**inputs, use_cache=False).logits
        finally:
            self.keep = None
        if logits.dim() == 3:  # no head hook (or a model that reshapes): select here
            logits = logits[:, :-1][keep]
        return logits.float()

    def loss(self, forward, batch: dict):
        """Mean cross-entropy over the labelled tokens (what the model's own loss
        computes, without the logits nobody reads)."""
        import torch.nn.functional as F

        logits, target = self.logits(forward, batch)
        if target.numel() == 0:
            return logits.sum() * 0.0
        return F.cross_entropy(logits, target)
