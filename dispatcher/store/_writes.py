"""
The SQLite store's write commands: one small class per kind of write, as
the group-commit writer queues them.

A command says what to write and whether its commit must reach the disk
before its answer (C{durable}: a client is told it is done); the writer
tells by a command's class which writes it may store together (plain
submissions, plain successes), and L{run} applies one alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Optional, Sequence

import attrs

from dispatcher.model._jobs import JobSpec, JobState, Lease, Offer, Outcome, PlainJobs, Resources
from dispatcher.store._results import IdempotencyKey

if TYPE_CHECKING:
    import sqlite3

    from dispatcher.store._sqlite import SQLiteJobStore


@attrs.frozen
class Submit:
    """
    Store new jobs from their specs, all or nothing.
    """

    specs: Sequence[JobSpec]
    now: float
    ids: Sequence[str]
    idempotency: Optional[IdempotencyKey]
    durable: ClassVar[bool] = True

    @property
    def plain(self) -> bool:
        """
        Whether nothing but the database itself can refuse it: no
        idempotency key to check, no dependency to look up.
        """
        return self.idempotency is None and not any(spec.depends_on for spec in self.specs)

    def run(self, store: SQLiteJobStore, conn: sqlite3.Connection) -> Any:
        """
        Apply this write alone.
        """
        return store._submit(conn, self.specs, self.now, self.ids, self.idempotency)


@attrs.frozen
class SubmitPlain:
    """
    Store L{PlainJobs}, all or nothing.
    """

    jobs: PlainJobs
    now: float
    ids: Sequence[str]
    idempotency: Optional[IdempotencyKey]
    durable: ClassVar[bool] = True

    @property
    def plain(self) -> bool:
        """
        Whether nothing but the database itself can refuse it: no
        idempotency key to check.
        """
        return self.idempotency is None

    def run(self, store: SQLiteJobStore, conn: sqlite3.Connection) -> Any:
        """
        Apply this write alone.
        """
        return store._submit_plain_jobs(conn, self.jobs, self.now, self.ids, self.idempotency)


@attrs.frozen
class Claim:
    """
    Lease queued jobs to a holder.
    """

    offer: Offer
    capacity: int
    free: Resources
    now: float
    lease_seconds: float
    durable: ClassVar[bool] = False

    def run(self, store: SQLiteJobStore, conn: sqlite3.Connection) -> Any:
        """
        Apply this write alone.
        """
        return store._claim(
            conn, self.offer, self.capacity, self.free, self.now, self.lease_seconds
        )


@attrs.frozen
class ResumeLeases:
    """
    Extend the leases of remote holders at start-up.
    """

    local_holder: str
    now: float
    lease_seconds: float
    durable: ClassVar[bool] = False

    def run(self, store: SQLiteJobStore, conn: sqlite3.Connection) -> Any:
        """
        Apply this write alone.
        """
        return store._resume_leases(conn, self.local_holder, self.now, self.lease_seconds)


@attrs.frozen
class RecordProcess:
    """
    Remember the process group that runs an attempt.
    """

    lease: Lease
    pid: int
    start_ticks: Optional[int]
    boot_id: Optional[str]
    durable: ClassVar[bool] = False

    def run(self, store: SQLiteJobStore, conn: sqlite3.Connection) -> Any:
        """
        Apply this write alone.
        """
        return store._record_process(conn, self.lease, self.pid, self.start_ticks, self.boot_id)


@attrs.frozen
class MarkRunning:
    """
    A staged job starts running.
    """

    lease: Lease
    now: float
    durable: ClassVar[bool] = False

    def run(self, store: SQLiteJobStore, conn: sqlite3.Connection) -> Any:
        """
        Apply this write alone.
        """
        return store._mark_running(conn, self.lease, self.now)


@attrs.frozen
class Finish:
    """
    Record how an attempt ended.
    """

    lease: Lease
    outcome: Outcome
    now: float
    durable: ClassVar[bool] = False

    @property
    def success(self) -> bool:
        """
        Whether the attempt succeeded on its own (no cancel stopped it).
        """
        return self.outcome.state is JobState.SUCCEEDED and not self.outcome.stopped

    def run(self, store: SQLiteJobStore, conn: sqlite3.Connection) -> Any:
        """
        Apply this write alone.
        """
        return store._finish(conn, self.lease, self.outcome, self.now)


@attrs.frozen
class Release:
    """
    Give an attempt up without spending it.
    """

    lease: Lease
    now: float
    reason: str
    durable: ClassVar[bool] = False

    def run(self, store: SQLiteJobStore, conn: sqlite3.Connection) -> Any:
        """
        Apply this write alone.
        """
        return store._release(conn, self.lease, self.now, self.reason)


@attrs.frozen
class Cancel:
    """
    Cancel a job (at once, or by asking its holder).
    """

    job_id: str
    now: float
    durable: ClassVar[bool] = True

    def run(self, store: SQLiteJobStore, conn: sqlite3.Connection) -> Any:
        """
        Apply this write alone.
        """
        return store._cancel(conn, self.job_id, self.now)


@attrs.frozen
class Retry:
    """
    Put a failed or cancelled job back in line.
    """

    job_id: str
    now: float
    dependents: bool
    durable: ClassVar[bool] = True

    def run(self, store: SQLiteJobStore, conn: sqlite3.Connection) -> Any:
        """
        Apply this write alone.
        """
        return store._retry(conn, self.job_id, self.now, self.dependents)


@attrs.frozen
class PromoteDue:
    """
    Queue the pending jobs whose time has come.
    """

    now: float
    durable: ClassVar[bool] = False

    def run(self, store: SQLiteJobStore, conn: sqlite3.Connection) -> Any:
        """
        Apply this write alone.
        """
        return store._promote_due(conn, self.now)


@attrs.frozen
class PurgeIdempotency:
    """
    Forget idempotency keys past their time to live.
    """

    now: float
    durable: ClassVar[bool] = False

    def run(self, store: SQLiteJobStore, conn: sqlite3.Connection) -> Any:
        """
        Apply this write alone.
        """
        return store._purge_idempotency(conn, self.now)


@attrs.frozen
class Recover:
    """
    Record the attempts a holder left running as lost.
    """

    holder: str
    now: float
    durable: ClassVar[bool] = False

    def run(self, store: SQLiteJobStore, conn: sqlite3.Connection) -> Any:
        """
        Apply this write alone.
        """
        return store._recover(conn, self.holder, self.now)
