#!/usr/bin/env bash
# Prefix caching on a GPU (issue 16): the Llama-3.1-8B-shaped model (random bf16 weights, with
# cortex-tiny's tokenizer files beside them so the gateway can render Claude Code's prompts)
# served twice by one neuron — prefix caching on and off — behind a gateway, and
# benchmarks/prefix_cache.py's Claude-Code-shaped trace through it. Run after
# engine_on_triton.sh in the same call (it reuses its setup); carry .gpu (tokenizer/ included).
set -uo pipefail
OUT=${OUT:-/tmp/out}
[ -x /tmp/cortex-gpu/venv/bin/python3 ] || bash benchmarks/gpu/setup_device.sh > /tmp/cortex-gpu-setup.log 2>&1 \
  || { cat /tmp/cortex-gpu-setup.log; exit 1; }
source /tmp/cortex-gpu/env.sh
CKPT=/tmp/ckpt-llama-3.1-8b
[ -f $CKPT/config.json ] || python3 benchmarks/random_checkpoint.py --shape llama-3.1-8b --out $CKPT
cp .gpu/tokenizer/* $CKPT/
W=/tmp/cortex-gpu/prefix; mkdir -p $W
python3 -m cortex.launch neuron-config $W \
  --set neuron.name=h200 --set neuron.listen=127.0.0.1:13141 --set neuron.state_dir=$W/state \
  --set triton.binary=/tmp/cortex-gpu/triton/tritonserver/bin/tritonserver --set triton.address=127.0.0.1 \
  --set triton.http_port=8100 --set triton.grpc_port=8101 --set triton.metrics_port=8102 \
  --model "name=llama8b source=$CKPT dtype=bfloat16 kv_cache_tokens=131072" \
  --model "name=llama8b-nocache source=$CKPT dtype=bfloat16 kv_cache_tokens=131072 prefix_caching=false" \
  && python3 -m cortex.launch gateway-config $W/cortex.toml \
  --set gateway.listen=127.0.0.1:31323 --set gateway.metrics_listen=127.0.0.1:31324 \
  --neuron h200=http://127.0.0.1:13141 \
  || { echo "could not write the configs"; exit 1; }
python3 -m cortex.cli neuron --config $W/neuron.toml > $W/neuron.log 2>&1 &
NEURON=$!
for i in $(seq 1 120); do curl -sf 127.0.0.1:13141/health >/dev/null && break; sleep 1; done
curl -sf 127.0.0.1:13141/health >/dev/null || { echo "the neuron did not come up"; tail -20 $W/neuron.log; exit 1; }
for model in llama8b llama8b-nocache; do
  curl -s -XPOST 127.0.0.1:13141/models/load -d "{\"model\": \"$model\"}"; echo
done
# The gateway and the client under the image's own python3 and NumPy 2 (the stub's NumPy-1.26 venv cannot
# import transformers' AutoTokenizer on that image: seen 2026-12-01), with the carried wheels
# but NumPy on its path.
IMAGE_PY=$(PATH=${PATH#*:} command -v python3)
SITE=/tmp/cortex-gpu/client-site
[ -d $SITE ] || "$IMAGE_PY" -m pip install -q --no-index --no-deps --no-compile --target $SITE \
  $(ls .gpu/whl/*.whl | grep -v numpy)
PYTHONPATH=$SITE:$PWD "$IMAGE_PY" -m cortex.cli serve --config $W/cortex.toml > $W/gateway.log 2>&1 &
GATEWAY=$!
for i in $(seq 1 60); do curl -sf 127.0.0.1:31323/health >/dev/null && break; sleep 1; done
sleep 3
# One token per request: the random model's ids mostly decode to no text with cortex-tiny's
# tokenizer, so the end of a request is the only sign of its first token.
PYTHONPATH=$SITE:$PWD timeout 300 "$IMAGE_PY" -m benchmarks.prefix_cache --url http://127.0.0.1:31323 --model llama8b \
  --model-off llama8b-nocache --tokenizer $CKPT --max-tokens 1 --out $OUT/prefix_cache_gpu.json 2>&1 | tail -40
kill $GATEWAY; kill $NEURON; sleep 3
(tail -n 30 $W/gateway.log; tail -n 30 $W/neuron.log) > $OUT/prefix_servers.log 2>&1
