"""The blocking client: publish tasks, serve subscriptions.

Threads:
    taskhub-reader     (daemon) the only reader of the socket: decodes messages,
                       completes handles, runs update/done callbacks, queues tasks
    taskhub-handler-N  (daemon) run subscription handlers, at most max_workers at once

Any thread may send (websocket-client serializes writes with its own lock). The
hub never gives this client more than ``max_workers`` tasks at once, so handlers
never queue behind each other, and a handler may itself pub() and wait.
"""

from __future__ import annotations

import itertools
import logging
import queue
import ssl
import struct
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import websocket

from . import config, topics
from . import protocol as p
from ._deadline import Deadline
from .errors import (
    AuthenticationError,
    ConcurrencyError,
    ConnectionLost,
    InvalidTopic,
    NoSubscribers,
    Overloaded,
    PayloadTooLarge,
    PermissionDenied,
    ProtocolError,
    TaskError,
    TaskFailed,
    TaskHubError,
    TaskTimeout,
    WorkerLost,
)
from .handle import TaskHandle

logger = logging.getLogger(__name__)

Handler = Callable[["Task"], Any]
H = TypeVar("H", bound=Handler)

_TASK_ERRORS: dict[str, type[TaskError]] = {
    "no_subscribers": NoSubscribers,
    "overloaded": Overloaded,
    "timeout": TaskTimeout,
    "worker_lost": WorkerLost,
    "payload_too_large": PayloadTooLarge,
}


def _task_error(info: p.ErrorInfo, task_id: str, topic: str) -> TaskHubError:
    """Turn the hub's ErrorInfo for a task into the matching exception."""
    if info.code == "permission_denied":
        return PermissionDenied(info.message, topic=topic)
    if info.code == "invalid_topic":
        return InvalidTopic(info.message)
    if info.code == "connection_lost":
        return ConnectionLost(info.message)
    if info.code == "failed":
        remote_type = info.remote_type or "Exception"
        prefix = f"{remote_type}: "
        remote_message = (
            info.message[len(prefix) :] if info.message.startswith(prefix) else info.message
        )
        return TaskFailed(
            f"task {task_id} on {topic!r} failed at {info.service!r}: {info.message}",
            task_id=task_id,
            topic=topic,
            service=info.service,
            remote_type=remote_type,
            remote_message=remote_message,
        )
    cls = _TASK_ERRORS.get(info.code, TaskError)
    if issubclass(cls, WorkerLost):
        return WorkerLost(info.message, task_id=task_id, topic=topic, service=info.service)
    return cls(info.message, task_id=task_id, topic=topic)


class Task:
    """A task as a subscription handler sees it.

    Call ``start()`` to claim it (the hub then waits for your result until the
    task's finish timeout), ``get_payload()`` to read it, ``update(data)`` to report
    progress. Return the result from the handler; raise to fail the task.
    ``cancelled`` turns true when the hub no longer wants the result (finish timeout,
    start window missed, publisher gone). Methods are thread-safe and never block
    on the network for long.
    """

    def __init__(self, client: Client, msg: p.Task) -> None:
        self._client = client
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
            self._client._send_quietly(p.Start(self.id))

    def update(self, data: Any) -> None:
        """Send a progress update to the publisher (claims the task if needed).

        Raises:
            TypeError, ValueError: If ``data`` is not JSON-serializable.
        """
        p.encode_value(data)  # fail here, in the handler, on bad data
        self._started = True
        self._client._send_quietly(p.Update(self.id, data))

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


