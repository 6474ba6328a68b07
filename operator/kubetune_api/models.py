"""The FineTuneJob API (kubetune.io/v1alpha1): the one schema.

The CRD in crds/ is generated from these models (see kubetune_api.crd), the
operator renders children from them and the trainer reads them back from its
config. Field descriptions become `kubectl explain` text, so they are written
for users. Cross-field rules live in kubetune_api.rules, as a table shared by
the CRD (CEL) and the CLI/operator (Python).
"""

from __future__ import annotations

import re
from enum import Enum
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from . import checks, objectives, sweep_space
from .base import SpecModel
from .checks import PRINTABLE
from .graders import Grader

GROUP = "kubetune.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SINGULAR = "finetunejob"
SHORT_NAMES = ["ftj"]

# Bounds keep the API server's CEL cost estimate finite and stop absurd input early.
NAME_MAX = 253
URI_MAX = 2048
TEXT_MAX = 256
LIST_MAX = 64


_Model = SpecModel


Name = Annotated[str, Field(min_length=1, max_length=NAME_MAX)]
Uri = Annotated[str, Field(min_length=1, max_length=URI_MAX)]
Text = Annotated[str, Field(max_length=TEXT_MAX)]
INT32_MAX = 2**31 - 1

# Spec strings: what a user writes. Each carries its checks (kubetune_api.checks)
# into the CRD's CEL and into the CLI's validation.
SpecText = Annotated[str, Field(max_length=TEXT_MAX), PRINTABLE, checks.NOT_BLANK]
SpecWord = Annotated[str, Field(max_length=TEXT_MAX), PRINTABLE, checks.NOT_BLANK, checks.NO_SPACE]
ModelId = Annotated[
    str, Field(max_length=TEXT_MAX), checks.hf_repo_id("HuggingFaceTB/SmolLM2-135M-Instruct")
]
DatasetId = Annotated[str, Field(max_length=TEXT_MAX), checks.hf_repo_id("HuggingFaceH4/no_robots")]
StorageUri = Annotated[(str, Field(max_length=URI_MAX), *checks.STORAGE_URI)]
OutputUri = Annotated[(str, Field(max_length=URI_MAX), *checks.STORAGE_URI, checks.ABSOLUTE_OUTPUT)]
EndpointUri = Annotated[
    str,
    Field(max_length=URI_MAX),
    PRINTABLE,
    checks.NO_CREDENTIALS,
    checks.NO_QUERY_CREDENTIALS,
    checks.ENDPOINT,
]
SecretName = Annotated[
    str,
    Field(max_length=checks.DNS_SUBDOMAIN_MAX),
    checks.dns_subdomain("Secret in the FineTuneJob's namespace", "hf-token"),
]
PriorityClassName = Annotated[
    str,
    Field(max_length=checks.DNS_SUBDOMAIN_MAX),
    checks.dns_subdomain("PriorityClass", "high-priority"),
]
ClaimName = Annotated[
    str,
    Field(max_length=checks.DNS_SUBDOMAIN_MAX),
    checks.dns_subdomain("PersistentVolumeClaim in the FineTuneJob's namespace", "kubetune-stage"),
]
ImageRef = Annotated[str, Field(max_length=checks.IMAGE_MAX), checks.IMAGE]
JobName = Annotated[
    str,
    Field(max_length=checks.DNS_SUBDOMAIN_MAX),
    checks.dns_subdomain("FineTuneJob in the same namespace", "chat-v1"),
]
ResourceName = Annotated[str, Field(max_length=checks.QUALIFIED_NAME_MAX), checks.GPU_RESOURCE_NAME]
LabelValue = Annotated[str, Field(max_length=checks.LABEL_VALUE_MAX), checks.LABEL_VALUE]


class SecretRef(_Model):
    """A Secret in the FineTuneJob's namespace. Its keys become environment
    variables of the trainer, never part of the trainer config or status."""

    name: SecretName = Field(description="Name of the Secret in the FineTuneJob's namespace.")


class StorageAccess(_Model):
    """How to reach an object store. Credentials come only from a Secret:
    keys AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (optional AWS_SESSION_TOKEN)
    for s3://; GOOGLE_APPLICATION_CREDENTIALS_JSON for gs://."""

    endpoint: Optional[EndpointUri] = Field(
        None,
        description="S3-compatible endpoint URL (MinIO, Ceph, R2, ...). Omit for AWS S3.",
    )
    region: Optional[SpecWord] = Field(None, description="Object-store region, e.g. us-east-1.")
    secret_ref: Optional[SecretRef] = Field(
        None, description="Secret holding the object-store credentials."
    )


# ---------------------------------------------------------------------------- model


PRUNE_LAYERS_MAX = 1024  # more decoder layers than any released model has
# keeps the API server's cost estimate of the list's uniqueness rule (n x n) small
PRUNE_LIST_MAX = 256


KEPT_LAYERS_INCREASING = checks.Check(
    cel="self.isSorted() && self.all(i, self.indexOf(i) == self.lastIndexOf(i))",
    message="must list each layer to keep once, in increasing order (e.g. [0, 1, 2, 29]): "
    "sort the list and remove repeated indices",
    python=lambda v: isinstance(v, list) and all(a < b for a, b in zip(v, v[1:], strict=False)),
)
LAYERS_INCREASING = checks.Check(
    cel=KEPT_LAYERS_INCREASING.cel,
    message="must list each decoder layer once, in increasing order (e.g. [12, 13, 14]): "
    "sort the list and remove repeated indices",
    python=KEPT_LAYERS_INCREASING.python,
)
# decoder layers by index (0 is the one next to the embeddings); the model's own
# layer count bounds them, which only the trainer knows
LayerIndices = Annotated[
    list[Annotated[int, Field(ge=0, le=PRUNE_LAYERS_MAX - 1)]],
    Field(max_length=PRUNE_LIST_MAX),
    LAYERS_INCREASING,
]
PRUNE_ONE_CHOICE = checks.Check(
    cel="has(self.keepLayers) != has(self.layers)",
    message="set exactly one of model.prune.keepLayers (how many decoder layers to keep) "
    "or model.prune.layers (which ones, by index)",
    python=lambda p: isinstance(p, dict) and ("keepLayers" in p) != ("layers" in p),
    field="keepLayers",
)


class Prune(_Model):
    """Structured pruning: keep some of the starting model's decoder layers and
    drop the rest, before training (see docs/pruning.md)."""

    keep_layers: Optional[Annotated[int, Field(ge=1, le=PRUNE_LAYERS_MAX)]] = Field(
        None,
        description="How many decoder layers to keep: the first half of them (rounded up) "
        "from the start of the model and the rest from its end; the middle block goes, "
        "which cost the least held-out loss of the rules measured (docs/pruning.md). Must "
        "be fewer than the model has. Set exactly one of keepLayers or layers.",
    )
    layers: Optional[
        Annotated[
            list[Annotated[int, Field(ge=0, le=PRUNE_LAYERS_MAX - 1)]],
            Field(min_length=1, max_length=PRUNE_LIST_MAX),
            KEPT_LAYERS_INCREASING,
        ]
    ] = Field(
        None,
        description="The decoder layers to keep, by index (0 is the one next to the "
        "embeddings), in increasing order; each below the model's layer count. Set exactly "
        "one of keepLayers or layers.",
    )


