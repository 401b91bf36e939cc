"""Regressions for what an adversarial review broke: each test is one finding."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
from faults import WAIT, LogWatcher, harness, hello_text, recv_json, wait_until

from taskhub_sync import (
    ConcurrencyError,
    ConnectionLost,
    InvalidState,
    PayloadTooLarge,
    ProtocolError,
    Server,
    TaskFailed,
)
from taskhub_sync import protocol as p
from taskhub_sync._frames import MAX_FRAGMENTS, OP_CONT, OP_TEXT, FrameError, FrameReader
from taskhub_sync.router import Credential, Outgoing, Router


@pytest.fixture
def h():
    with harness() as hh:
        yield hh


def test_far_timeouts_are_refused_not_overflowed(h):
    """A timeout past a year is a clear error everywhere; it never reaches the timer."""
    with pytest.raises(ValueError, match="task_finish_timeout"):
        Server(port=0, task_finish_timeout=1e10)
    with pytest.raises(ValueError, match="ping_interval"):
        Server(port=0, ping_interval=float("inf"))
    with pytest.raises(ProtocolError, match="seconds"):
        p.decode('{"type": "pub", "task": "s.1", "topic": "a", "timeout": 1e10}')
    hub = h.hub()
    publisher = h.client(hub, "pub")
    with pytest.raises(ValueError, match="timeout"):
        publisher.pub("job", timeout=1e10)


@pytest.mark.parametrize(
    "setting",
    [
        "max_queued_messages",
        "max_pending",
        "max_subscriptions",
        "max_handshakes",
        "auth_failure_limit",
        "max_message_size",
    ],
)
@pytest.mark.parametrize("value", [0, -1, None, 2.5, True])
def test_server_refuses_limits_that_could_never_work(setting, value):
    """A count setting that is not an integer >= 1 is a ValueError naming it, at once
    (max_queued_messages=0 dropped every connection at its first message)."""
    with pytest.raises(ValueError, match=setting):
        Server(port=0, **{setting: value})


def test_timer_still_works_with_the_longest_timeout_pending(h):
    """A task with a year-long timeout pending; another task's start window still closes."""
    hub = h.hub(task_start_timeout=0.2)
    started = threading.Event()
    release = threading.Event()
    h.thread(lambda: None, stop=release.set)
    worker = h.client(hub, "work", max_workers=2)
    worker.sub("long", lambda t: (t.start(), started.set(), release.wait(WAIT)) and None)
    worker.sub("silent", lambda t: t.wait_cancelled(WAIT) and None)
    publisher = h.client(hub, "pub")
    publisher.pub("long", timeout=365 * 24 * 3600.0)
    assert started.wait(WAIT)
    assert publisher.pub("silent").get_result(timeout=WAIT) is None  # "seen" at 0.2 s


def test_deeply_nested_values_fail_their_task_not_the_connection(h):
    """A result nested past MAX_DEPTH fails that task with TaskFailed; the worker stays."""
    hub = h.hub()
    deep: list = []
    for _ in range(p.MAX_DEPTH + 50):
        deep = [deep]
    worker = h.client(hub, "work")
    worker.sub("deep", lambda t: deep)
    worker.sub("echo", lambda t: t.payload)
    publisher = h.client(hub, "pub")
    with pytest.raises(TaskFailed, match="nested"):
        publisher.pub("deep").get_result(timeout=WAIT)
    assert publisher.pub("echo", 7).get_result(timeout=WAIT) == 7
    with pytest.raises(ValueError, match="nested"):
        publisher.pub("echo", deep)


def _nested(depth: int) -> list:
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


@pytest.mark.parametrize("extra", [0, -1, -2, -3])
def test_values_at_the_depth_limit_travel_in_every_message(h, extra):
    """A payload, update and result nested exactly MAX_DEPTH deep (or a little less)
    pass every message they travel in: pub, task, update and done."""
    hub = h.hub()
    deep = _nested(p.MAX_DEPTH + extra)

    def handler(task):
        task.update(task.payload)
        return task.payload

    worker = h.client(hub, "work")
    worker.sub("deep", handler)
    publisher = h.client(hub, "pub")
    handle = publisher.pub("deep", deep)
    assert handle.get_result(timeout=WAIT) == deep
    assert handle.updates == [deep]


