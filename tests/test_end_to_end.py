"""The semantics of issue 2, end to end: a real hub and real clients on loopback."""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from conftest import CREDENTIALS, NO_RECONNECT, WAIT, Recorder, key_of, wait_disconnected

from taskhub_sync import (
    AuthenticationError,
    ConcurrencyError,
    InvalidTopic,
    NoSubscribers,
    Overloaded,
    PermissionDenied,
    TaskFailed,
    TaskTimeout,
    WorkerLost,
)

# ----------------------------------------------------------------- authentication


def test_wrong_key_fails_constructor_quickly(hub, make_client):
    """A wrong key raises AuthenticationError from Client(), not a hang."""
    t0 = time.monotonic()
    with pytest.raises(AuthenticationError, match="authentication failed"):
        make_client("mailer", key="not-the-key")
    assert time.monotonic() - t0 < 2.0


def test_unknown_name_fails_constructor_quickly(hub, make_client):
    """An unknown service name raises AuthenticationError from Client()."""
    t0 = time.monotonic()
    with pytest.raises(AuthenticationError, match="authentication failed"):
        make_client("nobody", key=key_of("mailer"))
    assert time.monotonic() - t0 < 2.0


def test_max_instances_refused_with_clear_error(hub, make_client):
    """A connection over max_instances is refused, saying so; a freed slot is reusable."""
    first = make_client("resizer")
    make_client("resizer")
    with pytest.raises(AuthenticationError, match="max_instances=2"):
        make_client("resizer")
    first.close()
    wait_disconnected(hub, first)
    make_client("resizer")  # the slot is free again


def test_max_instances_one(hub, make_client):
    """max_instances=1 refuses a second simultaneous connection."""
    make_client("mailer")
    with pytest.raises(AuthenticationError, match="too many instances of 'mailer'"):
        make_client("mailer")


def test_keys_never_logged(hub, make_client, caplog):
    """Neither a right nor a wrong key appears in any log record, even at DEBUG."""
    caplog.set_level(logging.DEBUG)
    wrong = "wrong-key-that-must-not-leak-9876"
    worker = make_client("geocoder")
    worker.sub("googlemaps:geocode", lambda task: {"lat": 1})
    with pytest.raises(AuthenticationError):
        make_client("mailer", key=wrong)
    with pytest.raises(AuthenticationError):
        make_client("no-such-service", key=wrong)
    mailer = make_client("mailer")
    assert mailer.pub("googlemaps:geocode", "x").get_result(timeout=WAIT) == {"lat": 1}
    mailer.close()
    assert caplog.records, "expected the hub to log something"
    secrets = [wrong] + [cred[0] for cred in CREDENTIALS.values()]
    for record in caplog.records:
        text = record.getMessage() + (record.exc_text or "") + repr(record.__dict__)
        for secret in secrets:
            assert secret not in text, f"key leaked in log record {record!r}"


# ----------------------------------------------------------------- permissions


def test_sub_outside_permissions_denied_at_once(hub, make_client):
    """sub() of a topic outside sub_permissions raises PermissionDenied immediately."""
    mailer = make_client("mailer")
    t0 = time.monotonic()
    with pytest.raises(PermissionDenied, match="may not listen"):
        mailer.sub("image:resize", lambda task: None)
    with pytest.raises(PermissionDenied):
        mailer.sub("mail:*", lambda task: None)  # wider than mail:send-bulk
    assert time.monotonic() - t0 < 1.0
    mailer.sub("mail:send-bulk", lambda task: "ok")  # the allowed one still works


def test_pub_outside_permissions_fails_handle(hub, make_client):
    """pub() of a topic outside pub_permissions fails its handle with PermissionDenied."""
    make_client("logger").sub("log:*", lambda task: "logged")
    mailer = make_client("mailer")
    handle = mailer.pub("log:info", "hi")  # mailer may emit log:error, not log:info
    with pytest.raises(PermissionDenied, match="may not publish"):
        handle.get_result(timeout=1.0)
    assert mailer.pub("log:error", "oops").get_result(timeout=WAIT) == "logged"


def test_permission_covers_subtopics(hub, make_client):
    """A 'googlemaps' permission grants googlemaps:geocode, for sub and for pub."""
    geocoder = make_client("geocoder")
    geocoder.sub("googlemaps:geocode", lambda task: [48.85, 2.35])
    geocoder.sub("googlemaps", lambda task: "root")
    mailer = make_client("mailer")
    assert mailer.pub("googlemaps:geocode", "Paris").get_result(timeout=WAIT) == [48.85, 2.35]
    assert mailer.pub("googlemaps", {}).get_result(timeout=WAIT) == "root"
    with pytest.raises(PermissionDenied):
        mailer.pub("googlemapsx", {}).get_result(timeout=WAIT)  # not a sub-topic


