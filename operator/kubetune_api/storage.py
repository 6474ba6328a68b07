"""The storage contract between the trainer (writer) and the operator (reader).

Everything a job produces lives under one prefix, `job_prefix(...)`:

    {prefix}/attempt.json                      AttemptRecord: the attempt that owns the
                                               prefix (the fence), written first by each attempt
    {prefix}/config.json                       the trainer config that ran
    {prefix}/progress.json                     ProgressRecord, rewritten every log step
    {prefix}/metrics.jsonl                     one MetricsRow per line, appended
    {prefix}/checkpoints/step-00000200/...     checkpoint files
    {prefix}/checkpoints/step-00000200/manifest.json   CheckpointManifest, written LAST
    {prefix}/checkpoints/quarantine/step-00000200-<time>/  a committed checkpoint that
                                               failed verification, moved aside (with
                                               skipped.json, a SkippedCheckpoint)
    {prefix}/outputs.json                      OutputsRecord, once the job is done
    {prefix}/run.json                          RunRecord (lineage), when training starts
    {prefix}/tracking.json                     TrackingRecord, when MLflow tracking is on
    {prefix}/adapter/ , {prefix}/merged/       final artifacts (a full fine-tune: model/),
                                               each described in outputs.json's `artifacts`
    {prefix}/loss.png                          loss curve

A checkpoint exists only once its manifest exists: a crash mid-upload leaves
files without a manifest, which readers ignore and writers overwrite. The
manifest records each file's size and sha256, so a file cut short or changed
after the commit is found before the trainer loads it (`verify_manifest`).

Fencing attempts. A retry is a new RayJob on the same prefix while the failed
attempt's pods may still run for their grace period. Every record carries the
attempt that wrote it (progress, metrics rows, manifests, outputs), and the
driver of attempt N first writes attempt.json (`take_over`): attempt N, and the
steps of the checkpoints older attempts committed before it (`inherited`).
From then on what an older attempt writes does not count for any reader, the
trainer's resume and the operator's status alike (`checkpoint_counts`,
`row_counts`, `record_counts`): a new attempt still resumes from what earlier
attempts committed before it started, never from what they commit after.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from enum import Enum
from typing import BinaryIO, Optional

from pydantic import Field

from .models import StorageAccess, _Model

PROGRESS = "progress.json"
METRICS = "metrics.jsonl"
OUTPUTS = "outputs.json"
CONFIG = "config.json"
ATTEMPT = "attempt.json"  # AttemptRecord, the fence: written first by every attempt
RUN_RECORD = "run.json"
TRACKING = "tracking.json"
CLEAN = "clean.json"  # spec.dataset.clean's report (kubetune_trainer.clean)
LOSS_CURVE = "loss.png"
CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
QUARANTINE = "quarantine"  # checkpoints/quarantine/: committed ones that failed verification
SKIPPED = "skipped.json"  # inside a quarantined folder: why it was moved there
ADAPTER = "adapter"
MERGED = "merged"
FULL_MODEL = "model"
GGUF = "gguf"  # output.gguf: one model-{type}.gguf per type
# output.interpolation: the published interpolated model: adapter/, merged/ or model/
INTERPOLATED = "interpolated"
HALT = "halt.json"  # a sweep asks a trial to stop (written by the sweep, read by the recipe)

_STEP_DIR = re.compile(r"^step-(\d{8,})$")


# Schemes whose first path segment is a bucket (an object store's namespace).
BUCKET_SCHEMES = ("s3", "gs", "gcs")
# Anywhere in a text: messages quote URIs mid-sentence.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]*@")


def strip_userinfo(uri: str) -> str:
    """`s3://KEY:SECRET@bucket/x` → `s3://bucket/x`, in a URI or in a text quoting
    one: credentials never travel in a URI the operator echoes (status, events,
    ConfigMaps, logs)."""
    return _USERINFO.sub(r"\g<scheme>", uri) if isinstance(uri, str) else uri


def redact_uris(obj):
    """`strip_userinfo` applied to every string inside a JSON-like value."""
    if isinstance(obj, dict):
        return {k: redact_uris(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact_uris(v) for v in obj]
    if isinstance(obj, str) and "://" in obj and "@" in obj:
        return strip_userinfo(obj)
    return obj


def split_uri(uri: str) -> tuple[str, str]:
    """(scheme, rest) with userinfo stripped; scheme "file" for a plain path.

    Raises ValueError for an object-store URI that names no bucket: reading
    `s3://` must never fall through to the local filesystem.
    """
    uri = strip_userinfo(uri)
    if "://" not in uri:
        return "file", uri
    scheme, rest = uri.split("://", 1)
    scheme = scheme.lower()
    if scheme in BUCKET_SCHEMES and not rest.split("/", 1)[0]:
        raise ValueError(f"{scheme}:// URI names no bucket: use {scheme}://BUCKET/PATH")
    return scheme, rest


def job_prefix(output_uri: str, namespace: str, name: str, uid: str) -> str:
    """`{output.uri}/{namespace}/{name}/{uid}` — the one place a job writes.

    The uid makes a re-created job with the same name start clean, while a
    retry or resume of the same object continues where it left off.
    """
    for label, value in (("namespace", namespace), ("name", name), ("uid", uid)):
        if not value or "/" in value:
            raise ValueError(f"job {label} {value!r} cannot be part of a storage path")
    scheme, rest = split_uri(output_uri)
    clean = strip_userinfo(output_uri)
    base = f"{scheme}://{rest.rstrip('/')}" if "://" in clean else clean.rstrip("/")
    return f"{base}/{namespace}/{name}/{uid}"


def join(prefix: str, *parts: str) -> str:
    return "/".join([prefix.rstrip("/"), *[p.strip("/") for p in parts]])


def checkpoint_dir(prefix: str, step: int) -> str:
    return join(prefix, CHECKPOINTS, f"step-{step:08d}")


def parse_checkpoint_dir(name: str) -> Optional[int]:
    """Step of a checkpoint folder name, or None for anything else."""
    m = _STEP_DIR.match(name.rstrip("/").rsplit("/", 1)[-1])
    return int(m.group(1)) if m else None


class TrainPhase(str, Enum):
    starting = "Starting"
    loading = "Loading"
    training = "Training"
    evaluating = "Evaluating"
    saving = "Saving"
    succeeded = "Succeeded"
    failed = "Failed"
    interrupted = "Interrupted"  # `kubetune run` stopped by SIGINT/SIGTERM; runs again to resume


class CheckpointPointer(_Model):
    step: int
    uri: str


class SkippedCheckpoint(_Model):
    """A committed checkpoint that failed verification on resume and was moved aside."""

    step: int
    reason: str = Field(description="Which file and what was wrong with it.")
    moved_to: Optional[str] = Field(None, description="Where the folder is now.")


class StartupPhase(_Model):
    """One step on the way from a worker's start to its first training step."""

    name: str = Field(description="One of STARTUP_PHASES.")
    time: str = Field(description="RFC 3339 UTC time it ended.")
    seconds: float = Field(description="Seconds from the worker's start to its end.")


