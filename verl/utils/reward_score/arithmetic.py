"""Scoring of the embedded default task (``data_source="arithmetic"``: "What is 12 + 7? ..." -> ``#### 19``).

The ground truth is the integer result as a string. Answers use the GSM8K format (``#### N``); by default
(``method="flexible"``) a response without ``####`` is scored on its last number, so a tiny model gets a learning
signal before it has picked up the format. ``method="strict"`` requires ``####``.
"""
from __future__ import annotations

from typing import Any

from verl.utils.reward_score.gsm8k import extract_solution, normalize_number


def extract_answer(solution_str: str, method: str = "flexible") -> str | None:
    """The normalised answer: the number after the last ``####``; in flexible mode, else the last number."""
    if method not in ("strict", "flexible"):
        raise ValueError(f"arithmetic method must be 'strict' or 'flexible', got {method!r}")
    answer = extract_solution(solution_str, method="strict")
    if answer is None and method == "flexible":
        answer = extract_solution(solution_str, method="flexible")
    return answer


def compute_score(solution_str: str,
                  ground_truth: Any,
                  method: str = "flexible",
                  format_score: float = 0.0,
                  score: float = 1.0,
                  **kwargs: Any) -> float:
    """``score`` for the right number, ``format_score`` for a wrong one, 0 when the response has no number."""
    truth = normalize_number(ground_truth)
    if truth is None:
        raise ValueError(f"arithmetic ground_truth must be a number (reward_model.ground_truth of the data row), "
                         f"got {ground_truth!r}")
    answer = extract_answer(solution_str, method=method)
    if answer is None:
        return 0.0
    return float(score) if answer == truth else float(format_score)
