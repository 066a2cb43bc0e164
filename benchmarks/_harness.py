"""Shared machinery of the benchmark scripts: workload presets, models, data, one library run per subprocess,
tables and JSON.

Every measured run (this library's trainer, or TRL's ``GRPOTrainer``) happens in a fresh Python process started
by :func:`launch`, so that peak memory (``ru_maxrss`` on CPU, ``max_memory_allocated`` on GPU) belongs to that run
alone and no run inherits another's warm caches. The child is this file run as a script::

    python benchmarks/_harness.py --run SPEC.json RESULT.json

It reads a *spec* (library, model, data files, batch sizes, lengths, optimizer, steps, seed) and writes a
*result*: one record per optimizer step (step seconds, generation seconds, generated and total tokens, mean
reward, and a per-phase breakdown), the peak memory, and greedy test accuracies at the requested steps.

Both libraries are given the same work: the same model directory, the same parquet rows in the same order (no
shuffling), ``batch`` prompts x ``n`` samples per step, one optimizer step per generation (verl:
``ppo_mini_batch_size = train_batch_size``, one PPO epoch; TRL: ``gradient_accumulation_steps * micro = batch * n``,
one iteration), the same micro-batch of rows per forward/backward, AdamW with the same lr / betas / weight decay,
constant schedule, grad-norm clip 1.0, clip ratio 0.2, no KL term and no reference model, token-mean loss, group-
normalised advantages, sampling at the workload's ``temperature`` (1 unless set) without top-k/top-p, no gradient
checkpointing, no torch.compile.
With ``fixed_length`` every sample is exactly ``response_length`` tokens (verl: ``rollout.ignore_eos``; TRL:
``min_new_tokens = max_new_tokens``), so tokens/s count the same tokens on both sides.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterable, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)
LIBS = ("ours", "trl")
BENCH_CACHE_ENV = "VERL_BENCH_CACHE"

# ----------------------------------------------------------------------------------------------------------------------
# workloads and models
# ----------------------------------------------------------------------------------------------------------------------

#: Qwen2.5-0.5B's architecture (its published ``config.json``), built here with random weights: no hub access is
#: needed and the compute per token is that of the real model (494M parameters, 151936-token vocabulary).
QWEN25_0_5B_SHAPE: dict[str, Any] = {
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "vocab_size": 151936,
    "use_sliding_window": False,
    "sliding_window": None,
    "max_window_layers": 24,
    "hidden_act": "silu",
    "attention_dropout": 0.0,
}

#: A model between the tiny one and Qwen2.5-0.5B that still trains in seconds per step on a CPU (~20M parameters).
SMALL_SHAPE: dict[str, Any] = {
    "hidden_size": 512,
    "intermediate_size": 1536,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}

MODEL_SHAPES = {"small": SMALL_SHAPE, "qwen0.5b": QWEN25_0_5B_SHAPE}


@dataclass
class Workload:
    """What one benchmark step does, identically for both libraries."""

    model: str = "tiny"  # tiny | small | qwen0.5b | warmed | a Hugging Face model directory
    batch: int = 8  # prompts per step
    n: int = 4  # samples per prompt (GRPO group size; TRL num_generations)
    prompt_length: int = 32  # verl data.max_prompt_length (prompts are left-padded to it); TRL pads to the longest
    response_length: int = 32
    micro_batch: int = 16  # rows per forward/backward (and per log-prob forward)
    lr: float = 1e-5
    steps: int = 4  # optimizer steps per run
    warmup: int = 1  # first steps of each run left out of the medians (allocator and kernel warm-up)
    repeats: int = 3  # runs per library, alternating ours / TRL
    fixed_length: bool = True
    seed: int = 0
    threads: int = 1  # torch / OpenMP threads per process on CPU (Ray gives its workers 1)
    train_rows: int = 1024  # arithmetic problems written for training
    ours_overrides: list[str] = field(default_factory=list)
    ours_config: str = "ppo_trainer"  # ours' Hydra config: ppo_trainer (FSDP) or ppo_megatron_trainer (Megatron-core)
    trl_dtype: str = "float32"  # TRL's stored weights: float32 (+ bf16 autocast on GPU, like ours) or bfloat16
    temperature: float = 1.0  # sampling temperature of both rollouts (the losses divide the logits by it too)

    @property
    def rows(self) -> int:
        return self.batch * self.n


PRESETS: dict[str, Workload] = {
    "tiny":
        Workload(model="tiny", batch=8, n=4, prompt_length=32, response_length=32, micro_batch=16, steps=4),
    "small":
        Workload(model="small", batch=8, n=4, prompt_length=32, response_length=64, micro_batch=16, steps=4),
    "qwen0.5b":
        Workload(model="qwen0.5b",
                 batch=16,
                 n=8,
                 prompt_length=32,
                 response_length=256,
                 micro_batch=16,
                 lr=1e-6,
                 steps=5,
                 repeats=2),  # 2 x 2 runs: estimated well under 10 minutes on one H100
}


def cache_root() -> str:
    """Where built benchmark models and data live (``$VERL_BENCH_CACHE``, else ``~/.cache/verl/bench``)."""
    return os.path.abspath(
        os.path.expanduser(os.environ.get(BENCH_CACHE_ENV) or os.path.join("~", ".cache", "verl", "bench")))


def warmed_model_available() -> bool:
    """Whether this build has the SFT-warmed embedded-default model (``verl.trainer.embedded_default``)."""
    try:
        from verl.trainer.embedded_default import get_warmed_model_path  # noqa: F401
    except ImportError:
        return False
    return True


def build_shaped_model(name: str, cache_dir: Optional[str] = None, seed: int = 0) -> str:
    """A Qwen2 model of shape ``MODEL_SHAPES[name]`` with random weights and the tiny model's tokenizer, built once
    into the benchmark cache (atomically: concurrent builds never see a half-written directory)."""
    import hashlib

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    from verl.models.tiny import get_tiny_model_path
    from verl.utils.checkpoint.hf_checkpoint import copy_hf_assets

    if name not in MODEL_SHAPES:
        raise ValueError(f"unknown model shape {name!r}; choose one of {sorted(MODEL_SHAPES)} or give a directory")
    shape = dict(MODEL_SHAPES[name])
    base = get_tiny_model_path()
    key = hashlib.sha256(
        json.dumps([name, shape, seed, os.path.basename(base), transformers.__version__],
                   sort_keys=True).encode()).hexdigest()[:12]
    root = os.path.join(cache_dir or cache_root(), "models")
    final = os.path.join(root, f"{name}-{key}")
    if os.path.isfile(os.path.join(final, "config.json")):
        return final
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=root, prefix=f".build-{name}-")
    try:
        tokenizer = AutoTokenizer.from_pretrained(base)
        if "vocab_size" not in shape:
            shape["vocab_size"] = (len(tokenizer) + 63) // 64 * 64
        config = Qwen2Config(bos_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id,
                             **shape)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.save_pretrained(tmp, safe_serialization=True)
        copy_hf_assets(base, tmp)  # tokenizer files, chat template and generation config of the tiny model
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, final)
        except OSError:
            if not os.path.isfile(os.path.join(final, "config.json")):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def resolve_model(model: str) -> tuple[str, str]:
    """``(path, description)`` of a model name (``tiny``, ``small``, ``qwen0.5b``, ``warmed``) or directory."""
    if model == "tiny":
        from verl.models.tiny import get_tiny_model_path

        return get_tiny_model_path(), "tiny Qwen2 (verl.models.tiny, ~1M parameters)"
    if model == "warmed":
        if not warmed_model_available():
            raise ValueError("--model warmed: this build has no verl.trainer.embedded_default.get_warmed_model_path; "
                             "use --model tiny")
        from verl.trainer.embedded_default import get_warmed_model_path

        return get_warmed_model_path(), "tiny Qwen2 SFT-warmed on the arithmetic task (embedded default policy)"
    if model in MODEL_SHAPES:
        shape = MODEL_SHAPES[model]
        what = "Qwen2.5-0.5B-shaped" if model == "qwen0.5b" else "Qwen2"
        return build_shaped_model(model), (f"{what}, random weights (hidden {shape['hidden_size']}, "
                                           f"{shape['num_hidden_layers']} layers, vocab "
                                           f"{shape.get('vocab_size', 'of the tiny tokenizer')})")
    path = os.path.abspath(os.path.expanduser(model))
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"--model {model!r} is neither a preset (tiny, small, qwen0.5b, warmed) nor a Hugging Face "
                         "model directory with a config.json")
    return path, path


def count_parameters(model_path: str) -> int:
    """Parameters stored in the model's safetensors files (tied embeddings once), read from their headers: no
    torch import, no weights loaded."""
    import struct

    index = os.path.join(model_path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = [name for name in os.listdir(model_path) if name.endswith(".safetensors")]
    if not files:
        raise ValueError(f"{model_path} has no .safetensors weights to count parameters from")
    total = 0
    for name in files:
        with open(os.path.join(model_path, name), "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for key, entry in header.items():
            if key != "__metadata__":
                total += math.prod(entry["shape"])
    return total


def task_files(work_dir: str, train_rows: int, test_rows: int = 256, seed: int = 0) -> dict[str, str]:
    """The arithmetic task (``verl.utils.dataset.tasks``) as train/test parquet files under ``work_dir``."""
    from verl.utils.dataset.tasks import write_arithmetic_task

    return write_arithmetic_task(os.path.join(work_dir, "data"), train_size=train_rows, test_size=test_rows, seed=seed)


# ----------------------------------------------------------------------------------------------------------------------
# environment
# ----------------------------------------------------------------------------------------------------------------------


def _package_version(name: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def trl_unavailable_reason(import_it: bool = True) -> Optional[str]:
    """Why TRL cannot be run here (None when ``from trl import GRPOTrainer`` works). ``import_it=False`` only looks
    for the package (an import costs seconds; a broken install then fails loudly in the TRL run instead)."""
    if not import_it:
        import importlib.util

        if importlib.util.find_spec("trl") is None:
            return "trl is not installed here; pip install trl to compare"
        return None
    try:
        from trl import GRPOConfig, GRPOTrainer  # noqa: F401
    except Exception as exc:  # ImportError, or an incompatible transformers/torch raising at import
        return f"trl is not importable here ({type(exc).__name__}: {exc}); pip install trl to compare"
    return None


def gpu_description() -> Optional[str]:
    """``name, memory`` of each visible NVIDIA GPU via nvidia-smi (no CUDA context in this process), or None."""
    if shutil.which("nvidia-smi") is None or os.environ.get("VERL_DEVICE", "").lower() == "cpu":
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True,
                             text=True,
                             timeout=30,
                             check=True).stdout.strip()
    except (subprocess.SubprocessError, OSError):
        return None
    return "; ".join(line.strip() for line in out.splitlines() if line.strip()) or None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_info(device: str) -> dict[str, Any]:
    """Machine, load and package versions, recorded with every result."""
    import verl

    info: dict[str, Any] = {
        "device": device,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "gpu": gpu_description() if device == "cuda" else None,
        "load_average_1m_at_start": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {
            "verl (this repo)": getattr(verl, "__version__", None),
            "torch": _package_version("torch"),
            "transformers": _package_version("transformers"),
            "trl": _package_version("trl"),
            "accelerate": _package_version("accelerate"),
            "datasets": _package_version("datasets"),
            "ray": _package_version("ray"),
        },
        "command": " ".join([os.path.relpath(sys.argv[0], REPO_ROOT)] + sys.argv[1:]),
    }
    return info


def resolve_device(requested: str) -> str:
    """``cuda`` or ``cpu`` for ``--device auto|cpu|cuda``."""
    if requested not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {requested!r}")
    if requested == "cpu" or os.environ.get("VERL_DEVICE", "").lower() == "cpu":
        if requested == "cuda":
            raise RuntimeError("--device cuda, but VERL_DEVICE=cpu is set")
        return "cpu"
    if requested == "auto" and gpu_description() is None:
        return "cpu"  # no NVIDIA GPU listed: skip importing torch just to be told so
    from verl.utils.device import is_cuda_available

    if is_cuda_available():
        return "cuda"
    if requested == "cuda":
        raise RuntimeError("--device cuda: no CUDA device is visible (or VERL_DEVICE=cpu is set)")
    return "cpu"


# ----------------------------------------------------------------------------------------------------------------------
# launching one run
# ----------------------------------------------------------------------------------------------------------------------


def make_spec(lib: str,
              workload: Workload,
              model_path: str,
              files: dict[str, str],
              work_dir: str,
              device: str,
              eval_steps: Sequence[int] = (),
              eval_rows: int = 0,
              tag: str = "") -> dict[str, Any]:
    """The JSON spec of one run (see the module docstring)."""
    if lib not in LIBS:
        raise ValueError(f"unknown library {lib!r}; use one of {LIBS}")
    if workload.rows % workload.micro_batch:
        raise ValueError(f"--micro-batch {workload.micro_batch} must divide batch x n = {workload.rows} (one optimizer "
                         "step per generation on both sides)")
    run_dir = os.path.join(work_dir, f"{lib}{tag}")
    os.makedirs(run_dir, exist_ok=True)
    return {
        "lib": lib,
        "model_path": model_path,
        "train_file": files["train"],
        "test_file": files["test"],
        "device": device,
        "work_dir": run_dir,
        "eval_steps": sorted(set(int(s) for s in eval_steps)),
        "eval_rows": int(eval_rows),
        **asdict(workload),
    }


def launch(spec: dict[str, Any], timeout: float = 3600.0, echo: bool = False) -> dict[str, Any]:
    """Run ``spec`` in a fresh Python process; returns its result (raises with the log's tail on failure)."""
    run_dir = spec["work_dir"]
    spec_path = os.path.join(run_dir, "spec.json")
    result_path = os.path.join(run_dir, "result.json")
    log_path = os.path.join(run_dir, "run.log")
    with open(spec_path, "w", encoding="utf-8") as f:
        json.dump(spec, f, indent=1)
    if os.path.exists(result_path):
        os.remove(result_path)
    env = dict(os.environ)
    threads = str(spec["threads"])
    env.update({
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        "TRANSFORMERS_VERBOSITY": "error",
    })
    if spec["device"] == "cpu":
        env["VERL_DEVICE"] = "cpu"
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, os.path.abspath(__file__), "--run", spec_path, result_path]
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=run_dir)
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                log.write(line)
                if echo:
                    sys.stdout.write(line)
            proc.wait(timeout=max(1.0, timeout - (time.perf_counter() - start)))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"{spec['lib']} run timed out after {timeout:.0f} s; log: {log_path}") from None
    if proc.returncode != 0 or not os.path.isfile(result_path):
        with open(log_path, encoding="utf-8", errors="replace") as f:
            tail = "".join(f.readlines()[-40:])
        raise RuntimeError(
            f"{spec['lib']} run failed (exit status {proc.returncode}); last lines of {log_path}:\n{tail}")
    with open(result_path, encoding="utf-8") as f:
        result = json.load(f)
    result["log"] = log_path
    result["process_wall_s"] = time.perf_counter() - start
    return result


