"""
What the SQLite store removes: finished jobs past retention, a step at a
time (L{remove_finished}), and one finished job a client deletes
(L{remove}); which id windows still hold jobs (L{windows_in_use}), so
that the directories of emptied windows can go; and the file's free
pages, given back to the file system (L{space}, L{shrink}).

A job goes with everything of it: its attempts, its labels' rows, its
dependency rows.  What a job that stays still needs is kept:

  - a finished job is kept while a job that depends on it has not
    succeeded (a pending one waits for it; a failed or cancelled one may be
    retried, and its retry reads its dependencies' outcomes);
  - a job is kept by retention while an idempotency key that made it is
    live, so that a replay of its request answers with it (a delete
    forgets the key with the job);
  - an array goes whole, once every member is finished and past the rule,
    its failed and cancelled members last: a job submitted meanwhile that
    depends on the array (all its members) still sees one that failed.

The sequence numbers of removed jobs are never given again: a list's
cursor is a sequence number, and a new job under a removed number would
be behind a client's cursor (L{MAX_SEQ}).
"""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING, Any, Optional, Sequence

from dispatcher.model._jobs import FINAL_STATES, JobState, UnknownJob
from dispatcher.store._dialect import differs
from dispatcher.store._queries import BATCH_MEMBER
from dispatcher.store._results import (
    HasDependents,
    NotFinished,
    RemovalCursor,
    Removed,
    StoreSpace,
    Written,
)
from dispatcher.store._stored import decode_stored

if TYPE_CHECKING:
    from dispatcher.store._operations import WriterState

# PRAGMA auto_vacuum's value for INCREMENTAL: the store's files are made
# so (see SQLiteJobStore._connect), and free pages can be given back.
INCREMENTAL = 2

# The next job's sequence number is one past the greatest of the jobs
# stored and those removed (SQLite would give the greatest again once its
# job is gone).
MAX_SEQ = differs(
    "SELECT MAX(COALESCE((SELECT MAX(seq) FROM jobs), 0),"
    " (SELECT top_seq FROM removed WHERE one = 1))",
    "SELECT GREATEST(COALESCE((SELECT MAX(seq) FROM jobs), 0),"
    " (SELECT top_seq FROM removed WHERE one = 1))",
)

_FINAL = frozenset(state.value for state in FINAL_STATES)
_SUCCEEDED = JobState.SUCCEEDED.value

# The columns a removal step reads of each job it looks at (a finished
# job always has its finished_at; were one missing, its age would count
# from its submission rather than fail every pass).
_COLUMNS = (
    "seq, id, state, created_at, COALESCE(finished_at, created_at), array_id, owner, labels,"
    " queue, batch_id"
)
_SCAN = f"SELECT {_COLUMNS} FROM jobs WHERE seq > ? ORDER BY seq LIMIT ?"
_MEMBERS = f"SELECT {_COLUMNS} FROM jobs WHERE array_id = ?"
# A job that depends on this one and has not succeeded.
_WAITING_DEPENDENT = (
    "SELECT dj.id, dj.state, dj.owner FROM dependencies d JOIN jobs dj ON dj.id = d.job_id"
    " WHERE d.depends_on = ? AND dj.state != 'succeeded' LIMIT 1"
)
# A live idempotency key that made this job: keys are remembered with the
# submission's time, which is the job's created_at (one index seek).
_LIVE_KEY = (
    "SELECT 1 FROM idempotency WHERE created_at = ? AND created_at >= ? AND owner = ?"
    " AND instr(job_ids, ?) > 0 LIMIT 1"
)

# The greatest sequence number removed, kept.
_KEEP_TOP_SEQ = differs(
    "UPDATE removed SET top_seq = MAX(top_seq, ?) WHERE one = 1",
    "UPDATE removed SET top_seq = GREATEST(top_seq, %s) WHERE one = 1",
)

# A row of _SCAN and _MEMBERS.
_SEQ, _ID, _STATE, _CREATED, _FINISHED, _ARRAY, _OWNER, _LABELS, _QUEUE, _BATCH = range(10)

# A batch's range (migration 14) once no member of it is left.
_FORGET_BATCH = (
    f"DELETE FROM batches WHERE batch = ? AND NOT EXISTS (SELECT 1 FROM jobs WHERE {BATCH_MEMBER})"
)


def _key_owner(owner: Optional[str]) -> str:
    # The keys of jobs without an owner are kept under '' (see
    # _submissions._key_owner).
    return "" if owner is None else owner


def _kept_for_dependents(writer: WriterState, conn: sqlite3.Connection, job_id: str) -> bool:
    return bool(writer.dependencies) and conn.execute(
        _WAITING_DEPENDENT, (job_id,)
    ).fetchone() is not None


