"""Issue 3, "Security": TLS, hashed keys, secrets kept out of logs and reprs,
failed-login rate limiting, and no acting on another connection's task."""

from __future__ import annotations

import json
import logging
import socket
import ssl
import threading

import pytest
import trustme
from faults import (
    SERVICES,
    WAIT,
    LogWatcher,
    harness,
    hello_text,
    key_of,
    read_http_head,
    recv_close,
    roundtrip,
    upgrade_request,
    ws_frame,
)

from taskhub_sync import AuthenticationError, ConnectionLost, Server
from taskhub_sync import protocol as p
from taskhub_sync.auth import StoredKey, hash_key


@pytest.fixture
def h():
    with harness() as hh:
        yield hh


@pytest.fixture(scope="module")
def certs():
    """A certificate authority made at test time, the hub's certificate for 127.0.0.1
    issued by it, and an unrelated authority (trustme: no openssl CLI needed)."""
    ca, stranger = trustme.CA(), trustme.CA()
    return ca, ca.issue_cert("127.0.0.1"), stranger


@pytest.fixture
def tls_hub(h, certs):
    _, hub_cert, _ = certs
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    hub_cert.configure_cert(context)
    hub = h.hub(ssl_context=context)
    assert hub.url.startswith("wss://")
    return hub


@pytest.fixture
def trusting(certs):
    """A client SSLContext that trusts the hub's certificate."""
    context = ssl.create_default_context()
    certs[0].configure_trust(context)
    return context


# ----------------------------------------------------------------- TLS


def test_tls_round_trip_with_updates(h, tls_hub, trusting):
    """wss:// with a certificate made at test time: a task with updates round-trips."""

    def handler(task):
        for i in range(3):
            task.update(i)
        return task.get_payload()

    worker = h.client(tls_hub, "work", ssl_context=trusting)
    worker.sub("echo", handler)
    publisher = h.client(tls_hub, "pub", ssl_context=trusting)
    handle = publisher.pub("echo", {"secure": True})
    assert handle.get_result(timeout=WAIT) == {"secure": True}
    assert handle.updates == [0, 1, 2]


@pytest.mark.parametrize("trust", ["system-cas", "another-ca"])
def test_untrusted_certificate_is_refused(h, tls_hub, trusting, certs, trust):
    """A client that does not trust the hub's certificate refuses to connect."""
    context = ssl.create_default_context()
    if trust == "another-ca":
        certs[2].configure_trust(context)
    with pytest.raises(ConnectionLost, match="CERTIFICATE_VERIFY_FAILED|certificate verify"):
        h.client(tls_hub, "pub", ssl_context=context, reconnect=False)
    h.echo_worker(tls_hub, ssl_context=trusting)
    roundtrip(h.client(tls_hub, "pub", ssl_context=trusting))


def test_plain_ws_client_cannot_talk_to_a_tls_hub(h, tls_hub, trusting):
    """ws:// to a wss hub fails on the client, and the hub keeps serving TLS clients."""
    with pytest.raises((ConnectionLost, TimeoutError)):
        h.client(tls_hub.url.replace("wss://", "ws://"), "pub", open_timeout=2.0)
    h.echo_worker(tls_hub, ssl_context=trusting)
    roundtrip(h.client(tls_hub, "pub", ssl_context=trusting))


