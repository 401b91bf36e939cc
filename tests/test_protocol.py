"""Unit tests of the wire protocol: encode() and decode(), no sockets."""

from __future__ import annotations

import json
import math

import pytest

from taskhub_sync import protocol as p
from taskhub_sync.errors import ProtocolError

FAILED_INFO = p.ErrorInfo("failed", "ValueError: bad", service="s1", remote_type="ValueError")

EVERY_MESSAGE = [
    p.Hello(name="mailer", key="---super-secret-key---", concurrency=4),
    p.Welcome(session="mailer#1", max_message_size=1024, task_start_timeout=0.1),
    p.Subscribe(id=1, pattern="mail:*"),
    p.Unsubscribe(id=2, pattern="mail:send-bulk"),
    p.Reply(id=3),
    p.Reply(id=4, error=p.ErrorInfo("permission_denied", "no")),
    p.Publish(task="t1", topic="mail:send-bulk", payload=["a@b.c", {"x": [1, 2.5, None]}]),
    p.Publish(task="t2", topic="a", payload=None, timeout=30.5),
    p.Task(task="t1", topic="mail:send-bulk", payload={"n": 1}, publisher="pub"),
    p.Start(task="t1"),
    p.Update(task="t1", data={"sent": 1}),
    p.Update(task="t1", data=[1], service="mailer"),
    p.Result(task="t1", result={"sent": 2}),
    p.Result(task="t1", result=None),
    p.Fail(task="t1", error_type="ValueError", message="bad"),
    p.Cancel(task="t1", reason="timed out"),
    p.Done(task="t1", outcomes={"s1": p.Outcome(p.OK, result=5)}, winner="s1"),
    p.Done(
        task="t1",
        outcomes={
            "s1": p.Outcome(p.FAILED, error=FAILED_INFO),
            "s2": p.Outcome(p.SEEN),
            "s3": p.Outcome(p.BUSY),
            "s4": p.Outcome(p.LOST, error=p.ErrorInfo("worker_lost", "gone", service="s4")),
            "s5": p.Outcome(p.TIMEOUT, error=p.ErrorInfo("timeout", "slow", service="s5")),
        },
        error=FAILED_INFO,
    ),
    p.Done(task="t1", outcomes={}, error=p.ErrorInfo("no_subscribers", "nobody")),
]


def _obj(message: p.Message) -> dict:
    """The wire object of a message, as a dict to mutate."""
    return json.loads(p.encode(message))


# ----------------------------------------------------------------- round trips


@pytest.mark.parametrize("message", EVERY_MESSAGE, ids=lambda m: type(m).__name__)
def test_round_trip(message: p.Message) -> None:
    """decode(encode(m)) == m for every message type."""
    assert p.decode(p.encode(message)) == message


@pytest.mark.parametrize("message", EVERY_MESSAGE, ids=lambda m: type(m).__name__)
def test_round_trip_bytes(message: p.Message) -> None:
    """decode() also accepts UTF-8 bytes."""
    assert p.decode(p.encode(message).encode("utf-8")) == message


def test_every_message_type_is_covered() -> None:
    """The round-trip table holds at least one message of every type."""
    assert {type(m) for m in EVERY_MESSAGE} == set(p._TYPES.values())


def test_encode_is_compact_and_names_the_type() -> None:
    """encode() writes compact JSON with the wire type name."""
    text = p.encode(p.Start(task="t1"))
    assert text == '{"type":"start","task":"t1"}'


def test_encode_non_ascii_round_trips_as_ascii() -> None:
    """Non-ASCII text is escaped on the wire (always valid UTF-8) and round trips."""
    text = p.encode(p.Update(task="t", data="héllo ✓"))
    assert text.isascii()
    assert p.decode(text) == p.Update(task="t", data="héllo ✓")


def test_optional_none_fields_are_omitted() -> None:
    """Optional fields that are None do not appear on the wire."""
    assert _obj(p.Publish(task="t", topic="a")) == {"type": "pub", "task": "t", "topic": "a"}
    assert _obj(p.Reply(id=1)) == {"type": "reply", "id": 1}


def test_done_result_property() -> None:
    """Done.result is the winner's result, or None without a winner."""
    done = p.Done("t", {"a": p.Outcome(p.OK, 7), "b": p.Outcome(p.SEEN)}, winner="a")
    assert done.result == 7
    assert p.Done("t", {"b": p.Outcome(p.SEEN)}).result is None