def _kept_for_key(conn: sqlite3.Connection, row: Sequence[Any], live_from: float) -> bool:
    return conn.execute(
        _LIVE_KEY, (row[_CREATED], live_from, _key_owner(row[_OWNER]), row[_ID])
    ).fetchone() is not None


def _delete(writer: WriterState, conn: sqlite3.Connection, rows: Sequence[Sequence[Any]]) -> None:
    """
    Delete the jobs of C{rows} (rows of L{_SCAN}) with their attempts,
    labels and dependency rows, and keep their greatest sequence number
    from being given again.
    """
    if not rows:
        return
    ids = [(row[_ID],) for row in rows]
    conn.executemany("DELETE FROM attempts WHERE job_id = ?", ids)
    labels = [
        (key, value, row[_SEQ])
        for row in rows
        if row[_LABELS] != "{}"
        for key, value in decode_stored(row[_LABELS]).items()
    ]
    if labels:
        conn.executemany(
            "DELETE FROM job_labels WHERE key = ? AND value = ? AND seq = ?", labels
        )
    if writer.dependencies:
        conn.executemany("DELETE FROM dependencies WHERE job_id = ?", ids)
        conn.executemany("DELETE FROM dependencies WHERE depends_on = ?", ids)
    conn.executemany("DELETE FROM jobs WHERE seq = ?", [(row[_SEQ],) for row in rows])
    batches = {row[_BATCH] for row in rows if row[_BATCH] is not None}
    if batches:
        conn.executemany(_FORGET_BATCH, [(batch,) for batch in batches])
    counts = writer.counts
    for row in rows:
        counts.removed(row[_ID], row[_QUEUE], row[_OWNER], row[_STATE])
    conn.execute(
        _KEEP_TOP_SEQ,
        (max(row[_SEQ] for row in rows),),
    )


def _array_removable(
    writer: WriterState,
    conn: sqlite3.Connection,
    members: list[Any],
    cutoff: Optional[float],
    by_count: bool,
    live_from: float,
) -> bool:
    """
    Whether an array may go: every member finished, past the age rule
    (or the count rule takes it), and none kept for a dependent or a key.
    """
    if any(m[_STATE] not in _FINAL for m in members):
        return False
    if not by_count and (cutoff is None or max(m[_FINISHED] for m in members) >= cutoff):
        return False
    # One request made the array: a key that made it names every member.
    if _kept_for_key(conn, members[0], live_from):
        return False
    return not any(_kept_for_dependents(writer, conn, m[_ID]) for m in members)


def _array_order(members: list[Any]) -> list[Any]:
    # Failed and cancelled members last: while the array is partly
    # removed, a job that comes to depend on it still sees one of them.
    return sorted(members, key=lambda m: (m[_STATE] != _SUCCEEDED, m[_SEQ]))


def remove_finished(
    writer: WriterState,
    conn: sqlite3.Connection,
    now: float,
    cutoff: Optional[float],
    excess: int,
    cursor: RemovalCursor,
    limit: int,
    scan: int,
) -> Written:
    """
    One step of a removal pass (L{RemoveFinished}): look at the jobs after
    C{cursor} in submission order, at most C{scan} of them, and remove the
    finished ones the rules take, at most C{limit}: those finished before
    C{cutoff}, and the first C{excess} (the count rule; an array counts
    whole, so it may take a few more).  An array begun by the last step
    (C{cursor.array}) is finished first.

    The step reads in the rowid's order, the cheapest there is, and stops
    early at a job submitted at or after C{cutoff} once the count rule is
    met: no later job can have finished before it.  Its value is
    L{Removed}.
    """
    live_from = now - writer.idempotency_ttl
    doomed: list[Any] = []
    after = cursor.after
    if cursor.array is not None:
        members = _array_order(conn.execute(_MEMBERS, (cursor.array,)).fetchall())
        doomed.extend(members[:limit])
        if len(members) > limit:
            _delete(writer, conn, doomed)
            return Written(
                Removed(tuple(m[_ID] for m in doomed), cursor, excess, False)
            )
    seen: set[str] = set()
    next_array: Optional[str] = None
    # Read as it goes: a pass that stops at its first job reads one row.
    looked = 0
    done = True
    rows = conn.execute(_SCAN, (after, scan))
    for row in rows:
        if len(doomed) >= limit:
            done = False
            break
        if excess <= 0 and (cutoff is None or row[_CREATED] >= cutoff):
            break
        looked += 1
        if looked == scan:
            # The last row of this step's look: the next step goes on.
            done = False
        after = max(after, row[_SEQ])
        if row[_STATE] not in _FINAL:
            continue
        array_id = row[_ARRAY]
        if array_id is not None:
            if array_id in seen:
                continue
            seen.add(array_id)
            members = conn.execute(_MEMBERS, (array_id,)).fetchall()
            # Passed over whole, whatever comes of it: its members are
            # read once a step (they follow one another in order).
            after = max(after, max(m[_SEQ] for m in members))
            if not _array_removable(writer, conn, members, cutoff, excess > 0, live_from):
                continue
            excess -= len(members)
            room = limit - len(doomed)
            ordered = _array_order(members)
            doomed.extend(ordered[:room])
            if len(ordered) > room:
                next_array = array_id
                done = False
                break
            continue
        by_count = excess > 0
        if not by_count and (cutoff is None or row[_FINISHED] >= cutoff):
            continue
        if _kept_for_key(conn, row, live_from) or _kept_for_dependents(writer, conn, row[_ID]):
            continue
        doomed.append(row)
        if by_count:
            excess -= 1
    rows.close()
    _delete(writer, conn, doomed)
    return Written(
        Removed(
            tuple(row[_ID] for row in doomed),
            RemovalCursor(after, next_array),
            max(excess, 0),
            done and next_array is None,
        )
    )


