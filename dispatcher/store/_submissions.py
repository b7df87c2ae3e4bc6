"""
The SQLite store's submissions: new jobs from their specs (L{submit}),
plain jobs (L{submit_plain}), a run of plain submissions stored at once
(L{submit_together}), and the idempotency keys that make a repeated
request answer what the first made.

Every new job is stored with its owner, the name of the principal that
submitted it: one more value bound in the statement that inserts it.  An
idempotency key is its owner's own (two owners' same key makes each its
own jobs).
"""

from __future__ import annotations

import functools
import itertools
import operator
import sqlite3
from typing import TYPE_CHECKING, Any, Iterable, Optional, Sequence

import orjson

from dispatcher.model._jobs import Job, JobSpec, JobState, PlainJobs
from dispatcher.model._limits import MAX_DEPENDENCY_LINKS
from dispatcher.store._dialect import differs
from dispatcher.store._queries import JSON_ROWS, get_job
from dispatcher.store._removal import MAX_SEQ
from dispatcher.store._results import (
    Change,
    IdempotencyConflict,
    IdempotencyKey,
    Submitted,
    SubmittedIds,
    TooManyUnfinished,
    Written,
)
from dispatcher.store._rows import INSERTED_COLUMNS, new_job
from dispatcher.store._schema import install_webhook_triggers
from dispatcher.store._stored import decode_stored, encode_stored
from dispatcher.store._waits import QUEUED_REASON, resolve_dependencies, waiting
from dispatcher.store._writer import Replay
from dispatcher.store._writes import Submit, SubmitPlain

if TYPE_CHECKING:
    from dispatcher.store._operations import WriterState


_NO_VALUES = (None,) * len(INSERTED_COLUMNS)


@functools.lru_cache(maxsize=64)
def _insert_job_statement(present: tuple[bool, ...]) -> str:
    columns = list(itertools.compress(INSERTED_COLUMNS, present))
    return (
        f"INSERT INTO jobs ({', '.join(columns)})"
        f" VALUES ({', '.join('?' * len(columns))})"
    )


def _insert_jobs(conn: sqlite3.Connection, rows: Sequence[tuple[Any, ...]]) -> None:
    """
    Insert job rows (tuples in L{INSERTED_COLUMNS} order), one C{executemany}
    for all the rows that have values in the same columns.

    Each INSERT names only the columns that have a value; the others
    default to NULL.  Python 3.11's sqlite3 binds a None about ten times
    slower than a number (it looks for an adapter first, and fails twice),
    and a plain job has eight.
    """
    shapes: dict[tuple[bool, ...], list[tuple[Any, ...]]] = {}
    for row in rows:
        present = tuple(map(operator.is_not, row, _NO_VALUES))
        shapes.setdefault(present, []).append(tuple(itertools.compress(row, present)))
    for present, values in shapes.items():
        conn.executemany(_insert_job_statement(present), values)


_INSERT_LABEL = "INSERT INTO job_labels (key, value, seq) VALUES (?, ?, ?)"


def _add_job(
    rows: list[tuple[Any, ...]],
    label_rows: list[tuple[str, str, int]],
    seq: int,
    job_id: str,
    state: JobState,
    spec: JobSpec,
    now: float,
    wait_reason: Optional[str],
    unmet: int = 0,
    finished_at: Optional[float] = None,
    error: Optional[str] = None,
    cancelled_by: Optional[str] = None,
    owner: Optional[str] = None,
) -> Job:
    """
    Add a new job's row (and its labels' rows) to those to insert, and
    return the job.
    """
    row, job = new_job(
        spec,
        seq=seq,
        id=job_id,
        state=state,
        created_at=now,
        finished_at=finished_at,
        error=error,
        wait_reason=wait_reason,
        waiting_on=unmet,
        cancelled_by=cancelled_by,
        owner=owner,
    )
    rows.append(row)
    if spec.labels:
        label_rows.extend((k, v, seq) for k, v in spec.labels.items())
    return job


