"""
The job store on each engine, in one run: the SQLite store (its file in a
temporary directory on the disk) and the PostgreSQL store (a database of
its own on the server at --url), the same workloads through the same
L{IJobStore} calls the dispatcher makes, in alternating rounds; each
figure is the median of its rounds, and PostgreSQL's is given as a ratio
to SQLite's of the same run.

    flock /tmp/bench.lock flock -s /tmp/quiet.lock \\
        .venv/bin/python bench/store_engines.py [--rounds 3] [--url URL]

The workloads:

  - submit: single submissions, one job each, 64 in flight at once (the
    API's connections; the group commit gathers them), durable before
    each answer on both engines.
  - batch: plain batches of 1,000 jobs (POST /v1/jobs/batch's path), 4 in
    flight.
  - noop: no-op jobs' lives without the processes: submitted in plain
    batches, then claimed 64 at a time and each ended as a success by a
    write of its own, 64 ends in flight (what the dispatcher's scheduler
    and its executor ask of the store for a job that does nothing).

The store alone: no HTTP, no daemon, no process per job.  The SQLite
store syncs submissions before their answer and claims and ends within a
second (its default C{sync_interval}); "synced" is the same with every
commit synced (C{sync_interval = 0}); PostgreSQL commits every group with
C{synchronous_commit = on}, which is what "synced" does.  The server, this script and anything
else share the machine's cores: compare the ratios, not the rates.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
import urllib.parse
from typing import Any, Callable

if not __package__:  # run as a file: make "dispatcher" importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import psycopg
from twisted.internet import defer, task

from dispatcher.model._jobs import JobIds, JobSpec, JobState, Offer, Outcome, PlainJobs
from dispatcher.store._postgres import PostgresJobStore
from dispatcher.store._sqlite import SQLiteJobStore

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"

SUBMITS = 4000
SUBMITTERS = 64
BATCH = 1000
BATCHES = 20
BATCHES_IN_FLIGHT = 4
NOOPS = 10000
CLAIM = 64
ENDS_IN_FLIGHT = 64

ids = JobIds()


async def in_flight(count: int, width: int, one: Callable[[int], Any]) -> None:
    """
    Run C{one(i)} for i below C{count}, C{width} at a time.
    """
    numbers = iter(range(count))

    async def lane() -> None:
        for i in numbers:
            await one(i)

    await defer.gatherResults(
        [defer.Deferred.fromCoroutine(lane()) for _ in range(width)], consumeErrors=True
    )


async def submits(store: Any) -> float:
    now = time.time()

    async def one(i: int) -> None:
        await store.submit([JobSpec(command=("true",))], now, [ids.new()])

    began = time.perf_counter()
    await in_flight(SUBMITS, SUBMITTERS, one)
    return SUBMITS / (time.perf_counter() - began)


async def batches(store: Any) -> float:
    now = time.time()

    async def one(i: int) -> None:
        await store.submit_plain(
            PlainJobs([["true"]] * BATCH), now, [ids.new() for _ in range(BATCH)]
        )

    began = time.perf_counter()
    await in_flight(BATCHES, BATCHES_IN_FLIGHT, one)
    return BATCHES * BATCH / (time.perf_counter() - began)


async def noops(store: Any) -> float:
    now = time.time()
    began = time.perf_counter()
    for start in range(0, NOOPS, BATCH):
        size = min(BATCH, NOOPS - start)
        await store.submit_plain(PlainJobs([["true"]] * size), now, [ids.new() for _ in range(size)])
    done = 0
    while done < NOOPS:
        claimed = await store.claim(Offer("local@bench", CLAIM), CLAIM, now, 3600)
        leases = claimed.leases
        if not leases:
            raise RuntimeError(f"nothing left to claim after {done} jobs")
        await defer.gatherResults(
            [store.finish(lease, Outcome(JobState.SUCCEEDED, exit_code=0), now)
             for lease in leases],
            consumeErrors=True,
        )
        done += len(leases)
    return NOOPS / (time.perf_counter() - began)


WORKLOADS = {"submit": submits, "batch": batches, "noop": noops}

# The SQLite store as the daemon runs it (claims and ends synced within a
# second), the same with every commit synced (sync_interval = 0: what
# PostgreSQL's synchronous_commit does), and the PostgreSQL store.
ENGINES = ("sqlite", "sqlite-synced", "postgresql")


def admin(url: str) -> psycopg.Connection:
    return psycopg.connect(url, autocommit=True)


async def one_round(reactor: Any, engine: str, url: str, workload: str) -> float:
    """
    One workload on a new, empty store of C{engine}; jobs a second.
    """
    place = tempfile.mkdtemp(prefix="store-engines-", dir=os.path.expanduser("~"))
    database = None
    try:
        if engine.startswith("sqlite"):
            store: Any = SQLiteJobStore(
                os.path.join(place, "db.sqlite3"), reactor,
                sync_interval=0.0 if engine == "sqlite-synced" else 1.0,
            )
        else:
            database = f"dispatcher_bench_{secrets.token_hex(4)}"
            with admin(url) as conn:
                conn.execute(f'CREATE DATABASE "{database}"')
            store = PostgresJobStore(
                urllib.parse.urlunsplit(urllib.parse.urlsplit(url)._replace(path=f"/{database}")),
                reactor,
            )
        await store.open()
        try:
            return await WORKLOADS[workload](store)
        finally:
            await store.close()
    finally:
        shutil.rmtree(place, ignore_errors=True)
        if database is not None:
            with admin(url) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


async def main(reactor: Any, argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--url", default=DEFAULT_URL,
                        help="a database on the server to make the bench's own from")
    parser.add_argument("--only", default=",".join(WORKLOADS))
    parser.add_argument("--quick", action="store_true",
                        help="a tenth of the jobs: a smoke run, not a measurement")
    args = parser.parse_args(argv)
    if args.quick:
        global SUBMITS, BATCHES, NOOPS
        SUBMITS, BATCHES, NOOPS = SUBMITS // 10, BATCHES // 10, NOOPS // 10
    with admin(args.url) as conn:
        (version,) = conn.execute("SHOW server_version").fetchone()
    print(f"PostgreSQL {version}; {os.cpu_count()} cores; rounds: {args.rounds}")
    print(
        f"{'workload':<8} {'SQLite':>9} {'synced':>9} {'PostgreSQL':>11}"
        f" {'PG/SQLite':>10} {'PG/synced':>10}   (jobs a second, medians)"
    )
    for workload in args.only.split(","):
        figures: dict[str, list[float]] = {engine: [] for engine in ENGINES}
        for _ in range(args.rounds):
            # Alternating, so that a change of the machine's load meets all.
            for engine in ENGINES:
                figures[engine].append(await one_round(reactor, engine, args.url, workload))
        sqlite, synced, postgresql = (statistics.median(figures[e]) for e in ENGINES)
        print(
            f"{workload:<8} {sqlite:>9,.0f} {synced:>9,.0f} {postgresql:>11,.0f}"
            f" {postgresql / sqlite:>10.2f} {postgresql / synced:>10.2f}"
        )
        sys.stdout.flush()


if __name__ == "__main__":
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, sys.argv[1:])))
