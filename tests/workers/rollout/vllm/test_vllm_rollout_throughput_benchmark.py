"""``benchmarks/rollout_throughput.py --backends hf,vllm`` at its smallest size: the vllm rollout is built, fed the
HF model's weights through its sharding manager, generates exactly --response-length tokens per row, and the table
has a row for both backends with positive rates. Needs the real engine (its own venv); skipped without it."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import pytest

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vllm is not installed; run this in its venv (bash scripts/ci/setup_vllm_env.sh .venv-vllm)",
                allow_module_level=True)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))


def test_rollout_throughput_benchmark_runs_hf_and_vllm():
    cmd = [
        sys.executable,
        os.path.join(REPO, "benchmarks", "rollout_throughput.py"), "--backends", "hf,vllm", "--batch", "4",
        "--prompt-length", "8", "--response-length", "8", "--repeats", "1"
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = dict(re.findall(r"^\| (hf|vllm) \|.*\| ([\d,]+) \| [^|]+ \|$", proc.stdout, re.MULTILINE))
    assert set(rows) == {"hf", "vllm"}, proc.stdout
    assert all(int(rate.replace(",", "")) > 0 for rate in rows.values()), proc.stdout
