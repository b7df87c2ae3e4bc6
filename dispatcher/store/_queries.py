"""
The SQLite store's reads: a job, a page of jobs, counts by state and by
queue, the queues nobody configured, the next time a pending job is due.
Each is a function of a connection (a reader's, inside its read
transaction, or the writer's) and the read's arguments.
"""

from __future__ import annotations

import sqlite3
from typing import Any, Mapping, Optional, Sequence

from dispatcher.model._claims import queues_at_limit
from dispatcher.model._jobs import Attempt, Job, JobState, UnknownJob
from dispatcher.store._rows import (
    ATTEMPT_COLUMNS,
    attempt_from_row,
    VIEW_COLUMNS,
    VIEW_ID,
    VIEW_SEQ,
    VIEW_STATE,
    job_from_row,
)


def _full_queues(conn: sqlite3.Connection, limits: Mapping[str, int]) -> dict[str, int]:
    limited = {q: n for q, n in limits.items() if n}
    if not limited:
        return {}
    return queues_at_limit(limited, running_by_queue(conn))


def running_by_queue(conn: sqlite3.Connection) -> dict[str, int]:
    """
    How many jobs each queue has staging or running: what counts against
    its limit.
    """
    return dict(
        conn.execute(
            "SELECT queue, COUNT(*) FROM jobs"
            " WHERE state IN ('staging', 'running') GROUP BY queue"
        ).fetchall()
    )


def _attempts_of(
    conn: sqlite3.Connection, job_ids: Sequence[str]
) -> dict[str, list[Attempt]]:
    found: dict[str, list[Attempt]] = {job_id: [] for job_id in job_ids}
    if not job_ids:
        return found
    marks = ",".join("?" * len(job_ids))
    for row in conn.execute(
        f"SELECT job_id, {ATTEMPT_COLUMNS}"
        f" FROM attempts WHERE job_id IN ({marks}) ORDER BY job_id, number",
        tuple(job_ids),
    ):
        found[row[0]].append(attempt_from_row(row[1:]))
    return found


def get_job(
    conn: sqlite3.Connection, job_id: str, limits: Mapping[str, int] = {}
) -> Job:
    """
    The job C{job_id}, with its attempts; L{UnknownJob} if there is none.
    C{limits} are the queues' limits, for the wait reason of a queued job
    whose queue is full.
    """
    row = conn.execute(
        f"SELECT {VIEW_COLUMNS} FROM jobs WHERE id = ?", (job_id,)
    ).fetchone()
    if row is None:
        raise UnknownJob(job_id)
    full = _full_queues(conn, limits) if row[VIEW_STATE] == JobState.QUEUED.value else {}
    return job_from_row(row, tuple(_attempts_of(conn, [job_id])[job_id]), full)


def list_jobs(
    conn: sqlite3.Connection,
    state: Optional[JobState],
    labels: tuple[tuple[str, Optional[str]], ...],
    limit: int,
    cursor: Optional[int],
    limits: Mapping[str, int],
    owner: Optional[str] = None,
) -> tuple[list[Job], Optional[int]]:
    """
    A page of at most C{limit} jobs after the cursor C{cursor}, in the
    order they were submitted, of the state C{state}, with every label
    C{labels} names (a key, or a key and its value) and of the owner
    C{owner} (if given); and the cursor of the next page, if there is one.
    """
    where = ["seq > ?"]
    params: list[Any] = [cursor or 0]
    if owner is not None:
        # Read along jobs_owner (owner, seq): the owner's jobs in order.
        where.append("owner = ?")
        params.append(owner)
    if state is not None:
        where.append("state = ?")
        params.append(state.value)
    for key, value in labels:
        if value is None:
            where.append("seq IN (SELECT seq FROM job_labels WHERE key = ?)")
            params.append(key)
        else:
            where.append(
                "seq IN (SELECT seq FROM job_labels WHERE key = ? AND value = ?)"
            )
            params.extend((key, value))
    params.append(limit + 1)
    rows = conn.execute(
        f"SELECT {VIEW_COLUMNS} FROM jobs WHERE {' AND '.join(where)}"
        " ORDER BY seq LIMIT ?",
        params,
    ).fetchall()
    more = len(rows) > limit
    rows = rows[:limit]
    attempts = _attempts_of(conn, [row[VIEW_ID] for row in rows])
    full = _full_queues(conn, limits)
    jobs = [job_from_row(row, tuple(attempts[row[VIEW_ID]]), full) for row in rows]
    next_cursor = rows[-1][VIEW_SEQ] if more else None
    return jobs, next_cursor