class ModelSource(StorageAccess):
    """The base model: a Hugging Face id, or weights in object storage, a PVC or
    a local folder."""

    name: Optional[ModelId] = Field(
        None,
        description="Hugging Face model id, e.g. HuggingFaceTB/SmolLM2-135M-Instruct. "
        "Set exactly one of name or uri.",
    )
    uri: Optional[StorageUri] = Field(
        None,
        description="Folder with the weights: s3://bucket/path, gs://..., file:///path, or a "
        "path on a mounted volume. Set exactly one of name or uri.",
    )
    revision: Optional[SpecWord] = Field(
        None, description="Git revision (branch, tag or commit) of a Hugging Face model."
    )
    gguf_file: Optional[SpecText] = Field(
        None,
        description="Name of a GGUF file inside the model folder; it is dequantized and "
        "loaded with transformers.",
    )
    trust_remote_code: bool = Field(
        False,
        description="Run Python code shipped with the model. Off by default: only for models "
        "whose code you trust.",
    )
    token_secret_ref: Optional[SecretRef] = Field(
        None, description="Secret with key HF_TOKEN, for gated or private Hugging Face models."
    )
    from_job: Optional[JobName] = Field(
        None,
        description="Continue from a FineTuneJob in the same namespace that has Succeeded: "
        "its adapter (or fully fine-tuned model) is the starting point, on top of the base "
        "model named by name or uri. Set at most one of fromJob or fromCheckpoint.",
    )
    from_checkpoint: Optional[StorageUri] = Field(
        None,
        description="Continue from a committed checkpoint (a checkpoints/step-N folder with "
        "its manifest.json), a job's storage prefix, or a folder holding a peft adapter or a "
        "Hugging Face model. Read with this model's endpoint and secretRef.",
    )
    merge_parent: bool = Field(
        False,
        description="With fromJob or fromCheckpoint: merge the parent's adapter into the "
        "base model first and train a new adapter on the result. Off: keep training the "
        "parent's adapter (lora). A full fine-tune always merges it.",
    )
    prune: Optional[Annotated[Prune, PRUNE_ONE_CHOICE]] = Field(
        None,
        description="Drop decoder layers of the starting model (after a parent is merged) "
        "before training: the smaller model is the one trained and saved. With lora or "
        "qlora, set output.mergeAdapter: true (the adapter fits only the pruned model).",
    )


# ---------------------------------------------------------------------------- dataset


class DatasetFormat(str, Enum):
    text = "text"
    prompt_completion = "prompt-completion"
    chat = "chat"
    alpaca = "alpaca"
    sharegpt = "sharegpt"
    preference = "preference"
    feedback = "feedback"
    prompt = "prompt"
    classification = "classification"


class DataSource(_Model):
    uri: Optional[StorageUri] = Field(
        None,
        description="JSONL, JSON or Parquet file (or a folder of them): s3://, gs://, "
        "file:// or a mounted path. Set exactly one of uri or name.",
    )
    name: Optional[DatasetId] = Field(
        None,
        description="Hugging Face datasets name, read from the datasets cache "
        "(HF_DATASETS_OFFLINE works). Set exactly one of uri or name.",
    )
    split: SpecWord = Field("train", description="Split to read when name is a datasets name.")


MIXTURE_MAX = 16
SOURCE_ID_RE = r"^[a-z0-9]([a-z0-9_]{0,30}[a-z0-9])?$"

SourceId = Annotated[
    str,
    Field(max_length=32),
    checks.Check(
        cel=f"self.matches('{SOURCE_ID_RE}')",
        message="must be 1 to 32 lower-case letters, digits and '_', starting and ending "
        "with a letter or digit (e.g. math_qa): it names the source's metrics",
        python=lambda v: isinstance(v, str) and re.fullmatch(SOURCE_ID_RE[1:-1], v) is not None,
    ),
]


class MixtureSource(DataSource):
    """One source of dataset.mixture (docs/practice.md, "Data mixtures and multi-task")."""

    id: SourceId = Field(
        description="The source's name in metrics (eval_loss_per_source, "
        "train_examples_per_source), status and the summary."
    )
    format: Optional[DatasetFormat] = Field(
        None, description="Row format of this source (default: dataset.format)."
    )
    weight: Optional[float] = Field(
        None,
        gt=0.0,
        le=1e6,
        description="Relative share of the training examples drawn from this source "
        "(normalised over the sources). Set on every source or on none; none: "
        "dataset.mixtureTemperature sets the shares from the sources' sizes.",
    )


def _plain_items(v: Any) -> list:
    """A list's items as CEL sees them: camelCase dicts (models converted)."""
    items = v if isinstance(v, list) else []
    return [s.to_dict() if isinstance(s, BaseModel) else s for s in items]


MIXTURE_IDS_ONCE = checks.Check(
    cel="self.all(s, self.exists_one(t, t.id == s.id))",
    message="must give each source its own id: rename the repeats",
    python=lambda v: len({s.get("id") for s in _plain_items(v)}) == len(_plain_items(v)),
)
MIXTURE_WEIGHTS_ALL_OR_NONE = checks.Check(
    cel="self.all(s, has(s.weight)) || self.all(s, !has(s.weight))",
    message="must set weight on every source or on none (none: dataset.mixtureTemperature "
    "sets the shares from the sources' sizes)",
    python=lambda v: len({s.get("weight") is not None for s in _plain_items(v)}) <= 1,
)


class CleanAction(str, Enum):
    report = "report"
    drop = "drop"
    redact = "redact"


class PiiKind(str, Enum):
    email = "email"
    phone = "phone"
    card = "card"
    key = "key"


PII_KINDS_ONCE = checks.Check(
    cel="self.all(k, self.indexOf(k) == self.lastIndexOf(k))",
    message="must name each kind once (e.g. [email, phone, card, key]): remove the repeats",
    python=lambda v: isinstance(v, list) and len(set(v)) == len(v),
)


class Clean(_Model):
    """Duplicates, leakage between splits and PII, found before training
    (docs/practice.md, "Clean, leak-free data"). The report is saved as clean.json
    under the job's output prefix and summed up by `kubetune validate`, `kubetune
    run` and the trainer's log."""

    action: CleanAction = Field(
        CleanAction.report,
        description="report: count and list what is found, train on the data as it is; "
        "drop: leave out, before tokenizing, every duplicate after its first row (in each "
        "split), every train row that is also (or nearly) in validation or test, and every "
        "row with PII; redact: drop the duplicates and leaked rows the same way, and "
        "replace each PII span with a placeholder (<EMAIL>, <PHONE>, <CARD>, <KEY>) "
        "instead of dropping its row.",
    )
    near_duplicate_threshold: float = Field(
        0.8,
        ge=0.5,
        le=1.0,
        description="Two rows are near duplicates when their word 3-grams overlap at "
        "least this much (Jaccard similarity; MinHash LSH finds the candidates, the exact "
        "overlap confirms them). Rows of fewer than three 3-grams count only when equal. "
        "1.0: exact duplicates only (text compared case-folded, white space collapsed).",
    )
    pii: Annotated[list[PiiKind], Field(max_length=len(PiiKind)), PII_KINDS_ONCE] = Field(
        [kind.value for kind in PiiKind],  # a plain default: the CRD carries it
        description="PII kinds scanned for: email (addresses outside the reserved "
        "example domains), phone (10 to 15 digits, or + and 8 or more; dates and "
        "addresses left out), card (13 to 19 digits of a card network that pass the Luhn "
        "check), key (cloud and API keys and tokens, private key blocks, long random "
        "values set to a key, token, secret or password). [] scans for none.",
    )


