"""Which weights of a full fine-tune train, and at which rate (spec.method.full).

The model is cut into parts: the embeddings (all below the first decoder
layer), each decoder layer, and the head (all above the last one: the final
norm and the output head). A part that never trains gets requires_grad False
before the DeepSpeed engine is built: no gradients, no optimizer state, nothing
for ZeRO to shard, and checkpoints leave it out (it is the starting weights).

The parts that train become the optimizer's parameter groups, each with its
rate (layer-wise decay: the lower the layer, the smaller) and the step it
starts training at (gradual unfreezing, from the top down). The learning-rate
schedule multiplies a group's rate by 0 until its step; AdamW's decoupled weight
decay is scaled by the rate too, so a waiting part keeps its weights bit for
bit. Both depend only on the step: a resumed run continues the same schedule.
DeepSpeed's optimizers (ZeRO 0 to 3, bf16) keep torch's parameter groups, so
this works under every stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import prune as prune_mod

FIELD = "spec.method.full"


class FreezeError(ValueError):
    """The spec's layer choice does not fit the model: the field, what is wrong, the fix."""

    def __init__(self, field: str, what: str, fix: str):
        self.field, self.what, self.fix = field, what, fix
        super().__init__(f"{field}: {what}: {fix}")


def check_layers(field_path: str, layers, total: int) -> list[int]:
    """Layer indices from the spec, each below the model's layer count."""
    beyond = [i for i in layers if i >= total]
    if beyond:
        raise FreezeError(
            field_path,
            f"{beyond} beyond the model's {total} decoder layers (indices 0 to {total - 1})",
            "remove them",
        )
    return list(layers)


@dataclass
class Part:
    """Parameters that train or wait together. depth: how many decoder layers lie
    above it (the head 0, the last layer 0, layer i L-1-i, the embeddings L)."""

    name: str
    params: list
    depth: int

    @property
    def numel(self) -> int:
        return sum(_numel(p) for p in self.params)


def _numel(p) -> int:
    return p.ds_numel if hasattr(p, "ds_numel") else p.numel()


def tied_embeddings(model) -> bool:
    """Whether the output head's weight is the input embedding's (tie_word_embeddings)."""
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    inp = get_in() if get_in else None
    out = get_out() if get_out else None
    return inp is not None and out is not None and out.weight is inp.weight


def decoder_blocks(model, field_path: str):
    """The model's ModuleList of decoder layers; a model without one fails at the
    field that asked for layers."""
    try:
        owner, name = prune_mod.decoder_layers(model)
    except prune_mod.PruneError as err:
        raise FreezeError(
            field_path,
            err.what,
            "remove it, or start from a model of such a family",
        ) from err
    return getattr(owner, name)


def model_parts(model, field_path: str = FIELD) -> tuple[list[Part], int]:
    """(the parts bottom up: embeddings, layer 0 .. layer L-1, head; L). Each
    parameter is in one part (a tied embedding weight in the head's: it is the
    output head as much as the input table)."""
    layers = decoder_blocks(model, field_path)
    total = len(layers)
    where = {id(p): i for i, layer in enumerate(layers) for p in layer.parameters()}
    tied = tied_embeddings(model)
    shared = id(model.get_input_embeddings().weight) if tied else None
    embeddings = Part("embeddings", [], total)
    blocks = [Part(f"layer {i}", [], total - 1 - i) for i in range(total)]
    head = Part("head", [], 0)
    seen_layer = False
    for _, p in model.named_parameters():  # once each, tied weights too
        i = where.get(id(p))
        if i is not None:
            blocks[i].params.append(p)
            seen_layer = True
        elif id(p) == shared or seen_layer:
            head.params.append(p)
        else:
            embeddings.params.append(p)
    return [embeddings, *blocks, head], total


@dataclass(frozen=True)
class Group:
    """One optimizer parameter group: parts that share a rate and a start."""

    names: tuple[str, ...]
    params: tuple
    parameters: int
    lr_scale: float
    start: int  # the first step (0-based) that updates it


