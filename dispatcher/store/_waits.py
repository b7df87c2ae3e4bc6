"""
What a job waits for, in the SQLite store: its wait reason while it has
not run, the jobs it depends on, and what its end does to its dependents
(frees them, or cancels them); a job put back in line.  Shared by the
write operations.
"""

from __future__ import annotations

import sqlite3
from typing import Mapping, Optional, Sequence

from dispatcher.model._jobs import JobSpec, JobState, format_time
from dispatcher.store._results import DependencyNotRetried, UnknownDependency


QUEUED_REASON = "waiting for a free slot"


def waiting(
    unmet: Sequence[str], not_before: Optional[float], now: float
) -> tuple[JobState, str]:
    """
    The state and wait reason of a job that has not run: pending while it
    waits for jobs or a time, else queued.
    """
    if unmet:
        shown = ", ".join(unmet[:3]) + (f" and {len(unmet) - 3} more" if len(unmet) > 3 else "")
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
) -> dict[str, JobState]:
    """
    The jobs a new job depends on, with their states: job ids, earlier jobs
    of the same request, or array ids (all their members).  If C{owner} is
    given, only that owner's jobs count: another's job or array is
    L{UnknownDependency}, as a name that names nothing is, so that its
    existence does not show.
    """
    found: dict[str, JobState] = {}
    for position, name in enumerate(spec.depends_on):
        if name in in_batch:
            found[name] = in_batch[name]
            continue
        row = conn.execute("SELECT state, owner FROM jobs WHERE id = ?", (name,)).fetchone()
        if row is not None:
            if owner is not None and row[1] != owner:
                raise UnknownDependency(index, position, name)
            found[name] = JobState(row[0])
            continue
        # An array's members all have the owner that submitted it.
        members = conn.execute(
            "SELECT id, state, owner FROM jobs WHERE array_id = ?", (name,)
        ).fetchall()
        if not members or (owner is not None and members[0][2] != owner):
            raise UnknownDependency(index, position, name)
        for member, state, _ in members:
            found[member] = JobState(state)
    return found


def after_final(
    conn: sqlite3.Connection,
    job_id: str,
    state: JobState,
    now: float,
    changed: list[tuple[str, JobState]],
) -> Optional[float]:
    """
    A job reached a final state: its pending dependents either move on (it
    succeeded) or are cancelled, and theirs in turn (it did not).  Returns
    the earliest time a dependent it freed becomes due.
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
            if waiting_on > 0:
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
                changed.append((dependent, target))
            elif waiting_on == 0 and not_before is not None:
                wakes.append(not_before)
        return min(wakes) if wakes else None
    stack = [(job_id, "failed" if state is JobState.FAILED else "was cancelled")]
    while stack:
        cause, verb = stack.pop()
        for (dependent,) in conn.execute(
            "SELECT j.id FROM dependencies d JOIN jobs j ON j.id = d.job_id"
            " WHERE d.depends_on = ? AND j.state = 'pending'",
            (cause,),
        ).fetchall():
            conn.execute(
                "UPDATE jobs SET state = 'cancelled', finished_at = ?, error = ?,"
                " wait_reason = NULL, cancelled_by = ? WHERE id = ?",
                (now, f"cancelled because its dependency {cause} {verb}", cause,
                 dependent),
            )
            changed.append((dependent, JobState.CANCELLED))
            stack.append((dependent, "was cancelled"))
    return None


def requeue(
    conn: sqlite3.Connection,
    job_id: str,
    now: float,
    changed: list[tuple[str, JobState]],
    coming_back: frozenset[str] = frozenset(),
) -> Optional[float]:
    """
    Put a finished job back in line with a fresh budget: queued, or pending
    while jobs it depends on have not succeeded.  A dependency that failed
    or was cancelled must be retried first.
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
    (not_before,) = conn.execute(
        "SELECT not_before FROM jobs WHERE id = ?", (job_id,)
    ).fetchone()
    target, reason = waiting(unmet, not_before, now)
    conn.execute(
        "UPDATE jobs SET state = ?, wait_reason = ?, waiting_on = ?,"
        " attempts_spent = 0, cancel_requested = 0, cancelled_by = NULL,"
        " started_at = NULL, finished_at = NULL, exit_code = NULL, result = NULL,"
        " error = NULL WHERE id = ?",
        (target.value, reason, len(unmet), job_id),
    )
    changed.append((job_id, target))
    if target is JobState.PENDING and not unmet and not_before is not None:
        return not_before
    return None