class Dataset(StorageAccess):
    train: Optional[DataSource] = Field(
        None, description="Training data: one source. Set exactly one of train or mixture."
    )
    mixture: Optional[
        Annotated[
            list[MixtureSource],
            Field(min_length=2, max_length=MIXTURE_MAX),
            MIXTURE_IDS_ONCE,
            MIXTURE_WEIGHTS_ALL_OR_NONE,
        ]
    ] = Field(
        None,
        description="Training data: several sources, each with its id, its own format and "
        "a weight; each epoch draws its examples from the sources by weight, in an order "
        "fixed by hyperparameters.seed (a resumed run sees the same batches). "
        "validationSplit holds out that share of each source, and evaluation reports the "
        "held-out loss of each source (eval_loss_per_source) beside the overall one. Set "
        "exactly one of train or mixture.",
    )
    mixture_temperature: float = Field(
        1.0,
        gt=0.0,
        le=100.0,
        description="mixture without weights: source i's share is proportional to "
        "n_i^(1/T), n_i its training examples. 1: proportional to size (every example "
        "seen once an epoch); higher evens the sources out (large T: uniform).",
    )
    validation: Optional[DataSource] = Field(
        None, description="Held-out data. Without it, validationSplit of train is held out."
    )
    test: Optional[DataSource] = Field(
        None,
        description="Test data, in the same format: evaluated once after training, never used "
        "for early stopping or checkpoint selection.",
    )
    validation_split: float = Field(
        0.05,
        ge=0.0,
        le=0.5,
        description="Fraction of train held out for evaluation when validation is not set "
        "(0 disables evaluation data).",
    )
    format: DatasetFormat = Field(
        DatasetFormat.chat,
        description="Row format. text: {text}; prompt-completion: {prompt, completion}; "
        "chat: {messages: [{role, content}]}, rendered with the model's chat template, loss "
        "on assistant turns only; alpaca: {instruction, input, output}; sharegpt: "
        "{conversations: [{from, value}]}; preference (method.objective dpo): {prompt, "
        "chosen, rejected} as text or as chat messages, loss on the responses only; feedback "
        "(method.objective kto): {prompt, completion, label: true|false}, a thumbs up or down "
        "on one answer, prompt and completion as text or as chat messages; prompt "
        "(method.objective grpo): {prompt} as text or {messages} (or {prompt: [messages]}), "
        "plus any reference fields the grader reads as {{item.<field>}}; classification "
        "(method.task classification): {text, label}, label a string or an integer.",
    )
    max_seq_length: int = Field(
        2048,
        ge=16,
        le=262144,
        description="Tokens per example; longer examples are truncated and counted.",
    )
    packing: bool = Field(
        True,
        description="Pack several examples into each sequence (position ids reset per "
        "example, no cross-example attention) instead of padding.",
    )
    clean: Optional[Clean] = Field(
        None,
        description="Find exact and near-duplicate rows, train rows leaked into "
        "validation or test, and PII (emails, phone numbers, card numbers, keys); report "
        "them, or drop or redact them before training. Unset: no scan.",
    )

    def train_sources(self) -> list[DataSource]:
        """What training reads: train, or the mixture's sources."""
        return list(self.mixture) if self.mixture else [self.train] if self.train else []

    def format_of(self, source: DataSource) -> str:
        """A source's row format: its own (a mixture source's) or dataset.format."""
        fmt = getattr(source, "format", None) or self.format
        return fmt.value if isinstance(fmt, Enum) else str(fmt)


# ---------------------------------------------------------------------------- method


class MethodType(str, Enum):
    lora = "lora"
    qlora = "qlora"
    full = "full"


class Task(str, Enum):
    generation = "generation"
    classification = "classification"


class LoraConfig(_Model):
    r: int = Field(16, ge=1, le=1024, description="LoRA rank.")
    alpha: int = Field(32, ge=1, le=4096, description="LoRA scaling numerator (alpha / r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[SpecWord] = Field(
        default_factory=lambda: ["all-linear"],
        min_length=1,
        max_length=LIST_MAX,
        description="Module names to adapt, or [all-linear] for every linear layer but the "
        "output head.",
    )
    modules_to_save: list[SpecWord] = Field(
        default_factory=list,
        max_length=LIST_MAX,
        description="Modules trained in full and saved with the adapter (e.g. lm_head).",
    )
    layers: Optional[Annotated[LayerIndices, Field(min_length=1)]] = Field(
        None,
        description="The decoder layers that get adapters, by index (0 is the one next to "
        "the embeddings), in increasing order; each below the model's layer count (the "
        "trainer checks it and names the count). Unset: every layer. A parent's adapter "
        "that continues keeps its own layers.",
    )


class Unfreeze(_Model):
    """Gradual unfreezing (ULMFiT): the trainable parts start one at a time, from the
    top of the model down."""

    every_steps: int = Field(
        ge=1,
        le=10_000_000,
        description="Steps between two unfreezings. The trainable parts in order from the "
        "top (the head, then the decoder layers from the last down, then the embeddings); "
        "part k (0 is the first) trains from step k x everySteps on. Until then its learning "
        "rate is 0: its weights stay as they started, its gradients are still computed.",
    )


class FullConfig(_Model):
    """Which weights of a full fine-tune train, and at which rate."""

    trainable_layers: Optional[LayerIndices] = Field(
        None,
        description="The decoder layers that train, by index (0 is the one next to the "
        "embeddings), in increasing order; each below the model's layer count (the trainer "
        "checks it and names the count). Unset: all of them; []: none (with trainHead, the "
        "head alone trains). The others keep their starting weights and take no gradients "
        "or optimizer state.",
    )
    train_embeddings: bool = Field(
        True,
        description="Train the input embeddings. A model whose head shares the embedding "
        "weight (tie_word_embeddings, as SmolLM2's) needs trainEmbeddings and trainHead alike.",
    )
    train_head: bool = Field(
        True,
        description="Train what lies above the last decoder layer: the final norm and the "
        "output head.",
    )
    unfreeze: Optional[Unfreeze] = Field(
        None, description="Gradual unfreezing; unset, every trainable part trains from step 0."
    )
    layer_lr_decay: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Layer-wise learning-rate decay: of L decoder layers, layer i trains at "
        "learningRate x layerLrDecay^(L-1-i), the embeddings at learningRate x "
        "layerLrDecay^L, the head at learningRate (a shared embedding weight too). 1: one "
        "rate for all.",
    )


class QuantizationConfig(_Model):
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type (QLoRA).")
    double_quant: bool = Field(True, description="Quantize the quantization constants too.")


# One member per row of the objectives table.
Objective = Enum("Objective", {name: name for name in objectives.NAMES}, type=str)


def _beta() -> Any:
    """beta of the objectives that measure the policy against a reference (dpo, kto)."""
    return Field(
        0.1,
        gt=0,
        le=100,
        description="Strength of the pull towards the reference model: lower lets the "
        "policy move further from it.",
    )


class DpoLossType(str, Enum):
    sigmoid = "sigmoid"
    hinge = "hinge"
    ipo = "ipo"


class DpoConfig(_Model):
    beta: float = _beta()
    loss_type: DpoLossType = Field(
        DpoLossType.sigmoid,
        description="sigmoid: the DPO paper's loss; hinge: the SLiC hinge; ipo: the IPO "
        "squared loss on length-averaged log-probabilities.",
    )
    label_smoothing: float = Field(
        0.0,
        ge=0,
        le=0.5,
        description="Assumed fraction of pairs whose preference label is flipped "
        "(conservative DPO; sigmoid loss only).",
    )


class KtoConfig(_Model):
    beta: float = _beta()
    desirable_weight: float = Field(
        1.0,
        gt=0,
        le=100,
        description="Weight of the loss on thumbs-up rows. Keep desirableWeight x (thumbs-up "
        "rows) / (undesirableWeight x (thumbs-down rows)) between 1 and 4/3, as the KTO paper "
        "advises: with few thumbs-up rows, raise this.",
    )
    undesirable_weight: float = Field(
        1.0,
        gt=0,
        le=100,
        description="Weight of the loss on thumbs-down rows.",
    )


