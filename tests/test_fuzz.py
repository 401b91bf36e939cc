"""Property tests: decode() of random and mutated input, and a Router driven at random."""

from __future__ import annotations

import json

import hypothesis.strategies as st
from hypothesis import HealthCheck, assume, given, settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from taskhub_sync import protocol as p
from taskhub_sync.errors import AuthenticationError, ProtocolError
from taskhub_sync.router import Credential, Outgoing, Router, RState

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SEEDS = [
    p.Hello(name="mailer", key="k", concurrency=2),
    p.Welcome(session="s", max_message_size=10, task_start_timeout=0.1),
    p.Subscribe(id=1, pattern="a:*"),
    p.Unsubscribe(id=1, pattern="a"),
    p.Reply(id=1, error=p.ErrorInfo("c", "m", service="s", remote_type="E")),
    p.Publish(task="t", topic="a", payload={"x": [1]}, timeout=2.0),
    p.Task(task="t", topic="a", payload=[1, "x"], publisher="p"),
    p.Start(task="t"),
    p.Update(task="t", data=1, service="s"),
    p.Result(task="t", result={"r": None}),
    p.Fail(task="t", error_type="E", message="m"),
    p.Cancel(task="t", reason="r"),
    p.Done(
        task="t",
        outcomes={"a": p.Outcome(p.OK, 1), "b": p.Outcome(p.FAILED, error=p.ErrorInfo("c", "m"))},
        winner="a",
        error=p.ErrorInfo("c", "m"),
    ),
]

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=10**300, max_value=10**400)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10)
    | st.sampled_from(list(p._TYPES) + [p.OK, p.FAILED, "*", "a:*"])
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def _decode_ok_or_protocol_error(text: str | bytes) -> p.Message | None:
    """decode(text), or None if it raised ProtocolError; any other exception escapes."""
    try:
        return p.decode(text)
    except ProtocolError:
        return None


def _check_reencodes(message: p.Message | None) -> None:
    """A decoded message encodes again, and decoding that is a fixed point."""
    if message is None:
        return
    text = p.encode(message)
    text.encode("utf-8")  # valid for a WebSocket text frame
    again = p.decode(text)
    assert type(again) is type(message)
    assert p.decode(p.encode(again)) == again


@FAST
@given(st.text(max_size=200))
def test_decode_random_text(text: str) -> None:
    """Arbitrary text: decode() returns a message or raises ProtocolError, nothing else."""
    _check_reencodes(_decode_ok_or_protocol_error(text))


@FAST
@given(st.binary(max_size=200))
def test_decode_random_bytes(data: bytes) -> None:
    """Arbitrary bytes: decode() returns a message or raises ProtocolError, nothing else."""
    _check_reencodes(_decode_ok_or_protocol_error(data))


@FAST
@given(json_values)
def test_decode_random_json(value: object) -> None:
    """Any JSON value (mostly not a message): only ProtocolError."""
    _check_reencodes(_decode_ok_or_protocol_error(json.dumps(value)))


@st.composite
def mutated_objects(draw: st.DrawFn) -> str:
    """A valid message's wire object with fields deleted, retyped or added."""
    obj = json.loads(p.encode(draw(st.sampled_from(SEEDS))))
    for _ in range(draw(st.integers(1, 3))):
        keys = sorted(obj)
        action = draw(st.sampled_from(["delete", "retype", "add", "nest"]))
        if action == "delete" and keys:
            del obj[draw(st.sampled_from(keys))]
        elif action == "retype" and keys:
            obj[draw(st.sampled_from(keys))] = draw(json_values)
        elif action == "add":
            obj[draw(st.text(max_size=8))] = draw(json_values)
        elif action == "nest":
            for key in ("outcomes", "error"):
                if isinstance(obj.get(key), dict) and obj[key]:
                    inner = obj[key]
                    sub = draw(st.sampled_from(sorted(inner)))
                    inner[sub] = draw(json_values)
    return json.dumps(obj)


@FAST
@given(mutated_objects())
def test_decode_mutated_messages(text: str) -> None:
    """Valid messages with fields removed, retyped or added: only ProtocolError."""
    _check_reencodes(_decode_ok_or_protocol_error(text))


