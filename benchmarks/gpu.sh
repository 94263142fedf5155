#!/usr/bin/env bash
# The issue-5 benchmark table in one run on one CUDA GPU; prints the table last.
#
# Needs torch, timm and triton (the GPU image has them) and these wheels in ./.whl, which it
# installs with --no-index --no-deps into /tmp/site (nothing else is missing from the image):
#   diffusers-0.42.1-py3-none-any.whl
#   tomesd-0.1.3-py3-none-any.whl
# Download them (on a machine with network) from the repository root:
#   for w in diffusers==0.42.1 tomesd==0.1.3; do
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$w"
#   done
#
# Usage (repository root):
#   bash benchmarks/gpu.sh              # GPU: about 7 minutes including every compile; JSON and PNGs to $OUT (or ./out)
#   bash benchmarks/gpu.sh --dry-run    # CPU: tiny configs through every code path
#   bash benchmarks/gpu.sh --set modern --budget 540             # Flux.1-dev, SD3.5 Medium, Wan 2.1 1.3B; bf16
#   bash benchmarks/gpu.sh --sections flux-dev-1024 wan-1.3b-480p  # the two speed targets only
#   bash benchmarks/gpu.sh --set modern --dry-run                 # CPU: their tiny configs
# Extra arguments go to benchmarks/gpu_table.py (--set, --sections NAME..., --backend, --repeats, --budget, --out).
set -euo pipefail
cd "$(dirname "$0")/.."

if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "note: no wheels in ./.whl; using the installed diffusers/tomesd if any" >&2
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
# Quiet the Hugging Face libraries (nothing is downloaded: every model is built from a config).
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DIFFUSERS_VERBOSITY=error TRANSFORMERS_VERBOSITY=error

python3 - <<'PY'
import importlib, sys
for name in ("torch", "diffusers", "timm", "tomesd", "triton", "tokenmerge"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')} from {getattr(module, '__file__', '?')}")
    except Exception as error:  # report and go on: the table marks what could not run
        print(f"{name}: NOT importable ({type(error).__name__}: {error})", file=sys.stderr)
import torch
print("cuda:", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PY

exec python3 benchmarks/gpu_table.py "$@"