class GrpoLossType(str, Enum):
    grpo = "grpo"
    dr_grpo = "drGrpo"


class GrpoConfig(_Model):
    generations_per_prompt: int = Field(
        4,
        ge=2,
        le=64,
        description="Completions sampled per prompt (the group whose rewards are compared).",
    )
    max_new_tokens: int = Field(64, ge=1, le=8192, description="Tokens per completion, at most.")
    temperature: float = Field(
        1.0, gt=0, le=10, description="Sampling temperature of the rollouts."
    )
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling of the rollouts.")
    beta: float = Field(
        0.04,
        ge=0,
        le=10,
        description="KL coefficient against the reference model (where the job starts); "
        "0 turns the KL term off and no reference is scored.",
    )
    epsilon: float = Field(
        0.2,
        gt=0,
        le=1,
        description="Clipping of the probability ratio to [1 - epsilon, 1 + epsilon].",
    )
    loss_type: GrpoLossType = Field(
        GrpoLossType.grpo,
        description="grpo: advantages divided by the group's standard deviation, each "
        "completion's loss averaged over its tokens; drGrpo (Dr. GRPO): no division by the "
        "standard deviation, and the token losses summed and divided by a constant "
        "(maxNewTokens x completions), so long and short completions weigh the same per token.",
    )
    iterations: int = Field(
        1,
        ge=1,
        le=16,
        description="Optimisation passes over each batch of rollouts (more than 1: the "
        "ratio to the policy that sampled them is clipped by epsilon).",
    )
    grader: Grader = Field(
        description="What scores a completion: stringCheck, textSimilarity, python, "
        "scoreModel or multi (a weighted sum of named graders). Its templates read the "
        "completion as {{sample.output_text}} and the data row's fields as {{item.<field>}}.",
    )


class TeacherSource(_Model):
    """The teacher of method.objective distill: a Hugging Face id or a folder of
    weights, read with spec.model's endpoint, region and Secrets."""

    name: Optional[ModelId] = Field(
        None,
        description="Hugging Face model id of the teacher. Set at most one of name, uri or "
        "fromJob; with none, the teacher is spec.model itself (its name or uri and revision, "
        "without a parent and without pruning).",
    )
    uri: Optional[StorageUri] = Field(
        None,
        description="Folder with the teacher's weights (s3://, gs://, file:// or a path on a "
        "mounted volume), e.g. a merged model another job wrote.",
    )
    revision: Optional[SpecWord] = Field(
        None, description="Git revision of a Hugging Face teacher."
    )
    from_job: Optional[JobName] = Field(
        None,
        description="A FineTuneJob in the same namespace that has Succeeded: its merged model "
        "(output.mergeAdapter) or fully fine-tuned model is the teacher. The job waits for it "
        "as for model.fromJob. Set at most one of name, uri or fromJob.",
    )


class DistillMode(str, Enum):
    logits = "logits"
    sequence = "sequence"


class DistillLoss(str, Enum):
    forward_kl = "forwardKL"
    reverse_kl = "reverseKL"


class DistillTokens(str, Enum):
    responses = "responses"
    all = "all"


class DistillConfig(_Model):
    teacher: Optional[TeacherSource] = Field(
        None,
        description="The model whose answers the student learns: unset, spec.model without "
        "its parent or pruning. It must share the student's tokenizer (the same vocabulary).",
    )
    mode: DistillMode = Field(
        DistillMode.logits,
        description="logits: the student matches the teacher's next-token distribution on "
        "the data's response tokens (loss, temperature, weight); sequence: the teacher answers "
        "the training prompts once (greedy, maxNewTokens), the answers are cached under the "
        "job's prefix, and the student trains on them with the next-token loss.",
    )
    loss: DistillLoss = Field(
        DistillLoss.forward_kl,
        description="logits mode: forwardKL, KL(teacher || student), covers every answer the "
        "teacher gives weight to; reverseKL, KL(student || teacher), settles on the teacher's "
        "most likely answers.",
    )
    temperature: float = Field(
        1.0,
        gt=0,
        le=20,
        description="logits mode: both distributions are softened by this temperature, and "
        "the KL term multiplied by its square (so its gradients keep their size).",
    )
    weight: float = Field(
        0.5,
        ge=0,
        le=1,
        description="logits mode: the share of the distillation term in the loss; the rest "
        "is the next-token loss on the data's own answers (1: distillation only).",
    )
    tokens: DistillTokens = Field(
        DistillTokens.responses,
        description="logits mode: where the student is pulled towards the teacher. "
        "responses: the data's response tokens (where the next-token loss is); all: every "
        "token of each example, prompts included (the next-token loss stays on the "
        "responses), which gives a pruned student twice the signal per step on chat data.",
    )
    max_new_tokens: int = Field(
        256,
        ge=1,
        le=8192,
        description="sequence mode: the most tokens of each teacher answer; with "
        "onPolicyFraction: of each answer the student samples.",
    )
    on_policy_fraction: float = Field(
        0.0,
        ge=0,
        le=1,
        description="logits mode (GKD): the share of micro-batches whose answers the student "
        "samples itself from the data's prompts (temperature 1, up to maxNewTokens), the KL "
        "to the teacher taken on those tokens alone; 0: the data's answers only.",
    )


class Method(_Model):
    task: Task = Field(
        Task.generation,
        description="generation: the model learns to write the answers (its language-model "
        "head); classification: a sequence-classification head on the same checkpoint "
        "learns one label per row (dataset.format classification: rows of text and label; "
        "the labels are the training data's distinct labels, sorted), scored by accuracy, "
        "macro-F1 and the labels' expected calibration error before and after training.",
    )
    objective: Objective = Field(
        Objective(objectives.DEFAULT), description=objectives.enum_description()
    )
    dpo: Optional[DpoConfig] = Field(
        None, description="DPO settings (objective dpo only; defaults apply when unset)."
    )
    kto: Optional[KtoConfig] = Field(
        None, description="KTO settings (objective kto only; defaults apply when unset)."
    )
    grpo: Optional[GrpoConfig] = Field(
        None, description="GRPO settings (objective grpo only, which needs its grader)."
    )
    distill: Optional[DistillConfig] = Field(
        None,
        description="Distillation settings (objective distill only; defaults apply when unset: "
        "logit distillation from spec.model).",
    )
    type: MethodType = Field(
        MethodType.lora,
        description="lora: low-rank adapters; qlora: LoRA on a 4-bit base model (GPU only); "
        "full: every weight.",
    )
    lora: Optional[LoraConfig] = Field(
        None, description="LoRA parameters (lora and qlora only; defaults apply when unset)."
    )
    full: Optional[FullConfig] = Field(
        None,
        description="Which layers of a full fine-tune train, gradual unfreezing and "
        "layer-wise learning rates (type full only; unset: every weight at one rate).",
    )
    quantization: Optional[QuantizationConfig] = Field(
        None, description="4-bit quantization (qlora only; defaults apply when unset)."
    )


# ---------------------------------------------------------------------------- training


class Precision(str, Enum):
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


class LrScheduler(str, Enum):
    cosine = "cosine"
    linear = "linear"
    constant = "constant"
    constant_with_warmup = "constant_with_warmup"


