"""Peak memory and time of the actor's log-prob head: ``logprobs_and_entropy_from_logits`` forward and backward on
one micro-batch of logits, the step of the PPO update whose memory grows with the vocabulary.

Three ways the update can call it:

* ``log-probs``: log-probs only (``calculate_entropy=False``);
* ``metrics entropy``: log-probs with grad and the entropy for the ``actor/entropy`` metric only (the update's path
  when ``actor.entropy_coeff=0``, the GRPO default);
* ``entropy loss``: log-probs and entropy both with grad (``entropy_coeff != 0``).

Each runs in a fresh process: on CPU the peak is the process's peak RSS above what it held once the logits existed,
on CUDA ``max_memory_allocated`` above the same point. The logits are ``--rows`` x ``--vocab`` in ``--dtype``
(default: one micro-batch of the GPU GRPO benchmark, 16 rows x 256 response tokens of Qwen2.5's 151,936-token
vocabulary, in bf16).

    python benchmarks/logprob_head.py                                  # CPU (about 10 GB of RAM at the default)
    python benchmarks/logprob_head.py --rows 1024 --out head.json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness as h  # noqa: E402

MODES = {
    "log-probs": {
        "calculate_entropy": False,
        "entropy_grad": False
    },
    "metrics entropy": {
        "calculate_entropy": True,
        "entropy_grad": False
    },
    "entropy loss": {
        "calculate_entropy": True,
        "entropy_grad": True
    },
}


def _parse(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=16 * 256, help="positions in the micro-batch")
    parser.add_argument("--vocab", type=int, default=151936, help="vocabulary size")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="dtype of the logits")
    parser.add_argument("--repeats", type=int, default=3, help="forward+backward passes per mode (median time)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    return parser.parse_args(argv)


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    """One mode in this (fresh) process."""
    import torch

    from verl.workers.actor.dp_actor import logprobs_and_entropy_from_logits

    device, mode = spec["device"], MODES[spec["mode"]]
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(spec["rows"], spec["vocab"], generator=gen).to(getattr(torch, spec["dtype"])).to(device)
    logits.requires_grad_()
    labels = torch.randint(0, spec["vocab"], (spec["rows"],), generator=gen).to(device)

    def peak_bytes() -> int:
        if device == "cuda":
            return torch.cuda.max_memory_allocated()
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux

    # first-call allocations (kernels, thread pools) happen before the base is taken
    warm = logits[:2].detach().clone().requires_grad_()
    logprobs_and_entropy_from_logits(warm, labels[:2], **mode)[0].sum().backward()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if device == "cuda" else peak_bytes()
    times = []
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        log_probs, entropy = logprobs_and_entropy_from_logits(logits, labels, **mode)
        loss = log_probs.sum()
        if entropy is not None and mode["entropy_grad"]:
            loss = loss - 0.01 * entropy.sum()
        loss.backward()
        logits.grad = None
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"peak_gb": (peak_bytes() - base) / 1e9, "s": sorted(times)[len(times) // 2]}


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = _parse(argv)
    if args.rows < 1 or args.vocab < 2 or args.repeats < 1:
        raise ValueError("--rows and --repeats must be >= 1 and --vocab >= 2")
    device = h.resolve_device(args.device)
    env = h.environment_info(device)
    fp32_copy_gb = args.rows * args.vocab * 4 / 1e9
    print(
        f"device: {device}; logits {args.rows} x {args.vocab} {args.dtype} (a float32 copy is {fp32_copy_gb:.2f} GB); "
        f"{args.repeats} forward+backward passes per mode, each mode in a fresh process",
        flush=True)
    results = {}
    for name in MODES:
        spec = {
            "mode": name,
            "rows": args.rows,
            "vocab": args.vocab,
            "dtype": args.dtype,
            "device": device,
            "repeats": args.repeats
        }
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child",
                               json.dumps(spec)],
                              capture_output=True,
                              text=True,
                              timeout=1800,
                              cwd=h.REPO_ROOT)
        if proc.returncode != 0:
            raise RuntimeError(f"mode {name!r} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"  {name}: peak {results[name]['peak_gb']:.2f} GB above the logits, {results[name]['s']:.3f} s",
              flush=True)
    memory = "process peak RSS" if device == "cpu" else "torch.cuda.max_memory_allocated"
    print(f"\n### Log-prob head, forward + backward ({device}, {args.rows} x {args.vocab} {args.dtype})\n")
    print(
        h.markdown_table(["mode", f"peak GB above the logits ({memory})", "x float32 copies", "s (median)"],
                         [[name, r["peak_gb"], r["peak_gb"] / fp32_copy_gb, r["s"]] for name, r in results.items()]))
    payload = {
        "benchmark": "logprob_head",
        "rows": args.rows,
        "vocab": args.vocab,
        "dtype": args.dtype,
        "fp32_copy_gb": fp32_copy_gb,
        "environment": env,
        "results": results
    }
    h.write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        sys.path.insert(0, h.REPO_ROOT)
        print(json.dumps(_child(json.loads(sys.argv[2]))))
    else:
        main()