def test_wss_concurrent_senders_stay_healthy(h, tls_hub, trusting):
    """Over TLS: 4 handlers sending updates at once plus 3 publishing threads; every
    update and result arrives, in order, and no connection drops (PITFALLS LP-16)."""
    updates = 500

    def handler(task):
        task.start()
        for i in range(updates):
            task.update(i)
        return task.get_payload()

    with LogWatcher() as logs:
        worker = h.client(tls_hub, "work", ssl_context=trusting, max_workers=4)
        worker.sub("chatty", handler)
        publisher = h.client(tls_hub, "pub", ssl_context=trusting)
        handles: list = []
        lock = threading.Lock()

        def publish(n):
            for i in range(4):
                handle = publisher.pub("chatty", [n, i])
                with lock:
                    handles.append(handle)

        threads = [threading.Thread(target=publish, args=(n,)) for n in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
            assert not t.is_alive()
        assert len(handles) == 12
        for handle in handles:
            assert isinstance(handle.get_result(timeout=WAIT * 2), list)
            assert handle.updates == list(range(updates))
        assert sorted(x.get_result() for x in handles) == sorted(
            [n, i] for n in range(3) for i in range(4)
        )
        assert not logs.messages("lost")
        assert not logs.messages("dropped", level=logging.WARNING)
    assert worker.connected and publisher.connected


# ----------------------------------------------------------------- keys


def test_key_hash_credential_accepts_the_key_and_refuses_others(h):
    """A credential stored as a scrypt hash: the right key works, a wrong one fails."""
    hub = h.hub()
    secret = "hashed-service-s3cret-key"
    hub.add_credential(
        "hashed", key_hash=hash_key(secret), sub_permissions=["*"], pub_permissions=["*"]
    )
    worker = h.client(hub, "hashed", key=secret)
    worker.sub("echo", lambda t: t.get_payload())
    roundtrip(h.client(hub, "pub"))
    with pytest.raises(AuthenticationError):
        h.client(hub, "hashed", key=secret + "x", reconnect=False)
    with pytest.raises(AuthenticationError):
        h.client(hub, "hashed", key=hash_key(secret), reconnect=False)  # the hash is no key


def test_unknown_name_costs_a_hash_check_once_the_hub_keeps_hashed_keys(h, monkeypatch):
    """Refusing an unknown name runs the same scrypt check as a wrong key for a hashed
    credential, so refusal times do not tell which service names exist."""
    import hashlib

    from taskhub_sync import auth

    checks = []
    scrypt = hashlib.scrypt

    def counting_scrypt(*args, **kwargs):
        checks.append(kwargs.get("n"))
        return scrypt(*args, **kwargs)

    monkeypatch.setattr(auth.hashlib, "scrypt", counting_scrypt)
    hub = h.hub()
    with pytest.raises(AuthenticationError):
        h.client(hub, "no-such-service", key="whatever", reconnect=False)
    assert checks == []  # only plain keys: a plain comparison
    hub.add_credential("hashed", key_hash=hash_key("hashed-service-s3cret-key"))
    checks.clear()
    with pytest.raises(AuthenticationError):
        h.client(hub, "hashed", key="wrong", reconnect=False)
    with pytest.raises(AuthenticationError):
        h.client(hub, "no-such-service", key="whatever", reconnect=False)
    assert len(checks) == 2 and checks[0] == checks[1]


def test_keys_never_appear_in_logs_errors_or_reprs(h, caplog):
    """DEBUG logs of a whole session (a failed login included), error messages and
    reprs never contain a key."""
    caplog.set_level(logging.DEBUG)
    wrong = "wrong-key-" + key_of("other")[::-1]
    secrets = [key for key, *_ in SERVICES.values()] + [wrong]
    hub = h.hub()
    hashed = "hashed-secret-for-logs-test"
    secrets.append(hashed)
    hub.add_credential("hashed", key_hash=hash_key(hashed), pub_permissions=["*"])

    def handler(task):
        task.update("progress")
        return task.get_payload()

    worker = h.client(hub, "work")
    worker.sub("echo", handler)
    publisher = h.client(hub, "hashed", key=hashed)
    assert publisher.pub("echo", 1).get_result(timeout=WAIT) == 1
    texts = []
    with pytest.raises(AuthenticationError) as failed:
        h.client(hub, "other", key=wrong, reconnect=False)
    texts += [str(failed.value), repr(failed.value)]
    raw = h.ws(hub, None)
    raw.send(hello_text("work", key=wrong))
    code, reason = recv_close(raw)
    assert code == 4001
    texts.append(reason)
    texts += [repr(worker), repr(publisher), repr(hub), repr(vars(hub)), str(hub.url)]
    texts += [repr(StoredKey(key=hashed)), repr(p.Hello("work", key_of("work")))]
    texts += [repr(p.decode(p.encode(p.Hello("work", key_of("work")))))]
    worker.close()
    publisher.close()
    for record in caplog.records:
        texts += [record.getMessage(), str(record.args), record.exc_text or ""]
    texts.append(caplog.text)
    assert caplog.records  # the session was logged at all
    leaks = [(s, t[:200]) for t in texts for s in secrets if s in t]
    assert leaks == []


def test_failed_auths_rate_limited_per_host(h):
    """After auth_failure_limit failures from a host, even the right key is refused
    from it (until the window passes); another host is unaffected."""
    hub = h.hub(auth_failure_limit=3)
    for _ in range(3):
        with pytest.raises(AuthenticationError, match="authentication failed"):
            h.client(hub, "work", key="not-the-key", reconnect=False)
    with pytest.raises(AuthenticationError, match="too many failed"):
        h.client(hub, "work", reconnect=False)
    # Another loopback address is another host.
    sock = socket.create_connection(
        ("127.0.0.1", hub.port), timeout=WAIT, source_address=("127.0.0.2", 0)
    )
    h.socks.append(sock)
    sock.sendall(upgrade_request(hub.port))
    assert read_http_head(sock).startswith(b"HTTP/1.1 101")
    sock.sendall(ws_frame(0x1, hello_text("work").encode()))
    head = sock.recv(2)
    assert head[0] == 0x81  # a text frame: the welcome, not a Close
    with pytest.raises(AuthenticationError, match="too many failed"):
        h.client(hub, "pub", reconnect=False)


def test_parallel_wrong_keys_are_rate_limited_like_serial_ones(h):
    """Failed logins racing each other (each a slow scrypt check) still stop at
    auth_failure_limit: a check in progress counts until it succeeds."""
    hub = h.hub(auth_failure_limit=3, auth_timeout=WAIT)
    hub.add_credential("hashed", key_hash=hash_key("the-right-key"), pub_permissions=["*"])
    codes: list[int | None] = []
    lock = threading.Lock()
    go = threading.Barrier(12)

    def attempt():
        sock = socket.create_connection(("127.0.0.1", hub.port), timeout=WAIT)
        try:
            sock.sendall(upgrade_request(hub.port))
            assert read_http_head(sock).startswith(b"HTTP/1.1 101")
            go.wait(WAIT)
            sock.sendall(ws_frame(0x1, hello_text("hashed", "a-wrong-key").encode()))
            data = b""
            while len(data) < 4:
                chunk = sock.recv(64)
                if not chunk:
                    break
                data += chunk
            with lock:
                codes.append(int.from_bytes(data[2:4], "big") if data[:1] == b"\x88" else None)
        finally:
            sock.close()

    threads = [threading.Thread(target=attempt) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT * 2)
    assert sorted(codes) == [p.CLOSE_TRY_AGAIN_LATER] * 9 + [p.CLOSE_AUTH_FAILED] * 3, codes


# ----------------------------------------------------------------- strangers


@pytest.mark.parametrize(
    "message",
    [
        {"type": "start"},
        {"type": "update", "data": "forged"},
        {"type": "result", "result": "forged"},
        {"type": "fail", "error_type": "Forged", "message": "forged"},
        {"type": "cancel", "reason": "forged"},
    ],
    ids=lambda m: m["type"],
)
@pytest.mark.parametrize("stranger", ["other", "work"], ids=["other-service", "same-service"])
def test_stranger_cannot_act_on_anothers_task(h, message, stranger):
    """A connection that does not hold a task id gets closed with a protocol error
    when it answers, updates or cancels that task; the task is unaffected."""
    hub = h.hub()
    held = threading.Event()
    release = threading.Event()
    ids: list = []

    def handler(task):
        task.start()
        ids.append(task.id)
        held.set()
        release.wait(WAIT)
        task.update("genuine")
        return "genuine"

    worker = h.client(hub, "work")
    worker.sub("job", handler)
    h.thread(lambda: None, stop=release.set)
    publisher = h.client(hub, "pub")
    handle = publisher.pub("job")
    assert held.wait(WAIT)
    raw = h.ws(hub, stranger)
    with LogWatcher() as logs:
        raw.send(json.dumps({**message, "task": ids[0]}))
        code, reason = recv_close(raw)
        assert code == 4000 and "protocol error" in reason
        assert logs.messages(f"({stranger})", "protocol error", level=logging.WARNING)
    assert not handle.done()
    release.set()
    assert handle.get_result(timeout=WAIT) == "genuine"
    assert handle.updates == ["genuine"]
    assert handle.results["work"].status == "ok"
    roundtrip_ok = publisher.pub("job")
    assert roundtrip_ok.get_result(timeout=WAIT) == "genuine"


def test_server_repr_and_stored_keys_hide_keys():
    """Neither Server nor StoredKey shows a key, plain or hashed."""
    hub = Server("127.0.0.1", 0)
    hub.add_credential("plain", key="plain-s3cret-value")
    hub.add_credential("hashed", key_hash=hash_key("hashed-s3cret-value"))
    text = repr(hub) + repr(vars(hub)) + repr(hub._credentials)
    assert "plain-s3cret-value" not in text and "hashed-s3cret-value" not in text
    assert "scrypt$" not in repr(hub._credentials)
