#!/usr/bin/env bash
# The torch engine serving a Llama-3.1-8B-shaped model (random bf16 weights) through a real
# neuron agent and tritonserver, in bf16 and in fp8; throughput at 1/8/32/64 concurrent streams
# (the same workload as engine_bench.py's in-process rows); the neuron's /status (NVML) before,
# during and after; copy bandwidth. Run by engine_profile.sh.
set -uo pipefail
OUT=${OUT:-/tmp/out}
FINAL=$OUT; OUT=/tmp/cortex-gpu/results; mkdir -p $OUT
[ -x /tmp/cortex-gpu/venv/bin/python3 ] || bash benchmarks/gpu/setup_device.sh > $OUT/setup.log 2>&1 || { cat $OUT/setup.log; exit 1; }
source /tmp/cortex-gpu/env.sh
python3 -c 'import numpy, torch, sanic, tritonclient.grpc; print("numpy", numpy.__version__, "torch", torch.__version__)'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $OUT/nvidia-smi.csv
python3 benchmarks/gpu/copy_bandwidth.py | tee $OUT/bandwidth.json
[ -f /tmp/ckpt-llama-3.1-8b/config.json ] || python3 benchmarks/random_checkpoint.py --shape llama-3.1-8b --out /tmp/ckpt-llama-3.1-8b
W=/tmp/cortex-gpu/node; mkdir -p $W
python3 -m cortex.launch neuron-config $W \
  --set neuron.name=h100 --set neuron.listen=127.0.0.1:13131 --set neuron.state_dir=$W/state \
  --set triton.binary=/tmp/cortex-gpu/triton/tritonserver/bin/tritonserver --set triton.address=127.0.0.1 \
  --model "name=llama8b-bf16 source=/tmp/ckpt-llama-3.1-8b dtype=bfloat16 max_batch_size=64 kv_cache_tokens=65536" \
  --model "name=llama8b-fp8 source=/tmp/ckpt-llama-3.1-8b dtype=bfloat16 quantization=fp8 max_batch_size=64 kv_cache_tokens=65536" \
  || { echo "could not write the neuron's config"; exit 1; }
python3 -m cortex.cli neuron --config $W/neuron.toml > $OUT/neuron.log 2>&1 &
for i in $(seq 1 120); do curl -sf 127.0.0.1:13131/health >/dev/null && break; sleep 1; done
curl -s 127.0.0.1:13131/status > $OUT/status_idle.json; python3 -c "import json; d=json.load(open('$OUT/status_idle.json')); print('has_gpu', d['has_gpu'], [(g['name'], g['memory_total_bytes'], g['memory_used_bytes']) for g in d['gpus']])"
for model in llama8b-bf16 llama8b-fp8; do
  T0=$(date +%s.%N)
  curl -s -XPOST 127.0.0.1:13131/models/load -d "{\"model\": \"$model\"}" | tee $OUT/load_$model.json; echo
  echo "load wall $(python3 -c "print(round($(date +%s.%N) - $T0, 1))") s"
  curl -s 127.0.0.1:13131/status > $OUT/status_$model.json
  timeout 300 python3 benchmarks/engine_throughput.py --model $model --concurrency 1 1 8 8 32 32 64 64 --prompt-tokens 128 --output-tokens 256 | tee -a $OUT/throughput.jsonl
  curl -s -XPOST 127.0.0.1:13131/models/unload -d "{\"model\": \"$model\"}" | tee $OUT/unload_$model.json; echo
done
curl -s 127.0.0.1:13131/status > $OUT/status_after.json
kill %1; wait %1  # the agent stops its tritonserver before it exits: the ports are free after
tail -c 20000 $W/state/tritonserver.log > $OUT/tritonserver.log
cp $OUT/throughput.jsonl $FINAL/ 2>/dev/null
(cd $OUT && tail -n +1 *.json *.csv *.log) > $FINAL/triton_results.txt 2>&1
