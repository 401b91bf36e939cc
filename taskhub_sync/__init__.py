"""taskhub_sync: a synchronous task hub over WebSocket. Send it tasks, watch as they happen."""

from .client import Client, Task
from .errors import (
    AuthenticationError,
    ConcurrencyError,
    ConnectionLost,
    InvalidState,
    InvalidTopic,
    LimitExceeded,
    NoSubscribers,
    Overloaded,
    PayloadTooLarge,
    PermissionDenied,
    ProtocolError,
    TaskError,
    TaskFailed,
    TaskHubError,
    TaskTimeout,
    TooManyInstances,
    TryAgainLater,
    WorkerLost,
)
from .handle import TaskHandle
from .protocol import Outcome
from .server import Server

__version__ = "0.1.0"

__all__ = [
    "Client",
    "Server",
    "Task",
    "TaskHandle",
    "Outcome",
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
    "__version__",
]
