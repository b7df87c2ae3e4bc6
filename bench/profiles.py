"""
Reading the profiles a run can take: py-spy's raw stacks (C{--py-spy}) and
cProfile's stats of the daemon's reactor thread (C{--profile}).  Profiled
runs are slower than the runs they explain: only their shares are worth
quoting.
"""

from __future__ import annotations

import pstats
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def summarize_py_spy(path: Path, limit: int = 15) -> dict[str, Any]:
    """
    From py-spy's raw (collapsed) stacks: the share of samples of each
    thread; of each line on top of the stack (own time), overall and in
    the busiest threads; and of each function anywhere on it (with
    callees).  Threads py-spy sees as idle are not sampled.
    """
    threads: dict[str, int] = {}
    own: dict[str, int] = {}
    own_by_thread: dict[str, dict[str, int]] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        # "thread (0x7f..)" or "thread (123): name"; pool threads are
        # told apart by their names only up to their number.
        thread = re.sub(r"^thread \(\w+\):?\s*", "", frames[0]) or frames[0]
        thread = re.sub(r"-\d+$", "", thread)
        frames = frames[1:]
        total += count
        threads[thread] = threads.get(thread, 0) + count
        if frames:
            # py-spy names each frame "function (file:line)".
            own[frames[-1]] = own.get(frames[-1], 0) + count
            mine = own_by_thread.setdefault(thread, {})
            mine[frames[-1]] = mine.get(frames[-1], 0) + count
        for f in {re.sub(r":\d+\)$", ")", f) for f in frames}:
            inclusive[f] = inclusive.get(f, 0) + count

    def top(table: dict[str, int], n: int = limit) -> list[list[Any]]:
        rows = sorted(table.items(), key=lambda kv: kv[1], reverse=True)[:n]
        return [[name, round(100 * k / max(1, total), 1)] for name, k in rows]

    busiest = sorted(threads, key=threads.get, reverse=True)[:3]
    return {"samples": total, "threads_pct": top(threads),
            "own_pct": top(own), "inclusive_pct": top(inclusive),
            "own_pct_by_thread": {t: top(own_by_thread.get(t, {}), 8) for t in busiest}}


def print_profiles(measures: dict[str, Any]) -> None:
    """
    The py-spy summaries of a C{--py-spy} run, measure by measure.
    """
    found = [(name, m) for name, m in measures.items()
             if isinstance(m, dict) and "py_spy" in m]
    for name, runs in measures.get("rounds", {}).items():
        found += [(f"{name} round {i + 1}", x) for i, x in enumerate(runs) if "py_spy" in x]
    for name, m in list(found):
        for worker, p in m.get("py_spy_workers", {}).items():
            found.append((f"{name}, {worker}", {"py_spy": p}))
    for name, m in found:
        p = m["py_spy"]
        print(f"\npy-spy, {name}: {p['samples']} samples (100/s, active threads only)")
        print("  threads: " + ", ".join(f"{t} {pct} %" for t, pct in p["threads_pct"]))
        _print_frames("own time:", p["own_pct"])
        _print_frames("with callees:", p["inclusive_pct"])
        for thread, rows in p["own_pct_by_thread"].items():
            _print_frames(f"own time in {thread}:", rows)


def _print_frames(title: str, rows: list[list[Any]]) -> None:
    print(f"  {title}")
    for frame, pct in rows:
        print(f"    {pct:5.1f} %  {frame}")


def top_frames(stats_path: Path, limit: int = 25) -> list[dict[str, Any]]:
    """
    The C{limit} functions of a cProfile stats file with the most own
    time.
    """
    stats = pstats.Stats(str(stats_path))
    rows = []
    for (filename, line, function), (cc, nc, tt, ct, _) in stats.stats.items():
        rows.append({"function": f"{_short(filename)}:{line}({function})",
                     "calls": nc, "tottime_s": round(tt, 4), "cumtime_s": round(ct, 4)})
    rows.sort(key=lambda r: r["tottime_s"], reverse=True)
    return rows[:limit]


def print_top_frames(rows: list[dict[str, Any]], load: str = "50-connection submits") -> None:
    """
    L{top_frames} of the daemon's reactor thread under C{load} (C{--profile}).
    """
    print(f"cProfile of the daemon's reactor thread, {load}, by own time:")
    for row in rows:
        print(f"  {row['tottime_s']:8.3f}s {row['cumtime_s']:8.3f}s "
              f"{row['calls']:>9} {row['function']}")


def _short(filename: str) -> str:
    for marker in ("site-packages/", f"{ROOT}/", "lib/python3.11/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename
