#!/usr/bin/env bash
# Format the repository with yapf (style in .style.yapf). `--check` exits non-zero if anything would change.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGETS=(verl tests recipe examples scripts benchmarks setup.py)
existing=()
for t in "${TARGETS[@]}"; do [ -e "$t" ] && existing+=("$t"); done
if [ "${1:-}" = "--check" ]; then
    if ! out=$(python -m yapf --diff --recursive --parallel "${existing[@]}"); then
        echo "$out" | head -200
        echo "yapf: the files above are not formatted; run: bash scripts/format.sh" >&2
        exit 1
    fi
    if [ -n "$out" ]; then
        echo "$out" | head -200
        echo "yapf: the files above are not formatted; run: bash scripts/format.sh" >&2
        exit 1
    fi
    echo "yapf: all files formatted"
else
    python -m yapf --in-place --recursive --parallel "${existing[@]}"
fi
