"""A deadline over time.monotonic(), to budget one timeout across several steps."""

from __future__ import annotations

import threading
import time


class Deadline:
    """Time left from a budget of ``timeout`` seconds; ``None`` means no limit."""

    __slots__ = ("_end",)

    def __init__(self, timeout: float | None) -> None:
        self._end = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        """Seconds left (never negative), or ``None`` for no limit."""
        if self._end is None:
            return None
        return max(0.0, self._end - time.monotonic())

    def expired(self) -> bool:
        """True once the budget is used up."""
        return self._end is not None and time.monotonic() >= self._end


def wait_seconds(timeout: float | None) -> float | None:
    """``timeout`` as an Event/Condition wait takes it: None (or longer than any wait
    can be) waits for ever, below zero checks without waiting.

    Raises:
        ValueError: For NaN.
    """
    if timeout is None:
        return None
    if timeout != timeout:
        raise ValueError("timeout must be a number of seconds, not NaN")
    if timeout >= threading.TIMEOUT_MAX:
        return None
    return max(timeout, 0.0)
