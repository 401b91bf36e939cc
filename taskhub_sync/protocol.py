"""The wire protocol: message dataclasses, encode() and decode(). No sockets, no threads.

Every message is one WebSocket text frame holding one JSON object whose ``"type"``
names the message. Unknown fields are ignored (so later versions can add fields);
a missing or mistyped field, an unknown type or invalid JSON raises ProtocolError.
The first message on a connection is ``hello`` from the client; the hub answers
``welcome`` or closes with one of the CLOSE_* codes below. The conversation::

    client -> hub   hello   {v, name, key, concurrency}
    hub -> client   welcome {v, session, max_message_size, task_start_timeout}
    client -> hub   sub     {id, pattern}           hub -> client  reply {id, error?}
    client -> hub   unsub   {id, pattern}           hub -> client  reply {id, error?}
    publisher -> hub pub    {task, topic, payload, timeout?}
    hub -> worker   task    {task, topic, payload, publisher}
    worker -> hub   start   {task}                  (claims the task)
    worker -> hub   update  {task, data}            hub -> publisher  update {task, data, service}
    worker -> hub   result  {task, result}   or     fail {task, error_type, message}
    hub -> worker   cancel  {task, reason}          (too late, timed out, publisher gone)
    hub -> publisher done   {task, winner?, result?, error?, outcomes}

See docs/protocol.rst for the full description, including the close codes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Union

from .config import MAX_TASK_TIMEOUT
from .errors import ProtocolError

#: Protocol version sent in hello/welcome. Bumped on incompatible changes only.
VERSION = 1

# Close codes (RFC 6455 range plus taskhub's own 4xxx codes).
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001  # hub shutting down
CLOSE_PROTOCOL_ERROR = 1002  # WebSocket-level violation
CLOSE_TOO_BIG = 1009  # message over max_message_size
CLOSE_INTERNAL_ERROR = 1011
CLOSE_BAD_MESSAGE = 4000  # taskhub-level protocol violation
CLOSE_AUTH_FAILED = 4001  # unknown name or wrong key
CLOSE_TOO_MANY_INSTANCES = 4002  # max_instances reached for this name
CLOSE_AUTH_TIMEOUT = 4003  # no hello within auth_timeout
CLOSE_SLOW_CONSUMER = 4008  # the peer did not read what the hub sent it in time

#: Close codes after which a client must not retry with the same credentials.
CLOSE_TRY_AGAIN_LATER = 1013  # e.g. too many failed authentications from this host
FATAL_CLOSE_CODES = frozenset({CLOSE_AUTH_FAILED, CLOSE_TOO_MANY_INSTANCES})


def _check(value: Any, kind: Any, name: str) -> Any:
    """Return ``value`` if it is of ``kind``, else raise ProtocolError."""
    if kind is Any:
        return value
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif callable(kind) and not isinstance(kind, type):
        return kind(value, name)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise ProtocolError(f"field {name!r} has the wrong type ({type(value).__name__})")
    return value


@dataclass(frozen=True)
class ErrorInfo:
    """Why a request or task failed: a machine-readable code and a message."""

    code: str
    message: str
    service: str | None = None
    remote_type: str | None = None

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.service is not None:
            out["service"] = self.service
        if self.remote_type is not None:
            out["remote_type"] = self.remote_type
        return out


def _error_info(value: Any, name: str) -> ErrorInfo | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ProtocolError(f"field {name!r} must be an object")
    service = value.get("service")
    remote_type = value.get("remote_type")
    return ErrorInfo(
        code=_check(value.get("code"), str, name + ".code"),
        message=_check(value.get("message"), str, name + ".message"),
        service=None if service is None else _check(service, str, name + ".service"),
        remote_type=None if remote_type is None else _check(remote_type, str, name),
    )


#: Outcome statuses, per recipient service of a task.
OK = "ok"  # returned a result
FAILED = "failed"  # the handler raised
SEEN = "seen"  # neither started nor answered within the start window
TIMEOUT = "timeout"  # started, then ran past the finish timeout
LOST = "lost"  # the worker disconnected before it finished
BUSY = "busy"  # every instance stayed busy for the whole start window
STATUSES = frozenset({OK, FAILED, SEEN, TIMEOUT, LOST, BUSY})


@dataclass(frozen=True)
class Outcome:
    """What one recipient service did with a task."""

    status: str
    result: Any = None
    error: ErrorInfo | None = None

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status}
        if self.status == OK:
            out["result"] = self.result
        if self.error is not None:
            out["error"] = self.error.to_wire()
        return out


def _outcomes(value: Any, name: str) -> dict[str, Outcome]:
    if not isinstance(value, dict):
        raise ProtocolError(f"field {name!r} must be an object")
    out = {}
    for service, item in value.items():
        status = item.get("status") if isinstance(item, dict) else None
        if not isinstance(status, str) or status not in STATUSES:
            raise ProtocolError(f"bad outcome for {service!r} in {name!r}")
        out[service] = Outcome(
            status=item["status"],
            result=item.get("result"),
            error=_error_info(item.get("error"), name),
        )
    return out


def _optional(kind: Any) -> Callable[[Any, str], Any]:
    def check(value: Any, name: str) -> Any:
        return None if value is None else _check(value, kind, name)

    return check


def _str_tuple(value: Any, name: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ProtocolError(f"field {name!r} must be a list of strings")
    return tuple(value)


def _positive_int(value: Any, name: str) -> int:
    _check(value, int, name)
    if value < 1:
        raise ProtocolError(f"field {name!r} must be at least 1")
    return int(value)


def _timeout(value: Any, name: str) -> float | None:
    if value is None:
        return None
    _check(value, float, name)
    try:
        seconds = float(value)
    except OverflowError:
        seconds = float("inf")
    if not 0 < seconds <= MAX_TASK_TIMEOUT:
        raise ProtocolError(
            f"field {name!r} must be a number of seconds > 0 and <= {MAX_TASK_TIMEOUT:g}"
        )
    return seconds


class _Message:
    """Base of all messages: ``TYPE`` is the wire name, ``FIELDS`` the checked fields."""

    TYPE: ClassVar[str]
    # (field name, checker, required). A checker is a type or a function(value, name).
    FIELDS: ClassVar[tuple[tuple[str, Any, bool], ...]]

    def _check_fields(self) -> None:
        """Checks across fields, after each field's own (decode() calls it)."""

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.TYPE}
        for name, _, required in self.FIELDS:
            value = getattr(self, name)
            if value is None and not required:
                continue
            if isinstance(value, (ErrorInfo, Outcome)):
                value = value.to_wire()
            elif name == "outcomes":
                value = {k: o.to_wire() for k, o in value.items()}
            elif name == "pending":
                if not value:
                    continue
                value = list(value)
            out[name] = value
        return out


