"""``python -m verl.trainer.main_ppo [key=value ...]``: PPO / GRPO / ... training from the ``ppo_trainer.yaml`` tree.

The driver (this process) prepares and checks the config, starts or joins Ray, and runs a :class:`TaskRunner`
actor that builds the tokenizer, datasets, reward functions and worker roles and runs ``RayPPOTrainer.fit()``.
Config errors are raised here, on the driver, before any Ray actor exists.

With no arguments it runs the **embedded default**: GRPO on a generated arithmetic task (written once under
``$VERL_DATA_CACHE``, default ``~/.cache/verl/data``) with the project's tiny model, sized for a laptop CPU.
Any key can still be overridden; ``data.train_files`` / ``actor_rollout_ref.model.path`` switch to your own data
and model.
"""
from __future__ import annotations

import os
import socket
import sys
import time
from pprint import pprint
from typing import Any, Optional

import hydra
import ray
from omegaconf import DictConfig, OmegaConf, open_dict

from verl.utils.config import cfg_select, need_critic, need_reference_policy, resolve_device, validate_config

__all__ = [
    "main",
    "run_ppo",
    "TaskRunner",
    "create_rl_dataset",
    "create_rl_sampler",
    "get_ppo_ray_runtime_env",
    "prepare_config",
    "EMBEDDED_DEFAULT_OVERRIDES",
]

DATA_CACHE_ENV = "VERL_DATA_CACHE"

#: Settings of the embedded default run (no ``data.train_files``): a small GRPO run on the arithmetic task that
#: finishes in minutes on a CPU. Each applies only where the config still holds the ``ppo_trainer.yaml`` default,
#: so ``key=value`` on the command line always wins.
EMBEDDED_DEFAULT_OVERRIDES: dict[str, Any] = {
    "algorithm.adv_estimator": "grpo",
    "data.train_batch_size": 32,
    "data.max_prompt_length": 32,
    "data.max_response_length": 48,
    "data.val_max_samples": 128,
    "actor_rollout_ref.rollout.n": 4,
    "actor_rollout_ref.rollout.temperature": 0.6,
    "actor_rollout_ref.actor.ppo_mini_batch_size": 16,
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu": 16,
    "actor_rollout_ref.actor.optim.lr": 3e-5,
    "actor_rollout_ref.actor.use_torch_compile": False,
    "actor_rollout_ref.model.enable_gradient_checkpointing": False,
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu": 32,
    "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu": 32,
    "critic.ppo_micro_batch_size_per_gpu": 16,
    "critic.model.enable_gradient_checkpointing": False,
    "trainer.total_training_steps": 50,
    "trainer.test_freq": 10,
    "trainer.project_name": "verl_quickstart",
    "trainer.experiment_name": "arithmetic_grpo_tiny",
}

# config keys that name local files or output directories: made absolute on the driver, so that the TaskRunner and
# the workers (whose working directory may differ on a cluster) see the same paths
_OUTPUT_DIR_KEYS = ("trainer.default_local_dir", "trainer.rollout_data_dir", "trainer.validation_data_dir")
_INPUT_PATH_KEYS = ("data.train_files", "data.val_files", "actor_rollout_ref.model.path",
                    "actor_rollout_ref.model.tokenizer_path", "critic.model.path", "critic.model.tokenizer_path",
                    "reward_model.model.path", "reward_model.model.input_tokenizer", "custom_reward_function.path",
                    "trainer.resume_from_path", "data.sampler.class_path", "data.custom_cls.path")

# ----------------------------------------------------------------------------------------------------------------------
# config preparation (driver)
# ----------------------------------------------------------------------------------------------------------------------


def _default_config() -> DictConfig:
    """``ppo_trainer.yaml`` as shipped (interpolations unresolved), to tell defaults from user settings."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config", "ppo_trainer.yaml")
    return OmegaConf.load(path)


def _set(config: DictConfig, key: str, value: Any) -> None:
    with open_dict(config):
        OmegaConf.update(config, key, value, merge=False, force_add=True)


def _embedded_data_files() -> tuple[str, str]:
    """The arithmetic task's train/test parquet files, written on first use."""
    from verl.utils.dataset.tasks import write_arithmetic_task

    root = os.path.abspath(
        os.path.expanduser(os.environ.get(DATA_CACHE_ENV) or os.path.join("~", ".cache", "verl", "data")))
    local_dir = os.path.join(root, "arithmetic")
    train, test = os.path.join(local_dir, "train.parquet"), os.path.join(local_dir, "test.parquet")
    if not (os.path.isfile(train) and os.path.isfile(test)):
        print(f"[verl] writing the embedded default task (arithmetic) to {local_dir}", flush=True)
        paths = write_arithmetic_task(local_dir)
        train, test = paths["train"], paths["test"]
    return train, test


