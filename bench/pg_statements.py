"""
Where a no-op job's time goes inside PostgreSQL, statement by statement:
a diagnostic for docs/scaling.md, not a measure (logging every statement
slows what it looks at, so its rate is not a figure to quote).

    flock /tmp/bench.lock .venv/bin/python -m bench.pg_statements \\
        [--jobs 5000] [--slots 8] [--log /var/log/postgresql/postgresql-15-main.log]

C{pg_stat_statements} would say the same without the log, but it must be
preloaded when the server starts, and a shared server is not restarted for
a benchmark.  Instead the run's own database (made, given the schema, and
dropped here) gets C{log_min_duration_statement = 0} (C{ALTER DATABASE}: its
sessions alone, no restart), one dispatcher runs (b'')'s no-op jobs on it
(L{bench.pg_measures.measure_noop}), and the server's log (readable by root;
its C{log_line_prefix} must name the database, C{%d}, as Debian's does) is
read from where it ended before the run: each statement's server time
(its parse, bind and execute, as the extended protocol logs them), summed
by statement, the largest first, in ms a job.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

from bench.harness import LOAD_CORE, SERVER_CORE, BenchError, Processes, Run
from bench.pg_measures import bench_url, measure_noop, run_database
from bench.pg_costs import admin_connection

DEFAULT_LOG = "/var/log/postgresql/postgresql-15-main.log"
# A line that starts an entry of the log: its time (Debian's prefix).
ENTRY = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")
DURATION = re.compile(
    r"@(?P<db>\S+) LOG:  duration: (?P<ms>[0-9.]+) ms  "
    r"(?:(?P<phase>statement|parse|bind|execute)[^:]*): (?P<text>.*)")


def statements(log: Path, start: int, database: str) -> dict[tuple[str, str], list[float]]:
    """
    The durations the log holds after byte C{start} for C{database}'s
    statements, by phase and statement text (whitespace folded).
    """
    entries: list[str] = []
    with open(log, encoding="utf-8", errors="replace") as f:
        f.seek(start)
        for line in f:
            if ENTRY.match(line) or not entries:
                entries.append(line.rstrip("\n"))
            else:
                entries[-1] += " " + line.strip()
    found: dict[tuple[str, str], list[float]] = {}
    for entry in entries:
        m = DURATION.search(entry)
        if m is None or m["db"] != database:
            continue
        text = " ".join(m["text"].split())
        found.setdefault((m["phase"], text), []).append(float(m["ms"]))
    return found


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--log", type=Path, default=Path(DEFAULT_LOG))
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args(argv)
    if not os.access(args.log, os.R_OK):
        print(f"bench: cannot read the server's log {args.log} (--log; run as root)",
              file=sys.stderr)
        return 2
    os.sched_setaffinity(0, {LOAD_CORE})
    url = bench_url()
    tmp = Path(tempfile.mkdtemp(prefix="dispatcher-bench-statements-"))
    run = Run(Processes(), tmp)
    try:
        with run_database(url) as (name, database_url):
            with admin_connection(url) as conn:
                conn.execute(f'ALTER DATABASE "{name}" SET log_min_duration_statement = 0')
            start = args.log.stat().st_size
            result = measure_noop(run, "statements", args.jobs, 1000, 4, database_url,
                                  (SERVER_CORE,), slots=args.slots)
            found = statements(args.log, start, name)
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    finally:
        run.processes.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    total = sum(sum(v) for v in found.values())
    print(f"{args.jobs:,} no-op jobs, slots {args.slots}, {result['jobs_per_s']:,.0f} jobs/s "
          f"with every statement logged; the server's time in statements: "
          f"{1000 * total / args.jobs:.1f} µs a job, in {sum(len(v) for v in found.values()):,} "
          "phases")
    print(f"{'µs/job':>8} {'calls/job':>9} {'µs/call':>8}  phase: statement")
    for (phase, text), times in sorted(found.items(), key=lambda x: -sum(x[1]))[:args.top]:
        print(f"{1000 * sum(times) / args.jobs:8.1f} {len(times) / args.jobs:9.3f} "
              f"{1000 * sum(times) / len(times):8.1f}  {phase}: {text[:160]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
