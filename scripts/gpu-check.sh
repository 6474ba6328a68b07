#!/usr/bin/env bash
# The paths only CUDA exercises, on one GPU, in under 8 minutes: bf16 LoRA, QLoRA
# through bitsandbytes, ZeRO-3 with CPU offload, the DPO reference pass, /dev/shm in
# a Ray GPU worker (with NCCL), then the throughput benchmark. docs/gpu.md says what
# each proves and holds the figures.
#
#   bash scripts/gpu-check.sh                 # all checks
#   bash scripts/gpu-check.sh qlora dpo       # some of: lora-bf16 qlora zero3-offload dpo shm throughput
#
# Needs the trainer's environment (scripts/setup.sh with the trainer extra, plus
# bitsandbytes for QLoRA) on a machine with an NVIDIA GPU. Without CUDA it stops at
# once, exit status 3. Results: $KUBETUNE_GPU_OUT (default .cache/gpu-check):
# results.jsonl (one line per check), throughput.txt, and summary.md (the table
# docs/gpu.md takes).
#
# Settings (environment): PYTHON (default .venv/bin/python, else python3),
# KUBETUNE_GPU_OUT, KUBETUNE_GPU_CHECK_LIMIT (seconds per check, default 65;
# the throughput benchmark gets twice that).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
[ -x "$py" ] || py=python3
out=${KUBETUNE_GPU_OUT:-.cache/gpu-check}
limit=${KUBETUNE_GPU_CHECK_LIMIT:-65}
all=(lora-bf16 qlora zero3-offload dpo shm throughput)
checks=("$@")
[ ${#checks[@]} -gt 0 ] || checks=("${all[@]}")
for c in "${checks[@]}"; do
  case " ${all[*]} " in
    *" $c "*) ;;
    *) echo "gpu-check: unknown check '$c': choose from ${all[*]}" >&2; exit 2 ;;
  esac
done

export PYTHONPATH="$PWD/operator:$PWD/trainer${PYTHONPATH:+:$PYTHONPATH}"
if ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu-check: no CUDA device: torch.cuda.is_available() is False for $py (or torch is missing)." >&2
  echo "gpu-check: run it on a machine with an NVIDIA GPU and the trainer's environment." >&2
  exit 3
fi
"$py" -c 'import ray, deepspeed, peft' || {
  echo "gpu-check: $py lacks the trainer's packages: bash scripts/setup.sh (trainer extra)" >&2
  exit 3
}
mkdir -p "$out"
: >"$out/results.jsonl"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$out/gpu.txt" 2>&1 || true
start=$(date +%s)
failed=0
for c in "${checks[@]}"; do
  t0=$(date +%s)
  if [ "$c" = throughput ]; then
    # the benchmark prints its own comparison table
    if timeout $((2 * limit)) "$py" benchmarks/throughput.py --steps 6 >"$out/throughput.txt" 2>&1; then
      echo "{\"check\": \"throughput\", \"ok\": true, \"seconds\": $(($(date +%s) - t0))}" >>"$out/results.jsonl"
    else
      echo "{\"check\": \"throughput\", \"ok\": false, \"seconds\": $(($(date +%s) - t0))}" >>"$out/results.jsonl"
      failed=1
    fi
  elif ! timeout "$limit" "$py" scripts/gpu_check.py "$c" "$out"; then
    grep -q "\"check\": \"$c\"" "$out/results.jsonl" ||
      echo "{\"check\": \"$c\", \"ok\": false, \"error\": \"timed out or crashed\", \"seconds\": $(($(date +%s) - t0))}" >>"$out/results.jsonl"
    failed=1
  fi
  echo "gpu-check: $c done in $(($(date +%s) - t0))s" >&2
done

"$py" - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines() if x.strip()]
gpu = (out / "gpu.txt").read_text().strip() if (out / "gpu.txt").exists() else "?"
lines = [f"GPU: {gpu}", "", "| check | ok | seconds | tokens/s | first → last loss | notes |",
         "| --- | --- | --- | --- | --- | --- |"]
for r in rows:
    loss = f"{r['first_loss']:.3f} → {r['last_loss']:.3f}" if "first_loss" in r else ""
    notes = r.get("error") or ", ".join(f"{k}={r[k]}" for k in ("shm_bytes", "write_1gib_s", "nccl_sum", "bitsandbytes") if k in r)
    lines.append(f"| {r['check']} | {'yes' if r['ok'] else 'NO'} | {r['seconds']} | {r.get('tokens_per_s', '')} | {loss} | {notes} |")
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
echo "gpu-check: all done in $(($(date +%s) - start))s; results in $out" >&2
exit $failed