# ----------------------------------------------------------------------------------------------------------------------
# inside the child: shared pieces
# ----------------------------------------------------------------------------------------------------------------------


def _read_rows(path: str) -> list[dict[str, Any]]:
    """Parquet rows as plain Python (lists and dicts instead of numpy arrays)."""
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def greedy_accuracy(model: Any,
                    tokenizer: Any,
                    rows: Sequence[dict[str, Any]],
                    max_new_tokens: int,
                    batch_size: int = 64) -> float:
    """Fraction of ``rows`` answered correctly with greedy decoding (stopping at EOS), scored by the arithmetic
    reward function: the one evaluator applied to both libraries' models."""
    import torch

    from verl.utils.reward_score import default_compute_score

    if not rows:
        return float("nan")
    device = next(model.parameters()).device
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None) or tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    was_training = model.training
    model.eval()
    correct = 0
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            texts = [
                tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False) for r in chunk
            ]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            with torch.no_grad():
                out = model.generate(**enc,
                                     do_sample=False,
                                     max_new_tokens=max_new_tokens,
                                     eos_token_id=eos,
                                     pad_token_id=pad,
                                     temperature=None,
                                     top_p=None,
                                     top_k=None)
            answers = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for row, answer in zip(chunk, answers):
                correct += float(default_compute_score(row["data_source"], answer,
                                                       row["reward_model"]["ground_truth"])) >= 1.0
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return correct / len(rows)