def test_values_past_the_depth_limit_fail_at_the_sender(h):
    """One level past MAX_DEPTH: pub() and update() raise at once, and a result fails
    its task; no connection is closed."""
    hub = h.hub()
    deeper = _nested(p.MAX_DEPTH + 1)
    raised: list = []

    def updater(task):
        try:
            task.update(deeper)
        except ValueError as exc:
            raised.append(exc)
        return "survived"

    worker = h.client(hub, "work")
    worker.sub("update", updater)
    worker.sub("result", lambda task: deeper)
    publisher = h.client(hub, "pub")
    with pytest.raises(ValueError, match="nested"):
        publisher.pub("update", deeper)
    assert publisher.pub("update").get_result(timeout=WAIT) == "survived"
    assert raised and "nested" in str(raised[0])
    with pytest.raises(TaskFailed, match="nested"):
        publisher.pub("result").get_result(timeout=WAIT)
    assert publisher.pub("update").get_result(timeout=WAIT) == "survived"
    assert worker.connected and publisher.connected


def test_unreadable_message_from_the_hub_starts_a_new_session(h, monkeypatch):
    """A hub message the client cannot read fails the pending handle with
    ConnectionLost; the client reconnects with a new session (resuming would replay
    the same message) and works on."""
    from taskhub_sync import _server_conn

    encode = _server_conn._encode_safely
    garbled = threading.Event()

    def garble_first_update(message):
        if isinstance(message, p.Update) and not garbled.is_set():
            garbled.set()
            return '{"type": "no-such-type"}'
        return encode(message)

    monkeypatch.setattr(_server_conn, "_encode_safely", garble_first_update)
    hub = h.hub()
    release = threading.Event()
    h.thread(lambda: None, stop=release.set)

    def progress(task):
        task.start()
        task.update(1)
        release.wait(WAIT)
        return "late"

    worker = h.client(hub, "work")
    worker.sub("progress", progress)
    worker.sub("echo", lambda task: task.payload)
    publisher = h.client(hub, "pub")
    old_session = publisher.session
    handle = publisher.pub("progress")
    with pytest.raises(ConnectionLost, match="cannot read"):
        handle.get_result(timeout=WAIT)
    assert garbled.is_set()
    release.set()
    assert publisher.pub("echo", 5).get_result(timeout=WAIT) == 5
    assert publisher.session != old_session


def test_update_racing_the_answer_is_refused_not_sent_after_it(h):
    """An update from a helper thread that passed update()'s early check while the
    handler returned: InvalidState, never an update after the result (which the hub
    would take for a violation, dropping the worker and its other tasks)."""
    hub = h.hub()
    result_seen = threading.Event()
    in_encode = threading.Event()
    release = threading.Event()
    h.thread(lambda: None, stop=release.set)
    refused: list = []

    class SlowToEncode(dict):
        def items(self):  # json calls it after update()'s check, before the send
            in_encode.set()
            result_seen.wait(WAIT)
            return super().items()

    def racy(task):
        task.start()

        def helper():
            try:
                task.update(SlowToEncode(progress=99))
            except InvalidState as exc:
                refused.append(exc)

        threading.Thread(target=helper, daemon=True).start()
        assert in_encode.wait(WAIT)
        return "racy-ok"

    def long(task):
        task.start()
        release.wait(WAIT)
        return "long-ok"

    worker = h.client(hub, "work", max_workers=4)
    worker.sub("racy", racy)
    worker.sub("long", long)
    publisher = h.client(hub, "pub")
    long_handle = publisher.pub("long")
    racy_handle = publisher.pub("racy")
    racy_handle.add_done_callback(lambda _: result_seen.set())
    assert racy_handle.get_result(timeout=WAIT) == "racy-ok"
    wait_until(lambda: refused, what="the late update refused")
    release.set()
    assert long_handle.get_result(timeout=WAIT) == "long-ok"
    assert racy_handle.updates == []


def test_slow_update_callback_does_not_hold_back_a_deferred_claim(h):
    """A client that publishes and serves: its handler calls start() at once, then an
    on("update") callback of its own publication works longer than the start window
    on the reader thread. The claim still reaches the hub; the result is not lost."""
    hub = h.hub(task_start_timeout=0.1)
    job_started = threading.Event()
    finish = threading.Event()
    h.thread(lambda: None, stop=finish.set)

    def job(task):
        task.start()  # first thing, as documented
        job_started.set()
        finish.wait(WAIT)
        return "real result"

    def feed(task):
        task.start()
        assert job_started.wait(WAIT)
        task.update("progress")  # reaches the mixed client while job's claim waits
        return "fed"

    mixed = h.client(hub, "work")
    mixed.sub("job", job)
    h.client(hub, "other").sub("feed", feed)
    publisher = h.client(hub, "pub")
    feed_handle = mixed.pub("feed", timeout=WAIT)
    # Work in the callback: three start windows long (a duration, not a sync point).
    feed_handle.on("update", lambda data: threading.Event().wait(0.3))
    job_handle = publisher.pub("job", timeout=WAIT)
    assert feed_handle.get_result(timeout=WAIT) == "fed"
    finish.set()
    assert job_handle.get_result(timeout=WAIT) == "real result"
    assert job_handle.results["work"].status == "ok"


