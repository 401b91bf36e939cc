"""Smoke test: the scripts in examples/ run as is, as real processes, against each other."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from taskhub_sync._demo_support import ManagedProcess

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

#: Variables the examples read; cleared so the developer's shell cannot leak in.
_CLEARED = {"MAILER_KEY": "", "PUBLISHER_KEY": "", "TASKHUB_HOST": ""}


def _example(name: str, env: dict[str, str]) -> ManagedProcess:
    return ManagedProcess(name, [sys.executable, str(EXAMPLES / f"{name}.py")], env=env)


@pytest.fixture
def procs() -> Iterator[list[ManagedProcess]]:
    """Processes started by a test; stopped in reverse order (killed if need be) after."""
    started: list[ManagedProcess] = []
    try:
        yield started
    finally:
        for proc in reversed(started):
            proc.stop(3)


@pytest.fixture
def hub_url(procs: list[ManagedProcess], monkeypatch: pytest.MonkeyPatch) -> str:
    """examples/server.py on a free port, with its development keys; its URL."""
    for name in _CLEARED:
        monkeypatch.delenv(name, raising=False)
    server = _example("server", {"TASKHUB_PORT": "0"})
    procs.append(server)
    line = server.wait_for_line(lambda s: "listening on ws://" in s, 20)
    return line.split("listening on ", 1)[1].split()[0]


def test_server_mailer_publisher(procs: list[ManagedProcess], hub_url: str) -> None:
    """The publisher prints each progress update, then the result, and exits 0."""
    mailer = _example("mailer", {"TASKHUB_URL": hub_url})
    procs.append(mailer)
    mailer.wait_for_line(lambda s: s.startswith("mailer ready"), 20)
    publisher = _example("publisher", {"TASKHUB_URL": hub_url})
    procs.append(publisher)
    assert publisher.wait(30) == 0, "\n".join(publisher.stderr_tail)
    assert publisher.lines == [
        "progress: {'sent': 1, 'to': 'ada@example.com'}",
        "progress: {'sent': 2, 'to': 'grace@example.com'}",
        "progress: {'sent': 3, 'to': 'linus@example.com'}",
        "result: {'sent': 3}",
    ]
    mailer.wait_for_line(lambda s: s == "sending to linus@example.com", 5)
    # SIGTERM stops the worker and the hub cleanly.
    mailer.terminate()
    assert mailer.wait(10) == 0, "\n".join(mailer.stderr_tail)
    server = procs[0]
    server.terminate()
    assert server.wait(10) == 0, "\n".join(server.stderr_tail)
    assert any("taskhub stopped" in line for line in server.stderr_tail)


def test_publisher_without_mailer_fails_cleanly(procs: list[ManagedProcess], hub_url: str) -> None:
    """With no mailer running, the publisher reports NoSubscribers and exits 1."""
    publisher = _example("publisher", {"TASKHUB_URL": hub_url})
    procs.append(publisher)
    assert publisher.wait(30) == 1
    assert any("NoSubscribers" in line for line in publisher.stderr_tail)