# What a plain job's row holds besides its number, id and stored spec: the
# same for all the jobs of a request (the L{PlainJobs} fields have columns
# of their names, and the owner is the request's), and a timeout and a
# batch id only where their queue has one and they were sent as a batch.
_PLAIN_SHARED = (
    "state", "labels", "created_at", "wait_reason", "priority", "queue", "max_attempts",
    "retry_delay", "owner",
)


def _plain_insert(timeout: bool, batch: bool, json_rows: bool) -> str:
    """
    The statement that inserts plain jobs: from a JSON array of [id, stored
    spec] pairs (?2), numbered after ?1, or one row at a time; the columns
    all share come next (?3 on).
    """
    shared = _PLAIN_SHARED + ("timeout",) * timeout + ("batch_id",) * batch
    columns = ", ".join(("seq", "id", "spec", *shared))
    if json_rows:
        values = ", ".join(f"?{3 + i}" for i in range(len(shared)))
        return differs(
            f"INSERT INTO jobs ({columns})"
            " SELECT ?1 + 1 + key, json_extract(value, '$[0]'), json_extract(value, '$[1]'),"
            f" {values} FROM json_each(?2)",
            # The same, in the order the values are given: the first
            # number, the JSON, the shared columns.
            f"WITH given AS (SELECT %s::bigint AS base, %s::jsonb AS pairs)"
            f" INSERT INTO jobs ({columns})"
            " SELECT given.base + t.n, t.pair->>0, t.pair->>1,"
            f" {', '.join(['%s'] * len(shared))}"
            " FROM given, jsonb_array_elements(given.pairs) WITH ORDINALITY AS t(pair, n)",
        )
    return f"INSERT INTO jobs ({columns}) VALUES ({', '.join('?' * (3 + len(shared)))})"


# By whether the jobs have a timeout, a batch id, then whether rows are
# read from JSON.
_INSERT_PLAIN = {
    (timeout, batch, json_rows): _plain_insert(timeout, batch, json_rows)
    for timeout in (False, True)
    for batch in (False, True)
    for json_rows in (False, True)
}


def _add_plain_jobs(
    conn: sqlite3.Connection,
    seq: int,
    jobs: PlainJobs,
    now: float,
    ids: Sequence[str],
    stored: Sequence[str],
    owner: Optional[str],
) -> Written:
    """
    Insert L{PlainJobs}, queued, numbered after C{seq}, owned by C{owner},
    with their specs' C{stored} texts: one statement that reads each job's
    id and stored spec from one JSON array, the other columns being the
    same for all (where SQLite has its JSON functions, L{JSON_ROWS}; else
    one C{executemany} of rows).
    """
    timeout = jobs.timeout is not None
    batch = jobs.batch_id is not None
    # In _PLAIN_SHARED order.
    shared: tuple[Any, ...] = (
        JobState.QUEUED.value, "{}", now, QUEUED_REASON, jobs.priority, jobs.queue,
        jobs.max_attempts, jobs.retry_delay, owner,
    )
    if timeout:
        shared += (jobs.timeout,)
    if batch:
        shared += (jobs.batch_id,)
    if JSON_ROWS:
        # Binding a row's eleven values from Python was a third of the
        # writer's time for a plain batch; SQLite reads the JSON faster.
        pairs = orjson.dumps(list(zip(ids, stored))).decode()
        conn.execute(_INSERT_PLAIN[timeout, batch, True], (seq, pairs, *shared))
    else:
        rows = [
            (number, job_id, text, *shared)
            for number, job_id, text in zip(itertools.count(seq + 1), ids, stored)
        ]
        conn.executemany(_INSERT_PLAIN[timeout, batch, False], rows)
    if batch:
        conn.execute(_INSERT_BATCH, (jobs.batch_id, seq + 1, seq + len(ids)))
    return Written(
        SubmittedIds(ids), tuple(zip(ids, itertools.repeat(JobState.QUEUED)))
    )


