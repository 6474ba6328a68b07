"""Calibration of the answer tokens: expected calibration error and a temperature.

For each labelled token the confidence is the top token's softmax probability and
it is correct when the top token is the target. Tokens fall into BINS equal-width
confidence bins ((k/B, (k+1)/B]); ECE = sum over bins of n_b/N * |acc_b - conf_b|,
which is sum_b |correct_b - confidence_b| / N in per-bin sums. The per-bin sums
add up over batches and ranks, so every rank scores its shard and one all-reduce
gives the error of the whole split.

A temperature T divides the logits. It is fitted by a golden-section search on
log T that minimises the negative log-likelihood of a bounded number of cached
answer tokens: the NLL is convex in 1/T, so it has one minimum on the range. Each
rank sums the NLL of its own cached tokens and the sums are all-reduced, so every
rank searches the same curve and ends at the same T.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

BINS = 15
TEMPERATURE_TOKENS = 1024  # answer tokens per rank whose logits are kept for the fit
T_RANGE = (0.05, 20.0)
GOLDEN_STEPS = 48  # the bracket on log T shrinks by 0.618 a step: ~1e-9 of log(400)


def bin_stats(logits, target, temperature: float = 1.0, bins: int = BINS) -> list[float]:
    """Per bin [count..., confidence sum..., correct sum...] (3 * bins floats) of
    labelled tokens' logits (N x vocab) and targets (N)."""
    import torch

    if target.numel() == 0:
        return [0.0] * (3 * bins)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    conf, pred = probs.max(dim=-1)
    correct = (pred == target).double()
    conf = conf.double()
    idx = (torch.ceil(conf * bins).long() - 1).clamp(0, bins - 1)
    count = torch.bincount(idx, minlength=bins).double()
    conf_sum = torch.bincount(idx, weights=conf, minlength=bins)
    correct_sum = torch.bincount(idx, weights=correct, minlength=bins)
    return torch.cat([count, conf_sum, correct_sum]).cpu().tolist()


def summarize(stats: Sequence[float], bins: int = BINS) -> dict:
    """{ece, accuracy, confidence, tokens} of summed bin_stats."""
    count, conf, correct = stats[:bins], stats[bins : 2 * bins], stats[2 * bins :]
    n = sum(count)
    if n == 0:
        return {"ece": 0.0, "accuracy": 0.0, "confidence": 0.0, "tokens": 0}
    return {
        "ece": sum(abs(a - c) for a, c in zip(correct, conf, strict=True)) / n,
        "accuracy": sum(correct) / n,
        "confidence": sum(conf) / n,
        "tokens": int(round(n)),
    }


def ece(logits, target, temperature: float = 1.0, bins: int = BINS) -> float:
    """The expected calibration error of one set of logits (tests, one process)."""
    return summarize(bin_stats(logits, target, temperature, bins), bins)["ece"]


def nll_sum(cached: list, temperature: float) -> tuple[float, int]:
    """(summed negative log-likelihood, tokens) of cached (logits, target) pairs
    with the logits divided by `temperature`."""
    import torch.nn.functional as F

    total, n = 0.0, 0
    for logits, target in cached:
        total += F.cross_entropy(logits.float() / temperature, target, reduction="sum").item()
        n += target.numel()
    return total, n


def fit_temperature(
    mean_nll: Callable[[float], float], lo: float = T_RANGE[0], hi: float = T_RANGE[1]
) -> float:
    """The T in [lo, hi] minimising mean_nll(T): golden-section search on log T."""
    g = (math.sqrt(5) - 1) / 2
    a, b = math.log(lo), math.log(hi)
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = mean_nll(math.exp(c)), mean_nll(math.exp(d))
    for _ in range(GOLDEN_STEPS):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = mean_nll(math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = mean_nll(math.exp(d))
    return math.exp((a + b) / 2)


def write_temperature(folder: Path, temperature: float) -> bool:
    """Put the temperature (and do_sample: a temperature means nothing to greedy
    decoding) into a saved model's generation_config.json, keeping its other
    settings; validated by transformers' GenerationConfig. False when the folder
    holds no model config (an adapter's folder gets the file all the same: peft's
    loaders ignore it, a server reading the adapter's folder finds it)."""
    from transformers import GenerationConfig

    folder = Path(folder)
    path = folder / "generation_config.json"
    values = json.loads(path.read_text()) if path.exists() else {}
    values.update(temperature=round(float(temperature), 6), do_sample=True)
    config = GenerationConfig.from_dict(values)
    config.validate(strict=True)
    config.save_pretrained(str(folder))
    return (folder / "config.json").exists()
