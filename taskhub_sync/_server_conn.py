"""One client connection of the hub: handshake, authentication, reading, writing.

Each connection has its own thread (``taskhub-conn-HOST:PORT``) that does the
WebSocket upgrade with wsproto, checks the hello, then reads frames (see
_frames.py) and hands decoded messages to ``Server._route``. Any thread may queue
messages on its outbox and ``flush()`` them; writes never wait for a slow reader
(see _transport.py): what the socket doesn't take is written by a drain thread
started on demand.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

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
from .auth import StoredKey
from .errors import AuthenticationError, ProtocolError

if TYPE_CHECKING:
    from .server import Server

logger = logging.getLogger("taskhub_sync.server")

_MAX_CONCURRENCY = 1024  # cap on what a client may claim in hello


class _Closed(Exception):
    """Internal: the connection is over; carries the close code and reason."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def _encode_safely(message: p.Message) -> str:
    """Encode a message for a peer. decode() refuses what encode() can't handle, so
    this should never fail; if it does, a result becomes an error for its publisher
    (anything else is dropped and logged) rather than a dead connection thread."""
    try:
        return p.encode(message)
    except (TypeError, ValueError) as exc:
        logger.error("cannot encode a %s message: %s", message.TYPE, exc)
        if isinstance(message, p.Done):
            error = p.ErrorInfo("failed", f"the hub could not forward the result: {exc}")
            return p.encode(p.Done(message.task, {}, error=error))
        return ""


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
        self.said_goodbye = False  # the peer sent a Close frame
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
                text = _encode_safely(item)  # type: ignore[arg-type]
                if text:
                    chunks.append(encode_frame(OP_TEXT, text.encode("ascii")))
        if not chunks or self.dead:
            return
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        # Slow consumer: data still unsent when more comes. (One burst, e.g. what a
        # resumed session missed, may be large: it is bounded by the router.)
        if len(self.unsent) > config.MAX_UNSENT_BYTES:
            self._abort("slow consumer: too much data waiting for it to read")
            return
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
                # Started before it is published: _linger() joins self.drainer
                # without send_lock, and joining an unstarted thread raises.
                # (_drain() itself waits for send_lock, held here.)
                drainer = threading.Thread(
                    target=self._drain, name=f"taskhub-drain-{self.peer}", daemon=True
                )
                drainer.start()
                self.drainer = drainer

    def _drain(self) -> None:
        """Write ``unsent`` as the peer reads it; drop the peer if it stops reading."""
        while self._drain_step():
            pass
        # Like every holder of send_lock: what a flush() queued while we held it,
        # after our last look at the outbox, is ours to write.
        self.flush()

    def _drain_step(self) -> bool:
        """Wait until the peer can take more, write what it takes; False when done."""
        if not self.stream.wait_writable(self.server.ping_interval):
            self._abort("slow consumer: it read nothing for ping_interval")
        with self.send_lock:
            if self.outbox:  # queued by a flush() that found the lock taken by us
                self._write_queued()
            if self.dead or not self.unsent:
                self.unsent.clear()
                self.drainer = None
                return False
            try:
                sent = self.stream.send_some(memoryview(self.unsent))
            except OSError as exc:
                self._abort(f"write failed: {exc!r}")
                return True
            del self.unsent[:sent]
            if not self.unsent and not self.outbox:
                self.drainer = None
                return False
        return True

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
            self.stream.shutdown(socket.SHUT_RDWR)
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
                self.stream.shutdown(socket.SHUT_WR)
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

    def _frames(self, data: bytes | None = None) -> tuple[list[tuple[int, bytes]], _Closed | None]:
        """The frames in ``data`` (default: the next read), in order, and the framing
        violation that came after them, if any. Pings are answered here."""
        ending = None
        try:
            frames = self.reader.feed(self._recv() if data is None else data)
        except FrameError as exc:
            frames, ending = exc.frames, _Closed(exc.code, exc.reason)
        for opcode, payload in frames:
            if opcode == OP_PING:
                self.send_now(encode_frame(OP_PONG, payload))
        return frames, ending

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
            self.said_goodbye = True  # a deliberate close: nothing to resume
            return _Closed(p.CLOSE_NORMAL, f"peer closed ({code} {reason})")
        if opcode == OP_BINARY:
            return _Closed(p.CLOSE_BAD_MESSAGE, "binary frames are not supported")
        return None

    def _run(self) -> None:
        server = self.server
        registered = False
        try:
            frames, ending = self._handshake(Deadline(server.auth_timeout))
            registered = True
            server._count_authenticated()
            self._serve(frames, ending)
        except _Closed as exc:
            level = (
                logging.DEBUG
                if exc.code in (p.CLOSE_NORMAL, p.CLOSE_GOING_AWAY)
                else logging.WARNING
            )
            who = self.peer if self.name is None else f"{self.peer} ({self.name})"
            logger.log(level, "closing %s: %s", who, exc.reason)
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
                self.stream.close()
            except OSError:
                pass
            server._forget(self, registered)

    def _handshake(self, deadline: Deadline) -> tuple[list[tuple[int, bytes]], _Closed | None]:
        """Accept the WebSocket upgrade, then read and check hello. Bounded by deadline,
        however the peer trickles its bytes. Returns the frames that came after the
        hello in the same read, and the framing violation after them, if any."""
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
        frames, ending = self._frames(rest) if rest else ([], None)
        while True:
            for i, (opcode, payload) in enumerate(frames):
                if opcode == OP_TEXT:
                    self._authenticate(payload, deadline)
                    return frames[i + 1 :], ending
                closing = self._ending(opcode, payload)
                if closing is not None:
                    raise closing
            if ending is not None:
                raise ending
            self._wait_budget(deadline)
            frames, ending = self._frames()

    def _wait_budget(self, deadline: Deadline) -> None:
        """Set the next read's timeout to what is left of ``deadline``; raise
        TimeoutError if nothing is (a peer sending pings or a byte at a time must
        not stretch the handshake)."""
        if deadline.expired():
            raise TimeoutError("handshake or authentication timed out")
        self.stream.settimeout(max(deadline.remaining() or 0.0, 0.001))

    def _read_request(self, deadline: Deadline) -> tuple[bytes, bytes]:
        """The HTTP upgrade request, and whatever came after it."""
        data = b""
        while b"\r\n\r\n" not in data:
            if len(data) > 16384:
                self._reject_http("Request header too large")
                raise _Closed(p.CLOSE_NORMAL, "request header too large")
            self._wait_budget(deadline)
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

    def _verify(self, stored: StoredKey, key: str, deadline: Deadline) -> bool:
        """Check a key; hashed keys (16 MiB and ~50 ms of scrypt each) a few at a time."""
        if not stored.hashed:
            return stored.verify(key)
        if not self.server._hash_checks.acquire(timeout=deadline.remaining() or 0.0):
            raise _Closed(p.CLOSE_TRY_AGAIN_LATER, "too many authentications at once")
        try:
            return stored.verify(key)
        finally:
            self.server._hash_checks.release()

    def _authenticate(self, text: bytes, deadline: Deadline) -> None:
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
        limiter = server._auth_limiter
        if not limiter.begin(host, time.monotonic()):
            raise _Closed(p.CLOSE_TRY_AGAIN_LATER, "too many failed authentications from this host")
        ok = False
        try:
            entry = server._credentials.get(hello.name)
            stored = entry[0] if entry else server._unknown_name_key
            ok = self._verify(stored, hello.key, deadline) and entry is not None
        finally:
            limiter.end(host, time.monotonic(), ok)
        if not ok or entry is None:
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

    def _serve(self, frames: list[tuple[int, bytes]], ending: _Closed | None) -> None:
        """Read, decode and route messages until the connection ends, starting with
        ``frames`` (what came with the hello) and the violation after them, if any.

        All messages that arrived together are routed under one acquisition of the
        router lock, and what they produce is written in one go per connection.
        """
        server = self.server
        self.stream.settimeout(server.ping_interval)
        awaiting_pong = False
        while True:
            # In arrival order: messages before a Close or a bad frame still count.
            messages = []
            for opcode, payload in frames:
                if opcode == OP_TEXT:
                    try:
                        messages.append(p.decode(payload))
                    except ProtocolError as exc:
                        ending = _Closed(p.CLOSE_BAD_MESSAGE, f"protocol error: {exc}")
                        break
                else:
                    closing = self._ending(opcode, payload)
                    if closing is not None:
                        ending = closing
                        break
            if messages:
                error = server._route(self, messages)
                if error is not None:
                    ending = _Closed(p.CLOSE_BAD_MESSAGE, f"protocol error: {error}")
            if ending is not None:
                raise ending
            try:
                frames, ending = self._frames()
            except (TimeoutError, socket.timeout):
                if awaiting_pong:
                    raise _Closed(p.CLOSE_GOING_AWAY, "no heartbeat answer") from None
                awaiting_pong = True
                self.send_now(encode_frame(OP_PING, b"hb"))
                frames = []
                continue
            awaiting_pong = False