class Hyperparameters(_Model):
    epochs: Optional[float] = Field(
        None,
        gt=0,
        le=1000,
        description="Passes over the training data (default 1). Set epochs or maxSteps, not both.",
    )
    max_steps: Optional[int] = Field(
        None, ge=1, le=10_000_000, description="Optimizer steps. Set epochs or maxSteps, not both."
    )
    learning_rate: Optional[float] = Field(
        None,
        gt=0,
        le=1,
        description="Peak learning rate. Default 2e-4 for lora/qlora, 2e-5 for full.",
    )
    lr_scheduler: LrScheduler = Field(LrScheduler.cosine, description="Learning-rate schedule.")
    warmup_ratio: float = Field(
        0.03, ge=0, le=0.5, description="Fraction of steps spent warming up the learning rate."
    )
    weight_decay: float = Field(0.0, ge=0, le=1, description="AdamW weight decay.")
    batch_size: int = Field(4, ge=1, le=4096, description="Sequences per device per micro-step.")
    gradient_accumulation_steps: int = Field(
        1, ge=1, le=4096, description="Micro-steps per optimizer step."
    )
    max_grad_norm: float = Field(1.0, ge=0, le=1000, description="Gradient clipping (0: off).")
    precision: Precision = Field(
        Precision.bf16, description="bf16 (default), fp16 (GPU only) or fp32."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass: less memory, ~30% slower."
    )
    seed: int = Field(42, ge=0, le=2**31 - 1, description="Seed for data order and init.")
    log_every_steps: int = Field(
        10, ge=1, le=100_000, description="Steps between metric rows and progress updates."
    )


class Distributed(_Model):
    zero_stage: Union[Literal["auto"], Annotated[int, Field(ge=0, le=3)]] = Field(
        "auto",
        description="DeepSpeed ZeRO stage: an integer 0 to 3, or the text auto (picked "
        "from model size, method and GPU memory; the trainer logs what it picked). "
        "kubectl explain shows <Object> for a field that takes an integer or text.",
    )
    offload_optimizer: bool = Field(
        False, description="Keep optimizer state in CPU memory (ZeRO stage 2 or 3)."
    )
    offload_parameters: bool = Field(
        False, description="Keep parameters in CPU memory (ZeRO stage 3 only)."
    )


class Toleration(_Model):
    """A core/v1 Toleration, checked as Kubernetes checks a Pod's tolerations."""

    key: Optional[
        Annotated[str, Field(max_length=checks.QUALIFIED_NAME_MAX), checks.QUALIFIED_NAME]
    ] = Field(
        None,
        description="Taint key to tolerate, a label key such as nvidia.com/gpu. Empty, with "
        "operator Exists, tolerates every taint.",
    )
    operator: Optional[Literal["Exists", "Equal"]] = Field(
        None,
        description="Equal (the default): the taint's value must equal value. Exists: any "
        "value (leave value empty).",
    )
    value: Optional[LabelValue] = Field(
        None, description="Taint value to match with operator Equal (a label value)."
    )
    effect: Optional[Literal["NoSchedule", "PreferNoSchedule", "NoExecute"]] = Field(
        None, description="Taint effect to match; empty matches every effect."
    )
    toleration_seconds: Optional[int] = Field(
        None,
        description="With effect NoExecute only: how long the pod stays bound after the "
        "taint appears (default: forever; 0 or less: evicted at once).",
    )


TolerationItem = Annotated[(Toleration, *checks.TOLERATION)]


Quantity = Annotated[
    str,
    Field(
        max_length=64,
        pattern=r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$",
    ),
    checks.POSITIVE_QUANTITY,
]
# memory and disk: bytes, where m (thousandths) is never meant
ByteQuantity = Annotated[Quantity, checks.BYTES_QUANTITY]


class HeadResources(_Model):
    cpu: Quantity = Field("2", description="CPU for the Ray head pod.")
    memory: ByteQuantity = Field("8Gi", description="Memory for the Ray head pod.")


class Resources(_Model):
    workers: int = Field(1, ge=1, le=1024, description="Ray Train workers (one pod each).")
    gpus_per_worker: int = Field(
        1, ge=0, le=16, description="GPUs per worker (0: CPU training with gloo)."
    )
    gpu_resource_name: ResourceName = Field(
        "nvidia.com/gpu", description="Extended resource name of the GPUs."
    )
    cpu_per_worker: Quantity = Field("8", description="CPU per worker pod.")
    memory_per_worker: ByteQuantity = Field("64Gi", description="Memory per worker pod.")
    scratch_per_worker: ByteQuantity = Field(
        "20Gi",
        description="Local disk per worker pod where checkpoints are staged before upload: "
        "an emptyDir of this size limit, requested as ephemeral-storage.",
    )
    head: HeadResources = Field(default_factory=HeadResources, description="Ray head pod.")
    node_selector: Annotated[dict[str, LabelValue], checks.NODE_SELECTOR] = Field(
        default_factory=dict,
        max_length=LIST_MAX,
        description="Node labels every pod requires (label keys and values).",
    )
    tolerations: list[TolerationItem] = Field(
        default_factory=list, max_length=LIST_MAX, description="Tolerations for every pod."
    )
    priority_class_name: Optional[PriorityClassName] = Field(
        None, description="PriorityClass of the pods (a PriorityClass name)."
    )
    image: Optional[ImageRef] = Field(
        None, description="Trainer image; default: the one the operator was installed with."
    )


class Staging(_Model):
    """A volume that every pod of the job mounts: the Ray head's driver fetches the
    model, a parent's outputs and the data into it once, before the workers start;
    the workers read them from there (sha256-checked) instead of from object storage."""

    claim_name: ClaimName = Field(
        description="A ReadWriteMany PersistentVolumeClaim in the FineTuneJob's namespace "
        "(the head writes, the workers mount it read-only); its root must be writable by the "
        "pods' user (the chart's trainer.runAsUser). Default: the operator's "
        "(KUBETUNE_STAGING_CLAIM, the chart's trainer.stagingClaim); neither: every worker "
        "fetches for itself."
    )


class Generation(_Model):
    """Evaluation by generation: the model answers held-out prompts before and after
    training; the answers are scored against the references."""

    examples: int = Field(
        16, ge=1, le=10_000, description="Held-out examples answered (the first n, seeded)."
    )
    max_new_tokens: int = Field(128, ge=1, le=32_768, description="Tokens generated per answer.")
    do_sample: bool = Field(False, description="Sample instead of greedy decoding.")
    temperature: float = Field(
        1.0, gt=0, le=10, description="Sampling temperature (doSample only)."
    )
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (doSample only).")
    seed: int = Field(
        0, ge=0, le=INT32_MAX, description="Seed for the example choice and sampling."
    )


SUPERVISED_FORMATS = objectives.SUPERVISED_FORMATS


class Calibration(_Model):
    """Expected calibration error of the answer tokens, before and after training."""

    fit_temperature: bool = Field(
        False,
        description="Also fit one softmax temperature on the validation split (minimising "
        "the answer tokens' negative log-likelihood) and report the error at it.",
    )
    save_temperature: bool = Field(
        False,
        description="Write the fitted temperature (with doSample true) into the saved "
        "models' generation_config.json; needs fitTemperature.",
    )


class RetentionSet(DataSource):
    format: Literal[SUPERVISED_FORMATS] = Field(
        "chat",
        description="Row format of the retention set: text, prompt-completion, chat, alpaca "
        "or sharegpt (scored on its labelled tokens, as dataset.format is).",
    )


class Retention(_Model):
    """Forgetting: a general-purpose held-out set scored before and after training."""

    dataset: RetentionSet = Field(
        description="The general-purpose held-out set: a file or folder (uri) or a datasets "
        "name, and its format; read with spec.dataset's endpoint, region and secretRef."
    )
    max_examples: int = Field(
        256, ge=1, le=1_000_000, description="Rows scored (the first n usable ones)."
    )
    max_regression: Optional[float] = Field(
        None,
        ge=0,
        le=100,
        description="Bound on the relative rise of the retention loss: (after - before) / "
        "before, e.g. 0.05 for 5%. Exceeded, the job gets the condition RetentionRegressed "
        "(True); within it, RetentionRegressed False. Unset: reported only.",
    )
    fail_on_regression: bool = Field(
        False, description="Fail the job when maxRegression is exceeded; needs maxRegression."
    )
    generation: bool = Field(
        False,
        description="Also answer retention prompts before and after training with "
        "evaluation.generation's settings and score them (split `retention` in the "
        "generation scores); needs evaluation.generation and a format with prompts.",
    )


