"""The hub's TOML config file: load, validate, build a Server from it.

The format::

    [hub]                               # optional; every key optional
    host = "127.0.0.1"
    port = 9999                         # 0 picks a free port
    task_start_timeout = 0.1            # seconds
    task_finish_timeout = 60.0          # seconds
    auth_timeout = 5.0                  # seconds
    max_message_size = 1048576          # bytes
    ping_interval = 5.0                 # seconds
    resume_grace = 5.0                  # seconds a dropped publisher's tasks are kept
    max_queued_messages = 10000         # per connection, before it is dropped
    max_pending = 10000                 # tasks one connection may have pending
    max_subscriptions = 1000            # patterns one connection may subscribe to
    max_handshakes = 256                # connections authenticating at once
    auth_failure_limit = 20             # failed logins per host per minute

    [credentials.mailer]                # one table per service name
    key_env = "MAILER_KEY"              # exactly one of key_env, key, key_hash
    sub_permissions = ["mail:send-bulk"]
    pub_permissions = ["log:error", "log:warn", "googlemaps"]
    max_instances = 1

``key`` puts the key in the file, ``key_env`` names an environment variable holding
it, ``key_hash`` is a hash made by ``taskhub-sync hash-key``. Every mistake raises
:class:`ConfigError` naming the file, the section and the key; no error message
or repr ever shows a key.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from . import config
from .auth import check_hash_format
from .errors import InvalidTopic
from .server import Server
from .topics import validate_permission

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python < 3.11 only
    import tomli as tomllib

__all__ = ["ConfigError", "HubSettings", "CredentialConfig", "HubConfig", "load_config"]
__all__ += ["parse_config", "build_server"]

_KEY_SOURCES = ("key", "key_env", "key_hash")


class ConfigError(ValueError):
    """A config file is unreadable or wrong.

    Attributes:
        source: The file (or other source) the config came from.
        section: The TOML table, e.g. ``"credentials.mailer"``, or None.
        key: The key within it, or None.
    """

    def __init__(
        self, source: str, message: str, *, section: str | None = None, key: str | None = None
    ) -> None:
        where = source
        if section is not None:
            where += f": [{section}]"
        if key is not None:
            where += f" {key}"
        super().__init__(f"{where}: {message}")
        self.source = source
        self.section = section
        self.key = key


@dataclass(frozen=True)
class HubSettings:
    """The ``[hub]`` table: the keyword arguments of :class:`~taskhub_sync.Server`."""

    host: str = config.DEFAULT_HOST
    port: int = config.DEFAULT_PORT
    task_start_timeout: float = config.DEFAULT_TASK_START_TIMEOUT
    task_finish_timeout: float = config.DEFAULT_TASK_FINISH_TIMEOUT
    auth_timeout: float = config.DEFAULT_AUTH_TIMEOUT
    max_message_size: int = config.DEFAULT_MAX_MESSAGE_SIZE
    ping_interval: float = config.DEFAULT_PING_INTERVAL
    resume_grace: float = config.DEFAULT_RESUME_GRACE
    max_queued_messages: int = config.DEFAULT_MAX_QUEUED_MESSAGES
    max_pending: int = config.DEFAULT_MAX_PENDING
    max_subscriptions: int = config.DEFAULT_MAX_SUBSCRIPTIONS
    max_handshakes: int = config.DEFAULT_MAX_HANDSHAKES
    auth_failure_limit: int = config.DEFAULT_AUTH_FAILURE_LIMIT


@dataclass(frozen=True)
class CredentialConfig:
    """One ``[credentials.NAME]`` table, with the key resolved.

    Exactly one of ``key`` and ``key_hash`` is set; both are hidden from the repr.
    ``key_env`` records where the key came from (the variable's name, not its value).
    """

    name: str
    key: str | None = field(default=None, repr=False)
    key_hash: str | None = field(default=None, repr=False)
    key_env: str | None = None
    sub_permissions: tuple[str, ...] = ()
    pub_permissions: tuple[str, ...] = ()
    max_instances: int = 1


@dataclass(frozen=True)
class HubConfig:
    """A whole config file: hub settings plus credentials, in file order."""

    hub: HubSettings = field(default_factory=HubSettings)
    credentials: tuple[CredentialConfig, ...] = ()
    source: str = "<config>"


# ----------------------------------------------------------------------------- loading


def load_config(
    path: str | os.PathLike[str], *, environ: Mapping[str, str] | None = None
) -> HubConfig:
    """Read and validate a TOML hub config file.

    Blocks on file I/O only.

    Args:
        path: The file to read.
        environ: Where ``key_env`` variables are looked up (default ``os.environ``).

    Returns:
        The validated config, with every key resolved.

    Raises:
        ConfigError: If the file cannot be read, is not valid TOML, or breaks the
            format (unknown keys, wrong types, missing variables, ...).
    """
    source = os.fspath(path)
    try:
        with open(source, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(source, f"cannot read the file: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, f"not valid TOML: {exc}") from None
    return parse_config(data, source=source, environ=environ)


def parse_config(
    data: Mapping[str, Any], *, source: str = "<config>", environ: Mapping[str, str] | None = None
) -> HubConfig:
    """Validate an already parsed config (the dict ``tomllib`` returns).

    Args:
        data: The parsed TOML document.
        source: Named in error messages, usually the file's path.
        environ: Where ``key_env`` variables are looked up (default ``os.environ``).

    Returns:
        The validated config.

    Raises:
        ConfigError: For anything outside the format.
    """
    env = os.environ if environ is None else environ
    _reject_unknown(source, None, data, ("hub", "credentials"), "section")
    hub = _parse_hub(source, _table(source, None, data, "hub"))
    tables = _table(source, None, data, "credentials")
    if not tables:
        raise ConfigError(source, "no [credentials.NAME] table: nobody could connect")
    credentials = tuple(
        _parse_credential(source, name, _table(source, "credentials", tables, name), env)
        for name in tables
    )
    return HubConfig(hub=hub, credentials=credentials, source=source)


def _table(source: str, section: str | None, data: Mapping[str, Any], key: str) -> dict[str, Any]:
    """``data[key]`` as a table ({} if absent). Raises ConfigError if it is not one."""
    value = data.get(key, {})
    if not isinstance(value, dict):
        name = key if section is None else f"{section}.{key}"
        raise ConfigError(source, f"[{name}] must be a table, not {_kind(value)}")
    return value


def _reject_unknown(
    source: str, section: str | None, table: Mapping[str, Any], known: tuple[str, ...], what: str
) -> None:
    for key in table:
        if key not in known:
            raise ConfigError(
                source,
                f"unknown {what} {key!r}; expected one of: {', '.join(known)}",
                section=section,
            )


_HUB_TYPES: dict[str, type] = {
    "host": str,
    "port": int,
    "task_start_timeout": float,
    "task_finish_timeout": float,
    "auth_timeout": float,
    "max_message_size": int,
    "ping_interval": float,
    "resume_grace": float,
    "max_queued_messages": int,
    "max_pending": int,
    "max_subscriptions": int,
    "max_handshakes": int,
    "auth_failure_limit": int,
}
_POSITIVE_SECONDS = ("task_start_timeout", "task_finish_timeout", "auth_timeout", "ping_interval")
_POSITIVE_COUNTS = (
    "max_queued_messages",
    "max_pending",
    "max_subscriptions",
    "max_handshakes",
    "auth_failure_limit",
)


def _parse_hub(source: str, table: Mapping[str, Any]) -> HubSettings:
    """Validate the ``[hub]`` table."""
    _reject_unknown(source, "hub", table, tuple(_HUB_TYPES), "key")
    values: dict[str, Any] = {}
    for key, value in table.items():
        values[key] = _typed(source, "hub", key, value, _HUB_TYPES[key])
    settings = HubSettings(**values)
    if not settings.host:
        raise ConfigError(source, "must not be empty", section="hub", key="host")
    if not 0 <= settings.port <= 65535:
        raise ConfigError(
            source, f"must be in 0..65535, not {settings.port}", section="hub", key="port"
        )
    for key in _POSITIVE_SECONDS:
        seconds = getattr(settings, key)
        if not 0 < seconds < float("inf"):
            raise ConfigError(
                source,
                f"must be a positive number of seconds, not {seconds}",
                section="hub",
                key=key,
            )
    if settings.max_message_size < 1024:
        raise ConfigError(
            source,
            f"must be at least 1024 bytes, not {settings.max_message_size}",
            section="hub",
            key="max_message_size",
        )
    if not 0 <= settings.resume_grace < float("inf"):
        raise ConfigError(
            source,
            f"must be 0 or more seconds, not {settings.resume_grace}",
            section="hub",
            key="resume_grace",
        )
    for key in _POSITIVE_COUNTS:
        if getattr(settings, key) < 1:
            raise ConfigError(
                source, f"must be at least 1, not {getattr(settings, key)}", section="hub", key=key
            )
    return settings


_CREDENTIAL_KEYS = _KEY_SOURCES + ("sub_permissions", "pub_permissions", "max_instances")


def _parse_credential(
    source: str, name: str, table: Mapping[str, Any], env: Mapping[str, str]
) -> CredentialConfig:
    """Validate one ``[credentials.NAME]`` table and resolve its key."""
    section = f"credentials.{name}"
    if not name or len(name) > 100:
        raise ConfigError(source, "a service name must be 1 to 100 characters", section=section)
    _reject_unknown(source, section, table, _CREDENTIAL_KEYS, "key")
    key, key_hash, key_env = _resolve_key(source, section, table, env)
    max_instances = _typed(source, section, "max_instances", table.get("max_instances", 1), int)
    if max_instances < 1:
        raise ConfigError(
            source, f"must be at least 1, not {max_instances}", section=section, key="max_instances"
        )
    return CredentialConfig(
        name=name,
        key=key,
        key_hash=key_hash,
        key_env=key_env,
        sub_permissions=_permissions(source, section, "sub_permissions", table),
        pub_permissions=_permissions(source, section, "pub_permissions", table),
        max_instances=max_instances,
    )


def _resolve_key(
    source: str, section: str, table: Mapping[str, Any], env: Mapping[str, str]
) -> tuple[str | None, str | None, str | None]:
    """Return ``(key, key_hash, key_env)`` from exactly one of key, key_env, key_hash.

    Error messages name the variable or the key's position, never a key's value.
    """
    given = [k for k in _KEY_SOURCES if k in table]
    if len(given) != 1:
        found = f"found {' and '.join(given)}" if given else "found none"
        raise ConfigError(
            source, f"give exactly one of key, key_env and key_hash ({found})", section=section
        )
    which = given[0]
    value = table[which]
    if not isinstance(value, str):
        raise ConfigError(
            source, f"must be a string, not {_kind(value)}", section=section, key=which
        )
    if not value:
        raise ConfigError(source, "must not be empty", section=section, key=which)
    if which == "key":
        return value, None, None
    if which == "key_hash":
        try:
            check_hash_format(value)
        except ValueError as exc:
            raise ConfigError(source, str(exc), section=section, key=which) from None
        return None, value, None
    key = env.get(value)
    if key is None:
        raise ConfigError(
            source, f"environment variable {value} is not set", section=section, key=which
        )
    if not key:
        raise ConfigError(
            source, f"environment variable {value} is empty", section=section, key=which
        )
    return key, None, value


def _permissions(source: str, section: str, key: str, table: Mapping[str, Any]) -> tuple[str, ...]:
    """A list of topics (or ``"*"``) as a tuple, each one validated."""
    value = table.get(key, [])
    if not isinstance(value, list):
        raise ConfigError(
            source, f"must be a list of topics, not {_kind(value)}", section=section, key=key
        )
    out = []
    for item in value:
        try:
            out.append(validate_permission(item))
        except InvalidTopic as exc:
            raise ConfigError(source, str(exc), section=section, key=key) from None
    return tuple(out)


def _typed(source: str, section: str, key: str, value: Any, kind: type) -> Any:
    """``value`` checked against ``kind`` (an int is a fine float; a bool is no number)."""
    if isinstance(value, bool) and kind is not bool:
        ok = False
    elif kind is float:
        ok = isinstance(value, (int, float))
        value = float(value) if ok else value
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise ConfigError(
            source,
            f"must be {_KIND_NAMES[kind]}, not {_kind(value)} {value!r}",
            section=section,
            key=key,
        )
    return value


_KIND_NAMES = {str: "a string", int: "an integer", float: "a number"}


def _kind(value: Any) -> str:
    """A TOML-ish name for the type of ``value``, for error messages."""
    names = {bool: "a boolean", str: "a string", int: "an integer", float: "a number"}
    names.update({list: "an array", dict: "a table"})
    return names.get(type(value), type(value).__name__)


# ----------------------------------------------------------------------------- building


def build_server(cfg: HubConfig) -> Server:
    """Make a (not yet started) Server from a config, with every credential added.

    Args:
        cfg: A config from :func:`load_config` or built by hand.

    Returns:
        The Server; call ``start()`` or ``serve_forever()`` on it.

    Raises:
        ConfigError: If a setting or credential is refused by the Server (only
            possible for a config built by hand: load_config() checks it all).
    """
    hub = cfg.hub
    try:
        server = Server(
            hub.host,
            hub.port,
            task_start_timeout=hub.task_start_timeout,
            task_finish_timeout=hub.task_finish_timeout,
            auth_timeout=hub.auth_timeout,
            max_message_size=hub.max_message_size,
            ping_interval=hub.ping_interval,
            resume_grace=hub.resume_grace,
            max_queued_messages=hub.max_queued_messages,
            max_pending=hub.max_pending,
            max_subscriptions=hub.max_subscriptions,
            max_handshakes=hub.max_handshakes,
            auth_failure_limit=hub.auth_failure_limit,
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(cfg.source, str(exc), section="hub") from None
    for cred in cfg.credentials:
        try:
            server.add_credential(
                cred.name,
                cred.key,
                key_hash=cred.key_hash,
                sub_permissions=cred.sub_permissions,
                pub_permissions=cred.pub_permissions,
                max_instances=cred.max_instances,
            )
        except (TypeError, ValueError) as exc:  # messages never include the key
            raise ConfigError(cfg.source, str(exc), section=f"credentials.{cred.name}") from None
    return server