@dataclass(frozen=True)
class Hello(_Message):
    """client -> hub, first message: who I am and how many tasks I run at once.

    ``session`` asks to resume a previous session (after a dropped connection);
    ``pending`` then lists the ids of its tasks still waiting for a result.
    """

    TYPE = "hello"
    FIELDS = (
        ("v", int, True),
        ("name", str, True),
        ("key", str, True),
        ("concurrency", _positive_int, True),
        ("session", _optional(str), False),
        ("pending", _str_tuple, False),
    )
    name: str
    key: str = field(repr=False)
    concurrency: int = 1
    session: str | None = None
    pending: tuple[str, ...] = ()
    v: int = VERSION


@dataclass(frozen=True)
class Welcome(_Message):
    """hub -> client: authenticated; the hub's limits.

    ``resumed`` is true when the hello's session was resumed: its pending tasks
    are still alive and what it missed follows. ``resume_grace`` is how long the
    hub keeps a publisher's tasks after its connection drops.
    """

    TYPE = "welcome"
    FIELDS = (
        ("v", int, True),
        ("session", str, True),
        ("max_message_size", int, True),
        ("task_start_timeout", float, True),
        ("resumed", bool, False),
        ("resume_grace", float, False),
    )
    session: str
    max_message_size: int
    task_start_timeout: float
    resumed: bool = False
    resume_grace: float = 0.0
    v: int = VERSION


