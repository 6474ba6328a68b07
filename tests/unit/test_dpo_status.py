"""DPO's reward metrics travel from metrics.jsonl to the FineTuneJob's status."""

from kubetune_api import models
from kubetune_operator.progress import progress_to_status


def test_reward_metrics_reach_status_latest_row_wins():
    rows = [
        {"step": 0, "evalLoss": 0.6931, "evalRewardAccuracy": 0.0, "evalRewardMargin": 0.0},
        {"step": 2, "loss": 0.70, "rewardAccuracy": 0.25, "rewardMargin": -0.1},
        {
            "step": 4,
            "loss": 0.52,
            "rewardAccuracy": 0.75,
            "rewardMargin": 0.61,
            "evalLoss": 0.49,
            "evalRewardAccuracy": 0.625,
            "evalRewardMargin": 0.587,
        },
    ]
    status = progress_to_status({"prefix": "s3://b/p", "metrics": rows})
    m = status["metrics"]
    assert (m["rewardAccuracy"], m["rewardMargin"]) == (0.75, 0.61)
    assert (m["evalRewardAccuracy"], m["evalRewardMargin"]) == (0.625, 0.587)
    assert m["displayLoss"] == "0.5200"
    models.FineTuneJobStatus.model_validate(status)  # the CRD's status schema takes it


def test_grpo_metrics_reach_status_and_grader_failures_are_totalled():
    rows = [
        {"step": 0, "evalLoss": -0.35, "evalReward": 0.35, "evalRewardsPerGrader": {"a": 0.35}},
        {
            "step": 1,
            "loss": 0.0,
            "reward": 0.5,
            "rewardStd": 0.2,
            "rewardsPerGrader": {"a": 0.5, "slow": 0.0},
            "kl": 0.001,
            "completionLength": 6.0,
            "fracRewardZeroStd": 0.25,
            "graderErrors": {"a": 0, "slow": 1},
            "graderTimeouts": {"a": 0, "slow": 3},
        },
        {
            "step": 2,
            "loss": 0.0,
            "reward": 0.6,
            "rewardStd": 0.1,
            "kl": 0.002,
            "completionLength": 5.5,
            "fracRewardZeroStd": 0.0,
            "graderErrors": {"a": 2, "slow": 0},
            "graderTimeouts": {"a": 0, "slow": 4},
            "evalLoss": -0.7,
            "evalReward": 0.7,
        },
    ]
    status = progress_to_status({"prefix": "s3://b/p", "metrics": rows})
    m = status["metrics"]
    assert (m["reward"], m["rewardStd"], m["kl"], m["evalReward"]) == (0.6, 0.1, 0.002, 0.7)
    assert (m["completionLength"], m["fracRewardZeroStd"]) == (5.5, 0.0)
    assert (m["graderErrorsTotal"], m["graderTimeoutsTotal"]) == (3, 7)  # every row counts
    models.FineTuneJobStatus.model_validate(status)
