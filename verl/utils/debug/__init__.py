"""Compatibility home of :func:`marked_timer` (recipes import it as ``verl.utils.debug.marked_timer``)."""
from verl.utils.timer import marked_timer, simple_timer

__all__ = ["marked_timer", "simple_timer"]
