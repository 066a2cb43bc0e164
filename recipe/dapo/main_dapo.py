"""``python -m recipe.dapo.main_dapo [key=value ...]``: DAPO training (config ``config/dapo_trainer.yaml``, which
extends verl's ``ppo_trainer.yaml``).

Everything but the trainer class and the reward manager's arguments is main_ppo's: the same config preparation
(embedded default included), validation on the driver, Ray start and :class:`~verl.trainer.main_ppo.TaskRunner`.
"""
from __future__ import annotations

import sys
from typing import Any, Optional

import hydra
from omegaconf import DictConfig

from verl.trainer.main_ppo import TaskRunner, prepare_config, run_ppo
from verl.utils.config import cfg_select

__all__ = ["DAPOTaskRunner", "main", "run_dapo"]


def _accepted_params(cls: type) -> set[str]:
    import inspect

    return {
        name for name, p in inspect.signature(cls.__init__).parameters.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


class DAPOTaskRunner(TaskRunner):
    """main_ppo's TaskRunner building :class:`~recipe.dapo.dapo_ray_trainer.RayDAPOTrainer`, with the overlong
    buffer (``reward_model.overlong_buffer``) and ``data.max_response_length`` passed to the reward manager."""

    def get_trainer_cls(self, config: DictConfig) -> type:
        from recipe.dapo.dapo_ray_trainer import RayDAPOTrainer

        return RayDAPOTrainer

    def reward_manager_kwargs(self, config: DictConfig) -> dict[str, Any]:
        """``reward_model.reward_kwargs`` plus ``max_resp_len`` and ``overlong_buffer_cfg`` for a manager that takes
        them (``dapo``). An ``overlong_buffer_cfg`` in reward_kwargs (newer upstream scripts:
        ``+reward_model.reward_kwargs.overlong_buffer_cfg.len=...``) is laid over ``reward_model.overlong_buffer``."""
        from recipe.dapo.dapo_ray_trainer import overlong_buffer_config
        from verl.workers.reward_manager import get_reward_manager_cls

        kwargs = super().reward_manager_kwargs(config)
        manager = get_reward_manager_cls(str(cfg_select(config, "reward_model.reward_manager", "naive")))
        accepted = _accepted_params(manager)
        if "max_resp_len" in accepted:
            kwargs.setdefault("max_resp_len", int(config.data.max_response_length))
        if "overlong_buffer_cfg" in accepted:
            kwargs["overlong_buffer_cfg"] = overlong_buffer_config(config)
        return kwargs


def run_dapo(config: DictConfig, task_runner_class: Optional[type] = None) -> None:
    """Prepare the config as main_ppo does, check the DAPO keys, then :func:`~verl.trainer.main_ppo.run_ppo` with
    :class:`DAPOTaskRunner` (or ``task_runner_class``, a subclass of it)."""
    from recipe.dapo.dapo_ray_trainer import validate_dapo_config

    config = prepare_config(config)
    validate_dapo_config(config)
    run_ppo(config, task_runner_class=task_runner_class or DAPOTaskRunner)


@hydra.main(config_path="config", config_name="dapo_trainer", version_base=None)
def main(config: DictConfig) -> None:
    """Hydra entry point; a config error is printed as one line (exit status 2), as in main_ppo."""
    from verl.utils.config import ConfigError

    try:
        run_dapo(config)
    except ConfigError as exc:
        print(f"[verl] config error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