# In order: what rank 0 of the current attempt did before its first step.
STARTUP_PHASES = (
    "workerStarted",  # Ray Train started the worker process's training function
    "modelFetched",  # the model (and a parent's outputs) are on the worker's disk
    "dataPrepared",  # read, checked, tokenized
    "modelLoaded",  # weights in memory (and the adapter or reference built)
    "engineReady",  # DeepSpeed initialized (the optimizer, ZeRO's partitions)
    "baseEvaluated",  # the held-out loss before training (a fresh start with evaluation)
    "firstStep",  # the first optimizer step of this attempt is done
)


class ProgressRecord(_Model):
    phase: TrainPhase
    step: int = 0
    total_steps: Optional[int] = None
    epoch: Optional[float] = None
    percent: Optional[float] = None
    eta_seconds: Optional[int] = None
    tokens_per_second: Optional[float] = None
    last_checkpoint: Optional[CheckpointPointer] = None
    resumed_from: Optional[int] = Field(
        None, description="Committed checkpoint step this attempt resumed from; None if fresh."
    )
    skipped_checkpoints: Optional[list[SkippedCheckpoint]] = Field(
        None,
        description="Committed checkpoints, newer than resumed_from, that this attempt "
        "found damaged (a file missing, cut short or changed) and moved aside.",
    )
    attempt: int = 1
    message: Optional[str] = None
    startup: Optional[list[StartupPhase]] = Field(
        None, description="This attempt's way to its first step, so far (STARTUP_PHASES)."
    )
    updated_at: str = Field(description="RFC 3339 UTC time of this record.")


