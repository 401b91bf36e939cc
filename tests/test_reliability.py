"""Issue 3, "Faults" and "Load and slow consumers": real hubs, clients and processes
on loopback, with peers frozen, killed, dropped and flooded."""

from __future__ import annotations

import logging
import pathlib
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from faults import (
    WAIT,
    LogWatcher,
    harness,
    key_of,
    recv_close,
    recv_json,
    roundtrip,
    wait_until,
)

import taskhub_sync
from taskhub_sync import (
    AuthenticationError,
    ConnectionLost,
    LimitExceeded,
    NoSubscribers,
    Overloaded,
    PayloadTooLarge,
    TaskTimeout,
    WorkerLost,
)

#: Heartbeat interval for the dead-peer tests: short, so "two intervals" is quick.
PING = 0.2
#: Slack on top of the two intervals, for a loaded machine.
SLACK = 0.5


@pytest.fixture
def h():
    with harness() as hh:
        yield hh


def _hang_worker(h, hub, topic="job", **kwargs):
    """An in-process worker whose handler claims the task, reports it, then waits for
    ``release`` (or cancellation); returns (worker, started: list of tasks, release)."""
    started: list = []
    got = threading.Event()
    release = threading.Event()

    def handler(task):
        task.start()
        started.append(task)
        got.set()
        release.wait(WAIT)
        return "finished"

    worker = h.client(hub, kwargs.pop("name", "work"), **kwargs)
    worker.sub(topic, handler)
    h.thread(lambda: None, stop=release.set)  # teardown releases a stuck handler
    return worker, started, got, release


# ----------------------------------------------------------------- dead peers


def test_hub_notices_sigstopped_worker_within_two_intervals(h):
    """A SIGSTOPped worker (half-open) is dropped by the hub's heartbeat: WorkerLost."""
    hub = h.hub(ping_interval=PING)
    publisher = h.client(hub, "pub")
    worker = h.worker_proc(hub.url, "work", "job", ping_interval=5.0)
    handle = publisher.pub("job", {"mode": "hang"})
    worker.expect("STARTED")
    t0 = time.monotonic()
    worker.stop()
    try:
        error = handle.exception(timeout=WAIT)
        elapsed = time.monotonic() - t0
    finally:
        worker.kill()
    assert isinstance(error, WorkerLost) and error.service == "work", error
    assert elapsed < 2 * PING + SLACK, elapsed


def test_hub_notices_blackholed_worker(h):
    """A worker behind a frozen link (half-open TCP) is dropped; its task fails WorkerLost."""
    hub = h.hub(ping_interval=PING)
    proxy = h.proxy(hub)
    publisher = h.client(hub, "pub")
    _, _, got, _ = _hang_worker(h, proxy.url, ping_interval=5.0)
    handle = publisher.pub("job")
    assert got.wait(WAIT)
    with LogWatcher() as logs:
        t0 = time.monotonic()
        assert proxy.freeze() == 1
        error = handle.exception(timeout=WAIT)
        elapsed = time.monotonic() - t0
        logs.wait_for("work#", "disconnected")
    assert isinstance(error, WorkerLost) and error.service == "work"
    assert elapsed < 2 * PING + SLACK, elapsed
    proxy.close()  # the frozen link, so that closing the worker does not wait on it


def test_client_notices_blackholed_hub_and_reconnects(h):
    """A publisher behind a frozen link notices within two intervals, reconnects and
    resumes its session: its pending task still completes."""
    hub = h.hub(ping_interval=5.0)  # the hub would take 10 s: the client must notice
    proxy = h.proxy(hub)
    _, _, got, release = _hang_worker(h, hub)
    with LogWatcher() as logs:
        publisher = h.client(proxy.url, "pub", ping_interval=PING)
        handle = publisher.pub("job")
        assert got.wait(WAIT)
        t0 = time.monotonic()
        proxy.freeze()
        logs.wait_for("stopped answering heartbeats")
        elapsed = time.monotonic() - t0
        logs.wait_for("reconnected to", "(resumed)")
    assert elapsed < 2 * PING + SLACK, elapsed
    release.set()
    assert handle.get_result(timeout=WAIT) == "finished"
    assert proxy.accepted == 2
    proxy.close()  # the frozen link, so that closing the worker does not wait on it


