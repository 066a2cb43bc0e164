"""The spawn/join text protocol of Adaptive Parallel Reasoning (APR) and its limits.

A thread (the parent, or a child) may delegate work by writing a spawn block::

    <spawn>
    Using the numbers [3, 5], write an equation that equals 8. ...
    Using the numbers [15, 1], write an equation that equals 16. ...
    </spawn>

Each non-empty line is one child's prompt. The children run in parallel, each in its own fresh context; when all are
done, their results come back into the parent's context as one join block, one ``<result>`` per spawned line (in
order), and the parent continues::

    <join>
    <result>3 + 5</result>
    <result>not run: at most 4 children per spawn</result>
    </join>

A child's result is the content of its last ``<answer>...</answer>`` (what the countdown prompts ask for), else the
end of its text. The join block is fed back as observation tokens (``response_mask`` 0): the parent is not trained
to write it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

__all__ = [
    "SPAWN_OPEN", "SPAWN_CLOSE", "JOIN_OPEN", "JOIN_CLOSE", "SpawnCall", "AprSettings", "parse_spawn", "spawn_cut",
    "child_result", "format_join", "sanitize"
]

SPAWN_OPEN, SPAWN_CLOSE = "<spawn>", "</spawn>"
JOIN_OPEN, JOIN_CLOSE = "<join>", "</join>"
RESULT_OPEN, RESULT_CLOSE = "<result>", "</result>"
_PROTOCOL_TAGS = (SPAWN_OPEN, SPAWN_CLOSE, JOIN_OPEN, JOIN_CLOSE, RESULT_OPEN, RESULT_CLOSE, "<answer>", "</answer>")
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
NO_RESULT = "(no result)"


@dataclass
class SpawnCall:
    """One spawn block in a thread's text: ``text[start:end]`` is ``<spawn>...</spawn>``."""

    start: int
    end: int
    prompts: list[str]


def parse_spawn(text: str) -> SpawnCall | None:
    """The first complete spawn block of ``text`` (None when there is none, or it is not closed yet)."""
    start = text.find(SPAWN_OPEN)
    if start < 0:
        return None
    close = text.find(SPAWN_CLOSE, start + len(SPAWN_OPEN))
    if close < 0:
        return None
    body = text[start + len(SPAWN_OPEN):close]
    prompts = [line.strip() for line in body.splitlines() if line.strip()]
    return SpawnCall(start=start, end=close + len(SPAWN_CLOSE), prompts=prompts)


def spawn_cut(token_ids: Sequence[int], decode: Callable[[list[int]], str]) -> tuple[int, SpawnCall] | None:
    """``(k, call)`` where ``token_ids[:k]`` is the shortest prefix whose text holds a complete spawn block.

    Servers without stop strings keep generating after ``</spawn>``; the tokens after the block are dropped (their
    log-probs do not matter for the kept prefix, so the trajectory stays token-in/token-out).
    """
    ids = list(token_ids)
    if parse_spawn(decode(ids)) is None:
        return None
    lo, hi = 1, len(ids)  # invariant: the prefix of length hi holds a block; find the smallest such length
    while lo < hi:
        mid = (lo + hi) // 2
        if parse_spawn(decode(ids[:mid])) is not None:
            hi = mid
        else:
            lo = mid + 1
    call = parse_spawn(decode(ids[:hi]))
    assert call is not None
    return hi, call


def sanitize(text: str) -> str:
    """Remove the protocol's tags from a child's text, so a joined result can neither open a spawn block nor be
    mistaken for the parent's own ``<answer>`` by the reward function."""
    for tag in _PROTOCOL_TAGS:
        text = text.replace(tag, "")
    return text


def child_result(text: str, max_chars: int) -> str:
    """What a child returns to its parent: its last ``<answer>`` (first ``max_chars`` characters), else the last
    ``max_chars`` characters of its text; :data:`NO_RESULT` when empty."""
    answers = _ANSWER.findall(text)
    if answers:
        result = sanitize(answers[-1]).strip()[:max_chars]
    else:
        result = sanitize(text).strip()
        result = result[-max_chars:] if max_chars > 0 else result
    return result.strip() or NO_RESULT


def format_join(results: Sequence[str]) -> str:
    """The join block fed back to the parent after a spawn: one ``<result>`` per spawned line, in order."""
    body = "".join(f"{RESULT_OPEN}{r}{RESULT_CLOSE}\n" for r in results)
    return f"\n{JOIN_OPEN}\n{body}{JOIN_CLOSE}\n"


def _select(config: Any, key: str, default: Any) -> Any:
    from verl.utils.config import cfg_select

    value = cfg_select(config, key, default)
    return default if value is None else value


@dataclass
class AprSettings:
    """The ``apr.*`` section of the recipe's config (see ``recipe/apr/config/hs.yaml`` for each key)."""

    enable_spawn: bool = False
    max_children_per_spawn: int = 4
    max_spawn_calls: int = 2
    max_child_calls: int | None = None
    max_depth: int = 1
    thread_token_budget: int | None = None
    child_token_budget: int | None = None
    max_child_prompt_tokens: int = 128
    max_result_chars: int = 200
    max_model_len: int | None = None
    child_prompt_template: str = "{prompt}"
    announce_child_budget: bool = False

    @classmethod
    def from_config(cls, config: Any) -> "AprSettings":
        """Read and check ``apr.*``; a bad value raises ``ValueError`` naming the key."""

        def opt_int(key: str, minimum: int) -> int | None:
            value = _select(config, f"apr.{key}", None)
            if value is None:
                return None
            try:
                value = int(value)
            except (TypeError, ValueError):
                raise ValueError(f"apr.{key} must be an integer or null, got {value!r}") from None
            if value < minimum:
                raise ValueError(f"apr.{key} must be >= {minimum} (or null), got {value}")
            return value

        def req_int(key: str, minimum: int) -> int:
            value = opt_int(key, minimum)
            return getattr(cls, key) if value is None else value

        template = str(_select(config, "apr.child_prompt_template", cls.child_prompt_template))
        if "{prompt}" not in template:
            raise ValueError(f"apr.child_prompt_template must contain '{{prompt}}' (where the spawned line goes), "
                             f"got {template!r}")
        settings = cls(enable_spawn=bool(_select(config, "apr.enable_spawn", False)),
                       max_children_per_spawn=req_int("max_children_per_spawn", 1),
                       max_spawn_calls=req_int("max_spawn_calls", 0),
                       max_child_calls=opt_int("max_child_calls", 0),
                       max_depth=req_int("max_depth", 1),
                       thread_token_budget=opt_int("thread_token_budget", 1),
                       child_token_budget=opt_int("child_token_budget", 1),
                       max_child_prompt_tokens=req_int("max_child_prompt_tokens", 1),
                       max_result_chars=req_int("max_result_chars", 1),
                       max_model_len=opt_int("max_model_len", 2),
                       child_prompt_template=template,
                       announce_child_budget=bool(_select(config, "apr.announce_child_budget", False)))
        if settings.announce_child_budget and settings.max_child_calls is None:
            raise ValueError("apr.announce_child_budget=true needs apr.max_child_calls (the budget to announce)")
        return settings