class MetricsRow(_Model):
    step: int
    epoch: Optional[float] = None
    loss: Optional[float] = None
    learning_rate: Optional[float] = None
    grad_norm: Optional[float] = None
    tokens_per_second: Optional[float] = None
    tokens: Optional[int] = Field(
        None, description="Useful (non-pad) tokens trained so far, all workers together."
    )
    trainable_parameters: Optional[int] = Field(
        None,
        description="Parameters the row's last step updated (grows with method.full.unfreeze).",
    )
    eval_loss: Optional[float] = None
    eval_perplexity: Optional[float] = None
    eval_token_accuracy: Optional[float] = None
    # method.task classification: share of held-out rows whose top label is right, the
    # labels' macro-F1 and expected calibration error (eval_loss: the labels' cross-entropy)
    eval_accuracy: Optional[float] = None
    eval_f1: Optional[float] = None
    eval_label_ece: Optional[float] = None
    # objective dpo: means over the pairs since the previous row (rewards are
    # beta x the log-probability gained over the reference model)
    rewards_chosen: Optional[float] = None
    rewards_rejected: Optional[float] = None
    reward_accuracy: Optional[float] = None
    reward_margin: Optional[float] = None
    eval_rewards_chosen: Optional[float] = None
    eval_rewards_rejected: Optional[float] = None
    eval_reward_accuracy: Optional[float] = None
    eval_reward_margin: Optional[float] = None
    # objective kto: means since the previous row; rewards are beta x the log-probability
    # gained over the reference, kl (below, shared with grpo) the detached estimate
    # (z_ref) the loss compares them with; eval_ranking_accuracy: objectives/kto.py says
    # how it is counted
    rewards_desirable: Optional[float] = None
    rewards_undesirable: Optional[float] = None
    eval_rewards_desirable: Optional[float] = None
    eval_rewards_undesirable: Optional[float] = None
    eval_kl: Optional[float] = None
    eval_ranking_accuracy: Optional[float] = None
    # objective grpo, over the rollouts since the previous row: the graders' total (a
    # multi grader's weighted sum) and each leaf grader's score, their spread within
    # the groups, the KL to the reference (k3 estimator, per token), the completions'
    # tokens, the share of groups whose rewards were all equal (no advantage, no
    # gradient) and the samples each grader failed on (raised or timed out: scored 0)
    reward: Optional[float] = None
    reward_std: Optional[float] = None
    rewards_per_grader: Optional[dict[str, float]] = None
    kl: Optional[float] = None
    completion_length: Optional[float] = None
    frac_reward_zero_std: Optional[float] = None
    grader_errors: Optional[dict[str, int]] = None
    grader_timeouts: Optional[dict[str, int]] = None
    # on evaluation rows: the same graders on greedy answers to the held-out prompts
    eval_reward: Optional[float] = None
    eval_reward_std: Optional[float] = None
    eval_rewards_per_grader: Optional[dict[str, float]] = None
    eval_completion_length: Optional[float] = None
    eval_grader_errors: Optional[dict[str, int]] = None
    eval_grader_timeouts: Optional[dict[str, int]] = None
    # objective distill (objectives/distill.py): since the previous row, the KL term
    # (per response token, at the temperature) and the next-token loss on the data's
    # answers; the teacher's forward throughput and size. On evaluation rows: the top-1
    # agreement with the teacher, the KL at temperature 1 and the teacher's own
    # held-out loss on the same tokens
    distill_kl: Optional[float] = None
    distill_ce: Optional[float] = None
    distill_on_policy_batches: Optional[int] = Field(
        None,
        description="method.distill.onPolicyFraction: micro-batches of the student's own "
        "answers since the previous row, all workers together.",
    )
    teacher_tokens_per_second: Optional[float] = None
    teacher_parameters: Optional[int] = None
    student_parameters: Optional[int] = None
    eval_agreement: Optional[float] = None
    eval_distill_kl: Optional[float] = None
    teacher_eval_loss: Optional[float] = None
    # dataset.mixture: on evaluation rows the held-out loss of each source (by its id;
    # eval_loss is over them all); on training rows the examples trained from each
    # source so far, all workers together
    eval_loss_per_source: Optional[dict[str, float]] = None
    train_examples_per_source: Optional[dict[str, int]] = None
    resumed_from: Optional[int] = Field(
        None, description="On the first row after a resume: the checkpoint step resumed from."
    )
    skipped_checkpoints: Optional[list[int]] = Field(
        None,
        description="On the first row of an attempt that skipped damaged checkpoints: their "
        "steps (progress.json says why).",
    )
    attempt: Optional[int] = Field(None, description="The attempt that trained this step.")
    time: Optional[str] = None