@dataclass
class Plan:
    layers: int  # the model's decoder layers
    total: int  # all its parameters
    groups: list[Group]  # what trains, top down
    trainable_layers: list[int]
    embeddings: bool
    head: bool
    tied: bool
    every_steps: int | None = None
    decay: float = 1.0
    frozen: list = field(default_factory=list)

    @property
    def trainable(self) -> int:
        return sum(g.parameters for g in self.groups)

    def trainable_at(self, step: int) -> int:
        """Parameters step `step` (0-based) updates."""
        return sum(g.parameters for g in self.groups if g.start <= step)

    def optimizer_groups(self, updates_per_step: int = 1) -> list[tuple[list, float, int]]:
        """(params, rate scale, first optimizer update) per parameter group."""
        return [(list(g.params), g.lr_scale, g.start * updates_per_step) for g in self.groups]

    def record(self):
        from kubetune_api import storage as contract

        return contract.ParameterCounts(
            total=self.total,
            trainable=self.trainable,
            layers=self.layers,
            trainable_layers=self.trainable_layers,
            train_embeddings=self.embeddings,
            train_head=self.head,
            unfreeze_every_steps=self.every_steps,
            layer_lr_decay=self.decay,
            groups=[
                contract.ParameterGroupRecord(
                    name=", ".join(g.names),
                    parameters=g.parameters,
                    lr_scale=g.lr_scale,
                    from_step=g.start,
                )
                for g in self.groups
            ]
            if len(self.groups) > 1
            else None,
        )


def plan(model, full) -> Plan:
    """What trains and how, for spec.method.full `full` (a FullConfig) on `model`."""
    parts, total = model_parts(model)
    tied = tied_embeddings(model)
    if tied and full.train_embeddings != full.train_head:
        raise FreezeError(
            f"{FIELD}.trainEmbeddings",
            "the model's output head shares the input embedding weight "
            "(tie_word_embeddings): they train together or not at all",
            "set trainEmbeddings and trainHead alike",
        )
    layers = (
        list(range(total))
        if full.trainable_layers is None
        else check_layers(f"{FIELD}.trainableLayers", full.trainable_layers, total)
    )
    chosen = {"embeddings": full.train_embeddings, "head": full.train_head}
    chosen.update({f"layer {i}": True for i in layers})
    top_down = [p for p in reversed(parts) if p.params and chosen.get(p.name, False)]
    frozen = [p for p in parts if p.params and not chosen.get(p.name, False)]
    every = full.unfreeze.every_steps if full.unfreeze is not None else None
    groups: list[Group] = []
    for k, part in enumerate(top_down):
        scale = full.layer_lr_decay**part.depth
        start = k * every if every else 0
        last = groups[-1] if groups else None
        if last is not None and last.lr_scale == scale and last.start == start:
            groups[-1] = Group(
                (*last.names, part.name),
                (*last.params, *part.params),
                last.parameters + part.numel,
                scale,
                start,
            )
        else:
            groups.append(Group((part.name,), tuple(part.params), part.numel, scale, start))
    return Plan(
        layers=total,
        total=sum(p.numel for p in parts),
        groups=groups,
        trainable_layers=layers,
        embeddings=full.train_embeddings,
        head=full.train_head,
        tied=tied,
        every_steps=every,
        decay=full.layer_lr_decay,
        frozen=[p.name for p in frozen],
    )


def apply(model, spec) -> Plan | None:
    """spec.method.full on a loaded model: the parts that never train stop taking
    gradients. None when the spec sets no method.full (every weight at one rate)."""
    full = getattr(spec.method, "full", None)
    if spec.method.type != "full" or full is None:
        return None
    p = plan(model, full)
    training = {id(q) for g in p.groups for q in g.params}
    for q in model.parameters():
        q.requires_grad_(id(q) in training)
    return p


def summary_line(record: dict) -> str:
    """One line for the log and the run summary, from outputs.json's `parameters`."""
    total, trainable = record["total"], record["trainable"]
    share = 100.0 * trainable / total if total else 0.0
    line = f"parameters: {total / 1e6:.1f}M, {trainable / 1e6:.2f}M trainable ({share:.1f}%)"
    n = record.get("layers")
    what = []
    if record.get("trainableLayers") is not None:
        chosen = record["trainableLayers"]
        if len(chosen) == n:
            what.append(f"all {n} decoder layers")
        elif chosen:
            what.append(f"decoder layers {prune_mod.format_layers(chosen)} of {n}")
        else:
            what.append(f"no decoder layer of {n}")
        for key, label in (("trainEmbeddings", "embeddings"), ("trainHead", "head")):
            what.append(label if record.get(key) else f"{label} frozen")
    if record.get("adapterLayers") is not None:
        what.append(f"adapters on layers {prune_mod.format_layers(record['adapterLayers'])} of {n}")
    if record.get("unfreezeEverySteps"):
        what.append(f"unfreezing one part every {record['unfreezeEverySteps']} steps")
    if record.get("layerLrDecay") not in (None, 1.0):
        what.append(f"layer-wise lr decay {record['layerLrDecay']:g}")
    return line + (": " + ", ".join(what) if what else "")
