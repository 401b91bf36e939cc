"""Opening one client connection: TCP (and TLS), the WebSocket upgrade, hello/welcome.

websocket-client does the HTTP upgrade on a socket we made ourselves (direct: no
``*_proxy`` variables, PITFALLS LP-17; no redirects, LP-18); the frames after it
are ours (_frames.py), read and written through a Link.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable
from urllib.parse import urlsplit

import websocket

from . import protocol as p
from ._deadline import Deadline
from ._frames import OP_CLOSE, OP_TEXT, FrameError, parse_close
from ._transport import Link, StreamSocket
from .errors import (
    AuthenticationError,
    ConnectionLost,
    ProtocolError,
    TooManyInstances,
    TryAgainLater,
)


def open_link(
    url: str,
    hello: p.Hello,
    deadline: Deadline,
    ssl_context: ssl.SSLContext | None,
    on_socket: Callable[[socket.socket], None] | None = None,
) -> tuple[Link, p.Welcome]:
    """Connect to ``url``, upgrade, send ``hello`` and return the link and the welcome.

    ``on_socket`` gets the TCP socket as soon as it is connected (shutting it down
    from another thread aborts the attempt).

    Raises:
        ValueError: For a URL that is not ``ws://`` or ``wss://``.
        AuthenticationError: The hub refused the credentials (4001/4002).
        ConnectionLost: The hub cannot be reached or closed the connection.
        TimeoutError: Nothing within ``deadline``.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"the hub URL must look like ws://host:port, not {url!r}")
    secure = parts.scheme == "wss"
    try:
        port = parts.port or (443 if secure else 80)
        sock = socket.create_connection((parts.hostname, port), deadline.remaining())
        if on_socket is not None:
            on_socket(sock)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if secure:
            context = ssl_context or ssl.create_default_context()
            sock = context.wrap_socket(sock, server_hostname=parts.hostname)
        stream = StreamSocket(sock)
        websocket.create_connection(
            url,
            timeout=deadline.remaining(),
            socket=stream,
            redirect_limit=0,
            suppress_origin=True,
        )
    except (socket.timeout, websocket.WebSocketTimeoutException) as exc:
        raise TimeoutError(f"no answer from {url} within the open timeout") from exc
    except (OSError, websocket.WebSocketException) as exc:
        raise ConnectionLost(f"cannot connect to {url}: {exc}") from exc
    link = Link(stream)
    try:
        link.send_text(p.encode(hello))
        return link, _await_welcome(link, deadline)
    except BaseException as exc:
        link.drop()
        if isinstance(exc, socket.timeout):
            raise TimeoutError(f"no welcome from {url} within the open timeout") from None
        if isinstance(exc, OSError):
            raise ConnectionLost(f"connection to {url} lost: {exc}") from exc
        raise


def _await_welcome(link: Link, deadline: Deadline) -> p.Welcome:
    """Read until the hub's welcome (or its refusal); keep what follows it."""
    while True:
        link.settimeout(max(deadline.remaining() or 0.0, 0.001))
        frames = link.read()
        for i, (opcode, payload) in enumerate(frames):
            if opcode == OP_CLOSE:
                try:
                    code, reason = parse_close(payload)
                except FrameError as exc:
                    raise ProtocolError(f"bad close frame from the hub: {exc}") from None
                if code == p.CLOSE_TOO_MANY_INSTANCES:
                    raise TooManyInstances(reason or "too many instances")
                if code == p.CLOSE_TRY_AGAIN_LATER:
                    raise TryAgainLater(reason or "refused for now; try again later")
                if code == p.CLOSE_AUTH_FAILED:
                    raise AuthenticationError(reason or "authentication failed")
                raise ConnectionLost(f"hub closed the connection: {code} {reason}")
            if opcode == OP_TEXT:
                welcome = p.decode(payload)
                if not isinstance(welcome, p.Welcome):
                    raise ProtocolError(f"expected welcome, got {welcome.TYPE!r}")
                link.backlog = frames[i + 1 :]
                return welcome
