"""The ``taskhub-sync`` command line: serve, pub, hash-key, demo.

The only place in the package that configures logging or installs signal
handlers. ``main(argv)`` returns the exit code instead of exiting, so tests call it
in-process.
"""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import json
import logging
import os
import secrets
import signal
import sys
import threading
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, Callable, TextIO

from . import __version__, config
from ._signals import Guard, interrupt_once
from .client import Client
from .config_file import ConfigError, CredentialConfig, HubConfig, build_server, load_config
from .errors import (
    AuthenticationError,
    ConnectionLost,
    InvalidTopic,
    NoSubscribers,
    PermissionDenied,
    TaskTimeout,
    WorkerLost,
)

logger = logging.getLogger(__name__)

# Exit codes of `taskhub-sync pub` (and of the other subcommands where they apply).
EXIT_OK = 0
EXIT_FAILED = 1  # TaskFailed or any other error
EXIT_USAGE = 2  # bad arguments, bad JSON, bad config file
EXIT_NO_SUBSCRIBERS = 3
EXIT_DENIED = 4  # PermissionDenied or AuthenticationError
EXIT_TIMEOUT = 5  # TaskTimeout, or no result within --wait
EXIT_LOST = 6  # WorkerLost or ConnectionLost (includes "hub unreachable")
EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM (pub and demo; serve exits 0)

DEFAULT_URL = f"ws://{config.DEFAULT_HOST}:{config.DEFAULT_PORT}"
#: Seconds `pub` keeps trying to reconnect after losing the hub before it gives up.
PUB_RECONNECT_TIMEOUT = 10.0

_EXIT_CODES_HELP = """\
exit codes:
  0  ok
  1  the task failed (TaskFailed) or another error
  2  usage error: bad arguments, bad JSON payload, bad config file
  3  NoSubscribers: nobody took the task within the hub's task_start_timeout
  4  PermissionDenied or AuthenticationError
  5  TaskTimeout, or no result within --wait
  6  WorkerLost or ConnectionLost (includes: the hub cannot be reached)
  130 interrupted (Ctrl-C or SIGTERM)
"""

#: Services of the built-in development config: (sub_permissions, pub_permissions,
#: max_instances). ``cli`` is meant for ``taskhub-sync pub`` and ad-hoc scripts.
DEFAULT_SERVICES: dict[str, tuple[tuple[str, ...], tuple[str, ...], int]] = {
    "cli": (("*",), ("*",), 8),
    "mailer": (("mail:send-bulk",), ("log", "googlemaps"), 1),
    "geocoder": (("googlemaps",), ("log",), 1),
    "logger": (("log",), (), 1),
}


# ----------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``taskhub-sync`` command line.

    Args:
        argv: The arguments after the program name (default ``sys.argv[1:]``).

    Returns:
        The exit code (see ``taskhub-sync --help``); ``--help`` returns 0.
    """
    parser = _make_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version or a usage error
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    setup_logging(args.verbose, quiet_default=args.command != "serve")
    command: Callable[[argparse.Namespace], int] = args.run
    return command(args)


def _make_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv: debug)")
    parser = argparse.ArgumentParser(
        prog="taskhub-sync",
        description="A synchronous task hub over WebSocket: send it tasks, watch as they happen.",
        epilog=_EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_serve(sub, common)
    _add_pub(sub, common)
    _add_hash_key(sub, common)
    _add_demo(sub, common)
    return parser


def setup_logging(verbose: int, *, quiet_default: bool) -> None:
    """Log to stderr: WARNING (INFO for serve) by default, one level more per -v."""
    base = logging.WARNING if quiet_default else logging.INFO
    level = max(logging.DEBUG, base - 10 * verbose)
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def signals_as_interrupt() -> AbstractContextManager[Guard]:
    """Within the block, SIGTERM and SIGINT raise KeyboardInterrupt, once.

    After the first signal both are ignored, so a second one cannot break the
    shutdown it started, and they stay ignored after the block: the process is on
    its way out, and a late SIGTERM must not turn a clean exit into death by signal.
    Outside the main thread (tests calling main() from a thread) nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        return interrupt_once(())
    return interrupt_once([signal.SIGTERM, signal.SIGINT], restore_after_signal=False)