def _evaluate_dir(model_dir: str, tokenizer_dir: str, rows: Sequence[dict[str, Any]], spec: dict[str, Any]) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if spec["device"] == "cuda" else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    try:
        return greedy_accuracy(model, tokenizer, rows, spec["response_length"])
    finally:
        del model
        if device == "cuda":
            torch.cuda.empty_cache()


def _peak_memory_gb(device: str) -> tuple[float, str]:
    import resource

    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 1024**3, "torch.cuda.max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, "peak RSS (ru_maxrss)"


# ----------------------------------------------------------------------------------------------------------------------
# inside the child: this library
# ----------------------------------------------------------------------------------------------------------------------


def ours_overrides(spec: dict[str, Any]) -> list[str]:
    """``ppo_trainer.yaml`` overrides that make ``main_ppo`` run the spec's workload with GRPO and the HF rollout."""
    ckpt = os.path.join(spec["work_dir"], "ckpt")
    eval_steps = [s for s in spec["eval_steps"] if s > 0]
    save_freq = -1
    if eval_steps:  # checkpoints (Hugging Face weights only) at the evaluated steps; the last step is always saved
        gaps = {b - a for a, b in zip([0] + eval_steps, eval_steps)}
        save_freq = min(gaps) if len(gaps) == 1 else 1
    overrides = [
        f"data.train_files={spec['train_file']}",
        "data.val_files=null",
        f"data.train_batch_size={spec['batch']}",
        f"data.max_prompt_length={spec['prompt_length']}",
        f"data.max_response_length={spec['response_length']}",
        "data.shuffle=False",
        f"data.seed={spec['seed']}",
        "algorithm.adv_estimator=grpo",
        "algorithm.norm_adv_by_std_in_grpo=True",
        "algorithm.use_kl_in_reward=False",
        f"actor_rollout_ref.model.path={spec['model_path']}",
        "actor_rollout_ref.model.enable_gradient_checkpointing=False",
        "actor_rollout_ref.actor.use_torch_compile=False",
        "actor_rollout_ref.actor.use_kl_loss=False",
        "actor_rollout_ref.actor.entropy_coeff=0",
        "actor_rollout_ref.actor.loss_agg_mode=token-mean",
        "actor_rollout_ref.actor.ppo_epochs=1",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={spec['batch']}",
        f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={spec['micro_batch']}",
        "actor_rollout_ref.actor.clip_ratio=0.2",
        "actor_rollout_ref.actor.grad_clip=1.0",
        f"actor_rollout_ref.actor.optim.lr={spec['lr']}",
        "actor_rollout_ref.actor.optim.weight_decay=0.01",
        "actor_rollout_ref.actor.optim.lr_scheduler_type=constant",
        "actor_rollout_ref.actor.optim.lr_warmup_steps=0",
        "actor_rollout_ref.actor.checkpoint.save_contents=[hf_model]",
        "actor_rollout_ref.rollout.name=hf",
        f"actor_rollout_ref.rollout.n={spec['n']}",
        f"actor_rollout_ref.rollout.temperature={spec['temperature']}",
        "actor_rollout_ref.rollout.top_p=1.0",
        "actor_rollout_ref.rollout.top_k=-1",
        "actor_rollout_ref.rollout.do_sample=True",
        f"actor_rollout_ref.rollout.ignore_eos={bool(spec['fixed_length'])}",
        f"actor_rollout_ref.rollout.seed={spec['seed']}",
        f"actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu={spec['micro_batch']}",
        f"trainer.device={spec['device']}",
        "trainer.nnodes=1",
        "trainer.n_gpus_per_node=1",
        "trainer.logger=[file]",
        "trainer.project_name=verl_bench",
        "trainer.experiment_name=ours",
        "trainer.val_before_train=False",
        "trainer.test_freq=-1",
        f"trainer.save_freq={save_freq}",
        f"trainer.total_training_steps={spec['steps']}",
        "trainer.resume_mode=disable",
        f"trainer.default_local_dir={ckpt}",
    ]
    if spec["device"] == "cpu":
        overrides.append("ray_kwargs.ray_init.num_cpus=4")
    return overrides + list(spec.get("ours_overrides") or [])


