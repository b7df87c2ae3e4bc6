"""
The SQLite store's write operations: one function for each kind of write
command (L{dispatcher.store._writes}), whose arguments are what the
operations keep between writes (L{WriterState}), the writer's connection
and the command's fields; and the shared paths that store a run of plain
submissions, or of plain successes, at once.

They run on the writer thread, inside the group's transaction
(L{dispatcher.store._writer}).  Submissions are in
L{dispatcher.store._submissions}, claims, ends and the other changes of
an attempt in L{dispatcher.store._leases}, what a job waits for in
L{dispatcher.store._waits}, removals of finished jobs in
L{dispatcher.store._removal}, the cancel and the retry of a whole array or
batch in L{dispatcher.store._groups}, what became of webhook deliveries in
L{dispatcher.store._deliveries}; cancels, retries, promotions and the purge of
idempotency keys are here.
"""

from __future__ import annotations

import functools
import random
import sqlite3
from typing import Any, Callable, Mapping, Optional, Sequence

import attrs

from dispatcher.model._jobs import InvalidTransition, JobState, Lease, UnknownJob
from dispatcher.store._counts import OwnerCounts, StateCounts
from dispatcher.store._events import record_events, record_presence, remove_events
from dispatcher.store._groups import cancel_group, retry_group
from dispatcher.store._deliveries import claim_deliveries, record_deliveries
from dispatcher.store._leases import (
    adopt_leases,
    claim,
    expire_leases,
    finish,
    finish_served,
    finish_together,
    mark_running,
    record_process,
    recover,
    release,
    renew_leases,
    resume_leases,
)
from dispatcher.store._queries import get_job, next_due
from dispatcher.store._removal import remove, remove_finished, shrink
from dispatcher.store._results import Change, Written
from dispatcher.store._submissions import (
    check_unfinished,
    submit,
    submit_plain,
    submit_together,
)
from dispatcher.store._waits import QUEUED_REASON, after_final, requeue
from dispatcher.store._writer import SharedPath
from dispatcher.store._writes import (
    AdoptLeases,
    Cancel,
    CancelGroup,
    Claim,
    ExpireLeases,
    Finish,
    FinishServed,
    MarkRunning,
    PromoteDue,
    PurgeIdempotency,
    RecordDeliveries,
    ClaimDeliveries,
    RecordProcess,
    RecordPresence,
    SetQueueLimits,
    Recover,
    Release,
    RenewLeases,
    RemoveEvents,
    Remove,
    RemoveFinished,
    ResumeLeases,
    Shrink,
    Retry,
    RetryGroup,
    Submit,
    SubmitPlain,
    Write,
)


def jittered_backoff(delay: float, spent: int) -> float:
    """
    The wait before retry number C{spent}: C{delay} doubled for each
    earlier failure, capped at an hour (or C{delay}, if longer), times a
    random factor between 0.5 and 1.5 so that jobs that failed together do
    not come back together.
    """
    base = min(delay * 2 ** (spent - 1), max(delay, 3600.0))
    return base * random.uniform(0.5, 1.5)


def queue_limits(queues: Optional[Mapping[str, int]]) -> dict[str, int]:
    """
    The configured queues and their limits of running jobs (0: none), as
    every store keeps them: C{default} is always among them.
    """
    limits = dict(queues or {})
    limits.setdefault("default", 0)
    return limits


