#!/usr/bin/env bash
# clipforge's GPU benchmark on one CUDA GPU: a few minutes on an H100 (capped at 8 + 1.5), installs nothing.
#   encode: bf16 weights, SDPA flash attention, ViT-B/32, ViT-B/16 and RN50 at batch 1, 64 and 256
#   train:  ViT-B/32 and ViT-B/16, batch 256, bf16 autocast + fused AdamW: samples/s and model-FLOPs
#           utilisation (FlopCounterMode FLOPs per step over the measured bf16 matmul peak)
#   layernorm: bench/bench_layernorm.py, the fp32 round trip of clipforge's LayerNorm vs the native
#           kernel in a bf16 ViT-B/32 (results in $OUT/layernorm_ab.json)
# OpenCLIP and transformers are compared where importable (point PYTHONPATH at them if they live
# elsewhere); without them clipforge is benchmarked alone and the output says so.
# Results: $OUT/gpu_bench.json (default OUT: ./bench_out). Extra arguments go to bench/run.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$ROOT/bench_out}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu.sh: torch sees no CUDA GPU; run bench/run.py for the CPU benchmark instead")
print(f"gpu.sh: {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
PY
timeout "${GPU_BENCH_TIMEOUT:-480}" "$PYTHON" "$ROOT/bench/run.py" --gpu --parts encode train \
    --json "$OUT/gpu_bench.json" "$@"
timeout "${GPU_LN_TIMEOUT:-90}" "$PYTHON" "$ROOT/bench/bench_layernorm.py" --model ViT-B-32 --dtype bf16 \
    --batch-sizes 1 64 256 --json "$OUT/layernorm_ab.json"
