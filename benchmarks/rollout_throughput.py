"""Generation throughput of the rollout backends on the same batch: the HF ``generate`` rollout, the vLLM rollout and
the SGLang rollout (whichever are importable here: vLLM and SGLang each live in their own venv), on CPU or GPU.

Every row generates exactly ``--response-length`` tokens (``ignore_eos``), sampled at temperature 1, so tokens/s is
``batch * response_length / seconds`` for both. The vLLM engine gets its weights from the HF model through the
hybrid engine's sharding manager (as in training); engine start and weight sync are reported apart from generation.
The SGLang engine (``--backends sglang``, in the venv of ``scripts/ci/setup_sglang_env.sh``) is fed the same way.

    python benchmarks/rollout_throughput.py                       # tiny model, 64 prompts x 64 new tokens
    python benchmarks/rollout_throughput.py --batch 128 --backends vllm --model /path/to/hf_model

vLLM runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``); on CPU use ``--threads 1`` per core you give it
(the default, 1, is fastest for tiny models on a shared 2-core machine).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import time


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF model directory (default: the built-in tiny model)")
    parser.add_argument("--batch", type=int, default=64, help="prompts per batch")
    parser.add_argument("--prompt-length", type=int, default=32, help="tokens per prompt")
    parser.add_argument("--max-prompt-length",
                        type=int,
                        default=None,
                        help="left-pad every prompt to this many positions, as the dataset pads to "
                        "data.max_prompt_length (default: --prompt-length, no padding)")
    parser.add_argument("--response-length", type=int, default=64, help="new tokens per prompt")
    parser.add_argument("--backends", default="hf,vllm,sglang", help="comma-separated: hf, vllm, sglang")
    parser.add_argument("--repeats", type=int, default=3, help="timed generations per backend (after one warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads (CPU)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def _prompts(batch: int, length: int, vocab: int, pad: int, seed: int, padded_length: int):
    import numpy as np
    import torch

    from verl.protocol import DataProto
    from verl.utils.torch_functional import compute_position_id_with_mask

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    raw = np.empty(batch, dtype=object)
    raw[:] = [row.tolist() for row in ids]
    ids = torch.nn.functional.pad(ids, (padded_length - length, 0), value=pad)
    mask = (torch.arange(padded_length) >= padded_length - length).long().expand(batch, -1).contiguous()
    return DataProto.from_dict(
        {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": compute_position_id_with_mask(mask)
        },
        non_tensors={"raw_prompt_ids": raw},
        meta_info={
            "eos_token_id": None,
            "pad_token_id": pad
        })


def _time_generate(generate, prompts, repeats: int) -> list[float]:
    generate(prompts)  # warm-up (first-call allocations, lazy kernels)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = generate(prompts)
        times.append(time.perf_counter() - start)
        assert out.batch["responses"].shape[1] == prompts.meta_info["response_length"]
    return times


def main() -> None:
    args = _parse()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from verl.models.tiny import get_tiny_model_path
    from verl.utils.device import get_device, is_cuda_available

    torch.set_num_threads(args.threads)
    path = args.model or get_tiny_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    dtype = torch.bfloat16 if is_cuda_available() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(get_device())
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    padded_length = args.max_prompt_length or args.prompt_length
    if padded_length < args.prompt_length:
        raise SystemExit(f"--max-prompt-length {padded_length} is shorter than --prompt-length {args.prompt_length}")
    prompts = _prompts(args.batch, args.prompt_length, int(model.config.vocab_size), pad, args.seed, padded_length)
    prompts.meta_info["response_length"] = args.response_length
    config = {
        "prompt_length": args.prompt_length,
        "response_length": args.response_length,
        "ignore_eos": True,
        "do_sample": True,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": -1,
        "seed": args.seed,
        "max_num_seqs": max(256, args.batch),
        "dtype": "bfloat16" if is_cuda_available() else "float32",
    }
    tokens = args.batch * args.response_length
    rows = []
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        if backend == "hf":
            from verl.workers.rollout.hf import HFRollout

            start = time.perf_counter()
            rollout = HFRollout(model, config, tokenizer=tokenizer)
            init = time.perf_counter() - start
            times = _time_generate(rollout.generate_sequences, prompts, args.repeats)
            rows.append(("hf", init, None, times))
        elif backend == "vllm":
            if importlib.util.find_spec("vllm") is None:
                print("vllm: not installed here, skipped (bash scripts/ci/setup_vllm_env.sh .venv-vllm)")
                continue
            from verl.workers.rollout.vllm_rollout.vllm_rollout_spmd import vLLMRollout
            from verl.workers.sharding_manager.fsdp_vllm import FSDPVLLMShardingManager

            start = time.perf_counter()
            rollout = vLLMRollout(path, config, tokenizer=tokenizer)
            init = time.perf_counter() - start
            manager = FSDPVLLMShardingManager(model, rollout)
            with manager:
                sync = manager.metrics["perf/weight_sync_s"]
                times = _time_generate(rollout.generate_sequences, prompts, args.repeats)
            rows.append(("vllm", init, sync, times))
        elif backend == "sglang":
            if importlib.util.find_spec("sglang") is None:
                print("sglang: not installed here, skipped (bash scripts/ci/setup_sglang_env.sh .venv-sglang)")
                continue
            from omegaconf import OmegaConf

            from verl.workers.rollout.sglang_rollout import SGLangRollout
            from verl.workers.sharding_manager.fsdp_sglang import FSDPSGLangShardingManager

            sglang_config = OmegaConf.create({
                **config, "name": "sglang",
                "max_model_len": args.prompt_length + args.response_length,
                "free_cache_engine": True
            })
            start = time.perf_counter()
            rollout = SGLangRollout(path, sglang_config, tokenizer=tokenizer, load_format="dummy")
            init = time.perf_counter() - start
            try:
                manager = FSDPSGLangShardingManager(model, rollout.engine)
                with manager:
                    sync = manager.metrics["perf/weight_sync_s"]
                    times = _time_generate(rollout.generate_sequences, prompts, args.repeats)
            finally:
                rollout.shutdown()
            rows.append(("sglang", init, sync, times))
        else:
            raise SystemExit(f"unknown backend {backend!r}; use hf, vllm and/or sglang")

    device = "cuda" if is_cuda_available() else f"cpu ({args.threads} thread{'s' if args.threads > 1 else ''})"
    print(
        f"\nmodel {path}\ndevice {device}, dtype {dtype}, batch {args.batch} x prompt {args.prompt_length} "
        f"(left-padded to {padded_length}) + {args.response_length} new tokens = {tokens} generated tokens per call, median of {args.repeats}\n"
    )
    print("| backend | engine start s | weight sync s | generate s (median) | tokens/s | vs hf |")
    print("|---|---|---|---|---|---|")
    hf_rate = None
    for name, init, sync, times in rows:
        median = statistics.median(times)
        rate = tokens / median
        hf_rate = rate if name == "hf" else hf_rate
        ratio = f"{rate / hf_rate:.1f}x" if hf_rate else "-"
        sync_s = f"{sync:.3f}" if sync is not None else "-"
        print(f"| {name} | {init:.1f} | {sync_s} | {median:.3f} | {rate:,.0f} | {ratio} |")


if __name__ == "__main__":  # vLLM may start processes with spawn: keep the module importable without side effects
    main()