def test_worker_killed_mid_task_fails_fast_with_worker_lost(h):
    """SIGKILL of a worker holding a started task: WorkerLost naming it, at once."""
    hub = h.hub(task_finish_timeout=30.0)  # default 5 s heartbeat: not what notices
    publisher = h.client(hub, "pub")
    worker = h.worker_proc(hub.url, "work", "job")
    handle = publisher.pub("job", {"mode": "hang"})
    task_id = worker.expect("STARTED")
    assert task_id == handle.task_id
    t0 = time.monotonic()
    worker.kill()
    error = handle.exception(timeout=WAIT)
    assert time.monotonic() - t0 < 1.0
    assert isinstance(error, WorkerLost) and error.service == "work"
    assert "'work'" in str(error) and error.task_id == handle.task_id
    assert handle.results["work"].status == "lost"


def test_unstarted_task_of_lost_worker_goes_to_another_instance(h):
    """A task delivered but not started when its worker dies is redelivered."""
    hub = h.hub(task_start_timeout=WAIT)
    publisher = h.client(hub, "pub")
    first = h.worker_proc(hub.url, "work", "job", max_workers=1)
    handle = publisher.pub("job", {"mode": "hold"})
    assert first.expect("GOT") == handle.task_id
    second = h.echo_worker(hub, "job")  # subscribes after the task went to `first`
    assert second.session != first.session
    first.kill()
    assert handle.get_result(timeout=WAIT) == {"mode": "hold"}
    assert handle.results["work"].status == "ok"


def test_publisher_lost_beyond_grace_cancels_its_tasks(h):
    """A publisher gone past resume_grace: the worker's task.cancelled turns true."""
    grace = 0.3
    hub = h.hub(resume_grace=grace)
    publisher = h.client(hub, "pub", reconnect=False)
    worker, started, got, release = _hang_worker(h, hub)
    publisher.pub("job")
    assert got.wait(WAIT)
    task = started[0]
    t0 = time.monotonic()
    publisher._ws.sock.shutdown(socket.SHUT_RDWR)
    assert task.wait_cancelled(WAIT)
    elapsed = time.monotonic() - t0
    assert task.cancelled and task.cancel_reason == "publisher gone"
    assert grace <= elapsed < grace + 2.0, elapsed
    release.set()  # its result is dropped by the hub; the worker stays healthy
    other = h.client(hub, "other")
    worker.sub("echo", lambda t: t.get_payload())
    roundtrip(other)
    assert hub.pending_tasks() == 0 and worker.connected


def _brief_drop(h, updates, **hub_kwargs):
    """Publisher away (its link down) while the worker sends ``updates`` updates and
    the result; then back. Returns (handle, seen updates, logs' reconnect messages)."""
    hub = h.hub(resume_grace=WAIT, **hub_kwargs)
    proxy = h.proxy(hub)
    go = threading.Event()
    started = threading.Event()

    def handler(task):
        task.start()
        started.set()
        go.wait(WAIT)
        for i in range(updates):
            task.update({"i": i})
        return "final"

    worker = h.client(hub, "work")
    worker.sub("job", handler)
    h.thread(lambda: None, stop=go.set)
    publisher = h.client(proxy.url, "pub", reconnect_delay=(0.05, 0.2))
    seen: list = []
    handle = publisher.pub("job").on("update", seen.append)
    assert started.wait(WAIT)
    with LogWatcher() as logs:
        proxy.refuse(True)  # the network stays down until the worker is done
        publisher._ws.sock.shutdown(socket.SHUT_RDWR)
        logs.wait_for(f"{publisher.session} (", "disconnected")
        assert not handle.done()
        go.set()
        wait_until(lambda: hub.pending_tasks() == 0, what="the result to reach the hub")
        assert not handle.done() and handle.updates == []
        proxy.refuse(False)
        logs.wait_for("reconnected to")
        result = handle.get_result(timeout=WAIT)
        resumed = logs.messages("reconnected to", "(resumed)")
    assert result == "final"
    assert resumed
    assert proxy.accepted >= 2
    return handle, seen


