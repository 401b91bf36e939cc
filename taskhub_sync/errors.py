"""Exceptions raised by taskhub_sync.

Every error the library raises on purpose derives from :class:`TaskHubError`::

    TaskHubError
    ├── ProtocolError            malformed or unexpected message
    ├── InvalidTopic             topic or pattern breaks the naming rules (also ValueError)
    ├── AuthenticationError      wrong name or key, or refused at the door
    │   └── TryAgainLater        refused for now; reconnects retry it
    │       └── TooManyInstances max_instances of this service are connected
    ├── PermissionDenied         topic outside the credential's permissions
    ├── ConnectionLost           peer or network gone (also ConnectionError)
    ├── TaskError                the task itself did not succeed; .task_id, .topic
    │   ├── NoSubscribers        nobody took it within task_start_timeout
    │   │   └── Overloaded       subscribers exist but every instance stayed busy
    │   ├── TaskTimeout          ran past its finish timeout
    │   ├── TaskFailed           the worker raised; .service, .remote_type, .remote_message
    │   ├── WorkerLost           the worker's connection dropped while it held the task
    │   └── PayloadTooLarge      payload or result over the hub's max_message_size
    ├── LimitExceeded            a per-connection limit of the hub (pending tasks, subscriptions)
    ├── InvalidState             not allowed in this state
    └── ConcurrencyError         a call from a thread where it would deadlock

Task-level failures (everything under ``TaskError``, plus ``PermissionDenied`` for a
``pub()`` outside the credential) reach the publisher through the handle returned by
``Client.pub()``. Connection-level failures raise from the call that hit them.
"""

from __future__ import annotations

__all__ = [
    "TaskHubError",
    "ProtocolError",
    "InvalidTopic",
    "AuthenticationError",
    "TryAgainLater",
    "TooManyInstances",
    "PermissionDenied",
    "ConnectionLost",
    "TaskError",
    "NoSubscribers",
    "Overloaded",
    "TaskTimeout",
    "TaskFailed",
    "WorkerLost",
    "PayloadTooLarge",
    "LimitExceeded",
    "InvalidState",
    "ConcurrencyError",
]


class TaskHubError(Exception):
    """Base class of every error raised by taskhub_sync."""


class ProtocolError(TaskHubError):
    """A message was malformed or not allowed at this point of the conversation."""


class InvalidTopic(TaskHubError, ValueError):
    """A topic or subscription pattern breaks the naming rules."""


class AuthenticationError(TaskHubError):
    """The hub refused the connection: unknown name, wrong key, or too many instances."""


class TryAgainLater(AuthenticationError):
    """The hub refused the connection for now (e.g. too many failed logins from
    this host). Reconnects and ``wait_for_hub`` retry it with backoff."""


class TooManyInstances(TryAgainLater):
    """``max_instances`` connections of this service are open already.

    Retried like TryAgainLater: after a crash, the hub may not have noticed yet
    that the old instance is gone.
    """


class PermissionDenied(TaskHubError):
    """The credential does not allow this topic for this action."""

    def __init__(self, message: str, *, topic: str | None = None) -> None:
        super().__init__(message)
        self.topic = topic


class ConnectionLost(TaskHubError, ConnectionError):
    """The connection to the peer is gone (or was never made)."""


class TaskError(TaskHubError):
    """The task did not produce a result.

    Attributes:
        task_id: The id of the task.
        topic: The topic it was published on.
    """

    code = "task_error"

    def __init__(
        self, message: str, *, task_id: str | None = None, topic: str | None = None
    ) -> None:
        super().__init__(message)
        self.task_id = task_id
        self.topic = topic


class NoSubscribers(TaskError):
    """No subscriber took the task within ``task_start_timeout``."""

    code = "no_subscribers"


class Overloaded(NoSubscribers):
    """Subscribers exist, but every instance stayed busy for the whole start window."""

    code = "overloaded"


class TaskTimeout(TaskError):
    """A started task ran past its finish timeout. The worker was told to stop."""

    code = "timeout"


class PayloadTooLarge(TaskError):
    """The payload or result is bigger than the hub's ``max_message_size``."""

    code = "payload_too_large"


class _RemoteTaskError(TaskError):
    """A task error that names the service it happened at."""

    def __init__(
        self,
        message: str,
        *,
        task_id: str | None = None,
        topic: str | None = None,
        service: str | None = None,
    ) -> None:
        super().__init__(message, task_id=task_id, topic=topic)
        self.service = service


class TaskFailed(_RemoteTaskError):
    """The worker's handler raised.

    Attributes:
        service: Name of the service whose handler raised.
        remote_type: The exception's class name on the worker, e.g. ``"ValueError"``.
        remote_message: ``str()`` of that exception.
    """

    code = "failed"

    def __init__(
        self,
        message: str,
        *,
        task_id: str | None = None,
        topic: str | None = None,
        service: str | None = None,
        remote_type: str | None = None,
        remote_message: str | None = None,
    ) -> None:
        super().__init__(message, task_id=task_id, topic=topic, service=service)
        self.remote_type = remote_type
        self.remote_message = remote_message


class WorkerLost(_RemoteTaskError):
    """The worker holding the task disconnected before it finished.

    Attributes:
        service: Name of the service whose instance was lost.
    """

    code = "worker_lost"


class LimitExceeded(TaskHubError):
    """A per-connection limit of the hub was reached (pending tasks, subscriptions)."""


class InvalidState(TaskHubError):
    """The operation is not allowed in the current state."""


class ConcurrencyError(TaskHubError):
    """The call would deadlock on this thread (e.g. waiting on the client's reader thread)."""


_TASK_ERRORS: dict[str, type[TaskError]] = {
    "no_subscribers": NoSubscribers,
    "overloaded": Overloaded,
    "timeout": TaskTimeout,
    "payload_too_large": PayloadTooLarge,
}


def from_code(
    code: str,
    message: str,
    *,
    task_id: str,
    topic: str,
    service: str | None = None,
    remote_type: str | None = None,
) -> TaskHubError:
    """The exception for an error code the hub sent about a task (see docs/protocol.rst)."""
    if code == "permission_denied":
        return PermissionDenied(message, topic=topic)
    if code == "invalid_topic":
        return InvalidTopic(message)
    if code == "connection_lost":
        return ConnectionLost(message)
    if code in ("too_many_pending", "too_many_subscriptions"):
        return LimitExceeded(message)
    if code == "worker_lost":
        return WorkerLost(message, task_id=task_id, topic=topic, service=service)
    if code == "failed":
        remote_type = remote_type or "Exception"
        prefix = f"{remote_type}: "
        remote_message = message[len(prefix) :] if message.startswith(prefix) else message
        return TaskFailed(
            f"task {task_id} on {topic!r} failed at {service!r}: {message}",
            task_id=task_id,
            topic=topic,
            service=service,
            remote_type=remote_type,
            remote_message=remote_message,
        )
    return _TASK_ERRORS.get(code, TaskError)(message, task_id=task_id, topic=topic)
