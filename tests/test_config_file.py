"""Tests of taskhub_sync.config_file: loading, validation errors, build_server()."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from taskhub_sync import AuthenticationError, Client
from taskhub_sync.auth import hash_key
from taskhub_sync.config import DEFAULT_PORT, DEFAULT_TASK_FINISH_TIMEOUT
from taskhub_sync.config_file import (
    ConfigError,
    CredentialConfig,
    HubConfig,
    HubSettings,
    build_server,
    load_config,
)

SECRET = "s3cr3t-value-never-shown"

FULL = f"""
[hub]
host = "127.0.0.1"
port = 0
task_start_timeout = 0.5
task_finish_timeout = 30
auth_timeout = 2.5
max_message_size = 65536
ping_interval = 3.0
resume_grace = 0
max_queued_messages = 100
max_pending = 50
max_subscriptions = 20
max_handshakes = 8
auth_failure_limit = 3

[credentials.mailer]
key_env = "MAILER_KEY"
sub_permissions = ["mail:send-bulk"]
pub_permissions = ["log:error", "log:warn", "googlemaps"]
max_instances = 2

[credentials.publisher]
key = "{SECRET}"
pub_permissions = ["mail:send-bulk"]

[credentials.admin]
key_hash = "{hash_key("admin-key", salt=b"0123456789abcdef")}"
sub_permissions = ["*"]
pub_permissions = ["*"]
"""

MINIMAL = """
[credentials.solo]
key = "k"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "hub.toml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_full_file_loads_every_setting(tmp_path: Path) -> None:
    """Every [hub] key and all three key sources are read."""
    cfg = load_config(write(tmp_path, FULL), environ={"MAILER_KEY": "from-env"})
    assert cfg.hub == HubSettings(
        host="127.0.0.1",
        port=0,
        task_start_timeout=0.5,
        task_finish_timeout=30.0,
        auth_timeout=2.5,
        max_message_size=65536,
        ping_interval=3.0,
        resume_grace=0.0,
        max_queued_messages=100,
        max_pending=50,
        max_subscriptions=20,
        max_handshakes=8,
        auth_failure_limit=3,
    )
    assert isinstance(cfg.hub.task_finish_timeout, float)
    mailer, publisher, admin = cfg.credentials
    assert mailer == CredentialConfig(
        name="mailer",
        key="from-env",
        key_env="MAILER_KEY",
        sub_permissions=("mail:send-bulk",),
        pub_permissions=("log:error", "log:warn", "googlemaps"),
        max_instances=2,
    )
    assert publisher.key == SECRET and publisher.key_hash is None and publisher.key_env is None
    assert publisher.sub_permissions == () and publisher.max_instances == 1
    assert admin.key is None and admin.key_hash is not None and admin.key_hash.startswith("scrypt$")


def test_minimal_file_uses_defaults(tmp_path: Path) -> None:
    """Without [hub], every setting has the library default."""
    cfg = load_config(write(tmp_path, MINIMAL))
    assert cfg.hub == HubSettings()
    assert cfg.hub.port == DEFAULT_PORT
    assert cfg.hub.task_finish_timeout == DEFAULT_TASK_FINISH_TIMEOUT
    assert [c.name for c in cfg.credentials] == ["solo"]
    assert cfg.source == str(tmp_path / "hub.toml")


def test_key_env_defaults_to_os_environ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """key_env is looked up in os.environ unless environ= is given."""
    monkeypatch.setenv("MAILER_KEY", "via-os-environ")
    cfg = load_config(write(tmp_path, FULL))
    assert cfg.credentials[0].key == "via-os-environ"


def test_reprs_hide_keys(tmp_path: Path) -> None:
    """Neither a plain key nor a hash appears in the config's repr."""
    cfg = load_config(write(tmp_path, FULL), environ={"MAILER_KEY": "env-secret"})
    text = repr(cfg)
    assert SECRET not in text and "env-secret" not in text and "scrypt$" not in text
    assert "MAILER_KEY" in text  # where a key comes from is fine to show