def _ours_step_record(step: int, m: dict[str, Any], rows: int, width: int) -> dict[str, Any]:
    """One step's record from the trainer's logged metrics; ``width``: prompt + response positions of every row
    (prompts are left-padded to ``max_prompt_length``, responses right-padded to ``response_length``)."""
    gen_tokens = float(m.get("response_length/mean", 0.0)) * rows
    total_tokens = float(m.get("perf/total_num_tokens", 0.0))
    named = ("timing_s/gen", "timing_s/reward", "timing_s/old_log_prob", "timing_s/adv", "timing_s/update_actor")
    breakdown = {
        "other": float(m["timing_s/step"]) - sum(float(m.get(k, 0.0)) for k in named),
        "gen": m.get("timing_s/gen"),
        "weight_sync": m.get("timing_s/weight_sync"),
        "generate_sequences": m.get("timing_s/generate_sequences"),
        "reward": m.get("timing_s/reward"),
        "old_log_prob": m.get("timing_s/old_log_prob"),
        "adv": m.get("timing_s/adv"),
        "update_actor": m.get("timing_s/update_actor"),
    }
    return {
        "step": step,
        "step_s": float(m["timing_s/step"]),
        "gen_s": float(m["timing_s/gen"]),
        "gen_tokens": gen_tokens,
        "total_tokens": total_tokens,
        "prompt_tokens": total_tokens - gen_tokens,
        "padded_tokens": float(rows * width),
        "reward_mean": m.get("critic/score/mean"),
        "breakdown": {
            k: float(v) for k, v in breakdown.items() if v is not None
        },
        "memory_gb": m.get("perf/max_memory_allocated_gb"),
        "mfu_actor": m.get("perf/mfu/actor"),
        "weight_sync_gb": m.get("perf/weight_sync_gb"),
        "metrics": {
            k: v for k, v in m.items() if isinstance(v, (int, float))
        },
    }