def test_message_queued_while_the_drain_thread_exits_is_written(h):
    """Hub: a message queued just as a connection's drain thread decides to exit (its
    flush() turned away by the drainer's send lock) is written by the drainer on its
    way out, not stranded until some later write. The interleaving is forced by
    wrapping that connection's send lock."""
    # No heartbeat within the test: a ping would write the stranded message too.
    hub = h.hub(task_start_timeout=2.0, max_message_size=32 << 20, ping_interval=60.0)
    worker = h.client(hub, "work", max_workers=4, ping_interval=60.0)
    ws = h.ws(hub, None)
    ws.send(hello_text("pub"))
    session = json.loads(ws.recv())["session"]
    conn = hub._conns[session]
    second_id = f"{session}.2"
    armed, exiting, turned_away = threading.Event(), threading.Event(), threading.Event()
    h.thread(lambda: None, stop=lambda: (exiting.set(), turned_away.set()))

    class RaceLock:
        def __init__(self, inner):
            self._lock = inner

        def acquire(self, blocking=True, timeout=-1):
            ok = self._lock.acquire(blocking, timeout)
            queued = any(getattr(m, "task", None) == second_id for m in conn.outbox)
            if not ok and exiting.is_set() and queued:
                turned_away.set()  # the second done is queued and its flush gave up
            return ok

        def release(self):
            drain = threading.current_thread().name.startswith("taskhub-drain")
            if drain and conn.drainer is None and armed.is_set() and not exiting.is_set():
                exiting.set()  # the drainer has decided to exit...
                turned_away.wait(WAIT)  # ...and a done is queued meanwhile
            self._lock.release()

        def __enter__(self):
            self.acquire()
            return self

        def __exit__(self, *exc):
            self.release()

    conn.send_lock = RaceLock(conn.send_lock)
    big = "z" * (12 << 20)  # more than the socket takes at once: a drainer starts
    worker.sub("flood", lambda task: big)

    def second(task):
        task.start()
        exiting.wait(WAIT)  # answer while the drainer is on its way out
        return "second result"

    worker.sub("second", second)
    ws.send(json.dumps({"type": "pub", "task": f"{session}.1", "topic": "flood"}))
    ws.send(json.dumps({"type": "pub", "task": second_id, "topic": "second"}))
    wait_until(lambda: hub._router.task_state(f"{session}.1") is None, what="flood done")
    armed.set()
    got = [recv_json(ws, "done")["task"] for _ in range(2)]  # reading lets it drain
    assert got == [f"{session}.1", second_id]


def test_claims_stay_deferred_unless_a_callback_is_about_to_run(h):
    """A client that publishes and serves: a done with no callback to run leaves its
    running tasks' deferred claims alone (a fast handler still costs no start
    message); one with a callback sends them first."""
    hub = h.hub(task_start_timeout=60.0)
    h.echo_worker(hub, "feed", name="other")
    mixed = h.client(hub, "work", max_workers=4)
    sent: list[str] = []
    send_task_text = mixed._send_task_text
    mixed._send_task_text = lambda task, text: (
        sent.append(p.decode(text).TYPE),
        send_task_text(task, text),
    )
    started = threading.Event()
    release = threading.Event()
    h.thread(lambda: None, stop=release.set)

    def job(task):
        task.start()
        started.set()
        release.wait(WAIT)
        return "ok"

    mixed.sub("job", job)
    mixed._claim_delay = 60.0  # the claim waits for the test, not for the clock
    publisher = h.client(hub, "pub")
    handle = publisher.pub("job")
    assert started.wait(WAIT)
    assert mixed.pub("feed", 1).get_result(timeout=WAIT) == 1  # no callback: no claim
    assert sent == []
    called = threading.Event()
    mixed.pub("feed", 2).add_done_callback(lambda _: called.set())
    assert called.wait(WAIT)
    assert sent == ["start"]  # sent before the callback ran
    release.set()
    assert handle.get_result(timeout=WAIT) == "ok"
    assert sent == ["start", "result"]


