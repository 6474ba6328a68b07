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

OBJECTIVES: tuple[ObjectiveRow, ...] = (
    ObjectiveRow(
        name="sft",
        summary="next-token loss on the responses",
        formats=("text", "prompt-completion", "chat", "alpaca", "sharegpt"),
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
)

BY_NAME = {row.name: row for row in OBJECTIVES}
NAMES = tuple(BY_NAME)
DEFAULT = "sft"


def metric_names() -> tuple[str, ...]:
    """Every evaluation metric some objective reports, in table order."""
    out: list[str] = []
    for row in OBJECTIVES:
        out += [m.name for m in row.metrics if m.name not in out]
    return tuple(out)


def metric_mode(name: str) -> Optional[str]:
    """'min' or 'max' for a metric some objective reports, else None."""
    for row in OBJECTIVES:
        for m in row.metrics:
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
    return f"{lead} " + "; ".join(parts) + "."