def _embedded_model_path() -> str:
    """The policy of the embedded default: the tiny model warmed up with SFT on part of the arithmetic task (RL from
    random weights cannot learn arithmetic); built once and cached, see :mod:`verl.trainer.embedded_default`."""
    from verl.trainer.embedded_default import get_warmed_model_path

    return get_warmed_model_path()


def _absolutize(config: DictConfig) -> None:
    for key in _OUTPUT_DIR_KEYS:
        value = cfg_select(config, key)
        if isinstance(value, str) and value and "://" not in value:
            _set(config, key, os.path.abspath(os.path.expanduser(value)))
    for key in _INPUT_PATH_KEYS:
        value = cfg_select(config, key)
        if isinstance(value, str):
            items, single = [value], True
        elif OmegaConf.is_list(value) or isinstance(value, (list, tuple)):
            items, single = [str(v) for v in value], False
        else:
            continue
        fixed = []
        for item in items:
            local = os.path.expanduser(item)
            # only paths that exist here: hub ids (org/name) and remote URLs stay as they are
            fixed.append(os.path.abspath(local) if "://" not in item and os.path.exists(local) else item)
        _set(config, key, fixed[0] if single else fixed)


def prepare_config(config: DictConfig) -> DictConfig:
    """Fill in the embedded default where the config leaves data/model unset, resolve interpolations and make local
    paths absolute. Returns the (modified) config."""
    if not isinstance(config, DictConfig):
        config = OmegaConf.create(config)
    embedded = cfg_select(config, "data.train_files") is None
    if embedded:
        defaults = _default_config()
        for key, value in EMBEDDED_DEFAULT_OVERRIDES.items():
            current = OmegaConf.select(config, key, default=None, throw_on_missing=False)
            default = OmegaConf.select(defaults, key, default=None, throw_on_missing=False)
            if current == default:
                _set(config, key, value)
        train, test = _embedded_data_files()
        _set(config, "data.train_files", train)
        if cfg_select(config, "data.val_files") is None:
            _set(config, "data.val_files", test)
        print(
            f"[verl] data.train_files is not set: running the embedded default (GRPO on the arithmetic task, "
            f"{train})",
            flush=True)
    if cfg_select(config, "actor_rollout_ref.model.path") is None:
        path = _embedded_model_path()
        _set(config, "actor_rollout_ref.model.path", path)
        print(f"[verl] actor_rollout_ref.model.path is not set: using the embedded tiny model {path}", flush=True)
    OmegaConf.resolve(config)
    _absolutize(config)
    return config


# Ulysses sequence parallelism works on packed (remove-padding) sequences: (sp size key, the padding switch it needs)
_SP_NEEDS_REMOVE_PADDING = (
    ("actor_rollout_ref.actor.ulysses_sequence_parallel_size", "actor_rollout_ref.model.use_remove_padding"),
    ("actor_rollout_ref.ref.ulysses_sequence_parallel_size", "actor_rollout_ref.model.use_remove_padding"),
    ("critic.ulysses_sequence_parallel_size", "critic.model.use_remove_padding"),
)


