"""MATH-style scoring: the answer is the last ``\\boxed{...}`` of a response.

Two answers are equivalent when ``math_verify`` (optional, ``pip install math-verify``) says so, or, without it
(or when it fails), when their normalised LaTeX strings are equal or both denote the same number. The
normalisation covers what the MATH references and model outputs commonly differ in: ``\\dfrac``/``\\tfrac``,
``\\left``/``\\right``, spacing commands, ``\\text{}`` units, degrees, percent, ``x = `` prefixes, missing braces in
``\\frac12``/``\\sqrt3``, leading zeros of decimals, thousands separators.
"""
from __future__ import annotations

import logging
import re
import signal
import threading
from fractions import Fraction
from typing import Any

logger = logging.getLogger(__name__)

CLIP_CHARS = 300  # the DAPO-style scorer looks only at the tail, as answers come last

try:  # optional dependency: a symbolic checker that handles far more forms than string normalisation
    import math_verify as _math_verify  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the environment
    _math_verify = None

# ----------------------------------------------------------------------------------------------------------------------
# extraction


def _boxed_start(string: str) -> tuple[int, str] | None:
    """Index and command of the last ``\\boxed`` or ``\\fbox`` in ``string``."""
    best = None
    for command in ("\\boxed", "\\fbox"):
        i = string.rfind(command)
        while i >= 0:
            after = string[i + len(command):i + len(command) + 1]
            # "\boxedfoo" is another command; a box is followed by "{" or a space
            if after in ("{", " "):
                break
            i = string.rfind(command, 0, i)
        if i >= 0 and (best is None or i > best[0]):
            best = (i, command)
    return best


def last_boxed_only_string(string: str) -> str | None:
    """The last ``\\boxed{...}`` (braces balanced, nested ones kept) or ``\\boxed x`` of ``string``; None if absent
    or unterminated."""
    if not isinstance(string, str):
        return None
    found = _boxed_start(string)
    if found is None:
        return None
    start, command = found
    rest = string[start + len(command):]
    if rest.startswith(" "):
        # "\boxed 5$": the box ends at the end of the math span or of the text
        body = rest[1:].split("$")[0].strip()
        return f"{command} {body}" if body else None
    depth = 0
    for i, ch in enumerate(rest):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return command + rest[:i + 1]
    return None


def remove_boxed(s: str) -> str:
    """Content of a string returned by :func:`last_boxed_only_string`."""
    for command in ("\\boxed", "\\fbox"):
        if s.startswith(command + " "):
            return s[len(command) + 1:]
        if s.startswith(command + "{") and s.endswith("}"):
            return s[len(command) + 1:-1]
    raise ValueError(f"not a boxed expression: {s[:80]!r}")


def extract_boxed_answer(solution_str: str) -> str | None:
    """The content of the last box of a response, or None."""
    boxed = last_boxed_only_string(solution_str)
    return None if boxed is None else remove_boxed(boxed)


# ----------------------------------------------------------------------------------------------------------------------
# normalisation

_TEXT_WRAPPERS = ("\\text", "\\textbf", "\\mathrm", "\\mathbf", "\\mbox", "\\operatorname")
_SPACING = ("\\!", "\\,", "\\;", "\\:", "\\quad", "\\qquad", "~", "\\ ")
_UNIT_WORDS = ("degrees", "degree", "units", "unit", "cm", "meters", "meter", "inches", "inch", "feet", "foot",
               "dollars", "dollar", "cents", "cent", "square", "sq", "hours", "hour", "minutes", "minute", "seconds",
               "second", "days", "day", "mph", "km", "m", "ft")


def _unwrap_command(s: str, command: str) -> str:
    """Replace every ``\\command{X}`` (balanced braces) by ``X``."""
    out, i = [], 0
    token = command + "{"
    while True:
        j = s.find(token, i)
        if j < 0:
            out.append(s[i:])
            return "".join(out)
        out.append(s[i:j])
        depth, k = 0, j + len(command)
        while k < len(s):
            if s[k] == "{":
                depth += 1
            elif s[k] == "}":
                depth -= 1
                if depth == 0:
                    break
            k += 1
        if k >= len(s):  # unbalanced: keep the rest as is
            out.append(s[j:])
            return "".join(out)
        out.append(s[j + len(token):k])
        i = k + 1


