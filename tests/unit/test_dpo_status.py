"""DPO's and KTO's metrics travel from metrics.jsonl to the FineTuneJob's status."""

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


def test_kto_metrics_reach_status():
    rows = [
        {"step": 0, "evalLoss": 0.5, "evalRankingAccuracy": 0.5, "evalKl": 0.0},
        {"step": 3, "loss": 0.49, "kl": 0.4, "rewardsDesirable": 0.1, "rewardsUndesirable": -0.2},
        {
            "step": 6,
            "loss": 0.47,
            "kl": 0.6,
            "rewardsDesirable": 0.3,
            "evalLoss": 0.48,
            "evalRankingAccuracy": 0.667,
            "evalKl": 0.7,
        },
    ]
    status = progress_to_status({"prefix": "s3://b/p", "metrics": rows})
    m = status["metrics"]
    assert (m["kl"], m["rewardsDesirable"], m["evalRankingAccuracy"]) == (0.6, 0.3, 0.667)
    models.FineTuneJobStatus.model_validate(status)


def test_distill_metrics_reach_status():
    rows = [
        {"step": 0, "evalLoss": 10.8, "evalAgreement": 0.0, "teacherEvalLoss": 2.1},
        {
            "step": 1,
            "loss": 9.0,
            "distillKl": 9.0,
            "teacherParameters": 1700,
            "studentParameters": 135,
        },
        {
            "step": 4,
            "loss": 6.2,
            "distillKl": 6.1,
            "distillCe": 9.8,
            "evalLoss": 9.9,
            "evalAgreement": 0.8,
            "evalDistillKl": 6.4,
            "teacherEvalLoss": 2.1,
        },
    ]
    status = progress_to_status({"prefix": "s3://b/p", "metrics": rows})
    m = status["metrics"]
    assert (m["distillKl"], m["evalAgreement"], m["teacherEvalLoss"]) == (6.1, 0.8, 2.1)
    models.FineTuneJobStatus.model_validate(status)


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