def _preflight(config: DictConfig) -> None:
    """Checks beyond :func:`validate_config` that concern what this trainer supports."""
    from verl.utils.config import ConfigError

    mode = str(cfg_select(config, "actor_rollout_ref.rollout.mode", "sync"))
    if mode == "async":
        # server mode: the actor's rank 0 owns a rollout server chosen by rollout.name (verl.workers.fsdp_async_workers;
        # rollout.placement and server_address are checked by validate_config)
        name = str(cfg_select(config, "actor_rollout_ref.rollout.name", "hf"))
        if name not in ("hf", "sglang", "vllm"):
            raise ConfigError(f"actor_rollout_ref.rollout.name: ={name} has no rollout server for "
                              "actor_rollout_ref.rollout.mode=async. Fix: set it to hf, sglang or vllm")
    elif mode != "sync":
        raise ConfigError(f"actor_rollout_ref.rollout.mode: ={mode} is unknown. Fix: set "
                          "actor_rollout_ref.rollout.mode to sync or async")
    # what the FSDP workers (verl.workers.fsdp_workers) cannot do yet: fail here rather than inside a worker
    for key in ("actor_rollout_ref.model.lora_rank", "critic.model.lora_rank"):
        if int(cfg_select(config, key, 0) or 0) > 0:
            raise ConfigError(f"{key}: LoRA is not supported by the FSDP workers. Fix: set {key}=0")
    for key, padding_key in _SP_NEEDS_REMOVE_PADDING:
        if int(cfg_select(config, key, 1) or 1) > 1 and not bool(cfg_select(config, padding_key, False)):
            raise ConfigError(f"{key}: Ulysses sequence parallelism splits packed sequences and needs "
                              f"{padding_key}=true. Fix: set {padding_key}=true or {key}=1")
    strategy_keys = ["actor_rollout_ref.actor.strategy"] + (["critic.strategy"] if need_critic(config) else [])
    for key in strategy_keys:
        strategy = str(cfg_select(config, key, "fsdp"))
        if strategy == "megatron":
            problems = _megatron_backend_problems(config)
            if problems:
                raise ConfigError(f"{key}: =megatron, but the Megatron backend cannot run here: {'; '.join(problems)}. "
                                  "Fix: `pip install megatron-core==0.16.1` (or `pip install -e .[megatron]`), or use "
                                  f"the FSDP backend ({key}=fsdp, i.e. drop --config-name ppo_megatron_trainer)")
            if key == "critic.strategy" and _uses_megatron(config, "actor_rollout_ref.actor.strategy"):
                # the roles share worker processes, hence megatron's (process-global) parallel state
                for part in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size",
                             "expert_model_parallel_size"):
                    actor_size = int(cfg_select(config, f"actor_rollout_ref.actor.megatron.{part}", 1) or 1)
                    critic_size = int(cfg_select(config, f"critic.megatron.{part}", 1) or 1)
                    if actor_size != critic_size:
                        raise ConfigError(
                            f"critic.megatron.{part}: ={critic_size} differs from actor_rollout_ref.actor.megatron."
                            f"{part}={actor_size}, but the critic and the actor share worker processes and Megatron's "
                            f"parallel state. Fix: set critic.megatron.{part}={actor_size}")
        elif strategy not in ("fsdp", "fsdp2"):
            raise ConfigError(f"{key}: ={strategy} has no worker implementation in this package. Fix: set {key}=fsdp")


