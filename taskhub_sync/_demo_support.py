"""Support for ``taskhub-sync demo`` and process-level tests: an SMTP sink and a
supervised child process.

:class:`SmtpSink` speaks just enough SMTP for ``smtplib.SMTP.sendmail`` and keeps
what it receives. :class:`ManagedProcess` runs a command, collects its output lines
(so callers wait for a line such as ``ready`` instead of sleeping) and stops it:
stdin closed, SIGTERM, then SIGKILL after a bound.
"""

from __future__ import annotations

import logging
import os
import socketserver
import subprocess
import threading
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

from ._deadline import Deadline

logger = logging.getLogger(__name__)

__all__ = [
    "DemoError",
    "SmtpMessage",
    "SmtpSink",
    "ManagedProcess",
    "stop_all",
    "supervised",
    "STOP_GRACE",
]

#: Seconds a child gets to stop after SIGTERM before SIGKILL.
STOP_GRACE = 2.0


class DemoError(Exception):
    """A step of the demo failed; the message says which."""


# ----------------------------------------------------------------------------- SMTP sink


@dataclass(frozen=True)
class SmtpMessage:
    """One message the sink accepted."""

    mail_from: str
    rcpt_to: tuple[str, ...]
    data: bytes


class _SmtpHandler(socketserver.StreamRequestHandler):
    """Just enough SMTP (RFC 5321) for ``smtplib.SMTP.sendmail``: no auth, no TLS."""

    timeout = 5.0  # seconds a silent client may hold its thread
    max_data = 1024 * 1024  # bytes per message

    def handle(self) -> None:
        self._reply(220, "taskhub-demo SMTP sink ready")
        mail_from: str | None = None
        rcpt_to: list[str] = []
        while True:
            line = self.rfile.readline(2048)
            if not line:
                return
            verb, _, arg = line.decode("utf-8", "replace").rstrip("\r\n").partition(" ")
            verb = verb.upper()
            if verb in ("EHLO", "HELO"):
                self._reply(250, "taskhub-demo")
            elif verb == "MAIL":
                mail_from, rcpt_to = _address(arg), []
                self._reply(250, "OK")
            elif verb == "RCPT" and mail_from is not None:
                rcpt_to.append(_address(arg))
                self._reply(250, "OK")
            elif verb == "DATA" and mail_from is not None and rcpt_to:
                self._reply(354, "end data with <CR><LF>.<CR><LF>")
                data = self._read_data()
                if data is None:
                    return
                sink: SmtpSink = self.server.sink  # type: ignore[attr-defined]
                sink._record(SmtpMessage(mail_from, tuple(rcpt_to), data))
                mail_from, rcpt_to = None, []
                self._reply(250, "OK: queued")
            elif verb == "RSET":
                mail_from, rcpt_to = None, []
                self._reply(250, "OK")
            elif verb == "NOOP":
                self._reply(250, "OK")
            elif verb == "QUIT":
                self._reply(221, "bye")
                return
            elif verb in ("RCPT", "DATA"):
                self._reply(503, "bad sequence of commands")
            else:
                self._reply(502, "command not implemented")

    def _read_data(self) -> bytes | None:
        """The DATA lines up to the lone ``.``, dot-unstuffed; None if cut off."""
        lines: list[bytes] = []
        size = 0
        while True:
            line = self.rfile.readline(self.max_data)
            if not line:
                return None
            if line in (b".\r\n", b".\n"):
                return b"".join(lines)
            if line.startswith(b"."):
                line = line[1:]
            size += len(line)
            if size > self.max_data:
                return None
            lines.append(line)

    def _reply(self, code: int, text: str) -> None:
        self.wfile.write(f"{code} {text}\r\n".encode())
        self.wfile.flush()


def _address(arg: str) -> str:
    """``FROM:<a@b.c> SIZE=10`` -> ``a@b.c``."""
    _, _, rest = arg.partition(":")
    rest = rest.strip()
    if rest.startswith("<"):
        return rest[1 : rest.find(">")] if ">" in rest else rest[1:]
    return rest.split(" ", 1)[0]


class _SmtpServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = False  # server_close() joins the handler threads
    block_on_close = True


