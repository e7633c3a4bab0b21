#!/usr/bin/env bash
# The engine in-process (no Triton) on a Llama-3.1-8B-shaped model, bf16 and fp8, with a
# profile of batch-1 decode; then the same through Triton for comparison in one run.
set -uo pipefail
OUT=${OUT:-/tmp/out}
[ -x /tmp/cortex-gpu/venv/bin/python3 ] || bash benchmarks/gpu/setup_device.sh > $OUT/setup.log 2>&1
source /tmp/cortex-gpu/env.sh
[ -f /tmp/llama8b/config.json ] || python3 benchmarks/random_checkpoint.py --shape llama-3.1-8b --out /tmp/llama8b
python3 benchmarks/gpu/engine_in_process.py --checkpoint /tmp/llama8b --profile $OUT/profile_bf16.txt | tee $OUT/in_process.jsonl
python3 benchmarks/gpu/engine_in_process.py --checkpoint /tmp/llama8b --quantization fp8 | tee -a $OUT/in_process.jsonl
bash benchmarks/gpu/engine_on_triton.sh
