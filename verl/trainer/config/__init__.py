"""Hydra configs of the trainers (``ppo_trainer.yaml``, ...). A package so that recipes can extend them with
``hydra.searchpath: [pkg://verl.trainer.config]`` from any working directory."""
