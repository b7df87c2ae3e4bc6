"""
Arrays and batches in the SQLite store: a group's counts by state and its
unfinished members (reads), and the cancel and the retry of every member
of a group in one write each.

An array's members are found along its partial index (C{jobs_array} on
C{array_id}, migration 9); a batch's in the range of sequence numbers its
one write gave them (C{batches}, migration 14), those of the range whose
C{batch_id} is the batch's: a read or a write of a group touches its
members' rows alone (and, for a batch, any others numbered among them),
never a scan of the jobs.  A group is as large as one request may make
(C{[dispatcher] max_array}).
"""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING, Optional

from dispatcher.model._groups import (
    GroupKind,
    JobGroup,
    NothingToChange,
    UnknownGroup,
    group_counts,
)
from dispatcher.model._jobs import FINAL_STATES, JobState, Lease
from dispatcher.store._counts import UNFINISHED
from dispatcher.store._queries import BATCH_MEMBER, get_job
from dispatcher.store._results import Change, Written
from dispatcher.store._submissions import check_unfinished
from dispatcher.store._waits import after_final, requeue

if TYPE_CHECKING:
    from dispatcher.store._operations import WriterState

# Each kind's FROM and WHERE of a group's members, its one parameter the
# group's id.  A batch's row is read first (CROSS JOIN keeps SQLite's
# planner to that order), then the jobs of its range, by their key.
_MEMBERS = {
    GroupKind.ARRAY: "FROM jobs INDEXED BY jobs_array WHERE array_id = ?",
    GroupKind.BATCH: f"FROM batches CROSS JOIN jobs WHERE batches.batch = ? AND {BATCH_MEMBER}",
}

_FINAL = frozenset(state.value for state in FINAL_STATES)
_ACTIVE = frozenset({JobState.STAGING.value, JobState.RUNNING.value})
_RETRIED = frozenset({JobState.FAILED.value, JobState.CANCELLED.value})


def _members(kind: GroupKind) -> str:
    """
    The FROM and WHERE of a group's members (one parameter: its id).
    """
    return _MEMBERS[kind]


def group(conn: sqlite3.Connection, kind: GroupKind, group_id: str) -> JobGroup:
    """
    The array or batch C{group_id}, with its members' counts by state;
    L{UnknownGroup} if no job is a member of it.
    """
    found = dict(
        conn.execute(f"SELECT state, COUNT(*) {_members(kind)} GROUP BY state", (group_id,))
    )
    if not found:
        raise UnknownGroup(kind, group_id)
    owner, created_at = conn.execute(
        f"SELECT owner, created_at {_members(kind)} ORDER BY seq LIMIT 1", (group_id,)
    ).fetchone()
    return JobGroup(group_id, kind, owner, created_at, group_counts(found))


def unfinished_members(
    conn: sqlite3.Connection, kind: GroupKind, group_id: str
) -> list[str]:
    """
    The ids of the members of a group that are not final (a wait for the
    group watches them; L{dispatcher.core._waits}).
    """
    marks = ", ".join("?" * len(UNFINISHED))
    return [
        row[0]
        for row in conn.execute(
            f"SELECT id {_members(kind)} AND state IN ({marks})", (group_id, *UNFINISHED)
        )
    ]


def _not_owned(row_owner: Optional[str], owner: Optional[str]) -> bool:
    # As a single job's cancel and retry take it (store/_operations.py).
    return owner is not None and row_owner != owner


def cancel_group(
    writer: WriterState,
    conn: sqlite3.Connection,
    kind: GroupKind,
    group_id: str,
    now: float,
    owner: Optional[str] = None,
) -> Written:
    """
    Cancel every unfinished member of a group (L{CancelGroup}), as a
    single job's cancel does each: a pending or queued member at once
    (with its pending dependents, and theirs), a staging or running one by
    asking its holder.  The answer is the group as the write leaves it and
    the leases whose holders must stop their jobs.  If C{owner} is given,
    another owner's group is L{UnknownGroup}; a group all of whose members
    are final is L{NothingToChange}.
    """
    rows = conn.execute(
        "SELECT id, state, lease_token, lease_holder, lease_expires, attempt_count, owner "
        + _members(kind),
        (group_id,),
    ).fetchall()
    if not rows or _not_owned(rows[0][6], owner):
        raise UnknownGroup(kind, group_id)
    waiting = [row for row in rows if row[1] not in _FINAL and row[1] not in _ACTIVE]
    active = [row for row in rows if row[1] in _ACTIVE]
    if not waiting and not active:
        raise NothingToChange(
            f"every member of {kind.value} {group_id} has finished; only unfinished "
            "members can be cancelled"
        )
    changed: list[Change] = []
    # Every member first, then what their ends do to dependents: a member
    # that depends on another is then cancelled already, not cancelled
    # again (and counted off its owner twice) as the other's dependent.
    conn.executemany(
        "UPDATE jobs SET state = 'cancelled', finished_at = ?, wait_reason = NULL,"
        " error = 'cancelled before it ran' WHERE id = ?",
        [(now, row[0]) for row in waiting],
    )
    for row in waiting:
        writer.owners.add(row[6], -1)
        changed.append(
            (row[0], JobState.CANCELLED, JobState(row[1]), None, None, "cancelled before it ran")
        )
    for row in waiting:
        after_final(conn, row[0], JobState.CANCELLED, now, changed, writer.owners)
    leases = []
    for job_id, _, token, holder, expires, attempt, _ in active:
        conn.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
        spec = get_job(conn, job_id).spec
        leases.append(Lease(job_id, attempt, token, holder, expires, spec))
    return Written((group(conn, kind, group_id), leases), tuple(changed))


def retry_group(
    writer: WriterState,
    conn: sqlite3.Connection,
    kind: GroupKind,
    group_id: str,
    now: float,
    owner: Optional[str] = None,
    max_unfinished: Optional[int] = None,
) -> Written:
    """
    Put every failed or cancelled member of a group back in line
    (L{RetryGroup}), as a single job's retry does each: with a fresh budget
    of attempts, queued, or pending while a job it depends on (a member
    coming back with it, say) has not succeeded.  The answer is the group
    as the write leaves it.  If C{owner} is given, another owner's group is
    L{UnknownGroup}.  A group with no such member is L{NothingToChange};
    if the members coming back, every one counted, would give the group's
    owner more unfinished jobs than C{max_unfinished}, nothing comes back
    (L{TooManyUnfinished}); nor if a member depends on a job outside the
    group that failed or was cancelled (L{DependencyNotRetried}).
    """
    rows = conn.execute(f"SELECT id, state, owner {_members(kind)}", (group_id,)).fetchall()
    if not rows or _not_owned(rows[0][2], owner):
        raise UnknownGroup(kind, group_id)
    returning = [row[0] for row in rows if row[1] in _RETRIED]
    if not returning:
        raise NothingToChange(
            f"no member of {kind.value} {group_id} failed or was cancelled; only those "
            "can be retried"
        )
    check_unfinished(writer, rows[0][2], len(returning), max_unfinished)
    changed: list[Change] = []
    coming_back = frozenset(returning)
    wakes = [requeue(conn, j, now, changed, writer.owners, coming_back) for j in returning]
    due = [w for w in wakes if w is not None]
    return Written(group(conn, kind, group_id), tuple(changed), min(due) if due else None)