def test_handler_raising_system_exit_still_answers_and_keeps_serving(h):
    """SystemExit in a handler fails that task; with max_workers=1 the next task runs."""
    hub = h.hub()

    def handler(task):
        if task.payload == "exit":
            raise SystemExit(3)
        return task.payload

    worker = h.client(hub, "work", max_workers=1)
    worker.sub("job", handler)
    publisher = h.client(hub, "pub")
    with pytest.raises(TaskFailed) as info:
        publisher.pub("job", "exit").get_result(timeout=WAIT)
    assert info.value.remote_type == "SystemExit"
    assert publisher.pub("job", "next").get_result(timeout=WAIT) == "next"


def test_stale_handler_after_reconnect_does_not_block_new_tasks(h):
    """A handler still busy with a task of the dropped connection doesn't make the new
    connection's task queue past its start window (a None result)."""
    hub = h.hub(task_start_timeout=1.0)
    busy = threading.Event()
    release = threading.Event()
    h.thread(lambda: None, stop=release.set)

    def handler(task):
        if task.payload == "stuck":
            busy.set()
            release.wait(WAIT)  # ignores cancellation on purpose
        return task.payload

    worker = h.client(hub, "work", max_workers=1, reconnect_delay=(0.05, 0.2))
    worker.sub("job", handler)
    publisher = h.client(hub, "pub")
    publisher.pub("job", "stuck")
    assert busy.wait(WAIT)
    with LogWatcher() as logs:
        worker._ws.sock.shutdown(socket.SHUT_RDWR)
        logs.wait_for("reconnected to")
    worker.sub("barrier", lambda t: None)  # a round trip: the re-subscription is in
    assert publisher.pub("job", "fresh").get_result(timeout=WAIT) == "fresh"


def test_resume_grace_is_enforced_on_time(h):
    """A publisher gone for good: its worker is told after resume_grace, not at the next
    unrelated deadline."""
    hub = h.hub(resume_grace=0.3, task_finish_timeout=60.0)
    told = threading.Event()
    reasons = []

    def handler(task):
        task.start()
        task.wait_cancelled(WAIT)
        reasons.append(task.cancel_reason)
        told.set()

    h.client(hub, "work").sub("job", handler)
    publisher = h.client(hub, "pub", reconnect=False)
    publisher.pub("job", timeout=60.0)
    wait_until(lambda: hub.pending_tasks() == 1, what="the task to be routed")
    publisher._ws.sock.shutdown(socket.SHUT_RDWR)
    assert told.wait(3.0)
    assert reasons == ["publisher gone"]


def test_last_result_written_into_a_dying_link_is_replayed(h):
    """The session is kept for its recent results even with nothing pending: the one
    result that went out on the dead link arrives after the resume."""
    hub = h.hub(resume_grace=WAIT)
    proxy = h.proxy(hub)
    got = threading.Event()
    release = threading.Event()
    h.thread(lambda: None, stop=release.set)
    worker = h.client(hub, "work")
    worker.sub("job", lambda t: (t.start(), got.set(), release.wait(WAIT)) and "finished")
    with LogWatcher() as logs:
        publisher = h.client(proxy.url, "pub", reconnect_delay=(0.05, 0.2))
        handle = publisher.pub("job")
        assert got.wait(WAIT)
        proxy.freeze()  # the link dies silently
        release.set()  # the result goes into the dead link
        wait_until(lambda: hub.pending_tasks() == 0, what="the job's Done to be sent")
        publisher._ws.sock.shutdown(socket.SHUT_RDWR)
        logs.wait_for("reconnected to", "(resumed)")
        assert handle.get_result(timeout=WAIT) == "finished"


def test_update_after_the_handler_returned_is_refused(h):
    """A leftover thread calling task.update() after the handler returned gets
    InvalidState; nothing reaches the hub, so the worker's connection stays up."""
    hub = h.hub()
    kept = []
    worker = h.client(hub, "work")
    worker.sub("job", lambda t: kept.append(t) or "done")
    publisher = h.client(hub, "pub")
    assert publisher.pub("job").get_result(timeout=WAIT) == "done"
    with pytest.raises(InvalidState):
        kept[0].update("late")
    assert publisher.pub("job").get_result(timeout=WAIT) == "done"


def test_update_size_counts_the_whole_message(h):
    """An update that fits max_message_size only without its envelope is refused."""
    hub = h.hub(max_message_size=2048)
    errors = []

    def handler(task):
        try:
            task.update("x" * 2040)
        except PayloadTooLarge as exc:
            errors.append(exc)
        return "ok"

    h.client(hub, "work").sub("job", handler)
    assert h.client(hub, "pub").pub("job").get_result(timeout=WAIT) == "ok"
    assert len(errors) == 1