def test_publish_int_timeout_becomes_float() -> None:
    """An integer timeout is accepted and decoded as a float."""
    msg = p.decode('{"type":"pub","task":"t","topic":"a","timeout":5}')
    assert msg == p.Publish(task="t", topic="a", timeout=5.0)
    assert isinstance(msg.timeout, float)


def test_welcome_accepts_int_timeout() -> None:
    """A float field accepts a JSON integer."""
    msg = p.decode(
        '{"type":"welcome","v":1,"session":"s","max_message_size":9,"task_start_timeout":1}'
    )
    assert msg == p.Welcome("s", 9, 1)


def test_unknown_fields_are_ignored() -> None:
    """Extra fields, at top level and inside nested objects, are ignored."""
    obj = _obj(EVERY_MESSAGE[-2])
    obj["future_field"] = {"anything": [1, 2]}
    obj["outcomes"]["s1"]["extra"] = True
    obj["error"]["hint"] = "x"
    assert p.decode(json.dumps(obj)) == EVERY_MESSAGE[-2]


# ----------------------------------------------------------------- Hello hides the key


def test_hello_repr_hides_key() -> None:
    """Hello's repr (and str) never shows the key."""
    hello = p.Hello(name="mailer", key="---super-secret-key---")
    assert "super-secret" not in repr(hello)
    assert "super-secret" not in str(hello)
    assert "mailer" in repr(hello)


# ----------------------------------------------------------------- decode rejects


@pytest.mark.parametrize(
    "text",
    [
        "",
        "{",
        "not json",
        '{"type": "start", "task": "t1"',
        '{"type": "start", "task": "t1"} trailing',
        "{'type': 'start'}",
        b"\xff\xfe{}",
        b'{"type":"start","task":"\xc3"}',
    ],
)
def test_decode_rejects_invalid_json(text: str | bytes) -> None:
    """Text that is not JSON (or not UTF-8) raises ProtocolError."""
    with pytest.raises(ProtocolError):
        p.decode(text)


@pytest.mark.parametrize("text", ["[]", "1", '"start"', "null", "true", '[{"type":"start"}]'])
def test_decode_rejects_non_objects(text: str) -> None:
    """A JSON value that is not an object raises ProtocolError."""
    with pytest.raises(ProtocolError, match="object"):
        p.decode(text)


@pytest.mark.parametrize("type_value", ['"nope"', '"Start"', '""', "null", "1", "true", "1.5"])
def test_decode_rejects_unknown_type(type_value: str) -> None:
    """An unknown or non-string (hashable) type raises ProtocolError."""
    with pytest.raises(ProtocolError):
        p.decode('{"type":' + type_value + ',"task":"t1"}')


def test_decode_rejects_missing_type() -> None:
    """An object without "type" raises ProtocolError."""
    with pytest.raises(ProtocolError, match="unknown message type"):
        p.decode('{"task":"t1"}')


def _required_fields() -> list[tuple[p.Message, str]]:
    cases = []
    for message in EVERY_MESSAGE:
        obj = _obj(message)
        for name, _, required in type(message).FIELDS:
            if required and name in obj:
                cases.append((message, name))
    return cases


@pytest.mark.parametrize(
    ("message", "name"), _required_fields(), ids=lambda x: x if isinstance(x, str) else x.TYPE
)
def test_decode_rejects_missing_required_field(message: p.Message, name: str) -> None:
    """Dropping any required field raises ProtocolError naming it."""
    obj = _obj(message)
    del obj[name]
    with pytest.raises(ProtocolError, match=name):
        p.decode(json.dumps(obj))


