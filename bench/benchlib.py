"""Workload definition, /proc probes, statistics and tables for the taskhub benchmark.

A re-implementation of what the peers' anchor benchmark uses (its WORKLOAD.md,
version 1), so that taskhub runs exactly the same workload and writes JSON lines
with the same fields, without importing from the anchors' folder. Standard
library only. Every loop here stops at a count or a time cap.
"""

from __future__ import annotations

import collections
import json
import os
import resource
import socket
import statistics
import subprocess
import threading
import time
from typing import Any, Callable

HOST = "127.0.0.1"
DEFAULT_PORT = 18506  # the port WORKLOAD.md sets aside for taskhub

# ---------------------------------------------------------------- payloads
DATA = "x" * 78  # json.dumps(make_payload(0)) is exactly 100 bytes
N_UPDATES = 10  # progress updates per task in W3
WARMUP_SEQ = 10_000_000  # warm-up tasks use seq numbers from here up


def make_payload(seq: int) -> dict[str, Any]:
    return {"seq": seq, "data": DATA}


def make_update(seq: int, k: int) -> dict[str, Any]:
    return {"seq": seq, "progress": k}


# ------------------------------------------------------------- workloads
WORKLOADS: dict[str, dict[str, Any]] = {
    "W1": dict(warmup=200, tasks=2000, max_s=30.0),
    "W2": dict(warmup=500, tasks=20000, max_s=10.0, inflight=64),
    "W3": dict(warmup=50, tasks=1000, max_s=15.0, updates=N_UPDATES),
    "W4": dict(warmup=200, tasks=2000, max_s=30.0, idle=200),
}


def wl_params(name: str, scale: float = 1.0) -> dict[str, Any]:
    """Counts and caps of a workload, scaled for smoke runs (at least 10 tasks)."""
    params = dict(WORKLOADS[name])
    for k in ("warmup", "tasks"):
        params[k] = max(10, int(params[k] * scale))
    params["max_s"] = params["max_s"] * scale
    return params


# ---------------------------------------------------------- /proc probes
CLK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, int]:
    """(ppid, utime+stime+cutime+cstime in ticks) of a process."""
    with open(f"/proc/{pid}/stat") as f:
        s = f.read()
    rest = s[s.rindex(")") + 2 :].split()
    # rest[0] is field 3 (state); ppid is field 4, utime..cstime are fields 14-17
    return int(rest[1]), sum(int(x) for x in rest[11:15])


