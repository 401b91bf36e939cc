"""Starting and stopping as scripts, cron jobs and systemd services do it."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from conftest import WAIT, key_of

from taskhub_sync import Client, ConnectionLost, Server


class LogEvent(logging.Handler):
    """Sets ``event`` when a record containing ``needle`` is logged."""

    def __init__(self, needle: str, event: threading.Event) -> None:
        super().__init__(logging.DEBUG)
        self.needle = needle
        self.event = event

    def emit(self, record: logging.LogRecord) -> None:
        if self.needle in record.getMessage():
            self.event.set()


def test_close_tells_running_handlers_and_delivers_their_result(hub, make_client):
    """close() sets task.cancelled ("client closing"); the handler's result still arrives."""
    started = threading.Event()
    reasons = []

    def cooperative(task):
        task.start()
        started.set()
        assert task.wait_cancelled(WAIT)
        reasons.append(task.cancel_reason)
        return "wrapped up"

    worker = make_client("auditor")
    worker.sub("job", cooperative)
    handle = make_client("publisher").pub("job")
    assert started.wait(WAIT)
    t0 = time.monotonic()
    worker.close()
    assert time.monotonic() - t0 < WAIT  # did not wait out close_timeout
    assert reasons == ["client closing"]
    assert handle.get_result(timeout=WAIT) == "wrapped up"


def test_publisher_close_stops_its_tasks_at_once(make_hub, make_client):
    """A publisher that closes on purpose gets no resume grace: its workers are told now."""
    hub = make_hub(resume_grace=60.0)
    started = threading.Event()
    told = threading.Event()
    reasons = []

    def long_job(task):
        task.start()
        started.set()
        task.wait_cancelled(WAIT)
        reasons.append(task.cancel_reason)
        told.set()

    make_client("auditor", hub=hub).sub("job", long_job)
    publisher = make_client("publisher", hub=hub)
    handle = publisher.pub("job")
    assert started.wait(WAIT)
    publisher.close()
    with pytest.raises(ConnectionLost, match="the client was closed"):
        handle.get_result(timeout=WAIT)
    assert told.wait(WAIT / 2)  # well before the 60 s grace
    assert reasons == ["publisher gone"]


def test_wait_for_hub_connects_once_the_hub_is_up():
    """Client(wait_for_hub=...) keeps trying while nothing listens, then connects."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    box: list[object] = []
    attempting = threading.Event()

    watch = LogEvent("not reachable yet", attempting)
    client_logger = logging.getLogger("taskhub_sync.client")
    client_logger.addHandler(watch)
    level = client_logger.level
    client_logger.setLevel(logging.INFO)

    def connect():
        try:
            box.append(
                Client(
                    f"ws://127.0.0.1:{port}",
                    name="publisher",
                    key=key_of("publisher"),
                    wait_for_hub=WAIT * 2,
                )
            )
        except Exception as exc:  # reported by the assertion below
            box.append(exc)

    thread = threading.Thread(target=connect)
    thread.start()
    hub = Server("127.0.0.1", port)
    hub.add_credential("publisher", key=key_of("publisher"), pub_permissions=["*"])
    try:
        assert attempting.wait(WAIT)  # it failed at least once before the hub existed
        hub.start()
        thread.join(WAIT * 2)
        assert not thread.is_alive()
        [client] = box
        assert isinstance(client, Client), client
        client.close()
    finally:
        client_logger.removeHandler(watch)
        client_logger.setLevel(level)
        hub.stop()


def test_without_wait_for_hub_the_constructor_fails_at_once():
    """By default a missing hub is a ConnectionLost, not a wait."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(ConnectionLost):
        Client(f"ws://127.0.0.1:{port}", name="publisher", key="k")
    assert time.monotonic() - t0 < 1.0


def test_dropped_result_is_logged(make_hub, make_client):
    """A handler that neither starts nor returns within the window: its result is
    dropped, and the worker says so at WARNING with what to do about it."""
    hub = make_hub(task_start_timeout=0.1)
    window_closed = threading.Event()

    def slow_without_start(task):
        task.wait_cancelled(WAIT)
        window_closed.set()
        return "too late"

    make_client("auditor", hub=hub).sub("job", slow_without_start)
    handle = make_client("publisher", hub=hub).pub("job")
    logged = threading.Event()
    watch = LogEvent("call task.start() first", logged)
    client_logger = logging.getLogger("taskhub_sync.client")
    client_logger.addHandler(watch)
    try:
        assert handle.get_result(timeout=WAIT) is None  # only "seen"
        assert window_closed.wait(WAIT)
        assert logged.wait(WAIT)
    finally:
        client_logger.removeHandler(watch)


WORKER_SCRIPT = textwrap.dedent(
    """
    import signal, sys, threading, time
    from taskhub_sync import Client
    client = Client(sys.argv[1], name="auditor", key=sys.argv[2])
    client.sub("job", lambda task: "ok")

    def announce():  # "ready" once run_forever has its SIGTERM handler in place
        deadline = time.monotonic() + 5
        while signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            if time.monotonic() > deadline:
                return
            threading.Event().wait(0.005)
        print("ready", flush=True)

    threading.Thread(target=announce, daemon=True).start()
    client.run_forever(stop_signals=[signal.SIGTERM])
    print("stopped cleanly", flush=True)
    """
)


