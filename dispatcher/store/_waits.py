"""
What a job waits for, in the SQLite store: its wait reason while it has
not run, the jobs it depends on, and what its end does to its dependents
(frees them, or cancels them); a job put back in line.  Shared by the
write operations.
"""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING, Mapping, Optional, Sequence

from dispatcher.model._jobs import JobSpec, JobState, format_time
from dispatcher.model._limits import MAX_DEPENDENCY_LINKS
from dispatcher.store._results import (
    Change,
    DependencyNotRetried,
    TooManyDependencies,
    UnknownDependency,
)

if TYPE_CHECKING:
    from dispatcher.store._counts import OwnerCounts


QUEUED_REASON = "waiting for a free slot"

# A pending job's wait reason names the jobs it waits for, up to this many.
_NAMED = 3


def waiting(
    unmet: Sequence[str], not_before: Optional[float], now: float
) -> tuple[JobState, str]:
    """
    The state and wait reason of a job that has not run: pending while it
    waits for jobs or a time, else queued.
    """
    if unmet:
        shown = ", ".join(unmet[:_NAMED]) + (
            f" and {len(unmet) - _NAMED} more" if len(unmet) > _NAMED else "")
        return JobState.PENDING, f"waiting for {len(unmet)} job(s) to succeed: {shown}"
    if not_before is not None and not_before > now:
        return JobState.PENDING, f"waiting until {format_time(not_before)}"
    return JobState.QUEUED, QUEUED_REASON


def resolve_dependencies(
    conn: sqlite3.Connection,
    spec: JobSpec,
    index: int,
    in_batch: Mapping[str, JobState],
    owner: Optional[str] = None,
    budget: int = MAX_DEPENDENCY_LINKS,
    limit: int = MAX_DEPENDENCY_LINKS,
) -> dict[str, JobState]:
    """
    The jobs a new job depends on, with their states: job ids, earlier jobs
    of the same request, or array ids (all their members), each resolved
    once however often it is named.  If C{owner} is given, only that
    owner's jobs count: another's job or array is L{UnknownDependency}, as
    a name that names nothing is, so that its existence does not show.
    More than C{budget} jobs in all is L{TooManyDependencies} (saying the
    request's C{limit}), naming the entry that went past it, found without
    reading further.
    """
    found: dict[str, JobState] = {}
    named: set[str] = set()
    for position, name in enumerate(spec.depends_on):
        if name in named:
            # Named again: it was resolved at its first entry (an array
            # named a thousand times was read a thousand times).
            continue
        named.add(name)
        if name in in_batch:
            found[name] = in_batch[name]
            _count(found, budget, limit, index, position, name)
            continue
        row = conn.execute("SELECT state, owner FROM jobs WHERE id = ?", (name,)).fetchone()
        if row is not None:
            if owner is not None and row[1] != owner:
                raise UnknownDependency(index, position, name)
            found[name] = JobState(row[0])
            _count(found, budget, limit, index, position, name)
            continue
        # An array's members all have the owner that submitted it.  Read
        # no further than the budget allows: one row past it is enough to
        # refuse the request.
        members = conn.execute(
            "SELECT id, state, owner FROM jobs WHERE array_id = ? LIMIT ?",
            (name, budget - len(found) + 1),
        ).fetchall()
        if not members or (owner is not None and members[0][2] != owner):
            raise UnknownDependency(index, position, name)
        for member, state, _ in members:
            found[member] = JobState(state)
        _count(found, budget, limit, index, position, name)
    return found


def _count(
    found: Mapping[str, JobState], budget: int, limit: int, index: int, position: int,
    name: str,
) -> None:
    if len(found) > budget:
        raise TooManyDependencies(index, position, name, limit)