def test_publisher_brief_drop_loses_no_update_or_result(h):
    """Updates and the result made while the publisher was away arrive, in order."""
    handle, seen = _brief_drop(h, 20)
    assert handle.updates == [{"i": i} for i in range(20)]
    assert seen == handle.updates


def test_publisher_brief_drop_result_kept_even_past_the_update_bound(h):
    """More updates than the hub buffers: the surplus is dropped, the result is not."""
    handle, _ = _brief_drop(h, 20, max_queued_messages=5)
    assert 0 < len(handle.updates) <= 5


def test_result_written_into_a_dying_connection_is_not_lost_on_resume(h):
    """A result the hub sent just before the publisher's link died still reaches the
    handle after the publisher resumes (or the handle fails): it never hangs."""
    hub = h.hub(resume_grace=WAIT)
    proxy = h.proxy(hub)
    _, _, got, release = _hang_worker(h, hub)
    hold = threading.Event()
    worker = h.client(hub, "other")
    worker.sub("hold", lambda t: (t.start(), hold.wait(WAIT)) and "held")
    h.thread(lambda: None, stop=hold.set)
    with LogWatcher() as logs:
        publisher = h.client(proxy.url, "pub", reconnect_delay=(0.05, 0.2))
        keeps_session = publisher.pub("hold")  # pending throughout: the session resumes
        handle = publisher.pub("job")
        assert got.wait(WAIT)
        proxy.freeze()  # the link dies silently (the hub and the client both still trust it)
        release.set()  # the result is written into the dead link
        wait_until(lambda: hub.pending_tasks() == 1, what="the job's Done to be sent")
        publisher._ws.sock.shutdown(socket.SHUT_RDWR)  # the client notices, reconnects
        logs.wait_for("reconnected to", "(resumed)")
        hold.set()
        assert keeps_session.get_result(timeout=WAIT) == "held"
        error = handle.exception(timeout=WAIT)  # TimeoutError: it hangs, its Done lost
    assert isinstance(error, ConnectionLost) or (error is None and handle.result() == "finished")


def test_reconnect_restores_subscriptions(h):
    """After a dropped connection the worker reconnects and gets new tasks again."""
    hub = h.hub()
    worker = h.echo_worker(hub, "job")
    publisher = h.client(hub, "pub")
    roundtrip(publisher, "job")
    old_session = worker.session
    with LogWatcher() as logs:
        worker._ws.sock.shutdown(socket.SHUT_RDWR)
        logs.wait_for("reconnected to")
    # A request/reply on the worker's new connection: the hub has handled the
    # re-subscription the client sent before it.
    worker.sub("barrier", lambda t: None)
    assert worker.session != old_session and worker.connected
    roundtrip(publisher, "job")


def test_reconnect_backoff_waits_for_a_hub_that_is_down(h):
    """While the hub is unreachable the client retries with growing delays, then rides on."""
    hub = h.hub()
    proxy = h.proxy(hub)
    h.echo_worker(hub)
    with LogWatcher() as logs:
        publisher = h.client(proxy.url, "pub", reconnect_delay=(0.02, 0.1))
        proxy.refuse(True)
        publisher._ws.sock.shutdown(socket.SHUT_RDWR)
        logs.wait_for("reconnect attempt", "failed", count=6)
        assert not publisher.connected
        proxy.refuse(False)
        logs.wait_for("reconnected to")
    roundtrip(publisher)


def test_pub_while_reconnecting_waits_then_fails_with_connection_lost(h):
    """pub() while the hub is unreachable waits open_timeout, then ConnectionLost."""
    hub = h.hub()
    proxy = h.proxy(hub)
    with LogWatcher() as logs:
        publisher = h.client(proxy.url, "pub", open_timeout=0.5, reconnect_delay=(0.02, 0.1))
        proxy.refuse(True)
        publisher._ws.sock.shutdown(socket.SHUT_RDWR)
        logs.wait_for("connection to", "lost")
    t0 = time.monotonic()
    with pytest.raises(ConnectionLost):
        publisher.pub("job")
    assert 0.4 <= time.monotonic() - t0 < 0.5 + SLACK


