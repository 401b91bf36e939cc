"""Unit tests of the Router: conversations of messages in, Outgoing lists out. No sockets."""

from __future__ import annotations

import pytest

from taskhub_sync import protocol as p
from taskhub_sync.errors import AuthenticationError, InvalidTopic, ProtocolError
from taskhub_sync.protocol import (
    Cancel,
    Done,
    ErrorInfo,
    Fail,
    Outcome,
    Publish,
    Reply,
    Result,
    Start,
    Subscribe,
    Task,
    Unsubscribe,
    Update,
)
from taskhub_sync.router import Credential, Outgoing, Router, RState
from taskhub_sync.topics import validate_pattern

START = 1.0  # task_start_timeout
FINISH = 10.0  # task_finish_timeout
PUB = Credential("pub", sub_permissions=("*",), pub_permissions=("*",), max_instances=2)


def cred(service: str, *, max_instances: int = 4, sub=("*",), pub=("*",)) -> Credential:
    return Credential(
        service, sub_permissions=sub, pub_permissions=pub, max_instances=max_instances
    )


def join(router: Router, conn_id: str, service: str, *patterns: str, concurrency: int = 1) -> None:
    """Connect an instance of ``service`` and subscribe it to ``patterns``."""
    router.connect(conn_id, cred(service), concurrency)
    for i, pattern in enumerate(patterns):
        assert router.receive(conn_id, Subscribe(i, pattern), 0.0) == [Outgoing(conn_id, Reply(i))]


def task(task_id: str, topic: str = "a", payload=None, publisher: str = "pub") -> Task:
    return Task(task_id, topic, payload, publisher)


def no_subscribers(topic: str = "a") -> ErrorInfo:
    return ErrorInfo("no_subscribers", f"no subscriber of {topic!r} took the task in time")


def failed(service: str, error_type: str = "ValueError", message: str = "bad") -> ErrorInfo:
    return ErrorInfo("failed", f"{error_type}: {message}", service=service, remote_type=error_type)


def timed_out(service: str, task_id: str = "t1", timeout: float = FINISH) -> ErrorInfo:
    return ErrorInfo(
        "timeout",
        f"service {service!r} did not finish task {task_id} within its finish timeout "
        f"({timeout:g} s)",
        service=service,
    )


def worker_lost(service: str, task_id: str = "t1") -> ErrorInfo:
    return ErrorInfo(
        "worker_lost",
        f"service {service!r} disconnected while holding task {task_id}",
        service=service,
    )


def snapshot(router: Router) -> tuple:
    """Everything observable about the router's state, to check it is untouched."""
    return (
        {tid: router.task_state(tid) for tid in list(router._tasks)},
        {cid: router.held_count(cid) for cid in list(router._conns)},
        {cid: sorted(c.patterns) for cid, c in router._conns.items()},
        {tid: (t.open, t.winner, t.window_open) for tid, t in router._tasks.items()},
        router.pending_count(),
        router.late_messages,
        list(router._deadlines),
    )


@pytest.fixture
def router() -> Router:
    """A router with a publisher connection "pub" (service "pub", may publish anything)."""
    r = Router(task_start_timeout=START, task_finish_timeout=FINISH)
    r.connect("pub", PUB, 1)
    return r


@pytest.fixture
def one(router: Router) -> Router:
    """``router`` plus one worker "s1#1" of service s1 listening on "a"."""
    join(router, "s1#1", "s1", "a")
    return router


# ----------------------------------------------------------------- connect


def test_max_instances(router: Router) -> None:
    """connect() over max_instances raises AuthenticationError; a freed place is reusable."""
    c = cred("w", max_instances=2)
    router.connect("w#1", c, 1)
    router.connect("w#2", c, 1)
    with pytest.raises(AuthenticationError, match="max_instances=2"):
        router.connect("w#3", c, 1)
    assert router.instances("w") == 2
    assert "w#3" not in router._conns
    router.disconnect("w#1", 0.0)
    assert router.instances("w") == 1
    router.connect("w#3", c, 1)
    assert router.instances("w") == 2


def test_connect_same_conn_id_twice_raises(router: Router) -> None:
    """A conn id can only be registered once."""
    with pytest.raises(ValueError):
        router.connect("pub", PUB, 1)
    assert router.instances("pub") == 1


def test_disconnect_unknown_conn_is_a_no_op(router: Router) -> None:
    """disconnect() of an unknown (or already gone) connection returns []."""
    assert router.disconnect("nobody", 0.0) == []
    assert router.disconnect("pub", 0.0) == []
    assert router.disconnect("pub", 0.0) == []
    assert router.instances("pub") == 0


# ----------------------------------------------------------------- subscribe


@pytest.mark.parametrize("pattern", ["", "a b", "a:", "a*", "*:a", "a:*:b", "é"])
def test_subscribe_invalid_pattern_replies_error(router: Router, pattern: str) -> None:
    """An invalid pattern gets a Reply with invalid_topic; nothing is subscribed."""
    router.connect("w", cred("w"), 1)
    with pytest.raises(InvalidTopic) as info:
        validate_pattern(pattern)
    out = router.receive("w", Subscribe(7, pattern), 0.0)
    assert out == [Outgoing("w", Reply(7, ErrorInfo("invalid_topic", str(info.value))))]
    assert router._conns["w"].patterns == set()


@pytest.mark.parametrize(
    ("permissions", "pattern"),
    [
        (("log:error",), "log:*"),
        (("log",), "*"),
        (("mail",), "mailx"),
        (("mail:send",), "mail"),
        ((), "a"),
    ],
)
def test_subscribe_permission_denied_replies_error(
    router: Router, permissions: tuple[str, ...], pattern: str
) -> None:
    """A pattern outside sub_permissions gets a Reply with permission_denied."""
    router.connect("w", cred("w", sub=permissions), 1)
    out = router.receive("w", Subscribe(1, pattern), 0.0)
    text = f"service 'w' may not listen to {pattern!r}"
    assert out == [Outgoing("w", Reply(1, ErrorInfo("permission_denied", text)))]
    assert router._conns["w"].patterns == set()


