"""``python -m recipe.minimal.main_minimal [key=value ...]``: main_ppo with :class:`RayMinimalTrainer`.

A recipe reuses main_ppo's driver (config preparation, validation, Ray start) and TaskRunner (workers, datasets,
rewards); it only says which trainer class to build.
"""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from verl.trainer.main_ppo import TaskRunner, run_ppo

__all__ = ["MinimalTaskRunner", "main"]


class MinimalTaskRunner(TaskRunner):
    """main_ppo's TaskRunner, building :class:`~recipe.minimal.minimal_ray_trainer.RayMinimalTrainer`."""

    def get_trainer_cls(self, config: DictConfig) -> type:
        from recipe.minimal.minimal_ray_trainer import RayMinimalTrainer

        return RayMinimalTrainer


@hydra.main(config_path="config", config_name="minimal_trainer", version_base=None)
def main(config: DictConfig) -> None:
    """Hydra entry point (config ``config/minimal_trainer.yaml``); config errors exit with status 2."""
    from verl.utils.config import ConfigError

    try:
        run_ppo(config, task_runner_class=MinimalTaskRunner)
    except ConfigError as exc:
        print(f"[verl] config error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