# A batch's range of sequence numbers, which finds its members (migration
# 14, dispatcher/store/_groups.py).  A batch is one request's jobs, and so
# one write's, but a range a write finds kept already grows to hold both.
_INSERT_BATCH = differs(
    "INSERT INTO batches (batch, first_seq, last_seq) VALUES (?, ?, ?)"
    " ON CONFLICT (batch) DO UPDATE SET first_seq = MIN(first_seq, excluded.first_seq),"
    " last_seq = MAX(last_seq, excluded.last_seq)",
    "INSERT INTO batches (batch, first_seq, last_seq) VALUES (%s, %s, %s)"
    " ON CONFLICT (batch) DO UPDATE SET"
    " first_seq = LEAST(batches.first_seq, excluded.first_seq),"
    " last_seq = GREATEST(batches.last_seq, excluded.last_seq)",
)


def _record_batches(conn: sqlite3.Connection, jobs: Iterable[tuple[int, JobSpec]]) -> None:
    """
    Keep the range of sequence numbers of each batch among C{jobs} (each a
    job's number and spec), if any: a batch's jobs are all of one write.
    """
    ranges: dict[str, tuple[int, int]] = {}
    for seq, spec in jobs:
        batch_id = spec.batch_id
        if batch_id is not None:
            first, last = ranges.get(batch_id, (seq, seq))
            ranges[batch_id] = (min(first, seq), max(last, seq))
    if ranges:
        conn.executemany(
            _INSERT_BATCH, [(batch_id, first, last) for batch_id, (first, last) in ranges.items()]
        )


def check_unfinished(
    writer: WriterState, owner: Optional[str], jobs: int, limit: Optional[int]
) -> None:
    """
    Refuse (L{TooManyUnfinished}) C{jobs} more unfinished jobs of C{owner}
    if it would then have more than C{limit} (C{None}: no limit).  The
    count is the writer's own (L{OwnerCounts}): exact, since every change
    of it goes through this thread, and free of any scan.
    """
    if limit is None:
        return
    unfinished = writer.owners.unfinished(owner)
    if unfinished + jobs > limit:
        raise TooManyUnfinished(owner or "", unfinished, jobs, limit)