@attrs.define
class WriterState:
    """
    What the operations keep between writes, on the writer thread.

    @ivar limits: each queue's limit of running jobs (0: none).
    @ivar idempotency_ttl: seconds an idempotency key is kept.
    @ivar backoff: the wait before a retry, from the retry delay and the
        number of attempts spent.
    @ivar queues: the queue names, in the order they take turns.
    @ivar limited: whether any queue has a limit.
    @ivar turn: whose turn it is among C{queues}, for the next claim.
    @ivar next_token: the next lease token.
    @ivar dependencies: whether any job may have dependents.
    @ivar owners: each owner's unfinished jobs (L{OwnerCounts}).
    @ivar counts: every job by queue, state and owner (L{StateCounts}).
    """

    limits: Mapping[str, int]
    idempotency_ttl: float
    backoff: Callable[[float, int], float]
    queues: list[str] = attrs.field(init=False)
    limited: bool = attrs.field(init=False)
    turn: int = 0
    next_token: int = 1
    dependencies: bool = True
    owners: OwnerCounts = attrs.field(factory=OwnerCounts)
    counts: StateCounts = attrs.field(factory=StateCounts)

    def __attrs_post_init__(self) -> None:
        self.queues = sorted(self.limits)
        self.limited = any(self.limits.values())

    def set_limits(self, limits: Mapping[str, int]) -> None:
        """
        Take C{limits} as the queues and their limits from the next claim
        on; the queue whose turn it was keeps it if it is still there.
        """
        turn = self.queues[self.turn] if self.turn < len(self.queues) else None
        self.limits = dict(limits)
        self.queues = sorted(self.limits)
        self.limited = any(self.limits.values())
        self.turn = self.queues.index(turn) if turn in self.limits else 0

    def load(self, conn: sqlite3.Connection) -> None:
        """
        Take the next lease token, whether any job has dependents, each
        owner's unfinished jobs and the counts of jobs by queue and state,
        from the database on C{conn}.
        """
        (top,) = conn.execute("SELECT COALESCE(MAX(token), 0) FROM attempts").fetchone()
        self.next_token = top + 1
        (self.dependencies,) = conn.execute(
            "SELECT EXISTS (SELECT 1 FROM dependencies)"
        ).fetchone()
        self.owners.load(conn)
        self.counts.load(conn)


def record_changes(
    writer: WriterState,
    conn: sqlite3.Connection,
    work: Sequence[Write],
    results: Sequence[tuple[bool, Any]],
) -> list[Sequence[Any]]:
    """
    What the writer runs once a group, after its writes and in its
    transaction: store the events of every change
    (L{dispatcher.store._events.record_events}), and count the changes
    by queue and state from them (L{StateCounts.count_events}).
    """
    events = record_events(writer, conn, work, results)
    writer.counts.count_events(conn, events)
    return events


def set_queue_limits(
    writer: WriterState, conn: sqlite3.Connection, limits: Mapping[str, int]
) -> Written:
    """
    Take new queue limits (L{SetQueueLimits}): the writer's alone, nothing
    stored.  Jobs already running past a lowered limit run on; no more
    start in that queue until it has room.
    """
    writer.set_limits(limits)
    return Written(None)


def _not_owned(row_owner: Optional[str], owner: Optional[str]) -> bool:
    """
    Whether a write limited to C{owner}'s jobs (C{None}: to none) must
    take a job of C{row_owner} for one that does not exist.
    """
    return owner is not None and row_owner != owner


def cancel(
    writer: WriterState,
    conn: sqlite3.Connection,
    job_id: str,
    now: float,
    owner: Optional[str] = None,
) -> Written:
    """
    Cancel a job (L{Cancel}): at once if it is not running, else by asking
    its holder; the answer is the job and, if it runs, its lease.  If
    C{owner} is given, another owner's job is L{UnknownJob}.
    """
    row = conn.execute(
        "SELECT state, lease_token, lease_holder, lease_expires, attempt_count, owner"
        " FROM jobs WHERE id = ?",
        (job_id,),
    ).fetchone()
    if row is None or _not_owned(row[5], owner):
        raise UnknownJob(job_id)
    state = JobState(row[0])
    if state.final:
        raise InvalidTransition(job_id, state, JobState.CANCELLED)
    if state.active:
        conn.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
        token, holder, expires, attempt = row[1:5]
        job = get_job(conn, job_id, writer.limits)
        lease = Lease(job_id, attempt, token, holder, expires, job.spec)
        return Written((job, lease))
    conn.execute(
        "UPDATE jobs SET state = 'cancelled', finished_at = ?, wait_reason = NULL,"
        " error = 'cancelled before it ran' WHERE id = ?",
        (now, job_id),
    )
    writer.owners.add(row[5], -1)
    changed: list[Change] = [
        (job_id, JobState.CANCELLED, state, None, None, "cancelled before it ran")
    ]
    wake = after_final(conn, job_id, JobState.CANCELLED, now, changed, writer.owners)
    return Written((get_job(conn, job_id, writer.limits), None), tuple(changed), wake)