def remove(
    writer: WriterState,
    conn: sqlite3.Connection,
    job_id: str,
    now: float,
    owner: Optional[str] = None,
) -> Written:
    """
    Remove one finished job now (L{Remove}), with the idempotency keys that
    made it; if C{owner} is given, another owner's job is L{UnknownJob}.
    Fails with L{NotFinished} for a job that has not finished, and
    L{HasDependents} while a job that depends on it has not succeeded
    (named if C{owner} may see it).  Its value is the job's id.
    """
    row = conn.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if row is None or (owner is not None and row[_OWNER] != owner):
        raise UnknownJob(job_id)
    state = JobState(row[_STATE])
    if not state.final:
        raise NotFinished(job_id, state)
    if writer.dependencies:
        waiting = conn.execute(_WAITING_DEPENDENT, (job_id,)).fetchone()
        if waiting is not None:
            dependent, dependent_state, dependent_owner = waiting
            if owner is not None and dependent_owner != owner:
                raise HasDependents(job_id, None, None)
            raise HasDependents(job_id, dependent, JobState(dependent_state))
    # A replay of the request that made it would answer with a job that is
    # gone: the key goes with it, and a replay makes the jobs again.
    conn.execute(
        "DELETE FROM idempotency WHERE created_at = ? AND owner = ? AND instr(job_ids, ?) > 0",
        (row[_CREATED], _key_owner(row[_OWNER]), job_id),
    )
    _delete(writer, conn, [row])
    return Written(job_id)


def windows_in_use(conn: sqlite3.Connection, prefixes: Sequence[str]) -> frozenset[str]:
    """
    Those of C{prefixes} (leading hex digits of job ids: a window of
    submission times) that some stored job's id starts with; one seek of
    the ids' index each.
    """
    found = set()
    for prefix in prefixes:
        if conn.execute(
            "SELECT 1 FROM jobs WHERE id >= ? AND id < ? LIMIT 1",
            (prefix, prefix + "\uffff"),
        ).fetchone() is not None:
            found.add(prefix)
    return frozenset(found)


def space(conn: sqlite3.Connection) -> StoreSpace:
    """
    How large the database file is, how much of it is free pages (freed by
    removals, reused by the next writes), and whether free pages can be
    given back to the file system (the file was made with
    C{auto_vacuum = INCREMENTAL}).
    """
    (page_size,) = conn.execute("PRAGMA page_size").fetchone()
    (pages,) = conn.execute("PRAGMA page_count").fetchone()
    (free,) = conn.execute("PRAGMA freelist_count").fetchone()
    (mode,) = conn.execute("PRAGMA auto_vacuum").fetchone()
    return StoreSpace(pages * page_size, free * page_size, mode == INCREMENTAL)


def shrink(writer: WriterState, conn: sqlite3.Connection, limit: int) -> Written:
    """
    Give free pages back to the file system, at most C{limit} bytes of
    them (L{Shrink}); its value is the free bytes left.  One page a
    statement: Python's C{sqlite3} steps a C{PRAGMA incremental_vacuum(N)}
    once, which frees one page whatever N is.
    """
    (page_size,) = conn.execute("PRAGMA page_size").fetchone()
    for _ in range(max(1, limit // page_size)):
        conn.execute("PRAGMA incremental_vacuum(1)")
    (free,) = conn.execute("PRAGMA freelist_count").fetchone()
    return Written(free * page_size)
