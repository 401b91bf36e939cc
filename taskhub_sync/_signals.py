"""Opt-in: let SIGTERM (or any signal) stop a blocking serve loop like Ctrl-C does.

The library installs no signal handler unless asked: ``run_forever(stop_signals=
[signal.SIGTERM])`` or ``serve_forever(stop_signals=...)`` install one for the
duration of the call and put the previous one back.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any


@contextmanager
def interrupt_on(signals: Iterable[int]) -> Iterator[None]:
    """While inside, each of ``signals`` raises KeyboardInterrupt in the main thread.

    Raises:
        ValueError: If signals are given and this is not the main thread (Python
            only delivers signals there).
    """
    signals = list(signals)
    if signals and threading.current_thread() is not threading.main_thread():
        raise ValueError("stop_signals only work in the main thread")

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous: dict[int, Any] = {}
    try:
        for sig in signals:
            previous[sig] = signal.signal(sig, interrupt)
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