def retry(
    writer: WriterState,
    conn: sqlite3.Connection,
    job_id: str,
    now: float,
    dependents: bool,
    owner: Optional[str] = None,
    max_unfinished: Optional[int] = None,
) -> Written:
    """
    Put a failed or cancelled job back in line (L{Retry}), and with
    C{dependents} the jobs cancelled because of it.  If C{owner} is given,
    another owner's job is L{UnknownJob}, and only that owner's dependents
    come back (the others stay cancelled).  If the jobs coming back would
    make the job's owner's unfinished jobs more than C{max_unfinished},
    nothing comes back (L{TooManyUnfinished}).
    """
    row = conn.execute("SELECT state, owner FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if row is None or _not_owned(row[1], owner):
        raise UnknownJob(job_id)
    state = JobState(row[0])
    if state not in (JobState.FAILED, JobState.CANCELLED):
        raise InvalidTransition(job_id, state, JobState.QUEUED)
    changed: list[Change] = []
    # Everything coming back, first: a dependent may also wait on
    # another job that comes back with it, which then counts as unmet
    # rather than as failed.
    returning = [job_id]
    if dependents:
        stack = [job_id]
        while stack:
            cause = stack.pop()
            for dependent, dependent_owner in conn.execute(
                "SELECT id, owner FROM jobs WHERE cancelled_by = ? AND state = 'cancelled'",
                (cause,),
            ).fetchall():
                if _not_owned(dependent_owner, owner):
                    continue
                returning.append(dependent)
                stack.append(dependent)
    check_unfinished(writer, row[1], len(returning), max_unfinished)
    coming_back = frozenset(returning)
    wakes = [requeue(conn, j, now, changed, writer.owners, coming_back) for j in returning]
    due = [w for w in wakes if w is not None]
    return Written(
        get_job(conn, job_id, writer.limits), tuple(changed), min(due) if due else None
    )


def promote_due(writer: WriterState, conn: sqlite3.Connection, now: float) -> Written:
    """
    Queue the pending jobs whose time has come (L{PromoteDue}).
    """
    due = conn.execute(
        "SELECT id FROM jobs INDEXED BY jobs_due"
        " WHERE state = 'pending' AND waiting_on = 0 AND not_before <= ?",
        (now,),
    ).fetchall()
    changed = []
    for (job_id,) in due:
        conn.execute(
            "UPDATE jobs SET state = 'queued', wait_reason = ? WHERE id = ?",
            (QUEUED_REASON, job_id),
        )
        changed.append((job_id, JobState.QUEUED, JobState.PENDING))
    return Written(None, tuple(changed), next_due(conn))


def purge_idempotency(writer: WriterState, conn: sqlite3.Connection, now: float) -> Written:
    """
    Forget the idempotency keys past their time to live
    (L{PurgeIdempotency}).
    """
    cursor = conn.execute(
        "DELETE FROM idempotency WHERE created_at < ?",
        (now - writer.idempotency_ttl,),
    )
    return Written(cursor.rowcount)


# The operation that applies each kind of write command.
OPERATIONS: Mapping[type, Callable[..., Any]] = {
    Submit: submit,
    SubmitPlain: submit_plain,
    Claim: claim,
    ResumeLeases: resume_leases,
    RecordProcess: record_process,
    MarkRunning: mark_running,
    Finish: finish,
    FinishServed: finish_served,
    AdoptLeases: adopt_leases,
    Release: release,
    Cancel: cancel,
    Retry: retry,
    PromoteDue: promote_due,
    PurgeIdempotency: purge_idempotency,
    RemoveFinished: remove_finished,
    Remove: remove,
    Shrink: shrink,
    Recover: recover,
    RenewLeases: renew_leases,
    ExpireLeases: expire_leases,
    RecordPresence: record_presence,
    RemoveEvents: remove_events,
    CancelGroup: cancel_group,
    RetryGroup: retry_group,
    RecordDeliveries: record_deliveries,
    ClaimDeliveries: claim_deliveries,
    SetQueueLimits: set_queue_limits,
}


def shared_paths(writer: WriterState) -> list[SharedPath]:
    """
    The writer's shared paths: plain submissions next to each other are
    stored with one insert (L{submit_together}), and plain successes next
    to each other with one read and two updates (L{finish_together}).
    """

    def plain_submission(write: Write) -> bool:
        # Nothing but SQLite itself can refuse it: no idempotency key to
        # check, no dependency to look up.
        kind = type(write)
        if kind is SubmitPlain:
            return write.idempotency is None  # type: ignore[union-attr]
        return kind is Submit and write.plain  # type: ignore[union-attr]

    def plain_success(write: Write) -> bool:
        # The end of an attempt that succeeded on its own, while no job has
        # dependents to free.
        return type(write) is Finish and write.success and not writer.dependencies

    return [
        (plain_submission, functools.partial(submit_together, writer)),
        (plain_success, functools.partial(finish_together, writer)),
    ]