@pytest.mark.parametrize(
    ("permissions", "pattern"),
    [(("log",), "log:*"), (("log",), "log:error"), (("*",), "*"), (("mail",), "mail")],
)
def test_subscribe_allowed(router: Router, permissions: tuple[str, ...], pattern: str) -> None:
    """A pattern within sub_permissions gets an empty Reply."""
    router.connect("w", cred("w", sub=permissions), 1)
    assert router.receive("w", Subscribe(3, pattern), 0.0) == [Outgoing("w", Reply(3))]
    assert router._conns["w"].patterns == {pattern}


def test_subscribe_twice_delivers_once(one: Router) -> None:
    """Subscribing the same pattern twice is harmless: one Task per publish."""
    assert one.receive("s1#1", Subscribe(9, "a"), 0.0) == [Outgoing("s1#1", Reply(9))]
    assert one.receive("pub", Publish("t1", "a"), 0.0) == [Outgoing("s1#1", task("t1"))]


def test_unsubscribe(one: Router) -> None:
    """After unsubscribing, publishes find no subscriber; unknown patterns are fine."""
    assert one.receive("s1#1", Unsubscribe(5, "a"), 0.0) == [Outgoing("s1#1", Reply(5))]
    assert one.receive("s1#1", Unsubscribe(6, "never"), 0.0) == [Outgoing("s1#1", Reply(6))]
    out = one.receive("pub", Publish("t1", "a"), 0.0)
    text = "no service is subscribed to 'a'"
    assert out == [Outgoing("pub", Done("t1", {}, error=ErrorInfo("no_subscribers", text)))]
    assert one._exact == {}


# ----------------------------------------------------------------- publish


def test_publish_permission_denied(router: Router) -> None:
    """A publish outside pub_permissions ends at once with permission_denied."""
    router.connect("m", cred("mailer", pub=("log:error", "googlemaps")), 1)
    join(router, "g", "geo", "googlemapsx", "googlemaps:geocode")
    out = router.receive("m", Publish("t1", "googlemapsx"), 0.0)
    text = "service 'mailer' may not publish to 'googlemapsx'"
    assert out == [Outgoing("m", Done("t1", {}, error=ErrorInfo("permission_denied", text)))]
    assert router.pending_count() == 0
    assert router.receive("m", Publish("t2", "googlemaps:geocode"), 0.0) == [
        Outgoing("g", task("t2", "googlemaps:geocode", publisher="mailer"))
    ]


@pytest.mark.parametrize("topic", ["", "a:*", "*", "a b"])
def test_publish_invalid_topic(one: Router, topic: str) -> None:
    """Publishing to an invalid topic ends at once with invalid_topic."""
    out = one.receive("pub", Publish("t1", topic), 0.0)
    assert len(out) == 1 and out[0].conn_id == "pub"
    assert out[0].message.error.code == "invalid_topic"
    assert one.pending_count() == 0


def test_publish_without_subscribers(router: Router) -> None:
    """No subscriber: an immediate Done with no_subscribers and no pending task."""
    out = router.receive("pub", Publish("t1", "nobody:home", {"x": 1}), 0.0)
    text = "no service is subscribed to 'nobody:home'"
    assert out == [Outgoing("pub", Done("t1", {}, error=ErrorInfo("no_subscribers", text)))]
    assert not router.has_pending()
    assert router.next_deadline() is None


def test_single_worker_conversation(one: Router) -> None:
    """Publish, start, updates in order, result: the publisher gets updates then Done."""
    assert one.receive("pub", Publish("t1", "a", [1, 2]), 0.0) == [
        Outgoing("s1#1", task("t1", payload=[1, 2]))
    ]
    assert one.task_state("t1") == {"s1": RState.DELIVERED}
    assert one.held_count("s1#1") == 1
    assert one.next_deadline() == START
    assert one.receive("s1#1", Start("t1"), 0.1) == []
    assert one.task_state("t1") == {"s1": RState.STARTED}
    assert one.receive("s1#1", Update("t1", {"sent": 1}), 0.2) == [
        Outgoing("pub", Update("t1", {"sent": 1}, "s1"))
    ]
    assert one.receive("s1#1", Update("t1", {"sent": 2}), 0.3) == [
        Outgoing("pub", Update("t1", {"sent": 2}, "s1"))
    ]
    assert one.expire(START) == []  # started: the window does not touch it
    assert one.receive("s1#1", Result("t1", {"sent": 2}), 5.0) == [
        Outgoing("pub", Done("t1", {"s1": Outcome(p.OK, {"sent": 2})}, winner="s1"))
    ]
    assert one.task_state("t1") is None
    assert one.held_count("s1#1") == 0
    assert not one.has_pending()
    assert one.expire(100.0) == []


def test_update_without_start_claims_the_task(one: Router) -> None:
    """An update before start() implicitly starts the task; the window then spares it."""
    one.receive("pub", Publish("t1", "a"), 0.0)
    assert one.receive("s1#1", Update("t1", 1), 0.5) == [Outgoing("pub", Update("t1", 1, "s1"))]
    assert one.task_state("t1") == {"s1": RState.STARTED}
    assert one.expire(START) == []
    assert one.task_state("t1") == {"s1": RState.STARTED}


def test_result_within_window_without_start_is_the_result(one: Router) -> None:
    """A worker that answers within the window without start() has answered."""
    one.receive("pub", Publish("t1", "a"), 0.0)
    assert one.receive("s1#1", Result("t1", "quick"), 0.5) == [
        Outgoing("pub", Done("t1", {"s1": Outcome(p.OK, "quick")}, winner="s1"))
    ]
    assert one.expire(START) == []


def test_none_result_is_a_winning_result(one: Router) -> None:
    """A None result is still a success: winner set, no error."""
    one.receive("pub", Publish("t1", "a"), 0.0)
    assert one.receive("s1#1", Result("t1", None), 0.5) == [
        Outgoing("pub", Done("t1", {"s1": Outcome(p.OK, None)}, winner="s1"))
    ]


def test_fan_out_to_every_service(router: Router) -> None:
    """A task goes to one instance of every subscribed service, exact and prefix alike."""
    join(router, "s1#1", "s1", "a:b")
    join(router, "s2#1", "s2", "a:*")
    join(router, "s3#1", "s3", "*")
    join(router, "s4#1", "s4", "a:c")
    out = router.receive("pub", Publish("t1", "a:b", 7), 0.0)
    assert out == [
        Outgoing("s1#1", task("t1", "a:b", 7)),
        Outgoing("s2#1", task("t1", "a:b", 7)),
        Outgoing("s3#1", task("t1", "a:b", 7)),
    ]
    assert router.task_state("t1") == {s: RState.DELIVERED for s in ("s1", "s2", "s3")}


