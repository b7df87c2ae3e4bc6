"""
The SQLite job store: the default, embedded store.

Submissions, cancels and retries sync to the disk before their answer;
commits of run-state changes alone (claims, starts, ends) sync within
C{sync_interval}, or with the next commit that does.

One writer thread owns the only writing connection and commits in groups:
every write asked for while a transaction is being committed (or in the
same reactor iteration as the first) waits for the next one, which takes
all of them at once, each in its own savepoint so a
failing write changes nothing while its neighbours commit.  Every write's
Deferred fires only after the commit that holds it.  Reads run on a small
pool of WAL reader connections.  No SQLite call runs on the reactor thread.
"""

from __future__ import annotations

import functools
import itertools
import json
import operator
import os
import random
import sqlite3
import threading
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import orjson
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from dispatcher.model._claims import choose_jobs, queues_at_limit, room_in_queues
from dispatcher.store._interface import IJobStore
from dispatcher.store._results import (
    Claimed,
    CommitFailed,
    DependencyNotRetried,
    IdempotencyConflict,
    IdempotencyKey,
    LostAttempt,
    ReadFailed,
    ResumedLease,
    StoreError,
    Submitted,
    SubmittedIds,
    UnknownDependency,
    WriteRefused,
    Written,
)
from dispatcher.store._schema import migrate
from dispatcher.store._writes import (
    DURABLE,
    Cancel,
    Claim,
    Finish,
    MarkRunning,
    PromoteDue,
    PurgeIdempotency,
    RecordProcess,
    Recover,
    Release,
    ResumeLeases,
    Retry,
    Submit,
    SubmitPlain,
    Write,
)
from dispatcher.wire._forms import spec_from_stored, spec_to_stored
from dispatcher.wire._json import decode_stored, encode_sorted
from dispatcher.model._jobs import (
    Attempt,
    InvalidTransition,
    Job,
    JobSpec,
    JobState,
    Lease,
    Offer,
    Outcome,
    PlainJobs,
    Resources,
    StaleLease,
    StoreClosed,
    UnknownJob,
    format_time,
    may_transition,
)
from dispatcher._threads import TaskThreads

log = Logger()


def jittered_backoff(delay: float, spent: int) -> float:
    """
    The wait before retry number C{spent}: C{delay} doubled for each
    earlier failure, capped at an hour (or C{delay}, if longer), times a
    random factor between 0.5 and 1.5 so that jobs that failed together do
    not come back together.
    """
    base = min(delay * 2 ** (spent - 1), max(delay, 3600.0))
    return base * random.uniform(0.5, 1.5)


_QUEUED_REASON = "waiting for a free slot"

# The jobs that hold a lease: only staging and running ones do.
_LEASED = "state IN ('staging', 'running') AND lease_token IS NOT NULL"


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


_INSERTED_COLUMNS = (
    "seq", "id", "state", "name", "labels", "spec", "created_at", "finished_at",
    "error", "wait_reason", "priority", "queue", "max_attempts", "retry_delay",
    "timeout", "not_before", "waiting_on", "array_id", "array_index", "cancelled_by",
)
_NO_VALUES = (None,) * len(_INSERTED_COLUMNS)


@functools.lru_cache(maxsize=64)
def _insert_job_statement(present: tuple[bool, ...]) -> str:
    columns = list(itertools.compress(_INSERTED_COLUMNS, present))
    return (
        f"INSERT INTO jobs ({', '.join(columns)})"
        f" VALUES ({', '.join('?' * len(columns))})"
    )


