"""The socket as the library's threads share it: one reader, any number of writers.

Plain TCP lets one thread read while others write. TLS does not: an OpenSSL
connection must not be used by two threads at once (PITFALLS LP-16: spurious
disconnects over wss). So for TLS every read and write takes one lock, and the
reader waits for data with poll() *without* the lock, so a reader waiting on an
idle connection never holds a writer up.

Two modes. Blocking (during the upgrade): ``sendall`` writes everything (never a
bare ``send``, which may write part of a frame: PITFALLS LP-01) and reads and
writes honor the socket timeout. Split (hub and client, after the upgrade): reads
and writes have timeouts of their own, so the reader's short waits never cut a
writer's ``sendall`` short. ``recv_some`` waits up to the timeout set by
``settimeout``; ``send_some`` (the hub) writes what fits and returns at once, so no
thread routing a message ever waits for a slow reader; ``sendall`` (the client)
writes everything within ``write_timeout``. On plain TCP that costs nothing extra:
the socket stays blocking, reads time out through SO_RCVTIMEO and writes pass
MSG_DONTWAIT, one system call each. TLS has no per-call flags, so there the socket
is non-blocking and reads and writes wait in poll(). Reads are buffered: one
``recv`` of up to 64 KiB serves all the small reads websocket-client makes during
the upgrade.
"""

from __future__ import annotations

import select
import socket
import ssl
import struct
import threading
from typing import Any

from ._frames import OP_TEXT, FrameError, FrameReader, encode_frame
from .errors import ConnectionLost, ProtocolError

_CHUNK = 65536
_WOULD_BLOCK = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


