"""The socket as the library's threads share it: one reader, any number of writers.

Plain TCP lets one thread read while others write. TLS does not: an OpenSSL
connection must not be used by two threads at once (PITFALLS LP-16: spurious
disconnects over wss). So for TLS every read and write takes one lock, and the
reader first waits for data with select() *without* the lock, so a reader blocked
on an idle connection never holds a writer up.

Writes always use ``sendall`` (never a bare ``send``, which may write part of a
frame: PITFALLS LP-01). Reads are buffered: one ``recv`` of up to 64 KiB serves all
the small reads websocket-client makes per frame.
"""

from __future__ import annotations

import select
import socket
import ssl
import threading
from typing import Any

_CHUNK = 65536


class StreamSocket:
    """Wraps a connected socket (plain or TLS) for one reader and many writers.

    Quacks enough like a socket for websocket-client, which is handed it through
    ``create_connection(socket=...)``.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._tls = isinstance(sock, ssl.SSLSocket)
        self._io_lock = threading.Lock() if self._tls else None
        self._buf = b""
        self._pos = 0

    # -- reading (one thread) ------------------------------------------------

    def recv_some(self) -> bytes:
        """Whatever has arrived, up to 64 KiB; b"" at EOF. Honors the timeout."""
        if self._pos < len(self._buf):
            data = self._buf[self._pos :]
            self._buf, self._pos = b"", 0
            return data
        if self._io_lock is None:
            return self.sock.recv(_CHUNK)
        sock: Any = self.sock
        if not sock.pending():
            ready, _, _ = select.select([sock], [], [], sock.gettimeout())
            if not ready:
                raise socket.timeout("timed out")
        with self._io_lock:
            return sock.recv(_CHUNK)  # type: ignore[no-any-return]

    def recv(self, n: int) -> bytes:
        """Up to ``n`` bytes (buffered)."""
        if self._pos >= len(self._buf):
            self._buf, self._pos = self.recv_some(), 0
            if not self._buf:
                return b""
        data = self._buf[self._pos : self._pos + n]
        self._pos += len(data)
        return data

    # -- writing (any thread) -------------------------------------------------

    def sendall(self, data: bytes) -> None:
        if self._io_lock is None:
            self.sock.sendall(data)
        else:
            with self._io_lock:
                self.sock.sendall(data)

    def send(self, data: bytes) -> int:
        """Writes everything (websocket-client loops on short writes; we never make any)."""
        self.sendall(data)
        return len(data)

    # -- the rest of the socket interface websocket-client uses ---------------

    def settimeout(self, timeout: float | None) -> None:
        self.sock.settimeout(timeout)

    def gettimeout(self) -> float | None:
        return self.sock.gettimeout()

    def setsockopt(self, *args: Any) -> None:
        self.sock.setsockopt(*args)

    def fileno(self) -> int:
        return self.sock.fileno()

    def shutdown(self, how: int) -> None:
        """Wakes a reader blocked in recv(); never takes the I/O lock."""
        self.sock.shutdown(how)

    def close(self) -> None:
        self.sock.close()

    @property
    def _closed(self) -> bool:
        return bool(getattr(self.sock, "_closed", False))