def _megatron_backend_problems(config: DictConfig) -> list[str]:
    """What is missing for ``strategy=megatron`` here (empty when the backend can run)."""
    import importlib.util

    def importable(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            return False

    problems = []
    if not importable("megatron.core"):
        problems.append("megatron-core is not installed")
    return problems


def _uses_megatron(config: DictConfig, key: str) -> bool:
    """Whether the role at ``key`` (a ``*.strategy`` key) runs on the Megatron workers."""
    return str(cfg_select(config, key, "fsdp")) == "megatron"


def _validate_in_runner(config: DictConfig) -> None:
    """:func:`validate_config` inside the TaskRunner actor, which holds no GPU: a ``trainer.device=cuda`` that the
    driver already checked is not checked again against this process's (empty) device list."""
    from verl.utils.device import is_cuda_available

    if str(cfg_select(config, "trainer.device", "auto")) == "cuda" and not is_cuda_available():
        config = config.copy()
        _set(config, "trainer.device", "auto")
    validate_config(config)


def get_ppo_ray_runtime_env(device: Optional[str] = None) -> dict[str, Any]:
    """Environment variables for every Ray process of a PPO run (quiet engines, sane NCCL settings); a variable the
    user already set keeps its value. ``device='cpu'`` also forces the CPU path in the workers."""
    env = {
        "TOKENIZERS_PARALLELISM": "true",
        "NCCL_DEBUG": "WARN",
        "VLLM_LOGGING_LEVEL": "WARN",
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true",
        "CUDA_DEVICE_MAX_CONNECTIONS": "1",
        "NCCL_CUMEM_ENABLE": "0",
        "VLLM_DISABLE_COMPILE_CACHE": "1",
    }
    if device == "cpu":
        env["VERL_DEVICE"] = "cpu"
    return {"env_vars": {k: v for k, v in env.items() if k not in os.environ}}


def _ray_init_kwargs(config: DictConfig) -> dict[str, Any]:
    kwargs = cfg_select(config, "ray_kwargs.ray_init")
    kwargs = OmegaConf.to_container(kwargs, resolve=True) if OmegaConf.is_config(kwargs) else dict(kwargs or {})
    return {k: v for k, v in kwargs.items() if v is not None}


def run_ppo(config: DictConfig, task_runner_class: Optional[type] = None) -> None:
    """Prepare and validate ``config`` here (no Ray actor exists before it passes), start or join Ray, and run the
    training in a :class:`TaskRunner` actor (``task_runner_class`` to use a subclass)."""
    config = prepare_config(config)
    validate_config(config)
    _preflight(config)
    device = resolve_device(config)
    # decided here, where the devices are visible: the TaskRunner actor holds no GPU, so "auto" would mean CPU there
    _set(config, "trainer.device", device)
    if not ray.is_initialized():
        from verl.single_controller.ray import init_ray

        init_kwargs = _ray_init_kwargs(config)
        init_kwargs.setdefault("runtime_env", get_ppo_ray_runtime_env(device))
        init_ray(**init_kwargs)

    runner_cls = task_runner_class or TaskRunner
    if not hasattr(runner_cls, "remote"):
        runner_cls = ray.remote(num_cpus=1)(runner_cls)
    options: dict[str, Any] = {}
    if device == "cpu":
        options["runtime_env"] = {"env_vars": {"VERL_DEVICE": "cpu"}}
    runner = runner_cls.options(**options).remote() if options else runner_cls.remote()
    try:
        ray.get(runner.run.remote(config))
    finally:
        ray.kill(runner, no_restart=True)
    timeline = cfg_select(config, "ray_kwargs.timeline_json_file")
    if timeline:
        ray.timeline(filename=str(timeline))


# ----------------------------------------------------------------------------------------------------------------------
# building blocks (run inside the TaskRunner; recipes import them)
# ----------------------------------------------------------------------------------------------------------------------


def create_rl_dataset(data_paths: Any,
                      data_config: Any,
                      tokenizer: Any,
                      processor: Any = None,
                      is_train: bool = True,
                      max_samples: int = -1) -> Any:
    """The RL dataset (``RLHFDataset`` or ``data.custom_cls``) for ``data_paths``."""
    from verl.utils.dataset.rl_dataset import get_dataset_class

    dataset_cls = get_dataset_class(data_config)
    return dataset_cls(data_files=data_paths,
                       tokenizer=tokenizer,
                       config=data_config,
                       processor=processor,
                       max_samples=max_samples)


def create_rl_sampler(data_config: Any, data_source: Any) -> Any:
    """The training sampler: ``data.sampler`` (e.g. a curriculum), seeded shuffle, or sequential order."""
    from verl.utils.dataset.sampler import create_rl_sampler as _create

    return _create(data_config, data_source)


def _load_tokenizer(path: str, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:  # generation and padding need a pad token: use EOS, as upstream does
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_processor(path: str, trust_remote_code: bool) -> Any:
    """A multimodal processor when the model has one (``None`` for text-only models)."""
    markers = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json")
    if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, m)) for m in markers):
        return None  # a local text-only model: skip AutoProcessor, whose imports alone take seconds
    try:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - text-only models have no processor
        return None
    if processor is not None and "Processor" not in type(processor).__name__:
        return None  # AutoProcessor falls back to the tokenizer for text-only models
    return processor


