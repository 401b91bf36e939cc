"""The routing state machine: subscriptions, tasks and their recipients.

Pure: the Router never touches a socket, a thread, a lock or the clock. Every input
(``connect``, ``receive``, ``disconnect``, ``expire``, ``shutdown``) returns the list
of messages to send, as :class:`Outgoing`; the caller sends them. Time comes in as
``now`` (seconds on any monotonic clock) and deadlines go out via ``next_deadline()``.

Vocabulary: a *service* is a credential name; an *instance* is one authenticated
connection of a service. A task goes to every service subscribed to its topic (its
*recipients*) and, within a service, to one instance, round robin among the
instances with a free slot (an instance runs at most ``concurrency`` tasks at once).
"""

from __future__ import annotations

import enum
import heapq
import itertools
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from . import protocol as p
from . import topics
from .errors import AuthenticationError, InvalidTopic, ProtocolError


@dataclass(frozen=True)
class Credential:
    """What a service may do. The key is checked by the server, not the router."""

    name: str
    sub_permissions: tuple[str, ...] = ()
    pub_permissions: tuple[str, ...] = ()
    max_instances: int = 1


@dataclass(frozen=True)
class Outgoing:
    """A message for the router's caller to send on connection ``conn_id``."""

    conn_id: str
    message: p.Message


class RState(enum.Enum):
    """The state of one recipient (one service's share of a task)."""

    QUEUED = "queued"  # waiting for an instance with a free slot
    DELIVERED = "delivered"  # sent to an instance, no answer yet
    STARTED = "started"  # claimed with start()
    ENDED = "ended"  # outcome fixed by the hub; the instance still runs the handler
    FINISHED = "finished"  # the instance reported the handler's end; slot released


# Legal moves of a recipient on a worker's message: (state, message type) -> state.
# Anything else is a protocol violation. ENDED accepts the worker's late messages:
# the hub already decided, so they are dropped, but the final one frees the slot.
TRANSITIONS: dict[tuple[RState, type], RState] = {
    (RState.DELIVERED, p.Start): RState.STARTED,
    (RState.DELIVERED, p.Update): RState.STARTED,
    (RState.DELIVERED, p.Result): RState.FINISHED,
    (RState.DELIVERED, p.Fail): RState.FINISHED,
    (RState.STARTED, p.Start): RState.STARTED,  # a repeated claim changes nothing
    (RState.STARTED, p.Update): RState.STARTED,
    (RState.STARTED, p.Result): RState.FINISHED,
    (RState.STARTED, p.Fail): RState.FINISHED,
    (RState.ENDED, p.Start): RState.ENDED,
    (RState.ENDED, p.Update): RState.ENDED,
    (RState.ENDED, p.Result): RState.FINISHED,
    (RState.ENDED, p.Fail): RState.FINISHED,
}


@dataclass(eq=False)
class _Recipient:
    task: _Task
    service: str
    state: RState = RState.QUEUED
    conn_id: str | None = None
    outcome: p.Outcome | None = None
    start_deadline: float = 0.0  # set on delivery: start or answer by then


@dataclass(eq=False)
class _Task:
    id: str
    topic: str
    payload: Any
    publisher: str  # conn id
    publisher_service: str
    start_deadline: float  # queued recipients wait for a free slot until then
    finish_deadline: float
    finish_timeout: float  # seconds, for messages
    recipients: dict[str, _Recipient] = field(default_factory=dict)  # by service
    open: int = 0  # recipients without an outcome
    winner: str | None = None
    first_error: p.ErrorInfo | None = None
    window_open: bool = True


@dataclass(eq=False)
class _Conn:
    id: str
    credential: Credential
    concurrency: int
    patterns: set[str] = field(default_factory=set)
    held: dict[str, _Recipient] = field(default_factory=dict)  # by task id
    published: set[str] = field(default_factory=set)  # ids of its pending tasks
    # Its latest results: a resumed session asks again for those it never got.
    recent: deque[p.Done] = field(default_factory=lambda: deque(maxlen=RECENT_RESULTS))
    published_total: int = 0  # tasks its session ever published (bounds a resume)


@dataclass(eq=False)
class _Service:
    instances: int = 0
    rr: int = 0  # round-robin counter
    waiting: deque[_Recipient] = field(default_factory=deque)


