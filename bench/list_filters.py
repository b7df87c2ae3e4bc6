"""
The worst case of each filter of GET /v1/jobs, and of an array's counts,
on a store of a million jobs: the time of one page that matches nothing
(the page that reads the most for the least), read by the store's own
query on one reader connection.

    python -m bench.list_filters PATH [COUNT]

The store is made by bench/seed_store.py (COUNT queued no-op jobs), then
shaped as a long-lived dispatcher's: nine in ten succeeded, ten owners
taking turns, one job in a hundred named, a label on one in ten, and ten
arrays and ten batches of 10,000.  An existing PATH is used as it is.

Prints one line of JSON per measure: its name, the query, and the median
and worst milliseconds of seven pages.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import sys
import time

if not __package__:  # run as a file: make "bench" importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GROUP = 10_000
GROUPS = 10


def shape(path: str) -> None:
    """
    Give the seeded jobs the states, owners, names, labels and groups of
    a store that has been in use.
    """
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("BEGIN")
    conn.execute(
        "UPDATE jobs SET state = CASE WHEN seq % 10 = 0 THEN 'queued' ELSE 'succeeded' END,"
        " owner = 'owner-' || (seq % 10),"
        " name = CASE WHEN seq % 100 = 0 THEN 'name-' || seq ELSE NULL END,"
        " labels = CASE WHEN seq % 10 = 0 THEN '{\"team\":\"t' || (seq % 7) || '\"}'"
        " ELSE '{}' END"
    )
    conn.execute(
        "INSERT INTO job_labels (key, value, seq)"
        " SELECT 'team', 't' || (seq % 7), seq FROM jobs WHERE seq % 10 = 0"
    )
    for g in range(GROUPS):
        first = 1 + g * 3 * GROUP
        conn.execute("UPDATE jobs SET array_id = ?, array_index = seq - ? WHERE seq >= ? AND"
                     " seq < ?", (f"array-{g}", first, first, first + GROUP))
        conn.execute("UPDATE jobs SET batch_id = ? WHERE seq >= ? AND seq < ?",
                     (f"batch-{g}", first + GROUP, first + 2 * GROUP))
    # The counts the writer keeps, made again from the rows changed here.
    from bench.seed_store import recount

    recount(conn)
    conn.execute("COMMIT")
    conn.execute("ANALYZE")
    conn.close()


MEASURES = [
    ("no filter", {}),
    ("state=running (none)", {"states": ("running",)}),
    ("state=running&state=staging (none)", {"states": ("running", "staging")}),
    ("state=succeeded (most)", {"states": ("succeeded",)}),
    ("array=missing", {"array": "missing"}),
    ("batch=missing", {"batch": "missing"}),
    ("name=missing", {"name": "missing"}),
    ("label=team=missing", {"labels": (("team", "missing"),)}),
    ("label=nokey (key alone)", {"labels": (("nokey", None),)}),
    ("owner=nobody", {"owner": "nobody"}),
    ("queue=missing", {"queue": "missing"}),
    ("worker=missing", {"worker": "missing"}),
    ("created_after=future", {"created_after": 4e9}),
    ("created_before=1970", {"created_before": 1.0}),
    ("owner=owner-1&queue=missing", {"owner": "owner-1", "queue": "missing"}),
    ("state=running&state=queued&name=missing", {"states": ("running", "queued"),
                                                  "name": None, "queue": "missing"}),
    ("order=newest&worker=missing", {"newest": True, "worker": "missing"}),
    ("array=array-3&state=failed", {"array": "array-3", "states": ("failed",)}),
]


def measure(path: str) -> list[dict]:
    """
    Time each measure's first page (limit 100), seven times.
    """
    from dispatcher.model._groups import GroupKind
    from dispatcher.model._jobs import JobState
    from dispatcher.store._groups import group
    from dispatcher.store._queries import list_jobs

    conn = sqlite3.connect(path, isolation_level=None)
    out = []

    def timed(name: str, query: str, run) -> None:
        times = []
        for _ in range(7):
            started = time.perf_counter()
            result = run()
            times.append((time.perf_counter() - started) * 1000)
        out.append({"measure": name, "query": query, "median_ms": round(statistics.median(times), 2),
                    "worst_ms": round(max(times), 2), "found": result})

    for name, filters in MEASURES:
        kw = dict(filters)
        states = tuple(JobState(s) for s in kw.pop("states", ()))
        labels = kw.pop("labels", ())
        kw = {k: v for k, v in kw.items() if v is not None}

        def run(states=states, labels=labels, kw=kw):
            jobs, cursor = list_jobs(conn, states, labels, 100, None, {}, **kw)
            return len(jobs)

        timed(name, json.dumps(filters), run)
    for kind, group_id in ((GroupKind.ARRAY, "array-3"), (GroupKind.BATCH, "batch-3")):
        timed(f"{kind.value} of {GROUP}: counts", group_id,
              lambda kind=kind, group_id=group_id: group(conn, kind, group_id).size)
    conn.close()
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("path")
    parser.add_argument("count", type=int, nargs="?", default=1_000_000)
    args = parser.parse_args(argv)
    if not os.path.exists(args.path):
        from bench.seed_store import seed

        print(json.dumps(seed(args.path, args.count, {"task": "noop"})), flush=True)
        shape(args.path)
    for line in measure(args.path):
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