def test_overlapping_patterns_of_one_instance_deliver_once(router: Router) -> None:
    """An instance subscribed by exact topic and by prefix gets one Task."""
    join(router, "s1#1", "s1", "a:b", "a:*", "*")
    assert router.receive("pub", Publish("t1", "a:b"), 0.0) == [Outgoing("s1#1", task("t1", "a:b"))]


def test_publisher_can_be_its_own_subscriber(router: Router) -> None:
    """A connection subscribed to a topic it publishes gets the task too."""
    assert router.receive("pub", Subscribe(1, "a"), 0.0) == [Outgoing("pub", Reply(1))]
    assert router.receive("pub", Publish("t1", "a"), 0.0) == [Outgoing("pub", task("t1"))]
    assert router.receive("pub", Result("t1", 3), 0.1) == [
        Outgoing("pub", Done("t1", {"pub": Outcome(p.OK, 3)}, winner="pub"))
    ]


# ----------------------------------------------------------------- round robin and slots


def test_round_robin_among_instances(router: Router) -> None:
    """Tasks go round robin across a service's instances with free slots."""
    for i in (1, 2, 3):
        join(router, f"s#{i}", "s", "a", concurrency=2)
    targets = [router.receive("pub", Publish(f"t{n}", "a"), 0.0)[0].conn_id for n in range(6)]
    assert targets == ["s#1", "s#2", "s#3", "s#1", "s#2", "s#3"]
    assert [router.held_count(f"s#{i}") for i in (1, 2, 3)] == [2, 2, 2]


def test_round_robin_skips_full_instances(router: Router) -> None:
    """An instance whose slots are all in use is skipped."""
    for i in (1, 2, 3):
        join(router, f"s#{i}", "s", "a")
    for n in (1, 2, 3):
        router.receive("pub", Publish(f"t{n}", "a"), 0.0)
    assert router.receive("s#2", Result("t2", 0), 0.1)[0].conn_id == "pub"
    # The next turn is s#1's, but s#1 is full: s#2 (free again) gets it.
    assert router.receive("pub", Publish("t4", "a"), 0.2) == [Outgoing("s#2", task("t4"))]


def test_round_robin_is_per_service(router: Router) -> None:
    """Each service has its own round robin, independent of the others."""
    join(router, "x#1", "x", "a", concurrency=9)
    join(router, "x#2", "x", "a", concurrency=9)
    join(router, "y#1", "y", "a", concurrency=9)
    out1 = router.receive("pub", Publish("t1", "a"), 0.0)
    out2 = router.receive("pub", Publish("t2", "a"), 0.0)
    assert [o.conn_id for o in out1] == ["x#1", "y#1"]
    assert [o.conn_id for o in out2] == ["x#2", "y#1"]


def test_queued_when_all_busy_then_delivered_when_a_slot_frees(router: Router) -> None:
    """With every slot full the task waits (QUEUED) and goes out when one frees."""
    join(router, "s#1", "s", "a")
    join(router, "s#2", "s", "a")
    router.receive("pub", Publish("t1", "a"), 0.0)
    router.receive("pub", Publish("t2", "a"), 0.0)
    assert router.receive("pub", Publish("t3", "a", "third"), 0.1) == []
    assert router.task_state("t3") == {"s": RState.QUEUED}
    assert router.receive("s#2", Start("t2"), 0.2) == []
    assert router.receive("s#2", Fail("t2", "ValueError", "bad"), 0.5) == [
        Outgoing("pub", Done("t2", {"s": Outcome(p.FAILED, error=failed("s"))}, error=failed("s"))),
        Outgoing("s#2", task("t3", payload="third")),
    ]
    assert router.task_state("t3") == {"s": RState.DELIVERED}
    assert router.receive("s#2", Result("t3", 3), 0.6) == [
        Outgoing("pub", Done("t3", {"s": Outcome(p.OK, 3)}, winner="s"))
    ]


def test_queued_tasks_go_out_in_publish_order(router: Router) -> None:
    """Waiting tasks are delivered oldest first as slots free."""
    join(router, "s#1", "s", "a")
    router.receive("pub", Publish("t1", "a"), 0.0)
    for n in (2, 3, 4):
        assert router.receive("pub", Publish(f"t{n}", "a"), 0.0) == []
    delivered = []
    for n in (1, 2, 3):
        out = router.receive("s#1", Result(f"t{n}", n), 0.1)
        delivered.append(out[-1].message.task)
    assert delivered == ["t2", "t3", "t4"]


def test_queued_task_goes_to_a_new_subscriber(router: Router) -> None:
    """A task waiting for a busy service goes to a new instance once it subscribes."""
    join(router, "s#1", "s", "a")
    router.receive("pub", Publish("t1", "a"), 0.0)
    assert router.receive("pub", Publish("t2", "a"), 0.0) == []
    router.connect("s#2", cred("s"), 1)
    assert router.receive("s#2", Subscribe(1, "a"), 0.1) == [
        Outgoing("s#2", Reply(1)),
        Outgoing("s#2", task("t2")),
    ]


def test_freed_slot_skips_waiting_tasks_of_other_topics(router: Router) -> None:
    """A freed instance only takes waiting tasks whose topic it subscribes to."""
    join(router, "s#1", "s", "a")
    join(router, "s#2", "s", "a", "b")
    router.receive("pub", Publish("t1", "a"), 0.0)  # s#1
    router.receive("pub", Publish("t2", "b"), 0.0)  # s#2
    assert router.receive("pub", Publish("t3", "b"), 0.0) == []  # waits for s#2
    assert router.receive("pub", Publish("t4", "a"), 0.0) == []  # waits
    out = router.receive("s#1", Result("t1", 1), 0.1)
    assert out[-1] == Outgoing("s#1", task("t4"))
    assert router.task_state("t3") == {"s": RState.QUEUED}
    out = router.receive("s#2", Result("t2", 2), 0.2)
    assert out[-1] == Outgoing("s#2", task("t3", "b"))