WRONG_TYPES = [
    (p.Hello("n", "k"), "v", True),
    (p.Hello("n", "k"), "v", 1.0),
    (p.Hello("n", "k"), "v", "1"),
    (p.Hello("n", "k"), "name", 5),
    (p.Hello("n", "k"), "key", None),
    (p.Hello("n", "k"), "concurrency", True),
    (p.Hello("n", "k"), "concurrency", 0),
    (p.Hello("n", "k"), "concurrency", -3),
    (p.Hello("n", "k"), "concurrency", 2.0),
    (p.Welcome("s", 1, 0.1), "max_message_size", False),
    (p.Welcome("s", 1, 0.1), "task_start_timeout", True),
    (p.Welcome("s", 1, 0.1), "task_start_timeout", "0.1"),
    (p.Subscribe(1, "a"), "id", True),
    (p.Subscribe(1, "a"), "id", "1"),
    (p.Subscribe(1, "a"), "id", 1.5),
    (p.Subscribe(1, "a"), "pattern", ["a"]),
    (p.Unsubscribe(1, "a"), "pattern", None),
    (p.Reply(1), "error", "oops"),
    (p.Reply(1), "error", {"code": 1, "message": "m"}),
    (p.Reply(1), "error", {"code": "c"}),
    (p.Reply(1), "error", {"code": "c", "message": "m", "service": 3}),
    (p.Reply(1), "error", {"code": "c", "message": "m", "remote_type": []}),
    (p.Publish("t", "a"), "task", 1),
    (p.Publish("t", "a"), "topic", None),
    (p.Publish("t", "a"), "timeout", "5"),
    (p.Publish("t", "a"), "timeout", True),
    (p.Publish("t", "a"), "timeout", 0),
    (p.Publish("t", "a"), "timeout", -1.5),
    (p.Publish("t", "a"), "timeout", 1e400),
    (p.Task("t", "a", 1, "p"), "publisher", 1),
    (p.Start("t"), "task", ["t"]),
    (p.Start("t"), "task", {"t": 1}),
    (p.Update("t"), "service", 1),
    (p.Result("t"), "task", False),
    (p.Fail("t", "E", "m"), "error_type", None),
    (p.Fail("t", "E", "m"), "message", 1),
    (p.Cancel("t", "r"), "reason", 0),
    (p.Done("t", {}), "outcomes", []),
    (p.Done("t", {}), "outcomes", "x"),
    (p.Done("t", {}), "outcomes", {"s": "ok"}),
    (p.Done("t", {}), "outcomes", {"s": {"status": "weird"}}),
    (p.Done("t", {}), "outcomes", {"s": {}}),
    (p.Done("t", {}), "outcomes", {"s": {"status": "failed", "error": "x"}}),
    (p.Done("t", {}), "winner", 1),
    (p.Done("t", {}), "winner", "ghost"),  # names no outcome
    (p.Done("t", {}), "error", []),
]


@pytest.mark.parametrize(
    ("message", "name", "value"),
    WRONG_TYPES,
    ids=[f"{m.TYPE}-{n}-{v!r}"[:40] for m, n, v in WRONG_TYPES],
)
def test_decode_rejects_wrong_field_types(message: p.Message, name: str, value: object) -> None:
    """A field of the wrong type or out of range raises ProtocolError."""
    obj = _obj(message)
    obj[name] = value
    with pytest.raises(ProtocolError):
        p.decode(json.dumps(obj))


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize(
    "template",
    [
        '{{"type":"result","task":"t","result":{}}}',
        '{{"type":"pub","task":"t","topic":"a","payload":[1,{}]}}',
        '{{"type":"pub","task":"t","topic":"a","timeout":{}}}',
        '{{"type":"welcome","v":1,"session":"s","max_message_size":1,"task_start_timeout":{}}}',
    ],
)
def test_decode_rejects_nan_and_infinity(template: str, constant: str) -> None:
    """NaN and Infinity (which json accepts by default) raise ProtocolError anywhere."""
    with pytest.raises(ProtocolError):
        p.decode(template.format(constant))


@pytest.mark.parametrize("depth", [1_000, 100_000])
@pytest.mark.parametrize("open_close", [("[", "]"), ('{"a":', "}")])
def test_decode_rejects_deep_nesting(depth: int, open_close: tuple[str, str]) -> None:
    """Deeply nested JSON raises ProtocolError, not RecursionError."""
    opening, closing = open_close
    payload = opening * depth + "1" + closing * depth
    with pytest.raises(ProtocolError):
        p.decode('{"type":"result","task":"t","result":' + payload + "}")


def test_decode_accepts_moderate_nesting() -> None:
    """Reasonably nested payloads (depth 50) decode fine."""
    payload = "[" * 50 + "1" + "]" * 50
    msg = p.decode('{"type":"result","task":"t","result":' + payload + "}")
    assert isinstance(msg, p.Result)
    assert json.dumps(msg.result) == payload.replace(",", ", ")


@pytest.mark.parametrize("type_value", ["[]", '{"a":1}'])
def test_decode_rejects_unhashable_type(type_value: str) -> None:
    """An unhashable "type" raises ProtocolError, not TypeError."""
    with pytest.raises(ProtocolError):
        p.decode('{"type":' + type_value + "}")


@pytest.mark.parametrize("status", [[], {"x": 1}])
def test_decode_rejects_unhashable_outcome_status(status: object) -> None:
    """A list or object as an outcome's status raises ProtocolError, not TypeError."""
    obj = {"type": "done", "task": "t", "outcomes": {"s": {"status": status}}}
    with pytest.raises(ProtocolError):
        p.decode(json.dumps(obj))