def proc_tree(pid: int) -> list[int]:
    """pid plus all its live descendants."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                children[_stat(int(d))[0]].append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    out, todo = [], [pid]
    while todo and len(out) < 100_000:
        q = todo.pop()
        out.append(q)
        todo.extend(children.get(q, []))
    return out


def cpu_seconds(pid: int) -> float:
    """CPU seconds of pid and its descendants; os.times() for this very process."""
    if pid == os.getpid():
        t = os.times()
        return t.user + t.system  # the benchmark process: its own threads only
    total = 0
    for q in proc_tree(pid):
        try:
            total += _stat(q)[1]
        except OSError:
            pass
    return total / CLK


def rss_kb(pid: int) -> int:
    """VmRSS summed over the process tree, KiB."""
    total = 0
    for q in proc_tree(pid):
        try:
            with open(f"/proc/{q}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def thread_count(pid: int) -> int:
    total = 0
    for q in proc_tree(pid):
        try:
            total += len(os.listdir(f"/proc/{q}/task"))
        except OSError:
            pass
    return total


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    # user nice system idle iowait irq softirq steal (guest is included in user)
    vals = [int(x) for x in fields[:8]]
    return (sum(vals) - vals[3] - vals[4]) / CLK


class Probe:
    """CPU seconds of named processes (server, worker, publisher).

    Also notes the machine's busy CPU at each snap, so a run can report how much
    CPU *other* processes used during its window (``foreign_cpu_pct``)."""

    def __init__(self, **pids: int) -> None:
        self.pids = {k: v for k, v in pids.items() if v}
        self.machine: list[tuple[float, float]] = []  # (monotonic time, busy s)

    def snap(self) -> dict[str, float]:
        snap = {k: cpu_seconds(v) for k, v in self.pids.items()}
        self.machine = (self.machine + [(time.monotonic(), machine_busy_seconds())])[-2:]
        return snap

    def foreign_cpu_pct(self, c0: dict[str, float], c1: dict[str, float]) -> float | None:
        """% of all cores used by processes other than ours between the last two snaps."""
        if len(self.machine) < 2:
            return None
        (t0, b0), (t1, b1) = self.machine
        ours = sum(c1[k] - c0[k] for k in c0)
        cores = os.cpu_count() or 1
        return round(max(0.0, (b1 - b0) - ours) / ((t1 - t0) * cores) * 100, 1)


def raise_nofile() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= hard:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    except (ValueError, OSError):
        return soft


# ------------------------------------------------------------ processes
class Procs:
    """Starts helper processes and stops exactly those, by PID."""

    def __init__(self, logdir: str = "/tmp") -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logdir = logdir
        self.names: dict[int, str] = {}

    def log_path(self, name: str) -> str:
        return os.path.join(self.logdir, f"taskhub-bench-{name}.log")

    def start(self, cmd: list[str], name: str, cwd: str | None = None) -> subprocess.Popen[bytes]:
        with open(self.log_path(name), "wb") as log:  # truncated: callers read it
            proc = subprocess.Popen(
                cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        self.procs.append(proc)
        self.names[proc.pid] = name
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
        if proc.poll() is None:
            kids = [k for k in proc_tree(proc.pid) if k != proc.pid]
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            for k in kids:  # descendants that outlived their parent
                try:
                    os.kill(k, 15)
                except ProcessLookupError:
                    pass
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            self.stop(proc)


def port_free(port: int) -> bool:
    s = socket.socket()
    try:
        s.bind((HOST, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def pick_port(preferred: int = DEFAULT_PORT) -> int:
    """The preferred port if it is free, else one the kernel picks."""
    if preferred and port_free(preferred):
        return preferred
    s = socket.socket()
    s.bind((HOST, 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


def wait_port(port: int, timeout: float = 30.0, proc: Any = None) -> None:
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"helper exited with {proc.returncode} before listening")
        try:
            socket.create_connection((HOST, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} not open after {timeout}s")


def wait_for_line(path: str, needle: str, timeout: float, proc: Any = None) -> None:
    """Wait until a helper's log holds ``needle`` (bounded by ``timeout``)."""
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"helper exited with {proc.returncode}; see {path}")
        try:
            with open(path, errors="replace") as f:
                if needle in f.read():
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{needle!r} not in {path} after {timeout}s")