# ----------------------------------------------------------------- start window


def test_window_delivered_becomes_seen_with_cancel(one: Router) -> None:
    """A task nobody started or answered in the window: Cancel to the worker, result None."""
    one.receive("pub", Publish("t1", "a"), 0.0)
    assert one.expire(START - 0.01) == []
    assert one.expire(START) == [
        Outgoing("s1#1", Cancel("t1", "not started in time")),
        Outgoing("pub", Done("t1", {"s1": Outcome(p.SEEN)})),
    ]
    assert one.task_state("t1") is None
    assert one.held_count("s1#1") == 1  # the handler still runs until it reports
    assert one.receive("s1#1", Result("t1", "late"), 2.0) == []
    assert one.held_count("s1#1") == 0
    assert one.late_messages == 1


def test_all_seen_result_none(router: Router) -> None:
    """When every recipient merely saw the task, Done has no winner and no error."""
    join(router, "s1#1", "s1", "a")
    join(router, "s2#1", "s2", "a")
    router.receive("pub", Publish("t1", "a"), 0.0)
    out = router.expire(START)
    done = Done("t1", {"s1": Outcome(p.SEEN), "s2": Outcome(p.SEEN)})
    assert out == [
        Outgoing("s1#1", Cancel("t1", "not started in time")),
        Outgoing("s2#1", Cancel("t1", "not started in time")),
        Outgoing("pub", done),
    ]
    assert done.result is None and done.error is None


def test_window_queued_becomes_busy_overloaded(router: Router) -> None:
    """A task still waiting for a slot when the window closes ends with overloaded."""
    join(router, "s#1", "s", "a")
    router.receive("pub", Publish("t1", "a"), 0.0)
    router.receive("s#1", Start("t1"), 0.1)
    router.receive("pub", Publish("t2", "a"), 0.5)
    overloaded = ErrorInfo("overloaded", "every instance subscribed to 'a' stayed busy")
    assert router.expire(START) == []  # t1 started; t2's window closes at 1.5
    assert router.expire(0.5 + START) == [
        Outgoing("pub", Done("t2", {"s": Outcome(p.BUSY)}, error=overloaded))
    ]
    assert router.task_state("t1") == {"s": RState.STARTED}
    # The slot frees later: the dropped t2 is not delivered.
    assert router.receive("s#1", Result("t1", 1), 2.0) == [
        Outgoing("pub", Done("t1", {"s": Outcome(p.OK, 1)}, winner="s"))
    ]


def test_task_delivered_from_the_queue_gets_a_whole_start_window(router: Router) -> None:
    """A task that waited for a slot has task_start_timeout from its delivery to start,
    not what was left of the window it waited in."""
    join(router, "s#1", "s", "a")
    router.receive("pub", Publish("t1", "a"), 0.0)
    router.receive("pub", Publish("t2", "a"), 0.0)
    router.receive("s#1", Start("t1"), 0.0)
    assert router.receive("s#1", Result("t1", 1), 0.9) == [
        Outgoing("pub", Done("t1", {"s": Outcome(p.OK, 1)}, winner="s")),
        Outgoing("s#1", task("t2")),
    ]
    assert router.expire(START) == []  # t2's own window runs until 1.9
    assert router.task_state("t2") == {"s": RState.DELIVERED}
    assert router.receive("s#1", Start("t2"), 1.5) == []
    assert router.expire(0.9 + START) == []
    assert router.receive("s#1", Result("t2", 2), 3.0) == [
        Outgoing("pub", Done("t2", {"s": Outcome(p.OK, 2)}, winner="s"))
    ]


def test_task_delivered_from_the_queue_and_not_started_is_seen(router: Router) -> None:
    """The delivery window of a task that waited closes on its own deadline."""
    join(router, "s#1", "s", "a")
    router.receive("pub", Publish("t1", "a"), 0.0)
    router.receive("pub", Publish("t2", "a"), 0.0)
    router.receive("s#1", Result("t1", 1), 0.5)  # answered at once: t2 delivered at 0.5
    assert router.next_deadline() == START
    assert router.expire(START) == []
    assert router.expire(0.5 + START - 0.01) == []
    assert router.expire(0.5 + START) == [
        Outgoing("s#1", Cancel("t2", "not started in time")),
        Outgoing("pub", Done("t2", {"s": Outcome(p.SEEN)})),
    ]


def test_window_mixes_busy_seen_and_started(router: Router) -> None:
    """Window close: QUEUED -> busy, DELIVERED -> seen, STARTED keeps going and wins."""
    join(router, "busy#1", "busy", "a", "x")
    join(router, "seen#1", "seen", "a")
    join(router, "work#1", "work", "a")
    router.receive("pub", Publish("t0", "x"), 0.0)  # fills busy#1
    router.receive("pub", Publish("t1", "a"), 0.0)
    router.receive("work#1", Start("t1"), 0.1)
    assert router.task_state("t1") == {
        "busy": RState.QUEUED,
        "seen": RState.DELIVERED,
        "work": RState.STARTED,
    }
    out = router.expire(START)
    assert out == [
        Outgoing("busy#1", Cancel("t0", "not started in time")),
        Outgoing("pub", Done("t0", {"busy": Outcome(p.SEEN)})),
        Outgoing("seen#1", Cancel("t1", "not started in time")),
    ]
    assert router.task_state("t1") == {
        "busy": RState.FINISHED,
        "seen": RState.ENDED,
        "work": RState.STARTED,
    }
    assert router.receive("work#1", Result("t1", "w"), 3.0) == [
        Outgoing(
            "pub",
            Done(
                "t1",
                {"busy": Outcome(p.BUSY), "seen": Outcome(p.SEEN), "work": Outcome(p.OK, "w")},
                winner="work",
            ),
        )
    ]


def test_seen_and_busy_without_error_is_result_none(router: Router) -> None:
    """Seen plus busy (no failure) completes with result None, not overloaded."""
    join(router, "busy#1", "busy", "a", "x")
    join(router, "seen#1", "seen", "a")
    router.receive("pub", Publish("t0", "x"), 0.0)
    router.receive("busy#1", Start("t0"), 0.0)
    router.receive("pub", Publish("t1", "a"), 0.0)
    out = router.expire(START)
    assert out[-1] == Outgoing(
        "pub", Done("t1", {"busy": Outcome(p.BUSY), "seen": Outcome(p.SEEN)})
    )


