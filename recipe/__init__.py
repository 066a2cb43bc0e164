"""Recipes: algorithms built on verl by subclassing the trainer, each with its own Hydra main and yaml."""