@dataclass(frozen=True)
class Subscribe(_Message):
    """client -> hub: deliver tasks matching ``pattern``. Answered by Reply."""

    TYPE = "sub"
    FIELDS = (("id", int, True), ("pattern", str, True))
    id: int
    pattern: str


@dataclass(frozen=True)
class Unsubscribe(_Message):
    """client -> hub: stop delivering ``pattern``. Answered by Reply."""

    TYPE = "unsub"
    FIELDS = (("id", int, True), ("pattern", str, True))
    id: int
    pattern: str


@dataclass(frozen=True)
class Reply(_Message):
    """hub -> client: the answer to request ``id``; ``error`` is None on success."""

    TYPE = "reply"
    FIELDS = (("id", int, True), ("error", _error_info, False))
    id: int
    error: ErrorInfo | None = None


@dataclass(frozen=True)
class Publish(_Message):
    """publisher -> hub: a new task. ``timeout`` overrides the hub's finish timeout."""

    TYPE = "pub"
    FIELDS = (
        ("task", str, True),
        ("topic", str, True),
        ("payload", Any, False),
        ("timeout", _timeout, False),
    )
    task: str
    topic: str
    payload: Any = None
    timeout: float | None = None


@dataclass(frozen=True)
class Task(_Message):
    """hub -> worker: a task for one of your subscriptions."""

    TYPE = "task"
    FIELDS = (
        ("task", str, True),
        ("topic", str, True),
        ("payload", Any, False),
        ("publisher", str, True),
    )
    task: str
    topic: str
    payload: Any = None  # None is sent by omission
    publisher: str = ""


@dataclass(frozen=True)
class Start(_Message):
    """worker -> hub: I claim this task; wait for my result."""

    TYPE = "start"
    FIELDS = (("task", str, True),)
    task: str


@dataclass(frozen=True)
class Update(_Message):
    """worker -> hub -> publisher: progress. The hub adds ``service``."""

    TYPE = "update"
    FIELDS = (("task", str, True), ("data", Any, False), ("service", _optional(str), False))
    task: str
    data: Any = None
    service: str | None = None


@dataclass(frozen=True)
class Result(_Message):
    """worker -> hub: the handler returned ``result``."""

    TYPE = "result"
    FIELDS = (("task", str, True), ("result", Any, False))
    task: str
    result: Any = None


@dataclass(frozen=True)
class Fail(_Message):
    """worker -> hub: the handler raised ``error_type(message)``.

    ``code`` is set when the library (not the handler) failed the task, e.g.
    ``payload_too_large`` for a result over the hub's limit.
    """

    TYPE = "fail"
    FIELDS = (
        ("task", str, True),
        ("error_type", str, True),
        ("message", str, True),
        ("code", _optional(str), False),
    )
    task: str
    error_type: str
    message: str
    code: str | None = None


@dataclass(frozen=True)
class Cancel(_Message):
    """hub -> worker: stop working on this task; its result will be dropped."""

    TYPE = "cancel"
    FIELDS = (("task", str, True), ("reason", str, True))
    task: str
    reason: str


@dataclass(frozen=True)
class Done(_Message):
    """hub -> publisher: the task is over, with every recipient's outcome.

    ``winner`` names the service whose result is the task's result; ``error`` is set
    when there is no result (then ``winner`` is None). Both None: everybody only saw
    the task, and its result is None.
    """

    TYPE = "done"
    FIELDS = (
        ("task", str, True),
        ("winner", _optional(str), False),
        ("error", _error_info, False),
        ("outcomes", _outcomes, True),
    )
    task: str
    outcomes: dict[str, Outcome]
    winner: str | None = None
    error: ErrorInfo | None = None

    @property
    def result(self) -> Any:
        """The winner's result, or None."""
        return None if self.winner is None else self.outcomes[self.winner].result

    def _check_fields(self) -> None:
        if self.winner is not None and self.winner not in self.outcomes:
            raise ProtocolError(f"'done' names winner {self.winner!r} among no outcomes")


