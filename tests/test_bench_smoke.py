"""Smoke run of bench/taskhub_bench.py with tiny counts: it runs and writes well-formed
JSON lines. Asserts nothing about speed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "bench", "taskhub_bench.py")


def test_bench_smoke(tmp_path):
    out = tmp_path / "smoke.jsonl"
    proc = subprocess.run(
        [
            sys.executable,
            BENCH,
            "--workload",
            "W1,W2,W3",
            "--scale",
            "0.01",
            "--runs",
            "1",
            "--port",
            "0",
            "--out",
            str(out),
            "--no-table",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    records = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    assert [r["workload"] for r in records] == ["W1", "W2", "W3"]
    for r in records:
        assert r["system"] == "taskhub"
        assert r["run"] == 0
        assert r["tasks"] >= 10
        assert r["rate"] > 0
        assert 0 < r["p50_ms"] <= r["p99_ms"] <= r["max_ms"]
        assert set(r["cpu_us_per_task"]) == {"server", "worker", "publisher", "total"}
        for key in ("elapsed_s", "rate", "p50_ms", "p99_ms"):
            assert isinstance(r[key], (int, float))
    w3 = records[2]
    assert w3["updates_received"] == w3["updates_expected"] == w3["tasks"] * 10
