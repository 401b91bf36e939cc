"""The socket shared by one reader and many writers (_transport.StreamSocket)."""

from __future__ import annotations

import socket
import threading

import pytest
from conftest import WAIT

from taskhub_sync._transport import StreamSocket


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def _fill_until_blocked(peer: socket.socket, stream: StreamSocket, data: bytes) -> threading.Thread:
    """Start ``stream.sendall(data)`` in a thread; return once its first bytes arrived."""
    errors: list[BaseException] = []

    def write() -> None:
        try:
            stream.sendall(data)
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    writer = threading.Thread(target=write, daemon=True)
    writer.errors = errors  # type: ignore[attr-defined]
    writer.start()
    # It goes on until the buffers are full, then waits for the peer to read.
    peer.settimeout(WAIT)
    first = peer.recv(1, socket.MSG_PEEK)
    assert first
    return writer


def test_split_mode_writes_are_not_cut_short_by_the_read_timeout(pair):
    """After set_nonblocking(), sendall() keeps its own (write) timeout: a reader's
    1 ms read timeout does not make a writer waiting for a slow peer fail."""
    ours, peer = pair
    stream = StreamSocket(ours)
    stream.set_nonblocking(write_timeout=WAIT)
    stream.settimeout(0.001)  # what the client's reader sets between claims
    data = bytes(range(256)) * (8 * 1024 * 4)  # 8 MiB: far more than the buffers hold
    writer = _fill_until_blocked(peer, stream, data)
    writer.join(0.1)  # 100 times the read timeout
    assert writer.is_alive(), f"sendall ended early: {writer.errors}"  # type: ignore[attr-defined]
    got = bytearray()
    while len(got) < len(data):
        chunk = peer.recv(1 << 20)
        assert chunk
        got += chunk
    writer.join(WAIT)
    assert not writer.is_alive() and not writer.errors  # type: ignore[attr-defined]
    assert got == data


def test_split_mode_write_timeout_bounds_a_stuck_write(pair):
    """A peer that never reads: sendall() gives up after the write timeout."""
    ours, peer = pair
    stream = StreamSocket(ours)
    stream.set_nonblocking(write_timeout=0.2)
    with pytest.raises(socket.timeout):
        stream.sendall(b"x" * (64 * 1024 * 1024))


def test_split_mode_read_timeout_still_applies(pair):
    """recv_some() in split mode waits up to the read timeout, then socket.timeout."""
    ours, peer = pair
    stream = StreamSocket(ours)
    stream.set_nonblocking(write_timeout=WAIT)
    stream.settimeout(0.05)
    with pytest.raises(socket.timeout):
        stream.recv_some()
    peer.sendall(b"hello")
    assert stream.recv_some() == b"hello"


def test_split_mode_write_timeout_is_per_stall_not_per_message(pair):
    """A peer that keeps reading, slowly, is never cut off: the write timeout bounds
    a stall, not how long a big message takes."""
    ours, peer = pair
    stream = StreamSocket(ours)
    stream.set_nonblocking(write_timeout=0.2)
    data = b"y" * (2 * 1024 * 1024)
    got = bytearray()

    def slow_reader() -> None:
        pace = threading.Event()
        while len(got) < len(data):
            chunk = peer.recv(64 * 1024)
            if not chunk:
                return
            got.extend(chunk)
            pace.wait(0.02)  # reads at ~3 MB/s: the whole takes far over 0.2 s

    reader = threading.Thread(target=slow_reader, daemon=True)
    reader.start()
    stream.sendall(data)  # raises socket.timeout if the timeout were per message
    reader.join(WAIT)
    assert bytes(got) == data


def test_tls_shutdown_keeps_the_ssl_layer_in_place():
    """shutdown() on TLS shuts the TCP socket down beneath the SSL object: a writer
    racing it gets an error, never a plain-text send (SSLSocket.shutdown() unwraps
    first, leaving a window where send() falls through to the bare socket)."""
    import ssl

    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    a, b = socket.socketpair()
    served: list = []
    server = threading.Thread(
        target=lambda: served.append(server_ctx.wrap_socket(b, server_side=True)), daemon=True
    )
    server.start()
    tls = client_ctx.wrap_socket(a, server_hostname="127.0.0.1")
    server.join(WAIT)
    stream = StreamSocket(tls)
    stream.set_nonblocking(write_timeout=WAIT)
    stream.shutdown(socket.SHUT_RDWR)
    assert tls._sslobj is not None  # the SSL layer is still there for any writer
    with pytest.raises(OSError):
        stream.sendall(b"secret" * 100)
    stream.close()
    served[0].close()
