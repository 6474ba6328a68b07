"""The training objectives, one row each: the API side of the trainer's seam.

From this table come the `method.objective` enum and its description, the
dataset formats each objective trains on, the evaluation metrics it reports
(with their direction), its default learning rate per method, its own settings
block under `method`, and the cross-field rules that tie these together (CEL
for the API server and Python for the CLI and the operator: rules.py). The
trainer implements each row as one module of kubetune_trainer.objectives,
registered under the same name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional


@dataclass(frozen=True)
class Metric:
    name: str
    mode: Literal["min", "max"]  # lower or higher is better


@dataclass(frozen=True)
class ObjectiveRow:
    name: str
    summary: str  # the enum's description of it
    formats: tuple[str, ...]  # dataset.format values it trains on
    metrics: tuple[Metric, ...]  # what its evaluation reports (eval_loss first)
    learning_rate: dict[str, float]  # default per method.type
    # method.<settings>: its own settings block (None: it has none)
    settings: Optional[str] = None
    # when its formats are not all of them: the message that says so (None: another
    # objective's owned formats already say it)
    format_message: Optional[str] = None
    # formats only it trains on, and the message for another objective on them
    owned_formats: tuple[str, ...] = ()
    owned_message: Optional[str] = None
    # rules inside its settings block: rules.Rule's fields but the path (method.<settings>)
    settings_rules: tuple[dict[str, Any], ...] = ()
    # when the settings block must be set for this objective: the message that says so
    settings_required: Optional[str] = None
    # rules on the whole spec that hold when this objective runs: rules.Rule's fields
    # but the path (spec); their predicates see the whole spec
    spec_rules: tuple[dict[str, Any], ...] = ()


EVAL_LOSS = Metric("eval_loss", "min")
# The formats with one target per row: their labelled tokens are the answer tokens
# that a token-level loss and a calibration error are measured on.
SUPERVISED_FORMATS = ("text", "prompt-completion", "chat", "alpaca", "sharegpt")


def _generates(spec: dict) -> bool:
    """Objective distill generates answers: sequence mode, or an on-policy share."""
    d = spec["method"].get("distill")
    return bool(d) and (d["mode"] == "sequence" or d["onPolicyFraction"] > 0)


OBJECTIVES: tuple[ObjectiveRow, ...] = (
    ObjectiveRow(
        name="sft",
        summary="next-token loss on the responses",
        formats=SUPERVISED_FORMATS,
        metrics=(EVAL_LOSS, Metric("eval_perplexity", "min"), Metric("eval_token_accuracy", "max")),
        learning_rate={"lora": 2e-4, "qlora": 2e-4, "full": 2e-5},
    ),
    ObjectiveRow(
        name="dpo",
        summary="direct preference optimization on dataset.format preference (the reference "
        "model is where the job starts: the adapter disabled, a continued parent's adapter "
        "kept frozen, or log-probabilities computed once before full fine-tuning)",
        formats=("preference",),
        metrics=(
            EVAL_LOSS,
            Metric("eval_reward_accuracy", "max"),
            Metric("eval_reward_margin", "max"),
        ),
        # Preference tuning moves a model that already answers well: far smaller steps
        # (TRL's DPOTrainer defaults to 1e-6 for full fine-tuning).
        learning_rate={"lora": 5e-5, "qlora": 5e-5, "full": 1e-6},
        settings="dpo",
        format_message="method.objective dpo trains on pairs: set dataset.format to preference "
        "(rows of prompt, chosen, rejected), or method.objective to sft",
        owned_formats=("preference",),
        owned_message="dataset.format preference is trained with method.objective dpo: set it, "
        "or use a supervised format (chat, prompt-completion, ...)",
        settings_rules=(
            {
                "id": "label-smoothing-needs-sigmoid",
                "message": "labelSmoothing applies to the sigmoid loss only: set lossType to "
                "sigmoid or labelSmoothing to 0",
                "cel": "self.labelSmoothing == 0.0 || self.lossType == 'sigmoid'",
                "python": lambda d: (
                    d is None or d["labelSmoothing"] == 0 or d["lossType"] == "sigmoid"
                ),
                "field": "labelSmoothing",
            },
        ),
    ),
    ObjectiveRow(
        name="kto",
        summary="Kahneman-Tversky optimization on dataset.format feedback: a thumbs up or down "
        "on single answers, no pairs needed (the reference model is the policy the job "
        "starts from, as for dpo)",
        formats=("feedback",),
        metrics=(EVAL_LOSS, Metric("eval_ranking_accuracy", "max")),
        # the same small steps as DPO (TRL's KTOTrainer also defaults to 1e-6 in full)
        learning_rate={"lora": 5e-5, "qlora": 5e-5, "full": 1e-6},
        settings="kto",
        format_message="method.objective kto trains on rated answers: set dataset.format to "
        "feedback (rows of prompt, completion, label true or false), or method.objective to sft",
        owned_formats=("feedback",),
        owned_message="dataset.format feedback (thumbs up or down) is trained with "
        "method.objective kto: set it, or use a supervised format (chat, prompt-completion, ...)",
    ),
    ObjectiveRow(
        name="grpo",
        summary="group relative policy optimization on dataset.format prompt: completions "
        "sampled from the model being trained, scored by method.grpo.grader, advantages "
        "relative to the other completions of the same prompt (eval_loss is minus the "
        "held-out mean reward of greedy answers)",
        formats=("prompt",),
        metrics=(EVAL_LOSS, Metric("eval_reward", "max")),
        # Reinforcement steps on a model that already answers: small, as for DPO
        # (TRL's GRPOTrainer defaults to 1e-6 for full fine-tuning).
        learning_rate={"lora": 2e-5, "qlora": 2e-5, "full": 1e-6},
        settings="grpo",
        format_message="method.objective grpo trains on prompts: set dataset.format to prompt "
        "(rows of prompt or messages, plus the fields the grader reads)",
        owned_formats=("prompt",),
        owned_message="dataset.format prompt is trained with method.objective grpo: set it, "
        "or use a supervised format (chat, prompt-completion, ...)",
        settings_required="method.objective grpo needs method.grpo with its grader: set "
        "method.grpo.grader (stringCheck, textSimilarity, python, scoreModel or multi)",
        spec_rules=(
            {
                "id": "grpo-completions-fit-max-seq-length",
                "message": "method.grpo.maxNewTokens must be below dataset.maxSeqLength (the "
                "prompt and its completion share it): lower maxNewTokens or raise "
                "maxSeqLength",
                "cel": "!has(self.method.grpo) || "
                "self.method.grpo.maxNewTokens < self.dataset.maxSeqLength",
                "python": lambda s: (
                    not s["method"].get("grpo")
                    or s["method"]["grpo"]["maxNewTokens"] < s["dataset"]["maxSeqLength"]
                ),
                "field": "method.grpo.maxNewTokens",
            },
        ),
    ),
    ObjectiveRow(
        name="distill",
        summary="knowledge distillation from a teacher model (method.distill.teacher, "
        "spec.model when unset) on supervised data: logits mode matches the teacher's "
        "next-token distribution on the response tokens (forward or reverse KL, a "
        "temperature, a weight against the next-token loss); sequence mode trains on the "
        "teacher's own greedy answers to the prompts, generated once and cached",
        formats=SUPERVISED_FORMATS,
        metrics=(
            EVAL_LOSS,
            Metric("eval_agreement", "max"),
            Metric("eval_distill_kl", "min"),
            Metric("eval_perplexity", "min"),
            Metric("eval_token_accuracy", "max"),
        ),
        learning_rate={"lora": 2e-4, "qlora": 2e-4, "full": 2e-5},
        settings="distill",
        settings_rules=(
            {
                "id": "distill-teacher-source",
                "message": "set at most one of method.distill.teacher.name (a Hugging Face id), "
                "method.distill.teacher.uri (a folder of weights) or "
                "method.distill.teacher.fromJob (a Succeeded FineTuneJob); with none the "
                "teacher is spec.model",
                "cel": "!has(self.teacher) || (has(self.teacher.name) ? 1 : 0) + "
                "(has(self.teacher.uri) ? 1 : 0) + (has(self.teacher.fromJob) ? 1 : 0) <= 1",
                "python": lambda d: (
                    d is None
                    or not isinstance(d.get("teacher"), dict)
                    or sum(d["teacher"].get(k) is not None for k in ("name", "uri", "fromJob")) <= 1
                ),
                "field": "teacher",
            },
            {
                "id": "distill-teacher-job-revision",
                "message": "method.distill.teacher.revision picks a Hugging Face revision; "
                "teacher.fromJob is a job's saved model: remove the revision",
                "cel": "!has(self.teacher) || !(has(self.teacher.fromJob) && "
                "has(self.teacher.revision))",
                "python": lambda d: (
                    d is None
                    or not isinstance(d.get("teacher"), dict)
                    or d["teacher"].get("fromJob") is None
                    or d["teacher"].get("revision") is None
                ),
                "field": "teacher",
            },
            {
                "id": "distill-on-policy-needs-logits",
                "message": "method.distill.onPolicyFraction scores the student's own answers "
                "against the teacher's logits: use mode logits, or set onPolicyFraction to 0",
                "cel": "self.onPolicyFraction == 0.0 || self.mode == 'logits'",
                "python": lambda d: (
                    d is None or d["onPolicyFraction"] == 0 or d["mode"] == "logits"
                ),
                "field": "onPolicyFraction",
            },
            {
                "id": "distill-tokens-needs-logits",
                "message": "method.distill.tokens picks the tokens of the logit KL, and mode "
                "sequence has none (the student learns the teacher's answers by the next-token "
                "loss): use mode logits, or remove tokens",
                "cel": "self.tokens == 'responses' || self.mode == 'logits'",
                "python": lambda d: (
                    d is None or d["tokens"] == "responses" or d["mode"] == "logits"
                ),
                "field": "tokens",
            },
        ),
        spec_rules=(
            {
                "id": "distill-generation-needs-prompts",
                "message": "method.distill.mode sequence and onPolicyFraction have answers "
                "generated for the data's prompts, and dataset.format text has none: use a "
                "format with prompts (prompt-completion, chat, alpaca, sharegpt), or mode "
                "logits with onPolicyFraction 0",
                "cel": "!has(self.method.distill) || (self.method.distill.mode != 'sequence' "
                "&& self.method.distill.onPolicyFraction == 0.0) || self.dataset.format != 'text'",
                "python": lambda s: not _generates(s) or s["dataset"]["format"] != "text",
                "field": "dataset.format",
            },
            {
                "id": "distill-answers-fit-max-seq-length",
                "message": "method.distill.maxNewTokens must be below dataset.maxSeqLength "
                "(the prompt and the generated answer share it): lower maxNewTokens or raise "
                "maxSeqLength",
                "cel": "!has(self.method.distill) || (self.method.distill.mode != 'sequence' "
                "&& self.method.distill.onPolicyFraction == 0.0) || "
                "self.method.distill.maxNewTokens < self.dataset.maxSeqLength",
                "python": lambda s: (
                    not _generates(s)
                    or s["method"]["distill"]["maxNewTokens"] < s["dataset"]["maxSeqLength"]
                ),
                "field": "method.distill.maxNewTokens",
            },
        ),
    ),
)

# method.task classification (objective sft on a classification head) reports these
# instead of sft's token metrics: the labels' cross-entropy, accuracy, macro-F1 and
# the top label's expected calibration error
CLASSIFICATION_METRICS = (
    EVAL_LOSS,
    Metric("eval_accuracy", "max"),
    Metric("eval_f1", "max"),
    Metric("eval_label_ece", "min"),
)

BY_NAME = {row.name: row for row in OBJECTIVES}
NAMES = tuple(BY_NAME)
DEFAULT = "sft"


def metric_names() -> tuple[str, ...]:
    """Every evaluation metric some objective (or method.task classification)
    reports, in table order."""
    out: list[str] = []
    for metrics in [row.metrics for row in OBJECTIVES] + [CLASSIFICATION_METRICS]:
        out += [m.name for m in metrics if m.name not in out]
    return tuple(out)


def metric_mode(name: str) -> Optional[str]:
    """'min' or 'max' for a metric some objective reports, else None."""
    for metrics in [row.metrics for row in OBJECTIVES] + [CLASSIFICATION_METRICS]:
        for m in metrics:
            if m.name == name:
                return m.mode
    return None


def words(items, last: str = "and") -> str:
    items = list(items)
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} {last} {items[-1]}"


def enum_description() -> str:
    return "; ".join(f"{row.name}: {row.summary}" for row in OBJECTIVES) + "."


def metric_description(lead: str) -> str:
    """A metric field's description: `lead`, then which objective reports which metric."""
    shared = set.intersection(*({m.name for m in row.metrics} for row in OBJECTIVES))
    parts = []
    for row in OBJECTIVES:
        own = [m.name for m in row.metrics if m.name not in shared]
        if own:
            parts.append(f"{words(own)}: objective {row.name}")
    own = [m.name for m in CLASSIFICATION_METRICS if m.name not in shared]
    parts.append(f"{words(own)}: method.task classification (instead of sft's)")
    return f"{lead} " + "; ".join(parts) + "."