def test_decode_task_without_payload() -> None:
    """A task message without payload decodes (payload None) instead of raising TypeError."""
    msg = p.decode('{"type":"task","task":"t","topic":"a","publisher":"p"}')
    assert msg == p.Task("t", "a", None, "p")


def test_round_trip_task_with_none_payload() -> None:
    """A Task whose payload is None survives encode/decode."""
    message = p.Task(task="t1", topic="a", payload=None, publisher="pub")
    assert p.decode(p.encode(message)) == message


def test_decode_rejects_huge_integer_timeout() -> None:
    """A timeout too large for a float raises ProtocolError, not OverflowError."""
    with pytest.raises(ProtocolError):
        p.decode('{"type":"pub","task":"t","topic":"a","timeout":1' + "0" * 400 + "}")


@pytest.mark.parametrize(
    "text",
    [
        '{"type":"pub","task":"t","topic":"a","payload":[1e999]}',
        '{"type":"result","task":"t","result":-1e999}',
        '{"type":"update","task":"t","data":{"x":1E400}}',
        '{"type":"welcome","v":1,"session":"s","max_message_size":1,"task_start_timeout":1e999}',
    ],
)
def test_decode_rejects_overflowing_float(text: str) -> None:
    """A number too large for a float raises ProtocolError instead of becoming inf."""
    with pytest.raises(ProtocolError):
        p.decode(text)


def test_decode_rejects_overflowing_float_timeout() -> None:
    """An overflowing float as a task timeout is rejected (it becomes inf, then refused)."""
    with pytest.raises(ProtocolError):
        p.decode('{"type":"pub","task":"t","topic":"a","timeout":1e999}')


def test_decode_rejects_integer_beyond_digit_limit() -> None:
    """An integer with thousands of digits raises ProtocolError (int conversion limit)."""
    with pytest.raises(ProtocolError):
        p.decode('{"type":"sub","id":1' + "0" * 5000 + ',"pattern":"a"}')


def test_decoded_message_reencodes_to_utf8() -> None:
    """Whatever decode() accepts (a lone-surrogate escape included) re-encodes to UTF-8."""
    try:
        msg = p.decode(r'{"type":"pub","task":"t","topic":"a","payload":"\ud800"}')
    except ProtocolError:
        return  # rejecting it at the door is a fine fix too
    text = p.encode(msg)
    text.encode("utf-8")
    assert p.decode(text) == msg


# ----------------------------------------------------------------- encode rejects


class _Opaque:
    pass


@pytest.mark.parametrize(
    "payload", [_Opaque(), {1, 2}, b"bytes", {"k": object()}, [1, {"deep": _Opaque()}]]
)
def test_encode_rejects_non_serializable(payload: object) -> None:
    """A payload JSON cannot hold raises TypeError."""
    with pytest.raises(TypeError):
        p.encode(p.Publish(task="t", topic="a", payload=payload))


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, [1.0, {"x": math.nan}]])
@pytest.mark.parametrize(
    "make",
    [
        lambda v: p.Publish(task="t", topic="a", payload=v),
        lambda v: p.Update(task="t", data=v),
        lambda v: p.Result(task="t", result=v),
    ],
    ids=["payload", "update", "result"],
)
def test_encode_rejects_nan(make, value: object) -> None:
    """NaN or infinity anywhere in a payload raises ValueError."""
    with pytest.raises(ValueError):
        p.encode(make(value))


def test_encode_rejects_deep_nesting() -> None:
    """A payload nested too deeply for the encoder raises ValueError."""
    value: list = []
    for _ in range(100_000):
        value = [value]
    with pytest.raises(ValueError):
        p.encode(p.Result(task="t", result=value))


def test_encode_rejects_circular_payload() -> None:
    """A self-referencing payload raises ValueError."""
    value: list = []
    value.append(value)
    with pytest.raises(ValueError):
        p.encode(p.Result(task="t", result=value))


def test_encode_value_matches_message_encoding() -> None:
    """encode_value() encodes like encode() does (compact, no NaN)."""
    value = {"a": [1, "é"]}
    assert p.encode(p.Result("t", value)).endswith(',"result":' + p.encode_value(value) + "}")
    assert " " not in p.encode_value(value)
    with pytest.raises(ValueError):
        p.encode_value(math.nan)


def test_fatal_close_codes() -> None:
    """Only auth failure and too many instances forbid a retry."""
    assert p.FATAL_CLOSE_CODES == {p.CLOSE_AUTH_FAILED, p.CLOSE_TOO_MANY_INSTANCES}