class FileDigest(_Model):
    bytes: int
    sha256: str


class CheckpointManifest(_Model):
    step: int
    attempt: Optional[int] = Field(
        None, description="The attempt that committed it; None: written before manifests had one."
    )
    epoch: Optional[float] = None
    files: list[str] = Field(default_factory=list, description="Paths relative to the folder.")
    digests: Optional[dict[str, FileDigest]] = Field(
        None,
        description="Size and sha256 of the files, by path. Absent from manifests written "
        "before kubetune recorded them: those checkpoints cannot be verified and are trusted "
        "(only that their files are there is checked).",
    )
    eval_loss: Optional[float] = None
    train_loss: Optional[float] = None
    world_size: Optional[int] = None
    zero_stage: Optional[int] = None
    created_at: str


DIGEST_CHUNK = 1 << 20


def file_digest(f: BinaryIO) -> FileDigest:
    """Size and sha256 of an open binary file, read in 1 MiB chunks (never whole)."""
    h, n = hashlib.sha256(), 0
    while chunk := f.read(DIGEST_CHUNK):
        h.update(chunk)
        n += len(chunk)
    return FileDigest(bytes=n, sha256=h.hexdigest())


def verify_manifest(
    manifest: CheckpointManifest,
    sizes: Mapping[str, int],
    digest_of: Optional[Callable[[str], FileDigest]] = None,
) -> Optional[str]:
    """Why a checkpoint's files do not match its manifest, naming the first bad
    file; None when they match. `sizes` is what is stored (path relative to the
    folder -> bytes). With `digest_of` (path -> its FileDigest) the sha256 of
    every file with a recorded digest is checked too; without it only presence
    and sizes (what one listing tells, no reads).

    A manifest without digests (written before kubetune recorded them), or a
    file it lists without one, is unverifiable but trusted: only that the file
    is there is checked, as loading it would fail anyway."""
    digests = manifest.digests or {}
    for name in manifest.files:
        if name not in sizes:
            return f"{name}: missing"
        want = digests.get(name)
        if want is not None and sizes[name] != want.bytes:
            return f"{name}: {sizes[name]} bytes, the manifest says {want.bytes}"
    if digest_of is None:
        return None
    for name in manifest.files:
        want = digests.get(name)
        if want is None:
            continue
        got = digest_of(name)
        if got != want:
            return (
                f"{name}: sha256 {got.sha256[:12]}… ({got.bytes} bytes), the manifest says "
                f"{want.sha256[:12]}… ({want.bytes} bytes)"
            )
    return None


class AttemptRecord(_Model):
    """attempt.json, the fence: the attempt that owns the prefix. Written by the
    driver of every attempt before anything else; an attempt older than the one
    named here neither starts nor commits, and what it still writes does not count."""

    attempt: int
    started_at: str
    inherited: list[int] = Field(
        default_factory=list,
        description="Steps of the checkpoints older attempts had committed when this one "
        "started: the only checkpoints of theirs that count from now on.",
    )


def newer_owner(fence: Optional[AttemptRecord], attempt: int) -> bool:
    """Whether a newer attempt than `attempt` owns the prefix: the writer must stop."""
    return fence is not None and fence.attempt > attempt


def checkpoint_counts(step: int, attempt: Optional[int], fence: Optional[AttemptRecord]) -> bool:
    """Whether a committed checkpoint counts (resume, keepLast, status): one of the
    owner's attempt or a later one, or one an older attempt committed before the
    owner started (`inherited`). A commit of an older attempt after that, a late
    pod of a failed attempt, does not. A prefix without a fence (written before
    fencing) counts everything; a manifest without an attempt is older than any."""
    if fence is None or (attempt or 0) >= fence.attempt:
        return True
    return step in fence.inherited