def test_star_permission_grants_everything(hub, make_client):
    """'*' lets the auditor listen to every topic and the publisher emit any topic."""
    auditor = make_client("auditor")
    seen = Recorder()

    def audit(task):
        seen(task.topic)
        return task.topic

    auditor.sub("*", audit)
    publisher = make_client("publisher")
    for topic in ("a", "b:c", "deep:er:topic"):
        assert publisher.pub(topic, {}).get_result(timeout=WAIT) == topic
    assert seen.items == ["a", "b:c", "deep:er:topic"]


def test_prefix_subscription(hub, make_client):
    """A 'log:*' subscription gets every topic below log, not log itself."""
    logger_client = make_client("logger")
    logger_client.sub("log:*", lambda task: task.topic)
    publisher = make_client("publisher")
    assert publisher.pub("log:error", {}).get_result(timeout=WAIT) == "log:error"
    assert publisher.pub("log:warn:disk", {}).get_result(timeout=WAIT) == "log:warn:disk"
    with pytest.raises(NoSubscribers):
        publisher.pub("log", {}).get_result(timeout=WAIT)


@pytest.mark.parametrize("topic", ["", "has space", "a::b", "a:", "é", "x" * 201, "a:*:b"])
def test_invalid_topic_on_pub(hub, make_client, topic):
    """pub() of a malformed topic raises InvalidTopic with a clear message."""
    publisher = make_client("publisher")
    with pytest.raises(InvalidTopic, match="topic"):
        publisher.pub(topic)


@pytest.mark.parametrize("pattern", ["", "log:**", "*:log", "log*", "a b"])
def test_invalid_pattern_on_sub(hub, make_client, pattern):
    """sub() of a malformed pattern raises InvalidTopic; the client still works after."""
    logger_client = make_client("logger")
    with pytest.raises(InvalidTopic):
        logger_client.sub(pattern, lambda task: None)
    logger_client.sub("log:x", lambda task: 1)
    assert make_client("publisher").pub("log:x", {}).get_result(timeout=WAIT) == 1


# ----------------------------------------------------------------- routing


def test_fan_out_across_services(hub, make_client):
    """A task goes to every subscribed service; results lists each one."""
    got = {"logger": Recorder(), "auditor": Recorder()}
    make_client("logger").sub("log:*", lambda task: got["logger"](task.payload) or "L")
    make_client("auditor").sub("log:error", lambda task: got["auditor"](task.payload) or "A")
    handle = make_client("publisher").pub("log:error", "disk full")
    assert handle.get_result(timeout=WAIT) in ("L", "A")
    assert got["logger"].items == ["disk full"]
    assert got["auditor"].items == ["disk full"]
    results = handle.results
    assert set(results) == {"logger", "auditor"}
    assert {o.status for o in results.values()} == {"ok"}
    assert results["logger"].result == "L" and results["auditor"].result == "A"


def test_round_robin_across_instances(hub, make_client):
    """Tasks alternate between the two instances of one service."""
    counts: collections.Counter[str] = collections.Counter()
    for label in ("one", "two"):
        make_client("resizer").sub("image:resize", lambda task, label=label: label)
    publisher = make_client("publisher")
    order = [publisher.pub("image:resize", i).get_result(timeout=WAIT) for i in range(10)]
    counts.update(order)
    assert counts == {"one": 5, "two": 5}
    assert all(a != b for a, b in zip(order, order[1:])), order


def test_round_robin_with_concurrent_futures(hub, make_client):
    """Handles work with concurrent.futures.wait() and as_completed()."""
    for label in ("one", "two"):
        make_client("resizer").sub("image:resize", lambda task, label=label: [label, task.payload])
    publisher = make_client("publisher")
    handles = [publisher.pub("image:resize", i) for i in range(8)]
    done, not_done = concurrent.futures.wait(handles, timeout=WAIT)
    assert not not_done
    results = [h.result() for h in concurrent.futures.as_completed(handles, timeout=WAIT)]
    assert sorted(r[1] for r in results) == list(range(8))
    assert collections.Counter(r[0] for r in results) == {"one": 4, "two": 4}


