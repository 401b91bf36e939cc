"""The hub: accept loop, one thread per connection, one lock around the Router.

Threads (all named, all joined by stop()):
    taskhub-accept           accepts sockets and starts a connection thread each
    taskhub-timer            applies the router's deadlines (start/finish timeouts)
    taskhub-conn-HOST:PORT   handshake, authentication, then reads and routes messages

Writes: the router's outgoing messages are appended to each target connection's
outbox while the router lock is held (which fixes their order), and written after
it is released by whichever thread gets that connection's send lock first, all
queued messages in one ``sendall`` (never ``send``: see PITFALLS LP-01/02).
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

import wsproto
import wsproto.events as ev
from wsproto.utilities import RemoteProtocolError

from . import config
from . import protocol as p
from ._deadline import Deadline
from ._frames import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameError,
    FrameReader,
    encode_close,
    encode_frame,
    parse_close,
)
from ._transport import StreamSocket
from .auth import DUMMY_KEY, StoredKey
from .errors import AuthenticationError, ProtocolError
from .router import Credential, Outgoing, Router
from .topics import validate_permission

logger = logging.getLogger(__name__)

_MAX_CONCURRENCY = 1024  # cap on what a client may claim in hello


class _Closed(Exception):
    """Internal: the connection is over; carries the close code and reason."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class _Connection:
    """One client socket. The reader thread owns reads; any thread may flush().

    States: ``upgraded`` once the WebSocket handshake is done, ``close_sent`` once
    our Close frame is queued (nothing is written after it), ``dead`` once the
    socket is shut down.
    """

    def __init__(self, server: Server, sock: socket.socket, addr: Any) -> None:
        self.server = server
        self.sock = sock
        self.stream = StreamSocket(sock)
        self.peer = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)
        self.id = self.peer  # replaced by a unique id once authenticated
        self.name: str | None = None
        self.reader = FrameReader(server.max_message_size)
        self.send_lock = threading.Lock()  # one writer at a time, in outbox order
        self.outbox: deque[bytes | p.Message] = deque()  # messages or ready frames
        self.unsent = bytearray()  # written to the socket only in part (send_lock)
        self.drainer: threading.Thread | None = None  # writes unsent (send_lock)
        self.upgraded = False
        self.close_sent = False
        self.dead = False
        self.slow = False  # set under the server lock when its outbox overflows
        self.thread = threading.Thread(
            target=self._run, name=f"taskhub-conn-{self.peer}", daemon=True
        )

    # -- writing -----------------------------------------------------------

    def flush(self, wait: bool = False) -> None:
        """Write everything queued in the outbox, in one ``sendall``. Safe from any thread.

        Doesn't wait for another writer (unless ``wait``): whoever holds the send lock
        checks the outbox again after releasing it, so nothing queued is stranded,
        and a thread routing a message never stalls behind a slow consumer's write.
        """
        while self.outbox and not self.dead:
            if not self.send_lock.acquire(blocking=wait):
                return
            try:
                self._write_queued()
            finally:
                self.send_lock.release()

    def _write_queued(self) -> None:
        """Encode the outbox and write what the socket takes now. Requires send_lock.

        Never waits: what does not fit stays in ``unsent`` for this connection's
        drain thread, started on demand, which waits until the peer reads it (or
        drops the peer as a slow consumer after ping_interval).
        """
        chunks = []
        outbox = self.outbox
        while outbox:
            item = outbox.popleft()
            if self.close_sent:
                continue  # nothing may follow a Close frame
            if type(item) is bytes:
                chunks.append(item)
                self.close_sent = item[0] == 0x80 | OP_CLOSE
            else:
                text = p.encode(item)  # type: ignore[arg-type]
                chunks.append(encode_frame(OP_TEXT, text.encode("ascii")))
        if not chunks or self.dead:
            return
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if self.drainer is not None:  # already behind: keep the order, let it write
            self.unsent += data
        else:
            try:
                sent = self.stream.send_some(data)
            except OSError as exc:
                self._abort(f"write failed: {exc!r}")
                return
            if sent < len(data):
                self.unsent += data[sent:]
                self.drainer = threading.Thread(
                    target=self._drain, name=f"taskhub-drain-{self.peer}", daemon=True
                )
                self.drainer.start()
        if len(self.unsent) > config.MAX_UNSENT_BYTES:
            self._abort("slow consumer: too much data waiting for it to read")

    def _drain(self) -> None:
        """Write ``unsent`` as the peer reads it; drop the peer if it stops reading."""
        while True:
            if not self.stream.wait_writable(self.server.ping_interval):
                self._abort("slow consumer: it read nothing for ping_interval")
            with self.send_lock:
                if self.dead or not self.unsent:
                    self.unsent.clear()
                    self.drainer = None
                    return
                try:
                    sent = self.stream.send_some(memoryview(self.unsent))
                except OSError as exc:
                    self._abort(f"write failed: {exc!r}")
                    continue
                del self.unsent[:sent]
                if not self.unsent:
                    self.drainer = None
                    return

    def send_now(self, item: bytes | p.Message) -> None:
        """Queue and write, waiting for the send lock (order matters to the caller)."""
        self.outbox.append(item)
        self.flush(wait=True)

    def close(self, code: int, reason: str) -> None:
        """Send a Close frame once (after the upgrade). The reader thread then winds down."""
        if self.upgraded and not self.close_sent:
            self.send_now(encode_close(code, reason))

    def _abort(self, why: str) -> None:
        """Tear the socket down now; wakes the reader blocked in recv()."""
        if not self.dead:
            self.dead = True
            logger.log(
                logging.WARNING if why.startswith("slow") else logging.DEBUG,
                "connection %s (%s) dropped: %s",
                self.peer,
                self.name,
                why,
            )
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _linger(self) -> None:
        """Let a Close frame we sent reach the peer, then drop the socket.

        Half-close, then read (and discard) until the peer's EOF or one second, so
        the kernel does not answer unread data with a RST that would destroy the
        close reason in flight (PITFALLS LP-07).
        """
        deadline = Deadline(1.0)
        drainer = self.drainer
        if drainer is not None:  # the Close frame may be in what it still has to write
            drainer.join(deadline.remaining())
        if not self.dead:
            try:
                self.sock.shutdown(socket.SHUT_WR)
                while not deadline.expired():
                    self.stream.settimeout(deadline.remaining())
                    if not self.stream.recv_some():
                        break
            except (OSError, ValueError):
                pass
        self._abort("closed")
        drainer = self.drainer
        if drainer is not None:
            drainer.join(1.0)  # woken by the shutdown

    # -- reading -----------------------------------------------------------

    def _recv(self) -> bytes:
        try:
            data = self.stream.recv_some()
        except ssl.SSLError as exc:
            raise _Closed(p.CLOSE_PROTOCOL_ERROR, f"TLS error: {exc}") from None
        if not data:
            raise _Closed(p.CLOSE_NORMAL, "peer closed the socket")
        return data

    def _frames(self) -> list[tuple[int, bytes]]:
        """The next batch of frames, in order (pings are answered here)."""
        try:
            frames = self.reader.feed(self._recv())
        except FrameError as exc:
            raise _Closed(exc.code, exc.reason) from None
        for opcode, payload in frames:
            if opcode == OP_PING:
                self.send_now(encode_frame(OP_PONG, payload))
        return frames

    def _ending(self, opcode: int, payload: bytes) -> _Closed | None:
        """Why a non-text frame ends the connection (None for pings and pongs).

        A Close is answered here (the closing handshake's echo).
        """
        if opcode == OP_CLOSE:
            try:
                code, reason = parse_close(payload)
            except FrameError as exc:
                return _Closed(exc.code, exc.reason)
            self.close(p.CLOSE_NORMAL if code == 1005 else code, "")
            return _Closed(p.CLOSE_NORMAL, f"peer closed ({code} {reason})")
        if opcode == OP_BINARY:
            return _Closed(p.CLOSE_BAD_MESSAGE, "binary frames are not supported")
        return None

    def _run(self) -> None:
        server = self.server
        registered = False
        try:
            self._handshake(Deadline(server.auth_timeout))
            registered = True
            server._count_authenticated()
            self._serve()
        except _Closed as exc:
            level = (
                logging.DEBUG
                if exc.code in (p.CLOSE_NORMAL, p.CLOSE_GOING_AWAY)
                else logging.WARNING
            )
            logger.log(level, "closing %s (%s): %s", self.peer, self.name, exc.reason)
            self.close(exc.code, exc.reason)
        except (TimeoutError, socket.timeout):
            self.close(p.CLOSE_AUTH_TIMEOUT, "handshake or authentication timed out")
        except OSError as exc:
            if not self.dead and not server.stopping:
                logger.info("connection %s (%s) lost: %r", self.peer, self.name, exc)
        except Exception:
            logger.exception("connection thread %s crashed", self.peer)
            self.close(p.CLOSE_INTERNAL_ERROR, "internal error")
        finally:
            # Router first (fail or hand over its tasks now), then the Close handshake.
            if registered:
                server._on_disconnect(self)
            self._linger()
            try:
                self.sock.close()
            except OSError:
                pass
            server._forget(self, registered)

    def _handshake(self, deadline: Deadline) -> None:
        """Accept the WebSocket upgrade, then read and check hello. Bounded by deadline."""
        if isinstance(self.sock, ssl.SSLSocket):
            self.sock.settimeout(deadline.remaining())
            try:
                self.sock.do_handshake()
            except ssl.SSLError as exc:
                raise _Closed(p.CLOSE_NORMAL, f"TLS handshake failed: {exc}") from None
        request, rest = self._read_request(deadline)
        ws = wsproto.WSConnection(wsproto.ConnectionType.SERVER)
        try:
            ws.receive_data(request)
            events = list(ws.events())
        except RemoteProtocolError as exc:
            self._reject_http(f"Bad WebSocket upgrade request: {exc}")
            raise _Closed(p.CLOSE_NORMAL, "bad upgrade request") from None
        if not events or not isinstance(events[0], ev.Request):
            self._reject_http("Bad WebSocket upgrade request")
            raise _Closed(p.CLOSE_NORMAL, "bad upgrade request")
        self.stream.sendall(ws.send(ev.AcceptConnection()))  # no extensions (LP-03)
        self.upgraded = True
        frames = self.reader.feed(rest) if rest else []
        while True:
            for opcode, payload in frames:
                if opcode == OP_TEXT:
                    self._authenticate(payload)
                    return
                ending = self._ending(opcode, payload)
                if ending is not None:
                    raise ending
            self.stream.settimeout(max(deadline.remaining() or 0.0, 0.001))
            frames = self._frames()

    def _read_request(self, deadline: Deadline) -> tuple[bytes, bytes]:
        """The HTTP upgrade request, and whatever came after it."""
        data = b""
        while b"\r\n\r\n" not in data:
            if len(data) > 16384:
                self._reject_http("Request header too large")
                raise _Closed(p.CLOSE_NORMAL, "request header too large")
            self.stream.settimeout(max(deadline.remaining() or 0.0, 0.001))
            data += self._recv()
        end = data.index(b"\r\n\r\n") + 4
        return data[:end], data[end:]

    def _reject_http(self, text: str) -> None:
        body = text.encode()
        head = (
            f"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        try:
            self.stream.sendall(head + body)
        except OSError:
            pass

    def _authenticate(self, text: bytes) -> None:
        server = self.server
        try:
            hello = p.decode(text)
        except ProtocolError as exc:
            raise _Closed(p.CLOSE_BAD_MESSAGE, f"bad hello: {exc}") from None
        if not isinstance(hello, p.Hello):
            raise _Closed(p.CLOSE_BAD_MESSAGE, "the first message must be hello")
        if hello.v != p.VERSION:
            raise _Closed(p.CLOSE_BAD_MESSAGE, f"unsupported protocol version {hello.v}")
        host = self.peer.rsplit(":", 1)[0]
        if server._auth_limiter.blocked(host, time.monotonic()):
            raise _Closed(p.CLOSE_AUTH_FAILED, "too many failed authentications; retry later")
        entry = server._credentials.get(hello.name)
        stored = entry[0] if entry else DUMMY_KEY
        if not stored.verify(hello.key) or entry is None:
            server._auth_limiter.failed(host, time.monotonic())
            logger.warning("authentication failed for %r from %s", hello.name[:100], self.peer)
            raise _Closed(p.CLOSE_AUTH_FAILED, "authentication failed: unknown name or wrong key")
        self.name = hello.name
        concurrency = min(hello.concurrency, _MAX_CONCURRENCY)
        # From now on other threads write to it: they must never wait for its reader.
        self.stream.set_nonblocking()
        try:
            resumed = server._on_connect(self, entry[1], concurrency, hello)
        except AuthenticationError as exc:
            raise _Closed(p.CLOSE_TOO_MANY_INSTANCES, str(exc)) from None
        self.flush(wait=True)  # welcome first, then whatever a resumed session missed
        logger.info(
            "%s connected from %s as %s%s",
            hello.name,
            self.peer,
            self.id,
            " (resumed)" if resumed else "",
        )

    def _serve(self) -> None:
        """Read, decode and route messages until the connection ends.

        All messages that arrived together are routed under one acquisition of the
        router lock, and what they produce is written in one go per connection.
        """
        server = self.server
        self.stream.settimeout(server.ping_interval)
        awaiting_pong = False
        while True:
            try:
                frames = self._frames()
            except (TimeoutError, socket.timeout):
                if awaiting_pong:
                    raise _Closed(p.CLOSE_GOING_AWAY, "no heartbeat answer") from None
                awaiting_pong = True
                self.send_now(encode_frame(OP_PING, b"hb"))
                continue
            awaiting_pong = False
            # In arrival order: messages before a Close or a bad frame still count.
            messages = []
            ending = None
            for opcode, payload in frames:
                if opcode == OP_TEXT:
                    try:
                        messages.append(p.decode(payload))
                    except ProtocolError as exc:
                        ending = _Closed(p.CLOSE_BAD_MESSAGE, f"protocol error: {exc}")
                        break
                else:
                    ending = self._ending(opcode, payload)
                    if ending is not None:
                        break
            if messages:
                error = server._route(self, messages)
                if error is not None:
                    ending = _Closed(p.CLOSE_BAD_MESSAGE, f"protocol error: {error}")
            if ending is not None:
                raise ending


class _FailureLimiter:
    """Counts failures per key in a sliding window. Callers need no lock: each call
    is a few dict/deque operations that the GIL keeps atomic enough for a limit."""

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self._failures: dict[str, deque[float]] = {}

    def failed(self, key: str, now: float) -> None:
        if len(self._failures) > 10_000:  # bound memory under a spray of addresses
            self._failures = {
                k: v for k, v in self._failures.items() if v and v[-1] > now - self.window
            }
        self._failures.setdefault(key, deque()).append(now)

    def blocked(self, key: str, now: float) -> bool:
        times = self._failures.get(key)
        while times and times[0] <= now - self.window:
            times.popleft()
        return bool(times) and len(times) >= self.limit  # type: ignore[arg-type]


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
        for name, value in (
            ("task_start_timeout", task_start_timeout),
            ("task_finish_timeout", task_finish_timeout),
            ("auth_timeout", auth_timeout),
            ("ping_interval", ping_interval),
        ):
            if not value > 0:
                raise ValueError(f"{name} must be a positive number of seconds, not {value!r}")
        if max_message_size < 1024:
            raise ValueError("max_message_size must be at least 1024 bytes")
        self.host = host
        self._requested_port = port
        self.task_start_timeout = float(task_start_timeout)
        self.task_finish_timeout = float(task_finish_timeout)
        self.auth_timeout = float(auth_timeout)
        self.max_message_size = int(max_message_size)
        self.ping_interval = float(ping_interval)
        self.ssl_context = ssl_context
        self.max_queued_messages = int(max_queued_messages)
        if resume_grace < 0:
            raise ValueError("resume_grace must be >= 0 seconds")
        self.resume_grace = float(resume_grace)
        self.max_handshakes = int(max_handshakes)
        self._auth_limiter = _FailureLimiter(auth_failure_limit, window=60.0)
        self._credentials: dict[str, tuple[StoredKey, Credential]] = {}

        self._lock = threading.Lock()  # guards _router, _conns, _timer_target
        self._timer_wakeup = threading.Condition(self._lock)
        self._router = Router(
            task_start_timeout=self.task_start_timeout,
            task_finish_timeout=self.task_finish_timeout,
            resume_grace=self.resume_grace,
            max_pending=max_pending,
            max_subscriptions=max_subscriptions,
            max_buffered=self.max_queued_messages,
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

    def serve_forever(self) -> None:
        """Start if needed, then block until stop() is called or Ctrl-C (which stops)."""
        if self._listener is None:
            self.start()
        try:
            while not self._stopped.wait(3600):
                pass
        except KeyboardInterrupt:
            logger.info("interrupted")
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
            with self._lock:
                while not self.stopping:
                    due = self._router.next_deadline()
                    now = time.monotonic()
                    if due is not None and due <= now:
                        break
                    self._timer_target = due
                    self._timer_wakeup.wait(None if due is None else due - now)
                if self.stopping:
                    return
                out = self._router.expire(time.monotonic())
                targets = self._enqueue(out)
            self._flush(targets)

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
            due = self._router.next_deadline()
            if due is not None and (self._timer_target is None or due < self._timer_target):
                self._timer_target = due
                self._timer_wakeup.notify()
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
        if old is not None:
            old._abort("replaced by a new connection of the same session")
        self._flush(t for t in targets if t is not conn)
        return resumed

    def _on_disconnect(self, conn: _Connection) -> None:
        with self._lock:
            if self._conns.get(conn.id) is not conn:
                return  # already retired (a resumed session replaced it)
            del self._conns[conn.id]
            out = self._router.disconnect(conn.id, time.monotonic())
            targets = self._enqueue(out)
        self._flush(targets)
        logger.info("%s (%s) disconnected", conn.id, conn.peer)


__all__ = ["Server"]
