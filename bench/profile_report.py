"""Summarize py-spy raw (collapsed-stack) output: where the samples go.

    .venv/bin/python bench/profile_report.py /tmp/prof/W2-hub.txt [--top 25]

py-spy's raw format is one line per distinct stack: ``frame;frame;...;leaf COUNT``
(with ``--threads`` the first frame names the thread). Prints, over all threads
and per thread kind (the thread name without its numeric suffix):
self time by function (the leaf frame), inclusive time by function (any frame),
and inclusive time by module file. Percentages are of the active samples.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys

_LINE = re.compile(r"\s\(([^()]*?)(?::\d+)?\)$")


def func_of(frame: str) -> str:
    """Drop the line number: "f (file.py:12)" -> "f (file.py)"."""
    return _LINE.sub(lambda m: f" ({m.group(1)})", frame)


def file_of(frame: str) -> str:
    m = re.search(r"\(([^():]*)(?::\d+)?\)$", frame)
    return m.group(1) if m else frame


def thread_kind(frame: str) -> str:
    name = frame.split(":", 1)[1].strip() if frame.startswith("thread (") else "main"
    return re.sub(r"[-:]?[\d.:]+$", "", name) or name


def load(path: str) -> list[tuple[list[str], int]]:
    stacks = []
    with open(path, errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            stack, _, count = line.rpartition(" ")
            try:
                stacks.append((stack.split(";"), int(count)))
            except ValueError:
                continue
    return stacks


def top(counter: collections.Counter[str], total: int, n: int, title: str) -> list[str]:
    out = [f"  {title}"]
    for name, c in counter.most_common(n):
        out.append(f"    {c / total * 100:5.1f}%  {name}")
    return out


def report(path: str, n: int) -> str:
    stacks = load(path)
    total = sum(c for _, c in stacks)
    if not total:
        return f"{path}: no samples"
    kinds: dict[str, list[tuple[list[str], int]]] = collections.defaultdict(list)
    for frames, c in stacks:
        if frames and frames[0].startswith("thread ("):
            kinds[thread_kind(frames[0])].append((frames[1:], c))
        else:
            kinds["main"].append((frames, c))
    out = [f"{path}: {total} samples"]
    out.append(
        "  samples by thread kind: "
        + ", ".join(
            f"{k} {sum(c for _, c in v) / total * 100:.0f}%"
            for k, v in sorted(kinds.items(), key=lambda kv: -sum(c for _, c in kv[1]))
        )
    )
    selft: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    files: collections.Counter[str] = collections.Counter()
    for group in kinds.values():
        for frames, c in group:
            if not frames:
                continue
            selft[func_of(frames[-1])] += c
            for name in {func_of(f) for f in frames}:
                incl[name] += c
            for name in {file_of(f) for f in frames}:
                files[name] += c
    out += top(selft, total, n, "self time (leaf function):")
    out += top(incl, total, n, "inclusive time (function anywhere on the stack):")
    out += top(files, total, n, "inclusive time by file:")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args(argv)
    for path in args.paths:
        print(report(path, args.top))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
