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
