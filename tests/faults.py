"""Fault-injection helpers for the reliability, security and bad-input tests.

- :class:`BlackholeProxy`: a TCP forwarder that can *freeze* its connections (stop
  reading and forwarding while keeping both sockets open, so both ends still see an
  ESTABLISHED connection and nothing arrives: a half-open peer) and can refuse new
  connections for a while (a network that is down).
- :class:`LogWatcher`: waits for log records (a signal, where the library gives no
  other) without polling.
- Raw WebSocket helpers: :func:`raw_ws`, :func:`hello_text`, :func:`recv_close`,
  :func:`ws_frame`.
- :class:`WorkerProc`: a worker in a subprocess (this file run as a script) that
  reports what it does on stdout, to SIGSTOP or SIGKILL it.
- :class:`Harness`: starts hubs, clients, proxies, subprocesses and raw sockets, and
  stops every one of them in ``close()``.

Run as a script, this file is the subprocess worker: see :func:`_worker_main`.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Callable

import websocket

from taskhub_sync import Client, Server
from taskhub_sync._deadline import Deadline

#: How long a test waits for something that should happen at once (a failure limit).
WAIT = 5.0

#: Service name -> (key, sub_permissions, pub_permissions, max_instances).
SERVICES: dict[str, tuple[str, list[str], list[str], int]] = {
    "pub": ("rel-key-pub-s3cret-0001", [], ["*"], 16),
    "work": ("rel-key-work-s3cret-0002", ["*"], ["*"], 16),
    "other": ("rel-key-other-s3cret-0003", ["*"], ["*"], 16),
    "spare": ("rel-key-spare-s3cret-0004", ["*"], ["*"], 16),
}


def key_of(name: str) -> str:
    """The key of a service in SERVICES."""
    return SERVICES[name][0]


def add_services(hub: Server, names: Any = None) -> None:
    """Give ``hub`` the credentials in SERVICES (or only those in ``names``)."""
    for name, (key, sub, pub, max_instances) in SERVICES.items():
        if names is None or name in names:
            hub.add_credential(
                name, key=key, sub_permissions=sub, pub_permissions=pub, max_instances=max_instances
            )


# ----------------------------------------------------------------- blackhole proxy


class BlackholeProxy:
    """A loopback TCP forwarder to ``(host, port)`` with two faults.

    ``freeze()``: every current connection stops reading and forwarding, in both
    directions, while both of its sockets stay open (peers see a half-open
    connection: their writes land in kernel buffers, nothing arrives). Connections
    made after ``freeze()`` work normally, so a client can reconnect through it.
    ``refuse(True)``: new connections are accepted and closed at once.
    ``close()`` closes everything and joins every thread.
    """

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.target = (host, port)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self._cond = threading.Condition()
        self._pairs: list[_Pair] = []
        self._refusing = False
        self._closed = False
        self.accepted = 0  # connections accepted (refused ones included)
        self._threads: list[threading.Thread] = []
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name="faults-proxy-accept", daemon=True
        )
        self._accept_thread.start()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def freeze(self) -> int:
        """Freeze every current connection; return how many were frozen."""
        with self._cond:
            pairs = [p for p in self._pairs if not p.closed]
            for pair in pairs:
                pair.frozen = True
            self._cond.notify_all()
            return len(pairs)

    def refuse(self, on: bool) -> None:
        """While on, new connections are closed as soon as they are accepted."""
        with self._cond:
            self._refusing = on

    def wait_connections(self, count: int, timeout: float = WAIT) -> None:
        """Wait until at least ``count`` connections have been accepted."""
        with self._cond:
            assert self._cond.wait_for(lambda: self.accepted >= count, timeout), (
                f"only {self.accepted} of {count} connections reached the proxy"
            )

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._cond:
                self.accepted += 1
                refusing, closed = self._refusing, self._closed
                self._cond.notify_all()
            if refusing or closed:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=WAIT)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            pair = _Pair(client, upstream)
            with self._cond:
                if self._closed:
                    pair.close()
                    return
                self._pairs.append(pair)
                for src, dst in ((client, upstream), (upstream, client)):
                    t = threading.Thread(
                        target=self._pump, args=(pair, src, dst), name="faults-proxy-pump"
                    )
                    t.daemon = True
                    self._threads.append(t)
                    t.start()

    def _pump(self, pair: _Pair, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                with self._cond:  # a frozen pair reads nothing more
                    self._cond.wait_for(lambda: not pair.frozen or pair.closed)
                    if pair.closed:
                        return
                data = src.recv(65536)
                if not data:
                    break
                with self._cond:  # data read just as it froze is held, never sent
                    self._cond.wait_for(lambda: not pair.frozen or pair.closed)
                    if pair.closed:
                        return
                dst.sendall(data)
        except OSError:
            pass
        with self._cond:
            frozen = pair.frozen
        if not frozen:  # one side ended: end the other (a frozen pair stays silent)
            pair.close()

    def close(self) -> None:
        """Close the listener and every connection; join every thread."""
        with self._cond:
            self._closed = True
            pairs = list(self._pairs)
            for pair in pairs:
                pair.closed = True
            self._cond.notify_all()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        for pair in pairs:
            pair.close()
        self._accept_thread.join(WAIT)
        deadline = Deadline(WAIT)
        for t in list(self._threads):
            t.join(deadline.remaining())
        assert not any(t.is_alive() for t in self._threads), "proxy threads still running"


class _Pair:
    def __init__(self, a: socket.socket, b: socket.socket) -> None:
        self.a, self.b = a, b
        self.frozen = False
        self.closed = False

    def close(self) -> None:
        self.closed = True
        for s in (self.a, self.b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


# ----------------------------------------------------------------- log records as signals


class LogWatcher(logging.Handler):
    """Collects records of ``taskhub_sync`` loggers; ``wait_for`` waits on a predicate.

    Use as ``with LogWatcher() as logs:``; it sets the level to DEBUG for the
    duration and restores it.
    """

    def __init__(self, logger: str = "taskhub_sync", level: int = logging.DEBUG) -> None:
        super().__init__(level)
        self._logger = logging.getLogger(logger)
        self._level = level
        self._cond = threading.Condition()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        with self._cond:
            self.records.append(record)
            self._cond.notify_all()

    def __enter__(self) -> LogWatcher:
        self._old_level = self._logger.level
        self._logger.setLevel(self._level)
        self._logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self._logger.removeHandler(self)
        self._logger.setLevel(self._old_level)

    def messages(self, *needles: str, level: int = 0) -> list[str]:
        """Formatted messages (at ``level`` or above) containing every needle."""
        with self._cond:
            records = [r for r in self.records if r.levelno >= level]
        return [m for m in (r.getMessage() for r in records) if all(n in m for n in needles)]

    def wait_for(self, *needles: str, count: int = 1, timeout: float = WAIT) -> list[str]:
        """Wait until ``count`` messages contain every needle; return them."""
        with self._cond:
            ok = self._cond.wait_for(lambda: len(self.messages(*needles)) >= count, timeout)
        found = self.messages(*needles)
        assert ok, f"{len(found)} of {count} log messages with {needles!r} after {timeout} s"
        return found


# ----------------------------------------------------------------- raw WebSocket helpers


def hello_text(name: str, key: str | None = None, concurrency: int = 1) -> str:
    """The JSON of a hello message for service ``name``."""
    return json.dumps(
        {
            "type": "hello",
            "v": 1,
            "name": name,
            "key": key_of(name) if key is None else key,
            "concurrency": concurrency,
        }
    )


def raw_ws(
    url: str,
    name: str | None = "pub",
    *,
    concurrency: int = 1,
    rcvbuf: int | None = None,
    timeout: float = WAIT,
) -> websocket.WebSocket:
    """A websocket-client connection, past hello/welcome as ``name`` (or right after
    the upgrade when ``name`` is None). ``rcvbuf`` shrinks the socket's receive buffer."""
    sockopt: list[tuple[int, int, int]] = []
    if rcvbuf is not None:
        sockopt.append((socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf))
    ws = websocket.create_connection(url, timeout=timeout, http_no_proxy=["*"], sockopt=sockopt)
    if name is not None:
        ws.send(hello_text(name, concurrency=concurrency))
        welcome = json.loads(ws.recv())
        assert welcome["type"] == "welcome", welcome
    return ws


