"""Tests of the taskhub-sync command line: main([...]) in-process, serve and demo as
real subprocesses."""

from __future__ import annotations

import io
import json
import signal
import smtplib
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from taskhub_sync import Client, Server, Task
from taskhub_sync._demo_support import ManagedProcess, SmtpSink
from taskhub_sync.auth import StoredKey
from taskhub_sync.cli import (
    EXIT_DENIED,
    EXIT_FAILED,
    EXIT_LOST,
    EXIT_NO_SUBSCRIBERS,
    EXIT_OK,
    EXIT_TIMEOUT,
    EXIT_USAGE,
    main,
)
from taskhub_sync.demo import run_demo

CLI_KEY = "cli-test-key"
WORKER_KEY = "worker-test-key"


@pytest.fixture
def hub() -> Iterator[Server]:
    server = Server("127.0.0.1", 0, task_start_timeout=0.5, task_finish_timeout=10.0)
    server.add_credential("cli", CLI_KEY, pub_permissions=["*"], max_instances=4)
    server.add_credential("worker", WORKER_KEY, sub_permissions=["*"], max_instances=2)
    server.add_credential("limited", "limited-key", pub_permissions=["allowed"])
    with server:
        yield server


@pytest.fixture
def worker(hub: Server) -> Iterator[Client]:
    client = Client(hub.url, name="worker", key=WORKER_KEY, close_timeout=0.5)
    try:
        yield client
    finally:
        client.close()


def pub(hub: Server, *args: str, key: str = CLI_KEY) -> int:
    return main(["pub", *args, "--url", hub.url, "--key", key])


# ----------------------------------------------------------------------------- help, usage


