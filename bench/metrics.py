"""
The metrics' benchmark (issue 18): how fast C{GET /v1/queues} and
C{GET /metrics} answer with a million jobs stored, and what keeping the
counts of jobs by queue and state (and the metrics' observations) costs
the no-op job rate, against main's code in the same run.

    flock /tmp/bench.lock .venv/bin/python bench/metrics.py [--quick]
        [--jobs N] [--requests N] [--rounds N] [--noop-jobs N] [--against REF]
        [--counts-off]

(1) A store of JOBS jobs (bench/seed_store.py, then shaped as a long-lived
dispatcher's by bench/list_filters.py: nine in ten succeeded, ten owners,
arrays and batches) is served by a daemon alone on core 0 (slots = 0);
from core 1, REQUESTS requests of each route one after the other on one
keep-alive connection, after 20 unmeasured: the median, 99th percentile
and worst round trip in milliseconds (target: under 5 ms).

(2) NOOP_JOBS no-op task jobs end to end (bench/measures.py's (b): 50
client connections, slots = threads = 8), by this tree's daemon and by
REF's (default: where this branch left main, its merge base), ROUNDS
rounds alternating which goes first (none with --rounds 0); the medians
of the jobs a second, and this one's over REF's (target: at least 0.95);
and of the daemon's CPU time a job (all its threads, over the measured
window), which the machine's other load disturbs less.

With --counts-off, REF's tree keeps no counts of jobs by queue and state:
its L{dispatcher.store._counts.StateCounts} counts no change (C{removed}
and C{count_events} do nothing, so C{commit} has nothing to add), the rest
of the code as it is.  Against C{--against HEAD}, the ratio is then what
keeping the counts costs the no-op rate, before and after in one run, on
the code as it is now; against main's merge base alone, once main holds
the counts, the two daemons would run the same code.

Prints one line of JSON with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if not __package__:  # run as a file: make "bench" importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.harness import LOAD_CORE, ROOT, Processes, Run, Server
from bench.list_filters import shape
from bench.measures import measure_end_to_end
from bench.seed_store import seed

# The answer time both routes are held to.
TARGET_MS = 5.0
# The no-op rate keeping the counts may cost at most (this tree's over
# REF's).
TARGET_RATIO = 0.95
WARM_UP = 20


def export_tree(ref: str, where: Path) -> Path:
    """
    REF's tree (its dispatcher/ and bench/), written out under C{where}.
    """
    if ref == "main":
        ref = subprocess.run(["git", "merge-base", "HEAD", "main"], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout.strip()
    where.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", ref], cwd=ROOT, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(where)], input=archive, check=True)
    return where


# Appended to the exported tree's dispatcher/store/_counts.py by
# --counts-off: the writer tells StateCounts its changes and they are
# dropped, so no row of job_counts is written and nothing is added at a
# commit.  (Its GET /v1/queues answers nothing of the jobs changed since
# it started; the no-op measure never asks.)
COUNTS_OFF = """

def _count_nothing(self, *args, **kwargs):
    return None


StateCounts.removed = _count_nothing
StateCounts.count_events = _count_nothing
"""


def counts_off(tree: Path) -> None:
    """
    Make the tree at C{tree} keep no counts of jobs by queue and state.
    """
    counts = tree / "dispatcher" / "store" / "_counts.py"
    text = counts.read_text()
    assert "class StateCounts" in text and "def count_events" in text, counts
    counts.write_text(text + COUNTS_OFF)


def answer_times(server: Server, path: str, count: int) -> dict[str, Any]:
    """
    The round trips of C{count} C{GET path}s, one after the other.
    """
    client = server.client
    for _ in range(WARM_UP):
        status, _ = client.request("GET", path)
        assert status == 200, (path, status)
    took = []
    for _ in range(count):
        t0 = time.perf_counter()
        status, body = client.request("GET", path)
        took.append((time.perf_counter() - t0) * 1000)
        assert status == 200, (path, status)
    took.sort()
    return {
        "requests": count,
        "median_ms": round(statistics.median(took), 3),
        "p99_ms": round(took[min(count - 1, int(count * 0.99))], 3),
        "max_ms": round(took[-1], 3),
        "bytes": len(body),
        "met": took[min(count - 1, int(count * 0.99))] < TARGET_MS,
    }


def noop_rates(run: Run, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """
    Measure (2): the no-op job rate of this tree's daemon and of REF's.
    """
    other = export_tree(args.against, tmp / "against")
    if args.counts_off:
        counts_off(other)
    rates: dict[str, list[float]] = {"this": [], "against": []}
    # The daemon's CPU a job (all its threads, over the measured
    # window): what the rate costs, less the machine's other load.
    cpu: dict[str, list[float]] = {"this": [], "against": []}
    for n in range(args.rounds):
        order = [("this", None), ("against", other)]
        for label, code in (order[::-1] if n % 2 else order):
            result = measure_end_to_end(
                run, f"noop-{label}-{n}", {"task": "noop"}, args.noop_jobs,
                slots=8, threads=8, code=code)
            rates[label].append(result["jobs_per_s"])
            cpu[label].append(round(
                result["cpu"]["server_process_pct"] / 100 * result["seen_done_s"]
                / args.noop_jobs * 1e6, 1))
    medians = {label: statistics.median(r) for label, r in rates.items()}
    ratio = medians["this"] / medians["against"]
    cpu_medians = {label: statistics.median(c) for label, c in cpu.items()}
    return {
        "jobs": args.noop_jobs,
        "against": args.against + (" (counts off)" if args.counts_off else ""),
        "rounds_jobs_per_s": rates,
        "median_jobs_per_s": medians,
        "this_over_against": round(ratio, 3),
        "rounds_cpu_us_per_job": cpu,
        "median_cpu_us_per_job": cpu_medians,
        "cpu_this_over_against": round(cpu_medians["this"] / cpu_medians["against"], 3),
        "met": ratio >= TARGET_RATIO,
    }


def main(argv: list[str] | None = None) -> int:
    """
    Take both measures; print them as JSON.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="100,000 jobs, 2 rounds of 5,000 no-op jobs")
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--noop-jobs", type=int, default=20_000)
    parser.add_argument("--against", default="main")
    parser.add_argument("--counts-off", action="store_true",
                        help="REF's daemon keeps no counts of jobs by queue and state")
    args = parser.parse_args(argv)
    if args.quick:
        args.jobs, args.rounds, args.noop_jobs = 100_000, 2, 5_000
    os.sched_setaffinity(0, {LOAD_CORE})
    tmp = Path(tempfile.mkdtemp(prefix="dispatcher-bench-metrics-"))
    run = Run(Processes(), tmp)
    results: dict[str, Any] = {"jobs_stored": args.jobs}
    try:
        store = tmp / "stores" / "million.sqlite3"
        store.parent.mkdir(parents=True)
        t0 = time.monotonic()
        seed(str(store), args.jobs, {"task": "noop"})
        shape(str(store))
        results["store_built_s"] = round(time.monotonic() - t0, 1)
        with Server(run.processes, "daemon", tmp / "answers", slots=0, threads=1,
                    store=store) as server:
            results["serving_after_s"] = round(server.ready_s or 0.0, 2)
            for name, path in (("queues", "/v1/queues"), ("metrics", "/metrics")):
                results[name] = answer_times(server, path, args.requests)
        if args.rounds > 0:
            results["noop"] = noop_rates(run, args, tmp)
    finally:
        run.processes.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
