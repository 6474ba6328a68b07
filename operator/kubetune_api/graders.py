"""Graders: how a sample (a completion the model wrote) is scored against its data row.

The shapes follow OpenAI's graders (string_check, text_similarity, python,
score_model, multi) in this API's camelCase, so people can bring theirs.
`Grader` is a union discriminated by `type`; the trainer scores with it
(kubetune_trainer.graders) and the operator mounts what a grader reads (a
ConfigMap, a Secret's API key).

Nesting is bounded: a `multi` grader's graders are leaf graders, never `multi`
again. A CRD's schema cannot recurse, and one level of weighting covers what a
sum of sums would do. In the CRD the union is flattened into one object whose
`type` says which fields apply (kubetune_api.crd); the rules below say the same
in CEL and in Python.

This module depends on pydantic and kubetune_api.checks only, so the models
module can embed `Grader` without an import cycle.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, Discriminator, Field, Tag

from . import checks
from .base import SpecModel
from .checks import Check

TYPES = ("stringCheck", "textSimilarity", "python", "scoreModel", "multi")
LEAF_TYPES = TYPES[:-1]
OPERATIONS = ("eq", "ne", "like", "ilike")
METRICS = (
    "fuzzyMatch",
    "bleu",
    "gleu",
    "rouge1",
    "rouge2",
    "rouge3",
    "rouge4",
    "rouge5",
    "rougeL",
)

# Bounds: the API server's CEL cost estimate multiplies string lengths by how
# many of them a grader can hold, so every one is bounded.
NAME_MAX = 40  # "grader-<name>" is a volume name (a DNS label, at most 63)
TEMPLATE_MAX = 4096
SOURCE_MAX = 32 * 1024
MESSAGES_MAX = 8
GRADERS_MAX = 8
TIMEOUT_MAX = 600
MEMORY_MIN_MIB, MEMORY_MAX_MIB = 64, 16384
CONCURRENCY_MAX = 32

# Where the operator mounts a python grader's ConfigMap in the Ray pods.
CONFIGMAP_DIR = "/etc/kubetune-graders"  # not under /etc/kubetune: a ConfigMap volume
# The environment variable that carries a scoreModel grader's API key: the
# operator fills it from apiKeySecretRef; for `kubetune run`, set it yourself.
API_KEY_ENV = "KUBETUNE_GRADER_{}_API_KEY"


def api_key_env(grader_name: str) -> str:
    """KUBETUNE_GRADER_<NAME>_API_KEY, e.g. judge-1 -> KUBETUNE_GRADER_JUDGE_1_API_KEY."""
    return API_KEY_ENV.format(grader_name.upper().replace("-", "_"))


def configmap_mount(grader_name: str) -> str:
    """The folder a python grader's ConfigMap key is mounted in (the key is the file)."""
    return f"{CONFIGMAP_DIR}/{grader_name}"


def volume_name(grader_name: str) -> str:
    return f"grader-{grader_name}"


# ---------------------------------------------------------------------------- templates

# `{{sample.output_text}}` and `{{item.<field>}}`, nothing else between double
# braces. RE2 and Python's re read these expressions the same way.
_FIELD = "[A-Za-z_][A-Za-z0-9_]*"
PLACEHOLDER_RE = r"\{\{ *(sample\.output_text|item\." + _FIELD + r") *\}\}"
# Text with no `{{` outside a placeholder: single braces are fine (JSON in a prompt).
TEMPLATE_RE = r"^([^{]|\{[^{]|" + PLACEHOLDER_RE + r")*\{?$"
_placeholder = re.compile(PLACEHOLDER_RE)


def template_fields(text: str) -> set[str]:
    """The item fields a template names: {'answer'} for '{{item.answer}}'."""
    return {m.group(1)[5:] for m in _placeholder.finditer(text) if m.group(1).startswith("item.")}


def render(text: str, sample: dict, item: dict) -> str:
    """The template with its placeholders filled in; a field the row lacks is ''."""

    def value(m: re.Match) -> str:
        key = m.group(1)
        if key == "sample.output_text":
            got = sample.get("output_text", "")
        else:
            got = item.get(key[5:], "")
        return got if isinstance(got, str) else ("" if got is None else str(got))

    return _placeholder.sub(value, text)


TEMPLATE = Check(
    cel=f"self.matches({checks._cel_str(TEMPLATE_RE)})",
    message="a template may only use {{sample.output_text}} and {{item.<field>}} (a field "
    "of the data row, e.g. {{item.answer}}) between double braces: fix the placeholder",
    python=checks._fullmatch(TEMPLATE_RE),
)

Template = Annotated[
    str, Field(min_length=1, max_length=TEMPLATE_MAX), checks.PRINTABLE_LINES, TEMPLATE
]