# ----------------------------------------------------------------- start timeout


def test_no_subscriber_fails_quickly(make_hub, make_client):
    """With nobody subscribed, the handle fails with NoSubscribers well under a second."""
    publisher = make_client("publisher", hub=make_hub(task_start_timeout=0.1))
    t0 = time.monotonic()
    with pytest.raises(NoSubscribers, match="no service is subscribed"):
        publisher.pub("nobody:home", {}).get_result(timeout=WAIT)
    assert time.monotonic() - t0 < 1.0


def test_silent_handler_counts_as_seen(make_hub, make_client):
    """A handler that neither starts nor returns in the window: result None, worker cancelled."""
    hub = make_hub(task_start_timeout=0.1)
    cancelled = threading.Event()

    def silent(task):
        if task.wait_cancelled(WAIT):
            cancelled.set()
        return "too late"

    make_client("geocoder", hub=hub).sub("googlemaps:geocode", silent)
    publisher = make_client("publisher", hub=hub)
    t0 = time.monotonic()
    handle = publisher.pub("googlemaps:geocode", "Paris")
    assert handle.get_result(timeout=WAIT) is None
    assert time.monotonic() - t0 < 1.0
    assert handle.results["geocoder"].status == "seen"
    assert cancelled.wait(WAIT), "the worker's task.cancelled never became true"


def test_quick_answer_without_start_is_the_result(hub, make_client):
    """A handler that returns within the window without start() has answered."""
    make_client("geocoder").sub("googlemaps:geocode", lambda task: {"q": task.get_payload()})
    handle = make_client("publisher").pub("googlemaps:geocode", "Rome")
    assert handle.get_result(timeout=WAIT) == {"q": "Rome"}
    assert handle.results["geocoder"].status == "ok"


def test_busy_instances_fail_with_overloaded(make_hub, make_client):
    """When every instance stays busy for the start window, the task fails with Overloaded."""
    hub = make_hub(task_start_timeout=0.1)
    release = threading.Event()
    started = threading.Event()

    def hold(task):
        task.start()
        started.set()
        release.wait(WAIT)
        return "held"

    make_client("geocoder", hub=hub, max_workers=1).sub("googlemaps:geocode", hold)
    publisher = make_client("publisher", hub=hub)
    first = publisher.pub("googlemaps:geocode", {})
    assert started.wait(WAIT)
    t0 = time.monotonic()
    with pytest.raises(Overloaded):
        publisher.pub("googlemaps:geocode", {}).get_result(timeout=WAIT)
    assert time.monotonic() - t0 < 1.0
    release.set()
    assert first.get_result(timeout=WAIT) == "held"


# ----------------------------------------------------------------- finish timeout


def test_per_task_finish_timeout(hub, make_client):
    """pub(timeout=0.3) on a started, stuck handler: TaskTimeout, and the worker is told."""
    cancelled = threading.Event()

    def stuck(task):
        task.start()
        if task.wait_cancelled(WAIT):
            cancelled.set()

    make_client("geocoder").sub("googlemaps:geocode", stuck)
    publisher = make_client("publisher")
    t0 = time.monotonic()
    handle = publisher.pub("googlemaps:geocode", {}, timeout=0.3)
    with pytest.raises(TaskTimeout, match=r"'geocoder' .* finish timeout \(0\.3 s\)"):
        handle.get_result(timeout=WAIT)
    elapsed = time.monotonic() - t0
    assert 0.25 <= elapsed < 2.0
    assert handle.results["geocoder"].status == "timeout"
    assert cancelled.wait(WAIT)


def test_hub_default_finish_timeout(make_hub, make_client):
    """Without a per-task timeout the hub's task_finish_timeout applies."""
    hub = make_hub(task_finish_timeout=0.3)
    cancelled = threading.Event()

    def stuck(task):
        task.start()
        if task.wait_cancelled(WAIT):
            cancelled.set()

    make_client("geocoder", hub=hub).sub("googlemaps:geocode", stuck)
    t0 = time.monotonic()
    with pytest.raises(TaskTimeout):
        make_client("publisher", hub=hub).pub("googlemaps:geocode", {}).get_result(timeout=WAIT)
    assert time.monotonic() - t0 < 2.0
    assert cancelled.wait(WAIT)


# ----------------------------------------------------------------- results


