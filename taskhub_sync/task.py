"""What a subscription handler works with: the Task, and the pool that runs handlers."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import protocol as p
from ._deadline import Deadline, wait_seconds
from .errors import InvalidState, PayloadTooLarge

logger = logging.getLogger("taskhub_sync.client")

if TYPE_CHECKING:
    from .client import Client


#: Claim states of a task (Task._claim), guarded by Task._io.
_UNCLAIMED, _DEFERRED, _CLAIMED = 0, 1, 2


class Task:
    """A task as a subscription handler sees it.

    Call ``start()`` to claim it (the hub then waits for your result until the
    task's finish timeout), ``get_payload()`` to read it, ``update(data)`` to report
    progress. Return the result from the handler; raise to fail the task.
    ``cancelled`` turns true when the hub no longer wants the result (finish timeout,
    start window missed, publisher gone). Methods are thread-safe and never block
    on the network for long.
    """

    def __init__(self, client: Client, msg: p.Task, generation: int, claim_by: float) -> None:
        self._client = client
        self._generation = generation  # the client's connection it came in on
        self.id = msg.task
        self.topic = msg.topic
        #: The service that published the task.
        self.publisher = msg.publisher
        self._payload = msg.payload
        # Claiming: start() before claim_by only marks the task _DEFERRED; the reader
        # sends the start message at claim_by unless the handler has answered by then
        # (an update or the answer claims it too). A fast handler thus costs one
        # message, not two. _io orders this task's messages: nothing after its answer.
        self._claim_by = claim_by
        self._claim = _UNCLAIMED
        self._io = threading.Lock()
        self._finished = False  # set when the handler has returned
        self._cancel = threading.Event()
        self.cancel_reason: str | None = None

    def __repr__(self) -> str:
        return f"<Task {self.id} topic={self.topic!r} from {self.publisher!r}>"

    def get_payload(self) -> Any:
        """The payload the publisher sent (decoded JSON)."""
        return self._payload

    @property
    def payload(self) -> Any:
        return self._payload

    @property
    def cancelled(self) -> bool:
        """True once the hub said it no longer wants this task's result."""
        return self._cancel.is_set()

    def wait_cancelled(self, timeout: float | None = None) -> bool:
        """Block until the task is cancelled or ``timeout`` passes; True if cancelled.

        Raises:
            ValueError: If ``timeout`` is NaN.
        """
        return self._cancel.wait(wait_seconds(timeout))

    def start(self) -> None:
        """Claim the task. Idempotent; does not wait for the hub.

        The claim reaches the hub within a few milliseconds (at once if the task
        came in longer ago than that); a handler that answers sooner needs none.
        """
        self._check_running()
        with self._io:
            if self._claim != _UNCLAIMED:
                return
            if time.monotonic() < self._claim_by:
                self._claim = _DEFERRED
                return
            self._claim = _CLAIMED
            self._client._send_task_text(self, p.encode(p.Start(self.id)))

    def _send_deferred_claim(self) -> None:
        """The claim deadline passed: send the start message if start() deferred it.
        Called by the reader thread."""
        with self._io:
            if self._claim == _DEFERRED:
                self._claim = _CLAIMED
                self._client._send_task_text(self, p.encode(p.Start(self.id)))
            elif self._claim == _UNCLAIMED:
                self._claim_by = 0.0  # from now on start() sends at once

    def _send_claiming(self, text: str, *, answer: bool = False) -> None:
        """Send an update, or the handler's answer: either claims the task. Under
        ``_io``, so that nothing follows the answer (the hub would take an update
        after it for a protocol violation and drop the whole connection).

        Raises:
            InvalidState: For an update once the answer has been sent.
        """
        with self._io:
            self._check_running()
            self._finished = answer
            self._claim = _CLAIMED
            self._client._send_task_text(self, text)

    def update(self, data: Any) -> None:
        """Send a progress update to the publisher (claims the task if needed).

        Raises:
            TypeError, ValueError: If ``data`` is not JSON-serializable (or nested
                too deeply).
            PayloadTooLarge: If the update is over the hub's max_message_size.
            InvalidState: If the handler has already returned.
        """
        self._check_running()
        text = p.encode(p.Update(self.id, data))  # fails here, in the handler, if bad
        if len(text) > self._client.max_message_size:  # ASCII: characters are bytes
            raise PayloadTooLarge(
                f"update of {len(text)} bytes is over the hub's max_message_size",
                task_id=self.id,
                topic=self.topic,
            )
        if p.too_deep(text, data):
            raise ValueError(f"update is nested more than {p.MAX_DEPTH} levels deep")
        self._send_claiming(text)

    def _check_running(self) -> None:
        if self._finished:
            raise InvalidState(f"task {self.id} is over: its handler has returned")

    def _cancelled_by_hub(self, reason: str) -> None:
        self.cancel_reason = reason
        self._cancel.set()


class _HandlerPool:
    """At most ``size`` daemon threads running handlers; started as needed.

    ``grow(n)`` lets n more run for a while: handlers still busy with tasks of a
    dropped connection must not make the new connection's tasks queue (the hub
    counts only the new ones against max_workers). Each such handler calls
    ``shrink()`` when it ends.
    """

    def __init__(self, size: int, run: Callable[[Any], None]) -> None:
        self._size = size
        self._run = run
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._lock = threading.Lock()

    def submit(self, item: Any) -> None:
        with self._lock:
            if self._idle == 0 and len(self._threads) < self._size:
                t = threading.Thread(
                    target=self._loop, daemon=True, name=f"taskhub-handler-{len(self._threads) + 1}"
                )
                self._threads.append(t)
                t.start()
            else:
                self._idle -= 1
        self._queue.put(item)

    def grow(self, n: int) -> None:
        with self._lock:
            self._size += n

    def shrink(self) -> None:
        with self._lock:
            self._size -= 1

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                self._run(item)
            except BaseException:  # a bug of ours: keep the thread serving
                logger.exception("taskhub handler thread: running a task failed")
            finally:
                with self._lock:
                    self._idle += 1

    def shutdown(self, timeout: float | None) -> bool:
        """Let running handlers finish (up to ``timeout``); True if all did."""
        with self._lock:
            threads = list(self._threads)
        for _ in threads:
            self._queue.put(None)
        deadline = Deadline(timeout)
        for t in threads:
            if t is not threading.current_thread():
                t.join(deadline.remaining())
        return not any(t.is_alive() for t in threads if t is not threading.current_thread())