def run_ours(spec: dict[str, Any]) -> dict[str, Any]:
    """``verl.trainer.main_ppo.run_ppo`` on the spec; per-step metrics come from the trainer's file logger."""
    import verl
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from verl.trainer.main_ppo import get_ppo_ray_runtime_env, run_ppo

    start = time.perf_counter()
    metrics_path = os.path.join(spec["work_dir"], "metrics.jsonl")
    if os.path.exists(metrics_path):
        os.remove(metrics_path)
    os.environ["VERL_FILE_LOGGER_PATH"] = metrics_path  # inherited by a local Ray started below
    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        config = compose(config_name=spec.get("ours_config", "ppo_trainer"), overrides=ours_overrides(spec))
    # a Ray cluster joined through $RAY_ADDRESS does not inherit this process's environment: pass it explicitly
    runtime_env = get_ppo_ray_runtime_env(spec["device"])
    runtime_env["env_vars"]["VERL_FILE_LOGGER_PATH"] = metrics_path
    OmegaConf.update(config, "ray_kwargs.ray_init.runtime_env", runtime_env, force_add=True)
    run_ppo(config)
    import ray

    ray.shutdown()
    wall = time.perf_counter() - start
    with open(metrics_path, encoding="utf-8") as f:
        logged = [json.loads(line) for line in f if line.strip()]
    width = int(spec["prompt_length"]) + int(spec["response_length"])
    steps = [_ours_step_record(int(e["step"]), e["data"], spec["batch"] * spec["n"], width) for e in logged]
    if len(steps) != spec["steps"]:
        raise RuntimeError(f"the trainer logged {len(steps)} steps, expected {spec['steps']} ({metrics_path})")
    memory = [s["memory_gb"] for s in steps if s["memory_gb"] is not None]
    evals: dict[str, float] = {}
    if spec["eval_steps"]:
        test_rows = _read_rows(spec["test_file"])[:spec["eval_rows"]]
        for step in spec["eval_steps"]:
            hf_dir = os.path.join(spec["work_dir"], "ckpt", f"global_step_{step}", "actor", "huggingface")
            if step == 0:
                hf_dir = spec["model_path"]  # the starting policy
            elif not os.path.isfile(os.path.join(hf_dir, "config.json")):
                raise RuntimeError(f"no Hugging Face weights saved for step {step} in {hf_dir}")
            evals[str(step)] = _evaluate_dir(hf_dir, spec["model_path"], test_rows, spec)
    return {
        "lib": "ours",
        "actor_strategy": str(config.actor_rollout_ref.actor.strategy),
        "steps": steps,
        "peak_memory_gb": max(memory) if memory else None,
        "memory_kind":
            ("worker torch.cuda.max_memory_allocated" if spec["device"] == "cuda" else "worker peak RSS (ru_maxrss)"),
        "run_wall_s": wall,
        "evals": evals,
    }


