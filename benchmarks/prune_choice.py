"""Which decoder layers spec.model.prune.keepLayers keeps: the held-out loss of
SmolLM2-135M-Instruct pruned by each candidate rule, before any training (the
numbers behind kubetune_trainer.prune.default_layers and docs/pruning.md).

    .venv/bin/python benchmarks/prune_choice.py [--keep 15,22] [--rows 150]
"""

from __future__ import annotations

import argparse
import time

from common import MODEL, heldout_loss, prepare, split, tokenizer


def both_ends(n: int, k: int) -> list[int]:
    """The first k/2 and the last k/2 layers: drops the middle block (the rule
    keepLayers uses)."""
    from kubetune_trainer.prune import default_layers

    return default_layers(n, k)


def first_and_last(n: int, k: int) -> list[int]:
    """The first k - 1 layers and the last: drops the deep block before the last
    layer."""
    return [*range(k - 1), n - 1]


def evenly_spaced(n: int, k: int) -> list[int]:
    """k layers spread evenly from the first to the last."""
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def first_k(n: int, k: int) -> list[int]:
    """The first k layers: drops the deepest block, the last layer included."""
    return list(range(k))


RULES = (both_ends, first_and_last, evenly_spaced, first_k)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keep", default="15,22", help="layer counts to keep (of 30)")
    ap.add_argument("--rows", type=int, default=150, help="held-out conversations")
    args = ap.parse_args()
    prepare()
    import torch
    from transformers import AutoModelForCausalLM

    from kubetune_trainer.prune import format_layers, prune_layers

    torch.manual_seed(0)
    tok = tokenizer()
    # nothing trains here: a sample of the corpus as shipped (the documented numbers)
    _, held_out = split(args.rows, distinct=False)

    def load():
        return AutoModelForCausalLM.from_pretrained(str(MODEL), dtype=torch.float32)

    start = time.monotonic()
    base = load()
    n = base.config.num_hidden_layers
    print(
        f"{MODEL.name}: {n} layers, held-out loss {heldout_loss(base, tok, held_out):.4f} "
        f"({len(held_out)} conversations, assistant tokens)",
        flush=True,
    )
    for k in (int(x) for x in args.keep.split(",")):
        for rule in RULES:
            model = load()
            kept = rule(n, k)
            report = prune_layers(model, kept)
            loss = heldout_loss(model, tok, held_out)
            print(
                f"keep {k:2d} {rule.__name__:15s} loss {loss:7.4f}  "
                f"{report.params_after / 1e6:.1f}M params  layers {format_layers(kept)}",
                flush=True,
            )
    print(f"({time.monotonic() - start:.0f} s)")


if __name__ == "__main__":
    main()