class TaskRunner:
    """Builds everything a run needs and runs the trainer; executed as a Ray actor (``ray.remote(num_cpus=1)``)
    so the controller does not occupy the head node's driver process.

    Subclass it and pass ``run_ppo(config, task_runner_class=MyRunner)`` to change how workers or rewards are
    built; ``add_*_worker`` register roles into ``self.role_worker_mapping`` / ``self.mapping``. Recipes override
    :meth:`get_trainer_cls` (their trainer subclass) and :meth:`reward_manager_kwargs` (see ``recipe/README.md``).
    """

    def __init__(self) -> None:
        self.role_worker_mapping: dict[Any, type] = {}
        self.mapping: dict[Any, str] = {}

    # roles -----------------------------------------------------------------------------------------------------
    def add_actor_rollout_worker(self, config: DictConfig) -> tuple[type, type]:
        from verl.single_controller.ray import RayWorkerGroup
        from verl.trainer.ppo.ray_trainer import Role
        if _uses_megatron(config, "actor_rollout_ref.actor.strategy"):
            from verl.workers.megatron_workers import ActorRolloutRefWorker
        else:
            from verl.workers.fsdp_workers import ActorRolloutRefWorker

        worker_cls = ActorRolloutRefWorker
        if str(cfg_select(config, "actor_rollout_ref.rollout.mode", "sync")) == "async":
            if _uses_megatron(config, "actor_rollout_ref.actor.strategy"):
                from verl.utils.config import ConfigError

                raise ConfigError("actor_rollout_ref.rollout.mode: =async is not supported with strategy=megatron. "
                                  "Fix: set actor_rollout_ref.rollout.mode=sync")
            from verl.workers.fsdp_async_workers import AsyncActorRolloutRefWorker

            worker_cls = AsyncActorRolloutRefWorker
        self.role_worker_mapping[Role.ActorRollout] = worker_cls
        self.mapping[Role.ActorRollout] = "global_pool"
        return worker_cls, RayWorkerGroup

    def add_critic_worker(self, config: DictConfig) -> None:
        from verl.trainer.ppo.ray_trainer import Role
        if _uses_megatron(config, "critic.strategy"):
            from verl.workers.megatron_workers import CriticWorker
        else:
            from verl.workers.fsdp_workers import CriticWorker

        self.role_worker_mapping[Role.Critic] = CriticWorker
        self.mapping[Role.Critic] = "global_pool"

    def add_reward_model_worker(self, config: DictConfig) -> None:
        from verl.trainer.ppo.ray_trainer import Role
        if _uses_megatron(config, "reward_model.strategy"):
            from verl.workers.megatron_workers import RewardModelWorker
        else:
            from verl.workers.fsdp_workers import RewardModelWorker

        self.role_worker_mapping[Role.RewardModel] = RewardModelWorker
        use_own_pool = bool(cfg_select(config, "reward_model.enable_resource_pool", False))
        self.mapping[Role.RewardModel] = "reward_pool" if use_own_pool else "global_pool"

    def add_ref_policy_worker(self, config: DictConfig, ref_policy_cls: type) -> None:
        from verl.trainer.ppo.ray_trainer import Role

        self.role_worker_mapping[Role.RefPolicy] = ref_policy_cls
        self.mapping[Role.RefPolicy] = "global_pool"

    def init_resource_pool_mgr(self, config: DictConfig) -> Any:
        """``global_pool`` of ``trainer.n_gpus_per_node`` processes on each of ``trainer.nnodes`` nodes (CPU
        processes on a CPU run), plus a ``reward_pool`` when ``reward_model.enable_resource_pool``."""
        from verl.trainer.ppo.ray_trainer import ResourcePoolManager

        spec = {"global_pool": [int(config.trainer.n_gpus_per_node)] * int(config.trainer.nnodes)}
        if bool(cfg_select(config, "reward_model.enable_resource_pool", False)):
            rm_procs, rm_nodes = int(config.reward_model.n_gpus_per_node), int(config.reward_model.nnodes)
            if rm_procs <= 0 or rm_nodes <= 0:
                raise ValueError("reward_model.enable_resource_pool=True needs reward_model.n_gpus_per_node and "
                                 "reward_model.nnodes > 0")
            spec["reward_pool"] = [rm_procs] * rm_nodes
        return ResourcePoolManager(resource_pool_spec=spec,
                                   mapping=dict(self.mapping),
                                   use_gpu=resolve_device(config) == "cuda")

    # recipe hooks ----------------------------------------------------------------------------------------------
    def get_trainer_cls(self, config: DictConfig) -> type:
        """The trainer class :meth:`run` builds: recipes return their ``RayPPOTrainer`` subclass (same constructor)."""
        from verl.trainer.ppo.ray_trainer import RayPPOTrainer

        return RayPPOTrainer

    def reward_manager_kwargs(self, config: DictConfig) -> dict[str, Any]:
        """Keyword arguments of both reward managers (default: ``reward_model.reward_kwargs``); recipes add theirs."""
        kwargs = cfg_select(config, "reward_model.reward_kwargs") or OmegaConf.create({})
        return OmegaConf.to_container(kwargs, resolve=True) if OmegaConf.is_config(kwargs) else dict(kwargs)

    # run -------------------------------------------------------------------------------------------------------
    def run(self, config: DictConfig) -> None:
        """Validate, build tokenizer / datasets / reward functions / roles, then ``init_workers()`` and ``fit()``."""
        from verl.trainer.ppo.reward import load_reward_manager

        print(f"[verl] TaskRunner on {socket.gethostname()}, pid {os.getpid()}", flush=True)
        if not isinstance(config, DictConfig):
            config = OmegaConf.create(config)
        OmegaConf.resolve(config)
        pprint(OmegaConf.to_container(config, resolve=True))
        _validate_in_runner(config)
        _preflight(config)
        device = resolve_device(config)

        actor_rollout_cls, ray_worker_group_cls = self.add_actor_rollout_worker(config)
        if need_critic(config):
            self.add_critic_worker(config)
        if bool(cfg_select(config, "reward_model.enable", False)):
            self.add_reward_model_worker(config)
        lora = int(cfg_select(config, "actor_rollout_ref.model.lora_rank", 0) or 0) > 0
        if need_reference_policy(config) and not lora:  # with LoRA the actor serves as reference (adapter off)
            self.add_ref_policy_worker(config, actor_rollout_cls)

        model = config.actor_rollout_ref.model
        trust_remote_code = bool(cfg_select(config, "data.trust_remote_code", False)) or bool(
            cfg_select(model, "trust_remote_code", False))
        tokenizer_path = cfg_select(model, "tokenizer_path") or model.path
        tokenizer = _load_tokenizer(str(tokenizer_path), trust_remote_code)
        processor = _load_processor(str(tokenizer_path), trust_remote_code)

        reward_kwargs = self.reward_manager_kwargs(config)
        reward_fn = load_reward_manager(config, tokenizer, num_examine=0, **reward_kwargs)
        val_reward_fn = load_reward_manager(config, tokenizer, num_examine=1, **reward_kwargs)
        resource_pool_manager = self.init_resource_pool_mgr(config)

        train_dataset = create_rl_dataset(config.data.train_files,
                                          config.data,
                                          tokenizer,
                                          processor,
                                          is_train=True,
                                          max_samples=int(cfg_select(config, "data.train_max_samples", -1) or -1))
        val_dataset = None
        if cfg_select(config, "data.val_files"):
            val_dataset = create_rl_dataset(config.data.val_files,
                                            config.data,
                                            tokenizer,
                                            processor,
                                            is_train=False,
                                            max_samples=int(cfg_select(config, "data.val_max_samples", -1) or -1))
        from verl.utils.dataset.rl_dataset import collate_fn

        train_sampler = create_rl_sampler(config.data, train_dataset)

        trainer_cls = self.get_trainer_cls(config)
        trainer = trainer_cls(config=config,
                              tokenizer=tokenizer,
                              processor=processor,
                              role_worker_mapping=self.role_worker_mapping,
                              resource_pool_manager=resource_pool_manager,
                              ray_worker_group_cls=ray_worker_group_cls,
                              reward_fn=reward_fn,
                              val_reward_fn=val_reward_fn,
                              train_dataset=train_dataset,
                              val_dataset=val_dataset,
                              collate_fn=collate_fn,
                              train_sampler=train_sampler,
                              device_name=device)
        start = time.time()
        try:
            trainer.init_workers()
            trainer.fit()
        finally:
            trainer.shutdown()
            logger = getattr(trainer, "logger", None)
            if logger is not None:
                logger.finish()
        print(f"[verl] training finished in {time.time() - start:.1f} s", flush=True)


@hydra.main(config_path="config", config_name="ppo_trainer", version_base=None)
def main(config: DictConfig) -> None:
    """Hydra entry point: ``python -m verl.trainer.main_ppo key=value ...``. A config error is printed as one line
    (exit status 2) instead of a traceback."""
    from verl.utils.config import ConfigError

    try:
        run_ppo(config)
    except ConfigError as exc:
        print(f"[verl] config error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
