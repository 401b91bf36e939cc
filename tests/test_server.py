"""The hub on real sockets: bad input, handshake limits, lifecycle."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import websocket
from conftest import (
    NO_RECONNECT,
    WAIT,
    hello_text,
    key_of,
    recv_close,
    recv_until_eof,
    wait_disconnected,
)

import taskhub_sync.server as server_module
from taskhub_sync import Client, ConnectionLost, InvalidState, Server

# ----------------------------------------------------------------- bad input


@pytest.fixture
def round_trips(hub, make_client):
    """A good publisher/worker pair doing round trips on a thread while the test runs.

    Yields a function that stops the loop and returns how many round trips succeeded
    (raising whatever error a round trip hit).
    """
    make_client("geocoder").sub("googlemaps:geocode", lambda task: task.payload + 1)
    publisher = make_client("publisher")
    stop = threading.Event()
    first = threading.Event()
    outcome: dict[str, object] = {"count": 0, "error": None}

    def loop():
        try:
            while not stop.is_set():
                n = outcome["count"]
                assert publisher.pub("googlemaps:geocode", n).get_result(timeout=WAIT) == n + 1
                outcome["count"] = n + 1
                first.set()
        except BaseException as exc:  # reported by finish()
            outcome["error"] = exc
            first.set()

    thread = threading.Thread(target=loop, name="test-round-trips")
    thread.start()
    assert first.wait(WAIT)

    def finish() -> int:
        stop.set()
        thread.join(WAIT)
        assert not thread.is_alive()
        if outcome["error"] is not None:
            raise outcome["error"]
        count = outcome["count"]
        # and one more after the bad connection is gone
        assert publisher.pub("googlemaps:geocode", 41).get_result(timeout=WAIT) == 42
        return count

    yield finish
    stop.set()
    thread.join(WAIT)


BAD_MESSAGES = {
    "malformed JSON": ("{not json", "invalid JSON"),
    "not an object": ("[1, 2]", "must be a JSON object"),
    "unknown type": ('{"type": "bogus"}', "unknown message type"),
    "missing type": ('{"task": "t1"}', "unknown message type"),
    "wrong field type": ('{"type": "sub", "id": "one", "pattern": "x"}', "wrong type"),
    "wrong payload field": ('{"type": "pub", "task": "t", "topic": 5}', "wrong type"),
    "bad timeout": ('{"type": "pub", "task": "t", "topic": "a", "timeout": -1}', "seconds > 0"),
    "missing field": ('{"type": "unsub", "id": 1}', "lacks field"),
    "second hello": (hello_text("publisher"), "may not send 'hello'"),
    "hub-only message": ('{"type": "welcome", "v": 1, "session": "s", '
                         '"max_message_size": 9, "task_start_timeout": 1}', "may not send"),
    "result for a task it does not hold": (
        '{"type": "result", "task": "nope", "result": 1}', "not held"),
    "start for a task it does not hold": ('{"type": "start", "task": "nope"}', "not held"),
    "NaN": ('{"type": "pub", "task": "t", "topic": "a", "payload": NaN}', "not valid JSON"),
}  # fmt: skip


@pytest.mark.parametrize("text, reason", list(BAD_MESSAGES.values()), ids=list(BAD_MESSAGES))
def test_bad_message_closes_connection_with_4000(hub, raw, round_trips, text, reason):
    """A bad message closes that connection with 4000 and a reason; others go on."""
    ws = raw.ws(hub)
    ws.send(text)
    code, got = recv_close(ws)
    assert code == 4000
    assert "protocol error" in got and reason in got
    assert round_trips() >= 1


@pytest.mark.parametrize(
    "text, reason",
    [
        ('{"type": "sub", "id": 1, "pattern": "x"}', "first message must be hello"),
        ("{oops", "bad hello: invalid JSON"),
        ('{"type": "hello", "v": 1, "name": 7, "key": "k", "concurrency": 1}', "bad hello"),
        ('{"type": "hello", "v": 1, "name": "a", "key": "k", "concurrency": 0}', "at least 1"),
        ('{"type": "hello", "v": 99, "name": "a", "key": "k", "concurrency": 1}', "version"),
    ],
    ids=["before hello", "malformed hello", "hello field type", "hello concurrency", "version"],
)
def test_bad_first_message_closes_connection(hub, raw, round_trips, text, reason):
    """Anything but a valid hello as first message closes the connection with 4000."""
    ws = raw.ws(hub, hello=None)
    ws.send(text)
    code, got = recv_close(ws)
    assert code == 4000
    assert reason in got
    assert round_trips() >= 1


def test_wrong_key_closes_with_4001(hub, raw):
    """A raw hello with a wrong key gets close code 4001, not a welcome."""
    ws = raw.ws(hub, hello=None)
    ws.send(hello_text("mailer", key="nope"))
    code, reason = recv_close(ws)
    assert code == 4001
    assert "authentication failed" in reason


@pytest.mark.parametrize("after_hello", [True, False], ids=["after hello", "before hello"])
def test_binary_frame_closes_connection(hub, raw, round_trips, after_hello):
    """A binary frame closes the connection with 4000."""
    ws = raw.ws(hub, hello="publisher" if after_hello else None)
    ws.send_binary(b'{"type": "sub"}')
    code, reason = recv_close(ws)
    assert code == 4000
    assert "binary" in reason
    assert round_trips() >= 1


@pytest.mark.parametrize("after_hello", [True, False], ids=["after hello", "as hello"])
def test_oversized_message_closes_with_1009(make_hub, make_client, raw, after_hello):
    """A message over max_message_size closes that connection with 1009; others go on."""
    hub = make_hub(max_message_size=4096)
    make_client("geocoder", hub=hub).sub("googlemaps:geocode", lambda task: len(task.payload))
    good = make_client("publisher", hub=hub)
    ws = raw.ws(hub, hello="publisher" if after_hello else None)
    ws.send(json.dumps({"type": "pub", "task": "t", "topic": "a", "payload": "x" * 8000}))
    code, _ = recv_close(ws)
    assert code == 1009
    assert good.pub("googlemaps:geocode", "x" * 3000).get_result(timeout=WAIT) == 3000


def test_oversized_fragmented_message_closes_with_1009(make_hub, raw):
    """A message over the limit split into small fragments is caught too."""
    hub = make_hub(max_message_size=4096)
    ws = raw.ws(hub)
    ws.send_frame(websocket.ABNF.create_frame("x" * 3000, websocket.ABNF.OPCODE_TEXT, fin=0))
    ws.send_frame(websocket.ABNF.create_frame("x" * 3000, websocket.ABNF.OPCODE_CONT, fin=1))
    code, _ = recv_close(ws)
    assert code == 1009


def test_fragmented_message_within_limit_works(hub, raw, make_client):
    """A message sent in several fragments is reassembled and routed."""
    make_client("geocoder").sub("googlemaps:geocode", lambda task: task.payload)
    ws = raw.ws(hub)
    task_id = f"{ws.session}.frag-1"
    text = json.dumps({"type": "pub", "task": task_id, "topic": "googlemaps:geocode", "payload": 7})
    ws.send_frame(websocket.ABNF.create_frame(text[:10], websocket.ABNF.OPCODE_TEXT, fin=0))
    ws.send_frame(websocket.ABNF.create_frame(text[10:], websocket.ABNF.OPCODE_CONT, fin=1))
    done = json.loads(ws.recv())
    assert done["type"] == "done" and done["task"] == task_id
    assert done["outcomes"]["geocoder"] == {"status": "ok", "result": 7}


def test_duplicate_task_id_is_a_protocol_error(hub, raw, make_client):
    """Reusing the id of a pending task closes the connection with 4000."""
    release = threading.Event()
    make_client("geocoder").sub(
        "googlemaps:geocode", lambda task: task.start() or release.wait(WAIT)
    )
    ws = raw.ws(hub)
    pub = json.dumps(
        {"type": "pub", "task": f"{ws.session}.dup", "topic": "googlemaps:geocode", "payload": 1}
    )
    ws.send(pub)
    ws.send(pub)
    code, reason = recv_close(ws)
    release.set()
    assert code == 4000
    assert "already in use" in reason


def test_task_ids_outside_the_session_are_refused(hub, raw, make_client):
    """A client can't publish under another session's ids (squatting its next ones)."""
    victim = make_client("publisher")
    ws = raw.ws(hub)
    squat = f"{victim.session}.1000"
    ws.send(json.dumps({"type": "pub", "task": squat, "topic": "googlemaps:geocode"}))
    code, reason = recv_close(ws)
    assert code == 4000
    assert "must start with this session's id" in reason


def test_http_request_gets_400(hub, raw, round_trips):
    """A plain HTTP request (no WebSocket upgrade) gets an HTTP 400 answer, then EOF."""
    sock = raw.tcp(hub)
    sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    answer = recv_until_eof(sock)
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert round_trips() >= 1


def test_garbage_instead_of_http_gets_400(hub, raw, round_trips):
    """Bytes that are not HTTP at all get a 400 answer and the connection closed."""
    sock = raw.tcp(hub)
    sock.sendall(b"\x16\x03\x01 this is not http\r\n\r\n")
    answer = recv_until_eof(sock)
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert round_trips() >= 1


def test_silent_tcp_connection_closed_after_auth_timeout(make_hub, raw):
    """A TCP connection that never sends a byte is closed after auth_timeout."""
    hub = make_hub(auth_timeout=0.5)
    sock = raw.tcp(hub)
    t0 = time.monotonic()
    assert recv_until_eof(sock) == b""
    assert 0.4 <= time.monotonic() - t0 < 3.0


def test_no_hello_closed_after_auth_timeout_with_4003(make_hub, raw):
    """An upgraded connection that never sends hello gets 4003 after auth_timeout."""
    hub = make_hub(auth_timeout=0.5)
    t0 = time.monotonic()
    ws = raw.ws(hub, hello=None)
    code, reason = recv_close(ws)
    assert code == 4003
    assert "timed out" in reason
    assert 0.4 <= time.monotonic() - t0 < 3.0


# ----------------------------------------------------------------- lifecycle


def test_stop_closes_clients_with_1001(hub, raw):
    """hub.stop() sends every client a Close with 1001 and returns promptly."""
    ws = raw.ws(hub)
    stopper = threading.Thread(target=hub.stop, name="test-stopper")
    t0 = time.monotonic()
    stopper.start()
    code, reason = recv_close(ws)
    stopper.join(WAIT)
    assert not stopper.is_alive()
    assert code == 1001
    assert "shutting down" in reason
    assert time.monotonic() - t0 < 2.0


def test_stop_fails_pending_handles_with_connection_lost(hub, make_client):
    """Stopping the hub fails a publisher's pending handle with ConnectionLost."""
    started = threading.Event()
    cancelled = threading.Event()

    def stuck(task):
        task.start()
        started.set()
        if task.wait_cancelled(WAIT):
            cancelled.set()

    make_client("geocoder").sub("googlemaps:geocode", stuck)
    publisher = make_client("publisher")
    handle = publisher.pub("googlemaps:geocode", {})
    assert started.wait(WAIT)
    hub.stop()
    with pytest.raises(ConnectionLost):
        handle.get_result(timeout=WAIT)
    assert cancelled.wait(WAIT)
    assert handle.results["geocoder"].status == "lost"