def test_future_result_from_a_callback_raises_instead_of_deadlocking(h):
    """Future.result() on a pending handle from a callback: ConcurrencyError."""
    hub = h.hub()
    release = threading.Event()
    h.thread(lambda: None, stop=release.set)
    worker = h.client(hub, "work")
    worker.sub("slow", lambda t: (t.start(), release.wait(WAIT)) and "slow")
    worker.sub("fast", lambda t: "fast")
    publisher = h.client(hub, "pub")
    pending = publisher.pub("slow")
    seen = []
    done = threading.Event()

    def callback(handle):
        try:
            pending.result(timeout=1)
        except ConcurrencyError as exc:
            seen.append(exc)
        done.set()

    publisher.pub("fast").on("done", callback)
    assert done.wait(WAIT)
    assert len(seen) == 1
    release.set()
    assert pending.get_result(timeout=WAIT) == "slow"


def test_settled_tasks_leave_the_waiting_queue():
    """Tasks answered "busy" don't stay queued (payload and all) for a slot."""
    cred = Credential("svc", sub_permissions=("*",), pub_permissions=("*",), max_instances=4)
    router = Router(task_start_timeout=1.0, task_finish_timeout=10.0)
    router.connect("w", cred, 1)
    router.receive("w", p.Subscribe(1, "job"), 0.0)
    router.connect("pub", cred, 1)
    for n in range(50):
        router.receive("pub", p.Publish(f"t{n}", "job", "x" * 1000), 0.0)
    assert len(router._services["svc"].waiting) == 49
    router.expire(1.0)
    assert len(router._services["svc"].waiting) == 0


def test_worker_cannot_fail_a_task_with_a_hub_error_code():
    """fail.code is limited to what a worker's library may say (payload_too_large)."""
    cred = Credential("svc", sub_permissions=("*",), pub_permissions=("*",), max_instances=4)
    router = Router(task_start_timeout=1.0, task_finish_timeout=10.0)
    router.connect("w", cred, 1)
    router.receive("w", p.Subscribe(1, "job"), 0.0)
    router.connect("pub", cred, 1)
    router.receive("pub", p.Publish("t1", "job"), 0.0)
    with pytest.raises(ProtocolError, match="may not fail"):
        router.receive("w", p.Fail("t1", "X", "spoof", code="permission_denied"), 0.1)
    out = router.receive("w", p.Fail("t1", "X", "too big", code="payload_too_large"), 0.1)
    assert out == [
        Outgoing(
            "pub",
            p.Done(
                "t1",
                {
                    "svc": p.Outcome(
                        p.FAILED, error=p.ErrorInfo("payload_too_large", "too big", service="svc")
                    )
                },
                error=p.ErrorInfo("payload_too_large", "too big", service="svc"),
            ),
        )
    ]


def test_empty_fragments_are_bounded():
    """Zero-length continuation frames can't grow a message without limit."""
    reader = FrameReader(1 << 20)
    mask = b"\x00\x00\x00\x00"
    first = bytes((OP_TEXT, 0x80)) + mask  # not final, empty, masked
    empty = bytes((OP_CONT, 0x80)) + mask
    reader.feed(first)
    with pytest.raises(FrameError) as info:
        reader.feed(empty * MAX_FRAGMENTS)
    assert info.value.code == 1009


def test_pub_from_a_callback_while_reconnecting_fails_at_once(h):
    """A callback's pub() while the connection is down raises at once instead of
    blocking the reader (the very thread that reconnects) for open_timeout."""
    hub = h.hub()
    release = threading.Event()
    h.thread(lambda: None, stop=release.set)
    worker = h.client(hub, "work")
    worker.sub("job", lambda t: (t.start(), release.wait(WAIT)) and "ok")
    publisher = h.client(hub, "pub", open_timeout=WAIT)
    outcome = []
    done = threading.Event()

    def callback(_):  # runs on the reader thread
        t0 = time.monotonic()
        try:
            publisher.pub("job")
        except ConnectionLost:
            outcome.append(time.monotonic() - t0)
        done.set()

    handle = publisher.pub("job").on("done", callback)
    publisher._connected.clear()  # the state while the client is reconnecting
    try:
        release.set()
        assert done.wait(WAIT)
        assert handle.get_result(timeout=WAIT) == "ok"
        assert len(outcome) == 1 and outcome[0] < 1.0
    finally:
        publisher._connected.set()