def submit(
    writer: WriterState,
    conn: sqlite3.Connection,
    specs: list[JobSpec],
    now: float,
    ids: list[str],
    idempotency: Optional[IdempotencyKey],
    owner: Optional[str] = None,
    sees_all: bool = True,
    max_unfinished: Optional[int] = None,
) -> Written:
    """
    Store new jobs from their specs, all or nothing (L{Submit}), owned by
    C{owner}: queued, pending on their dependencies or start time, or
    cancelled at once for a dependency that failed; or answer what an
    earlier request of the same owner with the same idempotency key made.
    Unless C{sees_all}, a C{depends_on} entry naming another owner's job
    is refused as one naming no job is.  If C{owner} would then have more
    than C{max_unfinished} unfinished jobs (every job of the request
    counted), nothing is stored (L{TooManyUnfinished}).
    """
    replayed = _replayed(writer, conn, idempotency, now, owner)
    if replayed is not None:
        return replayed
    check_unfinished(writer, owner, len(specs), max_unfinished)
    _watch(conn, specs)
    changed: list[Change] = []
    in_batch: dict[str, JobState] = {}
    jobs: list[Job] = []
    # Rows are gathered and inserted with executemany (one statement per
    # job was most of a large batch's time on the writer thread), so
    # each job's seq is given here rather than left to SQLite: no other
    # write runs inside this transaction.
    rows: list[tuple[Any, ...]] = []
    label_rows: list[tuple[str, str, int]] = []
    (seq,) = conn.execute(MAX_SEQ).fetchone()
    first = seq + 1
    # The jobs this request's jobs depend on, in all: the writer's work for
    # one request is bounded by MAX_DEPENDENCY_LINKS.
    links = 0
    # The jobs it stores unfinished (not cancelled at once).
    unfinished = 0

    def insert_rows() -> None:
        if rows:
            _insert_jobs(conn, rows)
            rows.clear()
        if label_rows:
            conn.executemany(_INSERT_LABEL, label_rows)
            label_rows.clear()

    for index, (spec, job_id) in enumerate(zip(specs, ids)):
        error = cancelled_by = finished_at = None
        dead = None
        if spec.depends_on:
            # A dependency may be an array of this batch, found by a
            # query: its members must be in the table first.
            insert_rows()
            deps = resolve_dependencies(
                conn, spec, index, in_batch, None if sees_all else owner,
                MAX_DEPENDENCY_LINKS - links, MAX_DEPENDENCY_LINKS,
            )
            links += len(deps)
            unmet = [d for d, st in deps.items() if st is not JobState.SUCCEEDED]
            dead = next(
                (d for d, st in deps.items()
                 if st in (JobState.FAILED, JobState.CANCELLED)),
                None,
            )
        else:
            deps, unmet = {}, []
        if dead is not None:
            state = JobState.CANCELLED
            verb = "failed" if deps[dead] is JobState.FAILED else "was cancelled"
            error = f"cancelled because its dependency {dead} {verb}"
            cancelled_by = dead
            finished_at = now
            wait_reason = None
        elif unmet or spec.not_before is not None:
            state, wait_reason = waiting(unmet, spec.not_before, now)
        else:
            state, wait_reason = JobState.QUEUED, QUEUED_REASON
        seq += 1
        jobs.append(
            _add_job(rows, label_rows, seq, job_id, state, spec, now, wait_reason,
                     len(unmet), finished_at, error, cancelled_by, owner)
        )
        if deps:
            writer.dependencies = True
            conn.executemany(
                "INSERT INTO dependencies (depends_on, job_id) VALUES (?, ?)",
                [(d, job_id) for d in deps],
            )
        in_batch[job_id] = state
        changed.append(
            (job_id, state) if error is None else (job_id, state, None, None, None, error)
        )
        if dead is None:
            unfinished += 1
    insert_rows()
    _record_batches(conn, zip(itertools.count(first), specs))
    writer.owners.add(owner, unfinished)
    _remember(conn, idempotency, ids, now, owner)
    wake = [s.not_before for s in specs if s.not_before is not None and s.not_before > now]
    return Written(Submitted(jobs, replayed=False), tuple(changed),
                   min(wake) if wake else None)


def submit_plain(
    writer: WriterState,
    conn: sqlite3.Connection,
    jobs: PlainJobs,
    now: float,
    ids: list[str],
    idempotency: Optional[IdempotencyKey],
    stored: Sequence[str],
    owner: Optional[str] = None,
    max_unfinished: Optional[int] = None,
) -> Written:
    """
    Store L{PlainJobs}, queued, all or nothing (L{SubmitPlain}), owned by
    C{owner}; or answer what an earlier request of the same owner with the
    same idempotency key made.  C{max_unfinished} is as for L{submit}.
    """
    replayed = _replayed(writer, conn, idempotency, now, owner)
    if replayed is not None:
        return replayed
    check_unfinished(writer, owner, len(ids), max_unfinished)
    (seq,) = conn.execute(MAX_SEQ).fetchone()
    written = _add_plain_jobs(conn, seq, jobs, now, ids, stored, owner)
    writer.owners.add(owner, len(ids))
    _remember(conn, idempotency, ids, now, owner)
    return written