def _insert_jobs(conn: sqlite3.Connection, rows: Sequence[tuple[Any, ...]]) -> None:
    """
    Insert job rows (tuples in L{_INSERTED_COLUMNS} order), one C{executemany}
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
_MAX_SEQ = "SELECT COALESCE(MAX(seq), 0) FROM jobs"
# An attempt's end, and a job's at its final state.
_END_ATTEMPT = "UPDATE attempts SET finished_at = ?, exit_code = ?, error = ? WHERE token = ?"
_END_JOB = (
    "UPDATE jobs SET state = ?, finished_at = ?, exit_code = ?, result = ?,"
    " error = ?, attempts_spent = ?, wait_reason = NULL, lease_token = NULL,"
    " lease_holder = NULL, lease_expires = NULL WHERE id = ?"
)


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
) -> Job:
    """
    Add a new job's row (and its labels' rows) to those to insert, and
    return the job.
    """
    # In _INSERTED_COLUMNS order.
    rows.append((
        seq,
        job_id,
        state.value,
        spec.name,
        encode_sorted(spec.labels) if spec.labels else "{}",
        encode_sorted(spec_to_stored(spec)),
        now,
        finished_at,
        error,
        wait_reason,
        spec.priority,
        spec.queue,
        spec.max_attempts,
        spec.retry_delay,
        spec.timeout,
        spec.not_before,
        unmet,
        spec.array_id,
        spec.array_index,
        cancelled_by,
    ))
    if spec.labels:
        label_rows.extend((k, v, seq) for k, v in spec.labels.items())
    return Job(
        id=job_id,
        state=state,
        spec=spec,
        created_at=now,
        finished_at=finished_at,
        error=error,
        wait_reason=wait_reason,
        cancelled_by=cancelled_by,
    )


def _add_plain_jobs(
    conn: sqlite3.Connection, seq: int, jobs: PlainJobs, now: float, ids: list[str]
) -> Written:
    """
    Insert L{PlainJobs}, queued, numbered after C{seq}: one statement that
    reads each job's id and stored spec from one JSON array, the other
    columns being the same for all (where SQLite has its JSON functions,
    L{JSON_ROWS}; else one C{executemany} of rows).
    """
    timeout = jobs.timeout is not None
    rest: tuple[Any, ...] = (
        _QUEUED_REASON, jobs.priority, jobs.queue, jobs.max_attempts, jobs.retry_delay
    )
    if timeout:
        rest += (jobs.timeout,)
    if JSON_ROWS:
        # Binding a row's eleven values from Python was a third of the
        # writer's time for a plain batch; SQLite reads the JSON faster.
        pairs = orjson.dumps(list(zip(ids, jobs.stored))).decode()
        conn.execute(_INSERT_PLAIN_JSON[timeout], (seq, pairs, now, *rest))
    else:
        present = [
            column in _PLAIN_COLUMNS or (column == "timeout" and timeout)
            for column in _INSERTED_COLUMNS
        ]
        # In _INSERTED_COLUMNS order.
        fixed = (JobState.QUEUED.value, "{}")
        rows = [
            (number, job_id, *fixed, stored, now, *rest)
            for number, job_id, stored in zip(itertools.count(seq + 1), ids, jobs.stored)
        ]
        conn.executemany(_insert_job_statement(tuple(present)), rows)
    return Written(
        SubmittedIds(ids), tuple(zip(ids, itertools.repeat(JobState.QUEUED)))
    )


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


# Whether this SQLite has the JSON functions _add_plain_jobs reads rows with.
JSON_ROWS = _has_json_functions()
# Plain jobs from a JSON array of [id, stored spec] pairs, numbered after
# ?1; the second statement sets a timeout as well.
_INSERT_PLAIN_JSON = tuple(
    "INSERT INTO jobs (seq, id, spec, state, labels, created_at, wait_reason,"
    f" priority, queue, max_attempts, retry_delay{', timeout' if timeout else ''})"
    " SELECT ?1 + 1 + key, json_extract(value, '$[0]'), json_extract(value, '$[1]'),"
    f" 'queued', '{{}}', ?3, ?4, ?5, ?6, ?7, ?8{', ?9' if timeout else ''}"
    " FROM json_each(?2)"
    for timeout in (False, True)
)


# The columns a plain job's row has a value in (and "timeout", if its queue
# has one).
_PLAIN_COLUMNS = frozenset({
    "seq", "id", "state", "labels", "spec", "created_at", "wait_reason", "priority",
    "queue", "max_attempts", "retry_delay",
})


def _store_error(error: Exception) -> StoreError:
    """
    The store's own error for what SQLite (or the file system) raised
    while writing: L{WriteRefused} for a broken constraint (the same write
    would be refused again), else L{CommitFailed}.
    """
    kind = WriteRefused if isinstance(error, sqlite3.IntegrityError) else CommitFailed
    failed = kind(str(error))
    failed.__cause__ = error
    return failed


class _Replay(Exception):
    """
    A group's shared path met a case it leaves to the writes one by one.
    """


@implementer(IJobStore)
class SQLiteJobStore:
    """
    L{IJobStore} on one SQLite file, in WAL mode with C{synchronous=FULL}:
    a committed job survives power loss, not only a killed process.  The
    interface documents the methods it declares; each queues a typed
    write command (L{dispatcher.store._writes}) or runs a read.

    @param path: the database file.
    @param reactor: the reactor the Deferreds fire in.
    @param readers: how many reader threads (and connections) to keep.
    @param queues: the queue names and their limits of running jobs (0: no
        limit); C{default} is always there.
    @param idempotency_ttl: seconds an idempotency key is kept.
    @param backoff: the wait before a retry, from the retry delay and the
        number of attempts spent.
    @param sync_interval: seconds a commit of nothing but run-state changes
        (claims, starts, ends, releases, wake-ups) may wait to reach the
        disk; 0 syncs every commit.  Submissions, cancels and retries, which
        a client is told are done, always sync before their answer, and the
        sync of one makes every earlier commit durable as well.
    @param clock: the clock that times those syncs (the reactor's if not
        given).
    """

    def __init__(
        self,
        path: str,
        reactor: Any,
        readers: int = 2,
        queues: Optional[Mapping[str, int]] = None,
        idempotency_ttl: float = 86400.0,
        backoff: Callable[[float, int], float] = jittered_backoff,
        sync_interval: float = 1.0,
        clock: Any = None,
    ) -> None:
        self._path = path
        # Queue names, in the order they take turns, and their limits of
        # running jobs (0: none).
        self._limits: dict[str, int] = dict(queues or {"default": 0})
        self._limits.setdefault("default", 0)
        self._queues = sorted(self._limits)
        self._limited = any(self._limits.values())
        self._turn = 0
        self._idempotency_ttl = idempotency_ttl
        self._backoff = backoff
        self._reactor = reactor
        self._writer_pool = TaskThreads(reactor, 1, name="store-writer")
        self._reader_pool = TaskThreads(reactor, readers, name="store-reader")
        self._writer: Optional[sqlite3.Connection] = None
        self._readers_local = threading.local()
        self._reader_connections: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._pending: list[tuple[Write, Deferred]] = []
        self._flushing = False
        self._sync_interval = sync_interval
        self._clock = clock if clock is not None else reactor
        self._syncer: Optional[LoopingCall] = None
        # The writer thread's own: the connection's synchronous setting,
        # and whether a commit since the last sync has not reached the disk.
        self._synchronous_full = True
        self._unsynced = False
        self.syncs = 0
        self._closing: Optional[Deferred] = None
        self._next_token = 1
        # Whether any job may have dependents (the writer thread's own).
        self._dependencies = True
        self._shut = False
        # Commits, and those of them that synced the disk.
        self.batches = 0
        self.durable_batches = 0
        # The operation that applies each kind of write, with the write's
        # fields as its arguments.
        self._operations: dict[type, Callable[..., Any]] = {
            Submit: self._submit,
            SubmitPlain: self._submit_plain_jobs,
            Claim: self._claim,
            ResumeLeases: self._resume_leases,
            RecordProcess: self._record_process,
            MarkRunning: self._mark_running,
            Finish: self._finish,
            Release: self._release,
            Cancel: self._cancel,
            Retry: self._retry,
            PromoteDue: self._promote_due,
            PurgeIdempotency: self._purge_idempotency,
            Recover: self._recover,
        }

    @property
    def queue_limits(self) -> Mapping[str, int]:
        """
        Each queue's limit of running jobs (0: none).
        """
        return dict(self._limits)

    # Life cycle

    def open(self) -> Deferred:
        self._writer_pool.start()
        self._reader_pool.start()
        d = self._writer_pool.defer(self._open_in_thread)
        if self._sync_interval > 0:

            def start_syncing(result: Any) -> Any:
                self._syncer = LoopingCall(self.sync)
                self._syncer.clock = self._clock
                self._syncer.start(self._sync_interval, now=False).addErrback(
                    lambda f: log.failure("syncing the store stopped", f)
                )
                return result

            d.addCallback(start_syncing)
        return d

    @property
    def unsynced(self) -> bool:
        """
        Whether a commit has not reached the disk yet (one of run-state
        changes alone, since the last sync).
        """
        return self._unsynced

    def sync(self) -> Deferred:
        """
        Make every commit so far durable; fires once it is.  Run every
        C{sync_interval} seconds, and as the store closes.
        """
        if self._closing is not None and self._shut:
            return succeed(None)
        return self._writer_pool.defer(self._sync_in_thread)

    def _sync_in_thread(self) -> None:
        # Runs on the writer thread between groups: no commit is under way.
        if not self._unsynced or self._writer is None:
            return
        try:
            fd = os.open(self._path + "-wal", os.O_RDONLY)
        except FileNotFoundError:
            # Checkpointed and gone: the database file holds it all.
            self._unsynced = False
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self._unsynced = False
        self.syncs += 1

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self._path, isolation_level=None, check_same_thread=False, timeout=30
        )
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    def _open_in_thread(self) -> None:
        directory = os.path.dirname(os.path.abspath(self._path))
        os.makedirs(directory, exist_ok=True)
        conn = self._connect()
        try:
            migrate(conn, self._path)
        except BaseException:
            conn.close()
            raise
        (top,) = conn.execute("SELECT COALESCE(MAX(token), 0) FROM attempts").fetchone()
        self._next_token = top + 1
        (self._dependencies,) = conn.execute(
            "SELECT EXISTS (SELECT 1 FROM dependencies)"
        ).fetchone()
        self._writer = conn

    def close(self) -> Deferred:
        """
        Finish the writes already asked for, then close every connection.
        """
        if self._closing is None:
            self._closing = Deferred()
            if not self._flushing:
                self._shutdown()
        d = Deferred()
        self._closing.addBoth(lambda r: (d.callback(None), r)[1])
        return d

    def _shutdown(self) -> None:
        if self._shut:
            return
        self._shut = True
        if not self._writer_pool.started:
            # Never opened: nothing to finish.
            assert self._closing is not None
            self._closing.callback(None)
            return

        if self._syncer is not None and self._syncer.running:
            self._syncer.stop()

        def close_all() -> None:
            self._sync_in_thread()
            if self._writer is not None:
                self._writer.close()
                self._writer = None

        def closed(result: Any) -> None:
            self._writer_pool.stop()
            self._reader_pool.stop()
            for conn in self._reader_connections:
                conn.close()
            self._reader_connections.clear()
            assert self._closing is not None
            self._closing.callback(None)

        self._writer_pool.defer(close_all).addBoth(closed)

    # The writer and its group commit

    def _write(self, write: Write) -> Deferred:
        """
        Apply C{write} in the next group; fires after the commit that holds
        it.  That commit syncs to the disk first if the write is durable
        (submissions, cancels, retries: a client is told they are done).
        A change of run state alone (a claim, a start, an end) does not
        wait for the sync: a power loss within C{sync_interval} of its
        commit may undo it, and the job then runs again, as one that was
        running when the power went does.  A crash of the daemon alone
        undoes nothing: the commit is in the kernel's hands.
        """
        if self._closing is not None:
            return fail(StoreClosed("the dispatcher is stopping"))
        d: Deferred = Deferred()
        self._pending.append((write, d))
        if not self._flushing:
            # The group starts at the end of this reactor iteration, so
            # that every request read in it joins.  Started at once, it
            # took only the first of the requests that came in together
            # after the last commit's answers went out, and every other
            # commit under load held a single job.
            self._flushing = True
            self._reactor.callLater(0, self._flush)
        return d

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        self._flushing = True
        work = [write for write, _ in batch]
        durable = self._sync_interval <= 0 or any(type(write) in DURABLE for write in work)
        d = self._writer_pool.defer(self._commit, work, durable)
        d.addBoth(self._flushed, [deferred for _, deferred in batch])

    def _commit(self, work: list[Write], durable: bool = True) -> list[tuple[bool, Any]]:
        conn = self._writer
        assert conn is not None
        results: list[tuple[bool, Any]] = []
        try:
            if durable != self._synchronous_full:
                # In WAL mode FULL syncs the log at every commit; NORMAL
                # leaves it to the next FULL commit, the next sync or a
                # checkpoint.
                conn.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")
                self._synchronous_full = durable
            conn.execute("BEGIN IMMEDIATE")
            try:
                try:
                    results = self._run_together(conn, work)
                except Exception:
                    # The group is the whole transaction: undo it all
                    # (unless SQLite already has, as it does for a full
                    # disk) and run each write in its own savepoint, so
                    # that only the one that failed fails.  (A savepoint
                    # around the group cost every page the group changed a
                    # copy in the sub-journal, and past 64 KiB a temporary
                    # file, most groups under load.  Writes seldom fail; a
                    # write is undone whole or not at all either way.  What
                    # a replayed write did outside the database is harmless
                    # to do twice: it takes fresh lease tokens, and moves
                    # the queues' turn on.)
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    conn.execute("BEGIN IMMEDIATE")
                    results = [self._apply_one(conn, write) for write in work]
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except (sqlite3.Error, OSError) as e:
            raise _store_error(e) from e
        self._unsynced = not durable
        self.batches += 1
        self.durable_batches += durable
        return results

    def _apply_one(self, conn: sqlite3.Connection, write: Write) -> tuple[bool, Any]:
        """
        Run one write in its own savepoint: if it fails, what it did is
        undone and the rest of its group goes on.
        """
        conn.execute("SAVEPOINT operation")
        try:
            value = self._operations[type(write)](conn, *write)
        except Exception as e:
            conn.execute("ROLLBACK TO operation")
            conn.execute("RELEASE operation")
            if isinstance(e, (sqlite3.Error, OSError)):
                return (False, Failure(_store_error(e)))
            return (False, Failure())
        conn.execute("RELEASE operation")
        return (True, value)

    def _plain_submission(self, write: Write) -> bool:
        """
        Whether a write is a submission that nothing but SQLite itself can
        refuse: no idempotency key to check, no dependency to look up.
        """
        kind = type(write)
        if kind is SubmitPlain:
            return write.idempotency is None  # type: ignore[union-attr]
        return kind is Submit and write.plain  # type: ignore[union-attr]

    def _plain_success(self, write: Write) -> bool:
        """
        Whether a write is the end of an attempt that succeeded on its own,
        while no job has dependents to free.
        """
        return type(write) is Finish and write.success and not self._dependencies

    def _run_together(
        self, conn: sqlite3.Connection, work: list[Write]
    ) -> list[tuple[bool, Any]]:
        """
        Run a group's writes one after the other (a savepoint for each was
        a tenth of the writer's time for a job); the first that fails
        raises, and L{_commit} replays the group one write at a time.

        Plain submissions next to each other are stored with one insert,
        and plain successes next to each other with one read and two
        updates.
        """
        results: list[tuple[bool, Any]] = []
        shared = (
            (self._plain_submission, self._submit_plain),
            (self._plain_success, self._finish_together),
        )
        i = 0
        while i < len(work):
            for alike, together in shared:
                j = i
                while j < len(work) and alike(work[j]):
                    j += 1
                if j - i > 1:
                    results.extend((True, w) for w in together(conn, work[i:j]))
                    i = j
                    break
            else:
                write = work[i]
                results.append((True, self._operations[type(write)](conn, *write)))
                i += 1
        return results

    def _finish_together(self, conn: sqlite3.Connection, work: list[Finish]) -> list[Written]:
        """
        Record several plain successes with one read and two updates, as
        L{_finish} would one by one.  Anything L{_finish} would treat
        otherwise (a stale lease, a cancel asked for meanwhile) raises
        L{_Replay}, and the group is replayed one write at a time.
        """
        leases = [write.lease for write in work]
        marks = ",".join("?" * len(leases))
        rows = {
            row[0]: row[1:]
            for row in conn.execute(
                f"SELECT id, state, lease_token, cancel_requested, attempts_spent"
                f" FROM jobs WHERE id IN ({marks})",
                [lease.job_id for lease in leases],
            )
        }
        attempts = []
        jobs = []
        written = []
        for write in work:
            lease, outcome, now = write.lease, write.outcome, write.now
            row = rows.pop(lease.job_id, None)
            if (
                row is None
                or row[1] != lease.token
                or row[2]
                or not may_transition(JobState(row[0]), JobState.SUCCEEDED)
            ):
                raise _Replay()
            result = None if outcome.result is None else _dumps(outcome.result)
            attempts.append((now, outcome.exit_code, outcome.error, lease.token))
            jobs.append(
                ("succeeded", now, outcome.exit_code, result, outcome.error, row[3] + 1,
                 lease.job_id)
            )
            written.append(Written(None, ((lease.job_id, JobState.SUCCEEDED),)))
        conn.executemany(_END_ATTEMPT, attempts)
        conn.executemany(_END_JOB, jobs)
        return written

    def _submit_plain(
        self, conn: sqlite3.Connection, work: list[Submit | SubmitPlain]
    ) -> list[Written]:
        """
        Store several plain submissions with one sequence query and one
        insert (a one-row insert, a query and a savepoint for each were a
        third of the writer's time per submission).
        """
        (seq,) = conn.execute(_MAX_SEQ).fetchone()
        rows: list[tuple[Any, ...]] = []
        label_rows: list[tuple[str, str, int]] = []
        written: list[Written] = []
        for write in work:
            now, ids = write.now, write.ids
            if type(write) is SubmitPlain:
                written.append(_add_plain_jobs(conn, seq, write.jobs, now, ids))
                seq += len(ids)
                continue
            specs = write.specs  # type: ignore[union-attr]
            changed = []
            jobs = []
            wake = None
            for spec, job_id in zip(specs, ids):
                if spec.not_before is not None:
                    state, wait_reason = _waiting([], spec.not_before, now)
                    if spec.not_before > now and (wake is None or spec.not_before < wake):
                        wake = spec.not_before
                else:
                    state, wait_reason = JobState.QUEUED, _QUEUED_REASON
                seq += 1
                jobs.append(
                    _add_job(rows, label_rows, seq, job_id, state, spec, now, wait_reason)
                )
                changed.append((job_id, state))
            written.append(Written(Submitted(jobs, replayed=False), tuple(changed), wake))
        _insert_jobs(conn, rows)
        if label_rows:
            conn.executemany(_INSERT_LABEL, label_rows)
        return written

    def _flushed(self, outcome: Any, deferreds: list[Deferred]) -> None:
        # Still flushing while the callbacks run: a write one of them asks
        # for joins the next group, which starts once they are done.
        if isinstance(outcome, Failure):
            # The commit itself failed (a full disk, say): nothing of the
            # batch was written, and every writer hears so.
            log.failure("store commit failed", outcome)
            for d in deferreds:
                d.errback(outcome)
        else:
            for d, (ok, value) in zip(deferreds, outcome):
                if ok:
                    d.callback(value)
                else:
                    d.errback(value)
        self._flushing = False
        if self._pending:
            self._flush()
        elif self._closing is not None and not self._closing.called:
            self._shutdown()

    # Reads

    def _read(self, operation: Callable[..., Any], *args: Any) -> Deferred:
        if self._closing is not None:
            # A stopped pool would drop the work and leave the caller hanging.
            return fail(StoreClosed("the dispatcher is stopping"))
        return self._reader_pool.defer(self._read_in_thread, operation, args)

    def _read_in_thread(self, operation: Callable[..., Any], args: tuple) -> Any:
        try:
            conn = getattr(self._readers_local, "conn", None)
            if conn is None:
                conn = self._connect()
                self._readers_local.conn = conn
                with self._readers_lock:
                    self._reader_connections.append(conn)
            conn.execute("BEGIN")
            try:
                return operation(conn, *args)
            finally:
                conn.execute("COMMIT")
        except (sqlite3.Error, OSError) as e:
            raise ReadFailed(str(e)) from e

    # The interface

    def submit(
        self,
        specs: Sequence[JobSpec],
        now: float,
        ids: Sequence[str],
        idempotency: Optional[IdempotencyKey] = None,
    ) -> Deferred:
        return self._write(Submit(list(specs), now, list(ids), idempotency))

    def submit_plain(
        self,
        jobs: PlainJobs,
        now: float,
        ids: Sequence[str],
        idempotency: Optional[IdempotencyKey] = None,
    ) -> Deferred:
        """
        Store L{PlainJobs} with their new ids, all or nothing; fires with
        L{SubmittedIds}, or with the L{Submitted} jobs of an earlier request
        with the same idempotency key.
        """
        return self._write(SubmitPlain(jobs, now, list(ids), idempotency))

    def _submit_plain_jobs(
        self,
        conn: sqlite3.Connection,
        jobs: PlainJobs,
        now: float,
        ids: list[str],
        idempotency: Optional[IdempotencyKey],
    ) -> Written:
        replayed = self._replayed(conn, idempotency, now)
        if replayed is not None:
            return replayed
        (seq,) = conn.execute(_MAX_SEQ).fetchone()
        written = _add_plain_jobs(conn, seq, jobs, now, ids)
        self._remember(conn, idempotency, ids, now)
        return written

    def _replayed(
        self, conn: sqlite3.Connection, idempotency: Optional[IdempotencyKey], now: float
    ) -> Optional[Written]:
        """
        What an earlier request with the same idempotency key made, if it
        is still remembered; an expired key is forgotten.
        """
        if idempotency is None:
            return None
        row = conn.execute(
            "SELECT digest, job_ids, created_at FROM idempotency WHERE key = ?",
            (idempotency.key,),
        ).fetchone()
        if row is not None and row[2] >= now - self._idempotency_ttl:
            if row[0] != idempotency.digest:
                raise IdempotencyConflict(idempotency.key)
            jobs = [_get_job(conn, job_id) for job_id in json.loads(row[1])]
            return Written(Submitted(jobs, replayed=True))
        if row is not None:
            conn.execute("DELETE FROM idempotency WHERE key = ?", (idempotency.key,))
        return None

    @staticmethod
    def _remember(
        conn: sqlite3.Connection,
        idempotency: Optional[IdempotencyKey],
        ids: list[str],
        now: float,
    ) -> None:
        if idempotency is not None:
            conn.execute(
                "INSERT INTO idempotency (key, digest, job_ids, created_at)"
                " VALUES (?, ?, ?, ?)",
                (idempotency.key, idempotency.digest, _dumps(ids), now),
            )

    def _submit(
        self,
        conn: sqlite3.Connection,
        specs: list[JobSpec],
        now: float,
        ids: list[str],
        idempotency: Optional[IdempotencyKey],
    ) -> Written:
        replayed = self._replayed(conn, idempotency, now)
        if replayed is not None:
            return replayed
        changed: list[tuple[str, JobState]] = []
        in_batch: dict[str, JobState] = {}
        jobs: list[Job] = []
        # Rows are gathered and inserted with executemany (one statement per
        # job was most of a large batch's time on the writer thread), so
        # each job's seq is given here rather than left to SQLite: no other
        # write runs inside this transaction.
        rows: list[tuple[Any, ...]] = []
        label_rows: list[tuple[str, str, int]] = []
        (seq,) = conn.execute(_MAX_SEQ).fetchone()

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
                deps = _resolve_dependencies(conn, spec, index, in_batch)
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
                state, wait_reason = _waiting(unmet, spec.not_before, now)
            else:
                state, wait_reason = JobState.QUEUED, _QUEUED_REASON
            seq += 1
            jobs.append(
                _add_job(rows, label_rows, seq, job_id, state, spec, now, wait_reason,
                         len(unmet), finished_at, error, cancelled_by)
            )
            if deps:
                self._dependencies = True
                conn.executemany(
                    "INSERT INTO dependencies (depends_on, job_id) VALUES (?, ?)",
                    [(d, job_id) for d in deps],
                )
            in_batch[job_id] = state
            changed.append((job_id, state))
        insert_rows()
        self._remember(conn, idempotency, ids, now)
        wake = [s.not_before for s in specs if s.not_before is not None and s.not_before > now]
        return Written(Submitted(jobs, replayed=False), tuple(changed),
                       min(wake) if wake else None)

    def get(self, job_id: str) -> Deferred:
        return self._read(_get_job, job_id, self._limits)

    def list_jobs(
        self,
        state: Optional[JobState] = None,
        labels: Iterable[tuple[str, Optional[str]]] = (),
        limit: int = 100,
        cursor: Optional[int] = None,
    ) -> Deferred:
        return self._read(_list_jobs, state, tuple(labels), limit, cursor, self._limits)

    def count_by_state(self) -> Deferred:
        return self._read(_count_by_state)

    def queue_counts(self) -> Deferred:
        """
        Fire with C{{queue: {state: count}}} for every configured queue.
        """
        return self._read(_queue_counts, tuple(self._queues))

    def unconfigured_queues(self) -> Deferred:
        """
        Fire with C{{queue: queued jobs}} for the queues that hold queued
        jobs but are not configured.  It seeks from queue name to queue
        name along the queued index, so a million queued jobs cost what a
        handful of queues do.
        """
        return self._read(_unconfigured_queues, frozenset(self._queues))

    def next_due(self) -> Deferred:
        """
        Fire with the earliest time a pending job becomes due, or C{None}.
        """
        return self._read(_next_due)

    def claim(
        self,
        offer: Offer,
        capacity: int,
        now: float,
        lease_seconds: float,
        free: Optional[Resources] = None,
    ) -> Deferred:
        """
        Lease to C{offer.holder} up to C{capacity} queued jobs that fit it,
        highest priority first; C{free} is what its resources are less what
        its running jobs use (all of C{offer.resources} if not given).
        """
        if capacity <= 0:
            return succeed(Claimed([], blocked=False))
        if free is None:
            free = offer.resources
        return self._write(Claim(offer, capacity, free, now, lease_seconds))

    def _claim(
        self,
        conn: sqlite3.Connection,
        offer: Offer,
        capacity: int,
        free: Resources,
        now: float,
        lease_seconds: float,
    ) -> Claimed:
        # Running jobs count only against a queue's limit.
        running = dict(
            conn.execute(
                "SELECT queue, COUNT(*) FROM jobs"
                " WHERE state IN ('staging', 'running') GROUP BY queue"
            ).fetchall()
        ) if self._limited else {}
        room = room_in_queues(self._queues, self._limits, running, capacity)
        # Each queue's queued jobs, read lazily in priority order: jobs that
        # do not fit this holder are passed over, so how far to read is not
        # known in advance.  Without INDEXED BY the planner, lacking
        # statistics, may walk the state index and sort every queued job: a
        # hundred times slower with ten thousand queued.
        cursors = {
            queue: conn.execute(
                f"SELECT seq, id, {_SPEC_COLUMNS}, attempt_count"
                " FROM jobs INDEXED BY jobs_queued"
                " WHERE state = 'queued' AND queue = ?"
                " ORDER BY priority DESC, seq",
                (queue,),
            )
            for queue in self._queues
            if room[queue] > 0
        }
        choice = choose_jobs(
            cursors, room, self._queues, self._turn, offer, free, capacity,
            _ROW_PRIORITY, _claimed_spec,
        )
        self._turn = choice.turn
        for cursor in cursors.values():
            cursor.close()
        chosen = choice.chosen
        taken = choice.taken
        leases = []
        expires = now + lease_seconds
        holder = offer.holder
        updates = []
        attempts = []
        for row, spec in chosen:
            seq, job_id = row[0], row[1]
            token = self._next_token
            self._next_token += 1
            number = row[13] + 1
            if spec.inputs:
                updates.append(("staging", number, token, holder, expires, None, seq))
            else:
                updates.append(("running", number, token, holder, expires, now, seq))
            attempts.append((job_id, number, token, holder, now))
            leases.append(Lease(job_id, number, token, holder, expires, spec))
        if chosen:
            conn.executemany(
                "UPDATE jobs SET state = ?, attempt_count = ?, lease_token = ?,"
                " lease_holder = ?, lease_expires = ?, wait_reason = NULL,"
                " started_at = ? WHERE seq = ?",
                updates,
            )
            conn.executemany(
                "INSERT INTO attempts (job_id, number, token, holder, started_at)"
                " VALUES (?, ?, ?, ?, ?)",
                attempts,
            )
        blocked = False
        if self._limited:
            after = {q: running.get(q, 0) + taken.get(q, 0) for q in self._limits}
            for queue in queues_at_limit(self._limits, after):
                if conn.execute(
                    "SELECT 1 FROM jobs WHERE state = 'queued' AND queue = ? LIMIT 1",
                    (queue,),
                ).fetchone():
                    blocked = True
        return Claimed(leases, blocked, choice.skipped, choice.drained)

    def resume_leases(self, local_holder: str, now: float, lease_seconds: float) -> Deferred:
        """
        At start-up: every lease held by a remote worker lives on, its
        expiry moved to C{now + lease_seconds} (the dispatcher's downtime
        must not count against a worker that kept working).  Fires with the
        L{Written} list of L{ResumedLease}s.
        """
        return self._write(ResumeLeases(local_holder, now, lease_seconds))

    def _resume_leases(
        self, conn: sqlite3.Connection, local_holder: str, now: float, lease_seconds: float
    ) -> Written:
        expires = now + lease_seconds
        rows = conn.execute(
            f"SELECT id, {_SPEC_COLUMNS}, attempt_count, lease_token,"
            " lease_holder, state, cancel_requested FROM jobs INDEXED BY jobs_state"
            f" WHERE {_LEASED} AND lease_holder != ?",
            (local_holder,),
        ).fetchall()
        conn.execute(
            "UPDATE jobs INDEXED BY jobs_state SET lease_expires = ?"
            f" WHERE {_LEASED} AND lease_holder != ?",
            (expires, local_holder),
        )
        resumed = [
            ResumedLease(
                Lease(row[0], row[12], row[13], row[14], expires, _spec_from_row(row[1:12])),
                JobState(row[15]),
                bool(row[16]),
            )
            for row in rows
        ]
        return Written(resumed)

    def record_process(
        self, lease: Lease, pid: int, start_ticks: Optional[int], boot_id: Optional[str]
    ) -> Deferred:
        return self._write(RecordProcess(lease, pid, start_ticks, boot_id))

    def _record_process(
        self,
        conn: sqlite3.Connection,
        lease: Lease,
        pid: int,
        start_ticks: Optional[int],
        boot_id: Optional[str],
    ) -> None:
        _check_lease(conn, lease)
        conn.execute(
            "UPDATE attempts SET pid = ?, start_ticks = ?, boot_id = ? WHERE token = ?",
            (pid, start_ticks, boot_id, lease.token),
        )

    def mark_running(self, lease: Lease, now: float) -> Deferred:
        return self._write(MarkRunning(lease, now))

    def _mark_running(self, conn: sqlite3.Connection, lease: Lease, now: float) -> Written:
        state = _check_lease(conn, lease)
        if state is not JobState.STAGING:
            raise InvalidTransition(lease.job_id, state, JobState.RUNNING)
        conn.execute(
            "UPDATE jobs SET state = 'running', started_at = ? WHERE id = ?",
            (now, lease.job_id),
        )
        return Written(None, ((lease.job_id, JobState.RUNNING),))

    def finish(self, lease: Lease, outcome: Outcome, now: float) -> Deferred:
        return self._write(Finish(lease, outcome, now))

    def _finish(
        self, conn: sqlite3.Connection, lease: Lease, outcome: Outcome, now: float
    ) -> Written:
        row = conn.execute(
            "SELECT state, lease_token, cancel_requested, attempts_spent, max_attempts,"
            " retry_delay FROM jobs WHERE id = ?",
            (lease.job_id,),
        ).fetchone()
        if row is None:
            raise UnknownJob(lease.job_id)
        if row[1] != lease.token:
            raise StaleLease(lease.job_id, lease.token)
        state = JobState(row[0])
        cancel_requested, spent, max_attempts, retry_delay = row[2:]
        error = outcome.error
        result = None if outcome.result is None else _dumps(outcome.result)
        if cancel_requested and (outcome.stopped or outcome.state is not JobState.SUCCEEDED):
            # A job that succeeded before the cancel reached it keeps its
            # success; one the cancel stopped is cancelled, its late result
            # dropped.
            target = JobState.CANCELLED
            error = "cancelled while it ran" + (f" ({error})" if error else "")
            result = None
        else:
            target = outcome.state
        retried = target is JobState.FAILED and spent + 1 < max_attempts
        if not may_transition(state, JobState.QUEUED if retried else target):
            raise InvalidTransition(lease.job_id, state, target)
        conn.execute(_END_ATTEMPT, (now, outcome.exit_code, error, lease.token))
        spent += 1
        if retried:
            return self._retry_later(
                conn, lease.job_id, state, spent, retry_delay, now, error,
                outcome.exit_code, result,
            )
        conn.execute(
            _END_JOB,
            (target.value, now, outcome.exit_code, result, error, spent, lease.job_id),
        )
        changed = [(lease.job_id, target)]
        # Until a job has depended on another, no job has dependents to
        # free or cancel (the query was a twentieth of a no-op job's time).
        wake = (
            _after_final(conn, lease.job_id, target, now, changed)
            if self._dependencies
            else None
        )
        return Written(None, tuple(changed), wake)

    def _retry_later(
        self,
        conn: sqlite3.Connection,
        job_id: str,
        state: JobState,
        spent: int,
        retry_delay: float,
        now: float,
        error: Optional[str],
        exit_code: Optional[int],
        result: Optional[str],
    ) -> Written:
        delay = self._backoff(retry_delay, spent)
        if delay > 0:
            target, due = JobState.PENDING, now + delay
            reason = f"attempt {spent} failed; retrying at {format_time(due)}"
        else:
            target, due = JobState.QUEUED, None
            reason = _QUEUED_REASON
        if not may_transition(state, JobState.QUEUED):
            raise InvalidTransition(job_id, state, target)
        conn.execute(
            "UPDATE jobs SET state = ?, not_before = ?, wait_reason = ?, error = ?,"
            " exit_code = ?, result = ?, attempts_spent = ?, started_at = NULL,"
            " lease_token = NULL, lease_holder = NULL, lease_expires = NULL"
            " WHERE id = ?",
            (target.value, due, reason, error, exit_code, result, spent, job_id),
        )
        return Written(None, ((job_id, target),), due)

    def release(self, lease: Lease, now: float, reason: str) -> Deferred:
        return self._write(Release(lease, now, reason))

    def _release(
        self, conn: sqlite3.Connection, lease: Lease, now: float, reason: str
    ) -> Written:
        state = _check_lease(conn, lease)
        (cancel_requested,) = conn.execute(
            "SELECT cancel_requested FROM jobs WHERE id = ?", (lease.job_id,)
        ).fetchone()
        conn.execute(
            "UPDATE attempts SET finished_at = ?, error = ? WHERE token = ?",
            (now, reason, lease.token),
        )
        if cancel_requested:
            target, wait_reason, finished = JobState.CANCELLED, None, now
        else:
            target, wait_reason, finished = JobState.QUEUED, _QUEUED_REASON, None
        if not may_transition(state, target):
            raise InvalidTransition(lease.job_id, state, target)
        # The attempt stays in the history, but a released attempt is not
        # spent: attempts_spent counts attempts that ended on their own.
        conn.execute(
            "UPDATE jobs SET state = ?, wait_reason = ?, started_at = NULL,"
            " finished_at = ?, lease_token = NULL, lease_holder = NULL,"
            " lease_expires = NULL WHERE id = ?",
            (target.value, wait_reason, finished, lease.job_id),
        )
        changed = [(lease.job_id, target)]
        wake = None
        if target is JobState.CANCELLED:
            wake = _after_final(conn, lease.job_id, target, now, changed)
        return Written(None, tuple(changed), wake)

    def cancel(self, job_id: str, now: float) -> Deferred:
        return self._write(Cancel(job_id, now))

    def _cancel(self, conn: sqlite3.Connection, job_id: str, now: float) -> Written:
        row = conn.execute(
            "SELECT state, lease_token, lease_holder, lease_expires, attempt_count"
            " FROM jobs WHERE id = ?",
            (job_id,),
        ).fetchone()
        if row is None:
            raise UnknownJob(job_id)
        state = JobState(row[0])
        if state.final:
            raise InvalidTransition(job_id, state, JobState.CANCELLED)
        if state.active:
            conn.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
            token, holder, expires, attempt = row[1:]
            job = _get_job(conn, job_id, self._limits)
            lease = Lease(job_id, attempt, token, holder, expires, job.spec)
            return Written((job, lease))
        conn.execute(
            "UPDATE jobs SET state = 'cancelled', finished_at = ?, wait_reason = NULL,"
            " error = 'cancelled before it ran' WHERE id = ?",
            (now, job_id),
        )
        changed = [(job_id, JobState.CANCELLED)]
        wake = _after_final(conn, job_id, JobState.CANCELLED, now, changed)
        return Written((_get_job(conn, job_id, self._limits), None), tuple(changed), wake)

    def retry(self, job_id: str, now: float, dependents: bool) -> Deferred:
        """
        Put a failed or cancelled job back in line with a fresh budget of
        attempts (and, with C{dependents}, the jobs cancelled because of
        it); its attempts stay in its history.
        """
        return self._write(Retry(job_id, now, dependents))

    def _retry(
        self, conn: sqlite3.Connection, job_id: str, now: float, dependents: bool
    ) -> Written:
        row = conn.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise UnknownJob(job_id)
        state = JobState(row[0])
        if state not in (JobState.FAILED, JobState.CANCELLED):
            raise InvalidTransition(job_id, state, JobState.QUEUED)
        changed: list[tuple[str, JobState]] = []
        # Everything coming back, first: a dependent may also wait on
        # another job that comes back with it, which then counts as unmet
        # rather than as failed.
        returning = [job_id]
        if dependents:
            stack = [job_id]
            while stack:
                cause = stack.pop()
                for (dependent,) in conn.execute(
                    "SELECT id FROM jobs WHERE cancelled_by = ? AND state = 'cancelled'",
                    (cause,),
                ).fetchall():
                    returning.append(dependent)
                    stack.append(dependent)
        coming_back = frozenset(returning)
        wakes = [_requeue(conn, j, now, changed, coming_back) for j in returning]
        due = [w for w in wakes if w is not None]
        return Written(
            _get_job(conn, job_id, self._limits), tuple(changed), min(due) if due else None
        )

    def promote_due(self, now: float) -> Deferred:
        """
        Queue every pending job whose time has come; the answer's wake time
        is when the next one is due.
        """
        return self._write(PromoteDue(now))

    def _promote_due(self, conn: sqlite3.Connection, now: float) -> Written:
        due = conn.execute(
            "SELECT id FROM jobs INDEXED BY jobs_due"
            " WHERE state = 'pending' AND waiting_on = 0 AND not_before <= ?",
            (now,),
        ).fetchall()
        changed = []
        for (job_id,) in due:
            conn.execute(
                "UPDATE jobs SET state = 'queued', wait_reason = ? WHERE id = ?",
                (_QUEUED_REASON, job_id),
            )
            changed.append((job_id, JobState.QUEUED))
        return Written(None, tuple(changed), _next_due(conn))

    def purge_idempotency(self, now: float) -> Deferred:
        """
        Forget idempotency keys older than their time to live.
        """
        return self._write(PurgeIdempotency(now))

    def _purge_idempotency(self, conn: sqlite3.Connection, now: float) -> Written:
        cursor = conn.execute(
            "DELETE FROM idempotency WHERE created_at < ?",
            (now - self._idempotency_ttl,),
        )
        return Written(cursor.rowcount)

    def recover(self, holder: str, now: float) -> Deferred:
        return self._write(Recover(holder, now))

    def _recover(self, conn: sqlite3.Connection, holder: str, now: float) -> Written:
        rows = conn.execute(
            "SELECT a.job_id, a.number, a.token, a.pid, a.start_ticks, a.boot_id"
            " FROM jobs j INDEXED BY jobs_state JOIN attempts a ON a.token = j.lease_token"
            f" WHERE {_LEASED} AND j.lease_holder = ?",
            (holder,),
        ).fetchall()
        lost = [LostAttempt(*row) for row in rows]
        reason = "lost: the dispatcher stopped while this attempt ran"
        changed: list[tuple[str, JobState]] = []
        wakes = []
        for attempt in lost:
            lease = Lease(attempt.job_id, attempt.attempt, attempt.token, holder, 0.0,
                          JobSpec())
            written = self._finish(
                conn, lease, Outcome(JobState.FAILED, error=reason), now
            )
            changed.extend(written.changed)
            if written.wake_at is not None:
                wakes.append(written.wake_at)
        return Written(lost, tuple(changed), min(wakes) if wakes else None)


def _check_lease(conn: sqlite3.Connection, lease: Lease) -> JobState:
    row = conn.execute(
        "SELECT state, lease_token FROM jobs WHERE id = ?", (lease.job_id,)
    ).fetchone()
    if row is None:
        raise UnknownJob(lease.job_id)
    if row[1] != lease.token:
        raise StaleLease(lease.job_id, lease.token)
    return JobState(row[0])


def _waiting(
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
    return JobState.QUEUED, _QUEUED_REASON


def _resolve_dependencies(
    conn: sqlite3.Connection,
    spec: JobSpec,
    index: int,
    in_batch: Mapping[str, JobState],
) -> dict[str, JobState]:
    """
    The jobs a new job depends on, with their states: job ids, earlier jobs
    of the same request, or array ids (all their members).
    """
    found: dict[str, JobState] = {}
    for position, name in enumerate(spec.depends_on):
        if name in in_batch:
            found[name] = in_batch[name]
            continue
        row = conn.execute("SELECT state FROM jobs WHERE id = ?", (name,)).fetchone()
        if row is not None:
            found[name] = JobState(row[0])
            continue
        members = conn.execute(
            "SELECT id, state FROM jobs WHERE array_id = ?", (name,)
        ).fetchall()
        if not members:
            raise UnknownDependency(index, position, name)
        for member, state in members:
            found[member] = JobState(state)
    return found


def _after_final(
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
                target, reason = _waiting(unmet, not_before, now)
            else:
                target, reason = _waiting((), not_before, now)
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


def _requeue(
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
    target, reason = _waiting(unmet, not_before, now)
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


# The columns L{_spec_from_row} reads, in its order.
_SPEC_COLUMNS = (
    "name, labels, spec, priority, queue, max_attempts, retry_delay, timeout,"
    " not_before, array_id, array_index"
)


# A claim's candidate rows: seq, id, the spec's columns, attempt_count.
_ROW_PRIORITY = operator.itemgetter(5)


def _claimed_spec(row: Sequence[Any]) -> JobSpec:
    return _spec_from_row(row[2:13])


def _spec_from_row(row: Sequence[Any]) -> JobSpec:
    (
        name,
        labels,
        spec,
        priority,
        queue,
        max_attempts,
        retry_delay,
        timeout,
        not_before,
        array_id,
        array_index,
    ) = row
    return spec_from_stored(
        decode_stored(spec),
        name=name,
        labels=decode_stored(labels) if labels != "{}" else {},
        priority=priority,
        queue=queue,
        max_attempts=max_attempts,
        retry_delay=retry_delay,
        timeout=timeout,
        not_before=not_before,
        array_id=array_id,
        array_index=array_index,
    )


_JOB_COLUMNS = (
    f"seq, id, state, {_SPEC_COLUMNS}, created_at, started_at, finished_at,"
    " exit_code, result, error, wait_reason, cancelled_by"
)


def _job_from_row(
    row: Sequence[Any],
    attempts: tuple[Attempt, ...],
    full_queues: Mapping[str, int],
) -> Job:
    (
        _seq,
        job_id,
        state,
        *spec_columns,
    ) = row[:14]
    (
        created_at,
        started_at,
        finished_at,
        exit_code,
        result,
        error,
        wait_reason,
        cancelled_by,
    ) = row[14:]
    spec = _spec_from_row(spec_columns)
    if state == JobState.QUEUED.value and spec.queue in full_queues:
        wait_reason = (
            f"queue {spec.queue} is at its limit of {full_queues[spec.queue]} "
            "running jobs"
        )
    return Job(
        id=job_id,
        state=JobState(state),
        spec=spec,
        created_at=created_at,
        started_at=started_at,
        finished_at=finished_at,
        exit_code=exit_code,
        result=None if result is None else decode_stored(result),
        error=error,
        wait_reason=wait_reason,
        attempts=attempts,
        cancelled_by=cancelled_by,
    )


def _full_queues(conn: sqlite3.Connection, limits: Mapping[str, int]) -> dict[str, int]:
    limited = {q: n for q, n in limits.items() if n}
    if not limited:
        return {}
    running = dict(
        conn.execute(
            "SELECT queue, COUNT(*) FROM jobs"
            " WHERE state IN ('staging', 'running') GROUP BY queue"
        ).fetchall()
    )
    return queues_at_limit(limited, running)


def _attempts_of(
    conn: sqlite3.Connection, job_ids: Sequence[str]
) -> dict[str, list[Attempt]]:
    found: dict[str, list[Attempt]] = {job_id: [] for job_id in job_ids}
    if not job_ids:
        return found
    marks = ",".join("?" * len(job_ids))
    for row in conn.execute(
        "SELECT job_id, number, holder, started_at, finished_at, exit_code, error"
        f" FROM attempts WHERE job_id IN ({marks}) ORDER BY job_id, number",
        tuple(job_ids),
    ):
        found[row[0]].append(Attempt(*row[1:]))
    return found


def _get_job(
    conn: sqlite3.Connection, job_id: str, limits: Mapping[str, int] = {}
) -> Job:
    row = conn.execute(
        f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)
    ).fetchone()
    if row is None:
        raise UnknownJob(job_id)
    full = _full_queues(conn, limits) if row[2] == JobState.QUEUED.value else {}
    return _job_from_row(row, tuple(_attempts_of(conn, [job_id])[job_id]), full)


def _list_jobs(
    conn: sqlite3.Connection,
    state: Optional[JobState],
    labels: tuple[tuple[str, Optional[str]], ...],
    limit: int,
    cursor: Optional[int],
    limits: Mapping[str, int],
) -> tuple[list[Job], Optional[int]]:
    where = ["seq > ?"]
    params: list[Any] = [cursor or 0]
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
        f"SELECT {_JOB_COLUMNS} FROM jobs WHERE {' AND '.join(where)}"
        " ORDER BY seq LIMIT ?",
        params,
    ).fetchall()
    more = len(rows) > limit
    rows = rows[:limit]
    attempts = _attempts_of(conn, [row[1] for row in rows])
    full = _full_queues(conn, limits)
    jobs = [_job_from_row(row, tuple(attempts[row[1]]), full) for row in rows]
    next_cursor = rows[-1][0] if more else None
    return jobs, next_cursor


def _count_by_state(conn: sqlite3.Connection) -> dict[JobState, int]:
    counts = {state: 0 for state in JobState}
    for state, count in conn.execute(
        "SELECT state, COUNT(*) FROM jobs GROUP BY state"
    ):
        counts[JobState(state)] = count
    return counts


def _queue_counts(
    conn: sqlite3.Connection, queues: Sequence[str]
) -> dict[str, dict[JobState, int]]:
    counts = {q: {state: 0 for state in JobState} for q in queues}
    for queue, state, count in conn.execute(
        "SELECT queue, state, COUNT(*) FROM jobs GROUP BY queue, state"
    ):
        counts.setdefault(queue, {s: 0 for s in JobState})[JobState(state)] = count
    return counts


def _unconfigured_queues(
    conn: sqlite3.Connection, configured: frozenset[str]
) -> dict[str, int]:
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


def _next_due(conn: sqlite3.Connection) -> Optional[float]:
    (due,) = conn.execute(
        "SELECT MIN(not_before) FROM jobs INDEXED BY jobs_due"
        " WHERE state = 'pending' AND waiting_on = 0"
    ).fetchone()
    return due
