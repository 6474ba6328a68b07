"""Cross-field rules: one table, two enforcers.

Each rule carries a CEL expression that the CRD hands to the API server
(`x-kubernetes-validations` at `path`) and a Python predicate that the CLI and
the operator evaluate on the same object, after the same schema defaulting the
API server applies. So `kubetune validate` and `kubectl apply` agree, and a
test checks both against one table of bad specs.

Rules with `python=None` are enforced only by the API server (transition rules
need the old object). Rules with `cel=None` need facts the API server cannot
see and run only in the CLI and the operator.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

from .objectives import (
    CLASSIFICATION_METRICS,
    OBJECTIVES,
    SUPERVISED_FORMATS,
    metric_mode,
    metric_names,
    words,
)
from .sweep_space import grace_period, grace_period_cel

Spec = dict[str, Any]


@dataclass(frozen=True)
class Rule:
    id: str
    path: tuple[str, ...]  # camelCase path below spec where the rule is attached
    message: str  # what is wrong and how to fix it; shown by both enforcers
    cel: Optional[str]
    python: Optional[Callable[[Any], bool]]  # True when the object at `path` is fine
    field: Optional[str] = None  # field named in the error, relative to path (default: path)

    @property
    def field_path(self) -> str:
        parts = ["spec", *self.path]
        if self.field:
            parts.append(self.field)
        return ".".join(parts)


def _has(obj: Any, key: str) -> bool:
    return isinstance(obj, dict) and obj.get(key) is not None


def _stage(d: dict) -> Any:
    return d.get("zeroStage", "auto")


def _gpus(spec: Spec) -> int:
    return spec["resources"]["gpusPerWorker"]


def _one_of(expr: str, values: tuple[str, ...]) -> str:
    quoted = [f"'{v}'" for v in values]
    return f"{expr} == {quoted[0]}" if len(values) == 1 else f"{expr} in [{', '.join(quoted)}]"


FORMATS = {row.name: row.formats for row in OBJECTIVES}


def objective_rules() -> list[Rule]:
    """The rules that come from the objectives table (objectives.OBJECTIVES): per
    objective its formats, the formats only it trains on, its settings block;
    then, for early stopping and for a sweep, the metrics each one reports and
    their direction."""
    out: list[Rule] = []
    for row in OBJECTIVES:
        name, formats = row.name, row.formats
        if row.format_message:
            out.append(
                Rule(
                    f"{name}-needs-{'-'.join(formats)}-data",
                    (),
                    row.format_message,
                    cel=f"self.method.objective != '{name}' || "
                    + _one_of("self.dataset.format", formats),
                    python=lambda s, name=name, formats=formats: (
                        s["method"]["objective"] != name or s["dataset"]["format"] in formats
                    ),
                    field="dataset.format",
                )
            )
        for fmt in row.owned_formats:
            out.append(
                Rule(
                    f"{fmt}-data-needs-{name}",
                    (),
                    row.owned_message,
                    cel=f"self.dataset.format != '{fmt}' || self.method.objective == '{name}'",
                    python=lambda s, name=name, fmt=fmt: (
                        s["dataset"]["format"] != fmt or s["method"]["objective"] == name
                    ),
                    field="method.objective",
                )
            )
        if row.settings:
            key = row.settings
            out.append(
                Rule(
                    f"{key}-settings-need-{name}",
                    ("method",),
                    f"method.{key} applies to objective {name} only: remove it, or set "
                    f"method.objective to {name}",
                    cel=f"!has(self.{key}) || self.objective == '{name}'",
                    python=lambda m, key=key, name=name: (
                        not _has(m, key) or m.get("objective") == name
                    ),
                    field=key,
                )
            )
            for extra in row.settings_rules:
                out.append(Rule(path=("method", key), **extra))
            if row.settings_required:
                out.append(
                    Rule(
                        f"{name}-needs-{key}-settings",
                        ("method",),
                        row.settings_required,
                        cel=f"self.objective != '{name}' || has(self.{key})",
                        python=lambda m, key=key, name=name: (
                            m.get("objective") != name or _has(m, key)
                        ),
                        field=key,
                    )
                )
        for extra in row.spec_rules:
            out.append(Rule(path=(), **extra))
    # a mixture source's own format: one its objective trains on (the sources without
    # one take dataset.format, which the rules above check)
    fits = " || ".join(
        f"(self.method.objective == '{row.name}' && " + _one_of("s.format", row.formats) + ")"
        for row in OBJECTIVES
    )
    out.append(
        Rule(
            "mixture-formats-fit-objective",
            (),
            "each dataset.mixture source's format must be one method.objective trains on "
            "("
            + "; ".join(f"{row.name}: {', '.join(row.formats)}" for row in OBJECTIVES)
            + "): change the format or the objective",
            cel="!has(self.dataset.mixture) || self.dataset.mixture.all(s, !has(s.format) "
            f"|| {fits})",
            python=lambda s: (
                not _has(s["dataset"], "mixture")
                or all(
                    not _has(src, "format") or src["format"] in FORMATS[s["method"]["objective"]]
                    for src in s["dataset"]["mixture"]
                )
            ),
            field="dataset.mixture",
        )
    )
    out += metric_rules("earlyStopping", "early-stopping", always=True)
    out += metric_rules("sweep", "sweep", always=False)
    return out


def _metrics_cel(var: str, metrics: tuple[str, ...]) -> str:
    return f"{var} in [" + ", ".join(f"'{m}'" for m in metrics) + "]"


def metric_rules(block: str, slug: str, always: bool) -> list[Rule]:
    """Two rules on a metric field (spec.<block>.metric and .mode), both from the
    objectives table: the metric is one the job's objective reports, and a mode
    given with it is the metric's direction (a loss is minimised, an accuracy or a
    reward maximised). `always`: the block is always there (a default); else the
    rules hold only when it is set."""
    every = metric_names()
    others = {
        row.name: tuple(m for m in every if m not in {x.name for x in row.metrics})
        for row in OBJECTIVES
    }
    # method.task classification (objective sft): its own metrics, not sft's
    not_classifying = tuple(m for m in every if m not in {x.name for x in CLASSIFICATION_METRICS})
    first, *rest = OBJECTIVES
    order = [*rest, first]  # the first row (sft, the default) is the CEL's else branch
    var = f"self.{block}.metric"
    cel = f"!({_metrics_cel(var, others[first.name])})"
    for row in reversed(rest):
        cel = (
            f"self.method.objective == '{row.name}' ? "
            f"!({_metrics_cel(var, others[row.name])}) : {cel}"
        )
    cel = f"self.method.task == 'classification' ? !({_metrics_cel(var, not_classifying)}) : {cel}"
    if not always:
        cel = f"!has(self.{block}) || ({cel})"
    reports = "; ".join(
        [f"{words([m.name for m in row.metrics], 'or')} for {row.name}" for row in order]
        + [f"{words([m.name for m in CLASSIFICATION_METRICS], 'or')} for classification"]
    )

    def unreported(s: Spec) -> tuple[str, ...]:
        if s["method"].get("task") == "classification":
            return not_classifying
        return others[s["method"]["objective"]]

    highest = tuple(m for m in every if metric_mode(m) == "max")
    lowest = tuple(m for m in every if metric_mode(m) == "min")
    return [
        Rule(
            f"{slug}-metric-fits-objective",
            (),
            f"{block}.metric must be one the objective reports: {reports}",
            cel=cel,
            python=lambda s: (
                (not always and not _has(s, block)) or s[block]["metric"] not in unreported(s)
            ),
            field=f"{block}.metric",
        ),
        Rule(
            f"{slug}-mode-fits-metric",
            (block,),
            f"{block}.mode must be the metric's direction: min for {words(lowest)} (lower "
            f"is better), max for {words(highest)} (higher is better): remove mode (it "
            "follows the metric), or set it to match",
            cel=f"!has(self.mode) || self.mode == "
            f"({_metrics_cel('self.metric', highest)} ? 'max' : 'min')",
            python=lambda b: (
                b.get("mode") is None
                or metric_mode(b["metric"]) is None  # an unknown metric: the enum says so
                or b["mode"] == metric_mode(b["metric"])
            ),
            field="mode",
        ),
    ]


def _classifying(spec: Spec) -> bool:
    return spec["method"].get("task", "generation") == "classification"


CLASSIFYING = "self.method.task != 'classification'"  # CEL: the rule holds unless...


def _without(block: str, key: str, what: str) -> Rule:
    """method.task classification refuses spec.<block>.<key> (it has no answers to
    generate or score, or no whole language model to convert): `what` says why."""
    return Rule(
        f"classification-without-{block}-{key}".lower(),
        (),
        f"method.task classification {what}: remove {block}.{key}, or set method.task to "
        "generation",
        cel=f"{CLASSIFYING} || !has(self.{block}.{key})",
        python=lambda s: not _classifying(s) or not _has(s[block], key),
        field=f"{block}.{key}",
    )


CLASSIFICATION_RULES = [
    Rule(
        "classification-needs-classification-data",
        (),
        "method.task classification learns one label per row: set dataset.format to "
        "classification (rows of text and label), or method.task to generation",
        cel=f"{CLASSIFYING} || self.dataset.format == 'classification'",
        python=lambda s: not _classifying(s) or s["dataset"]["format"] == "classification",
        field="dataset.format",
    ),
    Rule(
        "classification-data-needs-task",
        (),
        "dataset.format classification (rows of text and label) trains a classification "
        "head: set method.task to classification, or use a generation format (chat, "
        "prompt-completion, ...)",
        cel="self.dataset.format != 'classification' || self.method.task == 'classification'",
        python=lambda s: s["dataset"]["format"] != "classification" or _classifying(s),
        field="method.task",
    ),
    Rule(
        "classification-needs-sft",
        (),
        "method.task classification trains with cross-entropy over the labels: set "
        "method.objective to sft (dpo, kto, grpo and distill score generated answers)",
        cel=f"{CLASSIFYING} || self.method.objective == 'sft'",
        python=lambda s: not _classifying(s) or s["method"]["objective"] == "sft",
        field="method.objective",
    ),
    Rule(
        "classification-not-qlora",
        (),
        "method.task classification trains with lora or full: set method.type to lora "
        "(a 4-bit base with a classification head is not supported)",
        cel=f"{CLASSIFYING} || self.method.type != 'qlora'",
        python=lambda s: not _classifying(s) or s["method"]["type"] != "qlora",
        field="method.type",
    ),
    Rule(
        "classification-trains-head",
        (),
        "method.task classification starts from a new, untrained head: set "
        "method.full.trainHead to true",
        cel=f"{CLASSIFYING} || !has(self.method.full) || !has(self.method.full.trainHead) "
        "|| self.method.full.trainHead",
        python=lambda s: (
            not _classifying(s)
            or not _has(s["method"], "full")
            or s["method"]["full"].get("trainHead", True)
        ),
        field="method.full.trainHead",
    ),
    *(
        _without(
            "model",
            key,
            "starts from whole weights (a parent's adapter was made for the language-model "
            "head; give a parent's model/ or merged/ folder as model.uri instead)",
        )
        for key in ("fromJob", "fromCheckpoint")
    ),
    _without("dataset", "mixture", "reads one dataset of labelled rows"),
    _without("evaluation", "generation", "generates no answers (it is scored by accuracy)"),
    _without("evaluation", "retention", "replaces the language-model head (no retention loss)"),
    _without("output", "gguf", "saves a classifier, which GGUF export does not convert"),
    _without("output", "interpolation", "is not interpolated (its head starts untrained)"),
]


RULES: list[Rule] = [
    Rule(
        "model-source",
        ("model",),
        "set exactly one of model.name (a Hugging Face id) or model.uri (a folder of weights)",
        cel="has(self.name) != has(self.uri)",
        python=lambda m: _has(m, "name") != _has(m, "uri"),
    ),
    Rule(
        "one-parent",
        ("model",),
        "set at most one of model.fromJob (a FineTuneJob) or model.fromCheckpoint (a "
        "checkpoint URI): remove one of them",
        cel="!(has(self.fromJob) && has(self.fromCheckpoint))",
        python=lambda m: not (_has(m, "fromJob") and _has(m, "fromCheckpoint")),
        field="fromCheckpoint",
    ),
    Rule(
        "merge-parent-needs-parent",
        ("model",),
        "model.mergeParent merges a parent's adapter: name it with model.fromJob or "
        "model.fromCheckpoint, or remove mergeParent",
        cel="!self.mergeParent || has(self.fromJob) || has(self.fromCheckpoint)",
        python=lambda m: (
            not m.get("mergeParent") or _has(m, "fromJob") or _has(m, "fromCheckpoint")
        ),
        field="mergeParent",
    ),
    Rule(
        "merge-parent-not-qlora",
        (),
        "model.mergeParent cannot merge into a 4-bit base model: use method.type lora, or "
        "continue the parent's adapter (mergeParent false)",
        cel="!self.model.mergeParent || self.method.type != 'qlora'",
        python=lambda s: not s["model"]["mergeParent"] or s["method"]["type"] != "qlora",
        field="model.mergeParent",
    ),
    Rule(
        "prune-adapter-needs-merge",
        (),
        "model.prune with lora or qlora needs output.mergeAdapter: true: the adapter fits "
        "only the pruned model, which the merged model carries; set mergeAdapter, or use "
        "method.type full",
        cel="!has(self.model.prune) || self.method.type == 'full' || self.output.mergeAdapter",
        python=lambda s: (
            not _has(s["model"], "prune")
            or s["method"]["type"] == "full"
            or s["output"]["mergeAdapter"]
        ),
        field="output.mergeAdapter",
    ),
    Rule(
        "prune-parent-needs-merge",
        (),
        "model.prune drops layers of the merged starting model: with model.fromJob or "
        "model.fromCheckpoint and lora, set model.mergeParent: true (a parent's adapter "
        "cannot continue on fewer layers), or remove prune",
        cel="!has(self.model.prune) || self.method.type == 'full' || self.model.mergeParent "
        "|| !(has(self.model.fromJob) || has(self.model.fromCheckpoint))",
        python=lambda s: (
            not _has(s["model"], "prune")
            or s["method"]["type"] == "full"
            or s["model"]["mergeParent"]
            or not (_has(s["model"], "fromJob") or _has(s["model"], "fromCheckpoint"))
        ),
        field="model.mergeParent",
    ),
    Rule(
        "train-xor-mixture",
        ("dataset",),
        "set exactly one of dataset.train (one source) or dataset.mixture (several, "
        "each with an id and a weight)",
        cel="has(self.train) != has(self.mixture)",
        python=lambda d: _has(d, "train") != _has(d, "mixture"),
        field="train",
    ),
    Rule(
        "mixture-source",
        ("dataset",),
        "set exactly one of uri (a file or folder) or name (a datasets name) on each "
        "dataset.mixture source",
        cel="!has(self.mixture) || self.mixture.all(s, has(s.uri) != has(s.name))",
        python=lambda d: (
            not _has(d, "mixture") or all(_has(s, "uri") != _has(s, "name") for s in d["mixture"])
        ),
        field="mixture",
    ),
    Rule(
        "mixture-held-out-per-source",
        ("dataset",),
        "dataset.mixture holds out validationSplit of each source (for a held-out loss "
        "per source): remove dataset.validation, or train on one source (dataset.train)",
        cel="!has(self.mixture) || !has(self.validation)",
        python=lambda d: not _has(d, "mixture") or not _has(d, "validation"),
        field="validation",
    ),
    Rule(
        "mixture-clean-one-format",
        ("dataset",),
        "dataset.clean scans one source in one format: remove dataset.clean, or train on "
        "one source (dataset.train)",
        cel="!has(self.mixture) || !has(self.clean)",
        python=lambda d: not _has(d, "mixture") or not _has(d, "clean"),
        field="clean",
    ),
    Rule(
        "train-source",
        ("dataset", "train"),
        "set exactly one of dataset.train.uri (a file or folder) or dataset.train.name "
        "(a datasets name)",
        cel="has(self.uri) != has(self.name)",
        python=lambda d: _has(d, "uri") != _has(d, "name"),
    ),
    Rule(
        "validation-source",
        ("dataset", "validation"),
        "set exactly one of dataset.validation.uri or dataset.validation.name",
        cel="has(self.uri) != has(self.name)",
        python=lambda d: d is None or _has(d, "uri") != _has(d, "name"),
    ),
    Rule(
        "test-source",
        ("dataset", "test"),
        "set exactly one of dataset.test.uri or dataset.test.name",
        cel="has(self.uri) != has(self.name)",
        python=lambda d: d is None or _has(d, "uri") != _has(d, "name"),
    ),
    Rule(
        "clean-redact-needs-pii",
        ("dataset", "clean"),
        "dataset.clean.action redact replaces PII: list the kinds to redact in "
        "dataset.clean.pii (email, phone, card, key), or use action drop or report",
        cel="self.action != 'redact' || size(self.pii) > 0",
        python=lambda c: c["action"] != "redact" or len(c["pii"]) > 0,
        field="pii",
    ),
    *objective_rules(),
    *CLASSIFICATION_RULES,
    Rule(
        "generation-needs-held-out-data",
        (),
        "evaluation.generation answers held-out prompts: give dataset.validation, "
        "dataset.test or a dataset.validationSplit above 0",
        cel="!has(self.evaluation.generation) || has(self.dataset.validation) || "
        "has(self.dataset.test) || self.dataset.validationSplit > 0.0",
        python=lambda s: (
            not _has(s["evaluation"], "generation")
            or _has(s["dataset"], "validation")
            or _has(s["dataset"], "test")
            or s["dataset"]["validationSplit"] > 0
        ),
        field="evaluation.generation",
    ),
    Rule(
        "generation-needs-prompts",
        (),
        "evaluation.generation needs prompts and reference answers: dataset.format text has "
        "neither; remove evaluation.generation or use a format with prompts",
        cel="!has(self.evaluation.generation) || self.dataset.format != 'text'",
        python=lambda s: (
            not _has(s["evaluation"], "generation") or s["dataset"]["format"] != "text"
        ),
        field="evaluation.generation",
    ),
    Rule(
        "calibration-needs-held-out-data",
        (),
        "evaluation.calibration is measured on the validation split: give "
        "dataset.validation or a dataset.validationSplit above 0",
        cel="!has(self.evaluation.calibration) || has(self.dataset.validation) || "
        "self.dataset.validationSplit > 0.0",
        python=lambda s: (
            not _has(s["evaluation"], "calibration")
            or _has(s["dataset"], "validation")
            or s["dataset"]["validationSplit"] > 0
        ),
        field="evaluation.calibration",
    ),
    Rule(
        "calibration-needs-answer-tokens",
        (),
        "evaluation.calibration scores answer tokens: dataset.format must be one of "
        + ", ".join(SUPERVISED_FORMATS)
        + "; remove evaluation.calibration or change the format",
        cel="!has(self.evaluation.calibration) || "
        + _one_of("self.dataset.format", SUPERVISED_FORMATS),
        python=lambda s: (
            not _has(s["evaluation"], "calibration") or s["dataset"]["format"] in SUPERVISED_FORMATS
        ),
        field="evaluation.calibration",
    ),
    Rule(
        "save-temperature-needs-fit",
        ("evaluation", "calibration"),
        "evaluation.calibration.saveTemperature saves the fitted temperature: set "
        "fitTemperature: true too, or remove saveTemperature",
        cel="!has(self.saveTemperature) || !self.saveTemperature || "
        "(has(self.fitTemperature) && self.fitTemperature)",
        python=lambda c: c is None or not c.get("saveTemperature") or c.get("fitTemperature"),
        field="saveTemperature",
    ),
    Rule(
        "retention-source",
        ("evaluation", "retention", "dataset"),
        "set exactly one of evaluation.retention.dataset.uri or evaluation.retention.dataset.name",
        cel="has(self.uri) != has(self.name)",
        python=lambda d: d is None or _has(d, "uri") != _has(d, "name"),
    ),
    Rule(
        "retention-fail-needs-bound",
        ("evaluation", "retention"),
        "evaluation.retention.failOnRegression fails the job past maxRegression: set "
        "maxRegression (e.g. 0.05 for 5%), or remove failOnRegression",
        cel="!has(self.failOnRegression) || !self.failOnRegression || has(self.maxRegression)",
        python=lambda r: (
            r is None or not r.get("failOnRegression") or r.get("maxRegression") is not None
        ),
        field="failOnRegression",
    ),
    Rule(
        "retention-generation-needs-generation",
        ("evaluation",),
        "evaluation.retention.generation answers with evaluation.generation's settings: "
        "set evaluation.generation, or remove retention.generation",
        cel="!has(self.retention) || !has(self.retention.generation) || "
        "!self.retention.generation || has(self.generation)",
        python=lambda e: (
            not _has(e, "retention")
            or not e["retention"].get("generation")
            or _has(e, "generation")
        ),
        field="retention.generation",
    ),
    Rule(
        "retention-generation-needs-prompts",
        ("evaluation", "retention"),
        "evaluation.retention.generation needs prompts and reference answers: format text "
        "has neither; remove retention.generation or use a format with prompts",
        cel="!has(self.generation) || !self.generation || self.dataset.format != 'text'",
        python=lambda r: (
            r is None or not r.get("generation") or r["dataset"].get("format") != "text"
        ),
        field="generation",
    ),
    Rule(
        "epochs-xor-max-steps",
        ("hyperparameters",),
        "set either epochs or maxSteps, not both: remove one of them",
        cel="!(has(self.epochs) && has(self.maxSteps))",
        python=lambda h: not (_has(h, "epochs") and _has(h, "maxSteps")),
    ),
    Rule(
        "lora-needs-adapter-method",
        ("method",),
        "method.lora applies to lora and qlora only: remove it, or set method.type to lora",
        cel="!has(self.lora) || self.type != 'full'",
        python=lambda m: not _has(m, "lora") or m.get("type") != "full",
        field="lora",
    ),
    Rule(
        "full-settings-need-full",
        ("method",),
        "method.full applies to method.type full only: remove it, or set method.type to full "
        "(for lora and qlora, method.lora.layers chooses the layers that get adapters)",
        cel="!has(self.full) || self.type == 'full'",
        python=lambda m: not _has(m, "full") or m.get("type") == "full",
        field="full",
    ),
    Rule(
        "full-trains-something",
        ("method", "full"),
        "method.full trains nothing: trainableLayers is empty and trainEmbeddings and "
        "trainHead are false; list layers in trainableLayers or set trainHead to true",
        cel="!has(self.trainableLayers) || size(self.trainableLayers) > 0 || "
        "self.trainEmbeddings || self.trainHead",
        python=lambda f: (
            f.get("trainableLayers") is None
            or len(f["trainableLayers"]) > 0
            or f["trainEmbeddings"]
            or f["trainHead"]
        ),
        field="trainableLayers",
    ),
    Rule(
        "quantization-needs-qlora",
        ("method",),
        "method.quantization applies to qlora only: remove it, or set method.type to qlora",
        cel="!has(self.quantization) || self.type == 'qlora'",
        python=lambda m: not _has(m, "quantization") or m.get("type") == "qlora",
        field="quantization",
    ),
    Rule(
        "qlora-needs-gpu",
        (),
        "qlora quantizes with bitsandbytes, which needs GPUs: set resources.gpusPerWorker "
        "to 1 or more, or use method.type lora",
        cel="self.method.type != 'qlora' || self.resources.gpusPerWorker > 0",
        python=lambda s: s["method"]["type"] != "qlora" or _gpus(s) > 0,
        field="method.type",
    ),
    Rule(
        "fp16-needs-gpu",
        (),
        "fp16 needs GPUs: set hyperparameters.precision to bf16 or fp32 for CPU training, "
        "or resources.gpusPerWorker to 1 or more",
        cel="self.hyperparameters.precision != 'fp16' || self.resources.gpusPerWorker > 0",
        python=lambda s: s["hyperparameters"]["precision"] != "fp16" or _gpus(s) > 0,
        field="hyperparameters.precision",
    ),
    Rule(
        "zero-stage-value",
        ("distributed",),
        "zeroStage must be 0, 1, 2, 3 or auto",
        cel="type(self.zeroStage) == string ? self.zeroStage == 'auto' "
        ": (self.zeroStage >= 0 && self.zeroStage <= 3)",
        python=None,  # the pydantic field type already says this, with the field path
        field="zeroStage",
    ),
    Rule(
        "offload-optimizer-needs-zero2",
        ("distributed",),
        "offloadOptimizer needs ZeRO stage 2 or 3: set zeroStage to 2, 3 or auto",
        cel="!self.offloadOptimizer || type(self.zeroStage) == string || self.zeroStage >= 2",
        python=lambda d: (
            not d.get("offloadOptimizer") or isinstance(_stage(d), str) or _stage(d) >= 2
        ),
        field="offloadOptimizer",
    ),
    Rule(
        "offload-parameters-needs-zero3",
        ("distributed",),
        "offloadParameters needs ZeRO stage 3: set zeroStage to 3 or auto",
        cel="!self.offloadParameters || type(self.zeroStage) == string || self.zeroStage == 3",
        python=lambda d: (
            not d.get("offloadParameters") or isinstance(_stage(d), str) or _stage(d) == 3
        ),
        field="offloadParameters",
    ),
    Rule(
        "early-stopping-needs-evaluation",
        (),
        "earlyStopping needs evaluation on held-out data: set evaluation.enabled to true and "
        "give dataset.validation or a dataset.validationSplit above 0",
        cel="!self.earlyStopping.enabled || (self.evaluation.enabled && "
        "(has(self.dataset.validation) || self.dataset.validationSplit > 0.0))",
        python=lambda s: (
            not s["earlyStopping"]["enabled"]
            or (
                s["evaluation"]["enabled"]
                and (_has(s["dataset"], "validation") or s["dataset"]["validationSplit"] > 0)
            )
        ),
        field="earlyStopping.enabled",
    ),
    Rule(
        "sweep-parallel-within-trials",
        ("sweep",),
        "parallelTrials cannot exceed trials: set parallelTrials to trials or fewer",
        cel="self.parallelTrials <= self.trials",
        python=lambda w: w["parallelTrials"] <= w["trials"],
        field="parallelTrials",
    ),
    Rule(
        "sweep-needs-evaluation",
        (),
        "a sweep ranks trials on an evaluation metric: set evaluation.enabled to true and "
        "give dataset.validation or a dataset.validationSplit above 0",
        cel="!has(self.sweep) || (self.evaluation.enabled && "
        "(has(self.dataset.validation) || self.dataset.validationSplit > 0.0))",
        python=lambda s: (
            not _has(s, "sweep")
            or (
                s["evaluation"]["enabled"]
                and (_has(s["dataset"], "validation") or s["dataset"]["validationSplit"] > 0)
            )
        ),
        field="sweep.metric",
    ),
    Rule(
        "sweep-grace-period-within-max-steps",
        (),
        "sweep.earlyStopping.gracePeriod (when unset: evaluation.everySteps, else "
        "checkpointing.everySteps) must be at most hyperparameters.maxSteps: Ray's ASHA "
        "refuses to wait longer than a trial trains; set gracePeriod (or "
        "evaluation.everySteps) to maxSteps or fewer, raise maxSteps, or set "
        "sweep.earlyStopping.enabled to false",
        cel="!has(self.sweep) || !self.sweep.earlyStopping.enabled || "
        f"!has(self.hyperparameters.maxSteps) || {grace_period_cel()} <= "
        "self.hyperparameters.maxSteps",
        python=lambda s: (
            not _has(s, "sweep")
            or not s["sweep"]["earlyStopping"]["enabled"]
            or not _has(s["hyperparameters"], "maxSteps")
            or grace_period(s) <= s["hyperparameters"]["maxSteps"]
        ),
        field="sweep.earlyStopping.gracePeriod",
    ),
    Rule(
        "sweep-lora-needs-adapter",
        (),
        "method.lora.* can be swept for lora and qlora only: remove those parameters, or "
        "set method.type to lora",
        cel="!has(self.sweep) || self.method.type != 'full' || "
        "self.sweep.parameters.all(k, !k.startsWith('method.lora.'))",
        python=lambda s: (
            not _has(s, "sweep")
            or s["method"]["type"] != "full"
            or not any(k.startswith("method.lora.") for k in s["sweep"]["parameters"])
        ),
        field="sweep.parameters",
    ),
    Rule(
        "merge-needs-adapter",
        (),
        "output.mergeAdapter applies to lora and qlora: a full fine-tune already saves the "
        "whole model; remove mergeAdapter",
        cel="!self.output.mergeAdapter || self.method.type != 'full'",
        python=lambda s: not s["output"]["mergeAdapter"] or s["method"]["type"] != "full",
        field="output.mergeAdapter",
    ),
    Rule(
        "gguf-needs-whole-model",
        (),
        "output.gguf converts a whole model: with lora or qlora set output.mergeAdapter: "
        "true (the merged model is converted), or remove output.gguf",
        cel="!has(self.output.gguf) || self.method.type == 'full' || self.output.mergeAdapter",
        python=lambda s: (
            not _has(s["output"], "gguf")
            or s["method"]["type"] == "full"
            or s["output"]["mergeAdapter"]
        ),
        field="output.gguf",
    ),
    Rule(
        "interpolation-unique-weights",
        ("output", "interpolation"),
        "output.interpolation.weights lists a weight twice: remove the repeats",
        cel="self.weights.all(w, self.weights.filter(u, u == w).size() == 1)",
        python=lambda i: len(set(i["weights"])) == len(i["weights"]),
        field="weights",
    ),
    Rule(
        "interpolation-fixed-weight-listed",
        ("output", "interpolation"),
        "output.interpolation.select: fixed publishes output.interpolation.weight: set weight "
        "to one of output.interpolation.weights, or set select: bestHeldOut",
        cel="self.select != 'fixed' || (has(self.weight) && self.weight in self.weights)",
        python=lambda i: i["select"] != "fixed" or i.get("weight") in i["weights"],
        field="weight",
    ),
    Rule(
        "interpolation-weight-needs-fixed",
        ("output", "interpolation"),
        "output.interpolation.weight is read with select: fixed only: set select: fixed, or "
        "remove weight",
        cel="self.select == 'fixed' || !has(self.weight)",
        python=lambda i: i["select"] == "fixed" or i.get("weight") is None,
        field="weight",
    ),
    Rule(
        "interpolation-needs-evaluation",
        (),
        "output.interpolation scores each weight on held-out data: set evaluation.enabled "
        "to true and give dataset.validation or a dataset.validationSplit above 0, or remove "
        "output.interpolation",
        cel="!has(self.output.interpolation) || (self.evaluation.enabled && "
        "(has(self.dataset.validation) || self.dataset.validationSplit > 0.0))",
        python=lambda s: (
            not _has(s["output"], "interpolation")
            or (
                s["evaluation"]["enabled"]
                and (_has(s["dataset"], "validation") or s["dataset"]["validationSplit"] > 0)
            )
        ),
        field="output.interpolation",
    ),
]

# Fields that define what is trained. Changing them under a running job would
# mix two runs in one storage prefix; a new FineTuneJob is the honest way.
IMMUTABLE_FIELDS = (
    "model",
    "dataset",
    "method",
    "hyperparameters",
    "distributed",
    "resources",
    "evaluation",
    "earlyStopping",
    "checkpointing",
    "output",
    "tracking",
    "sweep",
    "staging",
)
MUTABLE_FIELDS = (
    "suspend",
    "backoffLimit",
    "activeDeadlineSeconds",
    "startTimeoutSeconds",
    "ttlSecondsAfterFinished",
)

for _name in IMMUTABLE_FIELDS:
    RULES.append(
        Rule(
            f"immutable-{_name}",
            (_name,),
            f"spec.{_name} cannot change after the job is created: create a new FineTuneJob "
            f"(only {', '.join(MUTABLE_FIELDS)} can be edited)",
            cel="self == oldSelf",
            python=None,
        )
    )

# Checks on single fields (URIs, Kubernetes names, tolerations) live with the
# fields themselves: see kubetune_api.checks.


def _at(spec: Spec, path: tuple[str, ...]) -> Any:
    obj: Any = spec
    for key in path:
        if not isinstance(obj, dict) or key not in obj:
            return None
        obj = obj[key]
    return obj


def check_rules(defaulted_spec: Spec) -> list[tuple[Rule, str]]:
    """Python side of the table: (rule, field path) for every broken rule.

    `defaulted_spec` must have the CRD's defaults applied (see
    kubetune_api.validation.apply_defaults), as the API server does before CEL.
    A rule whose inputs are malformed is skipped: the schema error for that
    field is already reported.
    """
    broken = []
    for rule in RULES:
        if rule.python is None:
            continue
        obj = _at(defaulted_spec, rule.path)
        if rule.path and not isinstance(obj, dict):
            continue  # CEL rules on an absent or mistyped object do not run either
        try:
            ok = rule.python(obj)
        except (KeyError, TypeError, AttributeError):
            continue
        if not ok:
            broken.append((rule, rule.field_path))
    return broken