# ----------------------------------------------------------------- results


@pytest.mark.parametrize("first", ["s1", "s2"])
def test_first_successful_result_wins(router: Router, first: str) -> None:
    """The first OK result wins; Done waits for every recipient and lists them all."""
    join(router, "s1#1", "s1", "a")
    join(router, "s2#1", "s2", "a")
    router.receive("pub", Publish("t1", "a"), 0.0)
    second = "s2" if first == "s1" else "s1"
    assert router.receive(f"{first}#1", Result("t1", first), 0.1) == []
    assert router.task_state("t1")[first] is RState.FINISHED
    assert router.receive(f"{second}#1", Result("t1", second), 0.2) == [
        Outgoing(
            "pub",
            Done(
                "t1",
                {"s1": Outcome(p.OK, "s1"), "s2": Outcome(p.OK, "s2")},
                winner=first,
            ),
        )
    ]


@pytest.mark.parametrize("failing_first", [True, False])
def test_success_beats_failure(router: Router, failing_first: bool) -> None:
    """A failure and a success: the success is the result, whatever the order."""
    join(router, "f#1", "f", "a")
    join(router, "ok#1", "ok", "a")
    router.receive("pub", Publish("t1", "a"), 0.0)
    steps = [("f#1", Fail("t1", "KeyError", "k")), ("ok#1", Result("t1", 1))]
    if not failing_first:
        steps.reverse()
    out = [o for conn, msg in steps for o in router.receive(conn, msg, 0.1)]
    assert out == [
        Outgoing(
            "pub",
            Done(
                "t1",
                {
                    "f": Outcome(p.FAILED, error=failed("f", "KeyError", "k")),
                    "ok": Outcome(p.OK, 1),
                },
                winner="ok",
            ),
        )
    ]


@pytest.mark.parametrize("started", [True, False])
def test_handler_failure(one: Router, started: bool) -> None:
    """A Fail becomes error code failed with service and remote_type, and frees the slot."""
    one.receive("pub", Publish("t1", "a"), 0.0)
    if started:
        one.receive("s1#1", Start("t1"), 0.1)
    error = failed("s1", "ZeroDivisionError", "division by zero")
    assert one.receive("s1#1", Fail("t1", "ZeroDivisionError", "division by zero"), 0.2) == [
        Outgoing("pub", Done("t1", {"s1": Outcome(p.FAILED, error=error)}, error=error))
    ]
    assert one.held_count("s1#1") == 0


def test_first_error_is_reported_when_all_fail(router: Router) -> None:
    """When every recipient fails, Done's error is the first failure."""
    join(router, "s1#1", "s1", "a")
    join(router, "s2#1", "s2", "a")
    router.receive("pub", Publish("t1", "a"), 0.0)
    router.receive("s2#1", Fail("t1", "E2", "two"), 0.1)
    out = router.receive("s1#1", Fail("t1", "E1", "one"), 0.2)
    assert out[0].message.error == failed("s2", "E2", "two")
    assert set(out[0].message.outcomes) == {"s1", "s2"}


# ----------------------------------------------------------------- finish timeout


def test_finish_timeout(one: Router) -> None:
    """A started task past its finish deadline: Cancel to the worker, timeout to the publisher."""
    one.receive("pub", Publish("t1", "a"), 0.0)
    one.receive("s1#1", Start("t1"), 0.1)
    assert one.expire(FINISH - 0.001) == []
    assert one.expire(FINISH) == [
        Outgoing("s1#1", Cancel("t1", "timed out")),
        Outgoing(
            "pub",
            Done("t1", {"s1": Outcome(p.TIMEOUT, error=timed_out("s1"))}, error=timed_out("s1")),
        ),
    ]
    assert one.task_state("t1") is None
    assert one.held_count("s1#1") == 1


def test_per_task_timeout_overrides_default(one: Router) -> None:
    """Publish.timeout replaces the hub's finish timeout for that task."""
    one.receive("pub", Publish("t1", "a", timeout=3.0), 0.0)
    one.receive("s1#1", Start("t1"), 0.1)
    assert one.expire(2.9) == []
    out = one.expire(3.0)
    assert out[0] == Outgoing("s1#1", Cancel("t1", "timed out"))
    assert out[1].message.error == timed_out("s1", timeout=3.0)


def test_per_task_timeout_longer_than_default(one: Router) -> None:
    """A long per-task timeout keeps the task alive past the hub default."""
    one.receive("pub", Publish("t1", "a", timeout=100.0), 0.0)
    one.receive("s1#1", Start("t1"), 0.1)
    assert one.expire(50.0) == []
    assert one.receive("s1#1", Result("t1", 1), 60.0)[0].message.winner == "s1"


def test_timeout_before_window_times_out_delivered_and_queued(router: Router) -> None:
    """A finish timeout shorter than the window: delivered -> timeout, queued -> busy."""
    join(router, "s#1", "s", "a")
    router.receive("pub", Publish("t1", "a", timeout=0.5), 0.0)
    router.receive("pub", Publish("t2", "a", timeout=0.5), 0.0)
    assert router.task_state("t2") == {"s": RState.QUEUED}
    out = router.expire(0.5)
    assert out[:2] == [
        Outgoing("s#1", Cancel("t1", "timed out")),
        Outgoing(
            "pub",
            Done(
                "t1",
                {"s": Outcome(p.TIMEOUT, error=timed_out("s", timeout=0.5))},
                error=timed_out("s", timeout=0.5),
            ),
        ),
    ]
    assert out[2].message.task == "t2" and out[2].message.outcomes == {"s": Outcome(p.BUSY)}
    assert router.expire(START) == []


