"""
What keeping the counts of jobs by queue and state costs the store's
writer, per no-op job: the writer's own code (as the store keeps them,
dispatcher/store/_counts.py) against SQLite triggers on the jobs table
that keep the same table, and against no counting at all (main's writer
before them).

    .venv/bin/python bench/counts_cost.py [--rounds N] [--jobs N] [--group N]

Each round builds a new store and runs the writer's own commits
(L{dispatcher.store._writer.GroupWriter}'s, on this thread, with its
events, its mark and its savepoint-free group path) for JOBS no-op jobs:
groups of GROUP single-job submissions, one claim of GROUP, and GROUP ends,
as a daemon under load commits them.  It measures the thread's CPU time a
job.  The three ways alternate round by round; the medians are printed as
one line of JSON.  Run it under C{flock /tmp/bench.lock}.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

if not __package__:  # run as a file: make "bench" importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet.task import Clock

from dispatcher.model._jobs import JobIds, JobState, Offer, Outcome, PlainJobs
from dispatcher.store import _writes as writes
from dispatcher.store._events import record_events
from dispatcher.store._sqlite import SQLiteJobStore
from dispatcher.store._stored import plain_stored

# Triggers that keep the same table as the writer does (the way the
# webhook outbox's are written, store/_schema.py).
TRIGGERS = (
    """
    CREATE TRIGGER job_counts_made AFTER INSERT ON jobs BEGIN
        INSERT INTO job_counts (queue, state, owner, jobs)
        VALUES (NEW.queue, NEW.state, COALESCE(NEW.owner, ''), 1)
        ON CONFLICT (queue, state, owner) DO UPDATE SET jobs = jobs + 1;
    END
    """,
    """
    CREATE TRIGGER job_counts_changed AFTER UPDATE OF state ON jobs
    WHEN NEW.state IS NOT OLD.state BEGIN
        UPDATE job_counts SET jobs = jobs - 1
        WHERE queue = OLD.queue AND state = OLD.state AND owner = COALESCE(OLD.owner, '');
        INSERT INTO job_counts (queue, state, owner, jobs)
        VALUES (NEW.queue, NEW.state, COALESCE(NEW.owner, ''), 1)
        ON CONFLICT (queue, state, owner) DO UPDATE SET jobs = jobs + 1;
    END
    """,
    """
    CREATE TRIGGER job_counts_removed AFTER DELETE ON jobs BEGIN
        UPDATE job_counts SET jobs = jobs - 1
        WHERE queue = OLD.queue AND state = OLD.state AND owner = COALESCE(OLD.owner, '');
    END
    """,
)

WAYS = ("none", "writer", "triggers")


def one_round(way: str, jobs: int, group: int) -> float:
    """
    The writer's CPU time a job, in microseconds, for C{jobs} no-op jobs
    with the counts kept C{way}.
    """
    place = tempfile.mkdtemp(prefix="counts-cost-")
    try:
        store = SQLiteJobStore(os.path.join(place, "s.sqlite3"), reactor=None, clock=Clock())
        conn = store._open_in_thread()
        writer = store._writer
        writer.connection = conn
        if way != "writer":
            # Main's writer: events alone, the owners' counts alone.
            writer._record = functools.partial(record_events, store._state)
            writer._journal = store._state.owners
        if way == "triggers":
            for statement in TRIGGERS:
                conn.execute(statement)
        ids = JobIds()
        offer = Offer("local", group)
        now = time.time()
        spent = 0.0
        for _ in range(jobs // group):
            plain = PlainJobs([("noop", [], {})])
            stored = plain_stored(plain)
            submissions = [
                writes.SubmitPlain(plain, now, [ids.new()], None, stored, "alice")
                for _ in range(group)
            ]
            started = time.thread_time()
            writer._commit(submissions, False)
            ((_, claimed),), _ = writer._commit(
                [writes.Claim(offer, group, offer.resources, now, 60.0)], False
            )
            ends = [writes.Finish(lease, Outcome(JobState.SUCCEEDED), now)
                    for lease in claimed.leases]
            writer._commit(ends, False)
            spent += time.thread_time() - started
        conn.close()
        return spent / jobs * 1e6
    finally:
        shutil.rmtree(place, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """
    Run the rounds; print the medians as JSON.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--group", type=int, default=20)
    args = parser.parse_args(argv)
    for way in WAYS:  # warm up
        one_round(way, args.group * 5, args.group)
    found: dict[str, list[float]] = {way: [] for way in WAYS}
    for _ in range(args.rounds):
        for way in WAYS:
            found[way].append(one_round(way, args.jobs, args.group))
    medians = {way: round(statistics.median(v), 1) for way, v in found.items()}
    print(json.dumps({
        "us_per_job": medians,
        "writer_over_none": round(medians["writer"] / medians["none"], 3),
        "triggers_over_none": round(medians["triggers"] / medians["none"], 3),
        "rounds": args.rounds, "jobs": args.jobs, "group": args.group,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