GRADER_NAME_RE = checks.DNS_LABEL_RE
GraderName = Annotated[
    str,
    Field(min_length=1, max_length=NAME_MAX),
    Check(
        cel=f"self.matches({checks._cel_str(GRADER_NAME_RE)})",
        message="a grader name must be lowercase letters, digits and '-', starting and "
        "ending with a letter or digit (e.g. exact-answer): it names metrics and volumes",
        python=checks._fullmatch(GRADER_NAME_RE),
    ),
]
Key = Annotated[
    str,
    Field(min_length=1, max_length=checks.DNS_SUBDOMAIN_MAX),
    Check(
        cel="self.matches('^[-._a-zA-Z0-9]+$')",
        message="a key must be letters, digits, '-', '_' and '.' (e.g. grader.py)",
        python=checks._fullmatch("^[-._a-zA-Z0-9]+$"),
    ),
]


_Model = SpecModel


class ConfigMapKeyRef(_Model):
    name: Annotated[
        str,
        Field(max_length=checks.DNS_SUBDOMAIN_MAX),
        checks.dns_subdomain("ConfigMap in the FineTuneJob's namespace", "graders"),
    ] = Field(description="Name of the ConfigMap in the FineTuneJob's namespace.")
    key: Key = Field(description="The key whose value is the Python source, e.g. grader.py.")


class SecretKeyRef(_Model):
    name: Annotated[
        str,
        Field(max_length=checks.DNS_SUBDOMAIN_MAX),
        checks.dns_subdomain("Secret in the FineTuneJob's namespace", "judge-key"),
    ] = Field(description="Name of the Secret in the FineTuneJob's namespace.")
    key: Key = Field(description="The key whose value is the API key, e.g. api-key.")


# Field descriptions shared by the types that have the field: the CRD merges
# them into one property, which must read the same for each.
_NAME = "Name of the grader: its scores are reported as reward/<name>."
_INPUT = "Template of the text graded, default {{sample.output_text}} (the completion)."
_REFERENCE = "Template of the text it is compared with, e.g. {{item.answer}}."
_TIMEOUT = (
    "Seconds one sample may take before it scores 0 and counts as a timeout. Default: 5 "
    "for python, 30 for scoreModel."
)
_CONCURRENCY = (
    "Samples graded at once (python: worker processes; scoreModel: requests in flight). "
    "Default: 2 for python, 4 for scoreModel."
)


class _Compared(_Model):
    name: GraderName = Field(description=_NAME)
    input: Template = Field("{{sample.output_text}}", description=_INPUT)
    reference: Template = Field(description=_REFERENCE)


class StringCheckGrader(_Compared):
    """1 when the comparison holds, else 0."""

    type: Literal["stringCheck"] = Field(description="The kind of grader.")
    operation: Literal[OPERATIONS] = Field(
        description="stringCheck: eq (equal), ne (not equal), like (reference is a "
        "substring of input), ilike (the same, ignoring case)."
    )


class TextSimilarityGrader(_Compared):
    """A similarity from 0 to 1 between input and reference."""

    type: Literal["textSimilarity"] = Field(description="The kind of grader.")
    evaluation_metric: Literal[METRICS] = Field(
        description="textSimilarity: fuzzyMatch (difflib's ratio of matching characters), "
        "bleu (sacrebleu's sentence BLEU), gleu (nltk's sentence GLEU), rouge1-rouge5 and "
        "rougeL (rouge_score's F-measure)."
    )


class PythonGrader(_Model):
    """Your function `grade(sample, item) -> float`, run in a separate process with a
    time and memory limit and no network. A grader that raises, runs out of time or
    memory scores 0 and is counted; the job goes on."""

    type: Literal["python"] = Field(description="The kind of grader.")
    name: GraderName = Field(description=_NAME)
    source: Optional[Annotated[str, Field(min_length=1, max_length=SOURCE_MAX)]] = Field(
        None,
        description="python: the source, defining grade(sample, item) -> float; sample is "
        "{'output_text': ...}, item is the data row. Set exactly one of source, "
        "configMapRef or file.",
    )
    config_map_ref: Optional[ConfigMapKeyRef] = Field(
        None,
        description="python: a ConfigMap key holding the source, mounted into the Ray pods "
        "(cluster only).",
    )
    file: Optional[
        Annotated[
            str,
            Field(min_length=1, max_length=checks.DNS_SUBDOMAIN_MAX),
            Check(
                cel="self.endsWith('.py') && !self.startsWith('/') && "
                "!self.matches('(^|/)[.][.](/|$)') && !self.contains('://')",
                message="file must be a relative path to a .py file beside the training "
                "data (e.g. graders/format.py), without '..'",
                python=lambda v: (
                    isinstance(v, str)
                    and v.endswith(".py")
                    and not v.startswith("/")
                    and re.search("(^|/)[.][.](/|$)", v) is None
                    and "://" not in v
                ),
            ),
        ]
    ] = Field(
        None,
        description="python: a .py file, relative to the folder of the training data "
        "(dataset.train.uri: a local folder or object storage, read with the dataset's "
        "credentials).",
    )
    timeout_seconds: float = Field(5, gt=0, le=TIMEOUT_MAX, description=_TIMEOUT)
    memory_mib: int = Field(
        256,
        alias="memoryMiB",
        ge=MEMORY_MIN_MIB,
        le=MEMORY_MAX_MIB,
        description="python: address-space limit of each worker process in MiB (RLIMIT_AS); "
        "going over it scores 0 and counts as an error. Default: 256.",
    )
    max_concurrency: int = Field(2, ge=1, le=CONCURRENCY_MAX, description=_CONCURRENCY)


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant"] = Field(
        description="Who speaks: system, developer, user or assistant."
    )
    content: Template = Field(description="Template of the message text.")