@pytest.mark.parametrize("how", ["seen", "timeout"])
@pytest.mark.parametrize(
    ("late", "frees"),
    [
        (Result("t1", 1), True),
        (Fail("t1", "E", "m"), True),
        (Start("t1"), False),
        (Update("t1", 1), False),
    ],
    ids=["result", "fail", "start", "update"],
)
def test_late_messages_are_dropped(one: Router, how: str, late, frees: bool) -> None:
    """Late messages after seen/timeout are dropped and counted; a final one frees the slot."""
    one.receive("pub", Publish("t1", "a"), 0.0)
    if how == "timeout":
        one.receive("s1#1", Start("t1"), 0.1)
        one.expire(FINISH)
    else:
        one.expire(START)
    assert one.receive("pub", Publish("t2", "a"), 20.0) == []  # slot still taken
    assert one.receive("s1#1", late, 21.0) == ([Outgoing("s1#1", task("t2"))] if frees else [])
    assert one.late_messages == 1
    assert one.held_count("s1#1") == 1


# ----------------------------------------------------------------- disconnects


def test_worker_lost_while_started(one: Router) -> None:
    """A worker that disconnects after start(): the task fails with worker_lost."""
    one.receive("pub", Publish("t1", "a"), 0.0)
    one.receive("s1#1", Start("t1"), 0.1)
    assert one.disconnect("s1#1", 0.2) == [
        Outgoing(
            "pub",
            Done("t1", {"s1": Outcome(p.LOST, error=worker_lost("s1"))}, error=worker_lost("s1")),
        )
    ]
    assert one.instances("s1") == 0
    assert not one.has_pending()


def test_worker_lost_after_window_while_started_with_other_instances(router: Router) -> None:
    """A started task is never redelivered, even if another instance is free."""
    join(router, "s#1", "s", "a")
    join(router, "s#2", "s", "a")
    router.receive("pub", Publish("t1", "a"), 0.0)
    router.receive("s#1", Start("t1"), 0.1)
    out = router.disconnect("s#1", 0.2)
    assert out == [
        Outgoing(
            "pub",
            Done("t1", {"s": Outcome(p.LOST, error=worker_lost("s"))}, error=worker_lost("s")),
        )
    ]


def test_delivered_not_started_is_redelivered_to_another_instance(router: Router) -> None:
    """Within the window, an unstarted task of a lost instance goes to a sibling instance."""
    join(router, "s#1", "s", "a")
    join(router, "s#2", "s", "a")
    assert router.receive("pub", Publish("t1", "a", "x"), 0.0) == [
        Outgoing("s#1", task("t1", payload="x"))
    ]
    assert router.disconnect("s#1", 0.2) == [Outgoing("s#2", task("t1", payload="x"))]
    assert router.task_state("t1") == {"s": RState.DELIVERED}
    assert router.held_count("s#2") == 1
    assert router.receive("s#2", Result("t1", 2), 0.3) == [
        Outgoing("pub", Done("t1", {"s": Outcome(p.OK, 2)}, winner="s"))
    ]


def test_redelivery_waits_for_a_busy_sibling(router: Router) -> None:
    """If the sibling is busy the redelivered task waits and goes out when it frees."""
    join(router, "s#1", "s", "a")
    join(router, "s#2", "s", "a")
    router.receive("pub", Publish("t1", "a"), 0.0)  # s#1
    router.receive("pub", Publish("t2", "a"), 0.0)  # s#2
    assert router.disconnect("s#1", 0.1) == []
    assert router.task_state("t1") == {"s": RState.QUEUED}
    out = router.receive("s#2", Result("t2", 2), 0.2)
    assert out[-1] == Outgoing("s#2", task("t1"))


def test_delivered_not_started_lost_when_no_other_instance(one: Router) -> None:
    """Within the window, with no other instance to take it over: worker_lost."""
    one.receive("pub", Publish("t1", "a"), 0.0)
    lost = worker_lost("s1")
    assert one.disconnect("s1#1", 0.2) == [
        Outgoing("pub", Done("t1", {"s1": Outcome(p.LOST, error=lost)}, error=lost))
    ]


def test_disconnect_of_one_service_keeps_the_others(router: Router) -> None:
    """A lost recipient drops out; the task goes on for the other services."""
    join(router, "s1#1", "s1", "a")
    join(router, "s2#1", "s2", "a")
    router.receive("pub", Publish("t1", "a"), 0.0)
    assert router.disconnect("s1#1", 0.1) == []
    outcomes = {"s1": Outcome(p.LOST, error=worker_lost("s1")), "s2": Outcome(p.OK, 5)}
    assert router.receive("s2#1", Result("t1", 5), 0.2) == [
        Outgoing("pub", Done("t1", outcomes, winner="s2"))
    ]


def test_disconnect_after_seen_is_silent(one: Router) -> None:
    """An instance still running a task the hub already settled leaves quietly."""
    one.receive("pub", Publish("t1", "a"), 0.0)
    one.expire(START)
    assert one.disconnect("s1#1", 2.0) == []


@pytest.mark.parametrize("worker_started", [True, False])
def test_publisher_disconnect_cancels_its_workers(router: Router, worker_started: bool) -> None:
    """A leaving publisher's tasks end: Cancel to workers, queued ones dropped, late results too."""
    join(router, "s1#1", "s1", "a")
    join(router, "s2#1", "s2", "a")
    router.connect("p2", cred("p2"), 1)
    router.receive("pub", Publish("t1", "a"), 0.0)
    if worker_started:
        router.receive("s1#1", Start("t1"), 0.1)
    router.receive("p2", Publish("tx", "a"), 0.1)  # queued behind t1 on both
    assert router.task_state("tx") == {"s1": RState.QUEUED, "s2": RState.QUEUED}
    assert router.disconnect("p2", 0.2) == []  # tx was only queued
    assert router.task_state("tx") is None
    assert router.disconnect("pub", 0.3) == [
        Outgoing("s1#1", Cancel("t1", "publisher gone")),
        Outgoing("s2#1", Cancel("t1", "publisher gone")),
    ]
    assert not router.has_pending()
    assert router.receive("s1#1", Result("t1", 1), 0.4) == []
    assert router.receive("s2#1", Fail("t1", "E", "m"), 0.4) == []
    assert router.late_messages == 2
    assert router.held_count("s1#1") == router.held_count("s2#1") == 0
    assert router.expire(100.0) == []


def test_publisher_disconnect_also_releases_its_own_held_tasks(router: Router) -> None:
    """A connection that both published and holds a task leaves with nothing pending."""
    router.receive("pub", Subscribe(1, "a"), 0.0)
    router.receive("pub", Publish("t1", "a"), 0.0)
    router.disconnect("pub", 0.1)
    assert not router.has_pending()
    assert router._services == {}
    assert router.expire(100.0) == []


