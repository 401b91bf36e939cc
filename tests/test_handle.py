"""Unit tests of TaskHandle without a client: drive _add_update/_complete directly."""

from __future__ import annotations

import concurrent.futures
import logging
import threading

import pytest

from taskhub_sync import protocol as p
from taskhub_sync.errors import (
    ConcurrencyError,
    InvalidState,
    NoSubscribers,
    TaskFailed,
    TaskHubError,
)
from taskhub_sync.handle import TaskHandle

OUTCOMES = {"s1": p.Outcome(p.OK, result=42)}


def _failure() -> TaskFailed:
    return TaskFailed(
        "ValueError: bad",
        task_id="t1",
        topic="topic",
        service="s1",
        remote_type="ValueError",
        remote_message="bad",
    )


def _run(target, *args) -> threading.Thread:
    """Start a thread running target(*args) and return it."""
    thread = threading.Thread(target=target, args=args)
    thread.start()
    return thread


def _join(thread: threading.Thread) -> None:
    thread.join(5)
    assert not thread.is_alive()


@pytest.fixture
def handle() -> TaskHandle:
    return TaskHandle("t1", "topic")


# ----------------------------------------------------------------- basics


def test_new_handle_is_running(handle: TaskHandle) -> None:
    """A fresh handle is running, not done, cannot be cancelled, and has no results."""
    assert handle.running()
    assert not handle.done()
    assert handle.cancel() is False
    assert handle.results == {}
    assert handle.updates == []
    assert handle.task_id == "t1" and handle.topic == "topic"
    assert "running" in repr(handle)


def test_is_a_future(handle: TaskHandle) -> None:
    """TaskHandle is a concurrent.futures.Future."""
    assert isinstance(handle, concurrent.futures.Future)


def test_result_and_results(handle: TaskHandle) -> None:
    """After _complete() get_result() returns the result and results the outcomes."""
    handle._complete(42, None, OUTCOMES)
    assert handle.done()
    assert handle.get_result() == 42
    assert handle.get_result(timeout=0) == 42
    assert handle.results == OUTCOMES
    assert "done" in repr(handle)


def test_results_is_a_copy(handle: TaskHandle) -> None:
    """Mutating the returned results dict does not change the handle."""
    handle._complete(42, None, OUTCOMES)
    handle.results.clear()
    assert handle.results == OUTCOMES


def test_none_result(handle: TaskHandle) -> None:
    """None is a real result (all recipients only saw the task)."""
    handle._complete(None, None, {"s1": p.Outcome(p.SEEN)})
    assert handle.get_result() is None
    assert handle.get_result(default="dflt") is None


# ----------------------------------------------------------------- timeouts and defaults


@pytest.mark.parametrize("timeout", [0, -1, 0.01])
def test_get_result_timeout_raises_builtin_timeout_error(handle: TaskHandle, timeout) -> None:
    """A pending handle raises the builtin TimeoutError naming the task."""
    with pytest.raises(TimeoutError, match="t1"):
        handle.get_result(timeout=timeout)
    assert not handle.done()


@pytest.mark.parametrize("default", [None, 0, "dflt", []])
def test_default_on_timeout(handle: TaskHandle, default) -> None:
    """With a default, a wait timeout returns it (None included)."""
    assert handle.get_result(timeout=0, default=default) is default


@pytest.mark.parametrize("default", [None, "dflt"])
def test_default_on_error(handle: TaskHandle, default) -> None:
    """With a default, a failed task returns it instead of raising."""
    handle._complete(None, _failure(), {})
    assert handle.get_result(default=default) is default
    assert handle.get_result(timeout=1, default=default) is default


def test_errors_propagate(handle: TaskHandle) -> None:
    """Without a default the task's error is raised as is, with its fields."""
    error = _failure()
    outcomes = {"s1": p.Outcome(p.FAILED, error=p.ErrorInfo("failed", "x"))}
    handle._complete(None, error, outcomes)
    with pytest.raises(TaskFailed) as info:
        handle.get_result(timeout=1)
    assert info.value is error
    assert info.value.remote_type == "ValueError"
    assert info.value.service == "s1"
    assert handle.exception() is error
    assert handle.results == outcomes


