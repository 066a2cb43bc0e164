"""The smallest complete recipe (own Hydra main, a yaml extending ``ppo_trainer``, a trainer subclass): GRPO that
also logs how diverse each prompt's responses are. The worked example of ``recipe/README.md``."""