def test_stop_with_running_task_crashes_no_thread(hub, make_client, monkeypatch):
    """Stopping the hub while a worker runs a started task raises in no hub thread."""
    crashes = []
    monkeypatch.setattr(threading, "excepthook", lambda args: crashes.append(args.exc_value))
    started = threading.Event()

    def stuck(task):
        task.start()
        started.set()
        task.wait_cancelled(WAIT)

    make_client("geocoder").sub("googlemaps:geocode", stuck)
    handle = make_client("publisher").pub("googlemaps:geocode", {})
    assert started.wait(WAIT)
    hub.stop()
    with pytest.raises(ConnectionLost):
        handle.get_result(timeout=WAIT)
    assert crashes == []
    assert not hub._all_conns, "a connection thread ended without forgetting its connection"


def test_stop_is_idempotent_and_joins_threads(make_hub, make_client):
    """stop() twice is fine, and the hub's threads are gone when it returns."""
    hub = make_hub()
    make_client("publisher", hub=hub)
    conn_threads = [t for t in threading.enumerate() if t.name.startswith("taskhub-conn-")]
    assert conn_threads
    hub.stop()
    assert not hub._accept_thread.is_alive()
    assert not hub._timer_thread.is_alive()
    assert not any(t.is_alive() for t in conn_threads)
    t0 = time.monotonic()
    hub.stop()
    assert time.monotonic() - t0 < 0.5
    with pytest.raises(InvalidState):
        hub.start()