# Ids looked up at once by L{owned}: under SQLite's smallest limit of
# bound values (999 before 3.32).
_IDS_AT_ONCE = 500


def owned(conn: sqlite3.Connection, job_ids: Sequence[str], owner: str) -> frozenset[str]:
    """
    Those of C{job_ids} that C{owner} owns.
    """
    found: set[str] = set()
    for start in range(0, len(job_ids), _IDS_AT_ONCE):
        chunk = job_ids[start:start + _IDS_AT_ONCE]
        found.update(
            row[0]
            for row in conn.execute(
                f"SELECT id FROM jobs WHERE owner = ? AND id IN ({','.join('?' * len(chunk))})",
                (owner, *chunk),
            )
        )
    return frozenset(found)


def count_by_state(conn: sqlite3.Connection) -> dict[JobState, int]:
    """
    How many jobs are in each state.
    """
    counts = {state: 0 for state in JobState}
    for state, count in conn.execute(
        "SELECT state, COUNT(*) FROM jobs GROUP BY state"
    ):
        counts[JobState(state)] = count
    return counts


def queue_counts(
    conn: sqlite3.Connection, queues: Sequence[str], owner: Optional[str] = None
) -> dict[str, dict[JobState, int]]:
    """
    C{{queue: {state: count}}} for every queue of C{queues}, and for any
    other queue that holds jobs; only C{owner}'s jobs, if it is given.
    """
    counts = {q: {state: 0 for state in JobState} for q in queues}
    if owner is None:
        rows = conn.execute("SELECT queue, state, COUNT(*) FROM jobs GROUP BY queue, state")
    else:
        rows = conn.execute(
            "SELECT queue, state, COUNT(*) FROM jobs WHERE owner = ? GROUP BY queue, state",
            (owner,),
        )
    for queue, state, count in rows:
        counts.setdefault(queue, {s: 0 for s in JobState})[JobState(state)] = count
    return counts


def unconfigured_queues(
    conn: sqlite3.Connection, configured: frozenset[str]
) -> dict[str, int]:
    """
    C{{queue: queued jobs}} for the queues not in C{configured} that hold
    queued jobs: it seeks from queue name to queue name along the queued
    index, so a million queued jobs cost what a handful of queues do.
    """
    found: dict[str, int] = {}
    row = conn.execute(
        "SELECT MIN(queue) FROM jobs INDEXED BY jobs_queued WHERE state = 'queued'"
    ).fetchone()
    while row is not None and row[0] is not None:
        queue = row[0]
        if queue not in configured:
            (found[queue],) = conn.execute(
                "SELECT COUNT(*) FROM jobs INDEXED BY jobs_queued"
                " WHERE state = 'queued' AND queue = ?",
                (queue,),
            ).fetchone()
        row = conn.execute(
            "SELECT MIN(queue) FROM jobs INDEXED BY jobs_queued"
            " WHERE state = 'queued' AND queue > ?",
            (queue,),
        ).fetchone()
    return found


def next_due(conn: sqlite3.Connection) -> Optional[float]:
    """
    The earliest time a pending job becomes due, or C{None}.
    """
    (due,) = conn.execute(
        "SELECT MIN(not_before) FROM jobs INDEXED BY jobs_due"
        " WHERE state = 'pending' AND waiting_on = 0"
    ).fetchone()
    return due