class ScoreModelGrader(_Model):
    """A model behind an OpenAI-compatible chat completions endpoint reads the
    messages and answers with a number: the first number in its reply, clamped to
    range, is the score."""

    type: Literal["scoreModel"] = Field(description="The kind of grader.")
    name: GraderName = Field(description=_NAME)
    endpoint: Annotated[
        str,
        Field(max_length=2048),
        checks.PRINTABLE,
        checks.NO_CREDENTIALS,
        checks.NO_QUERY_CREDENTIALS,
        checks.ENDPOINT,
    ] = Field(
        description="scoreModel: base URL of an OpenAI-compatible API, e.g. "
        "http://vllm.serving:8000/v1 (POST <endpoint>/chat/completions)."
    )
    model: Annotated[
        str, Field(max_length=256), checks.PRINTABLE, checks.NOT_BLANK, checks.NO_SPACE
    ] = Field(description="scoreModel: the model name the endpoint serves.")
    api_key_secret_ref: Optional[SecretKeyRef] = Field(
        None,
        description="scoreModel: Secret key holding the API key, sent as a bearer token. In "
        "the Ray pods it is the environment variable KUBETUNE_GRADER_<NAME>_API_KEY; for "
        "kubetune run, set that variable.",
    )
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MESSAGES_MAX)] = Field(
        description="scoreModel: the chat sent per sample (templates). Ask for a number in range."
    )
    score_range: Annotated[list[float], Field(min_length=2, max_length=2)] = Field(
        [0.0, 1.0],
        alias="range",
        description="scoreModel: [low, high]: the reply's number is clamped to it. "
        "Default: [0, 1].",
    )
    max_tokens: int = Field(
        16, ge=1, le=4096, description="scoreModel: reply length limit in tokens. Default: 16."
    )
    temperature: float = Field(
        0.0, ge=0, le=2, description="scoreModel: sampling temperature. Default: 0."
    )
    max_retries: int = Field(
        2,
        ge=0,
        le=10,
        description="scoreModel: retries of a request answered 429 or 5xx, or cut off, within "
        "the timeout. Default: 2.",
    )
    timeout_seconds: float = Field(30, gt=0, le=TIMEOUT_MAX, description=_TIMEOUT)
    max_concurrency: int = Field(4, ge=1, le=CONCURRENCY_MAX, description=_CONCURRENCY)


ONE_SOURCE = Check(
    cel="(has(self.source) ? 1 : 0) + (has(self.configMapRef) ? 1 : 0) + "
    "(has(self.file) ? 1 : 0) == 1",
    message="a python grader needs exactly one of source (the code), configMapRef (a "
    "ConfigMap key) or file (beside the data): set one",
    python=lambda g: sum(k in g for k in ("source", "configMapRef", "file")) == 1,
    field="source",
)
DEFINES_GRADE = Check(
    cel="!has(self.source) || self.source.contains('def grade(')",
    message="source must define grade(sample, item) -> float: add `def grade(sample, item):`",
    python=lambda g: "source" not in g or "def grade(" in g["source"],
    field="source",
)
RANGE_ORDER = Check(
    cel="!has(self.range) || self.range[0] < self.range[1]",
    message="range is [low, high] with low below high, e.g. [0, 1]: fix the order",
    python=lambda g: "range" not in g or g["range"][0] < g["range"][1],
    field="range",
)