def row_counts(step: int, attempt: Optional[int], fence: Optional[AttemptRecord]) -> bool:
    """Whether a metrics row counts: the owner's, or an older attempt's up to the
    newest checkpoint the owner inherited (rows past it are trained again, and
    the owner drops them on resume)."""
    if fence is None or (attempt or 0) >= fence.attempt:
        return True
    return step <= max(fence.inherited, default=0)


def record_counts(attempt: Optional[int], current: int) -> bool:
    """Whether a whole-file record (progress.json, outputs.json) counts when
    `current` is the newest attempt known: one an older attempt wrote was written
    after the newest one started, or is superseded by it."""
    return attempt is None or attempt >= current


class OutputKind(str, Enum):
    adapter = "adapter"  # LoRA weights; load on top of the base model
    merged = "merged"  # the base model with the adapter merged in
    full = "full"  # a full fine-tune's model


class OutputFormat(str, Enum):
    # config.json, safetensors weights, tokenizer files, generation_config.json:
    # AutoModelForCausalLM / vLLM / KServe's Hugging Face runtime load the folder
    huggingface = "huggingface-safetensors"
    # adapter_config.json + adapter_model.safetensors: peft, vLLM's --lora-modules
    peft_lora = "peft-lora-safetensors"
    # one self-contained file (weights, tokenizer, chat template): llama.cpp, Ollama
    gguf = "gguf"


class ServableOutput(_Model):
    """One folder a serving engine can load, as outputs.json's `artifacts` lists it."""

    kind: OutputKind
    uri: str
    format: OutputFormat
    precision: str = Field(
        description="dtype of the saved weights: bf16, fp16 or fp32; a GGUF file's type "
        "(f16, q8_0, q5_0, q4_0)."
    )
    base_model: str = Field(description="The model the job started from (id@revision or URI).")
    lora_rank: Optional[int] = Field(None, description="Adapters: r (vLLM's --max-lora-rank).")
    files: list[str] = Field(default_factory=list, description="Paths relative to uri.")
    interpolation_weight: Optional[float] = Field(
        None, description="output.interpolation: the α of an interpolated model or adapter."
    )
    labels: Optional[list[str]] = Field(
        None,
        description="method.task classification: a sequence classifier over these labels "
        "(id order), not a language model: AutoModelForSequenceClassification loads it, "
        "and a serving engine serves it as a classifier. Unset: a language model.",
    )


class GgufFile(_Model):
    """One output.gguf file and its read-back check, as outputs.json lists it."""

    type: str = Field(description="f16, q8_0, q5_0 or q4_0.")
    uri: str
    bytes: int
    seconds: float = Field(description="Export time.")
    fallback: list[str] = Field(
        default_factory=list, description="2-D weights kept at f16 (rows not whole blocks)."
    )
    tensors_ok: bool
    tokenizer_ok: bool
    eval_loss: Optional[float] = Field(None, description="The file's held-out loss.")
    reference_eval_loss: Optional[float] = Field(
        None, description="The safetensors model's held-out loss on the same rows."
    )
    relative_increase: Optional[float] = None
    tolerance: float
    within_tolerance: Optional[bool] = None
    problems: list[str] = Field(default_factory=list)


class PruneRecord(_Model):
    """spec.model.prune as the trainer applied it to the starting model."""

    layers_before: int
    kept_layers: list[int] = Field(description="The decoder layers kept, by their old index.")
    parameters_before: int
    parameters_after: int


class ParameterGroupRecord(_Model):
    """One optimizer parameter group of spec.method.full."""

    name: str = Field(description="The parts in it, e.g. 'head, layer 29' or 'embeddings'.")
    parameters: int
    lr_scale: float = Field(description="Its learning rate over hyperparameters.learningRate.")
    from_step: int = Field(description="The first step (0-based) that updates it.")


