"""output.interpolation: which weight is published (the rule), and what outputs.json's
interpolation section becomes in status."""

from __future__ import annotations

import pytest

from kubetune_api import storage as contract
from kubetune_api.models import FineTuneJobStatus
from kubetune_trainer.interpolate import choose


def points(*rows):
    return [
        contract.InterpolationPoint(alpha=a, eval_loss=loss, retention_regression=r)
        for a, loss, r in rows
    ]


def test_best_held_out_is_the_lowest_loss():
    curve = points((0.25, 2.1, None), (0.5, 1.7, None), (0.75, 1.8, None), (1.0, 1.9, None))
    assert choose(curve, "bestHeldOut")[0] == 0.5


def test_a_tie_goes_to_the_weight_closest_to_the_base():
    curve = points((1.0, 1.5, None), (0.5, 1.5 + 5e-7, None), (0.25, 1.6, None))
    chosen, rule = choose(curve, "bestHeldOut")
    assert chosen == 0.5 and "smaller weight" in rule
    # beyond the tie tolerance the lower loss wins
    assert choose(points((1.0, 1.5, None), (0.5, 1.5 + 1e-4, None)), "bestHeldOut")[0] == 1.0


def test_fixed_publishes_the_given_weight_whatever_it_scores():
    curve = points((0.5, 3.0, None), (1.0, 1.0, None))
    assert choose(curve, "fixed", 0.5) == (0.5, "the weight set in output.interpolation.weight")
    with pytest.raises(ValueError, match="one of weights"):
        choose(curve, "fixed", 0.75)


def test_a_retention_bound_keeps_out_the_weights_that_forget_too_much():
    curve = points((0.25, 2.0, 0.01), (0.5, 1.7, 0.04), (1.0, 1.5, 0.20))
    assert choose(curve, "bestHeldOut")[0] == 1.0  # no bound: the held-out loss alone
    chosen, rule = choose(curve, "bestHeldOut", retention_bound=0.05)
    assert chosen == 0.5 and "retention" in rule
    # none within the bound: the smallest regression
    assert choose(curve, "bestHeldOut", retention_bound=0.001)[0] == 0.25


def test_status_names_the_published_folder_its_weight_and_loss(tmp_path):
    from kubetune_operator.progress import progress_to_status
    from kubetune_operator.storage_reader import read_snapshot
    from kubetune_trainer.storage import JobStorage

    record = contract.outputs_record(
        contract.OutputsRecord(final_eval_loss=1.9, steps=4),
        {
            "interpolation": contract.InterpolationRecord(
                rule="the lowest held-out loss",
                select="bestHeldOut",
                chosen=0.5,
                weights=points((0.5, 1.7123456789, None), (1.0, 1.9, None)),
                adapter="s3://b/p/interpolated/adapter",
                merged_model="s3://b/p/interpolated/merged",
                seconds=3.5,
            )
        },
    )
    store = JobStorage(str(tmp_path / "p"))
    store.write_record(contract.OUTPUTS, record)
    snap = read_snapshot(str(tmp_path / "p"), None, {}, schemes=("file",))
    status = progress_to_status(snap, 3, 1)
    assert status["outputs"]["interpolated"] == "s3://b/p/interpolated/merged"
    assert status["outputs"]["interpolationWeight"] == 0.5
    assert status["metrics"]["interpolatedEvalLoss"] == pytest.approx(1.712346)
    assert status["metrics"]["evalLoss"] == 1.9
    FineTuneJobStatus.model_validate(status)  # the CRD's status schema takes it
