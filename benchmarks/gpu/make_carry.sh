#!/usr/bin/env bash
# Here (a machine with pip and PyPI), from the repository root: make .gpu, what a GPU device
# call carries (about 54 MB of the 64 MiB it may): the Triton binary from the nvidia-pytriton
# wheel without its bundled libpython (triton.tar.xz), the wheels the GPU image lacks for the
# neuron agent, the gateway, the Python stub (NumPy 1.26; reference/gpu_notes.md) and the config
# writer the GPU scripts call (`python -m cortex.launch`, tomli-w), and
# cortex-tiny's tokenizer files (benchmarks/gpu/prefix_on_gpu.sh puts them beside the random 8B
# checkpoint). Then: device run with carry [".gpu"], `bash benchmarks/gpu/engine_profile.sh`.
set -euo pipefail
PY=${PY:-.venv/bin/python}
DEST=${DEST:-.gpu}
W=$(mktemp -d)
get() {
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_35_x86_64 --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$1" "${@:2}"
}
mkdir -p "$DEST"/whl "$DEST"/tokenizer
get "$W/pytriton" nvidia-pytriton==0.7.0
(cd "$W" && unzip -q pytriton/*.whl && mkdir -p pack/tritonserver/python_backend_stubs pack/libs \
  && cp -r pytriton/tritonserver/{bin,backends,caches} pack/tritonserver/ \
  && cp -r pytriton/tritonserver/python_backend_stubs/3.12 pack/tritonserver/python_backend_stubs/ \
  && cp nvidia_pytriton.libs/* pack/libs/ && rm pack/libs/libpython3-*)
tar -C "$W/pack" -cJf "$DEST"/triton.tar.xz tritonserver libs
pins() { grep -i "^$1==" constraints.txt | head -1; }
for name in numpy pydantic pydantic_core annotated-types typing-inspection sanic sanic-routing \
  httptools uvloop aiofiles websockets html5tagger tracerite tritonclient python-rapidjson \
  protobuf apscheduler tzlocal tomli-w; do
  get "$DEST"/whl "$(pins "$name" || echo "$name")"
done
TINY=$("$PY" -c "from cortex.demo.tiny_model import ensure_tiny_model; print(ensure_tiny_model())")
cp "$TINY"/tokenizer.json "$TINY"/tokenizer_config.json "$TINY"/chat_template.jinja "$DEST"/tokenizer/
rm -rf "$W"
du -sh "$DEST"
