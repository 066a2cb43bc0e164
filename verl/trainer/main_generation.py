"""``python -m verl.trainer.main_generation [key=value ...]``: offline generation for a parquet of prompts.

Every prompt of ``data.path`` (column ``data.prompt_key``, chat messages) is sampled ``data.n_samples`` times and the
file is written to ``data.output_path`` with all of its columns plus ``responses``: a list of ``n_samples`` strings
per row. Score the result with :mod:`verl.trainer.main_eval`.

Generation runs on the trainer's own worker, :class:`verl.workers.fsdp_workers.ActorRolloutRefWorker` with role
``rollout``, in a :class:`~verl.single_controller.ray.RayWorkerGroup` of ``trainer.nnodes * trainer.n_gpus_per_node``
processes; so ``rollout.name`` selects any registered backend (``hf``, ``vllm``, ``sglang``) exactly as in training,
and prompts are tokenised by the same :class:`~verl.utils.dataset.rl_dataset.RLHFDataset` (chat template, left
padding to ``rollout.prompt_length``).

Bad input (missing file or column, greedy decoding with several samples, ...) is reported on the driver before Ray
starts, as a one-line error naming the key and the fix.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Optional

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from verl.utils.config import ConfigError, cfg_select, resolve_device

__all__ = ["main", "run_generation", "check_generation_config", "parquet_columns", "RESPONSES_COLUMN"]

#: The column the responses are written to (one list of ``data.n_samples`` strings per row).
RESPONSES_COLUMN = "responses"

# what the rollout needs from a dataset batch (the rest of the row stays on the driver)
_GEN_TENSOR_KEYS = ("input_ids", "attention_mask", "position_ids")
_GEN_NON_TENSOR_KEYS = ("raw_prompt_ids", "raw_prompt", "multi_modal_data", "tools_kwargs", "interaction_kwargs",
                        "index", "agent_name")


def _fail(key: str, problem: str, fix: str) -> None:
    raise ConfigError(f"{key}: {problem}. Fix: {fix}")


def _set(config: DictConfig, key: str, value: Any) -> None:
    with open_dict(config):
        OmegaConf.update(config, key, value, merge=False, force_add=True)


def _positive_int(config: DictConfig, key: str) -> int:
    value = cfg_select(config, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        _fail(key, f"must be a positive integer, got {value!r}", f"set {key}=N with N >= 1")
    return int(value)


def _expand(path: Any) -> Any:
    if isinstance(path, str) and path and "://" not in path:
        return os.path.abspath(os.path.expanduser(path))
    return path


def parquet_columns(path: str, key: str) -> list[str]:
    """Column names of the parquet file ``path`` (named by config ``key`` in errors), read from its schema only."""
    import pyarrow.parquet as pq

    if not isinstance(path, str) or not path:
        _fail(key, f"must be a path to a parquet file, got {path!r}", f"set {key}=/path/to/file.parquet")
    if not os.path.exists(path):
        _fail(key, f"file {path!r} does not exist",
              f"point {key} at an existing parquet file (examples/data_preprocess/ "
              "writes them)")
    if os.path.isdir(path):
        _fail(key, f"{path!r} is a directory", f"point {key} at a parquet file inside it")
    try:
        return list(pq.read_schema(path).names)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for unreadable files
        _fail(key, f"{path!r} is not a readable parquet file ({type(exc).__name__}: {exc})",
              f"point {key} at a parquet file")
    return []  # unreachable


def check_generation_config(config: DictConfig) -> None:
    """Checks of a ``generation.yaml`` config that need no worker: input file and column, sizes, sampling, backend.
    Raises :class:`~verl.utils.config.ConfigError` with a one-line message naming the key and the fix."""
    columns = parquet_columns(cfg_select(config, "data.path"), "data.path")
    prompt_key = cfg_select(config, "data.prompt_key", "prompt")
    if prompt_key not in columns:
        _fail("data.prompt_key", f"column {prompt_key!r} is not in {cfg_select(config, 'data.path')!r} (columns: "
              f"{columns})", "set data.prompt_key to the column that holds the chat messages")
    output = cfg_select(config, "data.output_path")
    if not isinstance(output, str) or not output:
        _fail("data.output_path", f"must be a file path, got {output!r}", "set data.output_path=/path/to/out.parquet")
    if os.path.isdir(output):
        _fail("data.output_path", f"{output!r} is a directory", "set data.output_path to a .parquet file path")
    n_samples = _positive_int(config, "data.n_samples")
    _positive_int(config, "data.batch_size")
    _positive_int(config, "trainer.nnodes")
    _positive_int(config, "trainer.n_gpus_per_node")
    _positive_int(config, "rollout.prompt_length")
    _positive_int(config, "rollout.response_length")
    rollout_n = cfg_select(config, "rollout.n", 1)
    if rollout_n is not None and int(rollout_n) != 1:
        _fail("rollout.n", f"={rollout_n}, but the number of responses per prompt is data.n_samples here",
              f"set rollout.n=1 and data.n_samples={rollout_n}")
    temperature = float(cfg_select(config, "rollout.temperature", 1.0) or 0.0)
    greedy = not bool(cfg_select(config, "rollout.do_sample", True)) or temperature <= 0
    if greedy and n_samples > 1:
        _fail(
            "data.n_samples", f"={n_samples} with greedy decoding (rollout.do_sample=False or rollout.temperature="
            f"{temperature:g}) gives {n_samples} identical responses", "set data.n_samples=1, or sample with "
            "rollout.do_sample=True rollout.temperature=1.0")
    device = str(cfg_select(config, "trainer.device", "auto") or "auto")
    if device not in ("auto", "cpu", "cuda"):
        _fail("trainer.device", f"unknown value {device!r}", "set trainer.device=auto (or cpu, cuda)")
    if device == "cuda":
        from verl.utils.device import is_cuda_available

        if not is_cuda_available():
            _fail("trainer.device", "=cuda but no GPU is visible", "set trainer.device=auto or trainer.device=cpu")
    if int(cfg_select(config, "model.lora_rank", 0) or 0) > 0:
        _fail("model.lora_rank", "LoRA adapters are not supported by the FSDP workers",
              "merge the adapter into the model and set model.lora_rank=0")
    model_path = cfg_select(config, "model.path")
    if not isinstance(model_path, str) or not model_path:
        _fail("model.path", f"must be a model directory or hub id, got {model_path!r}",
              "set model.path=/path/to/hf_model")
    if model_path.startswith(("/", "~", ".")) and not os.path.exists(os.path.expanduser(model_path)):
        _fail("model.path", f"model directory {model_path!r} does not exist",
              "set model.path to a Hugging Face model directory or hub id (org/name)")
    from verl.workers.rollout.base import get_rollout_spec

    name, mode = str(cfg_select(config, "rollout.name", "hf")), str(cfg_select(config, "rollout.mode", "sync"))
    try:
        get_rollout_spec(name, mode)
    except ValueError as exc:
        raise ConfigError(str(exc).replace("actor_rollout_ref.rollout.", "rollout.")) from None


def _prepare(config: Any) -> DictConfig:
    """A resolved copy of ``config`` with local paths made absolute (workers may run elsewhere)."""
    if not isinstance(config, DictConfig):
        config = OmegaConf.create(config)
    config = OmegaConf.create(OmegaConf.to_container(config, resolve=True))
    for key in ("data.path", "data.output_path"):
        _set(config, key, _expand(cfg_select(config, key)))
    for key in ("model.path", "model.tokenizer_path"):
        value = cfg_select(config, key)
        if isinstance(value, str) and os.path.exists(os.path.expanduser(value)):
            _set(config, key, _expand(value))
    return config


def _dataset_config(config: DictConfig) -> dict[str, Any]:
    """The ``data`` node :class:`RLHFDataset` reads, built from this config (prompt length = rollout's)."""
    data = config.data
    template_kwargs = cfg_select(data, "apply_chat_template_kwargs")
    if OmegaConf.is_config(template_kwargs):
        template_kwargs = OmegaConf.to_container(template_kwargs, resolve=True)
    return {
        "prompt_key": cfg_select(data, "prompt_key", "prompt"),
        "max_prompt_length": int(config.rollout.prompt_length),
        "truncation": cfg_select(data, "truncation", "error"),
        "filter_overlong_prompts": False,  # every row needs its responses
        "return_raw_chat": bool(cfg_select(data, "return_raw_chat", False)),
        "apply_chat_template_kwargs": dict(template_kwargs or {}),
        "shuffle": False,
    }


def _start_ray(config: DictConfig, device: str) -> None:
    import ray

    if ray.is_initialized():
        return
    from verl.single_controller.ray import init_ray
    from verl.trainer.main_ppo import get_ppo_ray_runtime_env

    kwargs: dict[str, Any] = {"runtime_env": get_ppo_ray_runtime_env(device)}
    num_cpus = cfg_select(config, "ray_init.num_cpus")
    address = cfg_select(config, "ray_init.address")
    init_ray(num_cpus=int(num_cpus) if num_cpus is not None else None, address=address, **kwargs)


def _build_worker_group(config: DictConfig, device: str) -> tuple[Any, Any]:
    """``trainer.nnodes x trainer.n_gpus_per_node`` rollout workers, models built."""
    import ray

    from verl.single_controller.ray import RayClassWithInitArgs, RayResourcePool, RayWorkerGroup
    from verl.workers.fsdp_workers import ActorRolloutRefWorker

    pool = RayResourcePool(process_on_nodes=[int(config.trainer.n_gpus_per_node)] * int(config.trainer.nnodes),
                           use_gpu=device == "cuda")
    cls = RayClassWithInitArgs(cls=ray.remote(ActorRolloutRefWorker), config=config, role="rollout")
    worker_env = {"VERL_DEVICE": "cpu"} if device == "cpu" else None
    try:
        wg = RayWorkerGroup(resource_pool=pool, ray_cls_with_init=cls, worker_env=worker_env)
    except Exception:
        pool.shutdown()
        raise
    try:
        wg.init_model()
    except Exception:
        wg.shutdown()
        pool.shutdown()
        raise
    return wg, pool


def _decode_responses(tokenizer: Any, output: Any) -> list[str]:
    """The generated text of every row: valid response tokens only, special tokens (EOS, padding) dropped."""
    responses = output.batch["responses"]
    if "response_mask" in output.batch.keys():
        mask = output.batch["response_mask"].bool()
    else:
        mask = output.batch["attention_mask"][:, -responses.shape[-1]:].bool()
    ids = [row[m].tolist() for row, m in zip(responses, mask)]
    return tokenizer.batch_decode(ids, skip_special_tokens=True)


def _write_output(path: str, source: str, responses: list[list[str]]) -> None:
    """``source`` with a ``responses`` column (replaced if present), written atomically to ``path``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(source)
    if table.num_rows != len(responses):
        raise RuntimeError(f"generated responses for {len(responses)} rows but {source!r} has {table.num_rows}")
    column = pa.array(responses, type=pa.list_(pa.string()))
    if RESPONSES_COLUMN in table.column_names:
        print(f"[verl] {source} already has a {RESPONSES_COLUMN!r} column; replacing it", flush=True)
        table = table.set_column(table.column_names.index(RESPONSES_COLUMN), RESPONSES_COLUMN, column)
    else:
        table = table.append_column(RESPONSES_COLUMN, column)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def run_generation(config: Any) -> str:
    """Generate ``data.n_samples`` responses for every prompt of ``data.path`` and write ``data.output_path``.

    Starts (or joins) Ray when it is not running. Returns the output path.
    """
    from torch.utils.data import DataLoader

    from verl.protocol import DataProto, pad_dataproto_to_divisor, unpad_dataproto
    from verl.utils.dataset.rl_dataset import RLHFDataset, collate_fn
    from verl.workers.config_helpers import load_tokenizer

    config = _prepare(config)
    check_generation_config(config)
    device = resolve_device(config)
    _set(config, "trainer.device", device)
    n_samples = int(config.data.n_samples)

    trust_remote_code = bool(cfg_select(config, "model.trust_remote_code", False)) or bool(
        cfg_select(config, "data.trust_remote_code", False))
    tokenizer = load_tokenizer(cfg_select(config, "model.tokenizer_path") or config.model.path, trust_remote_code)
    # tokenised (and checked: messages, prompt lengths) here, on the driver, before any worker starts
    dataset = RLHFDataset(config.data.path, tokenizer, _dataset_config(config))
    loader = DataLoader(dataset, batch_size=int(config.data.batch_size), shuffle=False, collate_fn=collate_fn)
    print(
        f"[verl] generating {n_samples} response(s) for each of {len(dataset)} prompts of {config.data.path} with "
        f"rollout.name={config.rollout.name} on {int(config.trainer.nnodes) * int(config.trainer.n_gpus_per_node)} "
        f"{device} worker(s)",
        flush=True)

    _start_ray(config, device)
    start = time.time()
    wg, pool = _build_worker_group(config, device)
    results: list[list[str]] = []
    try:
        for step, batch_dict in enumerate(loader):
            batch = DataProto.from_single_dict(batch_dict)
            tensor_keys = [k for k in _GEN_TENSOR_KEYS if k in batch.batch.keys()]
            non_tensor_keys = [k for k in _GEN_NON_TENSOR_KEYS if k in batch.non_tensor_batch]
            gen_batch = batch.select(batch_keys=tensor_keys, non_tensor_batch_keys=non_tensor_keys)
            gen_batch.meta_info = {"do_sample": bool(config.rollout.do_sample), "validate": False}
            gen_batch = gen_batch.repeat(repeat_times=n_samples, interleave=True)
            padded, pad_size = pad_dataproto_to_divisor(gen_batch, wg.world_size)
            output = unpad_dataproto(wg.generate_sequences(padded), pad_size)
            texts = _decode_responses(tokenizer, output)
            results.extend(texts[i:i + n_samples] for i in range(0, len(texts), n_samples))
            print(f"[verl] batch {step + 1}/{len(loader)}: {len(results)}/{len(dataset)} prompts done", flush=True)
    finally:
        wg.shutdown()
        pool.shutdown()
    _write_output(config.data.output_path, config.data.path, results)
    print(
        f"[verl] wrote {len(results)} rows x {n_samples} responses to {config.data.output_path} "
        f"({time.time() - start:.1f} s)",
        flush=True)
    timeline = cfg_select(config, "ray_init.timeline_json_file")
    if timeline:
        import ray

        ray.timeline(filename=str(timeline))
    return str(config.data.output_path)


@hydra.main(config_path="config", config_name="generation", version_base=None)
def main(config: DictConfig) -> Optional[str]:
    """Hydra entry point. A config error is printed as one line (exit status 2) instead of a traceback."""
    try:
        return run_generation(config)
    except ConfigError as exc:
        print(f"[verl] config error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