def test_get_result_wakes_when_completed_from_another_thread(handle: TaskHandle) -> None:
    """get_result() blocks until another thread completes the handle."""
    started = threading.Event()
    got = []

    def wait() -> None:
        started.set()
        got.append(handle.get_result(timeout=5))

    waiter = _run(wait)
    assert started.wait(5)
    handle._complete("r", None, {})
    _join(waiter)
    assert got == ["r"]


def test_complete_twice_raises_and_keeps_first_result(handle: TaskHandle) -> None:
    """A second completion raises InvalidState; the first result stands."""
    handle._complete(1, None, OUTCOMES)
    with pytest.raises(InvalidState):
        handle._complete(2, None, {})
    assert handle.get_result() == 1


def test_complete_twice_keeps_first_outcomes(handle: TaskHandle) -> None:
    """A second (illegal) completion leaves results as the first one set them."""
    handle._complete(1, None, OUTCOMES)
    with pytest.raises(InvalidState):
        handle._complete(2, None, {"other": p.Outcome(p.SEEN)})
    assert handle.results == OUTCOMES


# ----------------------------------------------------------------- reader thread


def test_get_result_on_reader_thread_raises_concurrency_error() -> None:
    """get_result() on a pending handle from the reader thread raises ConcurrencyError."""
    box: list = []

    def reader_body() -> None:
        try:
            handle.get_result(timeout=5)
        except BaseException as exc:
            box.append(exc)

    reader = threading.Thread(target=reader_body)
    handle = TaskHandle("t1", "topic", reader=reader)
    reader.start()
    _join(reader)
    assert len(box) == 1 and isinstance(box[0], ConcurrencyError)
    assert isinstance(box[0], TaskHubError)


def test_get_result_on_reader_thread_with_default() -> None:
    """On the reader thread, a pending handle with a default returns the default."""
    box: list = []
    reader = threading.Thread(target=lambda: box.append(handle.get_result(default="d")))
    handle = TaskHandle("t1", "topic", reader=reader)
    reader.start()
    _join(reader)
    assert box == ["d"]


def test_get_result_on_reader_thread_when_done() -> None:
    """On the reader thread, a done handle just returns its result."""
    box: list = []
    reader = threading.Thread(target=lambda: box.append(handle.get_result()))
    handle = TaskHandle("t1", "topic", reader=reader)
    handle._complete(7, None, {})
    reader.start()
    _join(reader)
    assert box == [7]


def test_get_result_off_reader_thread_waits_normally() -> None:
    """Another thread than the reader gets the ordinary TimeoutError, not ConcurrencyError."""
    reader = threading.Thread(target=lambda: None)
    handle = TaskHandle("t1", "topic", reader=reader)
    with pytest.raises(TimeoutError):
        handle.get_result(timeout=0)


# ----------------------------------------------------------------- on()


def test_on_update_in_order(handle: TaskHandle) -> None:
    """on("update") gets every update in order; updates lists them."""
    seen: list = []
    handle.on("update", seen.append)
    for i in range(5):
        handle._add_update({"sent": i})
    assert seen == [{"sent": i} for i in range(5)]
    assert handle.updates == seen


def test_on_update_attached_late_gets_backlog_then_new(handle: TaskHandle) -> None:
    """A late update listener first gets the backlog in order, then new updates."""
    handle._add_update(1)
    handle._add_update(2)
    seen: list = []
    handle.on("update", seen.append)
    assert seen == [1, 2]
    handle._add_update(3)
    assert seen == [1, 2, 3]


def test_updates_after_done_are_dropped(handle: TaskHandle) -> None:
    """Updates arriving after completion are ignored."""
    seen: list = []
    handle.on("update", seen.append)
    handle._add_update(1)
    handle._complete("r", None, {})
    handle._add_update(2)
    assert seen == [1]
    assert handle.updates == [1]


def test_on_update_after_done_replays_backlog(handle: TaskHandle) -> None:
    """An update listener attached after the end still gets every update."""
    handle._add_update("a")
    handle._add_update("b")
    handle._complete("r", None, {})
    seen: list = []
    handle.on("update", seen.append)
    assert seen == ["a", "b"]