def test_pub_racing_a_dropped_link_goes_out_on_the_next_one(h):
    """A pub() whose write fails because the link just dropped is sent on the
    reconnected link, like a pub() while reconnecting; it does not fail at once."""
    hub = h.hub()
    h.echo_worker(hub)
    publisher = h.client(hub, "pub")
    stream = publisher._link.stream
    real_sendall = stream.sendall

    def broken_once(data):
        stream.sendall = real_sendall
        raise BrokenPipeError(32, "Broken pipe")

    stream.sendall = broken_once
    assert publisher.pub("echo", 1).get_result(timeout=WAIT) == 1
    assert publisher._link.stream is not stream


def test_wrong_key_on_reconnect_is_not_retried(h):
    """A hub that no longer knows the key: run_forever raises AuthenticationError after
    one attempt, instead of retrying in a loop."""
    hub = h.hub()
    port = hub.port
    worker = h.client(hub, "work", reconnect_delay=(0.02, 0.05))
    errors: list = []

    def run():
        try:
            worker.run_forever()
        except Exception as exc:
            errors.append(exc)

    runner = threading.Thread(target=run)
    runner.start()
    with LogWatcher() as logs:
        hub.stop()
        h.hub(port, services=["pub"])  # restarted without the "work" credential
        runner.join(WAIT)
        assert not runner.is_alive()
        assert len(errors) == 1 and isinstance(errors[0], AuthenticationError), errors
        assert len(logs.messages("authentication failed for 'work'")) == 1
    assert worker.closed
    with pytest.raises(ConnectionLost):
        worker.pub("job")


# ----------------------------------------------------------------- hub restarts, shutdown


def test_clients_ride_over_a_hub_crash_and_restart(h):
    """Hub SIGKILLed and restarted on its port: clients reconnect and resubscribe; a
    pending handle fails with ConnectionLost instead of hanging."""
    hub = h.hub_proc()
    worker = h.worker_proc(hub.url, "work", "job")
    with LogWatcher() as logs:
        publisher = h.client(hub.url, "pub", reconnect_delay=(0.05, 0.2))
        assert publisher.pub("job", {"x": 1}).get_result(timeout=WAIT) == {"x": 1}
        handle = publisher.pub("job", {"mode": "hang"})
        worker.expect("STARTED")
        hub.kill()
        h.hub_proc(hub.port)
        error = handle.exception(timeout=WAIT)
        assert isinstance(error, ConnectionLost) and "session" in str(error), error
        logs.wait_for("reconnected to")
    worker.expect("CANCELLED")  # its client cancelled the task of the lost connection
    worker.expect("RECONNECTED")
    assert publisher.pub("job", {"x": 2}).get_result(timeout=WAIT) == {"x": 2}


def test_pending_handle_fails_when_the_resume_grace_ends_not_a_backoff_step_later(h):
    """Hub killed for good: a pending handle fails with ConnectionLost once the hub's
    resume grace is over, even while the client's backoff waits longer between tries."""
    hub = h.hub_proc(resume_grace=0.5)
    worker = h.worker_proc(hub.url, "work", "job")
    publisher = h.client(hub.url, "pub", reconnect_delay=(30.0, 30.0))
    handle = publisher.pub("job", {"mode": "hang"})
    worker.expect("STARTED")
    hub.kill()
    t0 = time.monotonic()
    error = handle.exception(timeout=WAIT)
    assert isinstance(error, ConnectionLost) and "resume grace" in str(error), error
    assert time.monotonic() - t0 < 0.5 + 2.0  # the grace plus scheduling slack; not 30 s


def test_graceful_hub_restart_fails_pending_and_clients_come_back(h):
    """hub.stop() then a new hub on the same port: pending handles fail with
    ConnectionLost, clients reconnect, resubscribe and work."""
    hub = h.hub()
    port = hub.port
    worker, _, got, release = _hang_worker(h, hub, reconnect_delay=(0.05, 0.2))
    worker.sub("echo", lambda t: t.get_payload())
    with LogWatcher() as logs:
        publisher = h.client(hub, "pub", reconnect_delay=(0.05, 0.2))
        handle = publisher.pub("job")
        assert got.wait(WAIT)
        hub.stop()
        error = handle.exception(timeout=WAIT)
        assert isinstance(error, ConnectionLost), error
        release.set()
        h.hub(port)
        logs.wait_for("reconnected to", count=2)
    worker.sub("barrier", lambda t: None)
    roundtrip(publisher)