@dataclass(eq=False)
class _Detached:
    """A publisher whose connection dropped, kept for resume_grace seconds."""

    conn: _Conn
    deadline: float
    buffer: list[p.Message] = field(default_factory=list)  # what it missed, in order


_START, _FINISH, _GRACE = 0, 1, 2

#: Codes a worker may put in a fail message (anything else is the handler's failure).
WORKER_CODES = frozenset({"payload_too_large"})

#: Results kept per publisher, for a resumed session to ask again for those written
#: into its dying connection before the hub noticed (a successful write proves
#: nothing: PITFALLS LP-20).
RECENT_RESULTS = 256


class Router:
    """Routes tasks between connections. Not thread-safe: callers hold one lock.

    Args:
        task_start_timeout: Seconds a task waits for its recipients to start or answer.
        task_finish_timeout: Default seconds from publish until a task times out.
        resume_grace: Seconds a disconnected publisher's tasks are kept, with the
            updates and results they produce, for it to resume its session.
        max_pending: Tasks one connection may have pending at once.
        max_subscriptions: Patterns one connection may subscribe to.
        max_buffered: Updates kept for a disconnected publisher (results always are).
        own_task_ids: Require a publisher's task ids to start with its connection
            id and a dot, so no client can take (squat) another's next ids. The hub
            turns it on; it is off by default for tests that name tasks freely.
    """

    def __init__(
        self,
        *,
        task_start_timeout: float,
        task_finish_timeout: float,
        resume_grace: float = 0.0,
        max_pending: int = 10_000,
        max_subscriptions: int = 1_000,
        max_buffered: int = 10_000,
        own_task_ids: bool = False,
    ) -> None:
        self.task_start_timeout = task_start_timeout
        self.task_finish_timeout = task_finish_timeout
        self.resume_grace = resume_grace
        self.max_pending = max_pending
        self.max_subscriptions = max_subscriptions
        self.max_buffered = max_buffered
        self.own_task_ids = own_task_ids
        self._conns: dict[str, _Conn] = {}
        self._detached: dict[str, _Detached] = {}
        self._services: dict[str, _Service] = {}
        self._tasks: dict[str, _Task] = {}
        # pattern key -> service -> instances subscribed (conn ids, in order)
        self._exact: dict[str, dict[str, list[str]]] = {}
        self._prefix: dict[str, dict[str, list[str]]] = {}
        self._deadlines: list[tuple[float, int, int, str]] = []
        self._seq = itertools.count()
        #: Counters, for stats and tests.
        self.late_messages = 0
        self.dropped_updates = 0

    # ----------------------------------------------------------------- queries

    def has_pending(self) -> bool:
        """True while any task is not done."""
        return bool(self._tasks)

    def pending_count(self) -> int:
        return len(self._tasks)

    def instances(self, service: str) -> int:
        """How many instances of ``service`` are connected."""
        svc = self._services.get(service)
        return svc.instances if svc else 0

    def held_count(self, conn_id: str) -> int:
        """Tasks instance ``conn_id`` is running (slots in use)."""
        return len(self._conns[conn_id].held)

    def task_state(self, task_id: str) -> dict[str, RState] | None:
        """Each recipient's state for a pending task, or None once it is done."""
        task = self._tasks.get(task_id)
        if task is None:
            return None
        return {svc: r.state for svc, r in task.recipients.items()}

    def next_deadline(self) -> float | None:
        """When ``expire()`` should next be called, or None if nothing is timed."""
        return self._deadlines[0][0] if self._deadlines else None

    # ----------------------------------------------------------------- inputs

    def can_resume(self, conn_id: str, service: str) -> bool:
        """True if ``conn_id`` is a detached publisher of ``service`` within its grace."""
        detached = self._detached.get(conn_id)
        return detached is not None and detached.conn.credential.name == service

    def connect(
        self,
        conn_id: str,
        credential: Credential,
        concurrency: int,
        pending: Iterable[str] = (),
    ) -> list[Outgoing]:
        """Register an authenticated connection.

        If ``conn_id`` names a detached publisher (see ``can_resume()``), the new
        connection takes its pending tasks over and gets what it missed, in order.
        ``pending`` lists the tasks the client still waits for: those that ended
        are answered again from the recent results, or failed as lost. Only the
        session's own ids count, each once, and no more of them than the session
        ever published (it cannot be waiting for more), so a hello cannot make the
        hub build an answer out of proportion to the session.

        Raises:
            AuthenticationError: If ``max_instances`` instances of it are connected.
        """
        if conn_id in self._conns:
            raise ValueError(f"connection {conn_id!r} is already registered")
        svc = self._services.setdefault(credential.name, _Service())
        if svc.instances >= credential.max_instances:
            raise AuthenticationError(
                f"too many instances of {credential.name!r} "
                f"(max_instances={credential.max_instances})"
            )
        svc.instances += 1
        conn = self._conns[conn_id] = _Conn(conn_id, credential, concurrency)
        detached = self._detached.pop(conn_id, None)
        if detached is None:
            return []
        if detached.conn.credential.name != credential.name:
            raise ValueError(f"connection {conn_id!r} belonged to another service")
        conn.published = detached.conn.published
        conn.recent = detached.conn.recent
        conn.published_total = detached.conn.published_total
        out = [Outgoing(conn_id, m) for m in detached.buffer]
        answered = {m.task for m in detached.buffer if type(m) is p.Done}
        recent = {done.task: done for done in conn.recent}
        prefix = conn_id + "."
        unknown: set[str] = set()
        for task_id in pending:
            if task_id in conn.published or task_id in answered or task_id in unknown:
                continue
            if self.own_task_ids and not task_id.startswith(prefix):
                continue  # not this session's task: nothing to tell about it
            if len(unknown) >= conn.published_total:
                break
            unknown.add(task_id)
            done = recent.get(task_id) or p.Done(
                task_id,
                {},
                error=p.ErrorInfo(
                    "connection_lost", "the result went out on the dropped connection and is lost"
                ),
            )
            out.append(Outgoing(conn_id, done))
        return out

    def receive(self, conn_id: str, message: p.Message, now: float) -> list[Outgoing]:
        """Handle one message from an authenticated connection.

        Raises:
            ProtocolError: If the message is not allowed here. The router's state is
                unchanged; the caller should close the connection.
        """
        conn = self._conns[conn_id]
        kind = type(message)
        if kind in (p.Start, p.Update, p.Result, p.Fail):
            return self._on_worker_message(conn, message, now)  # type: ignore[arg-type]
        if kind is p.Publish:
            return self._on_publish(conn, message, now)  # type: ignore[arg-type]
        if kind is p.Subscribe:
            return self._on_subscribe(conn, message, now)  # type: ignore[arg-type]
        if kind is p.Unsubscribe:
            return self._on_unsubscribe(conn, message)  # type: ignore[arg-type]
        raise ProtocolError(f"a client may not send {message.TYPE!r} now")

    def disconnect(self, conn_id: str, now: float, resumable: bool = True) -> list[Outgoing]:
        """Forget a connection: its subscriptions, its tasks and the tasks it held.

        The tasks it published are kept ``resume_grace`` seconds for the client to
        resume its session, unless ``resumable`` is false (it said goodbye).
        """
        conn = self._conns.pop(conn_id, None)
        if conn is None:
            return []
        out: list[Outgoing] = []
        name = conn.credential.name
        svc = self._services[name]
        svc.instances -= 1
        for pattern in conn.patterns:
            self._index_remove(pattern, name, conn_id)
        # Tasks it published: keep them for a while in case it comes back.
        if (conn.published or conn.recent) and resumable and self.resume_grace > 0:
            deadline = now + self.resume_grace
            self._detached[conn_id] = _Detached(conn, deadline)
            self._push_deadline(deadline, _GRACE, conn_id)
        else:
            self._abandon(conn.published, out, departing=conn_id)
        # Tasks it held: hand unstarted ones to another instance, fail the rest.
        for r in conn.held.values():
            others = self._candidates(r.task.topic).get(name)
            if r.state is RState.DELIVERED and r.task.window_open and others:
                r.state, r.conn_id = RState.QUEUED, None
                self._place(r, out, others, now)
            elif r.state in (RState.DELIVERED, RState.STARTED):
                r.state = RState.FINISHED
                error = p.ErrorInfo(
                    "worker_lost",
                    f"service {name!r} disconnected while holding task {r.task.id}",
                    service=name,
                )
                self._settle(r, p.Outcome(p.LOST, error=error), out)
            else:
                r.state = RState.FINISHED
        conn.held.clear()
        # Tasks waiting for an instance of this service that no instance left can take.
        for r in list(svc.waiting):
            if r.state is RState.QUEUED and not self._candidates(r.task.topic).get(name):
                r.state = RState.FINISHED
                self._settle(r, p.Outcome(p.LOST), out)
        if svc.instances == 0:
            svc.waiting.clear()  # every entry is settled by now
            del self._services[name]
        return out

    def expire(self, now: float) -> list[Outgoing]:
        """Apply every deadline that is due at ``now``."""
        out: list[Outgoing] = []
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            deadline, _, kind, task_id = heapq.heappop(heap)
            if kind == _GRACE:
                detached = self._detached.get(task_id)  # task_id is a conn id here
                if detached is not None and detached.deadline == deadline:
                    del self._detached[task_id]
                    self._abandon(detached.conn.published, out)
                continue
            task = self._tasks.get(task_id)
            if task is None:
                continue
            if kind == _START:
                self._close_window(task, out, now)
            elif kind == _FINISH and task.finish_deadline == deadline:
                self._time_out(task, out)
        return out

    def shutdown(self, reason: str = "hub shutting down") -> list[Outgoing]:
        """Fail every pending task (the hub is going away).

        Workers' later messages about these tasks are accepted as late ones.
        """
        out: list[Outgoing] = []
        for task in list(self._tasks.values()):
            for r in task.recipients.values():
                if r.outcome is None:
                    error = p.ErrorInfo("connection_lost", reason, service=r.service)
                    r.outcome = p.Outcome(p.LOST, error=error)
                if r.state in (RState.DELIVERED, RState.STARTED):
                    r.state = RState.ENDED
                elif r.state is RState.QUEUED:
                    r.state = RState.FINISHED
            self._tasks.pop(task.id)
            error = p.ErrorInfo("connection_lost", reason)
            self._to_publisher(task, p.Done(task.id, self._outcomes(task), error=error), out)
        self._maybe_compact()
        return out

    # ----------------------------------------------------------------- handlers

    def _on_subscribe(self, conn: _Conn, msg: p.Subscribe, now: float) -> list[Outgoing]:
        try:
            pattern = topics.validate_pattern(msg.pattern)
        except InvalidTopic as exc:
            return [Outgoing(conn.id, p.Reply(msg.id, p.ErrorInfo("invalid_topic", str(exc))))]
        cred = conn.credential
        if not topics.permits_pattern(cred.sub_permissions, pattern):
            text = f"service {cred.name!r} may not listen to {pattern!r}"
            return [Outgoing(conn.id, p.Reply(msg.id, p.ErrorInfo("permission_denied", text)))]
        if pattern not in conn.patterns and len(conn.patterns) >= self.max_subscriptions:
            text = f"too many subscriptions on one connection (max {self.max_subscriptions})"
            return [Outgoing(conn.id, p.Reply(msg.id, p.ErrorInfo("too_many_subscriptions", text)))]
        out = [Outgoing(conn.id, p.Reply(msg.id))]
        if pattern not in conn.patterns:
            conn.patterns.add(pattern)
            prefix = topics.pattern_prefix(pattern)
            index = self._exact if prefix is None else self._prefix
            key = pattern if prefix is None else prefix
            index.setdefault(key, {}).setdefault(cred.name, []).append(conn.id)
            self._drain_waiting(conn, out, now)
        return out

    def _on_unsubscribe(self, conn: _Conn, msg: p.Unsubscribe) -> list[Outgoing]:
        if msg.pattern in conn.patterns:
            conn.patterns.discard(msg.pattern)
            self._index_remove(msg.pattern, conn.credential.name, conn.id)
        return [Outgoing(conn.id, p.Reply(msg.id))]

    def _on_publish(self, conn: _Conn, msg: p.Publish, now: float) -> list[Outgoing]:
        task_id, topic = msg.task, msg.topic
        if self.own_task_ids and not task_id.startswith(conn.id + "."):
            raise ProtocolError(f"task ids must start with this session's id {conn.id!r}")
        if task_id in self._tasks:
            raise ProtocolError(f"task id {task_id!r} is already in use")
        conn.published_total += 1  # answered one way or another: a resume may ask
        cred = conn.credential
        try:
            topics.validate_topic(topic)
        except InvalidTopic as exc:
            return [self._reject(conn, task_id, "invalid_topic", str(exc))]
        if not topics.permits(cred.pub_permissions, topic):
            text = f"service {cred.name!r} may not publish to {topic!r}"
            return [self._reject(conn, task_id, "permission_denied", text)]
        if len(conn.published) >= self.max_pending:
            text = f"too many pending tasks on one connection (max {self.max_pending})"
            return [self._reject(conn, task_id, "too_many_pending", text)]
        candidates = self._candidates(topic)
        if not candidates:
            return [
                self._reject(
                    conn, task_id, "no_subscribers", f"no service is subscribed to {topic!r}"
                )
            ]
        finish = msg.timeout if msg.timeout is not None else self.task_finish_timeout
        task = _Task(
            task_id,
            topic,
            msg.payload,
            conn.id,
            cred.name,
            start_deadline=now + self.task_start_timeout,
            finish_deadline=now + finish,
            finish_timeout=finish,
        )
        self._tasks[task_id] = task
        conn.published.add(task_id)
        self._push_deadline(task.start_deadline, _START, task_id)
        self._push_deadline(task.finish_deadline, _FINISH, task_id)
        out: list[Outgoing] = []
        for service, conn_ids in candidates.items():
            r = _Recipient(task, service)
            task.recipients[service] = r
            task.open += 1
            self._place(r, out, conn_ids, now)
        return out

    def _on_worker_message(
        self, conn: _Conn, msg: p.Start | p.Update | p.Result | p.Fail, now: float
    ) -> list[Outgoing]:
        r = conn.held.get(msg.task)
        if r is None:
            raise ProtocolError(f"task {msg.task!r} is not held by this connection")
        if type(msg) is p.Fail and msg.code is not None and msg.code not in WORKER_CODES:
            raise ProtocolError(f"a worker may not fail a task with code {msg.code!r}")
        new = TRANSITIONS.get((r.state, type(msg)))
        if new is None:
            raise ProtocolError(f"{msg.TYPE!r} not allowed for a task in state {r.state.value}")
        old, r.state = r.state, new
        out: list[Outgoing] = []
        if old is RState.ENDED:
            self.late_messages += 1
        elif type(msg) is p.Update:
            self._to_publisher(r.task, p.Update(msg.task, msg.data, r.service), out)
        elif type(msg) is p.Result:
            self._settle(r, p.Outcome(p.OK, msg.result), out)
        elif type(msg) is p.Fail:
            if msg.code is None:  # the handler raised
                error = p.ErrorInfo(
                    "failed",
                    f"{msg.error_type}: {msg.message}",
                    service=r.service,
                    remote_type=msg.error_type,
                )
            else:  # the worker's library failed it (a code checked above)
                error = p.ErrorInfo(msg.code, msg.message, service=r.service)
            self._settle(r, p.Outcome(p.FAILED, error=error), out)
        if new is RState.FINISHED:
            del conn.held[msg.task]
            self._drain_waiting(conn, out, now)
        return out

    # ----------------------------------------------------------------- helpers

    def _reject(self, conn: _Conn, task_id: str, code: str, text: str) -> Outgoing:
        return Outgoing(conn.id, p.Done(task_id, {}, error=p.ErrorInfo(code, text)))

    def _candidates(self, topic: str) -> dict[str, list[str]]:
        """Instances subscribed to ``topic``, by service."""
        found: dict[str, list[str]] = {}
        exact = self._exact.get(topic)
        if exact:
            found.update(exact)
        if self._prefix:
            for key in topics.prefixes(topic):
                by_service = self._prefix.get(key)
                if by_service:
                    for service, ids in by_service.items():
                        have = found.get(service)
                        found[service] = ids if have is None else _union(have, ids)
        return found

    def _place(self, r: _Recipient, out: list[Outgoing], conn_ids: list[str], now: float) -> None:
        """Deliver a QUEUED recipient to a free instance among ``conn_ids``, or leave it
        waiting for one."""
        svc = self._services[r.service]
        n = len(conn_ids)
        for i in range(n):
            conn = self._conns[conn_ids[(svc.rr + i) % n]]
            if len(conn.held) < conn.concurrency:
                svc.rr += i + 1
                self._deliver(r, conn, out, now)
                return
        svc.waiting.append(r)

    def _deliver(self, r: _Recipient, conn: _Conn, out: list[Outgoing], now: float) -> None:
        """Hand a recipient to an instance, which has a whole start window from now to
        start or answer it (a task that waited for a free slot gets a window of its own,
        not the rest of the one it waited in)."""
        task = r.task
        r.state, r.conn_id = RState.DELIVERED, conn.id
        r.start_deadline = now + self.task_start_timeout
        if r.start_deadline > task.start_deadline:  # delivered after publish
            self._push_deadline(r.start_deadline, _START, task.id)
        conn.held[task.id] = r
        out.append(
            Outgoing(conn.id, p.Task(task.id, task.topic, task.payload, task.publisher_service))
        )

    def _drain_waiting(self, conn: _Conn, out: list[Outgoing], now: float) -> None:
        """Give a conn with free slots the oldest waiting tasks it can take."""
        svc = self._services.get(conn.credential.name)
        if svc is None or not svc.waiting:
            return
        skipped: list[_Recipient] = []
        while svc.waiting and len(conn.held) < conn.concurrency:
            r = svc.waiting.popleft()
            if r.state is not RState.QUEUED:
                continue  # settled while waiting
            if any(topics.matches(pat, r.task.topic) for pat in conn.patterns):
                self._deliver(r, conn, out, now)
            else:
                skipped.append(r)
        svc.waiting.extendleft(reversed(skipped))

    def _settle(self, r: _Recipient, outcome: p.Outcome, out: list[Outgoing]) -> None:
        """Fix a recipient's outcome; finish the task when it was the last one."""
        task = r.task
        r.outcome = outcome
        task.open -= 1
        if outcome.status == p.OK:
            if task.winner is None:
                task.winner = r.service
        elif outcome.error is not None and task.first_error is None:
            task.first_error = outcome.error
        if task.open == 0:
            self._finish(task, out)

    def _finish(self, task: _Task, out: list[Outgoing]) -> None:
        del self._tasks[task.id]
        publisher = self._conns.get(task.publisher)
        if publisher is None and task.publisher in self._detached:
            publisher = self._detached[task.publisher].conn
        if publisher is not None:
            publisher.published.discard(task.id)
        error = None
        if task.winner is None:
            error = task.first_error
            statuses = {r.outcome.status for r in task.recipients.values() if r.outcome}
            if p.SEEN not in statuses and error is None:
                if p.BUSY in statuses:
                    error = p.ErrorInfo(
                        "overloaded", f"every instance subscribed to {task.topic!r} stayed busy"
                    )
                else:
                    error = p.ErrorInfo(
                        "no_subscribers", f"no subscriber of {task.topic!r} took the task in time"
                    )
        done = p.Done(task.id, self._outcomes(task), winner=task.winner, error=error)
        self._to_publisher(task, done, out)
        self._maybe_compact()

    def _to_publisher(self, task: _Task, msg: p.Message, out: list[Outgoing]) -> None:
        """Send to the task's publisher, or keep it for it while it is detached."""
        detached = self._detached.get(task.publisher)
        if type(msg) is p.Done:
            conn = detached.conn if detached else self._conns.get(task.publisher)
            if conn is not None:
                conn.recent.append(msg)
        if detached is None:
            out.append(Outgoing(task.publisher, msg))
        elif type(msg) is p.Update and len(detached.buffer) >= self.max_buffered:
            self.dropped_updates += 1  # bounded: results are always kept, updates may not
        else:
            detached.buffer.append(msg)

    def _abandon(
        self, task_ids: Iterable[str], out: list[Outgoing], departing: str | None = None
    ) -> None:
        """Drop tasks whose publisher is gone for good; tell their workers to stop
        (except ``departing``, the connection going away, which holds some of them)."""
        for task_id in list(task_ids):
            task = self._tasks.pop(task_id, None)
            if task is None:
                continue
            for r in task.recipients.values():
                if r.state in (RState.DELIVERED, RState.STARTED):
                    r.state = RState.ENDED
                    if r.conn_id != departing:
                        out.append(Outgoing(r.conn_id, p.Cancel(task_id, "publisher gone")))  # type: ignore[arg-type]
                elif r.state is RState.QUEUED:
                    r.state = RState.FINISHED
        self._maybe_compact()

    def _outcomes(self, task: _Task) -> dict[str, p.Outcome]:
        return {svc: r.outcome for svc, r in task.recipients.items() if r.outcome}

    def _close_window(self, task: _Task, out: list[Outgoing], now: float) -> None:
        """A start deadline of ``task`` passed. At the task's own (its start window from
        publish), recipients still waiting for a free slot are busy; at any recipient's
        (its window from delivery), one neither started nor answered only saw the task.
        Idempotent: a deadline that finds nothing due changes nothing."""
        if task.window_open and now >= task.start_deadline:
            task.window_open = False
            for r in list(task.recipients.values()):
                if r.state is RState.QUEUED:
                    r.state = RState.FINISHED
                    self._settle(r, p.Outcome(p.BUSY), out)
                    self._prune_waiting(r.service)
        for r in list(task.recipients.values()):
            if r.state is RState.DELIVERED and r.start_deadline <= now:
                r.state = RState.ENDED
                out.append(Outgoing(r.conn_id, p.Cancel(task.id, "not started in time")))  # type: ignore[arg-type]
                self._settle(r, p.Outcome(p.SEEN), out)

    def _prune_waiting(self, service: str) -> None:
        """Drop settled entries from the head of a service's waiting queue.

        Windows close in publish order, so what they settle gathers at the head;
        without this, settled tasks (payload and all) would stay until an instance
        of the service freed a slot.
        """
        svc = self._services.get(service)
        if svc is not None:
            waiting = svc.waiting
            while waiting and waiting[0].state is not RState.QUEUED:
                waiting.popleft()

    def _time_out(self, task: _Task, out: list[Outgoing]) -> None:
        """The finish deadline passed: whoever is still at work timed out."""
        for r in list(task.recipients.values()):
            if r.outcome is not None:
                continue
            if r.state is RState.QUEUED:
                r.state = RState.FINISHED
                self._settle(r, p.Outcome(p.BUSY), out)
                self._prune_waiting(r.service)
                continue
            r.state = RState.ENDED
            out.append(Outgoing(r.conn_id, p.Cancel(task.id, "timed out")))  # type: ignore[arg-type]
            error = p.ErrorInfo(
                "timeout",
                f"service {r.service!r} did not finish task {task.id} within its "
                f"finish timeout ({task.finish_timeout:g} s)",
                service=r.service,
            )
            self._settle(r, p.Outcome(p.TIMEOUT, error=error), out)

    def _index_remove(self, pattern: str, service: str, conn_id: str) -> None:
        prefix = topics.pattern_prefix(pattern)
        index = self._exact if prefix is None else self._prefix
        key = pattern if prefix is None else prefix
        by_service = index[key]
        ids = by_service[service]
        ids.remove(conn_id)
        if not ids:
            del by_service[service]
            if not by_service:
                del index[key]

    def _push_deadline(self, when: float, kind: int, task_id: str) -> None:
        heapq.heappush(self._deadlines, (when, next(self._seq), kind, task_id))

    def _maybe_compact(self) -> None:
        # Deadlines of finished tasks stay in the heap until due; drop them in bulk
        # when they outnumber the live ones, so memory tracks pending tasks only.
        heap = self._deadlines
        if len(heap) > 4 * len(self._tasks) + 256:
            live = self._tasks.keys() | self._detached.keys()
            self._deadlines = [e for e in heap if e[3] in live]
            heapq.heapify(self._deadlines)


def _union(a: Iterable[str], b: Iterable[str]) -> list[str]:
    seen = dict.fromkeys(a)
    seen.update(dict.fromkeys(b))
    return list(seen)