# ----------------------------------------------------------------- stats
def pct(sorted_vals: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_vals:
        return float("nan")
    return sorted_vals[min(len(sorted_vals) - 1, int(round(q * (len(sorted_vals) - 1))))]


def summarize(
    system: str,
    workload: str,
    run: int,
    lat: list[float],
    elapsed: float,
    cpu0: dict[str, float],
    cpu1: dict[str, float],
    updates: int | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One result record, with the same fields as the anchors' records."""
    lat = sorted(lat)
    n = len(lat)
    r: dict[str, Any] = dict(
        system=system,
        workload=workload,
        run=run,
        tasks=n,
        elapsed_s=round(elapsed, 3),
        rate=round(n / elapsed, 1),
        p50_ms=round(pct(lat, 0.50) * 1e3, 3),
        p99_ms=round(pct(lat, 0.99) * 1e3, 3),
        max_ms=round(lat[-1] * 1e3, 3) if lat else None,
    )
    cpu = {k: (cpu1[k] - cpu0[k]) / n * 1e6 for k in cpu0} if n else {}
    cpu["total"] = sum(cpu.values())
    r["cpu_us_per_task"] = {k: round(v, 1) for k, v in cpu.items()}
    if updates is not None:
        r["updates_expected"] = n * N_UPDATES
        r["updates_received"] = updates
        r["updates_per_s"] = round(updates / elapsed, 1)
    if extra:
        r.update(extra)
    return r


def emit(out_path: str | None, result: dict[str, Any]) -> None:
    line = json.dumps(result, sort_keys=True)
    print(line, flush=True)
    if out_path:
        with open(out_path, "a") as f:
            f.write(line + "\n")


# ------------------------------------------------------ generic drivers
Snap = dict[str, float]


def run_sequential(
    do_one: Callable[[int], int], p: dict[str, Any], probe: Probe
) -> tuple[list[float], float, Snap, Snap, int]:
    """W1/W3/W4: do_one(seq) does one full round trip and returns the number of
    progress updates it received."""
    for i in range(p["warmup"]):
        do_one(WARMUP_SEQ + i)
    lat: list[float] = []
    updates = 0
    c0 = probe.snap()
    t0 = time.perf_counter()
    for i in range(p["tasks"]):
        t = time.perf_counter()
        updates += do_one(i) or 0
        lat.append(time.perf_counter() - t)
        if t - t0 > p["max_s"]:
            break
    elapsed = time.perf_counter() - t0
    return lat, elapsed, c0, probe.snap(), updates


class PushWindow:
    """W2 for push APIs: send(seq) does not block; the system calls done(seq) from
    any thread when the result arrives. Keeps ``inflight`` tasks outstanding."""

    def __init__(self, inflight: int) -> None:
        self.sem = threading.Semaphore(inflight)
        self.inflight = inflight
        self.lock = threading.Lock()
        self.started: dict[int, float] = {}
        self.lat: list[float] = []
        self.idle = threading.Condition(self.lock)

    def done(self, seq: int) -> None:
        t = time.perf_counter()
        with self.lock:
            ts = self.started.pop(seq, None)
            if ts is not None:
                self.lat.append(t - ts)
            if not self.started:
                self.idle.notify_all()
        self.sem.release()

    def phase(
        self, send: Callable[[int], None], first: int, count: int, max_s: float
    ) -> tuple[list[float], float]:
        self.lat = []
        t0 = time.perf_counter()
        for seq in range(first, first + count):
            if time.perf_counter() - t0 > max_s:
                break
            if not self.sem.acquire(timeout=30):
                raise RuntimeError("window stalled: no result for 30 s")
            with self.lock:
                self.started[seq] = time.perf_counter()
            send(seq)
        with self.lock:
            if not self.idle.wait_for(lambda: not self.started, timeout=30):
                raise RuntimeError(f"{len(self.started)} tasks never completed")
        return list(self.lat), time.perf_counter() - t0

    def run(
        self, send: Callable[[int], None], p: dict[str, Any], probe: Probe
    ) -> tuple[list[float], float, Snap, Snap, int]:
        self.phase(send, WARMUP_SEQ, p["warmup"], 60)
        c0 = probe.snap()
        lat, elapsed = self.phase(send, 0, p["tasks"], p["max_s"])
        return lat, elapsed, c0, probe.snap(), 0


# ---------------------------------------------------------------- tables
def load(paths: list[str]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    runs: dict[tuple[str, str], list[dict[str, Any]]] = collections.defaultdict(list)
    for path in paths:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line.startswith("{"):
                    r = json.loads(line)
                    runs[(r["system"], r["workload"])].append(r)
    return runs


def med(rs: list[dict[str, Any]], key: str, sub: str | None = None) -> float | None:
    vals = [
        (r[key][sub] if sub else r[key])
        for r in rs
        if key in r and r[key] is not None and (not sub or sub in r[key])
    ]
    return statistics.median(vals) if vals else None


def spread(rs: list[dict[str, Any]], key: str = "rate") -> float | None:
    """(max - min) / median of a field over the runs, in %."""
    vals = [r[key] for r in rs if r.get(key) is not None]
    if len(vals) < 2:
        return 0.0 if vals else None
    m = statistics.median(vals)
    return (max(vals) - min(vals)) / m * 100 if m else None


def fmt(v: float | None, nd: int = 0) -> str:
    if v is None:
        return "–"
    return f"{v:,.{nd}f}"


ORDER = [
    "taskhub",
    "relay-wsproto",
    "relay-wsproto-skiputf8",
    "relay-simplews",
    "relay-simplews-nodelay",
    "relay-websockets-deflate",
    "relay-websockets-none",
    "nats",
    "crossbar",
    "socketio",
    "socketio-nodelay",
    "celery-solo",
    "celery-prefork2",
    "rq-simple-block",
    "rq-simple-poll",
    "rq-fork-block",
]


def systems(runs: dict[tuple[str, str], list[dict[str, Any]]]) -> list[str]:
    names = {s for s, _ in runs}
    return [s for s in ORDER if s in names] + sorted(names - set(ORDER))


def headline_table(runs: dict[tuple[str, str], list[dict[str, Any]]]) -> list[str]:
    """Median of the runs per system: the anchors' headline plus CPU and W4 memory."""
    out = [
        "| system | W1 rt/s | W1 p50 ms | W1 p99 ms | W2 tasks/s | W2 p50 ms | W2 p99 ms "
        "| W3 rt/s | W3 updates got/sent | W4 rt/s | W4 vs W1 | KiB/idle conn "
        "| CPU µs/task W1 s/w/p | CPU µs/task W2 s/w/p (total) |",
        "|" + "---|" * 14,
    ]
    for s in systems(runs):
        if s.endswith("meta-poll"):
            continue
        w1, w2, w3, w4 = (runs.get((s, w), []) for w in ("W1", "W2", "W3", "W4"))
        got = "–"
        if w3:
            got = (
                f"{sum(r.get('updates_received', 0) for r in w3):,}/"
                f"{sum(r.get('updates_expected', 0) for r in w3):,}"
            )
        a, b = med(w1, "rate"), med(w4, "rate")
        change = f"{(b / a - 1) * 100:+.1f}%" if a and b else "–"
        kib = "–"
        if w4:
            rb, ra = med(w4, "server_rss_kb_before"), med(w4, "server_rss_kb")
            if rb is not None and ra is not None:
                kib = fmt((ra - rb) / w4[0]["idle_clients"], 1)

        def cpu(rs: list[dict[str, Any]], total: bool = False) -> str:
            if not rs:
                return "–"
            parts = "/".join(
                fmt(med(rs, "cpu_us_per_task", k)) for k in ("server", "worker", "publisher")
            )
            if total:
                parts += f" ({fmt(med(rs, 'cpu_us_per_task', 'total'))})"
            return parts

        out.append(
            f"| {s} | {fmt(med(w1, 'rate'))} | {fmt(med(w1, 'p50_ms'), 3)} "
            f"| {fmt(med(w1, 'p99_ms'), 3)} "
            f"| {fmt(med(w2, 'rate'))} | {fmt(med(w2, 'p50_ms'), 1)} "
            f"| {fmt(med(w2, 'p99_ms'), 1)} "
            f"| {fmt(med(w3, 'rate'))} | {got} | {fmt(b)} | {change} | {kib} "
            f"| {cpu(w1)} | {cpu(w2, True)} |"
        )
    return out


def noise_table(runs: dict[tuple[str, str], list[dict[str, Any]]]) -> list[str]:
    out = [
        "| system | workload | runs | tasks/run | min | median | max | spread "
        "| other processes' CPU % |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in systems(runs):
        for w in sorted({w for (s2, w) in runs if s2 == s}):
            rs = runs[(s, w)]
            rates = sorted(r["rate"] for r in rs)
            out.append(
                f"| {s} | {w} | {len(rs)} | {fmt(med(rs, 'tasks'))} | {fmt(rates[0])} "
                f"| {fmt(statistics.median(rates))} | {fmt(rates[-1])} | {fmt(spread(rs), 1)}% "
                f"| {fmt(med(rs, 'foreign_cpu_pct'))} |"
            )
    return out


def idle_table(runs: dict[tuple[str, str], list[dict[str, Any]]]) -> list[str]:
    """Every W4-like workload (W4 and W4-idleN): rate, RSS and threads of the hub."""
    out = [
        "| system | workload | idle clients | W1 rt/s (paired*) | rt/s with idle | change | p99 ms "
        "| hub RSS before MiB | with idle MiB | KiB per idle conn | hub threads |",
        "|" + "---|" * 11,
    ]
    for s in systems(runs):
        w1 = med(runs.get((s, "W1"), []), "rate")
        for w in sorted({w for (s2, w) in runs if s2 == s and w.startswith("W4")}):
            rs = runs[(s, w)]
            # taskhub pairs each W4 with a W1 run just before the idle clients connect
            paired = med(rs, "w1_rate_paired")
            a = paired or w1
            b = med(rs, "rate")
            rb, ra = med(rs, "server_rss_kb_before"), med(rs, "server_rss_kb")
            n = rs[0].get("idle_clients") or 0
            per = (ra - rb) / n if (ra is not None and rb is not None and n) else None
            out.append(
                f"| {s} | {w} | {n:,} | {fmt(a)}{'*' if paired else ''} | {fmt(b)} "
                f"| {f'{(b / a - 1) * 100:+.1f}%' if a and b else '–'} "
                f"| {fmt(med(rs, 'p99_ms'), 3)} "
                f"| {fmt(rb / 1024 if rb else None, 1)} | {fmt(ra / 1024 if ra else None, 1)} "
                f"| {fmt(per, 1)} | {fmt(med(rs, 'server_threads'))} |"
            )
    return out