@st.composite
def mutated_text(draw: st.DrawFn) -> str:
    """A valid message's JSON text with characters cut, inserted or replaced."""
    text = p.encode(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(text)))
        action = draw(st.sampled_from(["cut", "insert", "replace", "truncate"]))
        piece = draw(st.sampled_from(['"', "{", "}", "[", "]", ",", ":", "0", "-", "e", "\\", "n"]))
        if action == "cut":
            text = text[:i] + text[i + 1 :]
        elif action == "insert":
            text = text[:i] + piece + text[i:]
        elif action == "replace":
            text = text[:i] + piece + text[i + 1 :]
        else:
            text = text[:i]
    return text


@FAST
@given(mutated_text())
def test_decode_mutated_text(text: str) -> None:
    """Valid JSON text with characters cut, inserted or replaced: only ProtocolError."""
    _check_reencodes(_decode_ok_or_protocol_error(text))


@FAST
@given(st.sampled_from(SEEDS), st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-2E400"]))
def test_decode_non_finite_numbers_anywhere(seed: p.Message, constant: str) -> None:
    """NaN, Infinity or an overflowing number in any field is rejected with ProtocolError."""
    obj = json.loads(p.encode(seed))
    for key in sorted(obj):
        if key == "type":
            continue
        text = json.dumps({**obj, key: "@@"}).replace('"@@"', constant)
        try:
            p.decode(text)
        except ProtocolError:
            continue
        raise AssertionError(f"{constant} accepted in {key!r}: {text}")


# ----------------------------------------------------------------- the router at random

SERVICES = {
    "s0": Credential("s0", sub_permissions=("*",), pub_permissions=("*",), max_instances=1),
    "s1": Credential("s1", sub_permissions=("a",), pub_permissions=("a", "b"), max_instances=2),
    "s2": Credential("s2", sub_permissions=("b", "a:x"), pub_permissions=("*",), max_instances=3),
}
PATTERNS = ["a", "a:*", "a:x", "a:x:*", "b", "*", "c", "bad pattern"]
TOPICS = ["a", "a:x", "a:x:y", "b", "c", "bad topic"]
WORKER_MESSAGES = ["start", "update", "result", "fail"]


def _worker_message(kind: str, task_id: str, n: int) -> p.Message:
    if kind == "start":
        return p.Start(task_id)
    if kind == "update":
        return p.Update(task_id, n)
    if kind == "result":
        return p.Result(task_id, n)
    return p.Fail(task_id, "E", str(n))


class RouterMachine(RuleBasedStateMachine):
    """Random connects, subscriptions, publishes, worker messages, disconnects and
    expiries from several connections; invariants checked after every step."""

    def __init__(self) -> None:
        super().__init__()
        self.router = Router(task_start_timeout=1.0, task_finish_timeout=5.0)
        self.now = 0.0
        self.n_conns = 0
        self.n_tasks = 0
        self.publisher_of: dict[str, str] = {}  # task id -> publishing conn id
        self.dones: dict[str, int] = {}  # task id -> Done messages seen
        self.gone_before_done: set[str] = set()  # task ids whose publisher left first

    # -- helpers

    def live(self) -> list[str]:
        return sorted(self.router._conns)

    def snapshot(self) -> tuple:
        r = self.router
        return (
            {tid: r.task_state(tid) for tid in r._tasks},
            {
                cid: (r.held_count(cid), sorted(c.patterns), sorted(c.published))
                for cid, c in r._conns.items()
            },
            {tid: (t.open, t.winner, t.window_open) for tid, t in r._tasks.items()},
            r.late_messages,
            len(r._deadlines),
        )

    def feed(self, call, *args) -> list[Outgoing] | None:
        """Call a router input; only ProtocolError may escape, and it changes nothing."""
        before = self.snapshot()
        try:
            out = call(*args)
        except ProtocolError:
            assert self.snapshot() == before
            return None
        self.check_outgoing(out)
        return out

    def check_outgoing(self, out: list[Outgoing]) -> None:
        live = set(self.router._conns)
        for o in out:
            assert o.conn_id in live, o
            if isinstance(o.message, p.Done):
                tid = o.message.task
                assert self.publisher_of[tid] == o.conn_id
                self.dones[tid] = self.dones.get(tid, 0) + 1
                assert self.dones[tid] == 1, f"second Done for {tid}"
                assert tid not in self.router._tasks
            elif isinstance(o.message, p.Update):
                assert self.publisher_of[o.message.task] == o.conn_id

    # -- rules

    @initialize(concurrency=st.lists(st.integers(1, 3), min_size=3, max_size=3))
    def start_with_workers(self, concurrency: list[int]) -> None:
        """Begin with one subscribed instance per service, so tasks flow from step one."""
        for (service, patterns), slots in zip(
            [("s0", ["*"]), ("s1", ["a"]), ("s2", ["b", "a:x"])], concurrency
        ):
            self.n_conns += 1
            conn_id = f"{service}#{self.n_conns}"
            self.router.connect(conn_id, SERVICES[service], slots)
            for pattern in patterns:
                assert self.router.receive(conn_id, p.Subscribe(1, pattern), 0.0) == [
                    Outgoing(conn_id, p.Reply(1))
                ]

    @rule(service=st.sampled_from(sorted(SERVICES)), concurrency=st.integers(1, 3))
    def connect(self, service: str, concurrency: int) -> None:
        self.n_conns += 1
        conn_id = f"{service}#{self.n_conns}"
        try:
            out = self.router.connect(conn_id, SERVICES[service], concurrency)
        except AuthenticationError:
            assert self.router.instances(service) == SERVICES[service].max_instances
            assert conn_id not in self.router._conns
            return
        assert not out  # nothing to resume: resume_grace is 0
        assert conn_id in self.router._conns

    @precondition(lambda self: self.router._conns)
    @rule(data=st.data(), pattern=st.sampled_from(PATTERNS), unsub=st.booleans())
    def subscribe(self, data: st.DataObject, pattern: str, unsub: bool) -> None:
        conn_id = data.draw(st.sampled_from(self.live()))
        msg = p.Unsubscribe(1, pattern) if unsub else p.Subscribe(1, pattern)
        out = self.feed(self.router.receive, conn_id, msg, self.now)
        assert out is not None and out[0] == Outgoing(conn_id, out[0].message)
        assert isinstance(out[0].message, p.Reply)

    @precondition(lambda self: self.router._conns)
    @rule(
        data=st.data(),
        topic=st.sampled_from(TOPICS),
        timeout=st.none() | st.sampled_from([0.5, 2.0, 20.0]),
        duplicate=st.booleans(),
    )
    def publish(self, data: st.DataObject, topic: str, timeout, duplicate: bool) -> None:
        conn_id = data.draw(st.sampled_from(self.live()))
        if duplicate and self.router._tasks:
            task_id = data.draw(st.sampled_from(sorted(self.router._tasks)))
            assert (
                self.feed(self.router.receive, conn_id, p.Publish(task_id, topic), self.now) is None
            )
            return
        self.n_tasks += 1
        task_id = f"t{self.n_tasks}"
        self.publisher_of[task_id] = conn_id
        out = self.feed(
            self.router.receive, conn_id, p.Publish(task_id, topic, None, timeout), self.now
        )
        assert out is not None

    @precondition(lambda self: self.router._conns and self.publisher_of)
    @rule(data=st.data(), kind=st.sampled_from(WORKER_MESSAGES))
    def any_worker_message(self, data: st.DataObject, kind: str) -> None:
        conn_id = data.draw(st.sampled_from(self.live()))
        task_id = data.draw(st.sampled_from(sorted(self.publisher_of)))
        self.feed(self.router.receive, conn_id, _worker_message(kind, task_id, 0), self.now)

    @precondition(lambda self: any(c.held for c in self.router._conns.values()))
    @rule(data=st.data(), kind=st.sampled_from(WORKER_MESSAGES), n=st.integers(0, 9))
    def held_worker_message(self, data: st.DataObject, kind: str, n: int) -> None:
        conn_id = data.draw(st.sampled_from([c for c in self.live() if self.router._conns[c].held]))
        task_id = data.draw(st.sampled_from(sorted(self.router._conns[conn_id].held)))
        self.feed(self.router.receive, conn_id, _worker_message(kind, task_id, n), self.now)

    @precondition(lambda self: self.router._conns)
    @rule(data=st.data())
    def disconnect(self, data: st.DataObject) -> None:
        conn_id = data.draw(st.sampled_from(self.live()))
        mine = {tid for tid, pub in self.publisher_of.items() if pub == conn_id}
        self.gone_before_done |= {tid for tid in mine if tid not in self.dones}
        out = self.feed(self.router.disconnect, conn_id, self.now)
        assert out is not None
        assert conn_id not in self.router._conns
        assert not any(self.router._tasks[t].publisher == conn_id for t in self.router._tasks)

    @precondition(lambda self: self.router.has_pending())
    @rule(dt=st.sampled_from([0.0, 0.3, 1.0, 2.5, 6.0]))
    def expire(self, dt: float) -> None:
        self.now += dt
        out = self.feed(self.router.expire, self.now)
        assert out is not None
        nxt = self.router.next_deadline()
        assert nxt is None or nxt > self.now

    @precondition(lambda self: self.router.has_pending())
    @rule()
    def shutdown(self) -> None:
        out = self.feed(self.router.shutdown)
        assert out is not None
        assert not self.router.has_pending()
        assert all(isinstance(o.message, p.Done) for o in out)

    # -- invariants

    @invariant()
    def open_counts_match(self) -> None:
        for task in self.router._tasks.values():
            without = sum(1 for r in task.recipients.values() if r.outcome is None)
            assert task.open == without > 0, task.id

    @invariant()
    def slots_respected(self) -> None:
        for conn in self.router._conns.values():
            assert len(conn.held) <= conn.concurrency, conn.id
            for task_id, r in conn.held.items():
                assert r.conn_id == conn.id and r.task.id == task_id
                assert r.state in (RState.DELIVERED, RState.STARTED, RState.ENDED)

    @invariant()
    def pending_tasks_are_consistent(self) -> None:
        for task_id, task in self.router._tasks.items():
            assert task.publisher in self.router._conns
            assert task_id in self.router._conns[task.publisher].published
            assert task_id not in self.dones
            for r in task.recipients.values():
                if r.state is RState.QUEUED:
                    assert r.outcome is None and r.conn_id is None
                if r.state in (RState.DELIVERED, RState.STARTED) and r.outcome is None:
                    assert self.router._conns[r.conn_id].held[task_id] is r

    @invariant()
    def instance_counts_match(self) -> None:
        counts: dict[str, int] = {}
        for conn in self.router._conns.values():
            counts[conn.credential.name] = counts.get(conn.credential.name, 0) + 1
        for name, cred in SERVICES.items():
            assert self.router.instances(name) == counts.get(name, 0) <= cred.max_instances

    def teardown(self) -> None:
        # Run out every clock: every task still pending must end now.
        out = self.router.expire(self.now + 1e6)
        self.check_outgoing(out)
        assert not self.router.has_pending()
        for task_id in self.publisher_of:
            if task_id in self.gone_before_done:
                assert task_id not in self.dones
            else:
                assert self.dones.get(task_id) == 1, f"{task_id} got no Done"


RouterMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_router_random_conversations = RouterMachine.TestCase


@FAST
@given(st.lists(st.sampled_from(TOPICS[:-1]), min_size=1, max_size=30), st.integers(1, 4))
def test_router_every_publish_gets_one_done(topics: list[str], concurrency: int) -> None:
    """Whatever gets published to busy workers that always answer, each task ends once."""
    assume(topics)
    r = Router(task_start_timeout=1.0, task_finish_timeout=5.0)
    r.connect("w", SERVICES["s0"], concurrency)
    r.receive("w", p.Subscribe(1, "*"), 0.0)
    dones: list[str] = []
    queue: list[str] = []
    for n, topic in enumerate(topics):
        for o in r.receive("w", p.Publish(f"t{n}", topic), 0.0):
            if isinstance(o.message, p.Task):
                queue.append(o.message.task)
            else:
                dones.append(o.message.task)
    while queue:
        for o in r.receive("w", p.Result(queue.pop(0), 1), 0.0):
            if isinstance(o.message, p.Task):
                queue.append(o.message.task)
            elif isinstance(o.message, p.Done):
                assert o.message.winner == "s0"
                dones.append(o.message.task)
    assert sorted(dones) == sorted(f"t{n}" for n in range(len(topics)))
    assert not r.has_pending()
