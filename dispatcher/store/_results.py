"""
What the methods of L{IJobStore} fire with and fail with: the values and
errors every store shares, whatever it keeps its jobs in.

The dispatcher and the API see these, never a database's own types: a
store translates its driver's errors into L{CommitFailed} (L{StorageFull}
when its disk took no more), L{WriteRefused} or L{ReadFailed}.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import attrs

from dispatcher.model._jobs import Job, JobState, Lease
from dispatcher.model._limits import MAX_DEPENDENCY_LINKS


# Errors


class StoreError(Exception):
    """
    A failure of the store itself, not a refusal of the request: the base
    of L{CommitFailed}, L{WriteRefused} and L{ReadFailed}.
    """


class CommitFailed(StoreError):
    """
    A write could not be committed (a full disk, an I/O error, a database
    another process holds locked): nothing of it was stored, and the same
    write asked for again later may succeed.

    The message is the store's own (C{"database or disk is full"}); the
    driver's exception is the C{__cause__}.
    """


class StorageFull(CommitFailed):
    """
    A write could not be committed because the store's disk took no more:
    it is full (C{SQLITE_FULL}, C{ENOSPC}, a quota's C{EDQUOT}), or it
    refused the write with an I/O error a full disk gives as well (a write
    or a sync that failed, a shared-memory file that could not grow).
    Nothing of it was stored; the same write may succeed once the disk has
    room.  The API answers it C{507 insufficient_storage}.
    """


class ReadFailed(StoreError):
    """
    A read could not be done (an I/O error, a database another process
    holds locked); reading again later may succeed.
    """


class StoreUnreachable(CommitFailed, ReadFailed):
    """
    The store's database cannot be reached (PostgreSQL: the connection
    was refused, broken or timed out): the write or the read was not
    done, and may be once the database answers again.  The API answers
    it C{503 store_unavailable} with C{Retry-After}.
    """


class WriteRefused(StoreError):
    """
    The store's own rules refused a write (a job id already taken): nothing
    of it was stored, and the same write would be refused again.
    """


class StoreUnusable(Exception):
    """
    The store cannot be opened: its message names the file, what is wrong
    with it and what to do, in one line.
    """


class StoreVersionError(StoreUnusable):
    """
    The database was written by a newer dispatcher than this one.
    """


class StoreDamaged(StoreUnusable):
    """
    The database file is damaged (SQLite's C{quick_check} found faults, or
    it is not a database at all).
    """


class CommitsLost(StoreUnusable):
    """
    The database holds fewer commits than its mark file says were made:
    its write-ahead log lost commits that clients were told were done.
    """


class IdempotencyConflict(Exception):
    """
    An idempotency key already used with a different request.
    """

    def __init__(self, key: str) -> None:
        super().__init__(
            f"the Idempotency-Key {key!r} was already used with a different request"
        )
        self.key = key


class UnknownDependency(Exception):
    """
    A C{depends_on} entry names no job and no array.

    @ivar job_index: which job of the submission (from 0).
    @ivar position: which entry of its C{depends_on} (from 0).
    @ivar name: the id it gave.
    """

    def __init__(self, job_index: int, position: int, name: str) -> None:
        super().__init__(f"no job or array has the id {name!r}")
        self.job_index = job_index
        self.position = position
        self.name = name


class TooManyDependencies(Exception):
    """
    With a C{depends_on} entry, the jobs of a submission would depend on
    more than L{MAX_DEPENDENCY_LINKS} jobs in all, an array counting as its
    members.

    @ivar job_index: which job of the submission (from 0).
    @ivar position: which entry of its C{depends_on} (from 0).
    @ivar name: the id it gave.
    """

    def __init__(
        self, job_index: int, position: int, name: str, limit: int = MAX_DEPENDENCY_LINKS
    ) -> None:
        super().__init__(
            f"with {name!r} the jobs of this request would depend on more than "
            f"{limit} jobs in all (an array counts as its members); depend on "
            "fewer, or on a job that itself waits for the others"
        )
        self.job_index = job_index
        self.position = position
        self.name = name


class TooManyUnfinished(Exception):
    """
    A submission (or a retry) would give its owner more unfinished jobs
    (pending, queued, staging or running) than its limit: nothing of it
    was stored.

    @ivar owner: whose jobs.
    @ivar unfinished: how many it has.
    @ivar jobs: how many more the request would make unfinished.
    @ivar limit: the most it may have.
    """

    def __init__(self, owner: str, unfinished: int, jobs: int, limit: int) -> None:
        super().__init__(
            f"{owner} has {unfinished} unfinished jobs (pending, queued, staging or "
            f"running), and {jobs} more would pass its limit of {limit}"
        )
        self.owner = owner
        self.unfinished = unfinished
        self.jobs = jobs
        self.limit = limit


class DependencyNotRetried(Exception):
    """
    A job cannot be retried while a job it depends on has failed or was
    cancelled: that one must be retried first.
    """

    def __init__(self, job_id: str, dependency: str, state: JobState) -> None:
        super().__init__(
            f"job {job_id} depends on {dependency}, which is {state.value}; "
            "retry that one first (with dependents: true to bring this one back)"
        )
        self.job_id = job_id
        self.dependency = dependency


class NotFinished(Exception):
    """
    Only a finished job (succeeded, failed, cancelled) can be removed.
    """

    def __init__(self, job_id: str, state: JobState) -> None:
        super().__init__(
            f"job {job_id} is {state.value}; only a finished job (succeeded, failed, "
            "cancelled) can be deleted: cancel it first, or wait for it to end"
        )
        self.job_id = job_id
        self.state = state


class HasDependents(Exception):
    """
    A finished job cannot be removed while a job that depends on it has
    not succeeded: that one still needs its outcome (to run, or to be
    retried).

    @ivar dependent: the id of one such job, or C{None} when the caller
        may not see it (another owner's).
    """

    def __init__(
        self, job_id: str, dependent: Optional[str], state: Optional[JobState]
    ) -> None:
        if dependent is None:
            which = "a job that depends on it has not succeeded"
        else:
            assert state is not None
            which = f"job {dependent}, which depends on it, is {state.value}"
        super().__init__(
            f"job {job_id} cannot be deleted: {which} and still needs its "
            "outcome; delete that job first"
        )
        self.job_id = job_id
        self.dependent = dependent


# Values


@attrs.frozen
class IdempotencyKey:
    """
    A client's Idempotency-Key and the digest of the request it came with.
    """

    key: str
    digest: str


# A change of a job's state, as a write reports it: C{(job id, new state)},
# and what else it knows, in this order: C{previous state, attempt, exit
# code, error}; what it leaves off is C{None}.  A plain tuple, not a
# class: a plain batch reports a thousand at once, and the store's
# event recorder (dispatcher.store._events) reads them by position.
Change = Union[
    tuple[str, JobState],
    tuple[str, JobState, Optional[JobState]],
    tuple[str, JobState, Optional[JobState], Optional[int]],
    tuple[str, JobState, Optional[JobState], Optional[int], Optional[int], Optional[str]],
]


@attrs.frozen
class Written:
    """
    What a write did: its answer, the jobs whose state it changed (for the
    event stream), and the earliest time a pending job it touched becomes
    due.

    @ivar value: the answer (each write's own: see L{IJobStore}).
    @ivar changed: a L{Change} for every job whose state the write
        changed, in the order they changed; each becomes an event, stored
        in the same commit (L{dispatcher.store._events}).
    @ivar wake_at: when the earliest pending job this write made or freed
        becomes due (C{None}: none does), for the dispatcher's timer.
    """

    value: Any
    changed: tuple[Change, ...] = ()
    wake_at: Optional[float] = None


@attrs.frozen
class Submitted:
    """
    The jobs a submission made, or (C{replayed}) the ones an earlier request
    with the same idempotency key made.
    """

    jobs: list[Job]
    replayed: bool = False


@attrs.frozen
class SubmittedIds:
    """
    The ids of the jobs a submission of L{PlainJobs} made, in order: all
    queued, as the answer to a batch shows them.
    """

    ids: list[str]


@attrs.frozen
class Claimed:
    """
    The leases a claim got, whether queued jobs wait behind a queue's limit
    of running jobs, how many queued jobs it passed over because they did
    not fit the holder, whether it saw the end of every queue it read
    (C{drained}: no job was left queued there when it committed), and how
    long each job whose first attempt it began had waited since it was
    submitted (C{waited}: its queue and the seconds, the metrics'
    submit-to-start time).
    """

    leases: list[Lease]
    blocked: bool = False
    skipped: int = 0
    drained: bool = False
    waited: tuple[tuple[str, float], ...] = ()


@attrs.frozen
class ResumedLease:
    """
    A remote worker's lease found at start-up: the lease, the job's state
    (C{staging} or C{running}), and whether a cancel waits for it.
    """

    lease: Lease
    state: JobState
    cancel_requested: bool


@attrs.frozen
class LostAttempt:
    """
    An attempt that was running when the daemon last stopped, with what is
    known of its process.
    """

    job_id: str
    attempt: int
    token: int
    pid: Optional[int]
    start_ticks: Optional[int]
    boot_id: Optional[str]


@attrs.frozen
class ExpiredLease:
    """
    An attempt whose lease ran out without being renewed (its holder, a
    dispatcher or a worker, stopped renewing it), recorded as lost by
    L{IJobStore.expire_leases}.
    """

    job_id: str
    attempt: int
    token: int
    holder: str
    expired_at: float


@attrs.frozen
class RemovalCursor:
    """
    Where a removal pass (L{IJobStore.remove_finished}) goes on from: after
    the job of sequence number C{after} in submission order, and first the
    rest of the array C{array}, which the last step began to remove.
    """

    after: int = 0
    array: Optional[str] = None


@attrs.frozen
class Removed:
    """
    What one step of a removal pass removed: the finished jobs' ids, where
    the next step goes on from, how many more the count rule still wants
    removed, and whether the pass is done.
    """

    job_ids: tuple[str, ...]
    cursor: RemovalCursor
    excess: int
    done: bool


@attrs.frozen
class StoreSpace:
    """
    The store's size on disk, in bytes: C{size} in all, of which C{free}
    is free (freed by removals, reused by the next writes), and whether
    free space can be given back to the file system (L{IJobStore.shrink}).
    """

    size: int
    free: int
    can_shrink: bool
