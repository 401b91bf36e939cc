"""taskhub_sync on the anchors' workload (W1-W4), three processes: hub, worker, publisher.

    python bench/taskhub_bench.py                       # W1-W4, 3 runs each (~2 min)
    python bench/taskhub_bench.py --workload W2 --runs 1
    python bench/taskhub_bench.py --workload W1,W2,W3 --runs 1 --scale 0.01   # smoke
    python bench/taskhub_bench.py --workload W4 --idle 2000

The benchmark process is the publisher; it starts the hub and the worker (and, for
W4, a process holding the idle clients) as ``--role`` subprocesses of this script
and stops each by its PID at the end, whatever happens. Results are JSON lines
with the anchors' fields (system "taskhub"), appended to ``--out`` (default
``bench/results/taskhub-STAMP.jsonl``), followed by a summary table.

The workload (payload ``{"seq": n, "data": "x"*78}``, counts, warm-ups, caps) is
WORKLOAD.md version 1 of the anchors, re-implemented in benchlib.py.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import benchlib as bl  # noqa: E402

SYSTEM = "taskhub"
KEYS = {
    "bench-pub": "pub-key-0123456789",
    "bench-worker": "worker-key-0123456789",
    "bench-idle": "idle-key-0123456789",
}
# The hub's start window: a task must be started within this many seconds of being
# published. The library default (0.1 s) is meant for interactive use; a box with
# three busy processes on 2 cores can stall a thread longer than that, which would
# turn a hiccup into a failed task. 5 s keeps failures out of the measurement.
TASK_START_TIMEOUT = 5.0
HELPER_LIFETIME = 3600.0  # helpers exit by themselves after this long at the latest


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--workload", default="W1,W2,W3,W4", help="W1, W2, W3, W4 or a comma list")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument(
        "--scale", type=float, default=1.0, help="multiply task counts and time caps (smoke runs)"
    )
    ap.add_argument(
        "--idle",
        type=int,
        default=None,
        help="idle clients for W4 (default 200; e.g. 2000 for the scaling test)",
    )
    ap.add_argument("--out", default=None, help="append JSON lines here")
    ap.add_argument("--port", type=int, default=0, help="hub port (default: 18506 if free)")
    ap.add_argument(
        "--worker-threads",
        type=int,
        default=64,
        help="the worker's max_workers (handler threads; >= W2's 64 in flight)",
    )
    ap.add_argument(
        "--profile",
        default=None,
        metavar="DIR",
        help="record the hub, worker and publisher with py-spy during the "
        "measured window of each workload into DIR (needs py-spy on PATH "
        "or next to this Python)",
    )
    ap.add_argument(
        "--profile-all",
        action="store_true",
        help="py-spy: sample every thread that is not idle, not only the one "
        "holding the GIL (py-spy's idle detection misses threads blocked "
        "in recv here, so the default --gil view is the useful one)",
    )
    ap.add_argument("--no-table", action="store_true", help="do not print the summary table")
    ap.add_argument("--role", default="bench", help=argparse.SUPPRESS)
    ap.add_argument("--lifetime", type=float, default=HELPER_LIFETIME, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.workloads = [w.strip().upper() for w in args.workload.split(",") if w.strip()]
    for w in args.workloads:
        if w not in bl.WORKLOADS:
            ap.error(f"unknown workload {w!r}")
    return args


# ----------------------------------------------------------------- helpers
def _sigterm_exits() -> None:
    # SIGTERM (the benchmark's stop, or `timeout`) -> SystemExit, so `finally` runs
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def _bounded_wait(lifetime: float, alive: Any = None) -> None:
    """Sleep until lifetime passes or alive() turns false (checked every 0.5 s)."""
    t_end = time.monotonic() + lifetime
    while time.monotonic() < t_end and (alive is None or alive()):
        time.sleep(0.5)


def role_hub(args: argparse.Namespace) -> None:
    from taskhub_sync import Server

    n_idle = max(args.idle or 0, bl.WORKLOADS["W4"]["idle"])
    hub = Server(bl.HOST, args.port, task_start_timeout=TASK_START_TIMEOUT)
    hub.add_credential("bench-pub", key=KEYS["bench-pub"], pub_permissions=["*"])
    hub.add_credential("bench-worker", key=KEYS["bench-worker"], sub_permissions=["*"])
    hub.add_credential("bench-idle", key=KEYS["bench-idle"], max_instances=n_idle + 16)
    hub.start()
    print(f"hub listening on {hub.url}", flush=True)
    try:
        _bounded_wait(args.lifetime)
    finally:
        hub.stop(timeout=2.0)


def role_worker(args: argparse.Namespace) -> None:
    from taskhub_sync import Client

    def echo(task: Any) -> Any:
        task.start()
        return task.get_payload()

    def progress(task: Any) -> Any:
        task.start()
        payload = task.get_payload()
        seq = payload["seq"]
        for k in range(1, bl.N_UPDATES + 1):
            task.update(bl.make_update(seq, k))
        return payload

    client = Client(
        f"ws://{bl.HOST}:{args.port}",
        name="bench-worker",
        key=KEYS["bench-worker"],
        max_workers=args.worker_threads,
    )
    try:
        client.sub("echo", echo)
        client.sub("progress", progress)
        print("worker subscribed", flush=True)
        _bounded_wait(args.lifetime, lambda: not client.closed)
    finally:
        client.close()


def role_idle(args: argparse.Namespace) -> None:
    from taskhub_sync import Client

    n = args.idle or bl.WORKLOADS["W4"]["idle"]
    clients = []
    try:
        t_end = time.monotonic() + 120
        for _ in range(n):
            if time.monotonic() > t_end:
                raise RuntimeError(f"only {len(clients)} idle clients connected in 120 s")
            clients.append(
                Client(
                    f"ws://{bl.HOST}:{args.port}",
                    name="bench-idle",
                    key=KEYS["bench-idle"],
                    max_workers=1,
                )
            )
        print(f"{len(clients)} idle connections open", flush=True)
        _bounded_wait(args.lifetime)
    finally:
        # close in parallel-ish: a close waits for the hub's Close answer
        closers = [threading.Thread(target=c.close, daemon=True) for c in clients]
        for i in range(0, len(closers), 100):
            batch = closers[i : i + 100]
            for t in batch:
                t.start()
            for t in batch:
                t.join(6)


# ----------------------------------------------------------------- publisher
class Publisher:
    """The benchmark's side: one Client publishing, the workload drivers."""

    def __init__(self, port: int) -> None:
        from taskhub_sync import Client

        self.client = Client(
            f"ws://{bl.HOST}:{port}", name="bench-pub", key=KEYS["bench-pub"], max_workers=1
        )

    def close(self) -> None:
        self.client.close()

    def sequential(self, p: dict[str, Any], probe: bl.Probe, topic: str) -> tuple:
        client = self.client
        make_payload = bl.make_payload
        check_updates = topic == "progress"

        def one(seq: int) -> int:
            handle = client.pub(topic, make_payload(seq))
            got: list[Any] = []
            if check_updates:
                handle.on("update", got.append)
            result = handle.get_result(30)
            if result["seq"] != seq:
                raise AssertionError(f"task {seq}: got result for seq {result['seq']}")
            if check_updates:
                want = [bl.make_update(seq, k) for k in range(1, bl.N_UPDATES + 1)]
                if got != want:
                    raise AssertionError(f"task {seq}: updates {got!r} != {want!r}")
            return len(got)

        return bl.run_sequential(one, p, probe)

    def window(self, p: dict[str, Any], probe: bl.Probe) -> tuple:
        client = self.client
        win = bl.PushWindow(p["inflight"])
        errors: list[BaseException] = []
        make_payload = bl.make_payload

        def send(seq: int) -> None:
            def done(handle: Any) -> None:
                try:
                    if handle.result()["seq"] != seq:
                        raise AssertionError(f"task {seq}: wrong result {handle.result()!r}")
                except BaseException as exc:  # recorded; re-raised after the phase
                    errors.append(exc)
                win.done(seq)

            client.pub("echo", make_payload(seq)).add_done_callback(done)

        res = win.run(send, p, probe)
        if errors:
            raise RuntimeError(f"{len(errors)} W2 tasks failed, first: {errors[0]!r}")
        return res