class ParameterCounts(_Model):
    """The model's parameters and the ones training updates."""

    total: int
    trainable: int = Field(
        description="Parameters the optimizer updates (with unfreezing: by the last part's "
        "step); the rest never change and hold no gradients or optimizer state."
    )
    layers: Optional[int] = Field(None, description="The model's decoder layers.")
    trainable_layers: Optional[list[int]] = Field(
        None, description="method.full: the decoder layers that train."
    )
    train_embeddings: Optional[bool] = None
    train_head: Optional[bool] = None
    adapter_layers: Optional[list[int]] = Field(
        None, description="method.lora.layers: the decoder layers that got adapters."
    )
    unfreeze_every_steps: Optional[int] = None
    layer_lr_decay: Optional[float] = None
    groups: Optional[list[ParameterGroupRecord]] = Field(
        None,
        description="method.full with unfreezing or layer-wise decay: the optimizer's "
        "parameter groups, top down.",
    )


class CalibrationRecord(_Model):
    """evaluation.calibration: the validation split's answer tokens, before and after."""

    tokens: int = Field(description="Answer tokens scored (after training).")
    bins: int = Field(description="Equal-width confidence bins of the error.")
    ece_before: Optional[float] = Field(
        None,
        description="Expected calibration error of the base model (None on a resume "
        "that did not measure it).",
    )
    ece: float = Field(description="Expected calibration error after training.")
    accuracy: float = Field(description="Share of answer tokens whose top token is right.")
    confidence: float = Field(description="Mean top-token probability.")
    temperature: Optional[float] = Field(
        None, description="fitTemperature: the temperature minimising the answer tokens' NLL."
    )
    temperature_tokens: Optional[int] = Field(
        None, description="Answer tokens the temperature was fitted on."
    )
    ece_at_temperature: Optional[float] = Field(
        None, description="The error with the logits divided by the temperature."
    )
    saved_in: list[str] = Field(
        default_factory=list,
        description="saveTemperature: the saved folders whose generation_config.json holds it.",
    )


class ClassificationRecord(_Model):
    """method.task classification: the labels and the validation split's scores before
    training (the base with its new head) and after."""

    labels: list[str] = Field(
        description="The labels in id order (config.json's id2label of the saved model)."
    )
    examples: Optional[int] = Field(None, description="Validation rows scored.")
    accuracy_before: Optional[float] = Field(
        None, description="Share of rows whose top label is right, before training."
    )
    accuracy: Optional[float] = Field(None, description="The same after training.")
    f1_before: Optional[float] = Field(None, description="Macro-F1 over the labels, before.")
    f1: Optional[float] = Field(None, description="Macro-F1 over the labels, after.")
    ece_before: Optional[float] = Field(
        None, description="Expected calibration error of the top label's probability, before."
    )
    ece: Optional[float] = Field(None, description="The same after training.")


class RetentionRecord(_Model):
    """evaluation.retention: the retention set's loss before and after training."""

    examples: int = Field(description="Retention rows scored.")
    tokens: int = Field(description="Labelled tokens scored.")
    loss_before: Optional[float] = Field(
        None, description="Loss of the base model (None on a resume that did not measure it)."
    )
    loss_after: float
    regression: Optional[float] = Field(
        None, description="Relative rise of the loss: (after - before) / before."
    )
    max_regression: Optional[float] = Field(None, description="The bound, when set.")
    exceeded: bool = Field(False, description="The regression is above the bound.")
    fail_on_regression: bool = False

    def describe(self) -> str:
        """One line: the losses, the regression and the bound (log, summary, status)."""
        before = "n/a" if self.loss_before is None else f"{self.loss_before:.4f}"
        text = f"loss {before} before, {self.loss_after:.4f} after"
        if self.regression is not None:
            text += f" ({100 * self.regression:+.2f}%)"
        if self.max_regression is not None:
            verdict = "above" if self.exceeded else "within"
            text += f", {verdict} the bound of {100 * self.max_regression:g}%"
        return text


class MixtureRecord(_Model):
    """One dataset.mixture source as trained."""

    id: str
    format: str
    weight: float = Field(description="Its share of the training examples drawn (sums to 1).")
    train_examples: int = Field(description="Its usable training examples.")
    validation_examples: int = Field(description="Its held-out examples.")
    trained_examples: Optional[int] = Field(
        None, description="Examples drawn from it over the whole run, all workers together."
    )
    initial_eval_loss: Optional[float] = None
    final_eval_loss: Optional[float] = None


