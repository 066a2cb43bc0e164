"""GSM8K scoring: the final answer follows ``####`` (strict) or is the last number in the text (flexible).

Only the tail of a response is searched (``CLIP_CHARS``): answers come last, and regexes over a runaway
generation of many thousand tokens would otherwise dominate the reward time.
"""
from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any

CLIP_CHARS = 300

# A number as people write it in answers: optional sign (not the minus of "12-7"), digits with optional thousands
# commas ("1,234" but not the list "1,2,3"), optional decimals. "$" may precede the digits ("$1,200"); a trailing
# "." (end of sentence) is not part of the number.
_NUMBER = r"(?:(?<![\w)])-)?\$?\s?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"
_STRICT = re.compile(r"####\s*(" + _NUMBER + r")")
_FLEXIBLE = re.compile(_NUMBER)


def normalize_number(text: Any) -> str | None:
    """Canonical string of a number written with commas, ``$``, spaces or a trailing period; None if not a number.

    ``"$1,234.50."`` -> ``"1234.5"``, ``"72.00"`` -> ``"72"``, ``"-3"`` -> ``"-3"``. Ground truths are passed through
    the same function so ``"72"`` and ``72`` and ``"72.0"`` all compare equal.
    """
    if text is None or isinstance(text, bool):
        return None
    s = str(text).strip().rstrip(".").replace(",", "").replace("$", "").replace(" ", "")
    if not s:
        return None
    try:
        value = Decimal(s)
    except (InvalidOperation, ValueError):
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_solution(solution_str: str, method: str = "strict") -> str | None:
    """The answer string of a response (normalised), or None when the response has none.

    ``strict``: the number after the last ``####``. ``flexible``: the last number anywhere in the tail.
    """
    if method not in ("strict", "flexible"):
        raise ValueError(f"gsm8k method must be 'strict' or 'flexible', got {method!r}")
    if not isinstance(solution_str, str):
        return None
    tail = solution_str[-CLIP_CHARS:]
    if method == "strict":
        matches = _STRICT.findall(tail)
    else:
        matches = _FLEXIBLE.findall(tail)
    for candidate in reversed(matches):
        normalized = normalize_number(candidate)
        if normalized is not None:
            return normalized
    return None


def compute_score(solution_str: str,
                  ground_truth: Any,
                  method: str = "strict",
                  format_score: float = 0.0,
                  score: float = 1.0,
                  **kwargs: Any) -> float:
    """``score`` if the extracted answer equals the ground truth, ``format_score`` if an answer was found but is
    wrong, 0 when no answer could be extracted."""
    answer = extract_solution(solution_str, method=method)
    if answer is None:
        return 0.0
    truth = normalize_number(ground_truth)
    if truth is None:
        # A non-numeric ground truth (a data problem, not a model one): compare the raw strings.
        truth = str(ground_truth).strip()
    return float(score) if answer == truth else float(format_score)
