"""The ``taskhub-sync demo`` scenario: the seed's mailer, on real processes and sockets.

``run_demo()`` (what ``taskhub-sync demo`` calls) starts, each as its own process:

    hub        ``python -m taskhub_sync.cli serve --config <tmp>/hub.toml``
    logger     ``python -m taskhub_sync.demo logger``   prints every ``log:*`` task
    geocoder   ``python -m taskhub_sync.demo geocoder`` answers ``googlemaps:geocode``
    mailer     ``python -m taskhub_sync.demo mailer``   serves ``mail:send-bulk``
    publisher  ``python -m taskhub_sync.cli pub mail:send-bulk <emails> --watch``

plus an SMTP sink (``_demo_support.SmtpSink``, a thread in the demo's own process) that the
mailer sends every email to with ``smtplib``. For each email the mailer asks the
geocoder for the recipient's city (a ``pub`` + ``get_result`` inside its handler),
sends the email, reports ``{"sent": i, "to": ...}`` with ``task.update()``, and logs
through fire-and-forget ``log:info`` tasks. The demo succeeds when the result says
``sent == N`` and the sink holds N messages.

Startup is synchronized on what the children print (the hub's ``listening on``
line, each service's ``ready``), never on sleeps. Every child is stopped, SIGTERM
then SIGKILL after a bound, whatever happens.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import os
import secrets
import smtplib
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from email.message import EmailMessage
from typing import Any, Callable, TextIO

from ._deadline import Deadline
from ._demo_support import DemoError, ManagedProcess, SmtpSink, supervised
from .client import Client
from .task import Task

logger = logging.getLogger(__name__)

__all__ = ["run_demo", "main", "make_emails", "send_bulk_handler", "geocode", "log_handler"]

#: The geocoder's whole world: city -> coordinates.
GEOCODES: dict[str, dict[str, float]] = {
    "berlin": {"lat": 52.5200, "lng": 13.4050},
    "lisbon": {"lat": 38.7223, "lng": -9.1393},
    "oslo": {"lat": 59.9139, "lng": 10.7522},
    "paris": {"lat": 48.8566, "lng": 2.3522},
    "rome": {"lat": 41.9028, "lng": 12.4964},
}

#: The demo hub's credentials: name -> (sub_permissions, pub_permissions).
SERVICES: dict[str, tuple[list[str], list[str]]] = {
    "mailer": (["mail:send-bulk"], ["log:info", "log:error", "log:warn", "googlemaps"]),
    "geocoder": (["googlemaps"], ["log"]),
    "logger": (["log"], []),
    "publisher": ([], ["mail:send-bulk"]),
}


# ----------------------------------------------------------------------------- orchestration


def _python(*args: str) -> list[str]:
    return [sys.executable, *args]


def _hub_config(keys: Mapping[str, str]) -> str:
    """The demo hub's TOML: port 0, keys from environment variables."""
    lines = [
        "[hub]",
        'host = "127.0.0.1"',
        "port = 0",
        "# generous for slow CI machines; the seed uses 0.1",
        "task_start_timeout = 0.5",
        "task_finish_timeout = 30.0",
    ]
    for name in keys:
        subs, pubs = SERVICES[name]
        lines += [
            "",
            f"[credentials.{name}]",
            f'key_env = "{_key_var(name)}"',
            f"sub_permissions = {json.dumps(subs)}",
            f"pub_permissions = {json.dumps(pubs)}",
        ]
    return "\n".join(lines) + "\n"


def _key_var(name: str) -> str:
    return f"TASKHUB_DEMO_{name.upper()}_KEY"


def make_emails(count: int) -> list[dict[str, str]]:
    """The bulk mail: ``count`` emails to made-up people in GEOCODES' cities."""
    cities = sorted(GEOCODES)
    return [
        {
            "to": f"user{i}@example.com",
            "city": cities[i % len(cities)].title(),
            "subject": f"Hello user {i}",
            "body": "Your parcel is on its way.",
        }
        for i in range(1, count + 1)
    ]


