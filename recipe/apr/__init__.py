"""Adaptive Parallel Reasoning (APR) on countdown with GRPO: see recipe/apr/README.md."""
