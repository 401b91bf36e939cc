"""The blocking client: publish tasks, serve subscriptions, ride over dropped connections.

Threads:
    taskhub-reader     (daemon) the only reader of the socket: decodes messages,
                       completes handles, runs update/done callbacks, queues tasks;
                       reconnects (backoff with jitter) when the connection drops
    taskhub-handler-N  (daemon) run subscription handlers, at most max_workers at once

Any thread may send (websocket-client serializes writes with its own lock; over TLS
the StreamSocket also keeps reads and writes apart). The hub never gives this
client more than ``max_workers`` tasks at once, so handlers never queue behind
each other, and a handler may itself pub() and wait.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import socket
import ssl
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from . import config, topics
from . import protocol as p
from ._client_conn import open_link
from ._deadline import Deadline
from ._frames import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameError,
    encode_close,
    encode_frame,
    parse_close,
)
from ._signals import interrupt_once
from ._transport import Link
from .errors import (
    AuthenticationError,
    ConcurrencyError,
    ConnectionLost,
    InvalidState,
    InvalidTopic,
    LimitExceeded,
    PayloadTooLarge,
    PermissionDenied,
    ProtocolError,
    TaskHubError,
    TryAgainLater,
    from_code,
)
from .handle import TaskHandle
from .task import _CLAIMED, Task, _HandlerPool

logger = logging.getLogger(__name__)

Handler = Callable[[Task], Any]

#: Seconds start() may defer its message to the hub (see Task.start).
MAX_CLAIM_DELAY = 0.005
H = TypeVar("H", bound=Handler)


#: Every open Client of this process, for the fork hook below.
_clients: weakref.WeakSet[Client] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # The child shares the parent's sockets but has none of its threads: a Client
    # it inherited must not be used (its writes would corrupt the parent's stream,
    # its handles would never complete). Only a flag is set: locks may be held.
    for client in list(_clients):
        client._forked = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _Lost(Exception):
    """Internal: the current connection ended; ``error`` says why."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


