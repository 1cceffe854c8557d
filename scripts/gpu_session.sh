#!/usr/bin/env bash
# ONE command for a lent GPU machine (device library): install the carried wheels, then run every measurement of
# benchmarks/gpu_session.py under a session budget that fits the device's command limit (540 s here), results in
# $OUT as they arrive and a short table last. From this machine, once `bash scripts/fetch_device_wheels.sh` filled
# .whl/:   device run  command="bash scripts/gpu_session.sh"  carry=[".whl"]  timeout_s=560
# On a CPU (what CI runs):  PYTHON=.venv/bin/python bash scripts/gpu_session.sh --device cpu --smoke
# Extra arguments go to the driver (e.g. --only gemm,transformer, --layers 12, --budget 300).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
OUT=${OUT:-$PWD/gpu-session-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
began=$(date +%s)
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  site=$(mktemp -d /tmp/imagine-site.XXXXXX)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$WHEELS"/*.whl \
    || { echo "installing the carried wheels failed" >&2; exit 1; }
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the checkout is not installed there: import it from here
{
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  "$PY" - <<'PY'
import importlib.metadata as m
import platform
import torch
names = ("torch", "diffusers", "transformers", "pydantic", "deepspeed", "av", "accelerate")
def version(name):
    try:
        return m.version(name)
    except m.PackageNotFoundError:
        return "absent"
print("python", platform.python_version(), "|", ", ".join(f"{n} {version(n)}" for n in names))
print("cuda", torch.version.cuda, "| devices", torch.cuda.device_count(),
      "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA")
PY
} 2>&1 | tee "$OUT/device.txt"
budget=${BUDGET:-$((500 - ($(date +%s) - began)))}
"$PY" benchmarks/gpu_session.py --out "$OUT" --budget "$budget" "$@" 2>&1 | tee "$OUT/session.log"
exit "${PIPESTATUS[0]}"
