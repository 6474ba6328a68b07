"""The objectives table (kubetune_api.objectives) and the trainer's registry agree,
and what the API derives from the table is what it says."""

import inspect

from kubetune_api import models, objectives
from kubetune_api.rules import RULES
from kubetune_api.validation import resolve_spec
from kubetune_trainer.objectives import REGISTRY
from kubetune_trainer.objectives.base import Objective

PROTOCOL = [
    name
    for name, _ in inspect.getmembers(Objective, inspect.isfunction)
    if not name.startswith("_")
]


def test_every_row_has_one_trainer_module_and_back():
    assert set(REGISTRY) == set(objectives.NAMES)
    for name, cls in REGISTRY.items():
        assert cls.name == name
        missing = [m for m in PROTOCOL if not callable(getattr(cls, m, None))]
        assert not missing, f"{name} lacks {missing}"


def test_enum_metrics_and_formats_come_from_the_table():
    assert [o.value for o in models.Objective] == list(objectives.NAMES)
    metric = models.EarlyStopping.model_fields["metric"].annotation
    assert list(metric.__args__) == list(objectives.metric_names())
    fmts = {f.value for f in models.DatasetFormat}
    for row in objectives.OBJECTIVES:
        assert set(row.formats) <= fmts
        assert row.metrics[0].name == "eval_loss"
        assert set(row.learning_rate) == {m.value for m in models.MethodType}


# settings an objective cannot train without (the rest: their defaults)
SETTINGS = {
    "grpo": {
        "grpo": {
            "grader": {"type": "stringCheck", "name": "x", "reference": "y", "operation": "eq"}
        }
    }
}


def test_default_learning_rate_and_settings_block_per_objective():
    base = {
        "model": {"name": "org/m"},
        "dataset": {"train": {"uri": "s3://bucket/t.jsonl"}},
        "output": {"uri": "s3://bucket/out"},
    }
    for row in objectives.OBJECTIVES:
        fmt = row.formats[0]
        spec = resolve_spec(
            {
                **base,
                "dataset": {**base["dataset"], "format": fmt},
                "method": {"objective": row.name, **SETTINGS.get(row.name, {})},
            }
        )
        assert spec.hyperparameters.learning_rate == row.learning_rate["lora"]
        if row.settings:
            assert getattr(spec.method, row.settings) is not None


def test_each_objective_refuses_the_formats_and_metrics_it_does_not_take():
    ids = {r.id for r in RULES}
    for row in objectives.OBJECTIVES:
        for fmt in row.owned_formats:
            assert f"{fmt}-data-needs-{row.name}" in ids
        if row.settings:
            assert f"{row.settings}-settings-need-{row.name}" in ids
    rule = next(r for r in RULES if r.id == "early-stopping-metric-fits-objective")
    for row in objectives.OBJECTIVES:
        for metric in objectives.metric_names():
            spec = {"method": {"objective": row.name}, "earlyStopping": {"metric": metric}}
            ok = metric in {m.name for m in row.metrics}
            assert rule.python(spec) is ok, (row.name, metric)