def test_config_is_frozen(tmp_path: Path) -> None:
    """The dataclasses are immutable."""
    cfg = load_config(write(tmp_path, MINIMAL))
    with pytest.raises(AttributeError):
        cfg.hub.port = 1  # type: ignore[misc]


def test_build_server_accepts_each_key_source(tmp_path: Path) -> None:
    """A hub built from a file lets in plain, env and hashed keys, and no wrong one."""
    cfg = load_config(write(tmp_path, FULL), environ={"MAILER_KEY": "from-env"})
    hub = build_server(cfg)
    assert hub.task_start_timeout == 0.5 and hub.max_message_size == 65536
    assert hub.resume_grace == 0.0 and hub.max_handshakes == 8
    with hub:
        for name, key in (("mailer", "from-env"), ("publisher", SECRET), ("admin", "admin-key")):
            with Client(hub.url, name=name, key=key, open_timeout=5) as client:
                assert not client.closed
        with pytest.raises(AuthenticationError):
            Client(hub.url, name="admin", key="wrong", open_timeout=5)


def test_build_server_wraps_bad_hand_made_config() -> None:
    """A hand-built config the Server refuses raises ConfigError naming the section."""
    cfg = HubConfig(credentials=(CredentialConfig(name="x", key=""),), source="<test>")
    with pytest.raises(ConfigError, match=r"<test>: \[credentials\.x\]"):
        build_server(cfg)
    cfg = HubConfig(hub=HubSettings(ping_interval=0), source="<test>")
    with pytest.raises(ConfigError, match=r"<test>: \[hub\]"):
        build_server(cfg)


# Each case: (file text, section/key the message must name, words it must contain).
ERRORS = [
    ("[hub]\nport = 1\n", None, "no [credentials.NAME] table"),
    ("[server]\nport = 1\n" + MINIMAL, None, "unknown section 'server'"),
    ("hub = 3\n" + MINIMAL, None, "[hub] must be a table"),
    ("credentials = [1]\n", None, "[credentials] must be a table"),
    ("[credentials]\nmailer = 1\n", None, "[credentials.mailer] must be a table"),
    ("[hub]\nprot = 1\n" + MINIMAL, "[hub]", "unknown key 'prot'"),
    ('[hub]\nport = "9999"\n' + MINIMAL, "[hub] port", "must be an integer, not a string"),
    ("[hub]\nport = true\n" + MINIMAL, "[hub] port", "must be an integer, not a boolean"),
    ("[hub]\nport = 1.5\n" + MINIMAL, "[hub] port", "must be an integer"),
    ("[hub]\nport = 70000\n" + MINIMAL, "[hub] port", "0..65535"),
    ("[hub]\nhost = 1\n" + MINIMAL, "[hub] host", "must be a string"),
    ('[hub]\nhost = ""\n' + MINIMAL, "[hub] host", "must not be empty"),
    ('[hub]\nping_interval = "5"\n' + MINIMAL, "[hub] ping_interval", "must be a number"),
    ("[hub]\ntask_start_timeout = 0\n" + MINIMAL, "[hub] task_start_timeout", "positive"),
    ("[hub]\ntask_finish_timeout = -1\n" + MINIMAL, "[hub] task_finish_timeout", "positive"),
    ("[hub]\nauth_timeout = inf\n" + MINIMAL, "[hub] auth_timeout", "positive"),
    ("[hub]\nmax_message_size = 10\n" + MINIMAL, "[hub] max_message_size", "at least 1024"),
    ("[hub]\nresume_grace = -1\n" + MINIMAL, "[hub] resume_grace", "0 or more seconds"),
    ("[hub]\nmax_pending = 0\n" + MINIMAL, "[hub] max_pending", "at least 1"),
    ("[hub]\nauth_failure_limit = 1.0\n" + MINIMAL, "[hub] auth_failure_limit", "an integer"),
    ("[credentials.a]\nkey = 'k'\nkye = 1\n", "[credentials.a]", "unknown key 'kye'"),
    ("[credentials.a]\nsub_permissions = []\n", "[credentials.a]", "found none"),
    (
        "[credentials.a]\nkey = 'k'\nkey_env = 'K'\n",
        "[credentials.a]",
        "exactly one of key, key_env and key_hash (found key and key_env)",
    ),
    ("[credentials.a]\nkey = 5\n", "[credentials.a] key", "must be a string, not an integer"),
    ("[credentials.a]\nkey = ''\n", "[credentials.a] key", "must not be empty"),
    (
        "[credentials.a]\nkey_env = 'NOPE_UNSET'\n",
        "[credentials.a] key_env",
        "NOPE_UNSET is not set",
    ),
    ("[credentials.a]\nkey_env = 'EMPTY'\n", "[credentials.a] key_env", "EMPTY is empty"),
    ("[credentials.a]\nkey_hash = 'md5$abc'\n", "[credentials.a] key_hash", "scrypt$N$r$p"),
    (
        "[credentials.a]\nkey = 'k'\nsub_permissions = 'log'\n",
        "[credentials.a] sub_permissions",
        "must be a list of topics, not a string",
    ),
    (
        "[credentials.a]\nkey = 'k'\npub_permissions = [1]\n",
        "[credentials.a] pub_permissions",
        "topic must be a string",
    ),
    (
        "[credentials.a]\nkey = 'k'\npub_permissions = ['bad topic']\n",
        "[credentials.a] pub_permissions",
        "invalid topic 'bad topic'",
    ),
    (
        "[credentials.a]\nkey = 'k'\nmax_instances = 0\n",
        "[credentials.a] max_instances",
        "at least 1",
    ),
    (
        "[credentials.a]\nkey = 'k'\nmax_instances = '2'\n",
        "[credentials.a] max_instances",
        "must be an integer",
    ),
    ('[credentials.""]\nkey = "k"\n', "[credentials.]", "1 to 100 characters"),
]