class _Printer:
    """Prints whole lines from several threads without mixing them."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._lock = threading.Lock()  # one line at a time

    def __call__(self, text: str) -> None:
        with self._lock:
            print(text, file=self._out, flush=True)

    def echo(self, name: str, line: str) -> None:
        self(f"[{name}] {line}")


def run_demo(
    *, emails: int = 5, timeout: float = 15.0, verbose: int = 0, out: TextIO | None = None
) -> bool:
    """Run the whole scenario (see the module docstring) and check its result.

    Blocks for at most about ``timeout`` seconds plus the time to stop the children.

    Args:
        emails: How many emails the bulk mail has.
        timeout: Seconds for the whole run.
        verbose: With 1 or more, also echo the children's stderr (logs).
        out: Where to print (default ``sys.stdout``).

    Returns:
        True if the publisher got ``sent == emails`` and the sink received them all.
    """
    say = _Printer(out or sys.stdout)
    deadline = Deadline(timeout)
    keys = {name: secrets.token_hex(16) for name in SERVICES}
    groups: list[list[ManagedProcess]] = []
    with tempfile.TemporaryDirectory(prefix="taskhub-demo-") as tmp, SmtpSink() as sink:
        say(f"demo: SMTP sink listening on 127.0.0.1:{sink.port}")
        try:
            with supervised(groups):
                result = _run_steps(sink, tmp, keys, emails, deadline, groups, say, verbose)
        except DemoError as exc:
            say(f"demo: FAILED: {exc}")
            _show_stderr([p for group in groups for p in group], say)
            return False
        return _check(result, sink, emails, say)


def _run_steps(
    sink: SmtpSink,
    tmp: str,
    keys: Mapping[str, str],
    emails: int,
    deadline: Deadline,
    groups: list[list[ManagedProcess]],
    say: _Printer,
    verbose: int,
) -> Any:
    """Start hub, services and publisher; return the publisher's result.

    Raises:
        DemoError: A process failed or was not ready in time.
    """
    env = {_key_var(name): key for name, key in keys.items()}
    config_path = os.path.join(tmp, "hub.toml")
    with open(config_path, "w", encoding="utf-8") as f:
        f.write(_hub_config(keys))
    logs = say.echo if verbose else None
    try:
        hub = ManagedProcess(
            "hub",
            _python(
                "-m", "taskhub_sync.cli", "serve", "--config", config_path, "--stop-on-stdin-eof"
            ),
            env=env,
            on_stderr=logs,
        )
        groups.append([hub])
        line = hub.wait_for_line(lambda s: "listening on ws://" in s, deadline.remaining())
        url = line.split("listening on ", 1)[1].strip()
        say(f"demo: hub listening on {url}")

        services = []
        for role in ("logger", "geocoder", "mailer"):
            argv = _python("-m", "taskhub_sync.demo", role, "--url", url, "--stop-on-stdin-eof")
            if role == "mailer":
                argv += ["--smtp-port", str(sink.port)]
            services.append(
                ManagedProcess(
                    role,
                    argv,
                    env={"TASKHUB_KEY": keys[role]},
                    on_stdout=say.echo,
                    on_stderr=logs,
                )
            )
        groups.append(services)
        for service in services:
            service.wait_for_line(lambda s: s == "ready", deadline.remaining())
        say("demo: logger, geocoder and mailer ready")

        return _publish(url, keys["publisher"], emails, deadline, groups, say)
    except OSError as exc:
        raise DemoError(f"cannot start a process: {exc}") from exc


def _publish(
    url: str,
    key: str,
    emails: int,
    deadline: Deadline,
    groups: list[list[ManagedProcess]],
    say: _Printer,
) -> Any:
    """Run ``taskhub-sync pub --watch`` as the publisher; return its parsed result."""
    remaining = deadline.remaining() or 1.0
    say(f"demo: publishing a bulk mail of {emails} emails on mail:send-bulk")
    publisher = ManagedProcess(
        "publisher",
        _python(
            "-m",
            "taskhub_sync.cli",
            "pub",
            "mail:send-bulk",
            json.dumps(make_emails(emails)),
            "--watch",
            "--url",
            url,
            "--name",
            "publisher",
            "--timeout",
            f"{remaining:.3f}",
            "--wait",
            f"{remaining:.3f}",
        ),
        env={"TASKHUB_KEY": key},
        on_stdout=say.echo,
        on_stderr=say.echo,  # its errors are the demo's errors
    )
    groups.append([publisher])
    code = publisher.wait(deadline.remaining())
    if code != 0:
        raise DemoError(f"the publisher exited with code {code}")
    results = [line for line in publisher.lines if line.startswith("result: ")]
    if not results:
        raise DemoError("the publisher printed no result")
    try:
        return json.loads(results[-1][len("result: ") :])
    except ValueError as exc:
        raise DemoError(f"the publisher printed a result that is not JSON: {exc}") from None


def _check(result: Any, sink: SmtpSink, emails: int, say: _Printer) -> bool:
    """True if the result and the sink agree that every email went out."""
    received = len(sink.messages)
    sent = result.get("sent") if isinstance(result, dict) else None
    if sent == emails and received == emails:
        say(f"demo: OK: the mailer sent {sent} emails and the SMTP sink received {received}")
        return True
    say(f"demo: FAILED: expected {emails} emails; result says {sent}, the sink got {received}")
    return False


def _show_stderr(procs: Sequence[ManagedProcess], say: _Printer) -> None:
    for proc in procs:
        if proc.stderr_tail:
            say(f"demo: last stderr lines of {proc.name} (exit code {proc.proc.returncode}):")
            for line in proc.stderr_tail:
                say(f"  {line}")


# ----------------------------------------------------------------------------- services


def send_bulk_handler(client: Client, smtp_host: str, smtp_port: int) -> Callable[[Task], Any]:
    """The mailer's ``mail:send-bulk`` handler, bound to a client and an SMTP server.

    Args:
        client: The mailer's connection, used to ask the geocoder and to log.
        smtp_host: The SMTP server's host.
        smtp_port: Its port.

    Returns:
        ``handler(task) -> {"sent": n, "geocoded": m}``.
    """

    def send_bulk(task: Task) -> dict[str, int]:
        task.start()
        emails = task.get_payload()
        logs = [client.pub("log:info", f"sending {len(emails)} emails")]
        sent = geocoded = 0
        with smtplib.SMTP(smtp_host, smtp_port, timeout=5) as smtp:
            for email in emails:
                if task.cancelled:
                    break
                where = client.pub("googlemaps:geocode", {"address": email["city"]})
                coords = where.get_result(timeout=5, default=None)
                geocoded += coords is not None
                smtp.sendmail("mailer@example.com", [email["to"]], _email(email, coords))
                sent += 1
                task.update({"sent": sent, "to": email["to"], "city": email["city"]})
                logs.append(client.pub("log:info", f"sent {sent}/{len(emails)} to {email['to']}"))
        logs.append(client.pub("log:info", f"bulk mail done: {sent} sent"))
        # Fire and forget, but let the logs arrive before the result does.
        concurrent.futures.wait(logs, timeout=5)
        return {"sent": sent, "geocoded": geocoded}

    return send_bulk


def _email(email: Mapping[str, str], coords: Mapping[str, Any] | None) -> bytes:
    msg = EmailMessage()
    msg["From"] = "mailer@example.com"
    msg["To"] = email["to"]
    msg["Subject"] = email["subject"]
    where = f" ({coords['lat']}, {coords['lng']})" if coords else ""
    msg.set_content(f"{email['body']}\nDelivery to {email['city']}{where}.\n")
    return msg.as_bytes()


_print_lock = threading.Lock()


def _say(text: str) -> None:
    """Print one line from a handler thread (print() writes the text and the newline
    separately, so two handlers' lines could run together)."""
    with _print_lock:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()


def geocode(task: Task) -> dict[str, Any]:
    """The geocoder's ``googlemaps:geocode`` handler: look the address up in GEOCODES.

    Raises:
        LookupError: For an address not in the table (the publisher gets TaskFailed).
    """
    task.start()
    address = str(task.get_payload()["address"])
    coords = GEOCODES.get(address.strip().lower())
    if coords is None:
        raise LookupError(f"unknown address {address!r}")
    _say(f"{address} -> {coords['lat']}, {coords['lng']}")
    return {"address": address, **coords}


def log_handler(task: Task) -> None:
    """The logger's ``log:*`` handler: print ``LEVEL service: message``."""
    level = task.topic.rpartition(":")[2].upper()
    _say(f"{level:<5} {task.publisher}: {task.get_payload()}")


def _serve(client: Client, role: str, args: argparse.Namespace) -> None:
    if role == "mailer":
        client.sub("mail:send-bulk", send_bulk_handler(client, "127.0.0.1", args.smtp_port))
    elif role == "geocoder":
        client.sub("googlemaps:geocode", geocode)
    else:
        client.sub("log:*", log_handler)
    print("ready", flush=True)
    client.run_forever()


def main(argv: Sequence[str] | None = None) -> int:
    """Run one demo service: ``python -m taskhub_sync.demo {mailer,geocoder,logger}``.

    The key comes from ``$TASKHUB_KEY``. Prints ``ready`` once subscribed; stops
    cleanly on SIGTERM or Ctrl-C, and with ``--stop-on-stdin-eof`` also when its
    parent closes its stdin or dies.

    Args:
        argv: The arguments (default ``sys.argv[1:]``).

    Returns:
        0 after a clean stop, 1 if the connection failed or was lost.
    """
    from .cli import setup_logging, signals_as_interrupt, stop_on_stdin_eof

    parser = argparse.ArgumentParser(prog="python -m taskhub_sync.demo")
    parser.add_argument("role", choices=("mailer", "geocoder", "logger"))
    parser.add_argument("--url", required=True)
    parser.add_argument("--name", help="service name (default: the role)")
    parser.add_argument("--smtp-port", type=int, default=25)
    parser.add_argument("--stop-on-stdin-eof", action="store_true", help="stop when stdin closes")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    args = parser.parse_args(argv)
    setup_logging(args.verbose, quiet_default=True)
    with signals_as_interrupt():
        if args.stop_on_stdin_eof:
            stop_on_stdin_eof()
        try:
            client = Client(
                args.url,
                name=args.name or args.role,
                key=os.environ["TASKHUB_KEY"],
                close_timeout=1.0,  # a bulk mail cut short by a stop need not finish
            )
            with client:
                _serve(client, args.role, args)
        except KeyboardInterrupt:
            return 0
        except Exception as exc:
            print(f"{args.role}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
