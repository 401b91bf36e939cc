"""Issue 3, "Bad input": garbage, broken frames, oversized messages, plain HTTP,
slow-loris and idle sockets against a running hub. Each bad connection is closed
with a clear reason, and a good client's round trip works during and after."""

from __future__ import annotations

import json
import random
import socket
import struct
import threading
import time

import pytest
from faults import (
    WAIT,
    LogWatcher,
    harness,
    hello_text,
    read_http_head,
    read_until_eof,
    recv_close,
    roundtrip,
    upgrade_request,
    wait_until,
    ws_frame,
)

from taskhub_sync import AuthenticationError, ConnectionLost

AUTH_TIMEOUT = 1.0
MAX_SIZE = 64 * 1024
OP_TEXT, OP_CONT = 0x1, 0x0


class Good:
    """A hub with an echo worker and a publisher: ``ok()`` is one checked round trip."""

    def __init__(self, h, **kwargs):
        kwargs.setdefault("auth_timeout", AUTH_TIMEOUT)
        kwargs.setdefault("max_message_size", MAX_SIZE)
        self.h = h
        self.hub = h.hub(**kwargs)
        self.worker = h.echo_worker(self.hub)
        self.publisher = h.client(self.hub, "pub")

    def ok(self, budget: float = 2.0) -> float:
        return roundtrip(self.publisher, budget=budget)

    def upgraded(self) -> socket.socket:
        """A raw socket past the WebSocket upgrade (no hello yet)."""
        sock = self.h.tcp(self.hub)
        sock.sendall(upgrade_request(self.hub.port))
        assert read_http_head(sock).startswith(b"HTTP/1.1 101")
        return sock

    def authenticated(self) -> socket.socket:
        """A raw socket past the upgrade and hello/welcome, as service ``other``."""
        sock = self.upgraded()
        sock.sendall(ws_frame(OP_TEXT, hello_text("other").encode()))
        opcode, payload = read_frame(sock)
        assert opcode == OP_TEXT and json.loads(payload)["type"] == "welcome"
        return sock


@pytest.fixture
def h():
    with harness() as hh:
        yield hh


@pytest.fixture
def good(h):
    return Good(h)


def read_frame(sock: socket.socket) -> tuple[int, bytes]:
    """One unmasked (server) frame from a raw socket."""
    head = _read_exactly(sock, 2)
    n = head[1] & 0x7F
    if n == 126:
        n = struct.unpack("!H", _read_exactly(sock, 2))[0]
    elif n == 127:
        n = struct.unpack("!Q", _read_exactly(sock, 8))[0]
    return head[0] & 0x0F, _read_exactly(sock, n)


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError(f"EOF after {len(data)} of {n} bytes")
        data += chunk
    return data


def read_close(sock: socket.socket) -> tuple[int, str]:
    """Skip frames until the hub's Close; return (code, reason); then expect EOF."""
    while True:
        opcode, payload = read_frame(sock)
        if opcode == 0x8:
            code = struct.unpack("!H", payload[:2])[0]
            sock.shutdown(socket.SHUT_WR)
            read_until_eof(sock)
            return code, payload[2:].decode()


# ----------------------------------------------------------------- before the upgrade


@pytest.mark.parametrize("seed", range(5))
def test_random_bytes_instead_of_http_get_400(h, good, seed):
    """Random bytes ending a 'header' get a 400 and the socket closed."""
    junk = random.Random(seed).randbytes(random.Random(seed).randint(1, 4000))
    sock = h.tcp(good.hub)
    sock.sendall(junk + b"\r\n\r\n")
    good.ok()
    reply = read_until_eof(sock)
    assert reply.startswith(b"HTTP/1.1 400 "), reply[:200]
    good.ok()


