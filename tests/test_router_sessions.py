"""Router: publisher sessions kept through a drop (resume_grace) and per-connection limits."""

from __future__ import annotations

from taskhub_sync.protocol import (
    Cancel,
    Done,
    ErrorInfo,
    Outcome,
    Publish,
    Reply,
    Result,
    Start,
    Subscribe,
    Task,
    Update,
)
from taskhub_sync.router import Credential, Outgoing, Router

CRED = Credential("svc", sub_permissions=("*",), pub_permissions=("*",), max_instances=4)
OTHER = Credential("other", sub_permissions=("*",), pub_permissions=("*",), max_instances=4)


def make_router(**kw) -> Router:
    router = Router(task_start_timeout=1.0, task_finish_timeout=10.0, resume_grace=5.0, **kw)
    router.connect("w", CRED, 4)
    assert router.receive("w", Subscribe(1, "job"), 0.0) == [Outgoing("w", Reply(1))]
    router.connect("p", CRED, 1)
    return router


def started_task(router: Router) -> None:
    assert router.receive("p", Publish("t1", "job", 7), 0.0) == [
        Outgoing("w", Task("t1", "job", 7, "svc"))
    ]
    assert router.receive("w", Start("t1"), 0.1) == []


def test_detached_publisher_gets_what_it_missed_on_resume():
    """Updates and the result produced while the publisher was away arrive on resume, in order."""
    router = make_router()
    started_task(router)
    assert router.disconnect("p", 0.2) == []
    assert router.can_resume("p", "svc")
    assert router.receive("w", Update("t1", 1), 0.3) == []
    assert router.receive("w", Result("t1", "ok"), 0.4) == []
    missed = router.connect("p", CRED, 1)
    assert missed == [
        Outgoing("p", Update("t1", 1, "svc")),
        Outgoing("p", Done("t1", {"svc": Outcome("ok", "ok")}, winner="svc")),
    ]
    assert not router.can_resume("p", "svc")


def test_resumed_publisher_keeps_its_pending_tasks():
    """A task still running when the publisher resumes reports to the new connection."""
    router = make_router()
    started_task(router)
    router.disconnect("p", 0.2)
    assert router.connect("p", CRED, 1) == []
    assert router.receive("w", Update("t1", 2), 0.3) == [Outgoing("p", Update("t1", 2, "svc"))]


def test_grace_expiry_cancels_the_workers():
    """Past resume_grace the publisher is gone for good: its workers get a Cancel."""
    router = make_router()
    started_task(router)
    router.disconnect("p", 0.2)
    assert router.expire(5.1) == []
    assert router.expire(5.2) == [Outgoing("w", Cancel("t1", "publisher gone"))]
    assert not router.can_resume("p", "svc")
    assert router.pending_count() == 0


def test_resume_requires_the_same_service():
    """Another service cannot take a detached session over."""
    router = make_router()
    started_task(router)
    router.disconnect("p", 0.2)
    assert not router.can_resume("p", "other")


def test_no_grace_means_cancel_at_once():
    """With resume_grace=0 a publisher's drop cancels its tasks immediately."""
    router = Router(task_start_timeout=1.0, task_finish_timeout=10.0)
    router.connect("w", CRED, 4)
    router.receive("w", Subscribe(1, "job"), 0.0)
    router.connect("p", CRED, 1)
    started_task(router)
    assert router.disconnect("p", 0.2) == [Outgoing("w", Cancel("t1", "publisher gone"))]


def test_buffered_updates_are_bounded_but_the_result_is_kept():
    """Past max_buffered updates are dropped (and counted); the Done is always kept."""
    router = make_router(max_buffered=2)
    started_task(router)
    router.disconnect("p", 0.2)
    for i in range(5):
        router.receive("w", Update("t1", i), 0.3)
    router.receive("w", Result("t1", None), 0.4)
    missed = router.connect("p", CRED, 1)
    assert [type(o.message).__name__ for o in missed] == ["Update", "Update", "Done"]
    assert router.dropped_updates == 3


def test_max_pending_rejects_the_next_task():
    """A connection with max_pending tasks pending gets too_many_pending for the next."""
    router = make_router(max_pending=1)
    started_task(router)
    out = router.receive("p", Publish("t2", "job", None), 0.2)
    assert out == [
        Outgoing(
            "p",
            Done(
                "t2",
                {},
                error=ErrorInfo(
                    "too_many_pending", "too many pending tasks on one connection (max 1)"
                ),
            ),
        )
    ]


def test_max_subscriptions_rejects_the_next_pattern():
    """Past max_subscriptions a new pattern is refused; re-subscribing an old one is fine."""
    router = Router(task_start_timeout=1.0, task_finish_timeout=10.0, max_subscriptions=1)
    router.connect("w", CRED, 1)
    assert router.receive("w", Subscribe(1, "a"), 0.0) == [Outgoing("w", Reply(1))]
    assert router.receive("w", Subscribe(2, "a"), 0.0) == [Outgoing("w", Reply(2))]
    [out] = router.receive("w", Subscribe(3, "b"), 0.0)
    assert out.message.error.code == "too_many_subscriptions"


def test_resume_answers_each_own_pending_id_once_and_no_more_than_it_published():
    """A resuming hello's pending list: duplicates and other sessions' ids get no
    answer, and past the number of tasks the session ever published nothing more is
    built (a client cannot be waiting for more)."""
    router = make_router(own_task_ids=True)
    router.receive("p", Publish("p.1", "job"), 0.0)
    (done,) = router.receive("w", Result("p.1", "ok"), 0.1)
    router.receive("p", Publish("p.2", "job"), 0.1)
    router.receive("w", Result("p.2", "ok"), 0.1)
    router.receive("p", Publish("p.3", "job"), 0.1)
    router.receive("w", Result("p.3", "ok"), 0.1)
    router.disconnect("p", 0.2)
    pending = ["p.1", "p.1", "p.1", "q.7", "other", "p.9", "p.9", "p.8", "p.7", "p.6"]
    out = router.connect("p", CRED, 1, pending)
    assert [o.message.task for o in out] == ["p.1", "p.9", "p.8"]
    assert out[0] == done  # answered again from the recent results
    assert [o.message.error.code for o in out[1:]] == ["connection_lost"] * 2


def test_resume_answers_lost_results_beyond_max_pending():
    """Results lost in flight no longer count against max_pending, so a session may
    wait for more of them than max_pending: every one is answered on resume."""
    router = make_router(own_task_ids=True, max_pending=1)
    for n in (1, 2, 3):
        router.receive("p", Publish(f"p.{n}", "job"), 0.0)
        router.receive("w", Result(f"p.{n}", n), 0.1)
    router.disconnect("p", 0.2)
    out = router.connect("p", CRED, 1, ["p.1", "p.2", "p.3"])
    assert [o.message.result for o in out] == [1, 2, 3]
