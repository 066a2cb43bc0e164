"""Timing of the sections of a training step (``timing_raw`` dicts that become ``timing_s/*`` metrics).

``with marked_timer("gen", timing_raw): ...`` adds the elapsed wall-clock seconds to ``timing_raw["gen"]``; a
section entered twice in one step (e.g. two generation calls) accumulates.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from codetiming import Timer

__all__ = ["simple_timer", "marked_timer"]


@contextmanager
def simple_timer(name: str, timing_raw: dict[str, float]) -> Iterator[None]:
    """Add the seconds spent in the ``with`` block to ``timing_raw[name]``, also when the block raises."""
    timer = Timer(name=None, logger=None)
    timer.start()
    try:
        yield
    finally:
        elapsed = timer.stop()
        timing_raw[name] = timing_raw.get(name, 0.0) + elapsed


@contextmanager
def marked_timer(name: str, timing_raw: dict[str, float], color: str | None = None, **kwargs: Any) -> Iterator[None]:
    """Like :func:`simple_timer`; ``color`` and other keyword arguments are accepted for compatibility with
    profilers that also mark the range in a trace, and ignored here."""
    with simple_timer(name, timing_raw):
        yield