def test_help_documents_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    """--help returns 0 and lists the exit codes, for the tool and for pub."""
    assert main(["--help"]) == EXIT_OK
    out = capsys.readouterr().out
    for command in ("serve", "pub", "hash-key", "demo"):
        assert command in out
    assert "exit codes" in out and "NoSubscribers" in out
    assert main(["pub", "--help"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "--watch" in out and "TASKHUB_KEY" in out
    assert "5  TaskTimeout" in out and "6  WorkerLost or ConnectionLost" in out


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """No subcommand: exit 2 with argparse's message."""
    assert main([]) == EXIT_USAGE
    assert "required" in capsys.readouterr().err


def test_pub_bad_json_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """A payload that is not JSON: exit 2 before connecting."""
    assert main(["pub", "t", "{nope", "--key", "k", "--url", "ws://127.0.0.1:9"]) == EXIT_USAGE
    assert "not valid JSON" in capsys.readouterr().err


def test_pub_without_key_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """No --key and no TASKHUB_KEY: exit 2."""
    monkeypatch.delenv("TASKHUB_KEY", raising=False)
    assert main(["pub", "t", "{}", "--url", "ws://127.0.0.1:9"]) == EXIT_USAGE
    assert "TASKHUB_KEY" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-1", "abc", "inf"])
def test_pub_bad_timeout_is_a_usage_error(value: str) -> None:
    """--timeout and --wait take positive seconds."""
    assert main(["pub", "t", "{}", "--timeout", value]) == EXIT_USAGE
    assert main(["pub", "t", "{}", "--wait", value]) == EXIT_USAGE


# ----------------------------------------------------------------------------- hash-key


def test_hash_key_from_argument(capsys: pytest.CaptureFixture[str]) -> None:
    """hash-key KEY prints a hash that verifies KEY."""
    assert main(["hash-key", "my-key"]) == EXIT_OK
    out = capsys.readouterr().out.strip()
    assert out.startswith("scrypt$")
    assert StoredKey(key_hash=out).verify("my-key")
    assert not StoredKey(key_hash=out).verify("other")


def test_hash_key_from_stdin(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without KEY and with stdin not a terminal, the first line of stdin is hashed."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("piped-key\nignored\n"))
    assert main(["hash-key"]) == EXIT_OK
    assert StoredKey(key_hash=capsys.readouterr().out.strip()).verify("piped-key")


def test_hash_key_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty key is refused with exit 2."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n"))
    assert main(["hash-key"]) == EXIT_USAGE


# ----------------------------------------------------------------------------- pub


def test_pub_prints_the_result_as_json(
    hub: Server, worker: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --watch, stdout is the result's JSON alone."""
    worker.sub("math:double", lambda task: {"double": task.get_payload()["n"] * 2})
    assert pub(hub, "math:double", '{"n": 21}') == EXIT_OK
    assert json.loads(capsys.readouterr().out) == {"double": 42}


def test_pub_watch_prints_updates_then_result(
    hub: Server, worker: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    """--watch prints every update in order, then the result."""

    def count(task: Task) -> dict[str, int]:
        task.start()
        n = task.get_payload()
        for i in range(1, n + 1):
            task.update({"sent": i})
        return {"sent": n}

    worker.sub("mail:send-bulk", count)
    assert pub(hub, "mail:send-bulk", "3", "--watch") == EXIT_OK
    assert capsys.readouterr().out.splitlines() == [
        'update: {"sent": 1}',
        'update: {"sent": 2}',
        'update: {"sent": 3}',
        'result: {"sent": 3}',
    ]


def test_pub_key_from_environment(
    hub: Server, worker: Client, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """TASKHUB_KEY and TASKHUB_NAME are used when no --key/--name is given."""
    worker.sub("echo", lambda task: task.get_payload())
    monkeypatch.setenv("TASKHUB_KEY", "limited-key")
    monkeypatch.setenv("TASKHUB_NAME", "limited")
    assert main(["pub", "echo", "[1]", "--url", hub.url]) == EXIT_DENIED  # limited: no "echo"
    monkeypatch.setenv("TASKHUB_KEY", CLI_KEY)
    assert main(["pub", "echo", "[1]", "--url", hub.url, "--name", "cli"]) == EXIT_OK
    assert capsys.readouterr().out.strip() == "[1]"


def test_pub_no_subscribers(hub: Server, capsys: pytest.CaptureFixture[str]) -> None:
    """Nobody subscribed: exit 3."""
    assert pub(hub, "nobody:listens", "{}") == EXIT_NO_SUBSCRIBERS
    assert "NoSubscribers" in capsys.readouterr().err


def test_pub_permission_denied(hub: Server, capsys: pytest.CaptureFixture[str]) -> None:
    """A topic outside the credential's pub_permissions: exit 4."""
    assert main(
        ["pub", "secret", "{}", "--url", hub.url, "--name", "limited", "--key", "limited-key"]
    ) == (EXIT_DENIED)
    assert "PermissionDenied" in capsys.readouterr().err


def test_pub_wrong_key(hub: Server, capsys: pytest.CaptureFixture[str]) -> None:
    """A wrong key: exit 4, and the key is not echoed."""
    assert pub(hub, "t", "{}", key="very-wrong-key") == EXIT_DENIED
    err = capsys.readouterr().err
    assert "AuthenticationError" in err and "very-wrong-key" not in err


def test_pub_invalid_topic(hub: Server, capsys: pytest.CaptureFixture[str]) -> None:
    """A malformed topic: exit 2."""
    assert pub(hub, "bad topic!", "{}") == EXIT_USAGE
    assert "InvalidTopic" in capsys.readouterr().err


def test_pub_task_failed(hub: Server, worker: Client, capsys: pytest.CaptureFixture[str]) -> None:
    """The handler raised: exit 1 with the remote error."""

    def fail(task: Task) -> None:
        raise ValueError("no such mailbox")

    worker.sub("fails", fail)
    assert pub(hub, "fails", "{}") == EXIT_FAILED
    err = capsys.readouterr().err
    assert "TaskFailed" in err and "ValueError" in err and "no such mailbox" in err


def _claim_and_wait(task: Task) -> None:
    task.start()
    task.wait_cancelled(10)


def test_pub_task_timeout(hub: Server, worker: Client, capsys: pytest.CaptureFixture[str]) -> None:
    """A started task past --timeout: exit 5."""
    worker.sub("slow", _claim_and_wait)
    assert pub(hub, "slow", "{}", "--timeout", "0.3") == EXIT_TIMEOUT
    assert "TaskTimeout" in capsys.readouterr().err


def test_pub_wait_timeout(hub: Server, worker: Client, capsys: pytest.CaptureFixture[str]) -> None:
    """No result within --wait: exit 5, saying the task may still run."""
    worker.sub("slow", _claim_and_wait)
    assert pub(hub, "slow", "{}", "--wait", "0.3", "--timeout", "5") == EXIT_TIMEOUT
    assert "no result within --wait 0.3 s" in capsys.readouterr().err


def test_pub_worker_lost(hub: Server, worker: Client, capsys: pytest.CaptureFixture[str]) -> None:
    """The worker's connection drops while it holds the task: exit 6."""
    started = threading.Event()
    release = threading.Event()

    def hold(task: Task) -> None:
        task.start()
        started.set()
        release.wait(10)

    def cut() -> None:
        if started.wait(10):
            worker._ws.sock.shutdown(socket.SHUT_RDWR)

    worker.sub("held", hold)
    cutter = threading.Thread(target=cut)
    cutter.start()
    try:
        assert pub(hub, "held", "{}", "--timeout", "10") == EXIT_LOST
    finally:
        started.set()
        release.set()
        cutter.join(10)
    assert not cutter.is_alive()
    assert "WorkerLost" in capsys.readouterr().err


def test_pub_hub_unreachable(capsys: pytest.CaptureFixture[str]) -> None:
    """Nothing listens at the URL: exit 6."""
    with socket.socket() as sock:  # bound, not listening: connections are refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        code = main(["pub", "t", "{}", "--url", f"ws://127.0.0.1:{port}", "--key", "k"])
    assert code == EXIT_LOST
    assert "ConnectionLost" in capsys.readouterr().err


# ----------------------------------------------------------------------------- serve


def test_serve_bad_config_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """serve --config with a broken file: exit 2 with the ConfigError, nothing started."""
    path = tmp_path / "hub.toml"
    path.write_text("[hub]\nport = 'x'\n[credentials.a]\nkey = 'k'\n")
    assert main(["serve", "--config", str(path)]) == EXIT_USAGE
    assert f"{path}: [hub] port: must be an integer" in capsys.readouterr().err


def test_serve_port_in_use(capsys: pytest.CaptureFixture[str]) -> None:
    """serve on a port already listened on: exit 1 with the reason."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        port = sock.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == EXIT_FAILED
    assert "cannot listen on" in capsys.readouterr().err


def _serve(*args: str, env: dict[str, str] | None = None) -> ManagedProcess:
    return ManagedProcess(
        "serve", [sys.executable, "-m", "taskhub_sync.cli", "serve", *args], env=env
    )


@pytest.fixture
def serve_proc() -> Iterator[list[ManagedProcess]]:
    """A list to put serve processes in; each is stopped (and killed if need be) after."""
    procs: list[ManagedProcess] = []
    try:
        yield procs
    finally:
        for proc in procs:
            proc.stop(3)


def _url_of(proc: ManagedProcess) -> str:
    line = proc.wait_for_line(lambda s: "listening on ws://" in s, 20)
    return line.split("listening on ", 1)[1].strip()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_default_config_prints_how_to_connect_and_stops_on_signal(
    serve_proc: list[ManagedProcess], sig: signal.Signals, capsys: pytest.CaptureFixture[str]
) -> None:
    """serve without a file prints URL and working keys; SIGTERM/SIGINT (even twice) exit 0
    promptly."""
    proc = _serve("--port", "0")
    serve_proc.append(proc)
    url = _url_of(proc)
    line = proc.wait_for_line(lambda s: "export TASKHUB_URL=" in s, 5)
    assert f"TASKHUB_URL={url} TASKHUB_NAME=cli TASKHUB_KEY=" in line
    key = line.rsplit("TASKHUB_KEY=", 1)[1].strip()
    for name in ("mailer", "geocoder", "logger"):
        proc.wait_for_line(lambda s, name=name: s.strip().startswith(name + " "), 5)
    # The printed key works (NoSubscribers, not AuthenticationError).
    assert main(["pub", "nobody:here", "{}", "--url", url, "--key", key]) == EXIT_NO_SUBSCRIBERS
    proc.proc.send_signal(sig)
    proc.proc.send_signal(sig)  # a second one (Ctrl-C twice, `timeout` signalling a group)
    assert proc.wait(10) == 0
    assert "Traceback" not in "\n".join(proc.stderr_tail)


def test_serve_with_config_file(
    serve_proc: list[ManagedProcess], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """serve --config reads keys from the environment; --port overrides the file; the
    printed listing never shows a key."""
    path = tmp_path / "hub.toml"
    path.write_text(
        "[hub]\nport = 9\n"
        "[credentials.cli]\nkey_env = 'CLI_KEY'\npub_permissions = ['*']\n"
        "[credentials.inline]\nkey = 'inline-secret'\n"
    )
    proc = _serve("--config", str(path), "--port", "0", env={"CLI_KEY": "from-env-secret"})
    serve_proc.append(proc)
    url = _url_of(proc)
    proc.wait_for_line(lambda s: s.startswith("Stop with"), 5)
    out = "\n".join(proc.lines)
    assert "$CLI_KEY" in out and "from-env-secret" not in out and "inline-secret" not in out
    assert main(["pub", "x", "{}", "--url", url, "--key", "from-env-secret"]) == EXIT_NO_SUBSCRIBERS
    assert main(["pub", "x", "{}", "--url", url, "--key", "wrong"]) == EXIT_DENIED
    proc.proc.terminate()
    assert proc.wait(10) == 0


# ----------------------------------------------------------------------------- demo


def test_demo_runs_the_scenario(serve_proc: list[ManagedProcess]) -> None:
    """taskhub-sync demo on real processes: live progress, right result, exit 0."""
    proc = ManagedProcess(
        "demo", [sys.executable, "-m", "taskhub_sync.cli", "demo", "--emails", "3"]
    )
    serve_proc.append(proc)
    code = proc.wait(60)
    out = proc.lines
    assert code == 0, "\n".join(out + list(proc.stderr_tail))
    updates = [line for line in out if line.startswith("[publisher] update: ")]
    assert [json.loads(u.split(": ", 1)[1])["sent"] for u in updates] == [1, 2, 3]
    result: Any = json.loads(
        next(line for line in out if line.startswith("[publisher] result: ")).split(": ", 1)[1]
    )
    assert result == {"sent": 3, "geocoded": 3}
    assert any(line.startswith("[logger] INFO  mailer: sent 3/3") for line in out)
    assert any(line.startswith("[geocoder] ") for line in out)
    assert out[-1] == "demo: OK: the mailer sent 3 emails and the SMTP sink received 3"


def test_demo_stops_everything_on_sigterm(serve_proc: list[ManagedProcess]) -> None:
    """SIGTERM mid-demo: exit 130, and the hub it started is gone (its port refuses)."""
    proc = ManagedProcess(
        "demo", [sys.executable, "-m", "taskhub_sync.cli", "demo", "--emails", "300"]
    )
    serve_proc.append(proc)
    line = proc.wait_for_line(lambda s: s.startswith("demo: hub listening on ws://"), 30)
    port = int(line.rsplit(":", 1)[1])
    proc.wait_for_line(lambda s: s.startswith("demo: publishing"), 30)
    proc.proc.terminate()
    assert proc.wait(20) == 130
    with socket.socket() as sock, pytest.raises(ConnectionRefusedError):
        sock.connect(("127.0.0.1", port))


def test_serve_stops_when_stdin_closes(serve_proc: list[ManagedProcess]) -> None:
    """serve --stop-on-stdin-eof stops cleanly once its parent closes the pipe."""
    proc = _serve("--port", "0", "--stop-on-stdin-eof")
    serve_proc.append(proc)
    _url_of(proc)
    assert proc.proc.stdin is not None
    proc.proc.stdin.close()
    assert proc.wait(10) == 0
    assert any("taskhub stopped" in line for line in proc.stderr_tail)


def test_demo_fails_cleanly_when_out_of_time() -> None:
    """A demo that runs out of time reports FAILED and leaves no process or thread."""
    out = io.StringIO()
    assert run_demo(emails=1, timeout=0.2, out=out) is False
    assert "demo: FAILED" in out.getvalue()


def test_smtp_sink_records_what_smtplib_sends() -> None:
    """The sink speaks enough SMTP for sendmail, unstuffs dots and keeps every message."""
    with SmtpSink() as sink, smtplib.SMTP("127.0.0.1", sink.port, timeout=5) as smtp:
        smtp.sendmail("a@example.com", ["b@example.com", "c@example.com"], b"Hi\r\n.dot\r\n")
        smtp.sendmail("d@example.com", ["e@example.com"], b"second")
        assert smtp.noop()[0] == 250
    first, second = sink.messages
    assert first.mail_from == "a@example.com"
    assert first.rcpt_to == ("b@example.com", "c@example.com")
    assert first.data == b"Hi\r\n.dot\r\n"
    assert (second.rcpt_to, second.data) == (("e@example.com",), b"second\r\n")