class StreamSocket:
    """Wraps a connected socket (plain or TLS) for one reader and many writers.

    Quacks enough like a socket for websocket-client, which is handed it through
    ``create_connection(socket=...)`` to do the HTTP upgrade.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._tls = isinstance(sock, ssl.SSLSocket)
        self._io_lock = threading.Lock() if self._tls else None
        self._buf = b""
        self._pos = 0
        self._nonblocking = False
        self._timeout: float | None = sock.gettimeout()
        self._write_timeout: float | None = None

    def set_nonblocking(self, write_timeout: float | None = None) -> None:
        """Switch to split timeouts (see the module docstring). One way.

        Args:
            write_timeout: How long ``sendall`` may wait for the peer to take
                more, from now on (None: no limit). A slow peer that keeps reading
                never runs into it, however large the message.
        """
        self._nonblocking = True
        self._write_timeout = write_timeout
        timeout = self.sock.gettimeout()
        if self._tls:
            self.sock.setblocking(False)
        else:
            self.sock.settimeout(None)  # blocking: MSG_DONTWAIT and SO_RCVTIMEO apply
        self._set_read_timeout(timeout)

    # -- reading (one thread) ------------------------------------------------

    def recv_some(self) -> bytes:
        """Whatever has arrived, up to 64 KiB; b"" at EOF.

        Raises:
            socket.timeout: Nothing arrived within the timeout.
        """
        if self._pos < len(self._buf):
            data = self._buf[self._pos :]
            self._buf, self._pos = b"", 0
            return data
        sock: Any = self.sock
        if self._io_lock is None:
            try:
                return sock.recv(_CHUNK)  # type: ignore[no-any-return]
            except BlockingIOError:  # SO_RCVTIMEO ran out
                raise socket.timeout("timed out") from None
        while True:
            if not (self._tls and sock.pending()) and not _wait(sock, select.POLLIN, self._timeout):
                raise socket.timeout("timed out")
            try:
                if self._io_lock is None:
                    return sock.recv(_CHUNK)
                with self._io_lock:
                    return sock.recv(_CHUNK)  # type: ignore[no-any-return]
            except _WOULD_BLOCK:
                continue  # e.g. only part of a TLS record has arrived

    def recv(self, n: int) -> bytes:
        """Up to ``n`` bytes (buffered)."""
        if self._pos >= len(self._buf):
            self._buf, self._pos = self.recv_some(), 0
            if not self._buf:
                return b""
        data = self._buf[self._pos : self._pos + n]
        self._pos += len(data)
        return data

    # -- writing (any thread; callers keep whole frames together) ---------------

    def sendall(self, data: bytes) -> None:
        """Write everything, waiting as needed.

        Raises:
            socket.timeout: If the peer takes nothing for the socket timeout
                (blocking mode) or the write timeout (split mode).
        """
        if self._nonblocking:
            sent = self.send_some(data)
            if sent == len(data):  # the usual case: it all fits at once
                return
            view = memoryview(data)[sent:]
            while view:
                sent = self.send_some(view)
                if sent:
                    view = view[sent:]
                elif not self.wait_writable(self._write_timeout):  # a stall, not the total
                    raise socket.timeout("write stalled: the peer read nothing")
        elif self._io_lock is None:
            self.sock.sendall(data)
        else:
            with self._io_lock:
                self.sock.sendall(data)

    def send_some(self, data: bytes | memoryview) -> int:
        """Write what fits now (non-blocking mode); the number of bytes written."""
        try:
            if self._io_lock is None:
                return self.sock.send(data, socket.MSG_DONTWAIT)
            with self._io_lock:
                return self.sock.send(data)
        except _WOULD_BLOCK:
            return 0

    def wait_writable(self, timeout: float | None) -> bool:
        """True once the socket can take more data; False after ``timeout``."""
        return _wait(self.sock, select.POLLOUT, timeout)

    def send(self, data: bytes) -> int:
        """Writes everything (websocket-client loops on short writes; we never make any)."""
        self.sendall(data)
        return len(data)

    # -- the rest of the socket interface websocket-client uses ---------------

    def settimeout(self, timeout: float | None) -> None:
        if timeout != self._timeout or not self._nonblocking:
            self._set_read_timeout(timeout)

    def _set_read_timeout(self, timeout: float | None) -> None:
        self._timeout = timeout
        if not self._nonblocking:
            self.sock.settimeout(timeout)
        elif not self._tls:
            # 0 would mean "no timeout" to the kernel: round up to a microsecond.
            usec = 0 if timeout is None else max(1, round(timeout * 1_000_000))
            timeval = struct.pack("@ll", usec // 1_000_000, usec % 1_000_000)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)

    def gettimeout(self) -> float | None:
        return self._timeout

    def setsockopt(self, *args: Any) -> None:
        self.sock.setsockopt(*args)

    def fileno(self) -> int:
        return self.sock.fileno()

    def shutdown(self, how: int) -> None:
        """Wakes a reader blocked in recv(); never takes the I/O lock.

        On TLS this shuts the TCP socket down beneath the SSL object, which stays:
        SSLSocket.shutdown() unwraps first, and a writer running in between would
        send its frame in plain text.
        """
        socket.socket.shutdown(self.sock, how)

    def close(self) -> None:
        """Close the socket. On TLS under the I/O lock, which reads and writes hold
        only for one non-blocking call: closing drops the SSL object, which a read
        in progress must not see vanish (ValueError instead of OSError)."""
        if self._io_lock is None:
            self.sock.close()
        else:
            with self._io_lock:
                self.sock.close()

    @property
    def _closed(self) -> bool:
        return bool(getattr(self.sock, "_closed", False))


def _wait(sock: socket.socket, event: int, timeout: float | None) -> bool:
    """poll() one socket for ``event`` (no FD_SETSIZE limit, unlike select())."""
    poller = select.poll()
    poller.register(sock, event | select.POLLERR | select.POLLHUP)
    return bool(poller.poll(None if timeout is None else max(0, int(timeout * 1000) + 1)))


#: Largest message a client accepts from the hub (the hub enforces its own limit
#: on what it receives; a done message with several results may be larger).
_MAX_INCOMING = 64 * 1024 * 1024


class Link:
    """One open connection to the hub: our framing over a StreamSocket.

    websocket-client did the upgrade; from there frames are ours (see _frames.py).
    One reader thread calls read(); any thread may send_text().
    """

    def __init__(self, stream: StreamSocket) -> None:
        self.stream = stream
        self.backlog: list[tuple[int, bytes]] = []  # frames read before the reader ran
        self._reader = FrameReader(_MAX_INCOMING, masked=False)
        self._send_lock = threading.Lock()  # whole frames, never interleaved
        self._error: ProtocolError | None = None  # a violation after frames returned

    def send_text(self, text: str) -> None:
        self.write(encode_frame(OP_TEXT, text.encode("ascii"), mask=True))

    def write(self, frame: bytes) -> None:
        """Write one whole frame. A failed or timed-out write may have sent part of
        it, which would make the peer read every later frame as its payload: the
        link is dropped (the reader then reconnects) and the error re-raised."""
        with self._send_lock:
            try:
                self.stream.sendall(frame)
            except BaseException:
                self.drop()
                raise

    def read(self) -> list[tuple[int, bytes]]:
        """The next frames. Raises ConnectionLost at EOF, ProtocolError on bad framing,
        socket.timeout after the socket's timeout."""
        if self.backlog:
            frames, self.backlog = self.backlog, []
            return frames
        if self._error is not None:
            raise self._error
        data = self.stream.recv_some()
        if not data:
            raise ConnectionLost("the hub closed the socket")
        try:
            return self._reader.feed(data)
        except FrameError as exc:
            error = ProtocolError(f"bad frame from the hub: {exc.reason}")
            if not exc.frames:
                raise error from None
            self._error = error  # the frames before it first, then this
            return exc.frames

    def settimeout(self, timeout: float | None) -> None:
        self.stream.settimeout(timeout)

    @property
    def sock(self) -> StreamSocket:
        """The socket (tests shut it down to simulate a dropped connection)."""
        return self.stream

    def drop(self) -> None:
        """Shut the socket down (waking any thread blocked on it), then close it."""
        try:
            self.stream.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.stream.close()