# ----------------------------------------------------------------------------------------------------------------------
# inside the child: TRL
# ----------------------------------------------------------------------------------------------------------------------


def run_trl(spec: dict[str, Any]) -> dict[str, Any]:
    """TRL's ``GRPOTrainer`` (transformers ``generate`` path) on the spec; steps are timed by a callback, and the
    generation call, the scoring and the token counts by wrapping the trainer's own methods on the instance."""
    start = time.perf_counter()
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from verl.utils.reward_score import default_compute_score

    cuda = spec["device"] == "cuda"
    if not cuda:
        torch.set_num_threads(int(spec["threads"]))
    rows = _read_rows(spec["train_file"])
    dataset = Dataset.from_list([{
        "prompt": r["prompt"],
        "ground_truth": str(r["reward_model"]["ground_truth"]),
        "data_source": r["data_source"],
    } for r in rows])
    R = int(spec["response_length"])
    current: dict[str, Any] = {}

    def arithmetic_reward(prompts: list, completions: list, ground_truth: list, data_source: list,
                          **kwargs: Any) -> list[float]:
        scores = []
        for completion, truth, source in zip(completions, ground_truth, data_source):
            text = completion[-1]["content"] if isinstance(completion, list) else completion
            scores.append(float(default_compute_score(source, text, truth)))
        current.setdefault("rewards", []).extend(scores)
        return scores

    rows_per_step = spec["batch"] * spec["n"]
    micro = int(spec["micro_batch"])
    args = GRPOConfig(
        output_dir=os.path.join(spec["work_dir"], "out"),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=rows_per_step // micro,
        num_generations=spec["n"],
        max_completion_length=R,
        generation_kwargs={"min_new_tokens": R} if spec["fixed_length"] else None,
        temperature=float(spec["temperature"]),
        top_p=1.0,
        top_k=0,
        learning_rate=float(spec["lr"]),
        weight_decay=0.01,
        adam_beta1=0.9,
        adam_beta2=0.999,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=1.0,
        max_steps=int(spec["steps"]),
        num_iterations=1,
        beta=0.0,
        epsilon=0.2,
        loss_type="dapo",
        scale_rewards="group",
        shuffle_dataset=False,
        seed=int(spec["seed"]),
        data_seed=int(spec["seed"]),
        use_cpu=not cuda,
        bf16=cuda,
        gradient_checkpointing=False,
        model_init_kwargs={"dtype": getattr(torch, spec.get("trl_dtype", "float32"))},
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        log_completions=False,
    )
    eval_steps = set(spec["eval_steps"])
    test_rows = _read_rows(spec["test_file"])[:spec["eval_rows"]] if eval_steps else []
    records: list[dict[str, Any]] = []
    evals: dict[str, float] = {}
    holder: dict[str, Any] = {}

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def evaluate(step: int) -> None:
        trainer = holder["trainer"]
        model = trainer.accelerator.unwrap_model(trainer.model)
        evals[str(step)] = greedy_accuracy(model, trainer.processing_class, test_rows, R)

    class StepTimer(TrainerCallback):

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if 0 in eval_steps:
                evaluate(0)  # the starting policy

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            sync()
            current.clear()
            current["t0"] = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            sync()
            step_s = time.perf_counter() - current["t0"]
            gen_s = current.get("gen_s", 0.0)
            prep_s = current.get("prep_s", 0.0)
            rewards = current.get("rewards", [])
            records.append({
                "step": int(state.global_step),
                "step_s": step_s,
                "gen_s": gen_s,
                "gen_tokens": float(current.get("gen_tokens", 0)),
                "total_tokens": float(current.get("gen_tokens", 0) + current.get("prompt_tokens", 0)),
                "prompt_tokens": float(current.get("prompt_tokens", 0)),
                "padded_tokens": float(current.get("padded_tokens", 0)),
                "reward_mean": sum(rewards) / len(rewards) if rewards else None,
                "breakdown": {
                    "gen": gen_s,
                    "score_and_prepare": max(0.0, prep_s - gen_s),
                    "loss_backward_optimizer": max(0.0, step_s - prep_s),
                },
            })
            if int(state.global_step) in eval_steps:
                evaluate(int(state.global_step))

    trainer = GRPOTrainer(model=spec["model_path"],
                          reward_funcs=arithmetic_reward,
                          args=args,
                          train_dataset=dataset,
                          callbacks=[StepTimer()])
    holder["trainer"] = trainer
    generate_single_turn = trainer._generate_single_turn
    generate_and_score = trainer._generate_and_score_completions

    def timed_generate(prompt_ids: Any, *a: Any, **k: Any) -> Any:
        sync()
        t0 = time.perf_counter()
        completion_ids, logprobs = generate_single_turn(prompt_ids, *a, **k)
        sync()
        current["gen_s"] = current.get("gen_s", 0.0) + time.perf_counter() - t0
        current["prompt_tokens"] = current.get("prompt_tokens", 0) + sum(len(p) for p in prompt_ids)
        current["gen_tokens"] = current.get("gen_tokens", 0) + sum(len(c) for c in completion_ids)
        # TRL pads prompts to the longest of the generation batch and completions to the longest completion
        width = max(len(p) for p in prompt_ids) + max(len(c) for c in completion_ids)
        current["padded_tokens"] = current.get("padded_tokens", 0) + len(prompt_ids) * width
        return completion_ids, logprobs

    def timed_prepare(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        out = generate_and_score(*a, **k)
        sync()
        current["prep_s"] = current.get("prep_s", 0.0) + time.perf_counter() - t0
        return out

    trainer._generate_single_turn = timed_generate
    trainer._generate_and_score_completions = timed_prepare
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    peak, kind = _peak_memory_gb(spec["device"])
    if len(records) != spec["steps"]:
        raise RuntimeError(f"TRL ran {len(records)} optimizer steps, expected {spec['steps']}")
    return {
        "lib": "trl",
        "steps": records,
        "peak_memory_gb": peak,
        "memory_kind": kind if cuda else "process peak RSS (ru_maxrss)",
        "run_wall_s": time.perf_counter() - start,
        "evals": evals,
    }


# ----------------------------------------------------------------------------------------------------------------------
# summaries and tables
# ----------------------------------------------------------------------------------------------------------------------


def _median(values: Iterable[Optional[float]]) -> Optional[float]:
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.median(vals) if vals else None


def timed_steps(result: dict[str, Any], warmup: int) -> list[dict[str, Any]]:
    """The steps of a run that count for timings: all but the first ``warmup`` (at least the last one)."""
    steps = result["steps"]
    return steps[warmup:] if len(steps) > warmup else steps[-1:]


def summarize_runs(results: Sequence[dict[str, Any]], warmup: int) -> Optional[dict[str, Any]]:
    """Medians over the timed steps of every run of one library."""
    if not results:
        return None
    steps = [s for r in results for s in timed_steps(r, warmup)]
    step_s = [s["step_s"] for s in steps]
    gen_s = [s["gen_s"] for s in steps]
    train_s = [s["step_s"] - s["gen_s"] for s in steps]
    gen_tps = [s["gen_tokens"] / s["gen_s"] for s in steps if s["gen_s"] > 0]
    train_tps = [s["total_tokens"] / (s["step_s"] - s["gen_s"]) for s in steps if s["step_s"] > s["gen_s"]]
    phases: dict[str, list[float]] = {}
    for s in steps:
        for k, v in s.get("breakdown", {}).items():
            phases.setdefault(k, []).append(v)
    memory = [r["peak_memory_gb"] for r in results if r.get("peak_memory_gb") is not None]
    overhead = [r["run_wall_s"] - sum(s["step_s"] for s in r["steps"]) for r in results if r.get("run_wall_s")]
    return {
        "runs": len(results),
        "timed_steps": len(steps),
        "step_s": _median(step_s),
        "step_s_min": min(step_s),
        "step_s_max": max(step_s),
        "gen_s": _median(gen_s),
        "train_s": _median(train_s),
        "gen_tokens_per_step": _median(s["gen_tokens"] for s in steps),
        "total_tokens_per_step": _median(s["total_tokens"] for s in steps),
        "prompt_tokens_per_step": _median(s["prompt_tokens"] for s in steps),
        "padded_tokens_per_step": _median(s.get("padded_tokens") for s in steps),
        "gen_tokens_per_s": _median(gen_tps),
        "train_tokens_per_s": _median(train_tps),
        "peak_memory_gb": max(memory) if memory else None,
        "memory_kind": results[0].get("memory_kind"),
        "startup_and_teardown_s": _median(overhead),
        "phases_s": {
            k: _median(v) for k, v in phases.items()
        },
    }


def paired_ratios(ours: Sequence[dict[str, Any]],
                  trl: Sequence[dict[str, Any]],
                  warmup: int,
                  key: str = "step_s") -> list[float]:
    """Per repeat, ours' median ``key`` over TRL's, from the two runs made back to back: on a shared machine whose
    load drifts, these are steadier than the ratio of the pooled medians."""
    out = []
    for a, b in zip(ours, trl):
        x = _median(s[key] for s in timed_steps(a, warmup))
        y = _median(s[key] for s in timed_steps(b, warmup))
        if x is not None and y:
            out.append(x / y)
    return out


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or b == 0:
        return None
    return a / b


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: ``-`` for missing values, thousands separators for large numbers."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 100:
            return f"{value:.1f}"
        return f"{value:.{digits}g}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(c if isinstance(c, str) else fmt(c) for c in row) + " |")
    return "\n".join(lines)


def write_json(path: Optional[str], payload: dict[str, Any]) -> None:
    if not path:
        return
    path = os.path.abspath(os.path.expanduser(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1, default=str)
    os.replace(tmp, path)
    print(f"\nwrote {path}")


def finish(args: argparse.Namespace, payload: dict[str, Any], work_dir: str, temporary: bool) -> dict[str, Any]:
    """Every script ends alike: write the JSON (``--out``), remove a temporary work dir unless ``--keep``."""
    write_json(args.out, payload)
    if temporary and not args.keep:
        shutil.rmtree(work_dir, ignore_errors=True)
    return payload


def add_workload_args(parser: argparse.ArgumentParser, presets: Sequence[str], libs: bool = True) -> None:
    """The workload flags shared by the scripts (each overrides the chosen preset); ``libs``: offer ``--libs``."""
    parser.add_argument("--size", choices=list(presets), default=presets[0], help="workload preset")
    parser.add_argument("--model", default=None, help="tiny | small | qwen0.5b | warmed | a HF model directory")
    parser.add_argument("--batch", type=int, default=None, help="prompts per step")
    parser.add_argument("--n", type=int, default=None, help="samples per prompt")
    parser.add_argument("--prompt-length", type=int, default=None, help="verl data.max_prompt_length")
    parser.add_argument("--response-length", type=int, default=None, help="new tokens per sample")
    parser.add_argument("--micro-batch", type=int, default=None, help="rows per forward/backward")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--temperature", type=float, default=None, help="sampling temperature of both libraries")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process on CPU")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    if libs:
        parser.add_argument("--libs", default="ours,trl", help="comma-separated subset of: ours, trl")
    parser.add_argument("--trl-dtype",
                        choices=["float32", "bfloat16"],
                        default=None,
                        help="dtype TRL loads the weights in (default float32: fp32 master weights with bf16 autocast "
                        "on GPU, as ours; bfloat16: pure bf16 training and generation)")
    parser.add_argument("--ours-override",
                        action="append",
                        default=[],
                        metavar="KEY=VALUE",
                        help="extra override of this library's config for its runs (repeatable)")
    parser.add_argument(
        "--ours-config",
        choices=["ppo_trainer", "ppo_megatron_trainer"],
        default=None,
        help="this library's config: ppo_trainer (FSDP, default) or ppo_megatron_trainer (Megatron-core; "
        "parallel sizes through --ours-override actor_rollout_ref.actor.megatron.*)")
    parser.add_argument("--work-dir", default=None, help="where run logs and checkpoints go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir")
    parser.add_argument("--out", default=None, help="write the results as JSON here")


def workload_from_args(args: argparse.Namespace, presets: dict[str, Workload]) -> Workload:
    w = presets[args.size]
    changes = {}
    for name in ("model", "batch", "n", "prompt_length", "response_length", "micro_batch", "lr", "steps", "seed",
                 "threads", "warmup", "repeats", "trl_dtype", "temperature", "ours_config"):
        value = getattr(args, name, None)
        if value is not None:
            changes[name] = value
    w = replace(w, **changes)
    w.ours_overrides = list(w.ours_overrides) + list(args.ours_override or [])
    for name in ("batch", "n", "prompt_length", "response_length", "micro_batch", "steps"):
        if getattr(w, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(w, name)}")
    if w.n < 2:
        raise ValueError(f"--n must be >= 2 for GRPO (group-normalised advantages), got {w.n}")
    if w.rows % w.micro_batch:
        raise ValueError(f"--micro-batch {w.micro_batch} must divide batch x n = {w.rows}")
    if w.temperature <= 0:
        raise ValueError(f"--temperature must be > 0 (GRPO samples), got {w.temperature}")
    return w


def selected_libs(text: str) -> list[str]:
    libs = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in libs if x not in LIBS]
    if bad or not libs:
        raise ValueError(f"--libs: unknown {bad or text!r}; use a comma-separated subset of {list(LIBS)}")
    return libs