def test_endless_header_gets_400(h, good):
    """A request head over 16 KiB without its end is refused with a 400."""
    sock = h.tcp(good.hub)
    sock.sendall(b"GET / HTTP/1.1\r\nX-Junk: " + b"a" * 20_000)
    good.ok()
    reply = read_until_eof(sock)
    assert reply.startswith(b"HTTP/1.1 400 ") and b"too large" in reply
    good.ok()


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        b"POST /tasks HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
    ],
    ids=["plain-get", "post", "upgrade-without-key", "ssh"],
)
def test_non_websocket_request_gets_400(h, good, request_bytes):
    """A request that is not a WebSocket upgrade: 400 with a reason, then closed."""
    sock = h.tcp(good.hub)
    sock.sendall(request_bytes)
    reply = read_until_eof(sock)
    assert reply.startswith(b"HTTP/1.1 400 Bad Request"), reply[:200]
    assert b"WebSocket" in reply or b"upgrade" in reply.lower()
    good.ok()


def test_slow_loris_handshake_closed_after_auth_timeout(h, good):
    """An upgrade request trickled a byte at a time is cut off at auth_timeout."""
    sock = h.tcp(good.hub)
    stop = threading.Event()
    request = upgrade_request(good.hub.port)

    def trickle():
        try:
            for i in range(len(request)):
                if stop.wait(0.05):  # pacing of the attack, not a synchronization
                    return
                sock.sendall(request[i : i + 1])
        except OSError:
            pass

    t0 = time.monotonic()
    h.thread(trickle, stop.set)
    good.ok()
    assert read_until_eof(sock) == b""  # no 101, no 400: cut off
    elapsed = time.monotonic() - t0
    assert AUTH_TIMEOUT * 0.9 <= elapsed < AUTH_TIMEOUT + 1.0, elapsed
    assert len(request) * 0.05 > AUTH_TIMEOUT + 1.0  # it was still trickling
    stop.set()
    good.ok()


def test_slow_loris_hello_closed_with_4003(h, good):
    """After the upgrade, a hello trickled a byte at a time gets 4003 at auth_timeout."""
    sock = good.upgraded()
    frame = ws_frame(OP_TEXT, hello_text("other").encode())
    stop = threading.Event()

    def trickle():
        try:
            for i in range(len(frame) - 1):
                if stop.wait(0.05):
                    return
                sock.sendall(frame[i : i + 1])
        except OSError:
            pass

    t0 = time.monotonic()
    h.thread(trickle, stop.set)
    good.ok()
    code, reason = read_close(sock)
    assert code == 4003 and "timed out" in reason
    assert time.monotonic() - t0 < AUTH_TIMEOUT + 1.0
    stop.set()
    good.ok()


def test_pings_without_a_hello_closed_at_auth_timeout(h, good):
    """A peer that keeps sending pings (so every read gets data) but never a hello is
    still closed with 4003 at auth_timeout."""
    sock = good.upgraded()
    stop = threading.Event()

    def chatter():
        try:
            while not stop.wait(0.0005):  # pacing of the attack, not a synchronization
                sock.sendall(ws_frame(0x9, b"p"))
        except OSError:
            pass

    t0 = time.monotonic()
    h.thread(chatter, stop.set)
    good.ok()
    code, reason = read_close(sock)
    assert code == 4003 and "timed out" in reason
    assert time.monotonic() - t0 < AUTH_TIMEOUT + 1.0
    stop.set()
    good.ok()


def test_frames_in_the_same_read_as_the_hello_are_served(h, good):
    """hello and a sub written together: the sub is answered after the welcome."""
    sock = good.upgraded()
    hello = ws_frame(OP_TEXT, hello_text("other").encode())
    sub = ws_frame(OP_TEXT, b'{"type":"sub","id":7,"pattern":"x"}')
    sock.sendall(hello + sub)
    assert json.loads(read_frame(sock)[1])["type"] == "welcome"
    assert json.loads(read_frame(sock)[1]) == {"type": "reply", "id": 7}
    good.ok()


@pytest.mark.parametrize(
    "after",
    [ws_frame(0x2, b"bin"), b"\xff\xff", ws_frame(OP_TEXT, b"not json")],
    ids=["binary", "garbage", "not-json"],
)
def test_bad_input_in_the_same_read_as_the_hello_is_closed(h, good, after):
    """What follows the hello in the same write is checked like anything else."""
    sock = good.upgraded()
    sock.sendall(ws_frame(OP_TEXT, hello_text("other").encode()) + after)
    assert json.loads(read_frame(sock)[1])["type"] == "welcome"
    code, reason = read_close(sock)
    assert code in {1002, 4000} and reason
    good.ok()


