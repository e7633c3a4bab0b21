#!/usr/bin/env bash
# One device call for the torch engine on a GPU: correctness and in-process speed beside
# transformers (engine_bench.py), then the same model served through a real neuron agent and
# tritonserver (engine_on_triton.sh). Carry .gpu (setup_device.sh says what it holds).
#   bash benchmarks/gpu/engine_profile.sh            # from the repository root, OUT set
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 benchmarks/gpu/engine_bench.py ${ENGINE_BENCH_ARGS:-} > /tmp/engine_bench.log 2>&1
bash benchmarks/gpu/engine_on_triton.sh > /tmp/triton.log 2>&1
bash benchmarks/gpu/prefix_on_gpu.sh > "$OUT/prefix_gpu.log" 2>&1