def test_on_result_error_done_on_success(handle: TaskHandle) -> None:
    """On success, result and done callbacks run once; error callbacks do not."""
    calls: list = []
    handle.on("result", lambda r: calls.append(("result", r)))
    handle.on("error", lambda e: calls.append(("error", e)))
    handle.on("done", lambda h: calls.append(("done", h)))
    assert calls == []
    handle._complete(42, None, {})
    assert calls == [("result", 42), ("done", handle)]


def test_on_result_error_done_on_failure(handle: TaskHandle) -> None:
    """On failure, error and done callbacks run once; result callbacks do not."""
    calls: list = []
    error = NoSubscribers("nobody", task_id="t1", topic="topic")
    handle.on("result", lambda r: calls.append(("result", r)))
    handle.on("error", lambda e: calls.append(("error", e)))
    handle.on("done", lambda h: calls.append(("done", h)))
    handle._complete(None, error, {})
    assert calls == [("error", error), ("done", handle)]


def test_on_result_with_none_result(handle: TaskHandle) -> None:
    """A None result still calls on("result") (with None), not on("error")."""
    calls: list = []
    handle.on("result", lambda r: calls.append(("result", r)))
    handle.on("error", lambda e: calls.append(("error", e)))
    handle._complete(None, None, {})
    assert calls == [("result", None)]


@pytest.mark.parametrize("event", ["result", "done"])
def test_callback_attached_after_end_runs_at_once(handle: TaskHandle, event: str) -> None:
    """result/done callbacks attached after completion run immediately."""
    handle._complete(5, None, {})
    calls: list = []
    handle.on(event, calls.append)
    assert len(calls) == 1


def test_error_callback_attached_after_end_runs_at_once(handle: TaskHandle) -> None:
    """An error callback attached after a failure runs immediately with the error."""
    error = _failure()
    handle._complete(None, error, {})
    calls: list = []
    handle.on("error", calls.append)
    assert calls == [error]


def test_on_is_chainable(handle: TaskHandle) -> None:
    """on() returns the handle, so calls chain."""
    calls: list = []
    same = (
        handle.on("update", lambda d: calls.append(("u", d)))
        .on("result", lambda r: calls.append(("r", r)))
        .on("done", lambda h: calls.append(("d", h.task_id)))
    )
    assert same is handle
    handle._add_update(1)
    handle._complete(2, None, {})
    assert calls == [("u", 1), ("r", 2), ("d", "t1")]


def test_on_unknown_event_raises(handle: TaskHandle) -> None:
    """An unknown event name raises ValueError listing the valid ones."""
    with pytest.raises(ValueError, match="update"):
        handle.on("progress", print)


@pytest.mark.parametrize("event", ["update", "result", "error", "done"])
def test_on_with_a_non_callable_raises_at_once(handle: TaskHandle, event: str) -> None:
    """on(event, 5) is a TypeError when called, not a logged error at the first update."""
    with pytest.raises(TypeError, match="callable"):
        handle.on(event, 5)  # type: ignore[arg-type]
    handle._add_update(1)
    handle._complete(2, None, {})
    assert handle.get_result() == 2


def test_update_callback_exception_is_logged_not_raised(
    handle: TaskHandle, caplog: pytest.LogCaptureFixture
) -> None:
    """A raising update callback is logged; later updates and other listeners go on."""
    seen: list = []

    def bad(data) -> None:
        raise RuntimeError(f"boom {data}")

    handle.on("update", bad).on("update", seen.append)
    with caplog.at_level(logging.ERROR):
        handle._add_update(1)
        handle._add_update(2)
    assert seen == [1, 2]
    records = [r for r in caplog.records if r.name == "taskhub_sync.handle"]
    assert len(records) == 2
    assert "t1" in records[0].getMessage()
    assert records[0].exc_info is not None and "boom 1" in str(records[0].exc_info[1])


@pytest.mark.parametrize("event", ["result", "done"])
def test_done_callback_exception_is_logged_not_raised(
    handle: TaskHandle, caplog: pytest.LogCaptureFixture, event: str
) -> None:
    """A raising result/done callback is logged and later callbacks still run."""
    calls: list = []

    def bad(_) -> None:
        raise RuntimeError("boom")

    handle.on(event, bad).on("done", calls.append)
    with caplog.at_level(logging.ERROR):
        handle._complete(1, None, {})
    assert calls == [handle]
    assert any(r.exc_info and "boom" in str(r.exc_info[1]) for r in caplog.records)
    assert handle.get_result() == 1


