"""One sitting: taskhub's benchmark and the peers' anchors, then one side-by-side table.

    .venv/bin/python bench/compare.py                     # taskhub + target anchors (~12 min)
    .venv/bin/python bench/compare.py --anchors relay,nats   # the quick comparison (~6 min)
    .venv/bin/python bench/compare.py --anchors all          # all of run_all.sh (~17 min)
    .venv/bin/python bench/compare.py --runs 1 --scale 0.1   # smoke (~2 min)
    .venv/bin/python bench/compare.py --skip-taskhub --reuse bench/results/taskhub-X.jsonl
    .venv/bin/python bench/compare.py --report-only --reuse A.jsonl --reuse B.jsonl

The anchors are the peers' scripts in ``--anchors-dir`` (default
``../shared/bench-anchors`` next to the repository); they are run as
subprocesses with their own Pythons (``--anchor-python``, default
``/tmp/benchenv/bin/python``, and ``/tmp/crossbarenv/bin/python`` for
Crossbar; ``setup_env.sh`` in that folder installs both), never imported. This
machine's speed drifts, so the ratios are only meaningful within one sitting.

Writes ``bench/results/compare-STAMP.jsonl`` (every record of the sitting),
``compare-STAMP.md`` (the tables printed at the end) and ``compare-STAMP-env.txt``.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import benchlib as bl  # noqa: E402

# name -> (python: "bench" | "crossbar", script, extra args, workloads); as in run_all.sh
ANCHORS: dict[str, list[tuple[str, str, list[str], str]]] = {
    "relay": [
        ("bench", "anchor_ws_relay.py", ["--impl", "wsproto"], "W1,W2,W3,W4"),
        ("bench", "anchor_ws_relay.py", ["--impl", "wsproto", "--skip-utf8"], "W1,W2,W3"),
    ],
    "relay-others": [
        ("bench", "anchor_ws_relay.py", ["--impl", "simplews"], "W1,W2,W3,W4"),
        ("bench", "anchor_ws_relay.py", ["--impl", "simplews", "--nodelay"], "W1,W2,W3"),
        (
            "bench",
            "anchor_ws_relay.py",
            ["--impl", "websockets", "--compression", "deflate"],
            "W1,W2,W3,W4",
        ),
        (
            "bench",
            "anchor_ws_relay.py",
            ["--impl", "websockets", "--compression", "none"],
            "W1,W2,W3",
        ),
    ],
    "nats": [("bench", "anchor_nats.py", [], "W1,W2,W3,W4")],
    "crossbar": [("crossbar", "anchor_crossbar.py", [], "W1,W2,W3,W4")],
    "socketio": [
        ("bench", "anchor_socketio.py", [], "W1,W2,W3,W4"),
        ("bench", "anchor_socketio.py", ["--nodelay"], "W1,W2,W3"),
    ],
    "celery": [
        ("bench", "anchor_celery.py", ["--pool", "solo"], "W1,W2,W3"),
        ("bench", "anchor_celery.py", ["--pool", "prefork", "--concurrency", "2"], "W1,W2"),
    ],
    "rq": [
        ("bench", "anchor_rq.py", ["--worker", "simple", "--wait", "block"], "W1,W2,W3"),
        ("bench", "anchor_rq.py", ["--worker", "simple", "--wait", "poll", "--poll-ms", "1"], "W1"),
        ("bench", "anchor_rq.py", ["--worker", "fork", "--wait", "block"], "W1,W2"),
    ],
}
GROUPS = {
    "targets": ["relay", "nats", "crossbar", "celery"],
    "all": ["relay", "relay-others", "nats", "crossbar", "socketio", "celery", "rq"],
    "none": [],
}

# (workload, peer systems (best of them is used), factor, description)
TARGETS = [
    ("W1", ["nats"], 1.0, "W1 >= 1.0x NATS"),
    ("W1", ["relay-wsproto"], 0.8, "W1 >= 0.8x wsproto relay"),
    ("W2", ["relay-wsproto"], 1.0, "W2 >= 1.0x wsproto relay (text frames)"),
    ("W2", ["crossbar"], 3.0, "W2 >= 3x Crossbar"),
    ("W2", ["celery-solo", "celery-prefork2"], 10.0, "W2 >= 10x Celery (best pool)"),
    ("W3", ["relay-wsproto"], 0.9, "W3 >= 0.9x wsproto relay"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--anchors",
        default="targets",
        help="comma list of "
        + ", ".join(ANCHORS)
        + ", or a group: "
        + ", ".join(f"{k} ({'+'.join(v) or '-'})" for k, v in GROUPS.items()),
    )
    ap.add_argument("--anchors-dir", default=os.path.join(REPO, "..", "shared", "bench-anchors"))
    ap.add_argument("--anchor-python", default="/tmp/benchenv/bin/python")
    ap.add_argument("--crossbar-python", default="/tmp/crossbarenv/bin/python")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--workload", default="W1,W2,W3,W4", help="taskhub's workloads")
    ap.add_argument(
        "--idle",
        type=int,
        default=None,
        help="taskhub: also run W4 with this many idle clients (e.g. 2000)",
    )
    ap.add_argument("--skip-taskhub", action="store_true")
    ap.add_argument(
        "--taskhub-last",
        action="store_true",
        help="run taskhub after the anchors instead of before",
    )
    ap.add_argument(
        "--reuse",
        action="append",
        default=[],
        metavar="JSONL",
        help="add the records of an earlier results file (repeatable)",
    )
    ap.add_argument(
        "--report-only", action="store_true", help="run nothing; tabulate the --reuse files"
    )
    ap.add_argument("--timeout", type=float, default=420, help="seconds per anchor script")
    args = ap.parse_args(argv)
    names: list[str] = []
    for a in (x.strip() for x in args.anchors.split(",") if x.strip()):
        for n in GROUPS.get(a, [a]):
            if n not in ANCHORS:
                ap.error(f"unknown anchor {n!r}")
            if n not in names:
                names.append(n)
    args.anchor_names = [] if args.report_only else names
    if args.report_only:
        args.skip_taskhub = True
    return args


def run_bounded(cmd: list[str], cwd: str, timeout: float, log: Any) -> int:
    """Run a benchmark script; on timeout SIGTERM it (its `finally` stops its helpers)."""
    print(
        "==",
        " ".join(os.path.relpath(c) if os.path.isabs(c) else c for c in cmd),
        file=sys.stderr,
        flush=True,
    )
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=log, stdin=subprocess.DEVNULL
    )
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        rc = -1
    except BaseException:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    print(f"   {time.monotonic() - t0:.0f} s, exit {rc}", file=sys.stderr, flush=True)
    return rc


def write_env(path: str, args: argparse.Namespace) -> None:
    def out(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return "?"

    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            models = (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
            cpu = next(models, "?")
    except OSError:
        pass
    lines = [
        f"date: {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}",
        f"host: {platform.system()} {platform.release()} {platform.machine()}, "
        f"{os.cpu_count()} cores, cpu: {cpu}",
        f"taskhub python: {sys.version.split()[0]} ({sys.executable})",
        "taskhub deps: "
        + out(
            [
                sys.executable,
                "-c",
                "import importlib.metadata as m;print(', '.join("
                "f'{d} {m.version(d)}' for d in "
                "('taskhub_sync','wsproto','websocket-client','h11')))",
            ]
        ),
        "taskhub_sync tree: "
        + out(["git", "-C", REPO, "describe", "--always", "--dirty"])
        + " ("
        + str(len(out(["git", "-C", REPO, "status", "--porcelain", "taskhub_sync"]).splitlines()))
        + " changed files under taskhub_sync/)",
        f"anchors: {os.path.abspath(args.anchors_dir)} ({','.join(args.anchor_names) or '-'})",
        f"anchor python: {out([args.anchor_python, '-V'])}",
        f"RUNS={args.runs} SCALE={args.scale}",
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def targets_table(runs: dict[tuple[str, str], list[dict[str, Any]]]) -> list[str]:
    out = [
        "| target | taskhub | peer | peer value | ratio | needed | met |",
        "|---|---|---|---|---|---|---|",
    ]
    th = {w: bl.med(runs.get(("taskhub", w), []), "rate") for w in ("W1", "W2", "W3", "W4")}
    for wl, peers, factor, text in TARGETS:
        vals = [(bl.med(runs.get((p, wl), []), "rate"), p) for p in peers]
        vals = [(v, p) for v, p in vals if v]
        mine = th.get(wl)
        if not vals or not mine:
            out.append(
                f"| {text} | {bl.fmt(mine)} | {'/'.join(peers)} | not run | – | {factor:g}x | – |"
            )
            continue
        v, peer = max(vals)
        ratio = mine / v
        out.append(
            f"| {text} | {bl.fmt(mine)} | {peer} | {bl.fmt(v)} | {ratio:.2f}x "
            f"| {factor:g}x | {'yes' if ratio >= factor else 'NO'} |"
        )
    w3 = runs.get(("taskhub", "W3"), [])
    if w3:
        got = sum(r.get("updates_received", 0) for r in w3)
        exp = sum(r.get("updates_expected", 0) for r in w3)
        out.append(
            f"| W3 every update delivered, in order | {got:,}/{exp:,} | – | – | – | all "
            f"| {'yes' if got == exp else 'NO'} |"
        )
    w4 = runs.get(("taskhub", "W4"), [])
    paired = bl.med(w4, "w1_rate_paired")
    base = paired or th["W1"]
    if w4 and base and th["W4"]:
        change = (th["W4"] / base - 1) * 100
        what = "taskhub W1 just before" if paired else "taskhub W1"
        out.append(
            f"| W4: 200 idle clients cost W1 < 10 % | {bl.fmt(th['W4'])} | {what} "
            f"| {bl.fmt(base)} | {change:+.1f}% | > -10% "
            f"| {'yes' if change > -10 else 'NO'} |"
        )
        rb, ra = bl.med(w4, "server_rss_kb_before"), bl.med(w4, "server_rss_kb")
        if rb is not None and ra is not None:
            kib = (ra - rb) / w4[0]["idle_clients"]
            out.append(
                f"| W4: < 64 KiB of hub memory per idle client | {kib:.1f} KiB | – | – | – "
                f"| < 64 KiB | {'yes' if kib < 64 else 'NO'} |"
            )
    return out


def ratio_table(runs: dict[tuple[str, str], list[dict[str, Any]]]) -> list[str]:
    """taskhub / each peer, per workload (median rates of this sitting)."""
    out = ["| peer | W1 | W2 | W3 | W4 |", "|---|---|---|---|---|"]
    th = {w: bl.med(runs.get(("taskhub", w), []), "rate") for w in ("W1", "W2", "W3", "W4")}
    for s in bl.systems(runs):
        if s.startswith("taskhub"):
            continue
        cells = []
        for w in ("W1", "W2", "W3", "W4"):
            v = bl.med(runs.get((s, w), []), "rate")
            cells.append(f"{th[w] / v:.2f}x" if v and th[w] else "–")
        out.append(f"| {s} | " + " | ".join(cells) + " |")
    return out


def report(paths: list[str]) -> str:
    runs = bl.load(paths)
    parts = [
        "### Side by side (median of runs; rates in round trips/s, W2 tasks/s; "
        "CPU µs per task server/worker/publisher)\n",
        *bl.headline_table(runs),
        "\n### Ratios taskhub / peer (median rate)\n",
        *ratio_table(runs),
        "\n### Targets of issue 4\n",
        *targets_table(runs),
        "\n### Idle clients (W4): hub memory and threads\n",
        *bl.idle_table(runs),
        "\n### Noise: rate over the runs\n",
        *bl.noise_table(runs),
    ]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    resdir = os.path.join(HERE, "results")
    os.makedirs(resdir, exist_ok=True)
    out = os.path.join(resdir, f"compare-{stamp}.jsonl")
    paths = [p for p in args.reuse if os.path.exists(p)]
    for p in args.reuse:
        if p not in paths:
            print(f"!! --reuse {p}: no such file", file=sys.stderr)
    if not args.report_only:
        write_env(os.path.join(resdir, f"compare-{stamp}-env.txt"), args)
        adir = os.path.abspath(args.anchors_dir)
        errlog_path = f"/tmp/taskhub-compare-{stamp}.log"
        common = ["--runs", str(args.runs), "--scale", str(args.scale), "--out", out]
        steps: list[tuple[list[str], str]] = []
        if not args.skip_taskhub:
            cmd = [
                sys.executable,
                os.path.join(HERE, "taskhub_bench.py"),
                "--no-table",
                "--workload",
                args.workload,
                *common,
            ]
            steps.append((cmd, REPO))
            if args.idle and args.idle != bl.WORKLOADS["W4"]["idle"]:
                steps.append(
                    (
                        [
                            sys.executable,
                            os.path.join(HERE, "taskhub_bench.py"),
                            "--no-table",
                            "--workload",
                            "W4",
                            "--idle",
                            str(args.idle),
                            *common,
                        ],
                        REPO,
                    )
                )
        anchor_steps = []
        for name in args.anchor_names:
            if not os.path.isdir(adir):
                print(f"!! anchors folder {adir} missing: anchors skipped", file=sys.stderr)
                break
            for which, script, extra, wls in ANCHORS[name]:
                py = args.anchor_python if which == "bench" else args.crossbar_python
                if not os.path.exists(py):
                    print(
                        f"!! {py} missing (run {adir}/setup_env.sh): {name} skipped",
                        file=sys.stderr,
                    )
                    continue
                anchor_steps.append(
                    ([py, os.path.join(adir, script), *extra, "--workload", wls, *common], adir)
                )
        steps = anchor_steps + steps if args.taskhub_last else steps + anchor_steps
        b0, t0 = bl.machine_busy_seconds(), time.monotonic()
        time.sleep(2.0)
        load = (bl.machine_busy_seconds() - b0) / (time.monotonic() - t0) / (os.cpu_count() or 1)
        print(f"machine busy before the sitting: {load * 100:.0f}% of all cores", file=sys.stderr)
        if load > 0.1:
            print(
                "!! other processes are using the CPU: the numbers will be low and noisy; "
                "taskhub's records carry foreign_cpu_pct",
                file=sys.stderr,
            )
        t0 = time.monotonic()
        with open(errlog_path, "ab") as errlog:
            for cmd, cwd in steps:
                rc = run_bounded(cmd, cwd, args.timeout, errlog)
                if rc != 0:
                    print(f"!! failed (exit {rc}); stderr in {errlog_path}", file=sys.stderr)
        print(f"total {time.monotonic() - t0:.0f} s", file=sys.stderr)
        if os.path.exists(out):
            paths.append(out)
    if not paths:
        print("no results to report", file=sys.stderr)
        return 1
    text = report(paths)
    print(text)
    if not args.report_only:
        with open(os.path.join(resdir, f"compare-{stamp}.md"), "w") as f:
            f.write(text + "\n")
        print(f"\nwrote {out} and compare-{stamp}.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