class InterpolationPoint(_Model):
    """One weight of output.interpolation and its scores."""

    alpha: float = Field(description="(1-α)·base + α·fine-tuned.")
    eval_loss: float = Field(description="Held-out (validation) loss, the objective's eval_loss.")
    metrics: dict[str, float] = Field(
        default_factory=dict, description="The objective's other eval_* metrics at this weight."
    )
    retention_regression: Optional[float] = Field(
        None,
        description="evaluation.retention: the retention set's regression at this weight "
        "(none until retention sets are scored).",
    )


class InterpolationRecord(_Model):
    """output.interpolation as outputs.json lists it: every weight scored, one published."""

    rule: str = Field(description="How the published weight was chosen, in words.")
    select: str = Field(description="bestHeldOut or fixed.")
    chosen: float = Field(description="The α published under interpolated/.")
    weights: list[InterpolationPoint] = Field(description="Every weight, by α.")
    adapter: Optional[str] = Field(None, description="lora/qlora: the adapter scaled by α.")
    merged_model: Optional[str] = Field(None, description="lora with mergeAdapter: merged.")
    model: Optional[str] = Field(None, description="Full fine-tune: the averaged model.")
    seconds: float = Field(description="Time spent scoring and saving.")


class OutputsRecord(_Model):
    adapter: Optional[str] = None
    merged_model: Optional[str] = None
    model: Optional[str] = Field(None, description="Full fine-tune: the saved model folder.")
    metrics: Optional[str] = None
    loss_curve: Optional[str] = None
    final_checkpoint: Optional[CheckpointPointer] = None
    initial_eval_loss: Optional[float] = None
    final_eval_loss: Optional[float] = None
    final_train_loss: Optional[float] = None
    steps: Optional[int] = None
    stopped_early: bool = False
    test_metrics: Optional[dict[str, float]] = Field(
        None, description="Metrics on dataset.test, computed once after training."
    )
    mixture: Optional[list[MixtureRecord]] = Field(
        None, description="dataset.mixture: each source's share, examples and held-out loss."
    )
    generation: Optional[dict] = Field(
        None,
        description="evaluation.generation: examples per split, scores before and after "
        "training per split (exact_match, rouge_l, bleu, brevity_penalty, chrf, chrf1, "
        "length_ratio; or reward), per split the answers that score higher, the same or "
        "lower after than before (<split>_after_vs_before) and the samples file.",
    )
    calibration: Optional[CalibrationRecord] = None
    retention: Optional[RetentionRecord] = None
    classification: Optional[ClassificationRecord] = None
    artifacts: list[ServableOutput] = Field(
        default_factory=list, description="What each saved folder is and how to load it."
    )
    gguf: Optional[list[GgufFile]] = Field(
        None,
        description="output.gguf: per type the file's URI, size, export time and read-back "
        "check (tensors, tokenizer, held-out loss against the safetensors model, tolerance).",
    )
    attempt: Optional[int] = Field(None, description="The attempt that finished the job.")
    interpolation: Optional[InterpolationRecord] = Field(
        None,
        description="output.interpolation (WiSE-FT): each weight's held-out scores, the "
        "rule, the chosen weight and its folders under interpolated/.",
    )
    pruned: Optional[PruneRecord] = Field(
        None,
        description="spec.model.prune: the layers kept and the parameter count before and "
        "after; the saved models hold the pruned layers only.",
    )
    parameters: Optional[ParameterCounts] = Field(
        None,
        description="The model's parameter count and what trained (method.full's layers, "
        "embeddings, head and parameter groups; method.lora.layers).",
    )


def outputs_record(record: OutputsRecord, sections: Mapping[str, object]) -> OutputsRecord:
    """outputs.json: the training summary plus named sections, one per part of the
    trainer that produced something (`artifacts`, ...). A new section is a new
    field of OutputsRecord and one more entry in the trainer's dict; an unknown
    name is refused rather than written where no reader looks."""
    unknown = sorted(set(sections) - set(OutputsRecord.model_fields))
    if unknown:
        raise ValueError(f"outputs.json has no section {unknown}: add it to OutputsRecord")
    return OutputsRecord.model_validate({**record.model_dump(), **sections})