class Client:
    """A connection to the hub, authenticated as one service.

    The constructor connects and authenticates, so a bad key fails here. Methods
    are thread-safe. Use ``with Client(...) as client:`` or call ``close()``.

    Args:
        url: ``ws://host:port`` or ``wss://host:port`` of the hub.
        name: The service name (the credential's name on the hub).
        key: The service's key.
        open_timeout: Seconds to connect, upgrade and authenticate.
        close_timeout: Seconds close() waits for running handlers and the hub.
        request_timeout: Seconds sub()/unsub() wait for the hub's answer.
        max_workers: Handlers that may run at once (the hub never sends more).
        ping_interval: Seconds of silence after which the client pings the hub; no
            answer within another interval means the hub is gone.
        ssl_context: Client-side SSLContext for ``wss://`` (default: system CAs).

    Raises:
        AuthenticationError: Unknown name, wrong key, or too many instances.
        ConnectionLost: The hub cannot be reached.
        TimeoutError: No answer within ``open_timeout``.
    """

    def __init__(
        self,
        url: str,
        *,
        name: str,
        key: str,
        open_timeout: float = config.DEFAULT_OPEN_TIMEOUT,
        close_timeout: float = config.DEFAULT_CLOSE_TIMEOUT,
        request_timeout: float = config.DEFAULT_REQUEST_TIMEOUT,
        max_workers: int = config.DEFAULT_MAX_WORKERS,
        ping_interval: float = config.DEFAULT_PING_INTERVAL,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if not isinstance(max_workers, int) or max_workers < 1:
            raise ValueError("max_workers must be an integer >= 1")
        if not isinstance(name, str) or not isinstance(key, str):
            raise TypeError("name and key must be strings")
        self.url = url
        self.name = name
        self.close_timeout = close_timeout
        self.request_timeout = request_timeout
        self.ping_interval = ping_interval
        self._lock = threading.Lock()  # guards the dicts below and _closing
        self._handles: dict[str, TaskHandle] = {}
        self._handlers: dict[str, Handler] = {}
        self._requests: dict[int, tuple[threading.Event, list[p.Reply]]] = {}
        self._running: dict[str, Task] = {}
        self._closing = False
        self._lost: BaseException | None = None
        self._ended = threading.Event()  # set when the reader has stopped
        self._ids = itertools.count(1)
        self._pool = _HandlerPool(max_workers, self._run_handler)
        self._ws = self._connect(url, name, key, max_workers, Deadline(open_timeout), ssl_context)
        self._reader = threading.Thread(target=self._read_loop, name="taskhub-reader", daemon=True)
        self._reader.start()

    # ----------------------------------------------------------------- connect

    def _connect(
        self,
        url: str,
        name: str,
        key: str,
        concurrency: int,
        deadline: Deadline,
        ssl_context: ssl.SSLContext | None,
    ) -> websocket.WebSocket:
        sslopt: dict[str, Any] = {}
        if ssl_context is not None:
            sslopt["context"] = ssl_context
        try:
            ws = websocket.create_connection(
                url,
                timeout=deadline.remaining(),
                skip_utf8_validation=True,  # str.decode checks UTF-8 already, in C
                enable_multithread=True,
                sslopt=sslopt,
                http_no_proxy=["*"],  # direct: ignore *_proxy variables (LP-17)
                redirect_limit=0,  # never replay a handshake elsewhere (LP-18)
                suppress_origin=True,
            )
        except websocket.WebSocketTimeoutException as exc:
            raise TimeoutError(f"no answer from {url} within the open timeout") from exc
        except (OSError, websocket.WebSocketException, ValueError) as exc:
            raise ConnectionLost(f"cannot connect to {url}: {exc}") from exc
        try:
            ws.send(p.encode(p.Hello(name, key, concurrency)))
            ws.settimeout(deadline.remaining())
            while True:
                opcode, frame = ws.recv_data_frame(False)
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    code, reason = _close_info(frame.data)
                    if code in p.FATAL_CLOSE_CODES:
                        raise AuthenticationError(reason or "authentication failed")
                    raise ConnectionLost(f"hub closed the connection: {code} {reason}")
                if opcode == websocket.ABNF.OPCODE_TEXT:
                    break
            welcome = p.decode(frame.data)
            if not isinstance(welcome, p.Welcome):
                raise ProtocolError(f"expected welcome, got {welcome.TYPE!r}")
        except BaseException as exc:
            ws.shutdown()
            if isinstance(exc, websocket.WebSocketTimeoutException):
                raise TimeoutError(f"no welcome from {url} within the open timeout") from None
            if isinstance(exc, (OSError, websocket.WebSocketException)):
                raise ConnectionLost(f"connection to {url} lost: {exc}") from exc
            raise
        self.session = welcome.session
        self.max_message_size = welcome.max_message_size
        self.task_start_timeout = welcome.task_start_timeout
        ws.settimeout(self.ping_interval)
        return ws

    # ----------------------------------------------------------------- public

    def pub(self, topic: str, payload: Any = None, *, timeout: float | None = None) -> TaskHandle:
        """Publish a task and return a handle to its result. Does not wait.

        Args:
            topic: Where to publish, e.g. ``"mail:send-bulk"``.
            payload: Any JSON-serializable value.
            timeout: This task's finish timeout in seconds (default: the hub's).

        Raises:
            InvalidTopic: If ``topic`` is malformed.
            TypeError, ValueError: If ``payload`` is not JSON-serializable, or
                ``timeout`` is not a positive number.
            ConnectionLost: If the connection is closed.

        Failures of the task itself (no subscribers, permission denied, timeout,
        the handler raised, payload too large) come through the handle.
        """
        topics.validate_topic(topic)
        if timeout is not None and (
            isinstance(timeout, bool) or not timeout > 0 or timeout == float("inf")
        ):
            raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
        task_id = f"{self.session}.{next(self._ids)}"
        text = p.encode(p.Publish(task_id, topic, payload, timeout))
        handle = TaskHandle(task_id, topic, self._reader)
        if len(text.encode()) > self.max_message_size:
            handle._complete(
                None,
                PayloadTooLarge(
                    f"payload of task on {topic!r} is over the hub's max_message_size "
                    f"({self.max_message_size} bytes)",
                    task_id=task_id,
                    topic=topic,
                ),
                {},
            )
            return handle
        with self._lock:
            self._check_open()
            self._handles[task_id] = handle
        try:
            self._ws.send(text)
        except (OSError, websocket.WebSocketException) as exc:
            with self._lock:
                self._handles.pop(task_id, None)
            raise ConnectionLost(f"cannot publish: {exc}") from exc
        return handle

    def sub(self, topic: str, handler: H | None = None) -> Any:
        """Serve tasks on ``topic`` (an exact topic, ``prefix:*`` or ``*``) with
        ``handler(task)``. Blocks until the hub accepts. Usable as a decorator.

        Raises:
            PermissionDenied: If the credential may not listen to ``topic``.
            InvalidTopic: If ``topic`` is malformed.
            ConnectionLost: If the connection is closed.
            TimeoutError: If the hub does not answer within request_timeout.
        """
        pattern = topics.validate_pattern(topic)
        if handler is None:

            def decorator(func: H) -> H:
                self.sub(pattern, func)
                return func

            return decorator
        if not callable(handler):
            raise TypeError("handler must be callable")
        with self._lock:
            previous = self._handlers.get(pattern)
            self._handlers[pattern] = handler
        try:
            self._request(p.Subscribe(0, pattern))
        except BaseException:
            with self._lock:
                if previous is None:
                    self._handlers.pop(pattern, None)
                else:
                    self._handlers[pattern] = previous
            raise
        return handler

    def unsub(self, topic: str) -> None:
        """Stop serving ``topic``. Blocks until the hub confirms."""
        pattern = topics.validate_pattern(topic)
        self._request(p.Unsubscribe(0, pattern))
        with self._lock:
            self._handlers.pop(pattern, None)

    def run_forever(self) -> None:
        """Block, serving subscriptions, until close() or Ctrl-C (which closes).

        Raises:
            ConnectionLost: If the connection to the hub drops.
        """
        try:
            while not self._ended.wait(3600):
                pass
        except KeyboardInterrupt:
            logger.info("interrupted")
            self.close()
            return
        if self._lost is not None and not self._closing:
            raise ConnectionLost(f"connection to {self.url} lost: {self._lost}")

    def close(self) -> None:
        """Close the connection. Idempotent.

        Running handlers get up to ``close_timeout`` seconds to finish and send their
        results; pending handles then fail with ConnectionLost. All threads are
        stopped when it returns (a handler still running after the timeout is left
        to finish on its daemon thread).
        """
        with self._lock:
            if self._closing:
                return
            self._closing = True
        if threading.current_thread() is self._reader:
            raise ConcurrencyError("close() from a callback would deadlock")
        deadline = Deadline(self.close_timeout)
        self._pool.shutdown(deadline.remaining())
        try:
            self._ws.send_close(p.CLOSE_NORMAL, b"client closing")
        except (OSError, websocket.WebSocketException):
            pass
        self._reader.join(deadline.remaining())
        if self._reader.is_alive():
            self._ws.abort()
            self._reader.join(1.0)
        self._ws.shutdown()
        self._fail_all(ConnectionLost("the client was closed"))

    @property
    def closed(self) -> bool:
        """True after close() or once the connection is lost."""
        return self._closing or self._ended.is_set()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<Client {self.name!r} {self.url} {state}>"

    # ----------------------------------------------------------------- internals

    def _check_open(self) -> None:
        """Requires self._lock."""
        if self._closing:
            raise ConnectionLost("the client is closed")
        if self._ended.is_set():
            raise ConnectionLost(f"connection to {self.url} lost: {self._lost}")

    def _request(self, msg: p.Subscribe | p.Unsubscribe) -> None:
        if threading.current_thread() is self._reader:
            raise ConcurrencyError("sub()/unsub() from a callback would deadlock")
        done = threading.Event()
        box: list[p.Reply] = []
        with self._lock:
            self._check_open()
            request_id = next(self._ids)
            self._requests[request_id] = (done, box)
        try:
            msg = type(msg)(request_id, msg.pattern)
            self._send(msg)
            if not done.wait(self.request_timeout):
                raise TimeoutError(f"no answer to {msg.TYPE} {msg.pattern!r} from the hub")
        finally:
            with self._lock:
                self._requests.pop(request_id, None)
        if not box:
            raise ConnectionLost(f"connection to {self.url} lost: {self._lost}")
        error = box[0].error
        if error is not None:
            if error.code == "permission_denied":
                raise PermissionDenied(error.message, topic=msg.pattern)
            if error.code == "invalid_topic":
                raise InvalidTopic(error.message)
            raise TaskHubError(error.message)

    def _send(self, msg: p.Message) -> None:
        try:
            self._ws.send(p.encode(msg))
        except (OSError, websocket.WebSocketException) as exc:
            raise ConnectionLost(f"cannot send to {self.url}: {exc}") from exc

    def _send_quietly(self, msg: p.Message) -> None:
        """Send, ignoring a lost connection (the hub has failed the task anyway)."""
        try:
            self._send(msg)
        except ConnectionLost:
            logger.debug("dropped %s: connection lost", msg.TYPE)

    def _read_loop(self) -> None:
        ws = self._ws
        awaiting_pong = False
        try:
            while True:
                try:
                    opcode, frame = ws.recv_data_frame(True)
                except websocket.WebSocketTimeoutException:
                    if awaiting_pong:
                        raise ConnectionLost("the hub stopped answering heartbeats") from None
                    awaiting_pong = True
                    ws.ping(b"hb")
                    continue
                awaiting_pong = False
                if opcode == websocket.ABNF.OPCODE_TEXT:
                    self._dispatch(p.decode(frame.data))
                elif opcode == websocket.ABNF.OPCODE_CLOSE:
                    code, reason = _close_info(frame.data)
                    if not self._closing:
                        self._lost = ConnectionLost(f"hub closed the connection: {code} {reason}")
                        logger.warning("hub closed the connection: %s %s", code, reason)
                    return
                elif opcode == websocket.ABNF.OPCODE_BINARY:
                    raise ProtocolError("the hub sent a binary frame")
        except (OSError, websocket.WebSocketException, TaskHubError) as exc:
            if not self._closing:
                self._lost = exc
                logger.warning("connection to %s lost: %s", self.url, exc)
        except Exception as exc:  # a bug of ours: don't hide it, don't hang the user
            self._lost = exc
            logger.exception("taskhub reader crashed")
        finally:
            self._ended.set()
            if not self._closing:
                ws.abort()
            lost = self._lost or ConnectionLost("connection closed")
            if not isinstance(lost, ConnectionLost):
                lost = ConnectionLost(f"connection to {self.url} lost: {lost}")
            self._fail_all(lost)

    def _dispatch(self, msg: p.Message) -> None:
        kind = type(msg)
        if kind is p.Done:
            with self._lock:
                handle = self._handles.pop(msg.task, None)  # type: ignore[union-attr]
            if handle is not None:
                self._complete(handle, msg)  # type: ignore[arg-type]
        elif kind is p.Update:
            with self._lock:
                handle = self._handles.get(msg.task)  # type: ignore[union-attr]
            if handle is not None:
                handle._add_update(msg.data)  # type: ignore[union-attr]
        elif kind is p.Task:
            self._accept_task(msg)  # type: ignore[arg-type]
        elif kind is p.Cancel:
            with self._lock:
                task = self._running.get(msg.task)  # type: ignore[union-attr]
            if task is not None:
                task._cancelled_by_hub(msg.reason)  # type: ignore[union-attr]
        elif kind is p.Reply:
            with self._lock:
                waiter = self._requests.get(msg.id)  # type: ignore[union-attr]
            if waiter is not None:
                waiter[1].append(msg)  # type: ignore[arg-type]
                waiter[0].set()
        else:
            raise ProtocolError(f"unexpected {msg.TYPE!r} from the hub")  # type: ignore[union-attr]

    def _complete(self, handle: TaskHandle, done: p.Done) -> None:
        error = None
        if done.error is not None:
            error = _task_error(done.error, handle.task_id, handle.topic)
        handle._complete(done.result, error, done.outcomes)

    def _accept_task(self, msg: p.Task) -> None:
        task = Task(self, msg)
        with self._lock:
            closing = self._closing
            if not closing:
                self._running[task.id] = task
        if closing:
            self._send_quietly(p.Fail(task.id, "ClientClosing", "the worker is shutting down"))
            return
        self._pool.submit(task)

    def _handler_for(self, topic: str) -> Handler | None:
        """Most specific handler: exact topic, then the longest prefix, then ``*``."""
        with self._lock:
            handler = self._handlers.get(topic)
            if handler is not None:
                return handler
            for prefix in topics.prefixes(topic):
                handler = self._handlers.get(prefix + ":*" if prefix else "*")
                if handler is not None:
                    return handler
        return None

    def _run_handler(self, task: Task) -> None:
        try:
            handler = self._handler_for(task.topic)
            if handler is None:
                reply: p.Message = p.Fail(
                    task.id, "NoHandler", f"no handler for {task.topic!r} any more"
                )
            else:
                try:
                    result = handler(task)
                except Exception as exc:
                    logger.warning(
                        "handler for %r raised on task %s", task.topic, task.id, exc_info=True
                    )
                    reply = p.Fail(task.id, type(exc).__name__, str(exc)[:2000])
                else:
                    reply = p.Result(task.id, result)
            try:
                text = p.encode(reply)
            except (TypeError, ValueError) as exc:
                text = p.encode(
                    p.Fail(task.id, type(exc).__name__, f"result is not JSON-serializable: {exc}")
                )
            if len(text.encode()) > self.max_message_size:
                text = p.encode(
                    p.Fail(task.id, "PayloadTooLarge", "result is over the hub's max_message_size")
                )
            try:
                self._ws.send(text)
            except (OSError, websocket.WebSocketException):
                logger.debug("result of %s dropped: connection lost", task.id)
        finally:
            with self._lock:
                self._running.pop(task.id, None)

    def _fail_all(self, error: BaseException) -> None:
        """Fail every pending handle and wake every waiting request."""
        with self._lock:
            handles = list(self._handles.values())
            self._handles.clear()
            requests = list(self._requests.values())
            running = list(self._running.values())
        for handle in handles:
            if not handle.done():
                handle._complete(None, error, {})
        for done, _ in requests:
            done.set()
        for task in running:
            task._cancelled_by_hub("connection lost")


def _close_info(data: bytes) -> tuple[int | None, str]:
    if len(data) >= 2:
        code = struct.unpack("!H", data[:2])[0]
        return code, data[2:].decode("utf-8", "replace")
    return None, ""


__all__ = ["Client", "Task"]