class Evaluation(_Model):
    enabled: bool = Field(True, description="Evaluate on the held-out data.")
    every_steps: Optional[int] = Field(
        None,
        ge=1,
        le=10_000_000,
        description="Steps between evaluations (default: each checkpoint).",
    )
    max_batches: Optional[int] = Field(
        None, ge=1, le=1_000_000, description="Cap on batches per evaluation (default: all)."
    )
    generation: Optional[Generation] = Field(
        None,
        description="Also generate answers to held-out prompts before and after training and "
        "score them (exact match, ROUGE-L, BLEU, chrF); the test split too when set.",
    )
    calibration: Optional[Calibration] = Field(
        None,
        description="Measure the expected calibration error (15 equal-width bins of the "
        "top token's probability) of the validation split's answer tokens before and after "
        "training; optionally fit and save a temperature.",
    )
    retention: Optional[Retention] = Field(
        None,
        description="Measure forgetting: the loss on a general-purpose held-out set before "
        "and after training, its regression, and an optional bound that marks or fails the "
        "job.",
    )


class EarlyStopping(_Model):
    enabled: bool = Field(False, description="Stop when the metric stops improving.")
    metric: Literal[objectives.metric_names()] = Field(  # every objective's metrics
        "eval_loss", description=objectives.metric_description("Metric watched.")
    )
    mode: Optional[Literal["min", "max"]] = Field(
        None,
        description="Whether lower or higher is better (default: the metric's direction, min "
        "for losses, max for accuracies and rewards; given, it must match it).",
    )
    patience: int = Field(3, ge=1, le=1000, description="Evaluations without improvement.")
    min_delta: float = Field(
        0.0, ge=0, le=1000, description="Smallest change that counts as improvement."
    )


class Checkpointing(_Model):
    every_steps: int = Field(
        200, ge=1, le=10_000_000, description="Steps between committed checkpoints."
    )
    keep_last: int = Field(3, ge=1, le=1000, description="Committed checkpoints kept.")
    save_on_stop: bool = Field(
        True,
        description="When a pod of the job is told to stop (spec.suspend, a preemption, a "
        "node drain, a retry), finish the step in flight and commit a checkpoint there "
        "before the pod goes, so the next run loses no step; `kubetune run` does the same "
        "on the first Ctrl-C. Sweeps stop at once (their trials resume from their last "
        "periodic checkpoint).",
    )
    termination_grace_period_seconds: int = Field(
        120,
        ge=30,
        le=86_400,
        description="How long a stopping pod may take to save (the pods' "
        "terminationGracePeriodSeconds): the step in flight plus a checkpoint's upload. "
        "A save that takes longer is cut off and the run resumes from the checkpoint "
        "before.",
    )


GGUF_TYPES = ("f16", "q8_0", "q5_0", "q4_1", "q4_0")
GGUF_UNIQUE_TYPES = checks.Check(
    cel="self.types.all(t, self.types.filter(u, u == t).size() == 1)",
    message="output.gguf.types lists a type twice: list each type once",
    python=lambda g: len(set(g["types"])) == len(g["types"]),
    field="types",
)


class GgufExport(_Model):
    """GGUF files of the merged or full model, for llama.cpp and Ollama."""

    types: list[Literal[GGUF_TYPES]] = Field(
        min_length=1,
        max_length=len(GGUF_TYPES),
        description="One file per type: f16, q8_0 (8-bit), q5_0, q4_1 or q4_0 (4-bit). Each is "
        "read back after export: tensor shapes, tokenizer and the held-out loss against "
        "the safetensors model (docs/gguf.md gives the tolerance per type).",
    )
    enforce_tolerance: bool = Field(
        False,
        description="Fail the job when a file's held-out loss is beyond its type's tolerance "
        "(default: a warning in the log, withinTolerance false in outputs.json). A file that "
        "does not read back (shapes, tokenizer) always fails the job.",
    )


INTERPOLATION_MAX = 8
INTERPOLATION_RULES = ("bestHeldOut", "fixed")


class Interpolation(_Model):
    """WiSE-FT: models between the base and the fine-tuned weights, each scored on
    the held-out set; one is published (docs/practice.md, Weight interpolation)."""

    weights: list[Annotated[float, Field(gt=0, le=1)]] = Field(
        min_length=1,
        max_length=INTERPOLATION_MAX,
        description="Mixing weights α in (0, 1], each listed once: the model at α is "
        "(1-α)·base + α·fine-tuned (lora/qlora: the adapter's update scaled by α; full: the "
        "weights averaged). 1.0 is the fine-tuned model itself.",
    )
    select: Literal[INTERPOLATION_RULES] = Field(
        "bestHeldOut",
        description="Which one is published under interpolated/: bestHeldOut, the lowest "
        "held-out loss (a tie goes to the smaller α, closer to the base); fixed, the one "
        "at `weight`. Every weight is scored and listed in outputs.json either way.",
    )
    weight: Optional[float] = Field(
        None, gt=0, le=1, description="select: fixed: the weight published, one of weights."
    )


class Output(StorageAccess):
    uri: Optional[OutputUri] = Field(
        None,
        description="Where checkpoints, metrics and outputs go (s3://bucket/prefix, gs://, "
        "or an absolute path on a mounted volume). Required on a cluster; `kubetune run` "
        "defaults to ./runs. The job "
        "writes under {uri}/{namespace}/{name}/{uid}/.",
    )
    merge_adapter: bool = Field(
        False, description="Also save the base model with the adapter merged (lora/qlora)."
    )
    gguf: Optional[Annotated[GgufExport, GGUF_UNIQUE_TYPES]] = Field(
        None,
        description="Also write the merged model (lora/qlora with mergeAdapter) or the full "
        "fine-tune as GGUF files (Llama-family models only). Default: no GGUF.",
    )
    interpolation: Optional[Interpolation] = Field(
        None,
        description="Also score models interpolated between the base and the fine-tuned "
        "weights (WiSE-FT) on the held-out set and publish the one `select` picks under "
        "interpolated/. Default: none.",
    )


class MlflowTracking(_Model):
    """An MLflow tracking server. Credentials come only from a Secret: key
    MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD."""

    tracking_uri: EndpointUri = Field(
        description="The tracking server's URL, e.g. http://mlflow.mlflow.svc:5000."
    )
    experiment: SpecText = Field(
        "kubetune", description="Experiment name; created when it does not exist."
    )
    secret_ref: Optional[SecretRef] = Field(
        None, description="Secret holding the tracking server's credentials."
    )


class Tracking(_Model):
    mlflow: Optional[MlflowTracking] = Field(
        None,
        description="Log params, metrics and artifacts to MLflow. A server that is down never "
        "fails or slows training: the TrackingReachable condition says why.",
    )


# ---------------------------------------------------------------------------- sweep


class SweepParameter(_Model):
    """One searched field: a list of values (choice) or a range."""

    distribution: Literal["choice", "uniform", "logUniform", "intRange"] = Field(
        description="choice: one of values; uniform: any number from low to high; "
        "logUniform: the same on a log scale (learning rates); intRange: a whole number "
        "from low to high, both included."
    )
    values: Optional[
        Annotated[
            list[Annotated[float, Field(ge=0, le=sweep_space.VALUE_MAX)]],
            Field(min_length=1, max_length=LIST_MAX),
        ]
    ] = Field(None, description="The values to choose from (choice only).")
    low: Optional[float] = Field(
        None, ge=0, le=sweep_space.VALUE_MAX, description="Lower end of the range."
    )
    high: Optional[float] = Field(
        None, ge=0, le=sweep_space.VALUE_MAX, description="Upper end of the range."
    )


