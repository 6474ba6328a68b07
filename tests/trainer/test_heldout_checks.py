"""evaluation.calibration and evaluation.retention.

The math on synthetic logits whose answers are known: a calibrated set has an
ECE near 0, the same set made overconfident (logits x3) does not, and the fitted
temperature finds the 3 back and brings the error down again. Then one real run
(a tiny Llama fully fine-tuned under DeepSpeed on the shared local Ray) measures both before
and after, writes the temperature into the saved generation configs, and trips a
tiny retention bound (0.01%); run again on the same prefix with failOnRegression, it
resumes at its last step, measures again and fails the job with the numbers."""

from __future__ import annotations

import json
import math
import random

import pytest
import trainer_helpers as H

pytestmark = [pytest.mark.trainer, pytest.mark.timeout(600)]


def _read(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _binary(probs: list[float], labels: list[int], scale: float = 1.0):
    """Two-class logits [0, scale * logit(p)] (so P(class 1) = p at scale 1)."""
    import torch

    p = torch.tensor(probs, dtype=torch.float64)
    logits = torch.stack([torch.zeros_like(p), scale * torch.log(p / (1 - p))], dim=-1)
    return logits.float(), torch.tensor(labels)


def _calibrated(n: int = 60_000, seed: int = 0):
    """Class 1 with probability p, p uniform in [0.5, 0.99): calibrated by construction."""
    rng = random.Random(seed)
    probs = [rng.uniform(0.5, 0.99) for _ in range(n)]
    labels = [int(rng.random() < p) for p in probs]
    return probs, labels


def test_ece_of_a_hand_counted_set():
    from kubetune_trainer import calibration as C

    # bin (0.867, 0.933]: 0.9 right and 0.9 wrong -> |1 - 1.8| ; bin (0.533, 0.6]: two
    # 0.6 right -> |2 - 1.2|; N = 4: ECE = (0.8 + 0.8) / 4
    logits, target = _binary([0.9, 0.9, 0.6, 0.6], [1, 0, 1, 1])
    assert C.ece(logits, target) == pytest.approx(0.4, abs=1e-6)
    summary = C.summarize(C.bin_stats(logits, target))
    assert summary["accuracy"] == pytest.approx(0.75)
    assert summary["confidence"] == pytest.approx(0.75, abs=1e-6)
    assert summary["tokens"] == 4


def test_calibrated_overconfident_and_the_fitted_temperature():
    from kubetune_trainer import calibration as C

    probs, labels = _calibrated()
    logits, target = _binary(probs, labels)
    calibrated = C.ece(logits, target)
    assert calibrated < 0.01  # sampling noise only
    sharp = logits * 3  # the same answers, three times as sure
    overconfident = C.ece(sharp, target)
    assert overconfident > 0.05
    # bin sums add up: two halves give the whole set's error
    half = len(labels) // 2
    parts = [C.bin_stats(sharp[:half], target[:half]), C.bin_stats(sharp[half:], target[half:])]
    summed = [a + b for a, b in zip(*parts, strict=True)]
    assert C.summarize(summed)["ece"] == pytest.approx(overconfident, abs=1e-9)

    cached = [(sharp.half(), target)]
    t = C.fit_temperature(lambda temp: C.nll_sum(cached, temp)[0] / len(labels))
    assert t == pytest.approx(3.0, rel=0.05)
    assert C.ece(sharp, target, temperature=t) < 0.01 < overconfident
    # an underconfident set gets a temperature below 1
    t_low = C.fit_temperature(lambda temp: C.nll_sum([(logits / 2, target)], temp)[0])
    assert t_low == pytest.approx(0.5, rel=0.05)


def test_write_temperature_keeps_the_other_settings(tmp_path):
    from transformers import GenerationConfig

    from kubetune_trainer import calibration as C

    GenerationConfig(eos_token_id=2, max_new_tokens=77).save_pretrained(tmp_path)
    assert C.write_temperature(tmp_path, 1.2345678) is False  # no config.json: an adapter
    read = GenerationConfig.from_pretrained(tmp_path)
    assert (read.temperature, read.do_sample) == (1.234568, True)
    assert (read.eos_token_id, read.max_new_tokens) == (2, 77)


def _digits(n: int, seed: int = 3) -> list[dict]:
    """Strings of digits: what the base learned (another seed's), what the chat
    data never shows."""
    rng = random.Random(seed)
    return [{"text": " ".join(str(rng.randrange(10)) for _ in range(40))} for _ in range(n)]


def _knows_digits(tiny, out):
    """The tiny model after 30 steps on other digit strings: a base that knows
    something for fine-tuning to forget (a random model only gets better at
    everything from any training)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kubetune_trainer import data as D

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tiny)
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    examples, _ = D.build_examples(_digits(16, seed=11), "text", tok, 128)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(30):
        e = examples[step % len(examples)]
        ids, labels = torch.tensor([e.input_ids]), torch.tensor([e.labels])
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_calibration_and_retention_before_and_after(ray_local, tmp_path):
    from kubetune_api import storage as contract
    from kubetune_operator.progress import progress_to_status, retention_condition
    from kubetune_operator.storage_reader import StorageSnapshot
    from kubetune_trainer.__main__ import run
    from kubetune_trainer.heldout import summary_lines

    model = _knows_digits(H.tiny_model(tmp_path / "tiny"), tmp_path / "digits-base")
    data = H.write_jsonl(tmp_path / "chat.jsonl", H.chat_rows(48))
    retention = H.write_jsonl(tmp_path / "digits.jsonl", _digits(12))
    j = H.job(
        model,
        data,
        (tmp_path / "runs").as_uri(),
        name="checks",
        method={"type": "full"},
        dataset={"validationSplit": 0.25},
        evaluation={
            "everySteps": 6,
            "maxBatches": 3,
            "calibration": {"fitTemperature": True, "saveTemperature": True},
            "retention": {
                "dataset": {"uri": str(retention), "format": "text"},
                "maxExamples": 8,
                "maxRegression": 0.0001,
            },
        },
        checkpointing={"everySteps": 6, "keepLast": 1},
    )
    config = H.trainer_config(j)
    H.fit(config)

    outputs = _read(H.local(config, "outputs.json"))
    cal = outputs["calibration"]
    assert cal["bins"] == 15 and cal["tokens"] > 100
    for key in ("eceBefore", "ece", "eceAtTemperature", "accuracy", "confidence"):
        assert 0.0 <= cal[key] <= 1.0 and math.isfinite(cal[key]), (key, cal)
    assert cal["ece"] != cal["eceBefore"]  # the weights changed, and so did the error
    # fitted on at most 1024 tokens of the validation split's answers
    assert 0.05 < cal["temperature"] < 20 and 0 < cal["temperatureTokens"] <= 1024
    assert cal["savedIn"] == ["model"]
    gen = _read(H.local(config, "model", "generation_config.json"))
    assert gen["temperature"] == pytest.approx(cal["temperature"], abs=1e-6)
    assert gen["do_sample"] is True
    assert gen["eos_token_id"] is not None  # the base's settings are kept

    ret = outputs["retention"]
    print(f"calibration {cal}\nretention {ret}")  # pytest -s: the numbers
    assert ret["examples"] == 8 and ret["tokens"] > 8 * 30
    before, after = ret["lossBefore"], ret["lossAfter"]
    assert ret["regression"] == pytest.approx((after - before) / before, rel=1e-9)
    assert ret["regression"] > 0.0001, ret  # the digits got less likely (+0.15% measured)
    assert ret["exceeded"] is True and ret["failOnRegression"] is False

    # the operator's view of the same files: metrics and the condition
    snap = StorageSnapshot(
        prefix=config.storage_prefix, outputs=contract.OutputsRecord.model_validate(outputs)
    )
    metrics = progress_to_status(snap)["metrics"]
    assert metrics["evalEceBefore"] == pytest.approx(cal["eceBefore"], abs=1e-6)
    assert metrics["calibrationTemperature"] == pytest.approx(cal["temperature"], abs=1e-6)
    assert metrics["retentionRegression"] == pytest.approx(ret["regression"], abs=1e-6)
    exceeded, message = retention_condition(snap)
    assert exceeded and "above the bound of 0.01%" in message
    lines = "\n".join(summary_lines(outputs))
    assert "calibration error (ECE, 15 bins" in lines and "above the bound" in lines

    # failOnRegression on the same prefix: resumes at step 6 (the base's numbers come
    # from the checkpoint), measures again, saves the outputs and fails the job
    j["spec"]["evaluation"]["retention"]["failOnRegression"] = True
    config = H.trainer_config(j)
    assert run(config, quiet=True) == 1
    progress = _read(H.local(config, "progress.json"))
    assert progress["phase"] == "Failed", progress
    assert "evaluation.retention: the retention loss" in progress["message"]
    assert "failOnRegression" in progress["message"]
    again = _read(H.local(config, "outputs.json"))["retention"]
    assert again["lossBefore"] == pytest.approx(before, rel=1e-9)
    assert again["lossAfter"] == pytest.approx(after, rel=1e-5)
    assert again["failOnRegression"] is True
