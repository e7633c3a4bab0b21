#!/usr/bin/env bash
# On a lent GPU machine (Python 3.12 image with torch, NumPy 2.x): unpack the Triton binary
# carried from the nvidia-pytriton wheel, and make a venv whose NumPy is 1.26 (what the
# Python-backend stub needs; gpu_notes.md) on top of the image's own packages.
set -euo pipefail
CARRY=${CARRY:-.gpu}
ROOT=/tmp/cortex-gpu
mkdir -p $ROOT/triton
tar -C $ROOT/triton -xJf $CARRY/triton.tar.xz
cp $ROOT/triton/tritonserver/python_backend_stubs/3.12/triton_python_backend_stub $ROOT/triton/tritonserver/backends/python/
IMAGE_PY=$(command -v python3)
IMAGE_SITE=$($IMAGE_PY -c 'import site; print(site.getsitepackages()[0])')
$IMAGE_PY -m venv --without-pip $ROOT/venv
SITE=$($ROOT/venv/bin/python3 -c 'import site; print(site.getsitepackages()[0])')
$IMAGE_PY -m pip install -q --no-index --no-deps --no-compile --target $SITE $CARRY/whl/*.whl
printf '%s\n%s\n' "$PWD" "$IMAGE_SITE" > $SITE/cortex-image.pth
LIBPY=$(dirname "$(find / -name 'libpython3.12*.so.1.0' 2>/dev/null | head -1)")
echo "export PATH=$ROOT/venv/bin:\$PATH LD_LIBRARY_PATH=$ROOT/triton/libs:$LIBPY:\${LD_LIBRARY_PATH:-}" > $ROOT/env.sh
echo "triton at $ROOT/triton/tritonserver/bin/tritonserver; libpython in $LIBPY"