class Client:
    """A connection to the hub, authenticated as one service.

    The constructor connects and authenticates, so a bad key fails here. If the
    connection drops later, the client reconnects by itself (exponential backoff
    with jitter), authenticates again, restores its subscriptions and resumes its
    session: tasks it published keep running, and their updates and results,
    kept by the hub meanwhile, arrive once it is back. Methods are thread-safe.
    Use ``with Client(...) as client:`` or call ``close()``.

    Args:
        url: ``ws://host:port`` or ``wss://host:port`` of the hub.
        name: The service name (the credential's name on the hub).
        key: The service's key.
        open_timeout: Seconds to connect, upgrade and authenticate; also how long
            pub()/sub() wait for a connection while the client is reconnecting.
        close_timeout: Seconds close() waits for running handlers and the hub.
        request_timeout: Seconds sub()/unsub() wait for the hub's answer.
        max_workers: Handlers that may run at once (the hub never sends more).
        ping_interval: Seconds of silence after which the client pings the hub; no
            answer within another interval means the connection is dead.
        ssl_context: Client-side SSLContext for ``wss://`` (default: system CAs).
        reconnect: Reconnect after a dropped connection (never after the hub
            refused the credentials).
        reconnect_delay: (first, max) seconds between reconnect attempts; the delay
            doubles per failed attempt, with jitter, up to the max.
        reconnect_timeout: Give up reconnecting after this many seconds (None:
            never); run_forever() then raises ConnectionLost.
        wait_for_hub: Seconds the constructor keeps trying (with the same backoff)
            while the hub cannot be reached, e.g. for a worker started before its
            hub; 0 fails at once. A refused key is never retried.

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
        reconnect: bool = True,
        reconnect_delay: tuple[float, float] = config.DEFAULT_RECONNECT_DELAY,
        reconnect_timeout: float | None = None,
        wait_for_hub: float = 0.0,
    ) -> None:
        if not isinstance(max_workers, int) or max_workers < 1:
            raise ValueError("max_workers must be an integer >= 1")
        if not isinstance(name, str) or not isinstance(key, str):
            raise TypeError("name and key must be strings")
        interval = config.MAX_INTERVAL
        open_timeout = config.check_seconds("open_timeout", open_timeout, maximum=interval)
        close_timeout = config.check_seconds("close_timeout", close_timeout, maximum=interval)
        request_timeout = config.check_seconds("request_timeout", request_timeout, maximum=interval)
        ping_interval = config.check_seconds("ping_interval", ping_interval, maximum=interval)
        first, cap = (
            config.check_seconds("reconnect_delay", d, maximum=interval) for d in reconnect_delay
        )
        if first > cap:
            raise ValueError("reconnect_delay must be (first, max) with first <= max")
        if reconnect_timeout is not None:
            reconnect_timeout = config.check_seconds(
                "reconnect_timeout", reconnect_timeout, maximum=config.MAX_TASK_TIMEOUT
            )
        wait_for_hub = config.check_seconds(
            "wait_for_hub", wait_for_hub, maximum=config.MAX_TASK_TIMEOUT, zero_ok=True
        )
        self.url = url
        self.name = name
        self._key = key
        self.open_timeout = open_timeout
        self.close_timeout = close_timeout
        self.request_timeout = request_timeout
        self.ping_interval = ping_interval
        self.reconnect = reconnect
        self.reconnect_delay = (first, cap)
        self.reconnect_timeout = reconnect_timeout
        self._ssl_context = ssl_context
        self._max_workers = max_workers

        self._lock = threading.Lock()  # guards the dicts below, _link, _generation
        self._handles: dict[str, TaskHandle] = {}
        self._handlers: dict[str, Handler] = {}
        self._requests: dict[int, tuple[threading.Event, list[p.Reply]]] = {}
        self._resubscribing: dict[int, str] = {}  # request id -> pattern
        self._running: dict[str, Task] = {}
        self._generation = 0  # bumped per connection: results of older ones are dropped
        self._closing = False
        self._opening: socket.socket | None = None  # the socket of a connect in progress
        self._lost: BaseException | None = None
        self._stop = threading.Event()  # set by close(): ends reconnect waits
        self._connected = threading.Event()
        self._ended = threading.Event()  # set when the reader has stopped for good
        self._ids = itertools.count(1)
        self._pool = _HandlerPool(max_workers, self._run_handler)
        self._forked = False  # set in a child process that inherited this client
        self._claims: deque[Task] = deque()  # tasks by claim deadline (reader thread)
        self._resume = True  # resume the session on reconnect (reader thread)

        link, welcome = self._first_connect(wait_for_hub)
        self._link = link
        self._apply_welcome(welcome)
        self._connected.set()
        self._reader = threading.Thread(
            target=self._reader_main, name="taskhub-reader", daemon=True
        )
        self._reader.start()
        _clients.add(self)

    # ----------------------------------------------------------------- public

    def pub(self, topic: str, payload: Any = None, *, timeout: float | None = None) -> TaskHandle:
        """Publish a task and return a handle to its result. Does not wait for it.

        Args:
            topic: Where to publish, e.g. ``"mail:send-bulk"``.
            payload: Any JSON-serializable value.
            timeout: This task's finish timeout in seconds (default: the hub's).

        Raises:
            InvalidTopic: If ``topic`` is malformed.
            TypeError, ValueError: If ``payload`` is not JSON-serializable, or
                ``timeout`` is not a positive number.
            ConnectionLost: If the client is closed, or stays disconnected for
                ``open_timeout`` seconds while reconnecting.
            InvalidState: In a child process that inherited the client by fork().

        Failures of the task itself (no subscribers, permission denied, timeout,
        the handler raised, payload too large) come through the handle.
        """
        topics.validate_topic(topic)
        if timeout is not None:
            timeout = config.check_seconds("timeout", timeout, maximum=config.MAX_TASK_TIMEOUT)
        lost: OSError | None = None
        for _ in range(3):
            self._wait_connected()
            session = self.session
            task_id = f"{session}.{next(self._ids)}"
            text = p.encode(p.Publish(task_id, topic, payload, timeout))
            if p.too_deep(text, payload):
                raise ValueError(f"payload is nested more than {p.MAX_DEPTH} levels deep")
            handle = TaskHandle(task_id, topic, self._reader)
            if len(text) > self.max_message_size:  # ASCII: characters are bytes
                error = PayloadTooLarge(
                    f"payload of task on {topic!r} is over the hub's max_message_size "
                    f"({self.max_message_size} bytes)",
                    task_id=task_id,
                    topic=topic,
                )
                handle._complete(None, error, {})
                return handle
            with self._lock:
                self._check_open()
                # The session and its link change together, under this lock: a task
                # id is only sent on a connection of the session it names.
                if self.session != session:
                    continue
                self._handles[task_id] = handle
                link = self._link
            try:
                link.send_text(text)
                return handle
            except OSError as exc:
                # The link dropped under us, before the whole message went out (the
                # hub cannot have it): the reader reconnects; try on the next link.
                with self._lock:
                    self._handles.pop(task_id, None)
                    if self._link is link:  # wait for the next one, not this one again
                        self._connected.clear()
                lost = exc
        why = lost or "the connection keeps changing"
        raise ConnectionLost(f"cannot publish to {self.url}: {why}") from lost

    def sub(self, topic: str, handler: H | None = None) -> Any:
        """Serve tasks on ``topic`` (an exact topic, ``prefix:*`` or ``*``) with
        ``handler(task)``. Blocks until the hub accepts. Usable as a decorator.

        Subscriptions survive reconnects. A task matching several subscriptions
        goes to the most specific one's handler.

        Raises:
            PermissionDenied: If the credential may not listen to ``topic``.
            InvalidTopic: If ``topic`` is malformed.
            LimitExceeded: If the connection has too many subscriptions.
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
        with self._lock:
            self._handlers.pop(pattern, None)
        self._request(p.Unsubscribe(0, pattern))

    def run_forever(self, *, stop_signals: Iterable[int] = ()) -> None:
        """Block, serving subscriptions, until close() or Ctrl-C (which closes).

        Rides over dropped connections (see ``reconnect``).

        Args:
            stop_signals: Signals that close the client like Ctrl-C while this runs,
                e.g. ``[signal.SIGTERM]`` for a worker run by systemd or cron (main
                thread only; the previous handlers come back afterwards).

        Raises:
            ConnectionLost: If the connection is lost for good (reconnect off or
                given up).
            AuthenticationError: If the hub refused the credentials on reconnect.
            InvalidState: In a child process that inherited the client by fork().
        """
        self._check_process()
        with interrupt_once(stop_signals) as signals:
            try:
                while not self._ended.wait(3600):
                    pass
            except KeyboardInterrupt:
                logger.info("interrupted")
                signals.mute()  # a second Ctrl-C must not cut close() short
                self.close()
                return
        if self._lost is not None and not self._closing:
            if isinstance(self._lost, AuthenticationError):
                raise self._lost
            raise ConnectionLost(f"connection to {self.url} lost: {self._lost}")

    def close(self) -> None:
        """Close the connection. Idempotent.

        Running handlers are told (``task.cancelled`` becomes true, with reason
        "client closing") and get up to ``close_timeout`` seconds to finish and send
        their results; pending handles then fail with ConnectionLost, and the hub
        stops the tasks this client published at once. The client's threads are
        stopped when it returns (a handler still running after the timeout is left
        to finish on its daemon thread).

        Raises:
            ConcurrencyError: If called from a callback on the reader thread.
        """
        if self._forked:
            return  # the parent's connection: not ours to close
        if threading.current_thread() is self._reader:
            raise ConcurrencyError("close() from a callback would deadlock")
        with self._lock:
            if self._closing:
                return
            self._closing = True
        deadline = Deadline(self.close_timeout)
        with self._lock:
            running = list(self._running.values())
        for task in running:
            task._cancelled_by_hub("client closing")
        self._pool.shutdown(deadline.remaining())
        self._stop.set()
        opening = self._opening
        if opening is not None:  # a reconnect attempt in progress: abort it
            try:
                opening.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        try:
            self._link.write(encode_close(p.CLOSE_NORMAL, "client closing", mask=True))
        except OSError:
            pass
        self._reader.join(deadline.remaining())
        self._link.drop()  # wakes the reader if the hub did not answer the Close
        self._reader.join(1.0)
        self._fail_all(ConnectionLost("the client was closed"))

    @property
    def _ws(self) -> Link:
        """The current connection (a test seam: ``client._ws.sock.shutdown(...)``)."""
        return self._link

    @property
    def closed(self) -> bool:
        """True after close() or once the connection is lost for good."""
        return self._closing or self._ended.is_set()

    @property
    def connected(self) -> bool:
        """True while a connection to the hub is up."""
        return self._connected.is_set() and not self.closed

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "connected" if self.connected else "reconnecting"
        return f"<Client {self.name!r} {self.url} {state}>"

    # ----------------------------------------------------------------- connecting

    def _connect(self, session: str | None, deadline: Deadline) -> tuple[Link, p.Welcome]:
        """Open, upgrade and authenticate one connection, within ``deadline``."""
        pending = self._resumable_ids() if session else ()
        hello = p.Hello(self.name, self._key, self._max_workers, session, pending)
        try:
            link, welcome = open_link(
                self.url, hello, deadline, self._ssl_context, on_socket=self._opening_socket
            )
        finally:
            self._opening = None
        # From here the reader's short read timeouts must not apply to writes: a
        # handler's answer gets as long as a live hub can take (a dead one is
        # noticed by the heartbeat, which shuts the socket and wakes the writer).
        link.stream.set_nonblocking(write_timeout=max(self.open_timeout, 2 * self.ping_interval))
        link.settimeout(self.ping_interval)
        return link, welcome

    def _first_connect(self, wait_for_hub: float) -> tuple[Link, p.Welcome]:
        """Connect, retrying with backoff for up to ``wait_for_hub`` seconds."""
        patience = Deadline(wait_for_hub)
        first, cap = self.reconnect_delay
        for attempt in itertools.count():
            try:
                return self._connect(None, Deadline(self.open_timeout))
            except (ConnectionLost, TimeoutError, TryAgainLater) as exc:
                left = patience.remaining() or 0.0
                if left <= 0:
                    raise
                # The last wait is cut to what is left, so the final attempt comes at
                # the end of wait_for_hub, not a backoff step before it.
                delay = min(left, min(cap, first * 2**attempt) * random.uniform(0.5, 1.0))
                logger.info("hub not reachable yet (%s); retrying in %.2f s", exc, delay)
                time.sleep(delay)  # nothing to wake us early: this is the constructor
        raise AssertionError("unreachable")  # pragma: no cover

    def _opening_socket(self, sock: socket.socket) -> None:
        """Remember the socket of a connection being opened, for close() to abort."""
        self._opening = sock
        if self._closing:
            sock.shutdown(socket.SHUT_RDWR)

    def _resumable_ids(self) -> tuple[str, ...]:
        """Ids of the pending tasks to name in a resuming hello, as many as fit in a
        message; the rest (only past ~20,000 pending tasks) fail now, clearly."""
        with self._lock:
            ids = list(self._handles)
        room = self.max_message_size // 2
        fit = 0
        for task_id in ids:
            room -= len(task_id) + 3
            if room < 0:
                break
            fit += 1
        for task_id in ids[fit:]:
            with self._lock:
                handle = self._handles.pop(task_id, None)
            if handle is not None:
                handle._complete(None, ConnectionLost("too many pending tasks to resume"), {})
        return tuple(ids[:fit])

    def _apply_welcome(self, welcome: p.Welcome) -> None:
        self.session = welcome.session
        self.max_message_size = welcome.max_message_size
        self.task_start_timeout = welcome.task_start_timeout
        # How long start() may hold its claim back, hoping the answer comes first: a
        # small part of the hub's start window.
        self._claim_delay = min(MAX_CLAIM_DELAY, welcome.task_start_timeout / 10)
        self.resume_grace = welcome.resume_grace

    def _wait_connected(self) -> None:
        self._check_process()
        if self._closing:
            raise ConnectionLost("the client is closed")
        if threading.current_thread() is self._reader and not self._connected.is_set():
            # A callback: waiting here would stop the very thread that reconnects.
            raise ConnectionLost(f"not connected to {self.url} (reconnecting)")
        if not self._connected.wait(self.open_timeout) or self._ended.is_set():
            raise ConnectionLost(f"not connected to {self.url}: {self._lost}")

    def _reconnect(self) -> bool:
        """Reconnect with backoff until it works (True), or close()/give up (False)."""
        first, cap = self.reconnect_delay
        give_up = Deadline(self.reconnect_timeout)
        grace_end = time.monotonic() + self.resume_grace  # the hub keeps our tasks that long
        for attempt in itertools.count():
            delay = min(cap, first * 2**attempt) * random.uniform(0.5, 1.0)
            left = grace_end - time.monotonic()
            if self._handles and left > 0:
                delay = min(delay, left)  # wake up in time to fail them
            if self._stop.wait(delay):
                return False
            if self._handles and time.monotonic() >= grace_end:
                self._fail_handles(
                    ConnectionLost(f"not reconnected to {self.url} within the hub's resume grace")
                )
            try:
                session = self.session if self._resume else None
                link, welcome = self._connect(session, Deadline(self.open_timeout))
            except TryAgainLater as exc:
                # E.g. the hub still counts our dropped connection: retry.
                logger.info("reconnect attempt %d: %s", attempt + 1, exc)
                if give_up.expired():
                    self._lost = exc
                    return False
                continue
            except AuthenticationError as exc:
                self._lost = exc
                logger.error("the hub refused %r on reconnect: %s", self.name, exc)
                return False
            except (ConnectionLost, TimeoutError, ProtocolError) as exc:
                logger.debug("reconnect attempt %d failed: %s", attempt + 1, exc)
                if give_up.expired():
                    self._lost = exc
                    logger.error("giving up reconnecting to %s: %s", self.url, exc)
                    return False
                continue
            with self._lock:
                if self._closing:
                    link.drop()
                    return False
                self._link = link
                self._apply_welcome(welcome)
                patterns = list(self._handlers)
                stale = [] if welcome.resumed else list(self._handles.values())
                if stale:
                    self._handles.clear()  # of the old session: newer ones are kept
            self._resume = True
            lost = ConnectionLost(
                "the hub did not keep this client's session (restarted, or the "
                "drop outlasted its resume grace)"
            )
            for handle in stale:
                if not handle.done():
                    handle._complete(None, lost, {})
            for pattern in patterns:
                request_id = next(self._ids)
                with self._lock:
                    self._resubscribing[request_id] = pattern
                self._send_quietly(p.Subscribe(request_id, pattern))
            self._connected.set()
            logger.info("reconnected to %s%s", self.url, " (resumed)" if welcome.resumed else "")
            return True
        return False  # pragma: no cover  (itertools.count never ends)

    # ----------------------------------------------------------------- reading

    def _reader_main(self) -> None:
        try:
            while True:
                try:
                    self._read(self._link)
                except _Lost as ended:
                    error = ended.error
                if self._closing:
                    return
                self._lost = error
                self._on_drop(error)
                if isinstance(error, AuthenticationError) or not self.reconnect:
                    return
                if isinstance(error, ProtocolError):
                    # The hub sent what we cannot read: resuming would replay it for
                    # ever. Start a new session; what was pending fails, clearly.
                    self._fail_handles(
                        ConnectionLost(f"the hub sent a message this client cannot read: {error}")
                    )
                    self._resume = False
                if not self._reconnect():
                    return
        except Exception as exc:  # a bug of ours: don't hide it, don't hang the user
            self._lost = exc
            logger.exception("taskhub reader crashed")
        finally:
            self._ended.set()
            self._connected.set()  # wake waiters: they see _ended
            self._link.drop()
            why = self._lost
            if self._closing:
                why = ConnectionLost("the client was closed")
            elif not isinstance(why, ConnectionLost):
                why = ConnectionLost(f"connection to {self.url} lost: {why}")
            self._fail_all(why)

    def _read(self, link: Link) -> None:
        """Read and dispatch until this connection ends; raises _Lost with why.

        Wakes for data, for a deferred claim that falls due, and after ping_interval
        of silence: then it pings, and after another interval gives the hub up.
        """
        interval = self.ping_interval
        awaiting_pong = False
        heard = time.monotonic()
        try:
            while True:
                now = time.monotonic()
                claim = self._send_due_claims(now)
                if claim is None and now - heard < 0.001:
                    link.settimeout(interval)  # the usual case: unchanged, no system call
                else:
                    wake = heard + interval if claim is None else min(claim, heard + interval)
                    link.settimeout(max(wake - now, 0.0001))
                try:
                    frames = link.read()
                except socket.timeout:
                    now = time.monotonic()
                    if now < heard + interval:
                        continue  # woke for a claim
                    if awaiting_pong:
                        raise _Lost(
                            ConnectionLost("the hub stopped answering heartbeats")
                        ) from None
                    awaiting_pong = True
                    link.write(encode_frame(OP_PING, b"hb", mask=True))
                    # The pong (or anything) must come within an interval of the ping
                    # going out, which may be late: behind a big answer another
                    # thread is writing, which the hub reads first.
                    heard = time.monotonic()
                    continue
                heard = time.monotonic()
                awaiting_pong = False
                for opcode, payload in frames:
                    if opcode == OP_TEXT:
                        self._dispatch(p.decode(payload))
                    elif opcode == OP_PING:
                        link.write(encode_frame(OP_PONG, payload, mask=True))
                    elif opcode == OP_CLOSE:
                        code, reason = parse_close(payload)
                        try:  # the closing handshake's echo
                            link.write(encode_close(p.CLOSE_NORMAL, "", mask=True))
                        except OSError:
                            pass
                        if code in p.FATAL_CLOSE_CODES:
                            raise _Lost(AuthenticationError(reason))
                        raise _Lost(ConnectionLost(f"hub closed the connection: {code} {reason}"))
                    elif opcode == OP_BINARY:
                        raise ProtocolError("the hub sent a binary frame")
        except (OSError, FrameError, TaskHubError) as exc:
            raise _Lost(exc) from None

    def _on_drop(self, error: BaseException) -> None:
        """The connection is gone: stop what belonged to it."""
        self._claims.clear()  # their messages would be dropped now: see _send_task_text
        with self._lock:
            self._connected.clear()
            self._generation += 1
            running = list(self._running.values())
            requests = list(self._requests.values())
        self._link.drop()
        if not self._closing:
            logger.warning("connection to %s lost: %s", self.url, error)
        for task in running:  # the hub has given these to someone else or failed them
            task._cancelled_by_hub("connection lost")
        # Their handlers may run on: the next connection's tasks get threads of their own.
        self._pool.grow(len(running))
        for done, _ in requests:
            done.set()
        if not self.reconnect or self.resume_grace <= 0:
            self._fail_handles(ConnectionLost(f"connection to {self.url} lost: {error}"))

    def _dispatch(self, msg: p.Message) -> None:
        """Act on one message from the hub. Runs on the reader thread."""
        if isinstance(msg, p.Done):
            with self._lock:
                handle = self._handles.pop(msg.task, None)
            if handle is not None:
                info = msg.error
                error = None
                if info is not None:
                    error = from_code(
                        info.code,
                        info.message,
                        task_id=handle.task_id,
                        topic=handle.topic,
                        service=info.service,
                        remote_type=info.remote_type,
                    )
                if handle._done_callbacks_added:  # user code is about to run here
                    self._release_claims()
                handle._complete(msg.result, error, msg.outcomes)
        elif isinstance(msg, p.Update):
            with self._lock:
                handle = self._handles.get(msg.task)
            if handle is not None:
                if handle._listeners:  # user code is about to run on this thread
                    self._release_claims()
                handle._add_update(msg.data)
        elif isinstance(msg, p.Task):
            self._accept_task(msg)
        elif isinstance(msg, p.Cancel):
            with self._lock:
                task = self._running.get(msg.task)
            if task is not None:
                task._cancelled_by_hub(msg.reason)
        elif isinstance(msg, p.Reply):
            self._on_reply(msg)
        else:
            raise ProtocolError(f"unexpected {msg.TYPE!r} from the hub")

    def _on_reply(self, reply: p.Reply) -> None:
        with self._lock:
            waiter = self._requests.get(reply.id)
            pattern = self._resubscribing.pop(reply.id, None)
        if waiter is not None:
            waiter[1].append(reply)
            waiter[0].set()
        elif pattern is not None and reply.error is not None:
            logger.error("re-subscribing to %r failed: %s", pattern, reply.error.message)

    # ----------------------------------------------------------------- handlers

    def _accept_task(self, msg: p.Task) -> None:
        claim_by = time.monotonic() + self._claim_delay
        with self._lock:
            closing = self._closing
            task = Task(self, msg, self._generation, claim_by)
            if not closing:
                self._running[task.id] = task
        if closing:
            self._send_quietly(p.Fail(task.id, "ClientClosing", "the worker is shutting down"))
            return
        self._claims.append(task)
        self._pool.submit(task)

    def _release_claims(self) -> None:
        """About to run user callbacks on the reader: a slow one must not hold back
        the claims start() left to this thread. Send the deferred ones now; the other
        running tasks' start() then sends at once. Reader thread only."""
        claims = self._claims
        while claims:
            task = claims.popleft()
            if task._claim != _CLAIMED:  # answered or claimed already: nothing to send
                task._send_deferred_claim()

    def _send_due_claims(self, now: float) -> float | None:
        """Send the claims that start() deferred and are due; return when the next one
        is (None: none waiting). Reader thread only."""
        claims = self._claims
        while claims:
            task = claims[0]
            if task._claim == _CLAIMED:  # answered or claimed already: nothing to send
                claims.popleft()
            elif task._claim_by <= now:
                claims.popleft()
                task._send_deferred_claim()
            else:
                return task._claim_by
        return None

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
        """Run the handler for one task and send its answer (exactly one, always)."""
        try:
            handler = self._handler_for(task.topic)
            reply: p.Result | p.Fail
            if handler is None:
                reply = p.Fail(task.id, "NoHandler", f"no handler for {task.topic!r} any more")
            else:
                try:
                    result = handler(task)
                except BaseException as exc:  # even SystemExit: the task must be answered
                    logger.warning(
                        "handler for %r raised on task %s", task.topic, task.id, exc_info=True
                    )
                    reply = p.Fail(task.id, type(exc).__name__, str(exc)[:2000])
                else:
                    reply = p.Result(task.id, result)
                    if task.cancelled and task.cancel_reason == "not started in time":
                        logger.warning(
                            "task %s on %r: the result is dropped: the handler neither "
                            "started nor returned within the hub's task_start_timeout "
                            "(%.3g s); call task.start() first in handlers that take longer",
                            task.id,
                            task.topic,
                            self.task_start_timeout,
                        )
            self._send_reply(task, reply)
        finally:
            with self._lock:
                self._running.pop(task.id, None)
                stale = task._generation != self._generation
            if stale:
                self._pool.shrink()  # a handler from an earlier connection is done

    # ----------------------------------------------------------------- sending

    def _check_process(self) -> None:
        if self._forked:
            raise InvalidState(
                "this Client was created in the parent process before a fork: "
                "create one in each process that uses it (e.g. in a post-fork hook)"
            )

    def _check_open(self) -> None:
        """Requires self._lock."""
        if self._closing:
            raise ConnectionLost("the client is closed")
        if self._ended.is_set():
            raise ConnectionLost(f"connection to {self.url} lost: {self._lost}")

    def _request(self, msg: p.Subscribe | p.Unsubscribe) -> None:
        if threading.current_thread() is self._reader:
            raise ConcurrencyError("sub()/unsub() from a callback would deadlock")
        self._wait_connected()
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
            if error.code == "too_many_subscriptions":
                raise LimitExceeded(error.message)
            raise TaskHubError(error.message)

    def _send(self, msg: p.Message) -> None:
        try:
            self._link.send_text(p.encode(msg))
        except OSError as exc:
            raise ConnectionLost(f"cannot send to {self.url}: {exc}") from exc

    def _send_quietly(self, msg: p.Message) -> None:
        """Send, ignoring a lost connection (the hub has failed the task anyway)."""
        try:
            self._send(msg)
        except ConnectionLost:
            logger.debug("dropped %s: connection lost", msg.TYPE)

    def _send_reply(self, task: Task, msg: p.Result | p.Fail) -> None:
        """Send a handler's final answer; one that can't be sent fails the task."""
        try:
            text = p.encode(msg)
            if isinstance(msg, p.Result) and p.too_deep(text, msg.result):
                raise ValueError(f"it is nested more than {p.MAX_DEPTH} levels deep")
        except (TypeError, ValueError) as exc:
            text = p.encode(p.Fail(task.id, type(exc).__name__, f"the result can't be sent: {exc}"))
        if len(text) > self.max_message_size:  # ASCII: characters are bytes
            text = p.encode(
                p.Fail(
                    task.id,
                    "PayloadTooLarge",
                    "the result is over the hub's max_message_size",
                    code="payload_too_large",
                )
            )
        task._send_claiming(text, answer=True)

    def _send_task_text(self, task: Task, text: str) -> None:
        """Send a worker message, unless the task came on an earlier connection (the
        hub has already failed or redelivered it)."""
        with self._lock:
            if task._generation != self._generation:
                return
            link = self._link
        try:
            link.send_text(text)
        except OSError:
            logger.debug("message for %s dropped: connection lost", task.id)

    def _fail_handles(self, error: BaseException) -> None:
        with self._lock:
            handles = list(self._handles.values())
            self._handles.clear()
        for handle in handles:
            if not handle.done():
                handle._complete(None, error, {})

    def _fail_all(self, error: BaseException) -> None:
        """Fail every pending handle and wake every waiting request."""
        self._fail_handles(error)
        with self._lock:
            requests = list(self._requests.values())
            running = list(self._running.values())
        for done, _ in requests:
            done.set()
        for task in running:
            task._cancelled_by_hub("connection lost")


__all__ = ["Client", "Task"]