def test_disconnect_sends_nothing_to_the_departing_conn(router: Router) -> None:
    """disconnect() never returns Outgoing for the connection that just left."""
    join(router, "s1#1", "s1", "a")
    router.receive("pub", Subscribe(1, "a"), 0.0)
    router.receive("pub", Publish("t1", "a"), 0.0)
    assert router.disconnect("pub", 0.1) == [Outgoing("s1#1", Cancel("t1", "publisher gone"))]


# ----------------------------------------------------------------- illegal moves


def _two_services(router: Router) -> None:
    join(router, "s1#1", "s1", "a")
    join(router, "s2#1", "s2", "b")
    router.receive("pub", Publish("t1", "a"), 0.0)
    router.receive("pub", Publish("t2", "b"), 0.0)


def test_repeated_start_is_a_no_op(one: Router) -> None:
    """A second start (two threads of one handler racing) changes nothing."""
    one.receive("pub", Publish("t1", "a"), 0.0)
    assert one.receive("s1#1", Start("t1"), 0.1) == []
    assert one.receive("s1#1", Update("t1", 1), 0.2) != []
    assert one.receive("s1#1", Start("t1"), 0.3) == []
    assert one.task_state("t1") == {"s1": RState.STARTED}


ILLEGAL = [
    ("s1#1", [Result("t1", 1)], Result("t1", 2), "second result"),
    ("s1#1", [Result("t1", 1)], Start("t1"), "start after result"),
    ("s1#1", [Fail("t1", "E", "m")], Update("t1", 1), "update after fail"),
    ("s1#1", [], Result("t2", 1), "stranger answers another service's task"),
    ("s2#1", [], Start("t1"), "stranger starts another service's task"),
    ("pub", [], Result("t1", 1), "publisher answers its own task"),
    ("pub", [], Update("t1", 1), "publisher sends an update"),
    ("s1#1", [], Result("nope", 1), "unknown task"),
    ("s1#1", [], Task("t9", "a", None, "x"), "hub-only message task"),
    ("pub", [], Done("t1", {}), "hub-only message done"),
    ("pub", [], Cancel("t1", "r"), "hub-only message cancel"),
    ("pub", [], p.Hello("pub", "k"), "second hello"),
    ("pub", [], p.Welcome("x", 1, 1.0), "welcome"),
    ("pub", [], Reply(1), "reply"),
    ("pub", [], Publish("t1", "a"), "duplicate task id"),
    ("s2#1", [], Publish("t2", "a"), "duplicate task id from another conn"),
]


@pytest.mark.parametrize(
    ("actor", "before", "message", "why"), ILLEGAL, ids=[case[3] for case in ILLEGAL]
)
def test_illegal_moves_raise_and_leave_state_untouched(
    router: Router, actor: str, before: list, message, why: str
) -> None:
    """An illegal move raises ProtocolError and changes nothing."""
    _two_services(router)
    for msg in before:
        router.receive(actor, msg, 0.1)
    state = snapshot(router)
    with pytest.raises(ProtocolError):
        router.receive(actor, message, 0.2)
    assert snapshot(router) == state


def test_conversation_goes_on_after_an_illegal_move(router: Router) -> None:
    """After a rejected message the same task still completes normally."""
    _two_services(router)
    router.receive("s1#1", Start("t1"), 0.1)
    with pytest.raises(ProtocolError):
        router.receive("s1#1", Result("t2", 1), 0.2)  # a task it does not hold
    assert router.receive("s1#1", Result("t1", 1), 0.3) == [
        Outgoing("pub", Done("t1", {"s1": Outcome(p.OK, 1)}, winner="s1"))
    ]


def test_task_id_reusable_after_done(one: Router) -> None:
    """A finished task's id may be published again."""
    one.receive("pub", Publish("t1", "a"), 0.0)
    with pytest.raises(ProtocolError, match="already in use"):
        one.receive("pub", Publish("t1", "a"), 0.1)
    one.receive("s1#1", Result("t1", 1), 0.2)
    assert one.receive("pub", Publish("t1", "a"), 0.3) == [Outgoing("s1#1", task("t1"))]


def test_transitions_table_never_leaves_finished() -> None:
    """No move starts from FINISHED or QUEUED: those states take no worker messages."""
    from taskhub_sync.router import TRANSITIONS

    assert {state for state, _ in TRANSITIONS}.isdisjoint({RState.FINISHED, RState.QUEUED})


# ----------------------------------------------------------------- shutdown


def test_shutdown_fails_pending_tasks(router: Router) -> None:
    """shutdown() ends every pending task with connection_lost, keeping finished outcomes."""
    join(router, "s1#1", "s1", "a")
    join(router, "s2#1", "s2", "a")
    router.connect("p2", cred("p2"), 1)
    router.receive("pub", Publish("t1", "a"), 0.0)
    router.receive("s1#1", Result("t1", 1), 0.1)
    router.receive("p2", Publish("t2", "a"), 0.1)
    out = router.shutdown("bye")
    lost = {
        s: Outcome(p.LOST, error=ErrorInfo("connection_lost", "bye", service=s))
        for s in ("s1", "s2")
    }
    assert out == [
        Outgoing(
            "pub",
            Done(
                "t1",
                {"s1": Outcome(p.OK, 1), "s2": lost["s2"]},
                error=ErrorInfo("connection_lost", "bye"),
            ),
        ),
        Outgoing("p2", Done("t2", lost, error=ErrorInfo("connection_lost", "bye"))),
    ]
    assert not router.has_pending()
    assert router.shutdown() == []


def test_worker_disconnect_after_shutdown(one: Router) -> None:
    """After shutdown() a worker still holding a failed task can disconnect cleanly."""
    one.receive("pub", Publish("t1", "a"), 0.0)
    one.shutdown()
    assert one.disconnect("s1#1", 0.1) == []
    assert one.expire(100.0) == []


def test_publisher_disconnect_after_shutdown(one: Router) -> None:
    """After shutdown() a publisher disconnects without Cancel for already-failed tasks."""
    one.receive("pub", Publish("t1", "a"), 0.0)
    one.receive("s1#1", Start("t1"), 0.0)
    one.shutdown()
    assert one.disconnect("pub", 0.1) == []


