"""The client on real sockets: connecting, closing, run_forever, limits."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from conftest import NO_RECONNECT, WAIT, key_of

from taskhub_sync import Client, ConnectionLost, NoSubscribers, TaskFailed
from taskhub_sync.router import RState


@pytest.fixture
def free_port():
    """A port on 127.0.0.1 that is bound (so nobody else takes it) but not listening."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    yield sock.getsockname()[1]
    sock.close()


@pytest.fixture
def mute_listener():
    """A TCP listener that completes connections in the kernel but never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    yield sock.getsockname()[1]
    sock.close()


def test_nothing_listening_raises_connection_lost_fast(free_port):
    """Connecting to a port nobody listens on raises ConnectionLost at once."""
    t0 = time.monotonic()
    with pytest.raises(ConnectionLost, match="cannot connect"):
        Client(f"ws://127.0.0.1:{free_port}", name="publisher", key="k", open_timeout=WAIT)
    assert time.monotonic() - t0 < 1.0


def test_mute_server_raises_timeout_after_open_timeout(mute_listener):
    """A listener that never answers the upgrade raises TimeoutError after open_timeout."""
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        Client(f"ws://127.0.0.1:{mute_listener}", name="publisher", key="k", open_timeout=0.3)
    assert 0.25 <= time.monotonic() - t0 < 2.0


def test_bad_url_raises_clear_error():
    """A URL that is not ws:// or wss:// raises a taskhub error or ValueError naming it."""
    with pytest.raises((ValueError, ConnectionLost), match="http://127.0.0.1:1"):
        Client("http://127.0.0.1:1", name="publisher", key="k", open_timeout=WAIT)


def test_close_is_idempotent(make_client):
    """close() twice is fine, and closed reports it."""
    client = make_client("publisher")
    assert not client.closed
    client.close()
    assert client.closed
    t0 = time.monotonic()
    client.close()
    assert time.monotonic() - t0 < 0.5


def test_context_manager_closes(hub):
    """`with Client(...)` closes the client on exit."""
    with Client(hub.url, name="publisher", key=key_of("publisher"), open_timeout=WAIT) as client:
        assert not client.closed
    assert client.closed


def test_pub_and_sub_after_close_raise_connection_lost(make_client):
    """pub() and sub() after close() raise ConnectionLost."""
    client = make_client("auditor")
    client.close()
    with pytest.raises(ConnectionLost):
        client.pub("anything", {})
    with pytest.raises(ConnectionLost):
        client.sub("anything", lambda task: None)


def test_pending_handles_fail_when_hub_stops(hub, make_client):
    """A pending handle fails with ConnectionLost when the hub stops; pub() then raises."""
    release = threading.Event()
    started = threading.Event()

    def slow(task):
        task.start()
        started.set()
        release.wait(WAIT)

    make_client("geocoder").sub("googlemaps:geocode", slow)
    publisher = make_client("publisher", **NO_RECONNECT)
    handle = publisher.pub("googlemaps:geocode", {})
    assert started.wait(WAIT)  # the hub holds the task
    stopper = threading.Thread(target=hub.stop, name="test-stopper")
    stopper.start()
    with pytest.raises(ConnectionLost):
        handle.get_result(timeout=WAIT)
    release.set()
    stopper.join(WAIT)
    assert not stopper.is_alive()
    with pytest.raises(ConnectionLost):
        publisher.pub("googlemaps:geocode", {})


def test_pending_handles_fail_on_close(hub, make_client):
    """close() fails the client's own pending handles with ConnectionLost."""
    release = threading.Event()
    make_client("geocoder").sub(
        "googlemaps:geocode", lambda task: task.start() or release.wait(WAIT)
    )
    publisher = make_client("publisher")
    handle = publisher.pub("googlemaps:geocode", {})
    publisher.close()
    release.set()
    with pytest.raises(ConnectionLost):
        handle.get_result(timeout=WAIT)


def run_in_thread(target):
    """Run ``target`` on a thread; return (thread, box) where box gets its error."""
    box = []

    def run():
        try:
            target()
        except BaseException as exc:
            box.append(exc)

    thread = threading.Thread(target=run, name="test-run-forever")
    thread.start()
    return thread, box


def test_run_forever_returns_after_close(make_client):
    """run_forever() returns, without raising, after close() from another thread."""
    worker = make_client("geocoder")
    worker.sub("googlemaps:geocode", lambda task: 1)
    thread, errors = run_in_thread(worker.run_forever)
    assert make_client("publisher").pub("googlemaps:geocode", {}).get_result(timeout=WAIT) == 1
    assert thread.is_alive()
    worker.close()
    thread.join(WAIT)
    assert not thread.is_alive()
    assert errors == []


