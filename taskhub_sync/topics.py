"""Topic names, subscription patterns and permissions. Pure functions, no state.

Topics are ``:``-separated segments of letters, digits, ``_``, ``-`` and ``.``:
``mail:send-bulk``, ``googlemaps:geocode``. A *pattern* (what a worker subscribes to)
is a topic, or a topic followed by ``:*`` (every topic below it), or ``*`` (every
topic). A *permission* grants its topic and every topic below it: ``googlemaps``
grants ``googlemaps`` and ``googlemaps:geocode``; ``*`` grants everything.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

from .config import MAX_TOPIC_LENGTH
from .errors import InvalidTopic

_SEGMENT = r"[A-Za-z0-9_.\-]+"
_TOPIC_RE = re.compile(rf"{_SEGMENT}(?::{_SEGMENT})*")

#: The pattern that matches every topic.
WILDCARD = "*"


def validate_topic(topic: object) -> str:
    """Return ``topic`` if it is a valid topic name, else raise InvalidTopic."""
    if not isinstance(topic, str):
        raise InvalidTopic(f"topic must be a string, not {type(topic).__name__}")
    if len(topic) > MAX_TOPIC_LENGTH:
        raise InvalidTopic(f"topic is longer than {MAX_TOPIC_LENGTH} characters")
    if _TOPIC_RE.fullmatch(topic) is None:
        raise InvalidTopic(
            f"invalid topic {topic!r}: use ':'-separated segments of letters, digits, "
            "'_', '-' and '.', e.g. 'mail:send-bulk'"
        )
    return topic


def validate_pattern(pattern: object) -> str:
    """Return ``pattern`` if it is a valid subscription pattern, else raise InvalidTopic.

    Valid: a topic (``log:error``), a prefix (``log:*``) or ``*``.
    """
    if pattern == WILDCARD:
        return WILDCARD
    if isinstance(pattern, str) and pattern.endswith(":*"):
        try:
            validate_topic(pattern[:-2])
        except InvalidTopic:
            raise InvalidTopic(
                f"invalid pattern {pattern!r}: use a topic, 'prefix:*' or '*'"
            ) from None
        return pattern
    return validate_topic(pattern)


def validate_permission(permission: object) -> str:
    """Return ``permission`` if it is a topic or ``*``, else raise InvalidTopic."""
    if permission == WILDCARD:
        return WILDCARD
    return validate_topic(permission)


def pattern_prefix(pattern: str) -> str | None:
    """The prefix a pattern covers (``"log"`` for ``log:*``, ``""`` for ``*``), or
    ``None`` for an exact topic."""
    if pattern == WILDCARD:
        return ""
    if pattern.endswith(":*"):
        return pattern[:-2]
    return None


def prefixes(topic: str) -> Iterator[str]:
    """Every prefix key that matches ``topic``, most specific first.

    ``a:b:c`` yields ``a:b``, ``a`` and ``""`` (the key of ``*``). A prefix pattern
    ``a:b:*`` covers topics strictly below ``a:b``.
    """
    end = topic.rfind(":")
    while end != -1:
        yield topic[:end]
        end = topic.rfind(":", 0, end)
    yield ""


def matches(pattern: str, topic: str) -> bool:
    """True if subscription ``pattern`` matches ``topic``."""
    prefix = pattern_prefix(pattern)
    if prefix is None:
        return pattern == topic
    return prefix == "" or topic.startswith(prefix + ":")


def permits(permissions: Iterable[str], topic: str) -> bool:
    """True if any permission grants ``topic``.

    A permission grants its own topic and every topic below it.
    """
    for perm in permissions:
        if perm == WILDCARD or perm == topic or topic.startswith(perm + ":"):
            return True
    return False


def permits_pattern(permissions: Iterable[str], pattern: str) -> bool:
    """True if listening on ``pattern`` stays within ``permissions``.

    ``log:*`` needs ``log`` (or ``*``); ``*`` needs ``*``.
    """
    prefix = pattern_prefix(pattern)
    if prefix is None:
        return permits(permissions, pattern)
    if prefix == "":
        return WILDCARD in permissions
    return permits(permissions, prefix)
