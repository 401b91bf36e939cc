"""Bounded soak of taskhub_sync under faults (loopback only).

One hub (a subprocess), several worker processes and publisher threads (one Client
each) run for ``--seconds``; meanwhile workers are SIGKILLed and restarted,
SIGSTOPped for a while (a frozen peer the heartbeat must notice), and publisher
connections are cut. Every published task must get exactly one terminal outcome
(a result or a taskhub error); the run reports outcomes by type, faults injected,
handles left pending, and the hub's threads and RSS at start and end.

    .venv/bin/python bench/soak.py --seconds 60

Exit status 1 if a task got no outcome, two outcomes, or a wrong result.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import logging
import os
import queue
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

from taskhub_sync import Client, Server, TaskHubError

PUB = ("soak-pub", "soak-pub-key-0001")
WORK = ("soak-work", "soak-work-key-0002")
TOPIC = "soak:job"
PING = 0.5  # hub and clients: a frozen worker is dropped after about 1 s


# ----------------------------------------------------------------- subprocesses


def hub_main(port: int) -> int:
    """``soak.py _hub PORT``: serve; answer ``stats`` lines on stdin; stop at EOF."""
    hub = Server(
        "127.0.0.1",
        port,
        task_start_timeout=2.0,
        task_finish_timeout=10.0,
        ping_interval=PING,
        resume_grace=3.0,
    )
    hub.add_credential(PUB[0], PUB[1], pub_permissions=["*"], max_instances=64)
    hub.add_credential(WORK[0], WORK[1], sub_permissions=["soak"], max_instances=64)
    hub.start()
    print("PORT", hub.port, flush=True)
    for line in sys.stdin:
        if line.strip() == "stats":
            print(
                "STATS",
                hub.pending_tasks(),
                hub.connection_count(),
                threading.active_count(),
                flush=True,
            )
    hub.stop()
    return 0


def worker_main(url: str) -> int:
    """``soak.py _worker URL``: claim, maybe update, wait a little, echo the payload."""
    client = Client(
        url,
        name=WORK[0],
        key=WORK[1],
        max_workers=4,
        ping_interval=PING,
        reconnect_delay=(0.05, 0.5),
    )

    def handler(task: Any) -> Any:
        task.start()
        payload = task.get_payload()
        if payload["seq"] % 3 == 0:
            task.update({"seq": payload["seq"], "progress": 50})
        task.wait_cancelled(payload["ms"] / 1000.0)  # the work: interrupted by cancel
        return payload

    client.sub(TOPIC, handler)
    print("READY", flush=True)
    sys.stdin.read()  # until the soak closes our stdin
    client.close()
    return 0


def _spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        bufsize=1,
    )


def _expect(proc: subprocess.Popen[str], word: str, timeout: float = 15.0) -> str:
    """The rest of the next stdout line starting with ``word`` (bounded wait)."""
    box: queue.SimpleQueue[str] = queue.SimpleQueue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(word):
                box.put(line[len(word) :].strip())
                return
        box.put("")

    threading.Thread(target=read, daemon=True).start()
    try:
        rest = box.get(timeout=timeout)
    except queue.Empty:
        raise RuntimeError(f"subprocess printed no {word!r} within {timeout} s") from None
    if not rest and word != "READY":
        raise RuntimeError(f"subprocess ended before {word!r}")
    return rest


def _stop_proc(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGCONT)
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait(5.0)
        except (OSError, ValueError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait(5.0)


def _proc_stats(pid: int) -> tuple[int, int]:
    """(threads, RSS in KiB) of a process, from /proc."""
    threads = rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                threads = int(line.split()[1])
            elif line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return threads, rss


# ----------------------------------------------------------------- the soak


class Tally:
    """Outcomes per task id, counted from done callbacks (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.done = threading.Condition(self.lock)
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.per_task: dict[str, int] = {}
        self.handles: dict[str, Any] = {}
        self.wrong = 0
        self.pub_refused = 0
        self.when: dict[str, float] = {}

    def published(self, handle: Any, payload: Any) -> None:
        with self.lock:
            self.per_task[handle.task_id] = 0
            self.handles[handle.task_id] = handle
            self.when[handle.task_id] = time.monotonic()
        handle.add_done_callback(lambda h: self._on_done(h, payload))

    def _on_done(self, handle: Any, payload: Any) -> None:
        error = handle.exception()
        if error is None:
            kind = "result"
            wrong = handle.result() != payload
        else:
            kind = type(error).__name__ if isinstance(error, TaskHubError) else "OTHER"
            wrong = kind == "OTHER"
        with self.lock:
            self.per_task[handle.task_id] += 1
            self.outcomes[kind] += 1
            self.wrong += wrong
            self.done.notify_all()

    def pending(self) -> list[str]:
        with self.lock:
            return [t for t, n in self.per_task.items() if n == 0]


class ErrorLog(logging.Handler):
    """Counts ERROR records of the library (a crashed reader, a double completion)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage()[:200])


def publisher_loop(client: Client, tally: Tally, stop: threading.Event, seq: Any) -> None:
    window = threading.BoundedSemaphore(16)
    rng = random.Random()
    while not stop.is_set():
        if not window.acquire(timeout=0.2):
            continue
        payload = {"seq": next(seq), "ms": rng.randint(0, 40)}
        try:
            handle = client.pub(TOPIC, payload, timeout=8.0)
        except TaskHubError:  # ConnectionLost while reconnecting: nothing was published
            window.release()
            with tally.lock:
                tally.pub_refused += 1
            continue
        handle.add_done_callback(lambda h: window.release())
        tally.published(handle, payload)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="load phase (default 60)")
    parser.add_argument("--workers", type=int, default=4, help="worker processes")
    parser.add_argument("--publishers", type=int, default=4, help="publisher threads")
    parser.add_argument("--seed", type=int, default=None, help="fault schedule seed")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    errors = ErrorLog()
    logging.getLogger("taskhub_sync").addHandler(errors)

    hub = _spawn("_hub", "0")
    port = int(_expect(hub, "PORT"))
    url = f"ws://127.0.0.1:{port}"
    hub_idle = _proc_stats(hub.pid)
    workers = [_spawn("_worker", url) for _ in range(args.workers)]
    for w in workers:
        _expect(w, "READY")
    publishers = [
        Client(url, name=PUB[0], key=PUB[1], ping_interval=PING, reconnect_delay=(0.05, 0.5))
        for _ in range(args.publishers)
    ]
    tally = Tally()
    faults: collections.Counter[str] = collections.Counter()
    stop = threading.Event()
    seq = itertools.count()  # next() on it is atomic: shared by the publisher threads
    threads = [
        threading.Thread(target=publisher_loop, args=(c, tally, stop, seq), name=f"pub-{i}")
        for i, c in enumerate(publishers)
    ]
    for t in threads:
        t.start()
    # warm up a moment, then take the "start" figures with everything connected
    stop.wait(1.0)
    hub_start = _proc_stats(hub.pid)
    own_start = threading.active_count()
    t0 = time.monotonic()
    frozen: list[tuple[float, subprocess.Popen[str]]] = []
    events: list[tuple[float, str]] = []
    while time.monotonic() - t0 < args.seconds:
        stop.wait(rng.uniform(0.3, 1.5))
        now = time.monotonic()
        for until, w in list(frozen):
            if now >= until:
                os.kill(w.pid, signal.SIGCONT)
                frozen.remove((until, w))
        action = rng.choice(["kill", "kill", "drop", "drop", "freeze"])
        live = [w for w in workers if w.poll() is None and w not in [f for _, f in frozen]]
        if action == "kill" and live:
            victim = rng.choice(live)
            victim.kill()
            victim.wait(5.0)
            events.append((time.monotonic(), f"kill {victim.pid}"))
            workers.remove(victim)
            fresh = _spawn("_worker", url)
            _expect(fresh, "READY")
            workers.append(fresh)
            faults["worker SIGKILL+restart"] += 1
        elif action == "freeze" and live:
            victim = rng.choice(live)
            os.kill(victim.pid, signal.SIGSTOP)
            events.append((time.monotonic(), f"stop {victim.pid}"))
            frozen.append((now + rng.uniform(1.5, 3.0), victim))
            faults["worker SIGSTOP (1.5-3 s)"] += 1
        elif action == "drop":
            client = rng.choice(publishers)
            try:
                client._ws.sock.shutdown(socket.SHUT_RDWR)
                faults["publisher connection cut"] += 1
                events.append((time.monotonic(), f"cut {client.session}"))
            except (OSError, AttributeError):
                pass
    for _, w in frozen:
        os.kill(w.pid, signal.SIGCONT)
    stop.set()
    for t in threads:
        t.join(10.0)
    load_seconds = time.monotonic() - t0
    # Bounded wait for the last outcomes (finish timeout 8 s + resume grace + slack).
    with tally.lock:
        tally.done.wait_for(lambda: all(n for n in tally.per_task.values()), timeout=20.0)
    pending = tally.pending()
    hub_end = _proc_stats(hub.pid)
    own_end = threading.active_count()
    assert hub.stdin is not None
    hub.stdin.write("stats\n")
    hub.stdin.flush()
    stats = _expect(hub, "STATS").split()
    for c in publishers:
        c.close()
    for w in workers:
        _stop_proc(w)
    hub.stdin.write("stats\n")
    hub.stdin.flush()
    stats_after = _expect(hub, "STATS").split()
    hub_after = _proc_stats(hub.pid)
    _stop_proc(hub)

    total = len(tally.per_task)
    doubles = sum(1 for n in tally.per_task.values() if n > 1)
    print(
        f"soak: {load_seconds:.0f} s of load, {args.workers} worker processes, "
        f"{args.publishers} publisher threads, hub on {url}"
    )
    print(f"tasks published: {total}  (pub() refused while reconnecting: {tally.pub_refused})")
    print("outcomes:")
    for kind, n in tally.outcomes.most_common():
        print(f"  {kind:<20} {n}")
    print(
        f"tasks with no outcome: {len(pending)}   with two or more: {doubles}   "
        f"wrong results: {tally.wrong}"
    )
    print("faults injected:")
    for kind, n in faults.most_common():
        print(f"  {kind:<28} {n}")
    print(f"library ERROR log records (publisher side): {len(errors.messages)}")
    for m in errors.messages[:5]:
        print(f"    {m}")
    print(f"hub pending tasks at end: {stats[0]}   connections: {stats[1]}")
    print(
        f"hub threads / RSS: idle {hub_idle[0]} / {hub_idle[1] // 1024} MiB;  "
        f"start {hub_start[0]} / {hub_start[1] // 1024} MiB;  "
        f"end {hub_end[0]} / {hub_end[1] // 1024} MiB;  "
        f"after clients left {hub_after[0]} / {hub_after[1] // 1024} MiB "
        f"(hub's own count: {stats_after[2]} threads, {stats_after[1]} connections)"
    )
    print(f"soak process threads: start {own_start}, end {own_end}")
    ok = not pending and not doubles and not tally.wrong and total > 0
    for task_id in pending[:10]:
        at = tally.when[task_id]
        near = [f"{e[1]} at {e[0] - at:+.3f} s" for e in events if abs(e[0] - at) < 3.0]
        print(f"  no outcome: {task_id} published at {at - t0:.3f} s; faults near: {near}")
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["_hub"]:
        sys.exit(hub_main(int(sys.argv[2])))
    if sys.argv[1:2] == ["_worker"]:
        sys.exit(worker_main(sys.argv[2]))
    sys.exit(main())