def test_hub_stop_says_1001_fails_pending_and_joins_in_bounded_time(h):
    """stop(): clients get 1001, pending handles ConnectionLost, and every hub thread
    is joined within the timeout, even with a peer that no longer answers."""
    hub = h.hub()
    proxy = h.proxy(hub)
    raw = h.ws(hub, "other")
    closes: list = []
    h.thread(lambda: closes.append(recv_close(raw)))  # answers the hub's Close
    _, _, got, release = _hang_worker(h, hub)
    publisher = h.client(hub, "pub", reconnect=False)
    frozen = h.client(proxy.url, "spare", reconnect=False, close_timeout=0.5)
    handle = publisher.pub("job")
    assert got.wait(WAIT)
    proxy.freeze()
    errors: list = []
    h.thread(lambda: _run_forever(publisher, errors))
    conn_threads = [c.thread for c in list(hub._all_conns)]
    assert len(conn_threads) == 4
    t0 = time.monotonic()
    hub.stop(timeout=3.0)
    assert time.monotonic() - t0 < 3.0 + SLACK
    assert not [t.name for t in conn_threads if t.is_alive()]
    assert not hub._accept_thread.is_alive() and not hub._timer_thread.is_alive()
    assert isinstance(handle.exception(timeout=WAIT), ConnectionLost)
    wait_until(lambda: bool(closes) and bool(errors), what="the 1001 closes")
    assert closes == [(1001, "hub shutting down")]
    assert len(errors) == 1 and "1001" in str(errors[0]), errors
    release.set()
    assert frozen.connected  # it cannot know yet: its link is frozen
    proxy.close()


def test_hub_stop_joins_threads_with_several_unresponsive_peers(h):
    """stop(timeout) with three peers that never answer the Close still joins every
    connection thread before it returns (each takes 0.2 s to wind down here)."""
    hub = h.hub()
    for _ in range(3):
        h.ws(hub, "other")  # never read: never answers the Close
    h.echo_worker(hub)
    roundtrip(h.client(hub, "pub"))
    conn_threads = [c.thread for c in list(hub._all_conns)]
    assert len(conn_threads) == 5

    class SlowBookkeeping(logging.Handler):  # fault: a connection's last steps are slow
        def emit(self, record):
            if "disconnected" in record.getMessage():
                threading.Event().wait(0.2)

    slow = SlowBookkeeping()
    server_logger = logging.getLogger("taskhub_sync.server")
    server_logger.addHandler(slow)
    try:
        with LogWatcher():  # INFO records reach the handler
            t0 = time.monotonic()
            hub.stop(timeout=2.0)
            elapsed = time.monotonic() - t0
            alive = [t.name for t in conn_threads if t.is_alive()]
    finally:
        server_logger.removeHandler(slow)
    assert elapsed < 2.0 + 1.0
    assert not alive


def _run_forever(client, errors):
    try:
        client.run_forever()
    except Exception as exc:
        errors.append(exc)


def test_client_close_lets_running_handler_finish_and_deliver(h):
    """close() waits for a running handler; its result reaches the publisher."""
    hub = h.hub()
    worker, _, got, release = _hang_worker(h, hub)
    publisher = h.client(hub, "pub")
    handle = publisher.pub("job")
    assert got.wait(WAIT)
    closing = threading.Event()
    real_shutdown = worker._pool.shutdown

    def shutdown(timeout):
        closing.set()
        return real_shutdown(timeout)

    worker._pool.shutdown = shutdown
    closer = threading.Thread(target=worker.close)
    closer.start()
    assert closing.wait(WAIT)
    assert closer.is_alive() and not handle.done()
    release.set()
    closer.join(WAIT)
    assert not closer.is_alive()
    assert handle.get_result(timeout=WAIT) == "finished"


