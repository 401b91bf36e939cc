"""Unit tests of topic names, subscription patterns and permissions."""

from __future__ import annotations

import pytest

from taskhub_sync import topics
from taskhub_sync.config import MAX_TOPIC_LENGTH
from taskhub_sync.errors import InvalidTopic

VALID_TOPICS = [
    "a",
    "mail",
    "mail:send-bulk",
    "googlemaps:geocode",
    "a:b:c:d",
    "A_b.c-9",
    "log:error.v2",
    "0",
    "-",
    "...",
    "a" * MAX_TOPIC_LENGTH,
    ":".join(["ab"] * 60)[:MAX_TOPIC_LENGTH].rstrip(":"),
]

INVALID_TOPICS = [
    "",
    ":",
    ":a",
    "a:",
    "a::b",
    "a b",
    " a",
    "a\n",
    "a/b",
    "a*",
    "*",
    "a:*",
    "é",
    "mail:sénd",
    "a\tb",
    "a" * (MAX_TOPIC_LENGTH + 1),
    None,
    1,
    b"mail",
    ["a"],
]


@pytest.mark.parametrize("topic", VALID_TOPICS)
def test_validate_topic_accepts(topic: str) -> None:
    """A valid topic name is returned unchanged."""
    assert topics.validate_topic(topic) == topic


@pytest.mark.parametrize("topic", INVALID_TOPICS, ids=repr)
def test_validate_topic_rejects(topic: object) -> None:
    """Bad charset, empty segments, overlong names and non-strings raise InvalidTopic."""
    with pytest.raises(InvalidTopic):
        topics.validate_topic(topic)


def test_invalid_topic_is_a_value_error_with_a_clear_message() -> None:
    """InvalidTopic is also a ValueError and its message shows the rule."""
    with pytest.raises(ValueError, match=r"invalid topic 'a b'.*segments"):
        topics.validate_topic("a b")
    with pytest.raises(InvalidTopic, match=f"longer than {MAX_TOPIC_LENGTH}"):
        topics.validate_topic("a" * (MAX_TOPIC_LENGTH + 1))


@pytest.mark.parametrize("pattern", ["*", "a", "a:*", "a:b:*", "log:error", "x-y.z:*"])
def test_validate_pattern_accepts(pattern: str) -> None:
    """Topics, 'prefix:*' and '*' are valid patterns."""
    assert topics.validate_pattern(pattern) == pattern


@pytest.mark.parametrize(
    "pattern", ["", ":*", "a*", "*:a", "a:*:b", "a:**", "**", "a:b*", "*a", "a::*", " *", None]
)
def test_validate_pattern_rejects(pattern: object) -> None:
    """Anything but a topic, 'prefix:*' or '*' raises InvalidTopic."""
    with pytest.raises(InvalidTopic):
        topics.validate_pattern(pattern)


@pytest.mark.parametrize("permission", ["*", "a", "googlemaps", "log:error"])
def test_validate_permission_accepts(permission: str) -> None:
    """A permission is a topic or '*'."""
    assert topics.validate_permission(permission) == permission


@pytest.mark.parametrize("permission", ["a:*", "", "a b", None])
def test_validate_permission_rejects(permission: object) -> None:
    """Prefix patterns and invalid topics are not permissions."""
    with pytest.raises(InvalidTopic):
        topics.validate_permission(permission)


@pytest.mark.parametrize(
    ("pattern", "prefix"), [("*", ""), ("log:*", "log"), ("a:b:*", "a:b"), ("log", None)]
)
def test_pattern_prefix(pattern: str, prefix: str | None) -> None:
    """pattern_prefix() gives the covered prefix, '' for '*', None for exact topics."""
    assert topics.pattern_prefix(pattern) == prefix


@pytest.mark.parametrize(
    ("topic", "expected"), [("a", [""]), ("a:b", ["a", ""]), ("a:b:c", ["a:b", "a", ""])]
)
def test_prefixes(topic: str, expected: list[str]) -> None:
    """prefixes() yields every prefix key of a topic, most specific first."""
    assert list(topics.prefixes(topic)) == expected


MATCHES = [
    ("a", "a", True),
    ("a", "a:b", False),
    ("a", "ab", False),
    ("a:b", "a", False),
    ("*", "a", True),
    ("*", "a:b:c", True),
    ("a:*", "a:b", True),
    ("a:*", "a:b:c", True),
    ("a:*", "a", False),
    ("a:*", "ab:c", False),
    ("a:*", "b:a", False),
    ("a:b:*", "a:b:c", True),
    ("a:b:*", "a:b", False),
    ("a:b:*", "a:bc:d", False),
    ("log:*", "log:error", True),
]


@pytest.mark.parametrize(("pattern", "topic", "expected"), MATCHES)
def test_matches(pattern: str, topic: str, expected: bool) -> None:
    """matches() covers exact topics, 'prefix:*' (strictly below) and '*'."""
    assert topics.matches(pattern, topic) is expected


@pytest.mark.parametrize(("pattern", "topic", "expected"), MATCHES)
def test_matches_agrees_with_prefixes(pattern: str, topic: str, expected: bool) -> None:
    """The router's prefix index (prefixes()) agrees with matches() for prefix patterns."""
    prefix = topics.pattern_prefix(pattern)
    if prefix is None:
        assert (pattern == topic) is expected
    else:
        assert (prefix in set(topics.prefixes(topic))) is expected


PERMITS = [
    (["googlemaps"], "googlemaps", True),
    (["googlemaps"], "googlemaps:geocode", True),
    (["googlemaps"], "googlemaps:geocode:v2", True),
    (["googlemaps"], "googlemapsx", False),
    (["googlemaps"], "google", False),
    (["googlemaps:geocode"], "googlemaps", False),
    (["googlemaps:geocode"], "googlemaps:geocoder", False),
    (["log:error", "log:warn", "googlemaps"], "log:warn", True),
    (["log:error", "log:warn", "googlemaps"], "log:info", False),
    (["*"], "anything:at:all", True),
    ([], "a", False),
]


@pytest.mark.parametrize(("permissions", "topic", "expected"), PERMITS)
def test_permits(permissions: list[str], topic: str, expected: bool) -> None:
    """A permission grants its own topic and every topic below it, nothing else."""
    assert topics.permits(permissions, topic) is expected


@pytest.mark.parametrize(
    ("permissions", "pattern", "expected"),
    [
        (["log"], "log:*", True),
        (["log"], "log", True),
        (["log"], "log:error", True),
        (["log"], "log:error:*", True),
        (["log:error"], "log:*", False),
        (["log:error"], "log:error:*", True),
        (["logx"], "log:*", False),
        (["log"], "*", False),
        (["*"], "*", True),
        (["*"], "a:*", True),
        (["a", "b"], "b:*", True),
        ([], "*", False),
        ([], "a", False),
    ],
)
def test_permits_pattern(permissions: list[str], pattern: str, expected: bool) -> None:
    """Listening on a pattern needs a permission covering all of it; '*' needs '*'."""
    assert topics.permits_pattern(permissions, pattern) is expected


def test_permits_accepts_any_iterable() -> None:
    """permits() works on tuples, sets and generators, not only lists."""
    assert topics.permits(("a",), "a:b")
    assert topics.permits({"a"}, "a:b")
    assert topics.permits((x for x in ["z", "a"]), "a:b")
