"""GGUF export of SmolLM2-135M-Instruct: per type, the file's size, the export
time and the held-out loss of the file read back (dequantized by transformers)
against the safetensors folder's, the numbers behind gguf_export.TOLERANCE.

    .venv/bin/python benchmarks/gguf_export.py [--types q8_0,q4_0,q5_0,f16] [--rows 48]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import MODEL, prepare, split


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--types", default="q8_0,q4_0,q5_0,f16")
    ap.add_argument("--rows", type=int, default=48, help="held-out conversations")
    args = ap.parse_args()
    prepare()
    from transformers import AutoTokenizer

    from kubetune_trainer import data as D
    from kubetune_trainer import gguf_export as G

    tok = AutoTokenizer.from_pretrained(str(MODEL))
    # nothing trains here: a sample of the corpus as shipped (the documented numbers)
    _, held_out = split(args.rows, distinct=False)
    examples, _ = D.build_examples(held_out, "chat", tok, 256)
    pairs = [(e.input_ids, e.labels) for e in examples]
    reference = G._load_folder(MODEL)
    start = time.monotonic()
    ref_loss = G.held_out_loss(reference, pairs)
    size = sum(p.stat().st_size for p in MODEL.glob("*.safetensors"))
    print(
        f"safetensors (fp32): {size / 2**20:.1f} MiB, held-out loss {ref_loss:.4f} "
        f"({len(pairs)} conversations, {time.monotonic() - start:.1f} s)",
        flush=True,
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for qtype in args.types.split(","):
            rep = G.write(MODEL, Path(tmp) / f"model-{qtype}.gguf", qtype, "SmolLM2-135M-Instruct")
            t = time.monotonic()
            chk = G.check(Path(rep.path), MODEL, qtype, pairs, reference_loss=ref_loss)
            row = {
                "type": qtype,
                "mib": round(rep.bytes / 2**20, 1),
                "export_s": rep.seconds,
                "check_s": round(time.monotonic() - t, 1),
                "eval_loss": round(chk.eval_loss, 4),
                "relative_increase_pct": round(100 * chk.relative_increase, 3),
                "tolerance_pct": 100 * chk.tolerance,
                "tensors_ok": chk.tensors_ok,
                "tokenizer_ok": chk.tokenizer_ok,
                "fallback": rep.fallback,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("| type | size MiB | export s | held-out loss | vs safetensors | tolerance |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['type']} | {r['mib']} | {r['export_s']} | {r['eval_loss']} | "
            f"{r['relative_increase_pct']:+.3f}% | {r['tolerance_pct']:g}% |"
        )


if __name__ == "__main__":
    main()