LeafGrader = Annotated[
    Union[
        Annotated[StringCheckGrader, Tag("[stringCheck]")],
        Annotated[TextSimilarityGrader, Tag("[textSimilarity]")],
        Annotated[PythonGrader, ONE_SOURCE, DEFINES_GRADE, Tag("[python]")],
        Annotated[ScoreModelGrader, RANGE_ORDER, Tag("[scoreModel]")],
    ],
    # Tags in brackets: kubetune_api.validation leaves them out of field paths.
    Discriminator(
        lambda v: _tag(v, LEAF_TYPES),
        custom_error_type="grader_type",
        custom_error_message="type must be one of stringCheck, textSimilarity, python or "
        "scoreModel (a multi grader's graders cannot be multi)",
    ),
]


class MultiGrader(_Model):
    """The weighted sum of leaf graders' scores (each is also reported on its own)."""

    type: Literal["multi"] = Field(description="The kind of grader.")
    name: GraderName = Field(description=_NAME)
    graders: Annotated[dict[str, LeafGrader], Field(min_length=1, max_length=GRADERS_MAX)] = Field(
        description="multi: the graders summed, by name (each one's name equals its key). "
        "They cannot be multi graders themselves."
    )
    weights: Optional[
        Annotated[
            dict[str, Annotated[float, Field(ge=-1000, le=1000)]],
            Field(max_length=GRADERS_MAX),
        ]
    ] = Field(
        None,
        description="multi: weight per grader name; a grader not listed weighs 1.",
    )


NAMES_ARE_KEYS = Check(
    cel="self.graders.all(k, self.graders[k].name == k)",
    message="each of graders must be listed under its own name (graders: {exact: {name: "
    "exact, ...}}): make the key and the name the same",
    python=lambda g: all(v.get("name") == k for k, v in g["graders"].items()),
    field="graders",
)
UNIQUE_NAMES = Check(
    cel="!(self.name in self.graders)",
    message="a multi grader's name must differ from its graders' names: rename it",
    python=lambda g: g["name"] not in g["graders"],
    field="name",
)
WEIGHTS_NAME_GRADERS = Check(
    cel="!has(self.weights) || self.weights.all(k, k in self.graders)",
    message="weights may only name graders listed in graders: fix or remove the name",
    python=lambda g: all(k in g["graders"] for k in g.get("weights") or {}),
    field="weights",
)


def _tag(value: Any, allowed: tuple[str, ...]) -> Optional[str]:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return f"[{kind}]" if kind in allowed else None


Grader = Annotated[
    Union[
        Annotated[StringCheckGrader, Tag("[stringCheck]")],
        Annotated[TextSimilarityGrader, Tag("[textSimilarity]")],
        Annotated[PythonGrader, ONE_SOURCE, DEFINES_GRADE, Tag("[python]")],
        Annotated[ScoreModelGrader, RANGE_ORDER, Tag("[scoreModel]")],
        Annotated[MultiGrader, NAMES_ARE_KEYS, UNIQUE_NAMES, WEIGHTS_NAME_GRADERS, Tag("[multi]")],
    ],
    Discriminator(
        lambda v: _tag(v, TYPES),
        custom_error_type="grader_type",
        custom_error_message="type must be one of stringCheck, textSimilarity, python, "
        "scoreModel or multi",
    ),
]


def parse(grader: Any):
    """A Grader model from its model or dict form (camelCase or snake_case keys)."""
    if isinstance(grader, BaseModel):
        return grader
    from pydantic import TypeAdapter

    return TypeAdapter(Grader).validate_python(grader)


def leaves(grader) -> list:
    """The leaf graders (a multi grader's graders, or the grader itself)."""
    grader = parse(grader)
    return list(grader.graders.values()) if grader.type == "multi" else [grader]


def fields(grader) -> set[str]:
    """Every item field the grader's templates name."""
    out: set[str] = set()
    for leaf in leaves(grader):
        for text in (getattr(leaf, "input", None), getattr(leaf, "reference", None)):
            if isinstance(text, str):
                out |= template_fields(text)
        for message in getattr(leaf, "messages", None) or []:
            out |= template_fields(message.content)
    return out


# ---------------------------------------------------------------------------- a job's grader


def job_grader(spec: dict) -> Optional[dict]:
    """The grader a FineTuneJob spec (camelCase dict) declares: method.grpo.grader."""
    method = spec.get("method") if isinstance(spec, dict) else None
    grpo = method.get("grpo") if isinstance(method, dict) else None
    grader = grpo.get("grader") if isinstance(grpo, dict) else None
    return grader if isinstance(grader, dict) else None


def leaf_dicts(grader: Optional[dict]) -> list[dict]:
    """The leaf graders of a grader in dict form (what the operator reads)."""
    if not grader:
        return []
    if grader.get("type") == "multi":
        return [g for g in (grader.get("graders") or {}).values() if isinstance(g, dict)]
    return [grader]
