#!/usr/bin/env bash
# One-shot GPU check of peft-export: the GPU tests, training cost (vit_b, LoRA all vs late:1, fp32/bf16/fp16),
# PyTorch encoder latency merged vs unmerged, ONNX Runtime CUDA and TensorRT — one JSON file, under 8 minutes.
# Each part is skipped with its reason when what it needs is missing (see benchmarks/gpu_check.py).
#
#   bash benchmarks/gpu_check.sh                              # writes gpu_check.json
#   bash benchmarks/gpu_check.sh --out /tmp/g.json --parts train,encoder
#   bash benchmarks/gpu_check.sh --cpu-dry-run --out x.json   # no GPU: the skip paths and the JSON (tested in CI)
#
# Needs python3 with PyTorch (CUDA) and numpy, and this checkout's dependencies; PYTHON=... picks the interpreter.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# a hard stop at 8 minutes; the JSON is rewritten after each part, so what finished stays
exec timeout --signal=TERM --kill-after=15 "${GPU_CHECK_TIMEOUT_S:-480}" "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