def test_add_done_callback_order(handle: TaskHandle) -> None:
    """Done callbacks run once each, in the order added, with the handle."""
    calls: list = []
    handle.add_done_callback(lambda h: calls.append((1, h)))
    handle.on("done", lambda h: calls.append((2, h)))
    handle._complete(None, None, {})
    assert calls == [(1, handle), (2, handle)]


# ----------------------------------------------------------------- concurrent.futures


def test_concurrent_futures_wait() -> None:
    """concurrent.futures.wait() sees done and pending handles correctly."""
    handles = [TaskHandle(f"t{i}", "topic") for i in range(4)]
    handles[1]._complete("ok", None, {})
    handles[3]._complete(None, _failure(), {})
    done, pending = concurrent.futures.wait(handles, timeout=0)
    assert done == {handles[1], handles[3]}
    assert pending == {handles[0], handles[2]}
    done, pending = concurrent.futures.wait(
        handles, timeout=0, return_when=concurrent.futures.FIRST_EXCEPTION
    )
    assert handles[3] in done


def test_concurrent_futures_wait_wakes_on_completion() -> None:
    """wait(FIRST_COMPLETED) returns when another thread completes a handle."""
    handles = [TaskHandle(f"t{i}", "topic") for i in range(3)]
    completer = _run(lambda: handles[2]._complete("x", None, {}))
    done, _ = concurrent.futures.wait(
        handles, timeout=5, return_when=concurrent.futures.FIRST_COMPLETED
    )
    _join(completer)
    assert done == {handles[2]}


def test_as_completed_yields_in_completion_order() -> None:
    """as_completed() yields handles as other threads complete them."""
    handles = [TaskHandle(f"t{i}", "topic") for i in range(3)]
    order = [2, 0, 1]
    got = []
    first = threading.Event()

    def complete_all() -> None:
        handles[order[0]]._complete(order[0], None, {})
        first.wait(5)
        for i in order[1:]:
            handles[i]._complete(i, None, {})

    completer = _run(complete_all)
    for h in concurrent.futures.as_completed(handles, timeout=5):
        got.append(h.get_result())
        first.set()
    _join(completer)
    assert got[0] == 2
    assert sorted(got) == [0, 1, 2]


# ----------------------------------------------------------------- stress


@pytest.mark.parametrize("run", range(3))
def test_concurrent_updates_and_listeners_each_exactly_once_in_order(run: int) -> None:
    """Updates added while listeners attach: each listener sees each update once, in order."""
    handle = TaskHandle("t1", "topic")
    n_updates, n_listeners = 2000, 50
    seen: list[list[int]] = [[] for _ in range(n_listeners)]
    go = threading.Barrier(2)

    def produce() -> None:
        go.wait(5)
        for i in range(n_updates):
            handle._add_update(i)

    def attach() -> None:
        go.wait(5)
        for k in range(n_listeners):
            handle.on("update", seen[k].append)

    threads = [_run(produce), _run(attach)]
    for t in threads:
        _join(t)
    expected = list(range(n_updates))
    for k in range(n_listeners):
        assert seen[k] == expected, f"listener {k} saw {len(seen[k])} updates"


def test_concurrent_producers_and_slow_listener() -> None:
    """A listener fed by backlog replay and new updates at once: once each, in order, serial."""
    handle = TaskHandle("t1", "topic")
    seen: list[int] = []
    active = [0]
    overlap = []

    def listener(data: int) -> None:
        active[0] += 1
        if active[0] > 1:
            overlap.append(data)
        seen.append(data)
        active[0] -= 1

    for i in range(500):
        handle._add_update(i)
    go = threading.Barrier(2)

    def produce() -> None:
        go.wait(5)
        for i in range(500, 3000):
            handle._add_update(i)

    def attach() -> None:
        go.wait(5)
        handle.on("update", listener)

    threads = [_run(produce), _run(attach)]
    for t in threads:
        _join(t)
    assert seen == list(range(3000))
    assert overlap == []
