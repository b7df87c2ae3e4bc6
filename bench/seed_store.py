"""
Build a dispatcher store that already holds COUNT queued jobs: set-up for
the benchmark's large-queue measures, not a measure itself.

    python -m bench.seed_store PATH COUNT [--body JSON]

The schema is the store's own: L{SQLiteJobStore} opens the new file as the
daemon does and runs its migrations.  The first job is validated by the
API's own L{parse_submission} and written by the store's own submit code;
every other job is a copy of that row with its own id (a UUIDv7 from the
dispatcher's L{JobIds}) and its own C{created_at}, inserted in one
transaction with C{executemany} and C{synchronous=OFF}.  A million rows
take seconds this way, against minutes through the API.  The file is left
in WAL mode, as the daemon leaves it.

Prints one line of JSON: how many jobs, how long it took, the file's size.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

if not __package__:  # run as a file: make "bench" importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CHUNK = 50_000


def seed(path: str, count: int, body: dict) -> dict:
    """
    Write C{count} queued copies of the job C{body} into a new store at
    C{path}.
    """
    from bench import tasks as bench_tasks
    from dispatcher.config._ini import QueueConfig, TaskRef
    from dispatcher.model._jobs import JobIds
    from dispatcher.store._sqlite import SQLiteJobStore
    from dispatcher.store._writes import Submit
    from dispatcher.wire._submission import parse_submission

    if os.path.exists(path):
        raise SystemExit(f"seed_store: {path} exists; give a new file")
    started = time.monotonic()
    store = SQLiteJobStore(path, reactor=None)
    # What open() runs on the store's writer thread: create the file and
    # apply every migration.  No reactor is needed for it.
    conn = store._open_in_thread()
    tasks = {
        "noop": TaskRef("noop", "bench.tasks:noop", bench_tasks.noop),
        "block": TaskRef("block", "bench.tasks:block", bench_tasks.block),
    }
    queues = {"default": QueueConfig("default")}
    ids = JobIds()
    now = time.time()
    submission = parse_submission(body, tasks, queues, now, count)
    conn.execute("BEGIN IMMEDIATE")
    store._operations[Submit](conn, [submission.spec], now, [ids.new()], None)
    conn.execute("COMMIT")

    cursor = conn.execute("SELECT * FROM jobs WHERE seq = 1")
    names = [d[0] for d in cursor.description]
    row = dict(zip(names, cursor.fetchone()))
    if row["state"] != "queued":
        raise SystemExit(f"seed_store: the job {body} is {row['state']}, not queued")
    del row["seq"]
    columns = list(row)
    id_at = columns.index("id")
    created_at = columns.index("created_at")
    template = [row[c] for c in columns]
    insert = (
        f"INSERT INTO jobs ({', '.join(columns)}) "
        f"VALUES ({', '.join('?' * len(columns))})"
    )

    # Set-up only: no fsync and a rollback journal (nothing to undo in a
    # new file) make the bulk insert fast; WAL comes back at the end.
    conn.execute("PRAGMA journal_mode=DELETE")
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("PRAGMA cache_size=-262144")
    conn.execute("BEGIN IMMEDIATE")
    done = 1
    while done < count:
        rows = []
        for _ in range(min(CHUNK, count - done)):
            values = list(template)
            values[id_at] = ids.new()
            values[created_at] = time.time()
            rows.append(values)
        conn.executemany(insert, rows)
        done += len(rows)
    recount(conn)
    conn.execute("COMMIT")
    conn.execute("PRAGMA journal_mode=WAL")
    (stored,) = conn.execute("SELECT COUNT(*) FROM jobs WHERE state = 'queued'").fetchone()
    conn.close()
    if stored != count:
        raise SystemExit(f"seed_store: {stored} queued jobs stored, not {count}")
    return {
        "jobs": stored,
        "seconds": round(time.monotonic() - started, 2),
        "bytes": os.path.getsize(path),
    }


def recount(conn) -> None:
    """
    Count the jobs by queue, state and owner again from their rows, as
    migration 12 does, into the table the store's writer keeps them in at
    each change (rows written here by hand bypass the writer); in the
    caller's transaction.  A store of a version before that table is left
    as it is.
    """
    if conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'job_counts'"
    ).fetchone() is None:
        return
    conn.execute("DELETE FROM job_counts")
    conn.execute(
        "INSERT INTO job_counts (queue, state, owner, jobs)"
        " SELECT queue, state, COALESCE(owner, ''), COUNT(*) FROM jobs"
        " GROUP BY queue, state, COALESCE(owner, '')"
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("path")
    parser.add_argument("count", type=int)
    parser.add_argument("--body", default='{"task": "noop"}',
                        help="the job, as a client would POST it (default: a noop task)")
    args = parser.parse_args(argv)
    if args.count < 1:
        raise SystemExit("seed_store: COUNT must be at least 1")
    print(json.dumps(seed(args.path, args.count, json.loads(args.body))), flush=True)


if __name__ == "__main__":
    main()