def test_run_forever_raises_when_hub_goes_away(hub, make_client):
    """run_forever() raises ConnectionLost when the hub stops (and it may not reconnect)."""
    worker = make_client("geocoder", **NO_RECONNECT)
    thread, errors = run_in_thread(worker.run_forever)
    hub.stop()
    thread.join(WAIT)
    assert not thread.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], ConnectionLost)


def test_max_workers_bounds_concurrent_handlers(make_hub, make_client):
    """With max_workers=2 the hub never gives the worker a third task at once."""
    hub = make_hub(task_start_timeout=WAIT)  # queued tasks wait for a free slot
    lock = threading.Lock()
    running = 0
    peak = 0
    two_in = threading.Event()
    release = threading.Event()

    def hold(task):
        nonlocal running, peak
        task.start()
        with lock:
            running += 1
            peak = max(peak, running)
            if running == 2:
                two_in.set()
        release.wait(WAIT)
        with lock:
            running -= 1
        return task.payload

    worker = make_client("geocoder", hub=hub, max_workers=2)
    worker.sub("googlemaps:geocode", hold)
    publisher = make_client("publisher", hub=hub)
    handles = [publisher.pub("googlemaps:geocode", i) for i in range(6)]
    assert two_in.wait(WAIT)
    publisher.unsub("barrier")  # a round trip: the hub has routed all six pubs by now
    with hub._lock:
        assert hub._router.held_count(worker.session) == 2
        states = [hub._router.task_state(h.task_id) for h in handles]
    release.set()  # before asserting: a failure must not leave the handlers waiting
    # The two running ones: their start() may still be on the way to the hub.
    assert all(s["geocoder"] in (RState.DELIVERED, RState.STARTED) for s in states[:2])
    assert states[2:] == [{"geocoder": RState.QUEUED}] * 4
    assert [h.get_result(timeout=WAIT) for h in handles] == list(range(6))
    assert peak == 2


def test_unsub_stops_delivery(make_client):
    """After unsub() the worker gets no more tasks on that topic."""
    worker = make_client("geocoder")
    calls = []
    worker.sub("googlemaps:geocode", lambda task: calls.append(task.payload) or "ok")
    publisher = make_client("publisher")
    assert publisher.pub("googlemaps:geocode", 1).get_result(timeout=WAIT) == "ok"
    worker.unsub("googlemaps:geocode")
    with pytest.raises(NoSubscribers):
        publisher.pub("googlemaps:geocode", 2).get_result(timeout=WAIT)
    assert calls == [1]


def test_http_proxy_env_does_not_affect_loopback(hub, make_client, monkeypatch, free_port):
    """*_proxy variables pointing at a dead proxy do not stop a loopback connection."""
    dead = f"http://127.0.0.1:{free_port}"
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.setenv(var, dead)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    client = make_client("publisher")
    assert client.pub("nobody", {}).get_result(timeout=WAIT, default="none") == "none"


def test_handler_for_prefix_and_exact_topic(make_client):
    """The most specific handler runs: exact topic over prefix over '*'."""
    auditor = make_client("auditor")
    auditor.sub("*", lambda task: "star")
    auditor.sub("log:*", lambda task: "prefix")
    auditor.sub("log:error", lambda task: "exact")
    publisher = make_client("publisher")
    assert publisher.pub("log:error", {}).get_result(timeout=WAIT) == "exact"
    assert publisher.pub("log:warn", {}).get_result(timeout=WAIT) == "prefix"
    assert publisher.pub("other", {}).get_result(timeout=WAIT) == "star"


def test_sub_as_decorator(make_client):
    """@client.sub(topic) registers the decorated function and returns it unchanged."""
    worker = make_client("geocoder")

    @worker.sub("googlemaps:geocode")
    def geocode(task):
        return {"where": task.get_payload()}

    assert callable(geocode)
    result = make_client("publisher").pub("googlemaps:geocode", "Oslo").get_result(timeout=WAIT)
    assert result == {"where": "Oslo"}


def test_unserializable_result_fails_the_task(make_client):
    """A handler returning something that is not JSON fails the task with TaskFailed."""
    worker = make_client("geocoder")
    worker.sub("googlemaps:geocode", lambda task: object())
    with pytest.raises(TaskFailed) as info:
        make_client("publisher").pub("googlemaps:geocode", {}).get_result(timeout=WAIT)
    assert "JSON" in info.value.remote_message
    assert not worker.closed