# ----------------------------------------------------------------- profiling
def _py_spy() -> str | None:
    cand = os.path.join(os.path.dirname(sys.executable), "py-spy")
    if os.path.exists(cand):
        return cand
    from shutil import which

    return which("py-spy")


def start_profiles(
    procs: bl.Procs, outdir: str, wl: str, pids: dict[str, int], duration: float, gil: bool = True
) -> list[Any]:
    exe = _py_spy()
    if exe is None:
        print("py-spy not found: --profile ignored", file=sys.stderr)
        return []
    os.makedirs(outdir, exist_ok=True)
    started = []
    for name, pid in pids.items():
        out = os.path.join(outdir, f"{wl}-{name}.txt")
        cmd = [
            exe,
            "record",
            "-p",
            str(pid),
            "-o",
            out,
            "-f",
            "raw",
            "-r",
            "200",
            "-d",
            str(max(1, int(duration))),
            "--threads",
            "--nonblocking",
        ]
        if gil:
            cmd.append("--gil")  # only the thread holding the GIL: Python's own CPU
        started.append(procs.start(cmd, f"py-spy-{name}"))
    time.sleep(0.5)  # let py-spy attach
    return started


# ----------------------------------------------------------------- bench
def bench(args: argparse.Namespace) -> int:
    bl.raise_nofile()
    port = args.port or bl.pick_port()
    out = args.out
    if out is None:
        os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        out = os.path.join(HERE, "results", f"taskhub-{stamp}.jsonl")
    me = [sys.executable, os.path.abspath(__file__), "--port", str(port)]
    if args.idle:
        me += ["--idle", str(args.idle)]
    procs = bl.Procs()
    records = []
    pub = None
    try:
        hub = procs.start(me + ["--role", "hub"], "hub")
        bl.wait_for_line(procs.log_path("hub"), "hub listening", 30, hub)
        wrk = procs.start(
            me + ["--role", "worker", "--worker-threads", str(args.worker_threads)], "worker"
        )
        bl.wait_for_line(procs.log_path("worker"), "worker subscribed", 30, wrk)
        probe = bl.Probe(server=hub.pid, worker=wrk.pid, publisher=os.getpid())
        for wl in args.workloads:
            p = bl.wl_params(wl, args.scale)
            n_idle = args.idle or p.get("idle", 0)
            default_idle = bl.WORKLOADS["W4"]["idle"]
            name = wl if (wl != "W4" or n_idle == default_idle) else f"W4-idle{n_idle}"
            idle = None
            extra: dict[str, Any] = {}
            if wl == "W4":
                # A W1 run right before the idle clients connect: the machine's speed
                # drifts, so "what idle clients cost" is measured against this pair.
                pub = Publisher(port)
                base = pub.sequential(p, probe, "echo")
                pub.close()
                pub = None
                paired = round(len(base[0]) / base[1], 1)
                rss_before = bl.rss_kb(hub.pid)
                threads_before = bl.thread_count(hub.pid)
                idle = procs.start(me + ["--role", "idle"], "idle")
                bl.wait_for_line(procs.log_path("idle"), "idle connections open", 150, idle)
                t_end = time.monotonic() + 60
                while (
                    bl.thread_count(hub.pid) < threads_before + n_idle and time.monotonic() < t_end
                ):
                    time.sleep(0.2)
                time.sleep(1.0)
                extra = dict(
                    idle_clients=n_idle,
                    server_rss_kb_before=rss_before,
                    server_threads_before=threads_before,
                    w1_rate_paired=paired,
                )
            for run in range(args.runs):
                pub = Publisher(port)
                spies = []
                if args.profile and run == 0:
                    spies = start_profiles(
                        procs,
                        args.profile,
                        name,
                        dict(hub=hub.pid, worker=wrk.pid, publisher=os.getpid()),
                        p["max_s"] + 5,
                        gil=not args.profile_all,
                    )
                idle_cpu0 = bl.cpu_seconds(idle.pid) if idle is not None else 0.0
                if wl == "W2":
                    res = pub.window(p, probe)
                else:
                    res = pub.sequential(p, probe, "progress" if wl == "W3" else "echo")
                if wl == "W4":
                    extra.update(
                        server_rss_kb=bl.rss_kb(hub.pid), server_threads=bl.thread_count(hub.pid)
                    )
                    if idle is not None and res[0]:  # the idle process's own CPU
                        extra["idle_cpu_us_per_task"] = round(
                            (bl.cpu_seconds(idle.pid) - idle_cpu0) / len(res[0]) * 1e6, 1
                        )
                extra["foreign_cpu_pct"] = probe.foreign_cpu_pct(res[2], res[3])
                system = SYSTEM + ("+py-spy" if spies else "")
                r = bl.summarize(
                    system,
                    name,
                    run,
                    res[0],
                    res[1],
                    res[2],
                    res[3],
                    updates=res[4] if wl == "W3" else None,
                    extra=dict(extra),
                )
                bl.emit(out, r)
                records.append(r)
                pub.close()
                pub = None
                for s in spies:  # SIGINT: py-spy writes what it has sampled, then exits
                    if s.poll() is None:
                        s.send_signal(signal.SIGINT)
                    try:
                        s.wait(30)
                    except Exception:
                        pass
                    procs.stop(s)
                time.sleep(0.2)
            if idle is not None:
                procs.stop(idle, timeout=30)
    finally:
        if pub is not None:
            try:
                pub.close()
            except Exception:
                pass
        procs.stop_all()
    print(f"wrote {out}", file=sys.stderr)
    if not args.no_table and records:
        runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for r in records:
            runs.setdefault((r["system"], r["workload"]), []).append(r)
        print()
        print("\n".join(bl.headline_table(runs)))
        print()
        print("\n".join(bl.noise_table(runs)))
        if any(w.startswith("W4") for _, w in runs):
            print()
            print("\n".join(bl.idle_table(runs)))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _sigterm_exits()
    if args.role in ("hub", "worker", "idle"):
        bl.raise_nofile()
        {"hub": role_hub, "worker": role_worker, "idle": role_idle}[args.role](args)
        return 0
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())