def test_first_success_wins_over_failure(hub, make_client):
    """One service fails, another succeeds: the result is the success; results has both."""

    def fail(task):
        raise RuntimeError("logger is broken")

    make_client("logger").sub("log:error", fail)
    make_client("auditor").sub("log:error", lambda task: "audited")
    handle = make_client("publisher").pub("log:error", "x")
    assert handle.get_result(timeout=WAIT) == "audited"
    assert handle.results["logger"].status == "failed"
    assert handle.results["logger"].error.remote_type == "RuntimeError"
    assert handle.results["auditor"].status == "ok"


def test_first_successful_result_is_the_result(hub, make_client, monkeypatch):
    """Of two successful services, the one whose result reached the hub first wins."""
    first_routed = threading.Event()
    receive = hub._router.receive

    def spy(conn_id, message, now):  # test seam: the router has taken logger's result
        out = receive(conn_id, message, now)
        if conn_id.startswith("logger#") and type(message).__name__ == "Result":
            first_routed.set()
        return out

    monkeypatch.setattr(hub._router, "receive", spy)

    pending_when_first_won = []

    def late(task):
        task.start()
        assert first_routed.wait(WAIT)
        pending_when_first_won.append(handle.done())
        return "second"

    make_client("logger").sub("log:error", lambda task: "first")
    make_client("auditor").sub("log:error", late)
    handle = make_client("publisher").pub("log:error", {})
    assert handle.get_result(timeout=WAIT) == "first"
    assert handle.results["auditor"].result == "second"
    assert pending_when_first_won == [False]  # done only once every recipient finished


def test_handler_exception_becomes_task_failed(hub, make_client):
    """A handler exception reaches the publisher as TaskFailed; the worker keeps serving."""
    calls = []

    def geocode(task):
        calls.append(task.payload)
        if task.payload == "Atlantis":
            raise LookupError("no such place: Atlantis")
        return [1, 2]

    make_client("geocoder").sub("googlemaps:geocode", geocode)
    publisher = make_client("publisher")
    handle = publisher.pub("googlemaps:geocode", "Atlantis")
    with pytest.raises(TaskFailed) as info:
        handle.get_result(timeout=WAIT)
    err = info.value
    assert err.service == "geocoder"
    assert err.remote_type == "LookupError"
    assert err.remote_message == "no such place: Atlantis"
    assert err.task_id == handle.task_id and err.topic == "googlemaps:geocode"
    assert publisher.pub("googlemaps:geocode", "Paris").get_result(timeout=WAIT) == [1, 2]
    assert calls == ["Atlantis", "Paris"]


def test_get_result_default_never_raises(hub, make_client):
    """get_result(default=...) returns the default on a task error and on a wait timeout."""
    release = threading.Event()

    def slow(task):
        task.start()
        release.wait(WAIT)
        return "late"

    make_client("geocoder").sub("googlemaps:geocode", slow)
    publisher = make_client("publisher")
    assert publisher.pub("nobody", {}).get_result(timeout=WAIT, default="d") == "d"
    handle = publisher.pub("googlemaps:geocode", {})
    assert handle.get_result(timeout=0.05, default=None) is None
    release.set()
    assert handle.get_result(timeout=WAIT) == "late"


# ----------------------------------------------------------------- updates


def bulk_mailer(count, gate=None):
    """A send-bulk handler: start, one update per message, optional pause, result."""

    def send_bulk(task):
        task.start()
        for i in range(count):
            if gate is not None and i == count // 2:
                assert gate.wait(WAIT)
            task.update({"sent": i + 1})
        return {"sent": count}

    return send_bulk


def test_updates_in_order_before_result(hub, make_client):
    """Updates reach on('update') in order, all before the result, on a client thread."""
    gate = threading.Event()
    make_client("mailer").sub("mail:send-bulk", bulk_mailer(50, gate))
    events = Recorder()
    threads = set()

    def on_update(data):
        threads.add(threading.current_thread().name)
        events(("update", data["sent"]))

    handle = make_client("publisher").pub("mail:send-bulk", ["a@x"] * 50)
    handle.on("update", on_update).on("result", lambda r: events(("result", r)))
    gate.set()
    assert handle.get_result(timeout=WAIT) == {"sent": 50}
    items = events.wait_for(51)
    assert items == [("update", i) for i in range(1, 51)] + [("result", {"sent": 50})]
    assert threads == {"taskhub-reader"}
    assert handle.updates == [{"sent": i} for i in range(1, 51)]