def submit_together(
    writer: WriterState, conn: sqlite3.Connection, work: list[Submit | SubmitPlain]
) -> list[Written]:
    """
    Store several plain submissions with one sequence query and one
    insert (a one-row insert, a query and a savepoint for each were a
    third of the writer's time per submission).  One that its owner's
    limit of unfinished jobs refuses raises L{Replay}: the group is then
    stored one write at a time, and that one alone is refused.
    """
    (seq,) = conn.execute(MAX_SEQ).fetchone()
    rows: list[tuple[Any, ...]] = []
    label_rows: list[tuple[str, str, int]] = []
    written: list[Written] = []
    owners = writer.owners
    for write in work:
        now, ids = write.now, write.ids
        if write.max_unfinished is not None and (
            owners.unfinished(write.owner) + len(ids) > write.max_unfinished
        ):
            raise Replay()
        # Counted as it goes: the next write of the same owner sees these.
        owners.add(write.owner, len(ids))
        if type(write) is SubmitPlain:
            written.append(
                _add_plain_jobs(conn, seq, write.jobs, now, ids, write.stored, write.owner)
            )
            seq += len(ids)
            continue
        specs = write.specs  # type: ignore[union-attr]
        _record_batches(conn, zip(itertools.count(seq + 1), specs))
        _watch(conn, specs)
        owner = write.owner
        changed = []
        jobs = []
        wake = None
        for spec, job_id in zip(specs, ids):
            if spec.not_before is not None:
                state, wait_reason = waiting([], spec.not_before, now)
                if spec.not_before > now and (wake is None or spec.not_before < wake):
                    wake = spec.not_before
            else:
                state, wait_reason = JobState.QUEUED, QUEUED_REASON
            seq += 1
            jobs.append(
                _add_job(rows, label_rows, seq, job_id, state, spec, now, wait_reason,
                         owner=owner)
            )
            changed.append((job_id, state))
        written.append(Written(Submitted(jobs, replayed=False), tuple(changed), wake))
    _insert_jobs(conn, rows)
    if label_rows:
        conn.executemany(_INSERT_LABEL, label_rows)
    return written


def _watch(conn: sqlite3.Connection, specs: Sequence[JobSpec]) -> None:
    """
    Make the triggers that write webhook deliveries, if a job of C{specs}
    names notify (L{install_webhook_triggers}): before its row is
    inserted.
    """
    for spec in specs:
        if spec.notify is not None:
            install_webhook_triggers(conn)
            return


def _replayed(
    writer: WriterState,
    conn: sqlite3.Connection,
    idempotency: Optional[IdempotencyKey],
    now: float,
    owner: Optional[str],
) -> Optional[Written]:
    """
    What an earlier request of C{owner} with the same idempotency key
    made, if it is still remembered; an expired key is forgotten.
    """
    if idempotency is None:
        return None
    scope = _key_owner(owner)
    row = conn.execute(
        "SELECT digest, job_ids, created_at FROM idempotency WHERE owner = ? AND key = ?",
        (scope, idempotency.key),
    ).fetchone()
    if row is not None and row[2] >= now - writer.idempotency_ttl:
        if row[0] != idempotency.digest:
            raise IdempotencyConflict(idempotency.key)
        jobs = [get_job(conn, job_id) for job_id in decode_stored(row[1])]
        return Written(Submitted(jobs, replayed=True))
    if row is not None:
        conn.execute(
            "DELETE FROM idempotency WHERE owner = ? AND key = ?", (scope, idempotency.key)
        )
    return None


def _remember(
    conn: sqlite3.Connection,
    idempotency: Optional[IdempotencyKey],
    ids: list[str],
    now: float,
    owner: Optional[str],
) -> None:
    if idempotency is not None:
        conn.execute(
            "INSERT INTO idempotency (owner, key, digest, job_ids, created_at)"
            " VALUES (?, ?, ?, ?, ?)",
            (_key_owner(owner), idempotency.key, idempotency.digest, encode_stored(ids),
             now),
        )


def _key_owner(owner: Optional[str]) -> str:
    # Whose keys a request's key is looked up among: jobs stored without
    # an owner share the keys of no one (which those kept from before
    # owners also belong to: see the schema's migration 5).
    return "" if owner is None else owner
