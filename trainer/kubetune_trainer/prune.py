"""Structured pruning (spec.model.prune): drop whole decoder layers of the
starting model before training.

The layers are taken out of the decoder's ModuleList and the config is made to
describe what is left (num_hidden_layers, per-layer lists such as layer_types),
and each kept layer's attention gets its new position as `layer_idx`, which is
where the KV cache stores its keys and values during generation. The result is
an ordinary model of the same class with fewer layers: it trains, saves and
loads back with `from_pretrained` like any other. The choice depends only on the
spec and the model's layer count, so every rank and every attempt (a resume)
prunes the same layers.
"""

from __future__ import annotations

from dataclasses import dataclass

FIELD = "spec.model.prune"


class PruneError(ValueError):
    """The spec's pruning does not fit the model: the field, what is wrong, the fix."""

    def __init__(self, field: str, what: str, fix: str):
        self.field, self.what, self.fix = field, what, fix
        super().__init__(f"{field}: {what}: {fix}")


@dataclass(frozen=True)
class PruneReport:
    layers_before: int
    kept: tuple[int, ...]
    params_before: int
    params_after: int

    def record(self):
        from kubetune_api import storage as contract

        return contract.PruneRecord(
            layers_before=self.layers_before,
            kept_layers=list(self.kept),
            parameters_before=self.params_before,
            parameters_after=self.params_after,
        )

    def line(self) -> str:
        return summary_line(self.record().to_dict())


def summary_line(record: dict) -> str:
    """One line for the log and the run summary, from outputs.json's `pruned`."""
    kept = record["keptLayers"]
    return (
        f"pruned {record['layersBefore']} → {len(kept)} layers: "
        f"{record['parametersBefore'] / 1e6:.1f}M → {record['parametersAfter'] / 1e6:.1f}M "
        f"parameters (kept layers {format_layers(kept)})"
    )


def format_layers(kept) -> str:
    """0-13,29: runs of consecutive indices written as ranges."""
    runs: list[list[int]] = []
    for i in kept:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ",".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def default_layers(total: int, keep: int) -> list[int]:
    """The layers keepLayers keeps: the first ceil(keep / 2) and the last
    floor(keep / 2); the middle block goes.

    The first layers build the token representations everything else reads and
    the last ones map them to the output vocabulary; the middle ones change the
    hidden state least. Of the rules measured on SmolLM2-135M-Instruct
    (benchmarks/prune_choice.py, numbers in docs/pruning.md) this one loses the
    least held-out loss before any training."""
    if not 1 <= keep < total:
        raise ValueError(f"keep must be between 1 and {total - 1}, got {keep}")
    head = (keep + 1) // 2
    return [*range(head), *range(total - (keep - head), total)]


def kept_layers(prune, total: int) -> list[int]:
    """The indices spec.model.prune keeps, checked against the model's layer count."""
    if prune.layers is not None:
        beyond = [i for i in prune.layers if i >= total]
        if beyond:
            raise PruneError(
                f"{FIELD}.layers",
                f"{beyond} beyond the model's {total} decoder layers (indices 0 to {total - 1})",
                "remove them",
            )
        if len(prune.layers) == total:
            raise PruneError(
                f"{FIELD}.layers",
                f"lists all {total} decoder layers: nothing would be pruned",
                "list fewer, or remove prune",
            )
        return list(prune.layers)
    keep = prune.keep_layers
    if keep >= total:
        raise PruneError(
            f"{FIELD}.keepLayers",
            f"{keep} layers kept of a model that has {total} decoder layers",
            f"set it below {total}, or remove prune",
        )
    return default_layers(total, keep)


def decoder_layers(model):
    """(the module that holds the decoder's ModuleList, its attribute name)."""
    import torch.nn as nn

    total = getattr(model.config, "num_hidden_layers", None)
    inner = model.get_decoder() if hasattr(model, "get_decoder") else None
    for owner in (inner, getattr(model, "model", None), model):
        layers = getattr(owner, "layers", None) if owner is not None else None
        if isinstance(layers, nn.ModuleList) and len(layers) == total:
            return owner, "layers"
    raise PruneError(
        FIELD,
        f"cannot find the decoder layers of {type(model).__name__} (a ModuleList `layers` "
        f"of config.num_hidden_layers = {total} blocks, as Llama, Mistral and Qwen2 have)",
        "remove prune, or start from a model of such a family",
    )


def _parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def prune_layers(model, kept: list[int]) -> PruneReport:
    """Keep only the decoder layers `kept` (increasing indices), in place."""
    import torch.nn as nn

    owner, name = decoder_layers(model)
    layers = getattr(owner, name)
    total = len(layers)
    before = _parameters(model)
    setattr(owner, name, nn.ModuleList([layers[i] for i in kept]))
    for new, layer in enumerate(getattr(owner, name)):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new
    config = model.config
    # per-layer settings (layer_types: full or sliding attention, no_rope_layers, ...)
    for key, value in list(config.to_dict().items()):
        if isinstance(value, list | tuple) and len(value) == total and total > 1:
            setattr(config, key, type(value)(value[i] for i in kept))
    config.num_hidden_layers = len(kept)
    return PruneReport(total, tuple(kept), before, _parameters(model))


def apply(model, spec) -> PruneReport | None:
    """spec.model.prune on a loaded model (None when the spec prunes nothing)."""
    prune = getattr(spec.model, "prune", None)
    if prune is None:
        return None
    owner, name = decoder_layers(model)
    return prune_layers(model, kept_layers(prune, len(getattr(owner, name))))
