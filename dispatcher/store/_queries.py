"""
The SQLite store's reads: a job, a page of jobs, counts by state and by
queue, the queues nobody configured, the next time a pending job is due.
Each is a function of a connection (a reader's, inside its read
transaction, or the writer's) and the read's arguments.
"""

from __future__ import annotations

import sqlite3
from typing import Any, Mapping, Optional, Sequence

import attrs

from dispatcher.model._claims import queues_at_limit
from dispatcher.model._limits import MAX_LIST_EXAMINED
from dispatcher.model._jobs import Attempt, Job, JobState, UnknownJob
from dispatcher.store._dialect import fragment
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


def _has_json_functions() -> bool:
    # Built in from SQLite 3.38; before, and in a build that leaves them
    # out, only if compiled in.
    conn = sqlite3.connect(":memory:")
    try:
        conn.execute("SELECT json_extract(value, '$[0]') FROM json_each('[[1]]')")
    except sqlite3.OperationalError:
        return False
    finally:
        conn.close()
    return True


# Whether this SQLite has its JSON functions (a plain batch's rows are read
# with them, store/_submissions.py; a label key is looked for in a row's
# labels with them).
JSON_ROWS = _has_json_functions()


# Whether a job's labels (its row's JSON) have a key.
_HAS_LABEL_KEY = fragment(
    "EXISTS (SELECT 1 FROM json_each(jobs.labels) WHERE key = ?)",
    "jsonb_exists(jobs.labels::jsonb, ?)",
)


@attrs.frozen
class _Source:
    """
    Where a page's jobs come from, in submission order: the seqs of one
    index's entries that match (C{sql} and its C{params}, with the
    placeholder C{{after}} for the cursor's condition), or of several (C{parts}, merged: the states of
    C{state=a&state=b}).
    """

    sql: str = ""
    params: tuple[Any, ...] = ()
    parts: tuple["_Source", ...] = ()


def _source_sql(
    source: _Source, cursor: Optional[int], newest: bool, rows: int
) -> tuple[str, list[Any]]:
    """
    The SELECT of the first C{rows} seqs of C{source} past C{cursor}, in
    the page's order.
    """
    order = "DESC" if newest else "ASC"
    if source.parts:
        arms = []
        params: list[Any] = []
        for part in source.parts:
            sql, more = _source_sql(part, cursor, newest, rows)
            arms.append(f"SELECT seq FROM ({sql}) AS part")
            params.extend(more)
        # Each part read no further than the page's rows: their first
        # rows, merged, are the first rows of all of them.
        return (
            f"SELECT seq FROM ({' UNION ALL '.join(arms)}) AS parts ORDER BY seq {order} LIMIT ?",
            params + [rows],
        )
    after = ""
    params = list(source.params)
    if cursor is not None:
        after = f" AND seq {'<' if newest else '>'} ?"
        params.append(cursor)
    return (
        source.sql.format(after=after) + f" ORDER BY seq {order} LIMIT ?",
        params + [rows],
    )


# That a row of jobs is a member of the row of batches beside it: a job
# of its range of numbers (migration 14) whose batch_id is its.
BATCH_MEMBER = (
    "jobs.seq BETWEEN batches.first_seq AND batches.last_seq"
    " AND jobs.batch_id = batches.batch"
)

# The seqs of a batch's members (one parameter, its id).
_BATCH_SOURCE = (
    "SELECT jobs.seq AS seq FROM batches CROSS JOIN jobs WHERE batches.batch = ?"
    f" AND {BATCH_MEMBER}{{after}}"
)


def _index_source(index: Optional[str], where: str, *params: Any) -> _Source:
    """
    The seqs of the jobs that match C{where}, read along C{index} (none:
    in the table's order).
    """
    indexed = f" INDEXED BY {index}" if index else ""
    return _Source(f"SELECT seq FROM jobs{indexed} WHERE {where}{{after}}", params)