def stop_on_stdin_eof() -> None:
    """Send this process SIGTERM once its stdin reaches end of file.

    For children of a supervisor that holds their stdin open: if the supervisor
    dies, even by SIGKILL, the pipe closes and the child shuts down cleanly instead
    of living on as an orphan. Starts one daemon thread (it blocks in read() for
    the life of the process, so nothing could join it).
    """

    def watch() -> None:
        try:
            while sys.stdin.buffer.read(4096):
                pass
        except (OSError, ValueError):  # stdin closed or not readable: same thing
            pass
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="taskhub-stdin-watch", daemon=True).start()


def _error(message: str) -> None:
    print(f"taskhub-sync: {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- serve


def _add_serve(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "serve",
        parents=[common],
        help="run a hub",
        description="Run a hub until Ctrl-C or SIGTERM. Without --config, a built-in "
        "development config with fresh random keys, printed at start.",
    )
    p.add_argument("--config", metavar="FILE", help="TOML config file (see README)")
    p.add_argument("--host", help="interface to listen on (overrides the file)")
    p.add_argument("--port", type=int, help="port to listen on; 0 picks a free one")
    p.add_argument(
        "--stop-on-stdin-eof",
        action="store_true",
        help="also stop when stdin is closed (for supervisors: the hub ends with its parent)",
    )
    p.set_defaults(run=_cmd_serve)


def default_config(host: str | None = None, port: int | None = None) -> HubConfig:
    """The built-in development config: DEFAULT_SERVICES with fresh random keys.

    Args:
        host: Interface to listen on (default 127.0.0.1).
        port: Port (default 9999).

    Returns:
        A config whose credentials carry plain keys, generated now.
    """
    creds = tuple(
        CredentialConfig(
            name=name,
            key=secrets.token_hex(16),
            sub_permissions=subs,
            pub_permissions=pubs,
            max_instances=instances,
        )
        for name, (subs, pubs, instances) in DEFAULT_SERVICES.items()
    )
    cfg = HubConfig(credentials=creds, source="<built-in config>")
    return _override(cfg, host, port)


def _override(cfg: HubConfig, host: str | None, port: int | None) -> HubConfig:
    changes: dict[str, Any] = {}
    if host is not None:
        changes["host"] = host
    if port is not None:
        changes["port"] = port
    return dataclasses.replace(cfg, hub=dataclasses.replace(cfg.hub, **changes))


def _cmd_serve(args: argparse.Namespace) -> int:
    """Run a hub until Ctrl-C or SIGTERM; 0 after a clean stop."""
    try:
        if args.config:
            cfg = _override(load_config(args.config), args.host, args.port)
        else:
            cfg = default_config(args.host, args.port)
        hub = build_server(cfg)
    except ConfigError as exc:
        _error(str(exc))
        return EXIT_USAGE
    with signals_as_interrupt():
        if args.stop_on_stdin_eof:
            stop_on_stdin_eof()
        try:
            try:
                hub.start()
            except OSError as exc:
                _error(f"cannot listen on {cfg.hub.host}:{cfg.hub.port}: {exc.strerror or exc}")
                return EXIT_FAILED
            _print_how_to_connect(hub.url, cfg, builtin=not args.config)
            hub.serve_forever()  # returns after Ctrl-C/SIGTERM, having stopped the hub
        except KeyboardInterrupt:  # a signal before serve_forever() took over
            pass
        finally:
            hub.stop()
    return EXIT_OK


def _print_how_to_connect(
    url: str, cfg: HubConfig, *, builtin: bool, out: TextIO | None = None
) -> None:
    """Print the URL and the credentials. The first line, ``listening on URL``, is
    what scripts wait for."""
    out = out or sys.stdout
    lines = [f"taskhub-sync {__version__}: listening on {url}"]
    if builtin:
        lines += ["", "No --config given: development credentials with keys made up for this run:"]
    else:
        lines += ["", f"Credentials from {cfg.source}:"]
    lines.append(f"  {'name':<10} {'key':<32} {'may subscribe to':<20} may publish")
    for c in cfg.credentials:
        if c.key_env is not None:
            key = f"${c.key_env}"
        elif c.key_hash is not None:
            key = "(hashed in the file)"
        else:
            key = (c.key or "") if builtin else "(in the file)"
        subs = " ".join(c.sub_permissions) or "-"
        pubs = " ".join(c.pub_permissions) or "-"
        lines.append(f"  {c.name:<10} {key:<32} {subs:<20} {pubs}")
    if builtin:
        cli_key = next(c.key or "" for c in cfg.credentials if c.name == "cli")
        lines += [
            "",
            "Publish from a shell:",
            f"  export TASKHUB_URL={url} TASKHUB_NAME=cli TASKHUB_KEY={cli_key}",
            "  taskhub-sync pub some:topic '{\"hello\": 1}' --watch",
            "From Python:",
            f'  Client("{url}", name="cli", key="{cli_key}")',
        ]
    lines += ["", "Stop with Ctrl-C."]
    print("\n".join(lines), file=out, flush=True)


# ----------------------------------------------------------------------------- pub


def _add_pub(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "pub",
        parents=[common],
        help="publish a task and print its result",
        description="Publish a task with a JSON payload and print the result as JSON. "
        "With --watch, print each progress update as it arrives ('update: JSON' lines), "
        "then 'result: JSON'.",
        epilog=_EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("topic", metavar="TOPIC", help="e.g. mail:send-bulk")
    p.add_argument("payload", metavar="JSON", help='the payload, e.g. \'{"to": "a@b.c"}\'')
    p.add_argument(
        "--url",
        default=os.environ.get("TASKHUB_URL", DEFAULT_URL),
        help="the hub (default: $TASKHUB_URL or %(default)s)",
    )
    p.add_argument(
        "--name",
        default=os.environ.get("TASKHUB_NAME", "cli"),
        help="service name to connect as (default: $TASKHUB_NAME or %(default)s)",
    )
    p.add_argument(
        "--key",
        help="the service's key (default: $TASKHUB_KEY; prefer the variable: "
        "arguments are visible to other users)",
    )
    p.add_argument(
        "--timeout",
        type=_positive_float,
        metavar="SECONDS",
        help="the task's finish timeout, enforced by the hub (default: the hub's)",
    )
    p.add_argument(
        "--wait",
        type=_positive_float,
        metavar="SECONDS",
        help="give up waiting for the result after this long (exit 5)",
    )
    p.add_argument("--watch", action="store_true", help="print progress updates live")
    p.set_defaults(run=_cmd_pub)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text!r}")
    return value


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def _cmd_pub(args: argparse.Namespace) -> int:
    """Publish, optionally watch, print the result; the exit code says how it went."""
    try:
        payload = json.loads(args.payload)
    except ValueError as exc:
        _error(f"the payload is not valid JSON: {exc}")
        return EXIT_USAGE
    key = args.key if args.key is not None else os.environ.get("TASKHUB_KEY")
    if not key:
        _error("no key: set TASKHUB_KEY (or pass --key)")
        return EXIT_USAGE
    with signals_as_interrupt():
        try:
            result = _publish(args, key, payload)
        except KeyboardInterrupt:
            _error("interrupted")
            return EXIT_INTERRUPTED
        except Exception as exc:
            if isinstance(exc, TimeoutError):
                _error(f"no result within --wait {args.wait} s (the task may still be running)")
            else:
                _error(f"{type(exc).__name__}: {exc}")
            return exit_code_for(exc)
    print(f"result: {_dumps(result)}" if args.watch else _dumps(result), flush=True)
    return EXIT_OK


def _publish(args: argparse.Namespace, key: str, payload: Any) -> Any:
    """Connect, publish, print updates if watching, and return the result.

    Raises:
        TimeoutError: Only if the result did not come within ``args.wait``.
        TaskHubError: Whatever the connection or the task raised.
    """
    try:
        client = Client(args.url, name=args.name, key=key, reconnect_timeout=PUB_RECONNECT_TIMEOUT)
    except TimeoutError as exc:  # the hub did not answer: a connection problem
        raise ConnectionLost(f"no answer from {args.url}: {exc}") from exc
    try:
        handle = client.pub(args.topic, payload, timeout=args.timeout)
        if args.watch:
            handle.on("update", lambda data: print(f"update: {_dumps(data)}", flush=True))
        return handle.get_result(timeout=args.wait)
    finally:
        client.close()


def exit_code_for(exc: BaseException) -> int:
    """The ``pub`` exit code for an exception (see the module's EXIT_* constants).

    Args:
        exc: What publishing or waiting raised.

    Returns:
        The exit code.
    """
    if isinstance(exc, (InvalidTopic, TypeError, ValueError)):
        return EXIT_USAGE
    if isinstance(exc, NoSubscribers):
        return EXIT_NO_SUBSCRIBERS
    if isinstance(exc, (PermissionDenied, AuthenticationError)):
        return EXIT_DENIED
    if isinstance(exc, TaskTimeout):
        return EXIT_TIMEOUT
    if isinstance(exc, (WorkerLost, ConnectionLost)):
        return EXIT_LOST
    if isinstance(exc, TimeoutError):
        return EXIT_TIMEOUT
    return EXIT_FAILED


# ----------------------------------------------------------------------------- hash-key


def _add_hash_key(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "hash-key",
        parents=[common],
        help="print a key_hash for a config file",
        description="Print a salted scrypt hash of KEY for a config file's key_hash. "
        "Without KEY, read it from the terminal (not echoed) or from stdin's first line.",
    )
    p.add_argument("key", metavar="KEY", nargs="?", help="the key (better: omit it and type it)")
    p.set_defaults(run=_cmd_hash_key)


def _cmd_hash_key(args: argparse.Namespace) -> int:
    """Print ``hash_key(KEY)``; 2 if the key is empty or the prompts differ."""
    from .auth import hash_key

    key = args.key
    if key is None:
        if sys.stdin.isatty():
            key = getpass.getpass("key: ")
            if getpass.getpass("again: ") != key:
                _error("the keys differ")
                return EXIT_USAGE
        else:
            key = sys.stdin.readline().rstrip("\r\n")
    if not key:
        _error("the key must not be empty")
        return EXIT_USAGE
    print(hash_key(key), flush=True)
    return EXIT_OK


# ----------------------------------------------------------------------------- demo


def _add_demo(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "demo",
        parents=[common],
        help="run the whole mailer scenario on real processes",
        description="Start a hub, an SMTP sink, a mailer, a geocoder, a logger and a "
        "publisher (each hub client its own process), send a bulk mail with live "
        "progress, and check the result. Exit 0 if it is right.",
    )
    p.add_argument("--emails", type=int, default=5, help="how many emails (default %(default)s)")
    p.add_argument(
        "--timeout",
        type=_positive_float,
        default=15.0,
        metavar="SECONDS",
        help="give up after this long, plus a few seconds to stop the processes "
        "(default %(default)s)",
    )
    p.set_defaults(run=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    if not 1 <= args.emails <= 1000:
        _error("--emails must be between 1 and 1000")
        return EXIT_USAGE
    with signals_as_interrupt():
        try:
            ok = run_demo(emails=args.emails, timeout=args.timeout, verbose=args.verbose)
        except KeyboardInterrupt:
            _error("interrupted")
            return EXIT_INTERRUPTED
    return EXIT_OK if ok else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
