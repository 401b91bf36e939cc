"""Microbenchmark of the hub's hot path, without a network: µs per operation.

    .venv/bin/python bench/micro.py                 # ~15 s, all sections
    .venv/bin/python bench/micro.py --n 5000        # quicker
    .venv/bin/python bench/micro.py --profile hub   # cProfile one section, top 25 by self time

Sections (one task = pub in, task out, start in, result in, done out):
  protocol  taskhub_sync.protocol encode()/decode() of each message of a task
  router    Router.receive() for publish / start / result (batches of --batch tasks
            in flight on one worker connection)
  framing   wsproto: receive_data(masked client frame) + events(), send(TextMessage);
            and taskhub_sync._frames (FrameReader.feed, encode_frame) where it exists
  client    websocket-client as taskhub's Client uses it (skip_utf8_validation,
            recv_data_frame) over a socketpair, plus decode and handle completion
  hub       everything the hub does for one task minus the syscalls and the locks:
            3 x (wsproto receive + decode + Router.receive) + 2 x (encode + wsproto send)

Use it to see which layer a change moves; the end-to-end numbers come from
taskhub_bench.py.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import socket
import sys
import time
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import benchlib as bl  # noqa: E402
import websocket  # noqa: E402
import wsproto  # noqa: E402
import wsproto.events as ev  # noqa: E402
from websocket import ABNF  # noqa: E402

from taskhub_sync import protocol as p  # noqa: E402
from taskhub_sync.handle import TaskHandle  # noqa: E402
from taskhub_sync.router import Credential, Router  # noqa: E402

try:  # the hub's own frame layer, where the core has one (else the hub uses wsproto)
    from taskhub_sync import _frames as frames  # noqa: E402
except ImportError:  # pragma: no cover - older cores
    frames = None  # type: ignore[assignment]

PUB, WORKER = "bench-pub#1", "bench-worker#1"


def timed(label: str, fn: Callable[[], Any], n: int, per: int = 1) -> float:
    """Run fn n times (after a bounded warm-up); print and return µs per operation."""
    for _ in range(min(n, 1000)):
        fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    us = (time.perf_counter() - t) / (n * per) * 1e6
    print(f"  {label:<66} {us:8.2f} µs")
    return us


def messages(seq: int = 1) -> dict[str, Any]:
    payload = bl.make_payload(seq)
    tid = f"{PUB}.{seq}"
    return {
        "pub": p.Publish(tid, "echo", payload),
        "task": p.Task(tid, "echo", payload, "bench-pub"),
        "start": p.Start(tid),
        "update": p.Update(tid, bl.make_update(seq, 1)),
        "result": p.Result(tid, payload),
        "done": p.Done(tid, {"bench-worker": p.Outcome(p.OK, payload)}, winner="bench-worker"),
    }


def new_router(concurrency: int) -> Router:
    r = Router(task_start_timeout=5.0, task_finish_timeout=60.0)
    r.connect(PUB, Credential("bench-pub", pub_permissions=("*",)), 1)
    r.connect(WORKER, Credential("bench-worker", sub_permissions=("*",)), concurrency)
    r.receive(WORKER, p.Subscribe(1, "echo"), 0.0)
    r.receive(WORKER, p.Subscribe(2, "progress"), 0.0)
    return r


def wsproto_pair() -> tuple[wsproto.WSConnection, wsproto.WSConnection]:
    client = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    server = wsproto.WSConnection(wsproto.ConnectionType.SERVER)
    server.receive_data(client.send(ev.Request(host="127.0.0.1", target="/")))
    list(server.events())
    client.receive_data(server.send(ev.AcceptConnection()))
    list(client.events())
    return client, server


def client_frame(text: str) -> bytes:
    """A masked text frame as websocket-client sends it."""
    return ABNF.create_frame(text, ABNF.OPCODE_TEXT).format()


# ------------------------------------------------------------------ sections
def sec_protocol(n: int) -> None:
    print("protocol (taskhub_sync.protocol):")
    for name, msg in messages().items():
        text = p.encode(msg)
        timed(f"encode {name:<6} ({len(text)} B)", lambda m=msg: p.encode(m), n)
        timed(f"decode {name:<6}", lambda t=text: p.decode(t), n)


def sec_router(n: int, batch: int) -> None:
    print(f"router (Router.receive, {batch} tasks in flight):")
    router = new_router(batch)
    rounds = max(1, n // batch)
    seq = [0]
    totals = {"publish": 0.0, "start": 0.0, "result": 0.0}
    for r in range(rounds + 2):
        first = seq[0]
        ids = [f"{PUB}.{first + i}" for i in range(batch)]
        pubs = [p.Publish(t, "echo", bl.make_payload(first + i)) for i, t in enumerate(ids)]
        starts = [p.Start(t) for t in ids]
        results = [p.Result(t, bl.make_payload(first + i)) for i, t in enumerate(ids)]
        seq[0] += batch
        t0 = time.perf_counter()
        for m in pubs:
            router.receive(PUB, m, 1.0)
        t1 = time.perf_counter()
        for m in starts:
            router.receive(WORKER, m, 1.0)
        t2 = time.perf_counter()
        for m in results:
            router.receive(WORKER, m, 1.0)
        t3 = time.perf_counter()
        if r >= 2:  # two warm-up rounds
            totals["publish"] += t1 - t0
            totals["start"] += t2 - t1
            totals["result"] += t3 - t2
    for k, v in totals.items():
        print(f"  {'receive(' + k + ')':<66} {v / (rounds * batch) * 1e6:8.2f} µs")
    print(
        f"  {'a whole task (publish + start + result)':<66} "
        f"{sum(totals.values()) / (rounds * batch) * 1e6:8.2f} µs"
    )


def sec_framing(n: int) -> None:
    if frames is not None:
        print("taskhub_sync._frames (the hub's framing, in memory):")
        reader = frames.FrameReader(1 << 20)
        for name in ("pub", "start", "result"):
            frame = client_frame(p.encode(messages()[name]))
            timed(
                f"FrameReader.feed, {name} ({len(frame)} B frame)",
                lambda f=frame: reader.feed(f),
                n,
            )
        for name in ("task", "done"):
            data = p.encode(messages()[name]).encode()
            timed(
                f"encode_frame(TEXT, {name}) server side",
                lambda d=data: frames.encode_frame(frames.OP_TEXT, d),
                n,
            )
        data = p.encode(messages()["result"]).encode()
        timed(
            "encode_frame(TEXT, result, mask=True) client side",
            lambda d=data: frames.encode_frame(frames.OP_TEXT, d, mask=True),
            n,
        )
    print("wsproto (in memory; add one recv/send syscall each):")
    client, server = wsproto_pair()
    for name, msg in messages().items():
        if name in ("task", "done"):
            continue
        frame = client_frame(p.encode(msg))

        def recv(f: bytes = frame) -> None:
            server.receive_data(f)
            for _ in server.events():
                pass

        timed(f"receive_data + events, {name} ({len(frame)} B frame)", recv, n)
    for name in ("task", "done", "update"):
        text = p.encode(messages()[name])
        timed(
            f"send(TextMessage({name})) -> bytes", lambda t=text: server.send(ev.TextMessage(t)), n
        )


def sec_client(n: int) -> None:
    print("client side (websocket-client as taskhub's Client configures it, socketpair):")
    msgs = messages()
    _, server = wsproto_pair()
    for name in ("task", "done"):
        frame = server.send(ev.TextMessage(p.encode(msgs[name])))
        a, b = socket.socketpair()
        ws = websocket.WebSocket(skip_utf8_validation=True, enable_multithread=True)
        ws.sock, ws.connected = b, True

        def one(f: bytes = frame, a: socket.socket = a, ws: Any = ws) -> None:
            a.sendall(f)
            ws.recv_data_frame(True)

        timed(f"recv_data_frame({name}) incl. syscalls", one, n)
        a.close()
        b.close()
    a, b = socket.socketpair()
    a.setblocking(False)
    ws = websocket.WebSocket(skip_utf8_validation=True, enable_multithread=True)
    ws.sock, ws.connected = b, True
    count = [0]
    text = p.encode(msgs["result"])

    def send() -> None:
        ws.send(text)
        count[0] += 1
        if count[0] % 32 == 0:
            try:
                while a.recv(1 << 20):
                    pass
            except BlockingIOError:
                pass

    timed("send(result) incl. masking and the syscall", send, n)
    a.close()
    b.close()
    done_text = p.encode(msgs["done"])

    def handle_cycle() -> None:
        h = TaskHandle("x.1", "echo")
        d = p.decode(done_text)
        h._complete(d.result, None, d.outcomes)
        h.result(0)

    timed("TaskHandle() + decode(done) + _complete + result()", handle_cycle, n)


def hub_task_path(n: int) -> Callable[[], None]:
    """One task through the hub, minus syscalls and locks (see the docstring)."""
    router = new_router(1 << 20)
    client, server = wsproto_pair()
    reader = frames.FrameReader(1 << 20) if frames is not None else None
    seq = [0]
    now = 1.0

    def one() -> None:
        s = seq[0]
        seq[0] = s + 1
        tid = f"{PUB}.{s}"
        payload = bl.make_payload(s)
        incoming = [
            (PUB, client_frame(p.encode(p.Publish(tid, "echo", payload)))),
            (WORKER, client_frame(p.encode(p.Start(tid)))),
            (WORKER, client_frame(p.encode(p.Result(tid, payload)))),
        ]
        # the frames above are built by the "clients": not timed as hub work
        t = time.perf_counter()
        if reader is not None:  # the hub's own frame layer
            for conn, frame in incoming:
                for _, data in reader.feed(frame):
                    msg = p.decode(data)
                    for o in router.receive(conn, msg, now):
                        frames.encode_frame(frames.OP_TEXT, p.encode(o.message).encode())
        else:
            for conn, frame in incoming:
                server.receive_data(frame)
                for event in server.events():
                    msg = p.decode(event.data)
                    for o in router.receive(conn, msg, now):
                        server.send(ev.TextMessage(p.encode(o.message)))
        spent[0] += time.perf_counter() - t

    spent = [0.0]
    one.spent = spent  # type: ignore[attr-defined]
    return one


def sec_hub(n: int) -> None:
    layer = "taskhub_sync._frames" if frames is not None else "wsproto"
    print(f"hub path per task (3 frames in, 2 out, framing by {layer}; no syscalls, no locks):")
    one = hub_task_path(n)
    for _ in range(min(n, 1000)):
        one()
    one.spent[0] = 0.0  # type: ignore[attr-defined]
    for _ in range(n):
        one()
    print(
        f"  {'receive + decode + route + encode + send, per task':<66} "
        f"{one.spent[0] / n * 1e6:8.2f} µs"
    )  # type: ignore[attr-defined]


SECTIONS = {
    "protocol": sec_protocol,
    "router": sec_router,
    "framing": sec_framing,
    "client": sec_client,
    "hub": sec_hub,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=20000, help="operations per measurement")
    ap.add_argument("--batch", type=int, default=64, help="router: tasks in flight")
    ap.add_argument("--only", default=",".join(SECTIONS), help="comma list of sections")
    ap.add_argument(
        "--profile",
        choices=list(SECTIONS),
        default=None,
        help="run one section under cProfile and print the top 25 by self time",
    )
    args = ap.parse_args(argv)
    if args.profile:
        prof = cProfile.Profile()
        fn = SECTIONS[args.profile]
        prof.enable()
        fn(args.n, args.batch) if args.profile == "router" else fn(args.n)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        return 0
    for name in (s.strip() for s in args.only.split(",") if s.strip()):
        if name == "router":
            sec_router(args.n, args.batch)
        else:
            SECTIONS[name](args.n)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