def test_stop_with_connected_client_is_prompt(hub, make_client):
    """stop() with an idle, well-behaved client connected returns well under a second."""
    make_client("publisher", **NO_RECONNECT)
    t0 = time.monotonic()
    hub.stop()
    assert time.monotonic() - t0 < 0.5


def test_stop_while_a_connection_is_being_accepted(make_hub, raw, monkeypatch):
    """stop() racing the accept loop (connection registered, thread not started) succeeds."""
    in_start = threading.Event()
    release = threading.Event()

    class SlowStart(threading.Thread):
        def start(self):
            in_start.set()
            release.wait(WAIT)  # hold the accept loop inside the race window
            super().start()

    init = server_module._Connection.__init__

    def slow_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.thread = SlowStart(target=self._run, name=self.thread.name, daemon=True)

    monkeypatch.setattr(server_module._Connection, "__init__", slow_init)
    hub = make_hub(auth_timeout=0.5)
    raw.tcp(hub)
    assert in_start.wait(WAIT)
    try:
        hub.stop()
    finally:
        release.set()
        hub._stopped.set()  # if stop() raised half-way, the fixture's stop() returns at once


def test_port_zero_gives_a_real_port(hub, make_client):
    """port=0 binds a free port that hub.port and hub.url report, and clients reach it."""
    assert hub.port > 0
    assert hub.url == f"ws://127.0.0.1:{hub.port}"
    # A full client, not a bare TCP connect: a connection stop() catches before its
    # thread started hits the accept race (test_stop_while_a_connection_is_being_accepted).
    assert make_client("publisher").session