def _fix_fracs(s: str) -> str:
    """``\\frac12`` -> ``\\frac{1}{2}``, ``\\frac1{2}`` -> ``\\frac{1}{2}``."""
    parts = s.split("\\frac")
    out = parts[0]
    for part in parts[1:]:
        out += "\\frac"
        if not part or part[0] == "{":
            out += part
            continue
        a, rest = part[0], part[1:]
        if rest[:1] == "{":
            out += "{" + a + "}" + rest
        elif rest:
            out += "{" + a + "}{" + rest[0] + "}" + rest[1:]
        else:
            out += "{" + a + "}"
    return out


def _fix_sqrt(s: str) -> str:
    """``\\sqrt3`` -> ``\\sqrt{3}``."""
    return re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)


def _slash_to_frac(s: str) -> str:
    """``a/b`` with integer parts -> ``\\frac{a}{b}``."""
    m = re.fullmatch(r"(-?)(\d+)/(\d+)", s)
    return f"{m.group(1)}\\frac{{{m.group(2)}}}{{{m.group(3)}}}" if m else s


def strip_string(string: Any) -> str:
    """Normalised form of a LaTeX answer, for string comparison."""
    s = str(string).strip()
    s = s.replace("\n", "").replace("\\\\", "\\")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("°", "")
    s = s.replace("\\$", "").replace("$", "")
    s = s.replace("\\%", "").replace("%", "")
    for sp in _SPACING:
        s = s.replace(sp, " ")
    # unit words after a number: "5 \text{ cm}" / "5 cm" -> "5"
    unit_alt = "|".join(_UNIT_WORDS)
    s = re.sub(r"\\(?:text|mbox|mathrm)\{\s*(?:" + unit_alt + r")(?:\^?\{?\d\}?)?\s*\}\s*$", "", s)
    s = re.sub(r"(?<=\d)\s+(?:" + unit_alt + r")(?:\^?\d)?\s*$", "", s)
    for wrapper in _TEXT_WRAPPERS:
        s = _unwrap_command(s, wrapper)
    s = s.strip()
    # "x = 5" -> "5" (a short variable name on the left only; "a=1,b=2" stays)
    m = re.fullmatch(r"[A-Za-z](?:_\{?\w+\}?)?\s*=\s*(.+)", s)
    if m and "=" not in m.group(1):
        s = m.group(1)
    s = s.replace(" ", "")
    s = s.rstrip(".")
    # decimals without a leading zero: ".5" -> "0.5"
    s = re.sub(r"(^|[^\d])\.(\d)", r"\g<1>0.\2", s)
    # thousands separators: "1,000" -> "1000" (only when the whole answer is such a number)
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    s = _fix_sqrt(s)
    s = _fix_fracs(s)
    s = _slash_to_frac(s)
    # "\frac{1}{2}" with redundant outer braces: "{5}" -> "5"
    while len(s) >= 2 and s[0] == "{" and s[-1] == "}" and _balanced(s[1:-1]):
        s = s[1:-1]
    return s


def _balanced(s: str) -> bool:
    depth = 0
    for ch in s:
        depth += (ch == "{") - (ch == "}")
        if depth < 0:
            return False
    return depth == 0


_FRAC = re.compile(r"(-?)\\frac\{(-?\d+(?:\.\d+)?)\}\{(-?\d+(?:\.\d+)?)\}")


def to_number(s: str) -> Fraction | None:
    """The exact value of a normalised answer that is a plain number or ``\\frac{a}{b}``; None otherwise."""
    try:
        if re.fullmatch(r"-?\d+(\.\d+)?", s):
            return Fraction(s)
        m = _FRAC.fullmatch(s)
        if m:
            den = Fraction(m.group(3))
            if den == 0:
                return None
            value = Fraction(m.group(2)) / den
            return -value if m.group(1) else value
    except (ValueError, ZeroDivisionError):
        return None
    return None


def is_equiv(str1: Any, str2: Any) -> bool:
    """Equivalence of two answers by normalised string, by value, or element-wise for comma-separated lists."""
    if str1 is None or str2 is None:
        return False
    a, b = strip_string(str1), strip_string(str2)
    if a == b:
        return True
    va, vb = to_number(a), to_number(b)
    if va is not None and vb is not None:
        return va == vb
    # tuples / lists / intervals with the same brackets: compare element-wise
    if a[:1] == b[:1] and a[-1:] == b[-1:] and a[:1] in "([" and a[-1:] in ")]":
        a, b = a[1:-1], b[1:-1]
    pa, pb = _split_top_level(a), _split_top_level(b)
    if len(pa) > 1 and len(pa) == len(pb):
        return all(is_equiv(x, y) for x, y in zip(pa, pb))
    return False