def recv_json(ws: websocket.WebSocket, kind: str | None = None) -> dict[str, Any]:
    """Next text message (of type ``kind`` if given, skipping others) as a dict."""
    while True:
        opcode, frame = ws.recv_data_frame(True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            raise AssertionError(f"connection closed: {close_info(frame.data)}")
        if opcode != websocket.ABNF.OPCODE_TEXT:
            continue
        msg = json.loads(frame.data)
        if kind is None or msg.get("type") == kind:
            return msg  # type: ignore[no-any-return]


def close_info(data: bytes) -> tuple[int | None, str]:
    if len(data) < 2:
        return None, ""
    return struct.unpack("!H", data[:2])[0], data[2:].decode("utf-8", "replace")


def recv_close(ws: websocket.WebSocket) -> tuple[int | None, str]:
    """Read until the peer's Close frame; return its (code, reason). Skips data."""
    while True:
        opcode, frame = ws.recv_data_frame(True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            return close_info(frame.data)


def ws_frame(opcode: int, payload: bytes, *, fin: bool = True, length: int | None = None) -> bytes:
    """A masked client frame; ``length`` overrides the announced payload length."""
    n = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 1 << 16:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + body


def upgrade_request(port: int) -> bytes:
    """A valid WebSocket upgrade request for ``127.0.0.1:port``."""
    return (
        f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def read_http_head(sock: socket.socket) -> bytes:
    """Read a raw socket up to the end of an HTTP response head."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def read_until_eof(sock: socket.socket) -> bytes:
    """Read a raw socket until the peer closes it (or resets it)."""
    chunks = []
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


# ----------------------------------------------------------------- subprocess worker


class ScriptProc:
    """This file run as a script in a subprocess; reads its stdout lines.

    ``expect(word)`` waits for the next line starting with ``word``. Closing stdin
    asks it to shut down and exit.
    """

    def __init__(self, *args: str) -> None:
        cmd = [sys.executable, os.path.abspath(__file__), *args]
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self.stderr: list[str] = []
        self._out = threading.Thread(target=self._read_out, name="faults-proc-out", daemon=True)
        self._err = threading.Thread(target=self._read_err, name="faults-proc-err", daemon=True)
        self._out.start()
        self._err.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read_out(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)

    def expect(self, word: str, timeout: float = WAIT) -> str:
        """Wait for the next stdout line starting with ``word``; return the rest."""
        deadline = Deadline(timeout)
        while True:
            try:
                line = self.lines.get(timeout=deadline.remaining())
            except queue.Empty:
                raise AssertionError(
                    f"subprocess printed no {word!r} within {timeout} s; stderr: "
                    + "".join(self.stderr)[-2000:]
                ) from None
            if line is None:
                raise AssertionError(
                    f"subprocess exited before {word!r}; stderr: " + "".join(self.stderr)[-2000:]
                )
            if line.split(" ", 1)[0] == word:
                return line[len(word) :].strip()

    def stop(self) -> None:
        """SIGSTOP: the process stays, its sockets stay open, nothing is read."""
        os.kill(self.proc.pid, signal.SIGSTOP)

    def cont(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(WAIT)

    def close(self) -> None:
        """Ask it to exit (stdin EOF), kill it if it does not, join the readers."""
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGCONT)
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            except (OSError, ValueError):
                pass
            try:
                self.proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(WAIT)
        self._out.join(WAIT)
        self._err.join(WAIT)
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                if f is not None:
                    f.close()
            except (OSError, ValueError):
                pass


class WorkerProc(ScriptProc):
    """A worker client in a subprocess.

    It prints ``READY <session>`` once subscribed to ``topic``, ``STARTED <task id>``
    when a ``hang`` task starts, ``GOT <task id>`` when a ``hold`` task arrives,
    ``CANCELLED <task id>`` when either is cancelled, and ``RECONNECTED <session>``
    after a reconnect, once its subscriptions are back at the hub.
    """

    def __init__(
        self,
        url: str,
        name: str,
        topic: str,
        *,
        ping_interval: float = 5.0,
        max_workers: int = 4,
    ) -> None:
        super().__init__(
            "worker", url, name, key_of(name), topic, str(ping_interval), str(max_workers)
        )
        self.session = self.expect("READY", timeout=15.0)


class HubProc(ScriptProc):
    """A hub with SERVICES in a subprocess; prints ``PORT <n>`` once listening."""

    def __init__(self, port: int = 0, *, resume_grace: float = 5.0) -> None:
        super().__init__("hub", str(port), str(resume_grace))
        self.port = int(self.expect("PORT", timeout=15.0))
        self.url = f"ws://127.0.0.1:{self.port}"


def _hub_main(argv: list[str]) -> int:
    """Subprocess hub: ``faults.py hub PORT RESUME_GRACE``; stops at stdin EOF."""
    hub = Server("127.0.0.1", int(argv[0]), resume_grace=float(argv[1]), task_start_timeout=1.0)
    add_services(hub)
    hub.start()
    print("PORT", hub.port, flush=True)
    sys.stdin.read()
    hub.stop()
    return 0


def _worker_main(argv: list[str]) -> int:
    """Subprocess worker: ``faults.py worker URL NAME KEY TOPIC PING MAX_WORKERS``.

    Handler on TOPIC: payload ``{"mode": "echo", ...}`` returns the payload;
    ``{"mode": "hang"}`` claims the task, prints STARTED, waits to be cancelled
    (prints CANCELLED) and returns "late".
    """
    url, name, key, topic, ping, max_workers = argv[:6]
    reconnected: queue.SimpleQueue[bool] = queue.SimpleQueue()

    class _OnReconnect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("reconnected to"):
                reconnected.put(True)

    client_logger = logging.getLogger("taskhub_sync.client")
    client_logger.setLevel(logging.INFO)
    client_logger.addHandler(_OnReconnect())
    client = Client(
        url,
        name=name,
        key=key,
        ping_interval=float(ping),
        max_workers=int(max_workers),
        reconnect_delay=(0.05, 0.5),
    )

    def handler(task: Any) -> Any:
        payload = task.get_payload() or {}
        mode = payload.get("mode") if isinstance(payload, dict) else None
        if mode in ("hang", "hold"):
            if mode == "hang":
                task.start()
            print("STARTED" if mode == "hang" else "GOT", task.id, flush=True)
            task.wait_cancelled()
            print("CANCELLED", task.id, flush=True)
            return "late"
        return payload

    client.sub(topic, handler)
    print("READY", client.session, flush=True)

    def stdin_watch() -> None:
        sys.stdin.read()
        reconnected.put(False)

    threading.Thread(target=stdin_watch, daemon=True).start()
    n = 0
    while reconnected.get():
        n += 1
        # sub/reply on the same connection: the hub has handled the re-subscription
        # sent before it, so a task published from now on reaches this worker.
        client.sub(f"barrier-{n}", handler)
        print("RECONNECTED", client.session, flush=True)
    client.close()
    return 0


# ----------------------------------------------------------------- the harness


class Harness:
    """Starts what a test needs and stops all of it in ``close()``."""

    def __init__(self) -> None:
        self.hubs: list[Server] = []
        self.clients: list[Client] = []
        self.procs: list[ScriptProc] = []
        self.proxies: list[BlackholeProxy] = []
        self.socks: list[socket.socket] = []
        self.wss: list[websocket.WebSocket] = []
        self.threads: list[tuple[threading.Thread, Callable[[], None]]] = []

    def hub(self, port: int = 0, *, services: Any = None, **kwargs: Any) -> Server:
        """A started hub on 127.0.0.1 with SERVICES credentials."""
        kwargs.setdefault("task_start_timeout", 1.0)
        kwargs.setdefault("task_finish_timeout", 10.0)
        hub = Server("127.0.0.1", port, **kwargs)
        add_services(hub, services)
        hub.start()
        self.hubs.append(hub)
        return hub

    def client(self, url: str | Server, name: str, **kwargs: Any) -> Client:
        """A Client of service ``name`` (key from SERVICES unless ``key=``)."""
        if isinstance(url, Server):
            url = url.url
        if "key" not in kwargs:
            kwargs["key"] = key_of(name)
        kwargs.setdefault("open_timeout", WAIT)
        kwargs.setdefault("close_timeout", WAIT)
        kwargs.setdefault("reconnect_delay", (0.05, 0.5))
        client = Client(url, name=name, **kwargs)
        self.clients.append(client)
        return client

    def echo_worker(self, hub: Server | str, topic: str = "echo", **kwargs: Any) -> Client:
        """A ``work`` client answering ``topic`` with its payload."""
        worker = self.client(hub, kwargs.pop("name", "work"), **kwargs)
        worker.sub(topic, lambda task: task.get_payload())
        return worker

    def worker_proc(self, url: str, name: str, topic: str, **kwargs: Any) -> WorkerProc:
        proc = WorkerProc(url, name, topic, **kwargs)
        self.procs.append(proc)
        return proc

    def hub_proc(self, port: int = 0, **kwargs: Any) -> HubProc:
        proc = HubProc(port, **kwargs)
        self.procs.append(proc)
        return proc

    def proxy(self, hub: Server) -> BlackholeProxy:
        proxy = BlackholeProxy(hub.port)
        self.proxies.append(proxy)
        return proxy

    def tcp(self, hub: Server, timeout: float = WAIT) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", hub.port), timeout=timeout)
        self.socks.append(sock)
        return sock

    def ws(self, hub: Server, name: str | None = "pub", **kwargs: Any) -> websocket.WebSocket:
        ws = raw_ws(hub.url, name, **kwargs)
        self.wss.append(ws)
        return ws

    def thread(self, target: Callable[[], None], stop: Callable[[], None] = lambda: None) -> None:
        """Start a thread; ``stop()`` is called and the thread joined in close()."""
        t = threading.Thread(target=target, name="faults-helper", daemon=True)
        self.threads.append((t, stop))
        t.start()

    def close(self) -> None:
        for _, stop in self.threads:
            stop()
        for ws in self.wss:
            ws.shutdown()
        for sock in self.socks:
            sock.close()
        for client in self.clients:
            client.close()
        for proc in self.procs:
            proc.close()
        for proxy in self.proxies:
            proxy.close()
        for hub in self.hubs:
            hub.stop()
        for t, _ in self.threads:
            t.join(WAIT)
            assert not t.is_alive(), "a helper thread did not stop"


@contextmanager
def harness() -> Iterator[Harness]:
    h = Harness()
    try:
        yield h
    finally:
        h.close()


def roundtrip(publisher: Client, topic: str = "echo", budget: float = 2.0) -> float:
    """One pub -> result on ``topic``; assert it came back right within ``budget`` s;
    return the seconds it took."""
    t0 = time.monotonic()
    payload = {"n": t0}
    assert publisher.pub(topic, payload).get_result(timeout=budget) == payload
    return time.monotonic() - t0


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT, what: str = "") -> None:
    """Bounded wait for a condition that has no signal (prefer events and joins)."""
    deadline = Deadline(timeout)
    while not predicate():
        assert not deadline.expired(), f"timed out waiting for {what or predicate}"
        select.select([], [], [], 0.01)  # a 10 ms tick of a bounded poll


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        sys.exit(_worker_main(sys.argv[2:]))
    if sys.argv[1:2] == ["hub"]:
        sys.exit(_hub_main(sys.argv[2:]))
    sys.exit(f"usage: {sys.argv[0]} worker URL NAME KEY TOPIC PING MAX_WORKERS | hub PORT GRACE")