def test_client_close_gives_up_on_a_stuck_handler_after_close_timeout(h):
    """close() returns after close_timeout even if a handler never finishes."""
    hub = h.hub()
    worker, started, got, release = _hang_worker(h, hub, close_timeout=0.5)
    publisher = h.client(hub, "pub")
    handle = publisher.pub("job")
    assert got.wait(WAIT)
    t0 = time.monotonic()
    worker.close()
    assert 0.5 <= time.monotonic() - t0 < 0.5 + 1.0 + SLACK
    assert started[0].cancelled  # told to stop: its result would be dropped
    assert isinstance(handle.exception(timeout=WAIT), WorkerLost)
    release.set()


def test_process_that_forgets_close_exits(h):
    """A script that never calls close() (with a handler still running) exits."""
    hub = h.hub()
    script = textwrap.dedent(
        f"""
        import threading
        from taskhub_sync import Client
        url = {hub.url!r}
        worker = Client(url, name="work", key={key_of("work")!r})
        worker.sub("echo", lambda t: t.get_payload())
        worker.sub("job", lambda t: (t.start(), threading.Event().wait()))
        publisher = Client(url, name="pub", key={key_of("pub")!r})
        assert publisher.pub("echo", 7).get_result(timeout=5) == 7
        publisher.pub("job")  # left pending, its handler blocked forever
        print("DONE", flush=True)
        """
    )
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=15
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "DONE"
    assert time.monotonic() - t0 < 10.0


# ----------------------------------------------------------------- time


def test_library_never_reads_the_wall_clock():
    """No module of the package calls time.time(): every timeout is monotonic."""
    package = pathlib.Path(taskhub_sync.__file__).parent
    offenders = [
        f"{path.name}:{n}"
        for path in sorted(package.glob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if "time.time(" in line or "from time import time" in line
    ]
    assert offenders == []


@pytest.mark.parametrize("jump", [3 * 3600.0, -3 * 3600.0])
def test_wall_clock_jump_changes_nothing(h, monkeypatch, jump):
    """time.time() jumping by hours mid-task: no early timeout, no missed one."""
    hub = h.hub(ping_interval=1.0)
    worker, _, got, release = _hang_worker(h, hub, ping_interval=1.0)
    publisher = h.client(hub, "pub", ping_interval=1.0)
    handle = publisher.pub("job", timeout=3.0)
    assert got.wait(WAIT)
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + jump)
    stuck = publisher.pub("job", timeout=0.5)  # its handler never returns in time
    t0 = time.monotonic()
    assert isinstance(stuck.exception(timeout=WAIT), TaskTimeout)
    assert 0.5 <= time.monotonic() - t0 < 0.5 + SLACK + 0.5
    assert not handle.done()
    release.set()
    assert handle.get_result(timeout=WAIT) == "finished"
    assert publisher.connected and worker.connected


# ----------------------------------------------------------------- load, slow consumers


def _flood(publisher, topic, size, count, stop):
    handles = []
    for _ in range(count):
        if stop.is_set():
            break
        try:
            handles.append(publisher.pub(topic, "x" * size))
        except ConnectionLost:
            break
    return handles


def test_slow_consumer_is_dropped_and_others_keep_working(h):
    """A worker that never reads is dropped within a bounded time; round trips of
    other clients stay fast during and after."""
    hub = h.hub(ping_interval=1.0, task_start_timeout=5.0)
    h.echo_worker(hub)
    bystander = h.client(hub, "spare")
    flooder = h.client(hub, "pub")
    slow = h.ws(hub, "other", concurrency=1000, rcvbuf=4096)
    slow.send('{"type":"sub","id":1,"pattern":"flood"}')
    assert recv_json(slow, "reply") == {"type": "reply", "id": 1}
    stop = threading.Event()
    handles: list = []
    with LogWatcher() as logs:
        t0 = time.monotonic()
        h.thread(lambda: handles.extend(_flood(flooder, "flood", 200_000, 80, stop)), stop.set)
        worst = 0.0
        while not logs.messages("(other) dropped"):
            worst = max(worst, roundtrip(bystander, budget=1.0))
            assert time.monotonic() - t0 < 2 * 1.0 + 3.0, "slow consumer not dropped"
        dropped_after = time.monotonic() - t0
        stop.set()
        for _ in range(5):
            worst = max(worst, roundtrip(bystander, budget=1.0))
            roundtrip(flooder, budget=2.0)
        assert logs.messages("(other) dropped", "slow consumer", level=logging.WARNING)
    assert dropped_after < 2 * 1.0 + 3.0
    assert worst < 1.0
    wait_until(lambda: len(handles) > 0 and all(x.done() for x in handles), WAIT * 2)