SweepParameterItem = Annotated[(SweepParameter, *sweep_space.PARAMETER_CHECKS)]
SweepParameters = Annotated[(dict[str, SweepParameterItem], *sweep_space.PARAMETERS_CHECKS)]


class SweepEarlyStopping(_Model):
    enabled: bool = Field(True, description="Stop trials whose metric trails the others' (ASHA).")
    grace_period: Optional[int] = Field(
        None,
        ge=1,
        le=10_000_000,
        description="Steps every trial trains before it can be stopped (default: up to its "
        "first evaluation, evaluation.everySteps, else checkpointing.everySteps); given or "
        "defaulted, at most hyperparameters.maxSteps.",
    )
    reduction_factor: int = Field(
        3,
        ge=2,
        le=16,
        description="At each rung (grace period, then that times this factor, ...) only the "
        "best 1/reductionFactor of the trials go on.",
    )


class Sweep(_Model):
    """A hyperparameter search inside the job: Ray Tune runs `trials` trainings of
    this spec, each with its own values of `parameters`, and the best trial's
    output becomes the job's output."""

    parameters: SweepParameters = Field(
        min_length=1,
        max_length=sweep_space.PARAMETERS_MAX,
        description="Spec fields to search, by dotted path, each with a distribution. "
        f"Sweepable: {sweep_space.SWEEPABLE_TEXT}.",
    )
    metric: Literal[objectives.metric_names()] = Field(  # every objective's metrics
        "eval_loss",
        description=objectives.metric_description("Evaluation metric that ranks the trials."),
    )
    mode: Optional[Literal["min", "max"]] = Field(
        None,
        description="Whether lower or higher is better (default: the metric's direction, min "
        "for losses, max for accuracies and rewards; given, it must match it).",
    )
    trials: int = Field(8, ge=1, le=1000, description="Trials in all.")
    parallel_trials: int = Field(
        1,
        ge=1,
        le=64,
        description="Trials at once; the Ray cluster gets parallelTrials x resources.workers "
        "workers.",
    )
    algorithm: Literal["random", "tpe"] = Field(
        "random",
        description="random: independent draws (seeded by hyperparameters.seed); tpe: "
        "Optuna's Tree-structured Parzen Estimator, which learns from finished trials.",
    )
    early_stopping: SweepEarlyStopping = Field(
        default_factory=SweepEarlyStopping, description="Early termination of bad trials."
    )


class FineTuneJobSpec(_Model):
    """What to fine-tune, on which data, how, and where the results go. Only
    suspend, backoffLimit, activeDeadlineSeconds, startTimeoutSeconds and
    ttlSecondsAfterFinished can change after creation."""

    model: ModelSource = Field(description="The base model.")
    dataset: Dataset = Field(description="Training and evaluation data.")
    method: Method = Field(default_factory=Method, description="Fine-tuning method.")
    hyperparameters: Hyperparameters = Field(
        default_factory=Hyperparameters, description="Optimization settings."
    )
    distributed: Distributed = Field(
        default_factory=Distributed, description="DeepSpeed ZeRO settings."
    )
    resources: Resources = Field(default_factory=Resources, description="Pods and accelerators.")
    evaluation: Evaluation = Field(
        default_factory=Evaluation,
        description="Evaluation on held-out data (dataset.validation, or validationSplit of "
        "train) during training.",
    )
    early_stopping: EarlyStopping = Field(
        default_factory=EarlyStopping, description="Early stopping on an evaluation metric."
    )
    checkpointing: Checkpointing = Field(
        default_factory=Checkpointing, description="Checkpoint cadence and retention."
    )
    output: Output = Field(default_factory=Output, description="Where results go.")
    staging: Optional[Staging] = Field(
        None,
        description="Fetch the model, a parent's outputs and the data once per job into a "
        "shared volume. See docs/operator.md (Staging).",
    )
    tracking: Optional[Tracking] = Field(None, description="Experiment tracking.")
    sweep: Optional[Sweep] = Field(
        None,
        description="Search hyperparameters: several trials of this spec, the best one's "
        "output kept. See docs/sweeps.md.",
    )
    suspend: bool = Field(
        False,
        description="Stop the Ray cluster and keep the job; resume later from the last "
        "checkpoint. Kueue sets this while a job waits.",
    )
    backoff_limit: int = Field(
        3, ge=0, le=100, description="Retries after a failed attempt; each resumes."
    )
    active_deadline_seconds: Optional[int] = Field(
        None, ge=1, le=INT32_MAX, description="Fail the job after this many seconds of running."
    )
    start_timeout_seconds: Optional[int] = Field(
        None,
        ge=0,
        le=INT32_MAX,
        description="Fail the job when its Ray pods are not all running this many seconds "
        "after it starts (or resumes, or retries), with the scheduler's reason in the "
        "message; 0: wait as long as it takes. Default: the operator's "
        "(KUBETUNE_START_TIMEOUT_SECONDS, the chart's startTimeoutSeconds).",
    )
    ttl_seconds_after_finished: Optional[int] = Field(
        None,
        ge=0,
        le=INT32_MAX,
        description="Delete the Ray cluster and config this long after the job finishes "
        "(the FineTuneJob and its outputs stay).",
    )


# ---------------------------------------------------------------------------- status


class Phase(str, Enum):
    Pending = "Pending"
    Queued = "Queued"
    Starting = "Starting"
    Running = "Running"
    Succeeded = "Succeeded"
    Failed = "Failed"
    Suspended = "Suspended"

    @property
    def is_terminal(self) -> bool:
        return self in (Phase.Succeeded, Phase.Failed)


class Condition(_Model):
    type: Text
    status: Literal["True", "False", "Unknown"]
    reason: Optional[Text] = None
    message: Optional[Annotated[str, Field(max_length=4096)]] = None
    last_transition_time: Optional[Text] = None
    observed_generation: Optional[int] = None


# status.progress.skippedCheckpoints: the trainer skips no more than the committed
# checkpoints it keeps; the status shows the newest this many
SKIPPED_CHECKPOINTS_MAX = 20


class SkippedCheckpointStatus(_Model):
    step: int
    reason: Optional[Text] = Field(None, description="Which file and what was wrong with it.")
    moved_to: Optional[Uri] = Field(
        None, description="Where the checkpoint was moved aside (checkpoints/quarantine/)."
    )


class StartupPhaseStatus(_Model):
    name: Text = Field(
        description="created (the job, or a retry's RayJob), rayJobCreated, podsScheduled "
        "(the last Ray pod placed), containersStarted (the last pod's images pulled and "
        "containers running), then the trainer's: workerStarted, modelFetched, dataPrepared, "
        "modelLoaded, engineReady, baseEvaluated, firstStep."
    )
    time: Optional[Text] = Field(None, description="When it ended (RFC 3339).")
    seconds: Optional[float] = Field(
        None, description="Seconds from the attempt's start (the first phase) to its end."
    )


class Progress(_Model):
    step: int = Field(0, ge=0)
    total_steps: Optional[int] = None
    epoch: Optional[float] = None
    percent: Optional[float] = None
    eta_seconds: Optional[int] = None
    resumed_from: Optional[int] = Field(
        None,
        description="The committed checkpoint step the current attempt resumed from "
        "(after a retry, a suspend or a lost pod); absent when it started fresh.",
    )
    skipped_checkpoints: Optional[list[SkippedCheckpointStatus]] = Field(
        None,
        max_length=SKIPPED_CHECKPOINTS_MAX,
        description="Newer committed checkpoints the current attempt found damaged (a file "
        "missing, cut short or changed since it was written) and passed over.",
    )
    startup: Optional[list[StartupPhaseStatus]] = Field(
        None,
        max_length=12,
        description="The current attempt's way from its start to the first training step, "
        "phase by phase.",
    )
    display: Optional[Text] = Field(None, description="e.g. '120/600' for kubectl get.")