def test_bad_frame_in_the_same_packet_as_the_upgrade_gets_its_reason(h, good):
    """A frame with reserved bits right behind the upgrade request: 1002 with the
    reason (not 1011, internal error); a ping before it is answered."""
    with LogWatcher() as logs:
        sock = h.tcp(good.hub)
        bad = bytes([0x81 | 0x40, 0x80, 0, 0, 0, 0])
        sock.sendall(upgrade_request(good.hub.port) + ws_frame(0x9, b"p") + bad)
        reply = read_until_eof(sock)
    head, _, frames = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101")
    pong, close = b"\x8a\x01p", frames[3:]
    assert frames[:3] == pong
    code, reason = struct.unpack("!H", close[2:4])[0], close[4:].decode()
    assert close[0] == 0x88 and code == 1002 and "reserved" in reason
    assert not [r for r in logs.records if "crashed" in r.getMessage()]
    good.ok()


def test_messages_before_a_bad_frame_are_routed(h, good):
    """A result and then a frame announcing 1 GB, in one write: the hub closes with
    1009, and the result it had already received still reaches the publisher."""
    hub = good.hub
    sock = good.authenticated()  # service "other", may listen to anything
    sock.sendall(ws_frame(OP_TEXT, b'{"type":"sub","id":1,"pattern":"solo"}'))
    assert json.loads(read_frame(sock)[1]) == {"type": "reply", "id": 1}
    handle = good.publisher.pub("solo", 41)
    task = json.loads(read_frame(sock)[1])
    assert task["type"] == "task"
    result = json.dumps({"type": "result", "task": task["task"], "result": 42}).encode()
    sock.sendall(ws_frame(OP_TEXT, result) + ws_frame(OP_TEXT, b"", length=1 << 30))
    assert read_close(sock)[0] == 1009
    assert handle.get_result(timeout=WAIT) == 42
    assert hub.pending_tasks() == 0
    good.ok()


# ----------------------------------------------------------------- after the upgrade


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("stage", ["before-hello", "after-hello"])
def test_random_bytes_as_frames_closed_with_a_reason(h, good, seed, stage):
    """Random bytes where frames should be: a Close with a protocol-level code."""
    sock = good.upgraded() if stage == "before-hello" else good.authenticated()
    rng = random.Random(seed)
    sock.sendall(rng.randbytes(rng.randint(2, 3000)))
    good.ok()
    code, reason = read_close(sock)
    # 1002/1007/1009: framing; 4000: not a taskhub message; 1001 (after hello, no
    # heartbeat answer) or 4003 (before, auth timeout): bytes announced, never sent.
    assert code in {1001, 1002, 1007, 1009, 4000, 4003}, (code, reason)
    assert reason
    good.ok()


def test_truncated_frame_then_eof_closes_connection(h, good):
    """A frame cut short by EOF: the hub drops the connection; nothing else breaks."""
    before = good.hub.connection_count()
    sock = good.authenticated()
    assert good.hub.connection_count() == before + 1
    frame = ws_frame(OP_TEXT, b'{"type":"sub","id":1,"pattern":"x"}')
    sock.sendall(frame[:9])
    sock.shutdown(socket.SHUT_WR)
    read_until_eof(sock)
    wait_until(lambda: good.hub.connection_count() == before, what="the hub to drop it")
    good.ok()


def test_truncated_frame_then_silence_closed_by_heartbeat(h):
    """A frame cut short, then silence: closed within two ping intervals."""
    good = Good(h, ping_interval=0.3)
    sock = good.authenticated()
    sock.sendall(ws_frame(OP_TEXT, b"x" * 1000)[:100])
    t0 = time.monotonic()
    good.ok()
    code, reason = read_close(sock)
    assert code == 1001 and "heartbeat" in reason
    assert time.monotonic() - t0 < 2 * 0.3 + 0.5
    good.ok()