@pytest.mark.parametrize("text, where, words", ERRORS)
def test_errors_name_file_section_and_key(
    tmp_path: Path, text: str, where: str | None, words: str
) -> None:
    """Each mistake raises ConfigError naming the file, section and key."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={"EMPTY": ""})
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    if where is not None:
        assert message.startswith(f"{path}: {where}: ")
    assert words in message
    assert isinstance(info.value, ValueError)


def test_error_attributes(tmp_path: Path) -> None:
    """ConfigError carries source, section and key for callers to branch on."""
    path = write(tmp_path, "[credentials.a]\nkey = 'k'\nmax_instances = 0\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert (info.value.source, info.value.section, info.value.key) == (
        str(path),
        "credentials.a",
        "max_instances",
    )


@pytest.mark.parametrize(
    "text",
    [
        f"[credentials.a]\nkey = '{SECRET}'\nkey_env = 'X'\n",
        f"[credentials.a]\nkey = '{SECRET}'\nmax_instances = 0\n",
        f"[credentials.a]\nkey = '{SECRET}'\npub_permissions = ['no good']\n",
        f"[credentials.a]\nkey_hash = '{SECRET}'\n",
        f"[credentials.a]\nkey = '{SECRET}'\n[hub]\nport = 'x'\n",
    ],
)
def test_errors_never_show_a_key(tmp_path: Path, text: str) -> None:
    """No error message contains the key (or a would-be hash)."""
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert SECRET not in str(info.value)


def test_env_var_value_is_never_shown(tmp_path: Path) -> None:
    """A later error in a credential whose key came from the environment hides it."""
    text = "[credentials.a]\nkey_env = 'K'\nmax_instances = -1\n"
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), environ={"K": SECRET})
    assert SECRET not in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    """A file that does not exist is a ConfigError naming it."""
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=rf"^{path}: cannot read the file"):
        load_config(path)


def test_invalid_toml(tmp_path: Path) -> None:
    """A syntax error is a ConfigError with TOML's own position."""
    path = write(tmp_path, "[hub\nport = 1\n")
    with pytest.raises(ConfigError, match=rf"^{path}: not valid TOML: .*line 1"):
        load_config(path)