Message = Union[
    Hello,
    Welcome,
    Subscribe,
    Unsubscribe,
    Reply,
    Publish,
    Task,
    Start,
    Update,
    Result,
    Fail,
    Cancel,
    Done,
]

_TYPES: Mapping[str, type[Any]] = {
    cls.TYPE: cls
    for cls in (
        Hello,
        Welcome,
        Subscribe,
        Unsubscribe,
        Reply,
        Publish,
        Task,
        Start,
        Update,
        Result,
        Fail,
        Cancel,
        Done,
    )
}


#: Deepest nesting of arrays and objects accepted in a payload, update or result
#: (encoding the messages it is forwarded in must never run out of recursion).
MAX_DEPTH = 200

#: Levels a message wraps its payload, update or result in: ``{"result": V}`` is one
#: level more than V; a done message holds each result 3 deep
#: (``{"outcomes": {service: {"result": V}}}``). decode() allows MAX_DEPTH plus these,
#: so a value within MAX_DEPTH passes every message it travels in.
_WRAPPING = {"done": 3}


def too_deep(text: str, value: Any, limit: int = MAX_DEPTH) -> bool:
    """True if ``value`` (whose JSON is ``text``, or a message holding it) nests
    deeper than ``limit``.

    Cheap for every real message: with few brackets in the text there is nothing
    to measure.
    """
    return text.count("[") + text.count("{") > limit and _depth(value) > limit


def _depth(value: Any) -> int:
    """Nesting depth of a decoded JSON value, without recursion."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            deepest = max(deepest, level)
            stack.extend((v, level + 1) for v in item.values())
        elif isinstance(item, list):
            deepest = max(deepest, level)
            stack.extend((v, level + 1) for v in item)
    return deepest


def _reject_constant(name: str) -> Any:
    raise ProtocolError(f"{name} is not valid JSON")


def _parse_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):  # 1e999: valid JSON, but no float holds it
        raise ProtocolError(f"number {text[:20]} is out of range")
    return value


# ensure_ascii: a JSON "\\ud800" escape decodes to a lone surrogate, which has no
# UTF-8 form; escaping keeps any decoded string re-encodable.
_encoder = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
_decoder = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_parse_float)


def encode(message: Message) -> str:
    """Encode a message as JSON text (ASCII only: its length is its size in bytes).

    Raises:
        TypeError: If a payload, update or result is not JSON-serializable.
        ValueError: If it holds NaN or infinity, or is nested too deeply.
    """
    try:
        return _encoder.encode(message.to_wire())
    except RecursionError:
        raise ValueError("payload is nested too deeply to encode") from None


def encode_value(value: Any) -> str:
    """Encode any JSON value the way messages are encoded (to size or check it)."""
    return _encoder.encode(value)


def decode(text: str | bytes) -> Message:
    """Decode one message. Raises ProtocolError for anything malformed."""
    try:
        text = text if isinstance(text, str) else text.decode("utf-8")
        obj = _decoder.decode(text)
    except ProtocolError:
        raise
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ProtocolError(f"invalid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("a message must be a JSON object")
    kind = obj.get("type")
    cls = _TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {obj.get('type')!r}")
    if too_deep(text, obj, MAX_DEPTH + _WRAPPING.get(cls.TYPE, 1)):
        raise ProtocolError(f"values nested more than {MAX_DEPTH} levels deep")
    values = {}
    for name, kind, required in cls.FIELDS:
        if name not in obj:
            if required:
                raise ProtocolError(f"{cls.TYPE!r} message lacks field {name!r}")
            continue
        values[name] = _check(obj[name], kind, name)
    # Every field is checked: fill the frozen instance directly (its __init__ costs
    # a setattr per field on the hub's hot path). Absent optional fields fall back
    # to the class defaults.
    message = object.__new__(cls)
    message.__dict__.update(values)
    message._check_fields()
    return message  # type: ignore[no-any-return]