class Metrics(_Model):
    train_loss: Optional[float] = None
    eval_loss: Optional[float] = None
    eval_perplexity: Optional[float] = None
    eval_token_accuracy: Optional[float] = None
    # objective dpo: share of pairs whose chosen answer gained more, and the mean gap
    reward_accuracy: Optional[float] = None
    reward_margin: Optional[float] = None
    eval_reward_accuracy: Optional[float] = None
    eval_reward_margin: Optional[float] = None
    # objective kto: mean rewards of thumbs-up and thumbs-down answers, the KL estimate
    # (kl, shared with grpo), and the share of held-out up/down pairs whose thumbs-up
    # answer has the higher reward
    rewards_desirable: Optional[float] = None
    rewards_undesirable: Optional[float] = None
    kl: Optional[float] = None
    eval_ranking_accuracy: Optional[float] = None
    # objective grpo: the rollouts' mean reward and its spread, the KL to the reference,
    # the share of prompts whose completions all scored the same, the held-out reward,
    # and the graders' failures so far (each scored 0, counted)
    reward: Optional[float] = None
    reward_std: Optional[float] = None
    completion_length: Optional[float] = None
    frac_reward_zero_std: Optional[float] = None
    eval_reward: Optional[float] = None
    grader_errors_total: Optional[int] = None
    grader_timeouts_total: Optional[int] = None
    # objective distill: the KL to the teacher since the previous row, the held-out
    # top-1 agreement with the teacher and the teacher's own held-out loss
    distill_kl: Optional[float] = None
    eval_agreement: Optional[float] = None
    teacher_eval_loss: Optional[float] = None
    # evaluation.calibration: expected calibration error of the answer tokens before and
    # after training, the fitted temperature and the error at it
    eval_ece_before: Optional[float] = None
    eval_ece: Optional[float] = None
    calibration_temperature: Optional[float] = None
    eval_ece_at_temperature: Optional[float] = None
    # method.task classification: held-out accuracy, macro-F1 and the labels' expected
    # calibration error, before training (the base with its new head) and at the latest
    # evaluation
    eval_accuracy_before: Optional[float] = None
    eval_accuracy: Optional[float] = None
    eval_f1_before: Optional[float] = None
    eval_f1: Optional[float] = None
    eval_label_ece_before: Optional[float] = None
    eval_label_ece: Optional[float] = None
    # evaluation.retention: the retention set's loss before and after, relative rise
    retention_loss_before: Optional[float] = None
    retention_loss: Optional[float] = None
    retention_regression: Optional[float] = None
    # dataset.mixture: the latest held-out loss of each source, by its id
    eval_loss_per_source: Optional[Annotated[dict[str, float], Field(max_length=MIXTURE_MAX)]] = (
        None
    )
    # output.interpolation: the held-out loss of the published interpolated model
    interpolated_eval_loss: Optional[float] = None
    tokens_per_second: Optional[float] = None
    learning_rate: Optional[float] = None
    trainable_parameters: Optional[int] = Field(
        None, description="Parameters the latest step updated (adapters, or method.full's parts)."
    )
    display_loss: Optional[Text] = Field(None, description="Latest loss for kubect get.")


class CheckpointRef(_Model):
    step: int
    uri: Uri
    eval_loss: Optional[float] = None
    time: Optional[Text] = None


class Outputs(_Model):
    prefix: Optional[Uri] = Field(None, description="The job's storage prefix.")
    adapter: Optional[Uri] = None
    merged_model: Optional[Uri] = None
    gguf: Optional[list[Uri]] = Field(
        None, max_length=len(GGUF_TYPES), description="output.gguf: the GGUF files."
    )
    metrics: Optional[Uri] = None
    loss_curve: Optional[Uri] = None
    interpolated: Optional[Uri] = Field(
        None,
        description="output.interpolation: the published interpolated model (full, or "
        "lora with mergeAdapter) or adapter.",
    )
    interpolation_weight: Optional[float] = Field(
        None, description="output.interpolation: the α of the published one."
    )


class ParentStatus(_Model):
    """The parent this job continues from, fixed when the job starts."""

    name: Optional[Name] = Field(None, description="The parent FineTuneJob (fromJob).")
    uid: Optional[Text] = None
    uri: Optional[Uri] = Field(None, description="The parent's storage prefix or checkpoint.")


class LineageStatus(_Model):
    """A summary of run.json (the run record under the job's prefix)."""

    run_record: Optional[Uri] = None
    spec_hash: Optional[Text] = None
    data_hash: Optional[Text] = Field(None, description="Hash of the dataset files' hashes.")
    base_model: Optional[Text] = None
    parent: Optional[Text] = None
    image: Optional[Text] = None


class TrackingStatus(_Model):
    run_id: Optional[Text] = None
    experiment_id: Optional[Text] = None
    url: Optional[Uri] = None


class SweepStatus(_Model):
    metric: Optional[Text] = None
    trials: int = Field(0, description="Trials planned.")
    finished: int = Field(0, description="Trials trained to their last step.")
    stopped: int = Field(0, description="Trials stopped early (their metric trailed).")
    running: int = 0
    failed: int = 0
    steps_trained: int = Field(0, description="Steps trained, all trials together.")
    best_trial: Optional[Text] = None
    best_params: dict[str, float] = Field(
        default_factory=dict, max_length=LIST_MAX, description="The best trial's values."
    )
    best_metric: Optional[float] = None
    display: Optional[Text] = Field(None, description="e.g. 'eval_loss 1.2345' for kubectl get.")


class FineTuneJobStatus(_Model):
    phase: Optional[Phase] = None
    conditions: list[Condition] = Field(default_factory=list, max_length=LIST_MAX)
    observed_generation: Optional[int] = None
    reason: Optional[Text] = None
    message: Optional[Annotated[str, Field(max_length=4096)]] = None
    config_map_name: Optional[Name] = None
    ray_job_name: Optional[Name] = None
    ray_cluster_name: Optional[Name] = None
    dashboard_url: Optional[Uri] = None
    start_time: Optional[Text] = None
    completion_time: Optional[Text] = None
    attempts: int = 0
    progress: Optional[Progress] = None
    metrics: Optional[Metrics] = None
    checkpoints: list[CheckpointRef] = Field(default_factory=list, max_length=LIST_MAX)
    outputs: Optional[Outputs] = None
    parent: Optional[ParentStatus] = None
    teacher: Optional[ParentStatus] = Field(
        None, description="method.distill.teacher.fromJob, fixed when the job starts."
    )
    lineage: Optional[LineageStatus] = None
    tracking: Optional[TrackingStatus] = None
    sweep: Optional[SweepStatus] = Field(
        None, description="A sweep's trials; outputs are the best trial's."
    )


class ObjectMeta(BaseModel):
    """The parts of metadata kubetune reads; everything else passes through."""

    model_config = ConfigDict(extra="allow")
    name: Optional[str] = None
    namespace: Optional[str] = None
    uid: Optional[str] = None
    generation: Optional[int] = None
    labels: dict[str, str] = Field(default_factory=dict)


class FineTuneJob(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    api_version: Literal["kubetune.io/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["FineTuneJob"]
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: FineTuneJobSpec
    status: Optional[FineTuneJobStatus] = None
