"""What a subscription handler works with: the Task, and the pool that runs handlers."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import protocol as p
from ._deadline import Deadline
from .errors import PayloadTooLarge

if TYPE_CHECKING:
    from .client import Client


class Task:
    """A task as a subscription handler sees it.

    Call ``start()`` to claim it (the hub then waits for your result until the
    task's finish timeout), ``get_payload()`` to read it, ``update(data)`` to report
    progress. Return the result from the handler; raise to fail the task.
    ``cancelled`` turns true when the hub no longer wants the result (finish timeout,
    start window missed, publisher gone). Methods are thread-safe and never block
    on the network for long.
    """

    def __init__(self, client: Client, msg: p.Task, generation: int) -> None:
        self._client = client
        self._generation = generation  # the client's connection it came in on
        self.id = msg.task
        self.topic = msg.topic
        #: The service that published the task.
        self.publisher = msg.publisher
        self._payload = msg.payload
        self._started = False
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
        """Block until the task is cancelled or ``timeout`` passes; True if cancelled."""
        return self._cancel.wait(timeout)

    def start(self) -> None:
        """Claim the task. Idempotent; does not wait for the hub."""
        if not self._started:
            self._started = True
            self._client._send_for_task(self, p.Start(self.id))

    def update(self, data: Any) -> None:
        """Send a progress update to the publisher (claims the task if needed).

        Raises:
            TypeError, ValueError: If ``data`` is not JSON-serializable.
            PayloadTooLarge: If it is over the hub's max_message_size.
        """
        size = len(p.encode_value(data))  # ASCII: characters are bytes. Fails here if bad.
        if size > self._client.max_message_size - 200:
            raise PayloadTooLarge(
                f"update of {size} bytes is over the hub's max_message_size",
                task_id=self.id,
                topic=self.topic,
            )
        self._started = True
        self._client._send_for_task(self, p.Update(self.id, data))

    def _cancelled_by_hub(self, reason: str) -> None:
        self.cancel_reason = reason
        self._cancel.set()


class _HandlerPool:
    """At most ``size`` daemon threads running handlers; started as needed."""

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

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                self._run(item)
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
