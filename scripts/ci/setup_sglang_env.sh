#!/usr/bin/env bash
# Build the SGLang test environment: a venv with SGLang (which pins its own torch and transformers, hence a venv of
# its own), this repository installed editable with its test extras, and, on a machine without an NVIDIA driver, a
# stub libcuda.so.1 so that SGLang's CUDA-built kernel package can be imported (every call answers "no device").
#
#   bash scripts/ci/setup_sglang_env.sh VENV_DIR
#   . VENV_DIR/bin/activate            # also puts the stub on LD_LIBRARY_PATH (see the end of the script)
#   python -m pytest tests/workers/rollout/sglang
#
# Measured on the 2-core CI machine: ~3.5 min and ~11 GB, almost all of it `pip install sglang`.
set -euo pipefail
VENV=${1:?usage: setup_sglang_env.sh VENV_DIR}
SGLANG_VERSION=${SGLANG_VERSION:-0.5.23}
MEGATRON_CORE_VERSION=0.16.1  # the Megatron actor feeding SGLang (tests/workers/rollout/sglang/test_megatron_sglang.py)
cd "$(dirname "$0")/../.."
start=$(date +%s)

if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
VENV=$(cd "$VENV" && pwd)
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install --quiet --upgrade pip
# SGLang first: it brings the torch (CUDA build) and transformers versions it is built against; our install below
# accepts them (setup.py does not pin torch).
python -m pip install --quiet "sglang==${SGLANG_VERSION}"
python -m pip install --quiet -e ".[test]" "megatron-core==${MEGATRON_CORE_VERSION}"
echo "== pip done in $(( $(date +%s) - start ))s"

if ! ldconfig -p 2>/dev/null | grep -q 'libcuda\.so\.1 '; then
    stub_dir="$VENV/lib/libcuda-stub"
    mkdir -p "$stub_dir"
    gcc -shared -fPIC -O2 -o "$stub_dir/libcuda.so.1" scripts/ci/libcuda_stub.c
    marker="# verl: stub libcuda for SGLang on machines without an NVIDIA driver"
    if ! grep -qF "$marker" "$VENV/bin/activate"; then
        {
            echo "$marker"
            echo "export LD_LIBRARY_PATH=\"$stub_dir\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}\""
            echo "export SGLANG_USE_CPU_ENGINE=1"
        } >>"$VENV/bin/activate"
    fi
    export LD_LIBRARY_PATH="$stub_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export SGLANG_USE_CPU_ENGINE=1
    echo "== no NVIDIA driver: built $stub_dir/libcuda.so.1 (on LD_LIBRARY_PATH after activating the venv)"
fi

python -m pip check
python - <<'PY'
import megatron.core  # noqa: F401
import sgl_kernel  # noqa: F401  (loads libcuda.so.1)
import sglang
import torch
import transformers

import verl
from verl.workers.rollout import get_rollout_class

get_rollout_class("sglang")
print(f"== sglang {sglang.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
      f"verl {verl.__version__}")
PY
echo "== SGLang environment ready in $(( $(date +%s) - start ))s: . $VENV/bin/activate"