def test_run_forever_stops_cleanly_on_sigterm(hub):
    """run_forever(stop_signals=[SIGTERM]): a worker under systemd/cron exits 0 on SIGTERM."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKER_SCRIPT, hub.url, key_of("auditor")],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=WAIT * 2)
        assert proc.returncode == 0
        assert "stopped cleanly" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT)


SECOND_SIGNAL_SCRIPT = textwrap.dedent(
    """
    import signal, sys, threading, time
    from taskhub_sync import Client, Server

    kind, sig = sys.argv[1], signal.Signals[sys.argv[2]]
    stop_signals = [sig] if sig != signal.SIGINT else []  # Ctrl-C works without asking

    original = signal.getsignal(sig)

    def announce():  # "ready" once the blocking call has its handler in place
        deadline = time.monotonic() + 5
        while signal.getsignal(sig) is original and time.monotonic() < deadline:
            threading.Event().wait(0.005)
        print("ready", flush=True)

    threading.Thread(target=announce, daemon=True).start()

    def in_the_middle():  # the test sends the second signal now, then lets us go on
        print("stopping", flush=True)
        assert sys.stdin.readline() == "go\\n"

    if kind == "hub":
        class Hub(Server):
            def stop(self, timeout=5.0):
                if not self.stopping:
                    in_the_middle()
                super().stop(timeout)

        hub = Hub("127.0.0.1", 0)
        hub.start()
        hub.serve_forever(stop_signals=stop_signals)
    else:
        class Worker(Client):
            def close(self):
                in_the_middle()
                super().close()

        hub = Server("127.0.0.1", 0)
        hub.add_credential("w", key="worker-key", sub_permissions=["*"])
        hub.start()
        client = Worker(hub.url, name="w", key="worker-key")
        client.run_forever(stop_signals=stop_signals)
        hub.stop()
    print("stopped cleanly", flush=True)
    """
)


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("kind", ["hub", "worker"])
def test_second_signal_does_not_cut_the_shutdown_short(kind, sig):
    """serve_forever()/run_forever(): a second Ctrl-C or SIGTERM while the first one's
    shutdown runs is ignored; the process still exits 0 after a clean stop."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen(
        [sys.executable, "-c", SECOND_SIGNAL_SCRIPT, kind, sig],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(getattr(signal, sig))
        assert proc.stdout.readline().strip() == "stopping"
        proc.send_signal(getattr(signal, sig))  # lands in the middle of the shutdown
        proc.stdin.write("go\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=WAIT * 2)
        assert "Traceback" not in err, err
        assert proc.returncode == 0
        assert "stopped cleanly" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT)


def test_wait_for_hub_keeps_trying_for_the_whole_wait():
    """With nothing listening, Client(wait_for_hub=S) gives up after S seconds, not a
    backoff step earlier."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    patience = 1.0
    t0 = time.monotonic()
    with pytest.raises(ConnectionLost):
        Client(
            f"ws://127.0.0.1:{port}",
            name="publisher",
            key="k",
            wait_for_hub=patience,
            reconnect_delay=(0.4, 5.0),
        )
    assert patience <= time.monotonic() - t0 < patience + WAIT


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_client_inherited_by_fork_refuses_use_and_leaves_the_parent_working(hub, make_client):
    """A child that forked after the Client was made (a preforking web server) gets
    InvalidState at once instead of a hang, and its close() leaves the parent's
    connection alone."""
    worker = make_client("geocoder")
    worker.sub("googlemaps:geocode", lambda task: task.get_payload())
    script = textwrap.dedent(
        f"""
        import os, sys
        from taskhub_sync import Client, InvalidState
        client = Client({hub.url!r}, name="publisher", key={key_of("publisher")!r})
        assert client.pub("googlemaps:geocode", 1).get_result(timeout=5) == 1
        pid = os.fork()
        if pid == 0:
            try:
                client.pub("googlemaps:geocode", 2)
            except InvalidState as exc:
                print("CHILD", type(exc).__name__, flush=True)
            client.close()
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert client.pub("googlemaps:geocode", 3).get_result(timeout=5) == 3
        print("PARENT", status, flush=True)
        client.close()
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["CHILD InvalidState", "PARENT 0"]


def test_serve_forever_refusing_stop_signals_off_the_main_thread_leaves_no_hub():
    """serve_forever(stop_signals=...) off the main thread raises ValueError and
    leaves no hub behind (it neither starts one nor keeps it listening)."""
    hub = Server("127.0.0.1", 0)
    errors: list = []

    def serve():
        try:
            hub.serve_forever(stop_signals=[signal.SIGTERM])
        except ValueError as exc:
            errors.append(exc)

    t = threading.Thread(target=serve)
    t.start()
    t.join(WAIT)
    assert not t.is_alive()
    assert errors and "main thread" in str(errors[0])
    assert hub.port == 0  # never bound: nothing left listening
    hub.stop()