def test_update_callback_attached_after_done(hub, make_client):
    """A callback attached after the handle is done still gets every update, in order."""
    make_client("mailer").sub("mail:send-bulk", bulk_mailer(20))
    handle = make_client("publisher").pub("mail:send-bulk", {})
    assert handle.get_result(timeout=WAIT) == {"sent": 20}
    late = Recorder()
    handle.on("update", late)
    assert [u["sent"] for u in late.items] == list(range(1, 21))


def test_update_callback_attached_mid_stream(hub, make_client):
    """A callback attached mid-task gets the updates so far, then the rest, in order."""
    gate = threading.Event()
    make_client("mailer").sub("mail:send-bulk", bulk_mailer(10, gate))
    early = Recorder()
    handle = make_client("publisher").pub("mail:send-bulk", {}).on("update", early)
    early.wait_for(5)
    late = Recorder()
    handle.on("update", late)
    assert [u["sent"] for u in late.items] == [1, 2, 3, 4, 5]
    gate.set()
    handle.get_result(timeout=WAIT)
    assert [u["sent"] for u in late.items] == list(range(1, 11))
    assert late.items == early.items


def test_update_callback_attached_while_streaming(hub, make_client):
    """Callbacks attached while updates stream in each get every update exactly once, in order."""
    make_client("mailer").sub("mail:send-bulk", bulk_mailer(300))
    handle = make_client("publisher").pub("mail:send-bulk", {})
    listeners = [Recorder()]
    handle.on("update", listeners[0])
    while not handle.done() and len(listeners) < 50:
        listeners.append(Recorder())
        handle.on("update", listeners[-1])
    assert handle.get_result(timeout=WAIT) == {"sent": 300}
    for rec in listeners:
        assert [u["sent"] for u in rec.items] == list(range(1, 301))


def test_callback_exception_is_logged_and_harmless(hub, make_client, caplog):
    """An exception in an update callback is logged; other callbacks and the client go on."""
    make_client("mailer").sub("mail:send-bulk", bulk_mailer(3))
    publisher = make_client("publisher")
    good = Recorder()

    def bad(data):
        raise ValueError("callback bug")

    handle = publisher.pub("mail:send-bulk", {}).on("update", bad).on("update", good)
    assert handle.get_result(timeout=WAIT) == {"sent": 3}
    assert [u["sent"] for u in good.items] == [1, 2, 3]
    errors = [r for r in caplog.records if "update callback" in r.getMessage()]
    assert len(errors) == 3 and all(r.exc_info for r in errors)
    assert publisher.pub("mail:send-bulk", {}).get_result(timeout=WAIT) == {"sent": 3}


# ----------------------------------------------------------------- threads


def test_handler_may_pub_and_wait(hub, make_client):
    """A handler pubs to another service and waits on get_result without deadlock."""
    make_client("geocoder").sub("googlemaps:geocode", lambda task: {"city": task.payload})
    mailer = make_client("mailer", max_workers=2)

    def send_bulk(task):
        task.start()
        where = mailer.pub("googlemaps:geocode", "Lyon").get_result(timeout=WAIT)
        task.update({"geocoded": where})
        return {"sent": len(task.get_payload()), "from": where["city"]}

    mailer.sub("mail:send-bulk", send_bulk)
    updates = Recorder()
    handle = make_client("publisher").pub("mail:send-bulk", ["a", "b"]).on("update", updates)
    assert handle.get_result(timeout=WAIT) == {"sent": 2, "from": "Lyon"}
    assert updates.items == [{"geocoded": {"city": "Lyon"}}]


def test_get_result_in_update_callback_raises_concurrency_error(hub, make_client):
    """get_result() on a pending handle inside an update callback raises ConcurrencyError."""
    gate = threading.Event()
    make_client("mailer").sub("mail:send-bulk", bulk_mailer(2, gate))
    caught = Recorder()

    def on_update(data):
        try:
            handle.get_result(timeout=WAIT)
        except ConcurrencyError as exc:
            caught(exc)

    handle = make_client("publisher").pub("mail:send-bulk", {}).on("update", on_update)
    gate.set()  # updates now arrive on the reader thread
    assert handle.get_result(timeout=WAIT) == {"sent": 2}
    assert len(caught.wait_for(1)) >= 1