def test_late_result_after_shutdown_is_dropped(one: Router) -> None:
    """A worker's result for a task shutdown() already failed is dropped."""
    one.receive("pub", Publish("t1", "a"), 0.0)
    one.shutdown()
    assert one.receive("s1#1", Result("t1", 1), 0.1) == []
    assert one.late_messages == 1
    assert one.held_count("s1#1") == 0


# ----------------------------------------------------------------- deadlines and scale


def test_next_deadline(one: Router) -> None:
    """next_deadline() is the earliest start or finish deadline, None when idle."""
    assert one.next_deadline() is None
    one.receive("pub", Publish("t1", "a", timeout=0.5), 2.0)
    assert one.next_deadline() == 2.5
    one.expire(2.5)
    assert one.next_deadline() == 2.0 + START  # a stale entry; expire() skips it
    assert one.expire(10.0) == []
    assert one.next_deadline() is None


def test_deadline_heap_stays_bounded(router: Router) -> None:
    """Publishing and completing many tasks keeps len(_deadlines) bounded."""
    join(router, "s#1", "s", "a", concurrency=10)
    worst = 0
    for n in range(5000):
        router.receive("pub", Publish(f"t{n}", "a"), n * 0.001)
        router.receive("s#1", Result(f"t{n}", n), n * 0.001)
        worst = max(worst, len(router._deadlines))
    assert not router.has_pending()
    assert worst <= 4 * 1 + 256 + 2
    assert len(router._deadlines) <= 258


def test_deadline_heap_bounded_by_pending_tasks(router: Router) -> None:
    """With many tasks pending, the heap stays proportional to them."""
    join(router, "s#1", "s", "a", concurrency=2000)
    for n in range(1000):
        router.receive("pub", Publish(f"p{n}", "a"), 0.0)
    for n in range(3000):
        router.receive("pub", Publish(f"t{n}", "a"), 0.0)
        router.receive("s#1", Result(f"t{n}", n), 0.0)
    assert router.pending_count() == 1000
    assert len(router._deadlines) <= 4 * 1000 + 256 + 2


def test_deadline_heap_bounded_when_publishers_leave(router: Router) -> None:
    """Tasks whose publisher left do not keep their deadlines in the heap."""
    join(router, "s#1", "s", "a", concurrency=100_000)
    for n in range(1000):
        router.connect(f"p{n}", cred("p", max_instances=1), 1)
        router.receive(f"p{n}", Publish(f"t{n}", "a", timeout=1e6), 0.0)
        router.disconnect(f"p{n}", 0.0)
    assert not router.has_pending()
    assert len(router._deadlines) <= 258


def test_many_exact_topics(router: Router) -> None:
    """With 10,000 exact subscriptions a task reaches exactly the right service."""
    for i in range(10):
        router.connect(f"s{i}", cred(f"s{i}"), 1)
    for n in range(10_000):
        conn = f"s{n % 10}"
        assert router.receive(conn, Subscribe(n, f"topic:{n}"), 0.0) == [Outgoing(conn, Reply(n))]
    assert len(router._exact) == 10_000
    for n in (0, 4321, 9999):
        out = router.receive("pub", Publish(f"t{n}", f"topic:{n}"), 0.0)
        assert out == [Outgoing(f"s{n % 10}", task(f"t{n}", f"topic:{n}"))]
        router.receive(f"s{n % 10}", Result(f"t{n}", n), 0.0)
    assert router.receive("pub", Publish("tx", "topic:10000"), 0.0)[0].message.error.code == (
        "no_subscribers"
    )


@pytest.mark.parametrize(
    ("topic", "services"),
    [
        ("a", ["exact-a", "star"]),
        ("a:b", ["exact-ab", "a-star", "star"]),
        ("a:b:c", ["a-star", "ab-star", "star"]),
        ("a:bc", ["a-star", "star"]),
        ("ab:c", ["star"]),
        ("b", ["star"]),
    ],
)
def test_prefix_subscriptions(router: Router, topic: str, services: list[str]) -> None:
    """Prefix patterns match strictly below their prefix; '*' matches everything."""
    join(router, "a-star", "a-star", "a:*")
    join(router, "ab-star", "ab-star", "a:b:*")
    join(router, "star", "star", "*")
    join(router, "exact-a", "exact-a", "a")
    join(router, "exact-ab", "exact-ab", "a:b")
    out = router.receive("pub", Publish("t1", topic), 0.0)
    assert sorted(o.conn_id for o in out) == sorted(services)
    assert all(o.message == task("t1", topic) for o in out)


def test_many_prefix_subscriptions(router: Router) -> None:
    """Thousands of prefix subscriptions: only the covering ones receive the task."""
    router.connect("w", cred("w"), 1)
    for n in range(5000):
        router.receive("w", Subscribe(n, f"p{n}:*"), 0.0)
    router.connect("v", cred("v"), 1)
    router.receive("v", Subscribe(0, "p42:x:*"), 0.0)
    assert router.receive("pub", Publish("t1", "p42:x:y"), 0.0) == [
        Outgoing("v", task("t1", "p42:x:y")),  # most specific prefix first
        Outgoing("w", task("t1", "p42:x:y")),
    ]
    assert router.receive("pub", Publish("t2", "p42"), 0.0)[0].message.error.code == (
        "no_subscribers"
    )


def test_disconnect_removes_subscriptions(router: Router) -> None:
    """A disconnected instance's subscriptions are gone from the index."""
    join(router, "s#1", "s", "a", "b:*", "*")
    router.disconnect("s#1", 0.0)
    assert router._exact == {} and router._prefix == {}
    assert router._services.keys() == {"pub"}


def test_queued_task_dropped_when_last_instance_leaves(one: Router) -> None:
    """A task waiting for a service whose last instance leaves ends at once, no_subscribers."""
    one.receive("pub", Publish("t1", "a"), 0.0)
    one.receive("s1#1", Start("t1"), 0.0)
    assert one.receive("pub", Publish("t2", "a"), 0.0) == []
    out = one.disconnect("s1#1", 0.1)
    assert Outgoing("pub", Done("t2", {"s1": Outcome(p.LOST)}, error=no_subscribers())) in out
    assert not one.has_pending()