def list_jobs(
    conn: sqlite3.Connection,
    states: tuple[JobState, ...],
    labels: tuple[tuple[str, Optional[str]], ...],
    limit: int,
    cursor: Optional[int],
    limits: Mapping[str, int],
    owner: Optional[str] = None,
    array: Optional[str] = None,
    batch: Optional[str] = None,
    name: Optional[str] = None,
    queue: Optional[str] = None,
    worker: Optional[str] = None,
    created_after: Optional[float] = None,
    created_before: Optional[float] = None,
    newest: bool = False,
    examine: int = MAX_LIST_EXAMINED,
) -> tuple[list[Job], Optional[int]]:
    """
    A page of at most C{limit} jobs past the cursor C{cursor}, in the
    order they were submitted (C{newest}: the other way), that match every
    filter given: a state among C{states}, every label C{labels} names (a
    key, or a key and its value), the owner, the array, the batch, the
    name, the queue, the holder of its latest attempt (C{worker}), created
    after and before; and the cursor of the next page, if there is one.

    The jobs are read along one index (the most selective filter's: an
    array's, a batch's, a name's, a label's, an owner's, the states'; else
    submission order) and the other filters are checked on the rows it
    gives, at most C{examine} of them for one page.  A page whose other
    filters match few of those rows may so end short, even empty, with a
    cursor to go on from: no page costs more than C{examine} rows,
    whatever matches.
    """
    # Each filter: the source its index gives (or None), and its condition
    # on a row; in the order a source is chosen, the most selective first.
    filters: list[tuple[Optional[_Source], str, tuple[Any, ...]]] = []
    if array is not None:
        filters.append((_index_source("jobs_array", "array_id = ?", array),
                        "array_id = ?", (array,)))
    if batch is not None:
        # The batch's range of sequence numbers (migration 14), read by
        # the table's key.
        filters.append((_Source(_BATCH_SOURCE, (batch,)), "batch_id = ?", (batch,)))
    if name is not None:
        filters.append((_index_source("jobs_name", "name = ?", name), "name = ?", (name,)))
    for key, value in labels:
        if value is not None:
            # Read along job_labels' key (key, value, seq), in seq order.
            filters.append((
                _Source("SELECT seq FROM job_labels WHERE key = ? AND value = ?{after}",
                        (key, value)),
                "EXISTS (SELECT 1 FROM job_labels WHERE key = ? AND value = ?"
                " AND seq = jobs.seq)",
                (key, value),
            ))
        elif JSON_ROWS:
            # A key alone: job_labels is ordered by key and value, so
            # looking a key up for one job there reads every job's entry
            # of that key; the row's own labels are at hand.
            filters.append((None, _HAS_LABEL_KEY, (key,)))
        else:
            filters.append(
                (None, "EXISTS (SELECT 1 FROM job_labels WHERE key = ? AND seq = jobs.seq)",
                 (key,))
            )
    if owner is not None:
        filters.append((_index_source("jobs_owner", "owner = ?", owner), "owner = ?", (owner,)))
    wanted = tuple(dict.fromkeys(states))
    if len(wanted) == 1:
        filters.append((_index_source("jobs_state", "state = ?", wanted[0].value),
                        "state = ?", (wanted[0].value,)))
    elif 1 < len(wanted) < len(JobState):
        filters.append((
            _Source(parts=tuple(
                _index_source("jobs_state", "state = ?", state.value) for state in wanted
            )),
            f"state IN ({', '.join('?' * len(wanted))})",
            tuple(state.value for state in wanted),
        ))
    for given, sql, value in (
        (queue, "queue = ?", queue),
        (created_after, "created_at > ?", created_after),
        (created_before, "created_at < ?", created_before),
        (worker, "(SELECT holder FROM attempts WHERE job_id = jobs.id"
                 " ORDER BY number DESC LIMIT 1) = ?", worker),
    ):
        if given is not None:
            filters.append((None, sql, (value,)))
    # The first filter with an index is read along; the others are
    # checked on the rows it gives.
    chosen = next((f for f in filters if f[0] is not None), None)
    others = [f for f in filters if f is not chosen]
    residual = [sql for _, sql, _ in others]
    params = [value for _, _, values in others for value in values]
    source = chosen[0] if chosen is not None else _index_source(None, "1 = 1")
    order = "DESC" if newest else "ASC"
    window = examine if residual else limit + 1
    source_sql, source_params = _source_sql(source, cursor, newest, window)
    where = " AND ".join([f"seq IN ({source_sql})", *residual])
    rows = conn.execute(
        f"SELECT {VIEW_COLUMNS} FROM jobs WHERE {where} ORDER BY seq {order} LIMIT ?",
        [*source_params, *params, limit + 1],
    ).fetchall()
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = rows[-1][VIEW_SEQ] if more else None
    if not more and residual:
        # The page ends short: the rows examined may not be all there are.
        # The next page goes on from the last one examined.
        sql, more_params = _source_sql(source, cursor, newest, examine)
        last = conn.execute(
            f"SELECT seq FROM ({sql}) AS page ORDER BY seq {order} LIMIT 1 OFFSET ?",
            [*more_params, examine - 1],
        ).fetchone()
        if last is not None:
            next_cursor = last[0]
    attempts = _attempts_of(conn, [row[VIEW_ID] for row in rows])
    full = _full_queues(conn, limits)
    jobs = [job_from_row(row, tuple(attempts[row[VIEW_ID]]), full) for row in rows]
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

# The most ids in one IN (...) list of cancels_asked (SQLite allows 32,766
# variables; a shorter list keeps each statement small).
_CANCEL_CHUNK = 500


def cancels_asked(conn: sqlite3.Connection, job_ids: Sequence[str]) -> list[str]:
    """
    Of C{job_ids} (jobs a holder of this dispatcher runs), those whose
    cancel a client asked for while they ran, in the order given.
    """
    asked: set[str] = set()
    for start in range(0, len(job_ids), _CANCEL_CHUNK):
        chunk = list(job_ids[start:start + _CANCEL_CHUNK])
        asked.update(
            job_id
            for (job_id,) in conn.execute(
                "SELECT id FROM jobs WHERE cancel_requested = 1"
                f" AND id IN ({','.join('?' * len(chunk))})",
                chunk,
            )
        )
    return [job_id for job_id in job_ids if job_id in asked]