def after_final(
    conn: sqlite3.Connection,
    job_id: str,
    state: JobState,
    now: float,
    changed: list[Change],
    owners: OwnerCounts,
) -> Optional[float]:
    """
    A job reached a final state: its pending dependents either move on (it
    succeeded) or are cancelled, and theirs in turn (it did not), each
    cancelled one counted off its owner's unfinished jobs in C{owners}.
    Returns the earliest time a dependent it freed becomes due.
    """
    if state is JobState.SUCCEEDED:
        wakes = []
        for dependent, waiting_on, not_before in conn.execute(
            "SELECT j.id, j.waiting_on, j.not_before FROM dependencies d"
            " JOIN jobs j ON j.id = d.job_id"
            " WHERE d.depends_on = ? AND j.state = 'pending'",
            (job_id,),
        ).fetchall():
            waiting_on -= 1
            if waiting_on > _NAMED:
                # Which jobs it still waits for is a read of every job it
                # depends on: done at each end, a job that depends on an
                # array of 10,000 read its 10,000 rows at each of their
                # ends.  It names them again once a few are left.
                target = JobState.PENDING
                reason = f"waiting for {waiting_on} job(s) to succeed"
            elif waiting_on > 0:
                unmet = [
                    r[0] for r in conn.execute(
                        "SELECT d.depends_on FROM dependencies d JOIN jobs j"
                        " ON j.id = d.depends_on WHERE d.job_id = ?"
                        " AND j.state != 'succeeded' AND j.id != ?",
                        (dependent, job_id),
                    )
                ]
                target, reason = waiting(unmet, not_before, now)
            else:
                target, reason = waiting((), not_before, now)
            conn.execute(
                "UPDATE jobs SET waiting_on = ?, state = ?, wait_reason = ? WHERE id = ?",
                (waiting_on, target.value, reason, dependent),
            )
            if target is JobState.QUEUED:
                changed.append((dependent, target, JobState.PENDING))
            elif waiting_on == 0 and not_before is not None:
                wakes.append(not_before)
        return min(wakes) if wakes else None
    stack = [(job_id, "failed" if state is JobState.FAILED else "was cancelled")]
    while stack:
        cause, verb = stack.pop()
        for dependent, owner in conn.execute(
            "SELECT j.id, j.owner FROM dependencies d JOIN jobs j ON j.id = d.job_id"
            " WHERE d.depends_on = ? AND j.state = 'pending'",
            (cause,),
        ).fetchall():
            owners.add(owner, -1)
            error = f"cancelled because its dependency {cause} {verb}"
            conn.execute(
                "UPDATE jobs SET state = 'cancelled', finished_at = ?, error = ?,"
                " wait_reason = NULL, cancelled_by = ? WHERE id = ?",
                (now, error, cause, dependent),
            )
            changed.append(
                (dependent, JobState.CANCELLED, JobState.PENDING, None, None, error)
            )
            stack.append((dependent, "was cancelled"))
    return None


def requeue(
    conn: sqlite3.Connection,
    job_id: str,
    now: float,
    changed: list[Change],
    owners: OwnerCounts,
    coming_back: frozenset[str] = frozenset(),
) -> Optional[float]:
    """
    Put a finished job back in line with a fresh budget: queued, or pending
    while jobs it depends on have not succeeded; counted among its owner's
    unfinished jobs in C{owners}.  A dependency that failed or was
    cancelled must be retried first.
    """
    unmet = []
    for dependency, state in conn.execute(
        "SELECT j.id, j.state FROM dependencies d JOIN jobs j ON j.id = d.depends_on"
        " WHERE d.job_id = ?",
        (job_id,),
    ).fetchall():
        if dependency in coming_back:
            unmet.append(dependency)
            continue
        if state in (JobState.FAILED.value, JobState.CANCELLED.value):
            raise DependencyNotRetried(job_id, dependency, JobState(state))
        if state != JobState.SUCCEEDED.value:
            unmet.append(dependency)
    # A job cancelled before its not_before still waits for it; a job that
    # ran is past its not_before (or its last back-off) already.
    not_before, owner, previous = conn.execute(
        "SELECT not_before, owner, state FROM jobs WHERE id = ?", (job_id,)
    ).fetchone()
    owners.add(owner, 1)
    target, reason = waiting(unmet, not_before, now)
    conn.execute(
        "UPDATE jobs SET state = ?, wait_reason = ?, waiting_on = ?,"
        " attempts_spent = 0, cancel_requested = 0, cancelled_by = NULL,"
        " started_at = NULL, finished_at = NULL, exit_code = NULL, result = NULL,"
        " error = NULL WHERE id = ?",
        (target.value, reason, len(unmet), job_id),
    )
    changed.append((job_id, target, JobState(previous)))
    if target is JobState.PENDING and not unmet and not_before is not None:
        return not_before
    return None
