#!/usr/bin/env bash
# Download into .whl/ exactly the wheels the lent GPU machine lacks (its image: Python 3.12, torch 2.11 + CUDA 13,
# transformers, accelerate, safetensors, pillow, numpy, pyyaml, httpx, pytest, einops, psutil, ... -- see the device
# library's KINDS.md), for CPython 3.12 manylinux x86-64, at the versions this checkout's .venv tests with:
#   diffusers (+ importlib_metadata), pydantic (+ pydantic_core, annotated_types, typing_inspection,
#   typing_extensions), deepspeed (+ hjson; sdist only on PyPI, so built here into a pure-Python wheel without ops),
#   av (PyAV, for the clip's mux; about 36 MB).
# The device call carries .whl (git-ignored; ~48 MB of the 64 MiB a call may carry) and scripts/gpu_session.sh
# installs it. Run once, here:  bash scripts/fetch_device_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
version() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
for name in diffusers importlib_metadata pydantic pydantic_core annotated_types typing_inspection typing_extensions \
            hjson av; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d .whl "$name==$(version "$name")"
done
ds=$(version deepspeed)
if ! ls .whl/deepspeed-"$ds"-*.whl >/dev/null 2>&1; then
  tmp=$(mktemp -d)
  "$PY" -m pip download -q --no-deps --no-binary=:all: -d "$tmp" "deepspeed==$ds"
  # pure Python: no ops are compiled (DeepSpeed JIT-builds any it needs; we use none)
  DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl "$tmp"/deepspeed-"$ds".tar.gz
  rm -rf "$tmp"
fi
ls -la .whl
du -sh .whl