class FileHash(_Model):
    uri: str
    sha256: str
    bytes: int


class RowCounts(_Model):
    rows: int = Field(description="Rows read.")
    used: int = Field(description="Rows trained or evaluated on.")
    dropped: int = Field(description="Rows rejected (bad format, nothing left to learn).")
    truncated: int = Field(description="Used rows cut at maxSeqLength.")


class DataLineage(_Model):
    train: list[FileHash] = Field(default_factory=list)
    validation: list[FileHash] = Field(default_factory=list)
    train_name: Optional[str] = Field(None, description="A datasets name instead of files.")
    validation_name: Optional[str] = None
    split: dict = Field(
        default_factory=dict,
        description="How evaluation data was chosen: a validation source, or validationSplit "
        "of train with the seed.",
    )
    train_rows: Optional[RowCounts] = None
    validation_rows: Optional[RowCounts] = None
    hash: str = Field(description="sha256 over the files' hashes and the split.")


class ModelLineage(_Model):
    name: Optional[str] = None
    revision: Optional[str] = None
    uri: Optional[str] = None
    sha256: Optional[str] = Field(
        None, description="Of the model folder's files (names and contents)."
    )
    prune: Optional[dict] = Field(
        None,
        description="spec.model.prune: the model trained was this one with fewer layers "
        "(an adapter fits only that one).",
    )


class ParentLineage(_Model):
    job: Optional[dict] = Field(None, description="{name, namespace, uid} of a fromJob parent.")
    uri: str = Field(description="What was loaded: the parent's adapter or model folder.")
    kind: str = Field(description="adapter or model")
    merged: bool = Field(False, description="The adapter was merged into the base first.")
    run_record: Optional[str] = Field(None, description="The parent's run.json, when it has one.")
    spec_hash: Optional[str] = None


class RunRecord(_Model):
    """Lineage of one job: what went in, with which software. Two jobs trained on
    the same inputs have the same hashes."""

    job: dict = Field(description="{name, namespace, uid}")
    spec_hash: str = Field(description="sha256 of the resolved spec's training fields.")
    dataset: DataLineage
    base_model: ModelLineage
    parent: Optional[ParentLineage] = None
    versions: dict[str, str] = Field(default_factory=dict)
    image: str = Field(description="The trainer image, or local for `kubetune run`.")
    attempt: int = 1
    created_at: str


class TrackingRecord(_Model):
    """Where the job's MLflow run is, and whether the server answered."""

    tracking_uri: str
    experiment_id: Optional[str] = None
    run_id: Optional[str] = None
    url: Optional[str] = None
    reachable: bool = False
    message: Optional[str] = None
    dropped: int = Field(0, description="Events dropped because the queue was full.")
    updated_at: str


# ---------------------------------------------------------------------------- credentials

# The operator maps each referenced Secret to environment variables with a
# role prefix, so the model, dataset and output can use different stores and
# keys without the values ever entering the trainer config.
CREDENTIAL_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
HF_TOKEN_KEY = "HF_TOKEN"
ROLES = ("MODEL", "DATASET", "OUTPUT")


def credential_env(role: str, key: str) -> str:
    if role not in ROLES:
        raise ValueError(f"unknown storage role {role!r}")
    return f"KUBETUNE_{role}_{key}"


def storage_options(
    uri: str, access: Optional[StorageAccess], role: str, environ: Mapping[str, str]
) -> dict:
    """fsspec storage options for `uri`, from the spec's endpoint/region and the
    role's credential variables (falling back to the standard AWS ones)."""
    if not uri.startswith("s3://"):
        return {}
    opts: dict = {}
    client: dict = {}
    if access is not None and access.endpoint:
        client["endpoint_url"] = access.endpoint
    if access is not None and access.region:
        client["region_name"] = access.region
    key = environ.get(credential_env(role, "AWS_ACCESS_KEY_ID"))
    secret = environ.get(credential_env(role, "AWS_SECRET_ACCESS_KEY"))
    token = environ.get(credential_env(role, "AWS_SESSION_TOKEN"))
    if key and secret:
        opts["key"], opts["secret"] = key, secret
        if token:
            opts["token"] = token
    if client:
        opts["client_kwargs"] = client
    return opts
