"""Default settings, with their units, shared by the hub, the client and the CLI."""

from __future__ import annotations

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9999

#: Seconds a published task may wait for a subscriber to start or answer it.
DEFAULT_TASK_START_TIMEOUT = 0.1
#: Seconds a started task may run before it fails with TaskTimeout.
DEFAULT_TASK_FINISH_TIMEOUT = 60.0
#: Seconds a new connection has to finish the WebSocket handshake and authenticate.
DEFAULT_AUTH_TIMEOUT = 5.0
#: Bytes: largest WebSocket message the hub accepts or sends.
DEFAULT_MAX_MESSAGE_SIZE = 1024 * 1024
#: Seconds between heartbeats (WebSocket pings) on an idle connection.
DEFAULT_PING_INTERVAL = 5.0

#: Seconds the client waits to connect, upgrade and authenticate.
DEFAULT_OPEN_TIMEOUT = 10.0
#: Seconds close() waits for the hub's close reply and for running handlers.
DEFAULT_CLOSE_TIMEOUT = 5.0
#: Seconds a blocking request to the hub (sub, unsub) waits for its answer.
DEFAULT_REQUEST_TIMEOUT = 10.0
#: Handler threads per client: how many tasks one instance runs at once.
DEFAULT_MAX_WORKERS = 8

#: Topics: at most this many characters.
MAX_TOPIC_LENGTH = 200
#: Messages that may queue for one connection before it is dropped as a slow consumer.
DEFAULT_MAX_QUEUED_MESSAGES = 10_000
#: Seconds the hub keeps a disconnected publisher's tasks for it to resume.
DEFAULT_RESUME_GRACE = 5.0
#: Tasks one connection may have pending at once.
DEFAULT_MAX_PENDING = 10_000
#: Patterns one connection may subscribe to.
DEFAULT_MAX_SUBSCRIPTIONS = 1_000
#: Connections that may be in the upgrade/authentication phase at once.
DEFAULT_MAX_HANDSHAKES = 256
#: Failed authentications per remote host per minute before it is refused outright.
DEFAULT_AUTH_FAILURE_LIMIT = 20
#: (first, max) seconds between a client's reconnect attempts; doubles per attempt.
DEFAULT_RECONNECT_DELAY = (0.1, 5.0)
#: Bytes the hub may hold for a peer that reads slowly before dropping it.
MAX_UNSENT_BYTES = 16 * 1024 * 1024

#: Longest task timeout accepted (a year); longer ones are refused, not overflowed.
MAX_TASK_TIMEOUT = 365 * 24 * 3600.0
#: Longest interval or connection timeout accepted (a day).
MAX_INTERVAL = 24 * 3600.0


def check_seconds(name: str, value: object, *, maximum: float, zero_ok: bool = False) -> float:
    """``value`` as a float if it is a finite number of seconds in (0, maximum]
    (or [0, maximum] with ``zero_ok``).

    Raises:
        ValueError: Otherwise, naming the setting.
    """
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    seconds = float(value) if ok else float("nan")  # type: ignore[arg-type]
    low_ok = seconds >= 0 if zero_ok else seconds > 0
    if not (low_ok and seconds <= maximum):  # also false for NaN
        bound = ">= 0" if zero_ok else "> 0"
        raise ValueError(
            f"{name} must be a number of seconds {bound} and <= {maximum:g}, not {value!r}"
        )
    return seconds


def check_count(name: str, value: object, *, minimum: int = 1) -> int:
    """``value`` if it is an integer (not a bool) >= ``minimum``.

    Raises:
        ValueError: Otherwise, naming the setting.
    """
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, not {value!r}")
    return value
