"""Signals that stop a blocking serve loop the way Ctrl-C does, once.

The library installs no signal handler unless a blocking call is running:
``run_forever(stop_signals=[signal.SIGTERM])`` and ``serve_forever(...)`` arm one
for the duration of the call (and of the shutdown it starts) and put the previous
ones back. The command line arms SIGTERM and SIGINT around each command.

The first signal raises KeyboardInterrupt in the main thread and mutes them all,
so a second one (a second Ctrl-C, or ``timeout`` signalling the whole process
group) cannot interrupt the shutdown the first one started, nor leave a lock of
the threading module half released.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any


class Interrupted(KeyboardInterrupt):
    """A stop signal, delivered like Ctrl-C so that the same clean shutdown runs."""


class Guard:
    """What ``interrupt_once()`` yields: ``mute()`` ignores the armed signals until
    the block ends (call it before a shutdown that a signal must not cut short)."""

    def __init__(self, signals: list[int]) -> None:
        self.signals = signals
        self.fired = False

    def mute(self) -> None:
        for sig in self.signals:
            signal.signal(sig, signal.SIG_IGN)


@contextmanager
def interrupt_once(signals: Iterable[int], *, restore_after_signal: bool = True) -> Iterator[Guard]:
    """While inside, each of ``signals``, and Ctrl-C unless the program handles
    SIGINT itself, raises KeyboardInterrupt (``Interrupted``) in the main thread,
    once: the first mutes them all until the block ends.

    Args:
        signals: Signal numbers to arm besides SIGINT.
        restore_after_signal: Put the previous handlers back on exit even after a
            signal fired. False for a process about to exit, which would otherwise
            die of a second SIGTERM arriving after its clean shutdown.

    Raises:
        ValueError: If signals are given and this is not the main thread (Python
            only delivers signals there).
    """
    armed = list(signals)
    if threading.current_thread() is not threading.main_thread():
        if armed:
            raise ValueError("stop_signals only work in the main thread")
        yield Guard([])  # Ctrl-C reaches the main thread only: nothing to arm
        return
    if signal.SIGINT not in armed and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        armed.append(signal.SIGINT)
    guard = Guard(armed)

    def interrupt(signum: int, frame: FrameType | None) -> None:
        guard.mute()
        guard.fired = True
        raise Interrupted(signal.Signals(signum).name)

    previous: dict[int, Any] = {}
    try:
        for sig in armed:
            previous[sig] = signal.signal(sig, interrupt)
        yield guard
    finally:
        if restore_after_signal or not guard.fired:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