class SmtpSink:
    """A local SMTP server that accepts every message and keeps it in memory.

    ``start()`` listens on ``host`` and a free port (read ``port``); ``stop()`` stops
    it and joins its threads. Also a context manager. Thread-safe.

    Args:
        host: Interface to listen on.
    """

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self._server: _SmtpServer | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # guards _messages
        self._messages: list[SmtpMessage] = []

    @property
    def port(self) -> int:
        """The port it listens on (after start())."""
        assert self._server is not None, "start() first"
        return int(self._server.server_address[1])

    @property
    def messages(self) -> list[SmtpMessage]:
        """Every message accepted so far, in order."""
        with self._lock:
            return list(self._messages)

    def start(self) -> None:
        """Listen and serve in a background thread. Returns once listening."""
        self._server = _SmtpServer((self.host, 0), _SmtpHandler)
        self._server.sink = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="taskhub-demo-smtp",
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and join every thread (handlers end within their timeout)."""
        if self._server is None or self._thread is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def _record(self, message: SmtpMessage) -> None:
        with self._lock:
            self._messages.append(message)

    def __enter__(self) -> SmtpSink:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ----------------------------------------------------------------------------- processes


class ManagedProcess:
    """A child process whose output lines are collected (and optionally echoed).

    Stdout lines are kept (``lines``) for :meth:`wait_for_line`; the last stderr lines
    are kept in ``stderr_tail``. Two reader threads per process; both end when the
    process closes its pipes, and :meth:`stop` joins them. Thread-safe.

    Args:
        name: Shown in messages and as the echo prefix.
        argv: The command.
        env: Extra environment variables (added to ``os.environ``).
        on_stdout: If given, called with ``(name, line)`` for each stdout line as it
            arrives (on a reader thread), e.g. to print it.
        on_stderr: The same for stderr lines.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        on_stdout: Callable[[str, str], None] | None = None,
        on_stderr: Callable[[str, str], None] | None = None,
    ) -> None:
        self.name = name
        full_env = dict(os.environ)
        full_env.update(env or {})
        full_env["PYTHONUNBUFFERED"] = "1"
        self._cond = threading.Condition()  # guards lines and _eof
        self.lines: list[str] = []
        self.stderr_tail: deque[str] = deque(maxlen=40)
        self._eof = False
        self.proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE,  # held open; closed by stop() (see stop_on_stdin_eof)
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=full_env,
            text=True,
            encoding="utf-8",
            errors="replace",
        )
        self._threads = [
            threading.Thread(
                target=self._pump_stdout, args=(on_stdout,), name=f"taskhub-demo-{name}-out"
            ),
            threading.Thread(
                target=self._pump_stderr, args=(on_stderr,), name=f"taskhub-demo-{name}-err"
            ),
        ]
        for t in self._threads:
            t.start()

    def __repr__(self) -> str:
        return f"<ManagedProcess {self.name} pid={self.proc.pid} rc={self.proc.returncode}>"

    def _pump_stdout(self, echo: Callable[[str, str], None] | None) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.rstrip("\r\n")
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
            if echo is not None:
                echo(self.name, line)
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def _pump_stderr(self, echo: Callable[[str, str], None] | None) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.rstrip("\r\n")
            self.stderr_tail.append(line)
            if echo is not None:
                echo(self.name, line)

    def wait_for_line(self, predicate: Callable[[str], bool], timeout: float | None) -> str:
        """Block until a stdout line (any so far, or a new one) satisfies ``predicate``.

        Args:
            predicate: Tested on each line.
            timeout: Seconds to wait at most; None waits until the process's stdout ends.

        Returns:
            The first matching line.

        Raises:
            DemoError: If the process closed its stdout (exited) or the time ran out
                without such a line.
        """
        found: list[str] = []

        def ready() -> bool:
            found[:] = [line for line in self.lines if predicate(line)][:1]
            return bool(found) or self._eof

        with self._cond:
            self._cond.wait_for(ready, timeout)
            if found:
                return found[0]
            eof = self._eof
        if eof:
            raise DemoError(f"{self.name} exited (code {self.proc.poll()}) before it was ready")
        raise DemoError(f"{self.name} not ready within {timeout:.1f} s")

    def wait(self, timeout: float | None) -> int:
        """Wait for the process to exit and its output to be read; return its code.

        Raises:
            DemoError: If it is still running after ``timeout`` seconds.
        """
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise DemoError(f"{self.name} still running after {timeout:.1f} s") from None
        for t in self._threads:
            t.join(timeout)
        return code

    def terminate(self) -> None:
        """Close its stdin and send SIGTERM if it is still running. Does not wait."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except OSError:  # it exited: broken pipe
                pass
        if self.proc.poll() is None:
            self.proc.terminate()

    def stop(self, grace: float = STOP_GRACE) -> int:
        """SIGTERM, then SIGKILL after ``grace`` seconds; join the reader threads.

        Returns:
            The exit code (negative: killed by that signal).
        """
        self.terminate()
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            logger.warning("%s did not stop within %.1f s: killing it", self.name, grace)
            self.proc.kill()
            self.proc.wait()
        for t in self._threads:
            t.join(grace)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()
        return self.proc.returncode


def stop_all(procs: Sequence[ManagedProcess], grace: float = STOP_GRACE) -> None:
    """Stop several processes at once: SIGTERM to all, then wait, then SIGKILL."""
    for proc in procs:
        proc.terminate()
    deadline = Deadline(grace)
    for proc in procs:
        proc.stop(deadline.remaining() or 0.0)


@contextmanager
def supervised(groups: list[list[ManagedProcess]]) -> Iterator[None]:
    """On exit, stop the groups of processes appended to ``groups`` meanwhile, in
    reverse order (each group at once), whatever happened."""
    try:
        yield
    finally:
        for group in reversed(groups):
            stop_all(group)
