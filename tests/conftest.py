"""Shared fixtures: a hub on a free loopback port, client factories, raw sockets,
and a check that every test stops the threads it started."""

from __future__ import annotations

import inspect
import json
import socket
import struct
import threading
from collections.abc import Iterator
from typing import Any, Callable

import pytest
import websocket

from taskhub_sync import Client, Server
from taskhub_sync._deadline import Deadline

#: Service name -> (key, sub_permissions, pub_permissions, max_instances).
CREDENTIALS: dict[str, tuple[str, list[str], list[str], int]] = {
    "publisher": ("key-publisher-5ecret-0001", [], ["*"], 4),
    "mailer": ("key-mailer-5ecret-0002", ["mail:send-bulk"], ["log:error", "googlemaps"], 1),
    "geocoder": ("key-geocoder-5ecret-0003", ["googlemaps"], [], 1),
    "logger": ("key-logger-5ecret-0004", ["log"], [], 1),
    "auditor": ("key-auditor-5ecret-0005", ["*"], [], 1),
    # Two instances allowed: round robin, max_instances.
    "resizer": ("key-resizer-5ecret-0006", ["image"], ["image"], 2),
}

#: Client kwargs for a client that must not reconnect by itself (issue 3 adds
#: reconnecting; where a test needs the connection to end for good, it turns it off).
NO_RECONNECT: dict[str, Any] = (
    {"reconnect": False} if "reconnect" in inspect.signature(Client).parameters else {}
)

#: How long a test waits for something that should happen at once (a failure limit).
WAIT = 5.0


def key_of(name: str) -> str:
    """The key of a service in CREDENTIALS."""
    return CREDENTIALS[name][0]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "allow_thread_leak: skip the check that the test's threads are gone"
    )


@pytest.fixture(autouse=True)
def no_thread_leak(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test whose threads outlive it (after a bounded wait for stragglers)."""
    before = set(threading.enumerate())
    baseline = threading.active_count()
    yield
    if request.node.get_closest_marker("allow_thread_leak"):
        return
    extra = [t for t in threading.enumerate() if t not in before]
    deadline = Deadline(WAIT)
    for thread in extra:
        thread.join(deadline.remaining())
    alive = [t.name for t in extra if t.is_alive()]
    assert not alive, f"threads left running after the test: {alive}"
    assert threading.active_count() <= baseline


def add_credentials(hub: Server) -> None:
    """Give ``hub`` every credential in CREDENTIALS."""
    for name, (key, sub, pub, max_instances) in CREDENTIALS.items():
        hub.add_credential(
            name, key=key, sub_permissions=sub, pub_permissions=pub, max_instances=max_instances
        )


@pytest.fixture
def make_hub() -> Iterator[Callable[..., Server]]:
    """Factory: a started hub on 127.0.0.1:0 with CREDENTIALS; all stopped at teardown."""
    hubs: list[Server] = []

    def make(**kwargs: Any) -> Server:
        # A start window that a busy CI machine cannot miss; the tests of the window
        # itself ask for 0.1 s.
        kwargs.setdefault("task_start_timeout", 2.0)
        kwargs.setdefault("task_finish_timeout", 10.0)
        hub = Server("127.0.0.1", 0, **kwargs)
        add_credentials(hub)
        hub.start()
        hubs.append(hub)
        return hub

    yield make
    for hub in hubs:
        hub.stop()


@pytest.fixture
def hub(make_hub: Callable[..., Server]) -> Server:
    """A started hub with the default settings of make_hub."""
    return make_hub()


@pytest.fixture
def make_client(
    make_hub: Callable[..., Server], request: pytest.FixtureRequest
) -> Iterator[Callable[..., Client]]:
    """Factory: ``make_client(name, hub=..., **kwargs)``; every client closed at teardown.

    Without ``hub`` it connects to the ``hub`` fixture. Clients close before hubs stop.
    """
    clients: list[Client] = []

    def make(
        name: str, *, hub: Server | None = None, key: str | None = None, **kwargs: Any
    ) -> Client:
        if hub is None:
            hub = request.getfixturevalue("hub")
        kwargs.setdefault("open_timeout", WAIT)
        kwargs.setdefault("close_timeout", WAIT)
        client = Client(hub.url, name=name, key=key_of(name) if key is None else key, **kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def wait_disconnected(hub: Server, client: Client) -> None:
    """After ``client.close()``: wait until the hub has forgotten that connection.

    close() returns once the hub answered the Close; the hub's bookkeeping follows
    on the connection's thread, so join that thread (found by the client's session).
    """
    threads = [c.thread for c in list(hub._all_conns) if c.id == client.session]
    for thread in threads:
        thread.join(WAIT)
        assert not thread.is_alive()


# ----------------------------------------------------------------- raw connections


class RawConnections:
    """Opens raw TCP sockets and raw WebSockets to a hub, for bad-input tests."""

    def __init__(self) -> None:
        self._socks: list[socket.socket] = []
        self._wss: list[websocket.WebSocket] = []

    def tcp(self, hub: Server) -> socket.socket:
        """A plain TCP socket connected to ``hub`` (5 s timeout on every call)."""
        sock = socket.create_connection(("127.0.0.1", hub.port), timeout=WAIT)
        self._socks.append(sock)
        return sock

    def ws(self, hub: Server, *, hello: str | None = "publisher") -> websocket.WebSocket:
        """A websocket-client connection to ``hub``, past hello/welcome as service
        ``hello``, or right after the upgrade when ``hello`` is None."""
        ws = websocket.create_connection(hub.url, timeout=WAIT, http_no_proxy=["*"])
        self._wss.append(ws)
        if hello is not None:
            ws.send(hello_text(hello))
            welcome = json.loads(ws.recv())
            assert welcome["type"] == "welcome"
            ws.session = welcome["session"]  # task ids must start with "<session>."
        return ws

    def close_all(self) -> None:
        for ws in self._wss:
            ws.shutdown()
        for sock in self._socks:
            sock.close()


@pytest.fixture
def raw(make_hub: Callable[..., Server]) -> Iterator[RawConnections]:
    """Raw TCP / WebSocket connections (``raw.tcp(hub)``, ``raw.ws(hub)``), closed before
    the hubs stop."""
    conns = RawConnections()
    yield conns
    conns.close_all()


def hello_text(name: str, key: str | None = None) -> str:
    """The JSON of a hello message for service ``name``."""
    return json.dumps(
        {
            "type": "hello",
            "v": 1,
            "name": name,
            "key": key_of(name) if key is None else key,
            "concurrency": 1,
        }
    )


def recv_close(ws: websocket.WebSocket) -> tuple[int | None, str]:
    """Read until the peer's Close frame; return its (code, reason). Skips data frames."""
    while True:
        opcode, frame = ws.recv_data_frame(True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            if len(frame.data) < 2:
                return None, ""
            return struct.unpack("!H", frame.data[:2])[0], frame.data[2:].decode()


def recv_until_eof(sock: socket.socket) -> bytes:
    """Read a raw socket until the peer closes it."""
    chunks = []
    while True:
        data = sock.recv(65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


class Recorder:
    """Thread-safe list with a condition, to wait for items without polling."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.items: list[Any] = []

    def __call__(self, item: Any) -> None:
        with self._cond:
            self.items.append(item)
            self._cond.notify_all()

    def wait_for(self, count: int, timeout: float = WAIT) -> list[Any]:
        """Wait until at least ``count`` items arrived; return a copy of them."""
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.items) >= count, timeout), (
                f"only {len(self.items)} of {count} items arrived: {self.items}"
            )
            return list(self.items)