def test_slow_consumer_flooded_past_the_bound_is_dropped_before_the_heartbeat(h):
    """Flooded with more than the hub will hold for it (30 MB to a reader of none), a
    slow consumer is dropped (WARNING) well before its write timeout; a bystander
    keeps working."""
    hub = h.hub(ping_interval=WAIT, task_start_timeout=WAIT, max_queued_messages=5)
    h.echo_worker(hub)
    bystander = h.client(hub, "spare")
    flooders = [h.client(hub, "pub") for _ in range(3)]
    slow = h.ws(hub, "other", concurrency=1000, rcvbuf=4096)
    slow.send('{"type":"sub","id":1,"pattern":"flood"}')
    assert recv_json(slow, "reply") == {"type": "reply", "id": 1}
    stop = threading.Event()
    with LogWatcher() as logs:
        t0 = time.monotonic()
        for flooder in flooders:
            h.thread(lambda f=flooder: _flood(f, "flood", 100_000, 100, stop), stop.set)
        logs.wait_for("(other) dropped", "slow consumer", timeout=WAIT)
        assert time.monotonic() - t0 < WAIT - 1.0  # before the write timeout
        assert logs.messages("(other) dropped", "slow consumer", level=logging.WARNING)
        stop.set()
    roundtrip(bystander)
    for flooder in flooders:
        roundtrip(flooder)


def test_slow_consumer_does_not_stall_the_publisher_feeding_it(h):
    """A publisher feeding a slow consumer still gets round trips to others at once."""
    hub = h.hub(ping_interval=2.0, task_start_timeout=WAIT)
    h.echo_worker(hub)
    flooder = h.client(hub, "pub")
    slow = h.ws(hub, "other", concurrency=1000, rcvbuf=4096)
    slow.send('{"type":"sub","id":1,"pattern":"flood"}')
    assert recv_json(slow, "reply") == {"type": "reply", "id": 1}
    t0 = time.monotonic()
    handles = [flooder.pub("flood", "x" * 200_000) for _ in range(40)]  # ~8 MB: 0.1 s
    roundtrip(flooder, budget=WAIT)
    elapsed = time.monotonic() - t0
    assert elapsed < 1.5, f"publishing took {elapsed:.2f} s behind the slow consumer"
    assert handles


def test_oversized_payload_fails_at_publisher_and_connection_stays(h):
    """A payload over max_message_size: PayloadTooLarge from the handle at once; the
    hub never sees it; the connection keeps working."""
    hub = h.hub(max_message_size=4096)
    h.echo_worker(hub)
    publisher = h.client(hub, "pub")
    handle = publisher.pub("echo", "x" * 5000)
    assert handle.done()
    assert isinstance(handle.exception(timeout=0), PayloadTooLarge)
    assert hub.pending_tasks() == 0
    roundtrip(publisher)
    assert publisher.connected


def test_oversized_result_fails_the_task_and_connection_stays(h):
    """A result over max_message_size: the task fails with PayloadTooLarge; both
    connections stay up."""
    hub = h.hub(max_message_size=4096)
    worker = h.echo_worker(hub)
    worker.sub("big", lambda t: "y" * 5000)
    publisher = h.client(hub, "pub")
    error = publisher.pub("big").exception(timeout=WAIT)
    assert isinstance(error, PayloadTooLarge), error
    roundtrip(publisher)
    assert worker.connected and hub.connection_count() == 2


def test_oversized_update_raises_in_the_handler_and_connection_stays(h):
    """task.update() over max_message_size raises PayloadTooLarge in the handler."""
    hub = h.hub(max_message_size=4096)
    worker = h.echo_worker(hub)

    def handler(task):
        try:
            task.update("z" * 5000)
        except PayloadTooLarge:
            task.update("small")
            return "caught"
        return "sent"

    worker.sub("upd", handler)
    publisher = h.client(hub, "pub")
    handle = publisher.pub("upd")
    assert handle.get_result(timeout=WAIT) == "caught"
    assert handle.updates == ["small"]
    roundtrip(publisher)