class _FailureLimiter:
    """Counts failed authentications per host in a sliding window, and the checks in
    progress: a check that is running counts as a failure until it succeeds, so
    parallel attempts cannot all slip in before the first failure is recorded."""

    #: Hosts remembered at most (a spray of addresses must not grow it for ever).
    MAX_HOSTS = 10_000

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self._lock = threading.Lock()
        self._failures: dict[str, deque[float]] = {}
        self._checking: dict[str, int] = {}

    def begin(self, key: str, now: float) -> bool:
        """Start a check for ``key``; False if it is over the limit (then don't check)."""
        with self._lock:
            times = self._failures.get(key)
            while times and times[0] <= now - self.window:
                times.popleft()
            if (len(times) if times else 0) + self._checking.get(key, 0) >= self.limit:
                return False
            self._checking[key] = self._checking.get(key, 0) + 1
            return True

    def end(self, key: str, now: float, ok: bool) -> None:
        """Finish a check begun with begin(); a failed one is remembered for ``window``."""
        with self._lock:
            left = self._checking[key] - 1
            if left:
                self._checking[key] = left
            else:
                del self._checking[key]
            if ok:
                return
            if key not in self._failures and len(self._failures) >= self.MAX_HOSTS:
                cutoff = now - self.window
                self._failures = {k: v for k, v in self._failures.items() if v and v[-1] > cutoff}
                while len(self._failures) >= self.MAX_HOSTS:  # all recent: drop the oldest
                    del self._failures[next(iter(self._failures))]
            self._failures.setdefault(key, deque()).append(now)