def test_serve_forever_returns_after_stop(make_hub, make_client):
    """serve_forever() blocks until stop() is called from another thread."""
    hub = make_hub()
    errors = []

    def serve():
        try:
            hub.serve_forever()
        except BaseException as exc:
            errors.append(exc)

    server_thread = threading.Thread(target=serve, name="test-serve-forever")
    server_thread.start()
    client = make_client("publisher", hub=hub)
    assert client.pub("nobody", {}).get_result(timeout=WAIT, default="none") == "none"
    assert server_thread.is_alive()
    hub.stop()
    server_thread.join(WAIT)
    assert not server_thread.is_alive()
    assert errors == []


def test_context_manager_starts_and_stops(make_client):
    """`with Server(...) as hub:` serves inside the block and is stopped after it."""
    with Server("127.0.0.1", 0, task_start_timeout=0.1) as hub:
        hub.add_credential("echo", key="echo-key", sub_permissions=["*"], pub_permissions=["*"])
        with Client(hub.url, name="echo", key="echo-key", open_timeout=WAIT) as client:
            client.sub("echo", lambda task: task.payload)
            assert client.pub("echo", "hi").get_result(timeout=WAIT) == "hi"
        port = hub.port
    assert hub._stopped.is_set()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=WAIT)


def test_credential_replaced_for_new_connections(hub, make_client):
    """add_credential() on a known name changes the key for later connections."""
    hub.add_credential("logger", key="new-key", sub_permissions=["log"])
    client = make_client("logger", key="new-key")
    client.sub("log:*", lambda task: "ok")
    assert make_client("publisher").pub("log:x", {}).get_result(timeout=WAIT) == "ok"


def test_stats_reflect_connections(hub, make_client):
    """connection_count() and instances() follow clients connecting and closing."""
    assert hub.connection_count() == 0
    first = make_client("resizer")
    make_client("resizer")
    assert hub.instances("resizer") == 2
    assert hub.connection_count() == 2
    first.close()
    wait_disconnected(hub, first)
    assert hub.connection_count() == 1
    assert hub.instances("resizer") == 1


def test_hub_keys_not_in_repr(hub):
    """A hub's stored keys do not show in reprs of its credentials."""
    stored, _credential = hub._credentials["mailer"]
    assert key_of("mailer") not in repr(stored)
    assert key_of("mailer") not in repr(hub._credentials)
