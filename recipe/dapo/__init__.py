"""DAPO (dynamic sampling, clip-higher, token-level loss, overlong reward shaping) as a verl recipe:
``python -m recipe.dapo.main_dapo``."""
