"""``python -m recipe.apr.main --config-name hs|hsp|hsp_cond10 [key=value ...]``: Adaptive Parallel Reasoning trained
with GRPO on countdown, through server-mode rollouts (``rollout.mode=async``) and the ``apr`` agent loop.

The driver fills in what the config leaves unset (generated countdown data with the variant's instruction when
``data.train_files`` is null, the tiny model when ``actor_rollout_ref.model.path`` is null), checks the ``apr.*``
keys, and hands over to :func:`verl.trainer.main_ppo.run_ppo` with :class:`AprTaskRunner`, which registers the
``apr`` agent loop in the process where the trainer's agent-loop manager runs.
"""
from __future__ import annotations

import os
import sys
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from verl.trainer.main_ppo import TaskRunner, run_ppo
from verl.utils.config import ConfigError, cfg_select

__all__ = ["AprTaskRunner", "prepare_apr_config", "main"]


def _set(config: DictConfig, key: str, value: Any) -> None:
    with open_dict(config):
        OmegaConf.update(config, key, value, merge=False, force_add=True)


class AprTaskRunner(TaskRunner):
    """main_ppo's TaskRunner with the ``apr`` agent loop registered (its trainer builds the agent-loop manager)."""

    def run(self, config: DictConfig) -> None:
        import recipe.apr.apr_agent_loop  # noqa: F401 - registers "apr" in this process

        super().run(config)


def prepare_apr_config(config: DictConfig) -> DictConfig:
    """Check ``apr.*``, and fill in the generated countdown data and the tiny model where the config leaves them
    unset. Raises :class:`~verl.utils.config.ConfigError` naming the key."""
    from recipe.apr.data import default_data_dir, instruction_for, write_apr_countdown_task
    from recipe.apr.spawn import AprSettings

    try:
        settings = AprSettings.from_config(config)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if cfg_select(config, "data.train_files") is None:
        sizes = cfg_select(config, "apr.data")
        sizes = OmegaConf.to_container(sizes, resolve=True) if OmegaConf.is_config(sizes) else dict(sizes or {})
        instruction = instruction_for(settings)
        local_dir = default_data_dir(instruction, sizes)
        train, test = os.path.join(local_dir, "train.parquet"), os.path.join(local_dir, "test.parquet")
        if not (os.path.isfile(train) and os.path.isfile(test)):
            print(f"[verl] apr: writing the countdown task to {local_dir}", flush=True)
            paths = write_apr_countdown_task(local_dir, instruction, **sizes)
            train, test = paths["train"], paths["test"]
        _set(config, "data.train_files", train)
        if cfg_select(config, "data.val_files") is None:
            _set(config, "data.val_files", test)
        print(f"[verl] apr: data.train_files is not set: using the generated countdown task ({train})", flush=True)
    if cfg_select(config, "actor_rollout_ref.model.path") is None:
        from verl.models.tiny import get_tiny_model_path

        path = get_tiny_model_path()
        _set(config, "actor_rollout_ref.model.path", path)
        print(f"[verl] apr: actor_rollout_ref.model.path is not set: using the tiny model {path}", flush=True)
    if str(cfg_select(config, "actor_rollout_ref.rollout.mode", "sync")) != "async":
        raise ConfigError("actor_rollout_ref.rollout.mode: APR runs through the agent loop. Fix: set "
                          "actor_rollout_ref.rollout.mode=async")
    prompt_len = int(cfg_select(config, "data.max_prompt_length", 512))
    if settings.max_model_len is not None and prompt_len >= settings.max_model_len:
        raise ConfigError(f"apr.max_model_len: ={settings.max_model_len} leaves no room to generate after prompts of "
                          f"data.max_prompt_length={prompt_len} tokens. Fix: raise apr.max_model_len or lower "
                          "data.max_prompt_length")
    return config


@hydra.main(config_path="config", config_name="hsp", version_base=None)
def main(config: DictConfig) -> None:
    """Hydra entry point; a config error exits with status 2 and one line."""
    try:
        run_ppo(prepare_apr_config(config), task_runner_class=AprTaskRunner)
    except ConfigError as exc:
        print(f"[verl] config error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
