"""TaskHandle: the future-like object Client.pub() returns."""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from typing import Any, Callable

from ._deadline import wait_seconds
from .errors import ConcurrencyError, InvalidState
from .protocol import Outcome

logger = logging.getLogger(__name__)

_MISSING: Any = object()
EVENTS = ("update", "result", "error", "done")


class _Listener:
    """An update callback and how far it has been fed (see TaskHandle._feed)."""

    __slots__ = ("callback", "cursor", "busy")

    def __init__(self, callback: Callable[[Any], object]) -> None:
        self.callback = callback
        self.cursor = 0
        self.busy = False


class TaskHandle(concurrent.futures.Future):  # type: ignore[type-arg]
    """A published task: a running ``concurrent.futures.Future`` plus live updates.

    Works with ``concurrent.futures.wait()``, ``as_completed()`` and
    ``add_done_callback()``. Thread-safe. Callbacks run on the client's reader
    thread (or, for updates that came before the callback was attached, in the
    thread calling ``on()``); keep them short. They never run under a library lock;
    an exception in one is logged and does not disturb the client.

    Attributes:
        task_id: The task's id, unique on the hub.
        topic: The topic it was published on.
    """

    def __init__(self, task_id: str, topic: str, reader: threading.Thread | None = None) -> None:
        super().__init__()
        self.set_running_or_notify_cancel()  # published at once: it cannot be cancelled
        self.task_id = task_id
        self.topic = topic
        self._reader = reader
        self._updates: list[Any] = []
        self._listeners: list[_Listener] = []
        self._done_callbacks_added = False  # the reader will run user code at the end
        self._results: dict[str, Outcome] = {}
        self._completing = False  # set once, under _condition, by _complete()

    def __repr__(self) -> str:
        state = "done" if self.done() else "running"
        return f"<TaskHandle {self.task_id} topic={self.topic!r} {state}>"

    # ----------------------------------------------------------------- public

    def add_done_callback(self, fn: Callable[[concurrent.futures.Future[Any]], object]) -> None:
        """Future.add_done_callback(): ``fn(handle)`` once the task is over (at once if
        it is already); on the client's reader thread otherwise, so keep it short."""
        self._done_callbacks_added = True
        super().add_done_callback(fn)

    def on(self, event: str, callback: Callable[[Any], object]) -> TaskHandle:
        """Call ``callback`` on an event; returns the handle, so calls chain.

        Events:
            ``"update"``: ``callback(data)`` for each progress update, in order. A
                callback attached late first gets every update so far.
            ``"result"``: ``callback(result)`` once, if the task succeeds.
            ``"error"``: ``callback(exception)`` once, if it fails.
            ``"done"``: ``callback(handle)`` once, either way.
        A result/error/done callback attached after the end runs at once.

        Raises:
            ValueError: For an unknown event name.
            TypeError: If ``callback`` is not callable.
        """
        if not callable(callback):
            raise TypeError(f"the {event!r} callback must be callable, not {callback!r}")
        if event == "update":
            listener = _Listener(callback)
            with self._condition:
                self._listeners.append(listener)
            self._feed(listener)
        elif event == "done":
            self.add_done_callback(callback)
        elif event == "result":
            self.add_done_callback(
                lambda h: callback(h.result()) if h.exception() is None else None
            )
        elif event == "error":
            self.add_done_callback(
                lambda h: callback(h.exception()) if h.exception() is not None else None
            )
        else:
            raise ValueError(f"unknown event {event!r}; use one of {', '.join(EVENTS)}")
        return self

    def get_result(self, timeout: float | None = None, default: Any = _MISSING) -> Any:
        """Block until the task is done and return its result.

        Args:
            timeout: Seconds to wait; None (or infinity) waits until the task ends (it
                always does: the hub enforces the task's timeouts); <= 0 checks
                without waiting.
            default: If given, returned instead of raising on any error or timeout.

        Raises:
            TimeoutError: If the task is not done within ``timeout``.
            TaskError: Or another TaskHubError, if the task failed.
            ConcurrencyError: If called on the client's reader thread (from a
                callback) while the task is still running: that would deadlock.
            ValueError: If ``timeout`` is NaN.
        """
        if timeout is not None and timeout != timeout:
            raise ValueError("timeout must be a number of seconds, not NaN")
        try:
            return self.result(timeout)
        except concurrent.futures.TimeoutError:
            if default is not _MISSING:
                return default
            raise TimeoutError(
                f"task {self.task_id} on {self.topic!r} not done after {timeout} s"
            ) from None
        except Exception:
            if default is not _MISSING:
                return default
            raise

    def result(self, timeout: float | None = None) -> Any:
        """Future.result(), safe from deadlock and overflow (see get_result())."""
        return super().result(self._wait_time(timeout))

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """Future.exception(), safe from deadlock and overflow (see get_result())."""
        return super().exception(self._wait_time(timeout))

    def _wait_time(self, timeout: float | None) -> float | None:
        """Check the calling thread and turn ``timeout`` into something wait() takes."""
        if (
            self._reader is not None
            and threading.current_thread() is self._reader
            and not self.done()
        ):
            raise ConcurrencyError(
                f"waiting for task {self.task_id} from a callback would deadlock: "
                "callbacks run on the client's reader thread"
            )
        return wait_seconds(timeout)

    @property
    def results(self) -> dict[str, Outcome]:
        """Each recipient service's outcome (status, result, error); empty until done."""
        return dict(self._results)

    @property
    def updates(self) -> list[Any]:
        """Every update received so far, in order."""
        with self._condition:
            return list(self._updates)

    # ----------------------------------------------------------------- client side

    def _add_update(self, data: Any) -> None:
        """Record an update and feed the listeners. Called by the reader thread."""
        with self._condition:
            if self.done():
                return
            self._updates.append(data)
            listeners = list(self._listeners)
        for listener in listeners:
            self._feed(listener)

    def _complete(
        self, result: Any, error: BaseException | None, outcomes: dict[str, Outcome]
    ) -> None:
        """Finish the handle once. Raises InvalidState the second time."""
        with self._condition:
            if self._completing:
                raise InvalidState(f"task {self.task_id} is already done")
            self._completing = True
            self._results = outcomes
        # Outside the lock: Future runs done-callbacks (user code) in set_*().
        if error is None:
            self.set_result(result)
        else:
            self.set_exception(error)

    def _feed(self, listener: _Listener) -> None:
        """Deliver the updates this listener has not had, in order, lock released.

        Two threads may feed one listener (the reader with a new update, the user's
        thread replaying the backlog in on()). Whoever finds it idle marks it busy and
        delivers until it has caught up; the other leaves the new items to it. So
        each update is delivered once, in order, and no lock is held meanwhile.
        """
        while True:
            with self._condition:
                if listener.busy or listener.cursor >= len(self._updates):
                    return
                listener.busy = True
                batch = self._updates[listener.cursor :]
                listener.cursor += len(batch)
            try:
                for data in batch:
                    try:
                        listener.callback(data)
                    except Exception:
                        logger.exception("update callback of task %s raised", self.task_id)
            finally:
                with self._condition:
                    listener.busy = False