def test_callbacks_and_handlers_may_call_into_the_library(hub, make_client):
    """Callbacks and handlers may call pub(), on() and read handles: no lock is held."""
    make_client("logger").sub("log:*", lambda task: "logged")
    mailer = make_client("mailer")
    log_handles = Recorder()

    def send_bulk(task):
        task.start()
        task.update(1)
        log_handles(mailer.pub("log:error", "from handler"))
        return "sent"

    mailer.sub("mail:send-bulk", send_bulk)
    publisher = make_client("publisher")
    seen = Recorder()

    def on_update(data):
        seen(("update", handle.done(), len(handle.updates)))
        log_handles(publisher.pub("log:error", "from update callback"))
        handle.on("done", lambda h: seen(("nested done", h.done())))

    def on_done(h):
        seen(("done", h.get_result(timeout=0)))
        log_handles(publisher.pub("log:error", "from done callback"))

    handle = publisher.pub("mail:send-bulk", []).on("update", on_update).on("done", on_done)
    assert handle.get_result(timeout=WAIT) == "sent"
    items = seen.wait_for(3)
    assert items[0] == ("update", False, 1)
    assert set(items[1:]) == {("done", "sent"), ("nested done", True)}
    for h in log_handles.wait_for(3):
        assert h.get_result(timeout=WAIT) == "logged"


def test_worker_disconnect_before_start_fails_with_worker_lost(hub, make_client):
    """A worker dropping a task it received but had not started fails it with WorkerLost."""
    received = threading.Event()

    def receive_only(task):
        received.set()
        task.wait_cancelled(WAIT)

    geocoder = make_client("geocoder", **NO_RECONNECT)
    geocoder.sub("googlemaps:geocode", receive_only)
    handle = make_client("publisher").pub("googlemaps:geocode", {})
    assert received.wait(WAIT)
    geocoder._ws.sock.shutdown(socket.SHUT_RDWR)
    with pytest.raises(WorkerLost):
        handle.get_result(timeout=WAIT)


def test_worker_disconnect_mid_task_fails_publisher_quickly(hub, make_client):
    """A worker whose socket drops mid-task fails the task with WorkerLost naming it."""
    cancelled = threading.Event()

    def stuck(task):
        task.update("working")  # claims the task
        if task.wait_cancelled(WAIT):
            cancelled.set()

    geocoder = make_client("geocoder")
    geocoder.sub("googlemaps:geocode", stuck)
    claimed = threading.Event()
    handle = (
        make_client("publisher").pub("googlemaps:geocode", {}).on("update", lambda d: claimed.set())
    )
    assert claimed.wait(WAIT)
    t0 = time.monotonic()
    geocoder._ws.sock.shutdown(socket.SHUT_RDWR)
    with pytest.raises(WorkerLost) as info:
        handle.get_result(timeout=WAIT)
    assert time.monotonic() - t0 < 1.0
    assert info.value.service == "geocoder"
    assert "geocoder" in str(info.value)
    assert cancelled.wait(WAIT)
    assert handle.results["geocoder"].status == "lost"


def test_clients_and_hub_leave_no_threads(make_hub, make_client):
    """Closing clients and stopping the hub leaves no thread they started."""
    before = set(threading.enumerate())
    hub = make_hub()
    worker = make_client("geocoder", hub=hub)
    worker.sub("googlemaps:geocode", lambda task: 1)
    publisher = make_client("publisher", hub=hub)
    assert publisher.pub("googlemaps:geocode", {}).get_result(timeout=WAIT) == 1
    assert len(set(threading.enumerate()) - before) >= 4  # hub + two clients at work
    publisher.close()
    worker.close()
    hub.stop()
    left = [t for t in set(threading.enumerate()) - before if t.is_alive()]
    for t in left:
        t.join(WAIT)
    assert not [t.name for t in left if t.is_alive()]


def test_script_without_close_exits(hub, make_client):
    """A script that connects, publishes, gets a result and forgets close() still exits."""
    make_client("geocoder").sub("googlemaps:geocode", lambda task: task.payload * 2)
    script = textwrap.dedent(
        f"""
        from taskhub_sync import Client
        client = Client({hub.url!r}, name="publisher", key={key_of("publisher")!r})
        print(client.pub("googlemaps:geocode", 21).get_result(timeout=5))
        """
    )
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "42"
    assert time.monotonic() - t0 < 5.0


def test_pub_without_payload(hub, make_client):
    """pub(topic) with no payload reaches the handler as None and the worker stays up."""
    worker = make_client("geocoder")
    worker.sub("googlemaps:geocode", lambda task: ["payload", task.get_payload()])
    handle = make_client("publisher").pub("googlemaps:geocode")
    assert handle.get_result(timeout=WAIT) == ["payload", None]
    assert not worker.closed