def _split_top_level(s: str) -> list[str]:
    """Split at commas that are not inside braces or brackets."""
    parts, depth, cur = [], 0, []
    for ch in s:
        if ch in "{([":
            depth += 1
        elif ch in "})]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def _math_verify_equiv(answer: str, ground_truth: str) -> bool | None:
    """math_verify's verdict, or None when it is not installed or cannot decide (so the string check decides)."""
    if _math_verify is None:
        return None
    # math_verify guards itself with signal.alarm, which fails off the main thread and, when done, cancels any
    # timer already running (a reward manager's per-sample limit, pytest-timeout). In both cases let the caller's
    # limit govern and switch math_verify's own off.
    own_alarm = threading.current_thread() is threading.main_thread() and not (hasattr(
        signal, "getitimer") and signal.getitimer(signal.ITIMER_REAL)[0] > 0)
    parse_kw = {} if own_alarm else {"parsing_timeout": None}
    verify_kw = {} if own_alarm else {"timeout_seconds": None}
    try:
        gold = _math_verify.parse("\\boxed{" + ground_truth + "}", **parse_kw)
        pred = _math_verify.parse("\\boxed{" + answer + "}", **parse_kw)
        if not gold or not pred:
            return None
        return bool(_math_verify.verify(gold, pred, **verify_kw))
    except Exception as exc:  # math_verify raises on odd LaTeX and on timeouts outside the main thread
        logger.debug("math_verify failed (%s: %s); falling back to string normalisation", type(exc).__name__, exc)
        return None


def answers_match(answer: str, ground_truth: Any, use_math_verify: bool | None = None) -> bool:
    """True when ``answer`` is equivalent to ``ground_truth``.

    ``use_math_verify``: None = use it when installed; False = string normalisation only; True = require it.
    """
    truth = str(ground_truth)
    if use_math_verify is True and _math_verify is None:
        raise ImportError("use_math_verify=True but math_verify is not installed: pip install math-verify "
                          "(or `pip install verl[math]`), or drop the option to use string normalisation.")
    if is_equiv(answer, truth):
        return True
    if use_math_verify is not False:
        verdict = _math_verify_equiv(answer, truth)
        if verdict is not None:
            return verdict
    return False


def compute_score(solution_str: str,
                  ground_truth: Any,
                  use_math_verify: bool | None = None,
                  format_score: float = 0.0,
                  score: float = 1.0,
                  **kwargs: Any) -> float:
    """``score`` when the last box equals the ground truth, ``format_score`` for a wrong box, 0 without a box."""
    answer = extract_boxed_answer(solution_str)
    if answer is None:
        return 0.0
    truth = ground_truth
    if isinstance(truth, str) and last_boxed_only_string(truth) is not None:
        truth = extract_boxed_answer(truth)  # a full reference solution was given as ground truth
    return float(score) if answers_match(answer, truth, use_math_verify) else float(format_score)


# ----------------------------------------------------------------------------------------------------------------------
# DAPO-style scoring (data sources "math_dapo", "math", "aime*"): +1 / -1 with accuracy and prediction reported

_ANSWER_LINE = re.compile(r"(?i)answer\s*:\s*([^\n]+)")


def extract_dapo_answer(solution_str: str) -> str | None:
    """The last box of the tail of a response, else the text after the last ``Answer:``."""
    if not isinstance(solution_str, str):
        return None
    tail = solution_str[-CLIP_CHARS:]
    boxed = extract_boxed_answer(tail)
    if boxed is not None:
        return boxed
    matches = _ANSWER_LINE.findall(tail)
    if matches:
        ans = matches[-1].strip().strip("$").strip()
        return ans or None
    return None


def compute_score_dapo(solution_str: str,
                       ground_truth: Any,
                       use_math_verify: bool | None = None,
                       **kwargs: Any) -> dict[str, Any]:
    """``{"score": 1.0 or -1.0, "acc": bool, "pred": str}``: a wrong or missing answer is penalised, not zero."""
    pred = extract_dapo_answer(solution_str)
    correct = pred is not None and answers_match(pred, ground_truth, use_math_verify)
    return {"score": 1.0 if correct else -1.0, "acc": bool(correct), "pred": "" if pred is None else pred}