def test_busy_instances_give_overloaded_after_the_start_window_never_none(h):
    """Every instance busy: tasks fail with Overloaded after the start window."""
    window = 0.3
    hub = h.hub(task_start_timeout=window)
    _, _, got, release = _hang_worker(h, hub, max_workers=1)
    publisher = h.client(hub, "pub")
    first = publisher.pub("job")
    assert got.wait(WAIT)
    t0 = time.monotonic()
    queued = [publisher.pub("job") for _ in range(5)]
    errors = [q.exception(timeout=WAIT) for q in queued]
    elapsed = time.monotonic() - t0
    assert all(isinstance(e, Overloaded) and isinstance(e, NoSubscribers) for e in errors)
    assert all(q.results["work"].status == "busy" for q in queued)
    assert window <= elapsed < window + SLACK
    release.set()
    assert first.get_result(timeout=WAIT) == "finished"


def test_tasks_queue_for_a_free_instance_within_the_start_window(h):
    """More tasks than slots: they wait for a free instance and all get results."""
    hub = h.hub(task_start_timeout=WAIT)
    running = []
    peak = []
    lock = threading.Lock()

    def handler(task):
        with lock:
            running.append(task.id)
            peak.append(len(running))
        try:
            return task.get_payload()
        finally:
            with lock:
                running.remove(task.id)

    worker = h.client(hub, "work", max_workers=2)
    worker.sub("job", handler)
    publisher = h.client(hub, "pub")
    handles = [publisher.pub("job", i) for i in range(30)]
    assert [x.get_result(timeout=WAIT) for x in handles] == list(range(30))
    assert max(peak) <= 2


def test_task_that_waited_for_a_slot_gets_a_whole_start_window(h):
    """A task handed out late in its window still has task_start_timeout to be started:
    its handler's start() after the publish-time window counts, and so does its result."""
    window = 0.6
    hub = h.hub(task_start_timeout=window)
    release_first = threading.Event()
    second_delivered: list[float] = []

    def handler(task):
        if task.get_payload() == 1:
            task.start()
            release_first.wait(WAIT)
        else:
            second_delivered.append(time.monotonic())
            # Start only once the window counted from publish is over (the thing under
            # test is the clock, so this waits for time to pass, not for a thread).
            time.sleep(max(0.0, published + window * 1.2 - time.monotonic()))
            task.start()
        return task.get_payload()

    worker = h.client(hub, "work", max_workers=1)
    worker.sub("job", handler)
    publisher = h.client(hub, "pub")
    published = time.monotonic()
    first, second = publisher.pub("job", 1), publisher.pub("job", 2)
    threading.Event().wait(window * 0.5)  # let the second wait for the slot a while
    release_first.set()
    assert first.get_result(timeout=WAIT) == 1
    assert second.get_result(timeout=WAIT) == 2
    assert second.results["work"].status == "ok"
    assert second_delivered[0] - published >= window * 0.5


def test_max_pending_gives_limit_exceeded(h):
    """Past max_pending tasks on one connection pub() fails with LimitExceeded."""
    hub = h.hub(max_pending=2)
    _, _, got, release = _hang_worker(h, hub)
    publisher = h.client(hub, "pub")
    pending = [publisher.pub("job"), publisher.pub("job")]
    over = publisher.pub("job")
    assert isinstance(over.exception(timeout=WAIT), LimitExceeded)
    release.set()
    assert [x.get_result(timeout=WAIT) for x in pending] == ["finished", "finished"]
    release2 = publisher.pub("job")
    assert release2.get_result(timeout=WAIT) == "finished"


def test_max_subscriptions_gives_limit_exceeded(h):
    """Past max_subscriptions on one connection sub() raises LimitExceeded."""
    hub = h.hub(max_subscriptions=3)
    worker = h.client(hub, "work")
    for topic in ("a", "b", "c:*"):
        worker.sub(topic, lambda t: None)
    worker.sub("a", lambda t: 1)  # the same pattern again is no new subscription
    with pytest.raises(LimitExceeded):
        worker.sub("d", lambda t: None)
    worker.unsub("b")
    worker.sub("d", lambda t: None)
    assert worker.connected