def test_truncated_hello_closed_at_auth_timeout(h, good):
    """A hello frame cut short before authentication: 4003 at auth_timeout."""
    sock = good.upgraded()
    sock.sendall(ws_frame(OP_TEXT, hello_text("other").encode())[:20])
    good.ok()
    code, _ = read_close(sock)
    assert code == 4003
    good.ok()


@pytest.mark.parametrize("stage", ["before-hello", "after-hello"])
def test_oversized_frame_closed_with_1009_from_its_header(h, good, stage):
    """A frame announcing more than max_message_size: 1009 before its payload comes."""
    sock = good.upgraded() if stage == "before-hello" else good.authenticated()
    sock.sendall(ws_frame(OP_TEXT, b"", length=2 * MAX_SIZE))  # header only
    good.ok()
    code, reason = read_close(sock)
    assert code == 1009 and "max_message_size" in reason
    good.ok()


def test_oversized_fragmented_message_closed_with_1009(h, good):
    """Fragments that add up to more than max_message_size: 1009."""
    sock = good.authenticated()
    chunk = b"a" * (MAX_SIZE // 4)
    data = ws_frame(OP_TEXT, chunk, fin=False)
    data += b"".join(ws_frame(OP_CONT, chunk, fin=False) for _ in range(5))
    try:
        sock.sendall(data)
    except OSError:
        pass  # the hub may have closed already
    code, _ = read_close(sock)
    assert code == 1009
    good.ok()


def test_oversized_message_from_a_client_library_closed_with_1009(h, good):
    """A real (websocket-client) connection sending a too-big message gets 1009."""
    ws = h.ws(good.hub, "other")
    ws.send(json.dumps({"type": "pub", "task": "t1", "topic": "echo", "payload": "x" * MAX_SIZE}))
    assert recv_close(ws)[0] == 1009
    good.ok()


# ----------------------------------------------------------------- many idle sockets


def test_many_idle_unauthenticated_sockets_do_not_starve_clients(h, good):
    """200 idle sockets (half raw TCP, half upgraded without hello): round trips stay
    fast; every idle one is closed after auth_timeout; the hub's threads come back."""
    baseline = len(good.hub._all_conns)
    idle = [h.tcp(good.hub) for _ in range(100)]
    idle += [good.upgraded() for _ in range(100)]
    worst = max(good.ok(budget=1.0) for _ in range(20))
    assert worst < 1.0
    for sock in idle:
        sock.settimeout(AUTH_TIMEOUT + 3.0)
    assert all(read_until_eof(sock) == b"" for sock in idle[:100])
    codes = {read_close(sock)[0] for sock in idle[100:]}
    assert codes == {4003}
    for sock in idle[:100]:
        sock.close()
    wait_until(lambda: len(good.hub._all_conns) == baseline, timeout=WAIT, what="idle threads")
    good.ok()
    h.client(good.hub, "other").close()  # new clients still get in


def test_connections_past_max_handshakes_refused_clients_unaffected(h):
    """With max_handshakes idle sockets in, more are refused at once; authenticated
    clients keep working, and new clients get in once the idle ones go."""
    good = Good(h, max_handshakes=5, auth_timeout=WAIT)
    baseline = len(good.hub._all_conns)
    idle = [h.tcp(good.hub) for _ in range(5)]
    wait_until(lambda: len(good.hub._all_conns) == baseline + 5, what="the hub to take them")
    with LogWatcher() as logs:
        extra = h.tcp(good.hub)
        t0 = time.monotonic()
        assert read_until_eof(extra) == b""
        assert time.monotonic() - t0 < 1.0
        logs.wait_for("refusing", "still handshaking")
    good.ok()
    with pytest.raises((ConnectionLost, AuthenticationError)):
        h.client(good.hub, "other", reconnect=False)
    good.ok()
    for sock in idle:
        sock.close()
    wait_until(lambda: len(good.hub._all_conns) == baseline, what="idle threads to end")
    h.client(good.hub, "other")
    good.ok()
