"""Task, what a handler works with: claiming (start), updates and answers, and the
order of the messages they send; first with a stand-in client, then on sockets."""

from __future__ import annotations

import threading
import time

import pytest
from conftest import WAIT
from faults import wait_until

from taskhub_sync import protocol as p
from taskhub_sync.router import RState
from taskhub_sync.task import Task


class Recorder:
    """Stands in for the Client: records what a Task sends, in order."""

    max_message_size = 1 << 20

    def __init__(self) -> None:
        self.sent: list[str] = []

    def _send_task_text(self, task: Task, text: str) -> None:
        self.sent.append(p.decode(text).TYPE)


def make_task(claim_in: float) -> tuple[Task, Recorder]:
    client = Recorder()
    msg = p.Task("s.1", "echo", {"n": 1}, "pub")
    return Task(client, msg, 0, time.monotonic() + claim_in), client  # type: ignore[arg-type]


def test_start_within_the_claim_delay_waits_for_the_deadline():
    """start() soon after receipt sends nothing yet; the reader sends it when due."""
    task, client = make_task(claim_in=WAIT)
    task.start()
    task.start()
    assert client.sent == []
    task._send_deferred_claim()
    assert client.sent == ["start"]
    task._send_deferred_claim()  # once only
    assert client.sent == ["start"]


def test_answer_before_the_claim_deadline_makes_the_start_unneeded():
    """A handler that answers first claims with its answer: no start message, ever."""
    task, client = make_task(claim_in=WAIT)
    task.start()
    task._send_claiming(p.encode(p.Result(task.id, 1)))
    task._send_deferred_claim()
    assert client.sent == ["result"]


def test_update_claims_the_task():
    """An update is a claim: the deferred start is not sent after it."""
    task, client = make_task(claim_in=WAIT)
    task.start()
    task.update({"done": 1})
    task._send_deferred_claim()
    assert client.sent == ["update"]


def test_start_after_the_claim_deadline_is_sent_at_once():
    """Past the claim deadline (or once the reader has passed it) start() sends."""
    late, client = make_task(claim_in=-1.0)
    late.start()
    assert client.sent == ["start"]
    task, client = make_task(claim_in=WAIT)
    task._send_deferred_claim()  # due, and start() was not called yet
    assert client.sent == []
    task.start()
    assert client.sent == ["start"]


def test_deferred_start_never_follows_the_answer():
    """The reader sending a due claim while the handler answers: start comes first or
    not at all (the hub refuses messages about a task that is over)."""
    for _ in range(200):
        task, client = make_task(claim_in=WAIT)
        task.start()
        go = threading.Barrier(2)

        def reader(task=task, go=go):
            go.wait()
            task._send_deferred_claim()

        thread = threading.Thread(target=reader)
        thread.start()
        go.wait()
        task._send_claiming(p.encode(p.Result(task.id, 1)))
        thread.join(WAIT)
        assert client.sent in (["result"], ["start", "result"])


def _received_types(hub) -> list[str]:
    """Wrap the hub's router so the test sees the type of every routed message."""
    seen: list[str] = []
    receive = hub._router.receive

    def spy(conn_id, message, now):
        seen.append(message.TYPE)
        return receive(conn_id, message, now)

    hub._router.receive = spy
    return seen


def test_fast_handler_answers_without_a_start_message(make_hub, make_client):
    """start() then an immediate return: the hub gets the result alone."""
    hub = make_hub()
    seen = _received_types(hub)

    def echo(task):
        task.start()
        return task.get_payload()

    make_client("geocoder", hub=hub).sub("googlemaps:geocode", echo)
    assert (
        make_client("publisher", hub=hub).pub("googlemaps:geocode", 3).get_result(timeout=WAIT) == 3
    )
    assert seen.count("result") == 1 and "start" not in seen


def test_slow_handler_claim_reaches_the_hub_well_within_the_window(make_hub, make_client):
    """start() then long work: the hub has the task as started (so its start window
    cannot end it) long before that window ends."""
    window = 1.0
    hub = make_hub(task_start_timeout=window)
    release = threading.Event()

    def slow(task):
        task.start()
        release.wait(WAIT)
        return "late but claimed"

    make_client("geocoder", hub=hub).sub("googlemaps:geocode", slow)
    t0 = time.monotonic()
    handle = make_client("publisher", hub=hub).pub("googlemaps:geocode")

    def started():
        with hub._lock:
            return hub._router.task_state(handle.task_id) == {"geocoder": RState.STARTED}

    try:
        wait_until(started, WAIT)
        assert time.monotonic() - t0 < window / 2
        assert not handle.done()
    finally:
        release.set()
    assert handle.get_result(timeout=WAIT) == "late but claimed"


def test_wait_cancelled_takes_timeouts_like_get_result():
    """wait_cancelled(): NaN is a ValueError; <= 0 checks without waiting; inf waits
    for the cancel."""
    task, _ = make_task(claim_in=WAIT)
    with pytest.raises(ValueError, match="NaN"):
        task.wait_cancelled(float("nan"))
    assert task.wait_cancelled(-1) is False
    threading.Timer(0.01, task._cancelled_by_hub, args=("timed out",)).start()
    assert task.wait_cancelled(float("inf")) is True
    assert task.cancel_reason == "timed out"
