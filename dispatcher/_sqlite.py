"""
The SQLite job store: the default, embedded store.

One writer thread owns the only writing connection and commits in groups:
every write asked for while a transaction is being committed waits for the
next one, which takes all of them at once, each in its own savepoint so a
failing write changes nothing while its neighbours commit.  Every write's
Deferred fires only after the commit that holds it.  Reads run on a small
pool of WAL reader connections.  No SQLite call runs on the reactor thread.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from typing import Any, Callable, Iterable, Optional, Sequence

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from ._interfaces import IJobStore
from ._model import (
    Attempt,
    InvalidTransition,
    Job,
    JobSpec,
    JobState,
    Lease,
    Outcome,
    StaleLease,
    StoreClosed,
    UnknownJob,
    may_transition,
)

log = Logger()


class StoreVersionError(Exception):
    """
    The database was written by a newer dispatcher than this one.
    """


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


# Each entry is one schema version; a database at version N has had the
# first N applied.  Never edit an entry that has shipped: add another.
MIGRATIONS: Sequence[str] = (
    """
    CREATE TABLE jobs (
        seq INTEGER PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        state TEXT NOT NULL,
        name TEXT,
        labels TEXT NOT NULL,
        spec TEXT NOT NULL,
        priority INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        exit_code INTEGER,
        result TEXT,
        error TEXT,
        wait_reason TEXT,
        attempt_count INTEGER NOT NULL DEFAULT 0,
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        lease_token INTEGER,
        lease_holder TEXT,
        lease_expires REAL
    );
    CREATE INDEX jobs_queued ON jobs (priority DESC, seq) WHERE state = 'queued';
    CREATE INDEX jobs_state ON jobs (state, seq);
    CREATE INDEX jobs_holder ON jobs (lease_holder) WHERE lease_token IS NOT NULL;
    CREATE TABLE job_labels (
        key TEXT NOT NULL,
        value TEXT NOT NULL,
        seq INTEGER NOT NULL,
        PRIMARY KEY (key, value, seq)
    ) WITHOUT ROWID;
    CREATE TABLE attempts (
        job_id TEXT NOT NULL,
        number INTEGER NOT NULL,
        token INTEGER NOT NULL UNIQUE,
        holder TEXT NOT NULL,
        started_at REAL NOT NULL,
        finished_at REAL,
        exit_code INTEGER,
        error TEXT,
        pid INTEGER,
        start_ticks INTEGER,
        boot_id TEXT,
        PRIMARY KEY (job_id, number)
    );
    """,
)

_JOB_COLUMNS = (
    "seq, id, state, name, labels, spec, created_at, started_at, finished_at,"
    " exit_code, result, error, wait_reason"
)

_QUEUED_REASON = "waiting for a free slot"


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


@implementer(IJobStore)
class SQLiteJobStore:
    """
    L{IJobStore} on one SQLite file, in WAL mode with C{synchronous=FULL}:
    a committed job survives power loss, not only a killed process.

    @param path: the database file.
    @param reactor: the reactor the Deferreds fire in.
    @param readers: how many reader threads (and connections) to keep.
    """

    def __init__(self, path: str, reactor: Any, readers: int = 2) -> None:
        self._path = path
        self._reactor = reactor
        self._writer_pool = ThreadPool(1, 1, name="store-writer")
        self._reader_pool = ThreadPool(1, readers, name="store-reader")
        self._writer: Optional[sqlite3.Connection] = None
        self._readers_local = threading.local()
        self._reader_connections: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._pending: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred]] = []
        self._flushing = False
        self._closing: Optional[Deferred] = None
        self._next_token = 1
        self.batches = 0

    # Life cycle

    def open(self) -> Deferred:
        self._writer_pool.start()
        self._reader_pool.start()
        return deferToThreadPool(
            self._reactor, self._writer_pool, self._open_in_thread
        )

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
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        if version > len(MIGRATIONS):
            conn.close()
            raise StoreVersionError(
                f"{self._path} has schema version {version}, newer than the "
                f"{len(MIGRATIONS)} this dispatcher knows; run a newer dispatcher"
            )
        for number in range(version, len(MIGRATIONS)):
            conn.execute("BEGIN IMMEDIATE")
            for statement in _statements(MIGRATIONS[number]):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number + 1}")
            conn.execute("COMMIT")
            log.info(
                "store {path} migrated to schema version {version}",
                path=self._path,
                version=number + 1,
            )
        (top,) = conn.execute("SELECT COALESCE(MAX(token), 0) FROM attempts").fetchone()
        self._next_token = top + 1
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
        def close_all() -> None:
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

        deferToThreadPool(self._reactor, self._writer_pool, close_all).addBoth(closed)

    # The writer and its group commit

    def _write(self, operation: Callable[..., Any], *args: Any) -> Deferred:
        if self._closing is not None:
            return fail(StoreClosed("the dispatcher is stopping"))
        d: Deferred = Deferred()
        self._pending.append((operation, args, d))
        if not self._flushing:
            self._flush()
        return d

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        self._flushing = True
        work = [(operation, args) for operation, args, _ in batch]
        d = deferToThreadPool(self._reactor, self._writer_pool, self._commit, work)
        d.addBoth(self._flushed, [deferred for _, _, deferred in batch])

    def _commit(
        self, work: list[tuple[Callable[..., Any], tuple[Any, ...]]]
    ) -> list[tuple[bool, Any]]:
        conn = self._writer
        assert conn is not None
        results: list[tuple[bool, Any]] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            for operation, args in work:
                conn.execute("SAVEPOINT operation")
                try:
                    value = operation(conn, *args)
                except Exception:
                    conn.execute("ROLLBACK TO operation")
                    conn.execute("RELEASE operation")
                    results.append((False, Failure()))
                else:
                    conn.execute("RELEASE operation")
                    results.append((True, value))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self.batches += 1
        return results

    def _flushed(self, outcome: Any, deferreds: list[Deferred]) -> None:
        self._flushing = False
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
        if self._pending:
            self._flush()
        elif self._closing is not None and not self._closing.called:
            self._shutdown()

    # Reads

    def _read(self, operation: Callable[..., Any], *args: Any) -> Deferred:
        return deferToThreadPool(
            self._reactor, self._reader_pool, self._read_in_thread, operation, args
        )

    def _read_in_thread(self, operation: Callable[..., Any], args: tuple) -> Any:
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

    # The interface

    def submit(self, specs: Sequence[JobSpec], now: float, ids: Sequence[str]) -> Deferred:
        return self._write(self._submit, list(specs), now, list(ids))

    def _submit(
        self, conn: sqlite3.Connection, specs: list[JobSpec], now: float, ids: list[str]
    ) -> list[Job]:
        jobs = []
        for spec, job_id in zip(specs, ids):
            cursor = conn.execute(
                "INSERT INTO jobs (id, state, name, labels, spec, created_at,"
                " wait_reason) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    job_id,
                    JobState.QUEUED.value,
                    spec.name,
                    _dumps(dict(spec.labels)),
                    _dumps(spec.to_json()),
                    now,
                    _QUEUED_REASON,
                ),
            )
            if spec.labels:
                conn.executemany(
                    "INSERT INTO job_labels (key, value, seq) VALUES (?, ?, ?)",
                    [(k, v, cursor.lastrowid) for k, v in spec.labels.items()],
                )
            jobs.append(
                Job(
                    id=job_id,
                    state=JobState.QUEUED,
                    spec=spec,
                    created_at=now,
                    wait_reason=_QUEUED_REASON,
                )
            )
        return jobs

    def get(self, job_id: str) -> Deferred:
        return self._read(_get_job, job_id)

    def list_jobs(
        self,
        state: Optional[JobState] = None,
        labels: Iterable[tuple[str, Optional[str]]] = (),
        limit: int = 100,
        cursor: Optional[int] = None,
    ) -> Deferred:
        return self._read(_list_jobs, state, tuple(labels), limit, cursor)

    def count_by_state(self) -> Deferred:
        return self._read(_count_by_state)

    def claim(
        self, holder: str, capacity: int, now: float, lease_seconds: float
    ) -> Deferred:
        if capacity <= 0:
            return succeed([])
        return self._write(self._claim, holder, capacity, now, lease_seconds)

    def _claim(
        self,
        conn: sqlite3.Connection,
        holder: str,
        capacity: int,
        now: float,
        lease_seconds: float,
    ) -> list[Lease]:
        rows = conn.execute(
            # Without INDEXED BY the planner, lacking statistics, walks the
            # state index and sorts every queued job: 100 times slower with
            # ten thousand queued.
            "SELECT seq, id, name, labels, spec, attempt_count FROM jobs"
            " INDEXED BY jobs_queued"
            " WHERE state = 'queued' ORDER BY priority DESC, seq LIMIT ?",
            (capacity,),
        ).fetchall()
        leases = []
        expires = now + lease_seconds
        for seq, job_id, name, labels, spec_text, attempt_count in rows:
            spec = JobSpec.from_json(json.loads(spec_text), name, json.loads(labels))
            state = JobState.STAGING if spec.inputs else JobState.RUNNING
            token = self._next_token
            self._next_token += 1
            number = attempt_count + 1
            conn.execute(
                "UPDATE jobs SET state = ?, attempt_count = ?, lease_token = ?,"
                " lease_holder = ?, lease_expires = ?, wait_reason = NULL,"
                " started_at = CASE WHEN ? = 'running' THEN ? ELSE NULL END"
                " WHERE seq = ?",
                (state.value, number, token, holder, expires, state.value, now, seq),
            )
            conn.execute(
                "INSERT INTO attempts (job_id, number, token, holder, started_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (job_id, number, token, holder, now),
            )
            leases.append(Lease(job_id, number, token, holder, expires, spec))
        return leases

    def record_process(
        self, lease: Lease, pid: int, start_ticks: Optional[int], boot_id: Optional[str]
    ) -> Deferred:
        return self._write(self._record_process, lease, pid, start_ticks, boot_id)

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
        return self._write(self._mark_running, lease, now)

    def _mark_running(self, conn: sqlite3.Connection, lease: Lease, now: float) -> None:
        state = _check_lease(conn, lease)
        if state is not JobState.STAGING:
            raise InvalidTransition(lease.job_id, state, JobState.RUNNING)
        conn.execute(
            "UPDATE jobs SET state = 'running', started_at = ? WHERE id = ?",
            (now, lease.job_id),
        )

    def finish(self, lease: Lease, outcome: Outcome, now: float) -> Deferred:
        return self._write(self._finish, lease, outcome, now)

    def _finish(
        self, conn: sqlite3.Connection, lease: Lease, outcome: Outcome, now: float
    ) -> Job:
        state = _check_lease(conn, lease)
        (cancel_requested,) = conn.execute(
            "SELECT cancel_requested FROM jobs WHERE id = ?", (lease.job_id,)
        ).fetchone()
        target = outcome.state
        error = outcome.error
        if cancel_requested:
            target = JobState.CANCELLED
            error = "cancelled while it ran" + (f" ({error})" if error else "")
        if not may_transition(state, target):
            raise InvalidTransition(lease.job_id, state, target)
        conn.execute(
            "UPDATE attempts SET finished_at = ?, exit_code = ?, error = ?"
            " WHERE token = ?",
            (now, outcome.exit_code, error, lease.token),
        )
        conn.execute(
            "UPDATE jobs SET state = ?, finished_at = ?, exit_code = ?, result = ?,"
            " error = ?, lease_token = NULL, lease_holder = NULL,"
            " lease_expires = NULL WHERE id = ?",
            (
                target.value,
                now,
                outcome.exit_code,
                None if outcome.result is None else _dumps(outcome.result),
                error,
                lease.job_id,
            ),
        )
        return _get_job(conn, lease.job_id)

    def release(self, lease: Lease, now: float, reason: str) -> Deferred:
        return self._write(self._release, lease, now, reason)

    def _release(
        self, conn: sqlite3.Connection, lease: Lease, now: float, reason: str
    ) -> Job:
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
        # spent: the budget counts attempts that ended on their own.
        conn.execute(
            "UPDATE jobs SET state = ?, wait_reason = ?, started_at = NULL,"
            " finished_at = ?, lease_token = NULL, lease_holder = NULL,"
            " lease_expires = NULL WHERE id = ?",
            (target.value, wait_reason, finished, lease.job_id),
        )
        return _get_job(conn, lease.job_id)

    def cancel(self, job_id: str, now: float) -> Deferred:
        return self._write(self._cancel, job_id, now)

    def _cancel(
        self, conn: sqlite3.Connection, job_id: str, now: float
    ) -> tuple[Job, Optional[Lease]]:
        row = conn.execute(
            "SELECT state, lease_token, lease_holder, lease_expires, attempt_count,"
            " name, labels, spec FROM jobs WHERE id = ?",
            (job_id,),
        ).fetchone()
        if row is None:
            raise UnknownJob(job_id)
        state = JobState(row[0])
        if state.final:
            raise InvalidTransition(job_id, state, JobState.CANCELLED)
        if state.active:
            conn.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
            token, holder, expires, attempt, name, labels, spec = row[1:]
            lease = Lease(
                job_id,
                attempt,
                token,
                holder,
                expires,
                JobSpec.from_json(json.loads(spec), name, json.loads(labels)),
            )
            return _get_job(conn, job_id), lease
        conn.execute(
            "UPDATE jobs SET state = 'cancelled', finished_at = ?, wait_reason = NULL,"
            " error = 'cancelled before it ran' WHERE id = ?",
            (now, job_id),
        )
        return _get_job(conn, job_id), None

    def recover(self, holder: str, now: float) -> Deferred:
        return self._write(self._recover, holder, now)

    def _recover(
        self, conn: sqlite3.Connection, holder: str, now: float
    ) -> list[LostAttempt]:
        rows = conn.execute(
            "SELECT a.job_id, a.number, a.token, a.pid, a.start_ticks, a.boot_id"
            " FROM jobs j JOIN attempts a ON a.token = j.lease_token"
            " WHERE j.lease_token IS NOT NULL AND j.lease_holder = ?",
            (holder,),
        ).fetchall()
        lost = [LostAttempt(*row) for row in rows]
        reason = "lost: the dispatcher stopped while this attempt ran"
        for attempt in lost:
            conn.execute(
                "UPDATE attempts SET finished_at = ?, error = ? WHERE token = ?",
                (now, reason, attempt.token),
            )
            conn.execute(
                "UPDATE jobs SET state = CASE WHEN cancel_requested THEN 'cancelled'"
                " ELSE 'failed' END, finished_at = ?, error = ?, lease_token = NULL,"
                " lease_holder = NULL, lease_expires = NULL WHERE id = ?",
                (now, reason, attempt.job_id),
            )
        return lost


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


def _check_lease(conn: sqlite3.Connection, lease: Lease) -> JobState:
    row = conn.execute(
        "SELECT state, lease_token FROM jobs WHERE id = ?", (lease.job_id,)
    ).fetchone()
    if row is None:
        raise UnknownJob(lease.job_id)
    if row[1] != lease.token:
        raise StaleLease(lease.job_id, lease.token)
    return JobState(row[0])


def _job_from_row(row: Sequence[Any], attempts: tuple[Attempt, ...]) -> Job:
    (
        _seq,
        job_id,
        state,
        name,
        labels,
        spec,
        created_at,
        started_at,
        finished_at,
        exit_code,
        result,
        error,
        wait_reason,
    ) = row
    return Job(
        id=job_id,
        state=JobState(state),
        spec=JobSpec.from_json(json.loads(spec), name, json.loads(labels)),
        created_at=created_at,
        started_at=started_at,
        finished_at=finished_at,
        exit_code=exit_code,
        result=None if result is None else json.loads(result),
        error=error,
        wait_reason=wait_reason,
        attempts=attempts,
    )


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


def _get_job(conn: sqlite3.Connection, job_id: str) -> Job:
    row = conn.execute(
        f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)
    ).fetchone()
    if row is None:
        raise UnknownJob(job_id)
    return _job_from_row(row, tuple(_attempts_of(conn, [job_id])[job_id]))


def _list_jobs(
    conn: sqlite3.Connection,
    state: Optional[JobState],
    labels: tuple[tuple[str, Optional[str]], ...],
    limit: int,
    cursor: Optional[int],
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
    jobs = [_job_from_row(row, tuple(attempts[row[1]])) for row in rows]
    next_cursor = rows[-1][0] if more else None
    return jobs, next_cursor


def _count_by_state(conn: sqlite3.Connection) -> dict[JobState, int]:
    counts = {state: 0 for state in JobState}
    for state, count in conn.execute(
        "SELECT state, COUNT(*) FROM jobs GROUP BY state"
    ):
        counts[JobState(state)] = count
    return counts
