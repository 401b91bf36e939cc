"""The hub: accept loop, one thread per connection, one lock around the Router.

Threads (all named, all daemons, all joined by stop()):
    taskhub-accept           accepts sockets and starts a connection thread each
    taskhub-timer            applies the router's deadlines (start/finish timeouts)
    taskhub-conn-HOST:PORT   one per connection (_server_conn.py): handshake,
                             authentication, then reads and routes messages
    taskhub-drain-HOST:PORT  only while a peer reads slower than the hub writes

Locking: one lock (``_lock``) guards the Router and the table of connections; the
timer's Condition shares it. Under it: no I/O and no user code. The router's
outgoing messages are appended to each target connection's outbox while it is
held (which fixes their order), and written after it is released by whichever
thread gets that connection's send lock first, all queued messages in one write.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Iterable, Sequence

from . import config
from . import protocol as p
from ._deadline import Deadline
from ._server_conn import _Closed, _Connection, _FailureLimiter
from ._signals import interrupt_once
from .auth import DUMMY_HASHED_KEY, DUMMY_KEY, StoredKey
from .errors import ProtocolError
from .router import Credential, Outgoing, Router
from .topics import validate_permission

logger = logging.getLogger(__name__)

#: Hashed keys checked at once (scrypt: 16 MiB and ~50 ms each); others wait.
MAX_HASH_CHECKS = 4


class Server:
    """The task hub: a WebSocket server routing tasks between services.

    Args:
        host: Interface to listen on.
        port: TCP port; 0 picks a free one (read it back from ``port``).
        task_start_timeout: Seconds a task waits for a subscriber to start or answer.
        task_finish_timeout: Default seconds a task may take from publish to result.
        auth_timeout: Seconds a new connection has to upgrade and authenticate.
        max_message_size: Largest message, in bytes, the hub accepts.
        ping_interval: Seconds of silence after which the hub pings a client; a
            client silent for two intervals is dropped. Also bounds a blocked write.
        ssl_context: Serve ``wss://`` with this server-side SSLContext.
        max_queued_messages: Messages that may wait to be written to one connection;
            a connection that falls further behind is dropped as a slow consumer.
        resume_grace: Seconds the hub keeps a disconnected publisher's tasks (and the
            updates and results they produce) for its client to reconnect and resume.
        max_pending: Tasks one connection may have pending at once.
        max_subscriptions: Patterns one connection may subscribe to.
        max_handshakes: Connections that may be upgrading/authenticating at once;
            more are refused at once (idle sockets can't pin unbounded threads).
        auth_failure_limit: Failed authentications per remote host per minute after
            which that host is refused without a key check.

    ``start()`` returns once the hub is listening; ``serve_forever()`` blocks until
    ``stop()`` (from another thread) or Ctrl-C. ``with Server(...) as hub:`` starts it
    and stops it on exit. Methods are thread-safe.
    """

    def __init__(
        self,
        host: str = config.DEFAULT_HOST,
        port: int = config.DEFAULT_PORT,
        *,
        task_start_timeout: float = config.DEFAULT_TASK_START_TIMEOUT,
        task_finish_timeout: float = config.DEFAULT_TASK_FINISH_TIMEOUT,
        auth_timeout: float = config.DEFAULT_AUTH_TIMEOUT,
        max_message_size: int = config.DEFAULT_MAX_MESSAGE_SIZE,
        ping_interval: float = config.DEFAULT_PING_INTERVAL,
        ssl_context: ssl.SSLContext | None = None,
        max_queued_messages: int = config.DEFAULT_MAX_QUEUED_MESSAGES,
        resume_grace: float = config.DEFAULT_RESUME_GRACE,
        max_pending: int = config.DEFAULT_MAX_PENDING,
        max_subscriptions: int = config.DEFAULT_MAX_SUBSCRIPTIONS,
        max_handshakes: int = config.DEFAULT_MAX_HANDSHAKES,
        auth_failure_limit: int = config.DEFAULT_AUTH_FAILURE_LIMIT,
    ) -> None:
        task_start_timeout = config.check_seconds(
            "task_start_timeout", task_start_timeout, maximum=config.MAX_INTERVAL
        )
        task_finish_timeout = config.check_seconds(
            "task_finish_timeout", task_finish_timeout, maximum=config.MAX_TASK_TIMEOUT
        )
        auth_timeout = config.check_seconds(
            "auth_timeout", auth_timeout, maximum=config.MAX_INTERVAL
        )
        ping_interval = config.check_seconds(
            "ping_interval", ping_interval, maximum=config.MAX_INTERVAL
        )
        resume_grace = config.check_seconds(
            "resume_grace", resume_grace, maximum=config.MAX_INTERVAL, zero_ok=True
        )
        max_message_size = config.check_count("max_message_size", max_message_size, minimum=1024)
        max_queued_messages = config.check_count("max_queued_messages", max_queued_messages)
        max_pending = config.check_count("max_pending", max_pending)
        max_subscriptions = config.check_count("max_subscriptions", max_subscriptions)
        max_handshakes = config.check_count("max_handshakes", max_handshakes)
        auth_failure_limit = config.check_count("auth_failure_limit", auth_failure_limit)
        self.host = host
        self._requested_port = port
        self.task_start_timeout = float(task_start_timeout)
        self.task_finish_timeout = float(task_finish_timeout)
        self.auth_timeout = float(auth_timeout)
        self.max_message_size = int(max_message_size)
        self.ping_interval = float(ping_interval)
        self.ssl_context = ssl_context
        self.max_queued_messages = int(max_queued_messages)
        self.resume_grace = float(resume_grace)
        self.max_handshakes = int(max_handshakes)
        self._auth_limiter = _FailureLimiter(auth_failure_limit, window=60.0)
        self._hash_checks = threading.BoundedSemaphore(MAX_HASH_CHECKS)
        self._credentials: dict[str, tuple[StoredKey, Credential]] = {}
        self._unknown_name_key = DUMMY_KEY

        self._lock = threading.Lock()  # guards _router, _conns, _timer_target
        self._timer_wakeup = threading.Condition(self._lock)
        self._router = Router(
            task_start_timeout=self.task_start_timeout,
            task_finish_timeout=self.task_finish_timeout,
            resume_grace=self.resume_grace,
            max_pending=max_pending,
            max_subscriptions=max_subscriptions,
            max_buffered=self.max_queued_messages,
            own_task_ids=True,
        )
        self._conns: dict[str, _Connection] = {}  # authenticated, by conn id
        self._timer_target: float | None = None

        self._threads_lock = threading.Lock()  # guards _all_conns, _authenticated
        self._all_conns: set[_Connection] = set()
        self._authenticated = 0
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._timer_thread: threading.Thread | None = None
        self._stopped = threading.Event()
        self.stopping = False

    # ----------------------------------------------------------------- config

    def add_credential(
        self,
        name: str,
        key: str | None = None,
        *,
        key_hash: str | None = None,
        sub_permissions: Sequence[str] = (),
        pub_permissions: Sequence[str] = (),
        max_instances: int = 1,
    ) -> None:
        """Allow service ``name`` to connect with ``key`` (or a key matching ``key_hash``).

        Permissions are topics (granting that topic and all below it) or ``"*"``.
        Replaces an existing credential of that name for new connections.

        Raises:
            ValueError: For an empty key, a bad hash, or max_instances < 1.
            InvalidTopic: For a malformed permission.
        """
        if not isinstance(name, str) or not name or len(name) > 100:
            raise ValueError("a service name must be a non-empty string of at most 100 chars")
        if isinstance(sub_permissions, str) or isinstance(pub_permissions, str):
            raise TypeError("permissions must be a list of topics, not a string")
        if not isinstance(max_instances, int) or max_instances < 1:
            raise ValueError("max_instances must be an integer >= 1")
        stored = StoredKey(key=key, key_hash=key_hash)
        credential = Credential(
            name,
            tuple(validate_permission(t) for t in sub_permissions),
            tuple(validate_permission(t) for t in pub_permissions),
            max_instances,
        )
        self._credentials[name] = (stored, credential)
        if stored.hashed:
            self._unknown_name_key = DUMMY_HASHED_KEY  # see auth.DUMMY_KEY

    # ----------------------------------------------------------------- lifecycle

    @property
    def port(self) -> int:
        """The port the hub listens on (after start())."""
        if self._listener is None:
            return self._requested_port
        return int(self._listener.getsockname()[1])

    @property
    def url(self) -> str:
        """``ws://host:port`` (``wss://`` with TLS) for clients to connect to."""
        scheme = "wss" if self.ssl_context else "ws"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"

    def start(self) -> None:
        """Bind, listen and start serving in background threads. Returns once listening.

        Raises:
            OSError: If the address cannot be bound.
            InvalidState: If the hub was already started.
        """
        if self._listener is not None or self._stopped.is_set():
            from .errors import InvalidState

            raise InvalidState("a Server can be started once")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((self.host, self._requested_port))
            listener.listen(512)
        except OSError:
            listener.close()
            raise
        self._listener = listener
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name="taskhub-accept", daemon=True
        )
        self._timer_thread = threading.Thread(
            target=self._timer_loop, name="taskhub-timer", daemon=True
        )
        self._accept_thread.start()
        self._timer_thread.start()
        logger.info("taskhub listening on %s", self.url)

    def serve_forever(self, *, stop_signals: Iterable[int] = ()) -> None:
        """Start if needed, then block until stop() is called or Ctrl-C (which stops).

        Args:
            stop_signals: Signals that stop the hub like Ctrl-C while this runs, e.g.
                ``[signal.SIGTERM]`` (main thread only; the previous handlers come
                back afterwards).
        """
        with interrupt_once(stop_signals) as signals:  # ValueError before starting
            try:
                if self._listener is None:
                    self.start()
                while not self._stopped.wait(3600):
                    pass
            except KeyboardInterrupt:
                logger.info("interrupted")
            finally:
                try:
                    signals.mute()  # a second Ctrl-C must not cut the shutdown short
                finally:
                    self.stop()

    def stop(self, timeout: float = config.DEFAULT_CLOSE_TIMEOUT) -> None:
        """Stop accepting, fail pending tasks, close every connection with 1001 and
        join all threads, waiting at most about ``timeout`` seconds. Idempotent."""
        with self._lock:
            if self.stopping:
                already = True
            else:
                already, self.stopping = False, True
        if already:
            self._stopped.wait(timeout)
            return
        deadline = Deadline(timeout)
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
            except OSError:
                pass
            self._listener.close()
        with self._lock:
            out = self._router.shutdown()
            targets = self._enqueue(out)
            self._timer_wakeup.notify_all()
        self._flush(targets)
        with self._threads_lock:
            conns = list(self._all_conns)
        for conn in conns:
            conn.close(p.CLOSE_GOING_AWAY, "hub shutting down")
        grace = Deadline(min(1.0, deadline.remaining() or 0.0))
        for conn in conns:  # one shared moment for clients to answer the Close
            conn.thread.join(grace.remaining())
        for conn in conns:
            conn._abort("hub stopped")
        for thread in [c.thread for c in conns] + [self._accept_thread, self._timer_thread]:
            if thread is not None and thread is not threading.current_thread():
                thread.join(deadline.remaining())
        self._stopped.set()
        logger.info("taskhub stopped")

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----------------------------------------------------------------- stats

    def connection_count(self) -> int:
        """Authenticated connections right now."""
        with self._lock:
            return len(self._conns)

    def instances(self, service: str) -> int:
        """Connected instances of ``service``."""
        with self._lock:
            return self._router.instances(service)

    def pending_tasks(self) -> int:
        """Tasks published and not yet done."""
        with self._lock:
            return self._router.pending_count()

    # ----------------------------------------------------------------- internals

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self.stopping:
            try:
                sock, addr = self._listener.accept()
            except OSError:
                if self.stopping:
                    return
                logger.exception("accept failed")
                time.sleep(0.05)  # e.g. EMFILE: don't spin; not a synchronization
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.ssl_context is not None:
                try:
                    sock.settimeout(self.auth_timeout)
                    sock = self.ssl_context.wrap_socket(
                        sock, server_side=True, do_handshake_on_connect=False
                    )
                except (OSError, ValueError):
                    sock.close()
                    continue
            conn = _Connection(self, sock, addr)
            with self._threads_lock:
                if self.stopping:
                    sock.close()
                    return
                handshaking = len(self._all_conns) - self._authenticated
                if handshaking >= self.max_handshakes:
                    logger.warning(
                        "refusing %s: %d connections still handshaking", conn.peer, handshaking
                    )
                    sock.close()
                    continue
                self._all_conns.add(conn)
                conn.thread.start()  # under the lock: stop() never sees it unstarted

    def _forget(self, conn: _Connection, registered: bool) -> None:
        with self._threads_lock:
            self._all_conns.discard(conn)
            if registered:
                self._authenticated -= 1

    def _count_authenticated(self) -> None:
        with self._threads_lock:
            self._authenticated += 1

    def _timer_loop(self) -> None:
        while True:
            try:
                with self._lock:
                    while not self.stopping:
                        due = self._router.next_deadline()
                        now = time.monotonic()
                        if due is not None and due <= now:
                            break
                        self._timer_target = due
                        # At most an hour at a time: a far deadline must not overflow.
                        self._timer_wakeup.wait(3600.0 if due is None else min(due - now, 3600.0))
                    if self.stopping:
                        return
                    out = self._router.expire(time.monotonic())
                    targets = self._enqueue(out)
                self._flush(targets)
            except Exception:  # a bug of ours: log it, keep timing everyone else out
                logger.exception("taskhub timer: applying deadlines failed")

    def _wake_timer(self) -> None:
        """Wake the timer if the router's next deadline is earlier than it waits for.
        Requires self._lock."""
        due = self._router.next_deadline()
        if due is not None and (self._timer_target is None or due < self._timer_target):
            self._timer_target = due
            self._timer_wakeup.notify()

    def _enqueue(self, out: Iterable[Outgoing]) -> list[_Connection]:
        """Queue router output on each target's outbox. Requires self._lock.

        A connection that still has max_queued_messages unwritten when new output
        comes is a slow consumer: it gets nothing more and is dropped by _flush(),
        after the lock is released. (One router call may produce a larger burst,
        e.g. many results at once: it is bounded by max_pending, so it all goes.)
        """
        targets: dict[str, _Connection] = {}
        conns = self._conns
        limit = self.max_queued_messages
        for o in out:
            conn = targets.get(o.conn_id)
            if conn is None:
                conn = conns.get(o.conn_id)
                if conn is None:
                    continue
                targets[o.conn_id] = conn
                if len(conn.outbox) >= limit:
                    conn.slow = True
            if not conn.slow:
                conn.outbox.append(o.message)
        return list(targets.values())

    @staticmethod
    def _flush(targets: Iterable[_Connection]) -> None:
        for conn in targets:
            if conn.slow:
                conn._abort("slow consumer: too many messages queued for it")
            else:
                conn.flush()

    def _route(self, conn: _Connection, messages: list[p.Message]) -> ProtocolError | None:
        """Route messages from one connection, in order, under one lock.

        Returns the ProtocolError that stopped it, if any (the messages before it
        have been routed; the caller closes the connection).
        """
        error = None
        out: list[Outgoing] = []
        with self._lock:
            now = time.monotonic()
            receive = self._router.receive
            for message in messages:
                try:
                    out += receive(conn.id, message, now)
                except ProtocolError as exc:
                    error = exc
                    break
            targets = self._enqueue(out)
            self._wake_timer()
        self._flush(targets)
        return error

    def _on_connect(
        self, conn: _Connection, credential: Credential, concurrency: int, hello: p.Hello
    ) -> bool:
        """Register an authenticated connection and queue its welcome; True if it
        resumed ``hello.session``. Raises AuthenticationError past max_instances."""
        name = credential.name
        session = hello.session
        now = time.monotonic()
        with self._lock:
            if self.stopping:
                raise _Closed(p.CLOSE_GOING_AWAY, "hub shutting down")
            out: list[Outgoing] = []
            old = self._conns.get(session) if session else None
            if old is not None and old.name == name:
                # The client saw its connection die before we did: retire the old one.
                del self._conns[old.id]
                out += self._router.disconnect(old.id, now)
            else:
                old = None
            resumed = session is not None and self._router.can_resume(session, name)
            conn.id = session if resumed else f"{name}#{uuid.uuid4().hex[:16]}"  # type: ignore[assignment]
            missed = self._router.connect(conn.id, credential, concurrency, hello.pending)
            self._conns[conn.id] = conn
            conn.outbox.append(
                p.Welcome(
                    conn.id,
                    self.max_message_size,
                    self.task_start_timeout,
                    resumed,
                    self.resume_grace,
                )
            )
            # What a resumed session missed is bounded by the router (max_buffered
            # updates, one done per pending task): it all goes, past the outbox limit.
            conn.outbox.extend(o.message for o in missed)
            targets = self._enqueue(out)
            self._wake_timer()
        if old is not None:
            old._abort("replaced by a new connection of the same session")
        self._flush(t for t in targets if t is not conn)
        return resumed

    def _on_disconnect(self, conn: _Connection) -> None:
        with self._lock:
            if self._conns.get(conn.id) is not conn:
                return  # already retired (a resumed session replaced it)
            del self._conns[conn.id]
            out = self._router.disconnect(conn.id, time.monotonic(), not conn.said_goodbye)
            targets = self._enqueue(out)
            self._wake_timer()  # a resume grace may now be the next deadline
        self._flush(targets)
        logger.info("%s (%s) disconnected", conn.id, conn.peer)


__all__ = ["Server"]