def runnable_libs(text: str) -> tuple[list[str], dict[str, str]]:
    """``(libraries to run, {skipped library: why})`` for ``--libs``: TRL is left out, with the reason printed, when
    it is not installed; nothing left to run is an error."""
    libs = selected_libs(text)
    skipped: dict[str, str] = {}
    if "trl" in libs:
        reason = trl_unavailable_reason(import_it=False)
        if reason:
            print(f"TRL half skipped: {reason}", flush=True)
            libs.remove("trl")
            skipped["trl"] = reason
    if not libs:
        raise SystemExit("nothing to run: " + "; ".join(skipped.values()))
    return libs, skipped


def make_work_dir(path: Optional[str], prefix: str) -> tuple[str, bool]:
    """``(directory, is_temporary)``."""
    if path:
        path = os.path.abspath(os.path.expanduser(path))
        os.makedirs(path, exist_ok=True)
        return path, False
    return tempfile.mkdtemp(prefix=prefix), True


# ----------------------------------------------------------------------------------------------------------------------
# child entry point
# ----------------------------------------------------------------------------------------------------------------------


def _child_main(spec_path: str, result_path: str) -> None:
    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    sys.path.insert(0, REPO_ROOT)
    result = run_ours(spec) if spec["lib"] == "ours" else run_trl(spec)
    result["spec"] = spec
    with open(result_path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1, default=str)
    os.replace(result_path + ".tmp", result_path)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--run":
        _child_main(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit("usage: python benchmarks/_harness.py --run SPEC.json RESULT.json (started by the benchmark "
                         "scripts; run grpo_step.py, learning.py or components.py instead)")
