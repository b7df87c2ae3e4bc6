"""
The SQLite store's write operations: one function for each kind of write
command (L{dispatcher.store._writes}), whose arguments are what the
operations keep between writes (L{WriterState}), the writer's connection
and the command's fields; and the shared paths that store a run of plain
submissions, or of plain successes, at once.

They run on the writer thread, inside the group's transaction
(L{dispatcher.store._writer}); which jobs a claim takes is the model's
claim policy (L{dispatcher.model._claims}).
"""

from __future__ import annotations

import functools
import itertools
import json
import operator
import random
import sqlite3
from typing import Any, Callable, Mapping, Optional, Sequence

import attrs
import orjson

from dispatcher.model._claims import choose_jobs, queues_at_limit, room_in_queues
from dispatcher.model._jobs import (
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
    UnknownJob,
    format_time,
    may_transition,
)
from dispatcher.store._queries import get_job, next_due, running_by_queue
from dispatcher.store._results import (
    Claimed,
    DependencyNotRetried,
    IdempotencyConflict,
    IdempotencyKey,
    LostAttempt,
    ResumedLease,
    Submitted,
    SubmittedIds,
    UnknownDependency,
    Written,
)
from dispatcher.store._rows import (
    INSERTED_COLUMNS,
    SPEC_COLUMNS,
    SPEC_WIDTH,
    new_job,
    spec_from_row,
    spec_position,
)
from dispatcher.store._writer import Replay, SharedPath
from dispatcher.store._writes import (
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


def jittered_backoff(delay: float, spent: int) -> float:
    """
    The wait before retry number C{spent}: C{delay} doubled for each
    earlier failure, capped at an hour (or C{delay}, if longer), times a
    random factor between 0.5 and 1.5 so that jobs that failed together do
    not come back together.
    """
    base = min(delay * 2 ** (spent - 1), max(delay, 3600.0))
    return base * random.uniform(0.5, 1.5)


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
    """

    limits: Mapping[str, int]
    idempotency_ttl: float
    backoff: Callable[[float, int], float]
    queues: list[str] = attrs.field(init=False)
    limited: bool = attrs.field(init=False)
    turn: int = 0
    next_token: int = 1
    dependencies: bool = True

    def __attrs_post_init__(self) -> None:
        self.queues = sorted(self.limits)
        self.limited = any(self.limits.values())

    def load(self, conn: sqlite3.Connection) -> None:
        """
        Take the next lease token, and whether any job has dependents,
        from the database on C{conn}.
        """
        (top,) = conn.execute("SELECT COALESCE(MAX(token), 0) FROM attempts").fetchone()
        self.next_token = top + 1
        (self.dependencies,) = conn.execute(
            "SELECT EXISTS (SELECT 1 FROM dependencies)"
        ).fetchone()


_QUEUED_REASON = "waiting for a free slot"

# The jobs that hold a lease: only staging and running ones do.
_LEASED = "state IN ('staging', 'running') AND lease_token IS NOT NULL"


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


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
_MAX_SEQ = "SELECT COALESCE(MAX(seq), 0) FROM jobs"
# An attempt's end, and a job's at its final state.
_END_ATTEMPT = "UPDATE attempts SET finished_at = ?, exit_code = ?, error = ? WHERE token = ?"
_END_JOB = (
    "UPDATE jobs SET state = ?, finished_at = ?, exit_code = ?, result = ?,"
    " error = ?, attempts_spent = ?, wait_reason = NULL, lease_token = NULL,"
    " lease_holder = NULL, lease_expires = NULL WHERE id = ?"
)

# What an end reads of the job, after its state and lease token.
_ENDING = (
    "SELECT state, lease_token, cancel_requested, attempts_spent, max_attempts,"
    " retry_delay FROM jobs WHERE id = ?"
)
_LEASE_STATE = "SELECT state, lease_token FROM jobs WHERE id = ?"


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
    )
    rows.append(row)
    if spec.labels:
        label_rows.extend((k, v, seq) for k, v in spec.labels.items())
    return job


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

# What a plain job's row holds besides its number, id and stored spec: the
# same for all the jobs of a request (the L{PlainJobs} fields have columns
# of their names), and a timeout only where their queue has one.
_PLAIN_SHARED = (
    "state", "labels", "created_at", "wait_reason", "priority", "queue", "max_attempts",
    "retry_delay", "timeout",
)


def _plain_insert(timeout: bool, json_rows: bool) -> str:
    """
    The statement that inserts plain jobs: from a JSON array of [id, stored
    spec] pairs (?2), numbered after ?1, or one row at a time; the columns
    all share come next (?3 on).
    """
    shared = _PLAIN_SHARED if timeout else _PLAIN_SHARED[:-1]
    columns = ", ".join(("seq", "id", "spec", *shared))
    if json_rows:
        values = ", ".join(f"?{3 + i}" for i in range(len(shared)))
        return (
            f"INSERT INTO jobs ({columns})"
            " SELECT ?1 + 1 + key, json_extract(value, '$[0]'), json_extract(value, '$[1]'),"
            f" {values} FROM json_each(?2)"
        )
    return f"INSERT INTO jobs ({columns}) VALUES ({', '.join('?' * (3 + len(shared)))})"


# By whether the jobs have a timeout, then whether rows are read from JSON.
_INSERT_PLAIN = {
    (timeout, json_rows): _plain_insert(timeout, json_rows)
    for timeout in (False, True)
    for json_rows in (False, True)
}


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
    # In _PLAIN_SHARED order.
    shared: tuple[Any, ...] = (
        JobState.QUEUED.value, "{}", now, _QUEUED_REASON, jobs.priority, jobs.queue,
        jobs.max_attempts, jobs.retry_delay,
    )
    if timeout:
        shared += (jobs.timeout,)
    if JSON_ROWS:
        # Binding a row's eleven values from Python was a third of the
        # writer's time for a plain batch; SQLite reads the JSON faster.
        pairs = orjson.dumps(list(zip(ids, jobs.stored))).decode()
        conn.execute(_INSERT_PLAIN[timeout, True], (seq, pairs, *shared))
    else:
        rows = [
            (number, job_id, stored, *shared)
            for number, job_id, stored in zip(itertools.count(seq + 1), ids, jobs.stored)
        ]
        conn.executemany(_INSERT_PLAIN[timeout, False], rows)
    return Written(
        SubmittedIds(ids), tuple(zip(ids, itertools.repeat(JobState.QUEUED)))
    )


def finish_together(writer: WriterState, conn: sqlite3.Connection, work: list[Finish]) -> list[Written]:
    """
    Record several plain successes with one read and two updates, as
    L{finish} would one by one.  Anything L{finish} would treat
    otherwise (a stale lease, a cancel asked for meanwhile) raises
    L{Replay}, and the group is replayed one write at a time.
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
            raise Replay()
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

def submit_together(
    writer: WriterState, conn: sqlite3.Connection, work: list[Submit | SubmitPlain]
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


def submit_plain(
    writer: WriterState,
    conn: sqlite3.Connection,
    jobs: PlainJobs,
    now: float,
    ids: list[str],
    idempotency: Optional[IdempotencyKey],
) -> Written:
    """
    Store L{PlainJobs}, queued, all or nothing (L{SubmitPlain}); or answer
    what an earlier request with the same idempotency key made.
    """
    replayed = _replayed(writer, conn, idempotency, now)
    if replayed is not None:
        return replayed
    (seq,) = conn.execute(_MAX_SEQ).fetchone()
    written = _add_plain_jobs(conn, seq, jobs, now, ids)
    _remember(conn, idempotency, ids, now)
    return written

def _replayed(
    writer: WriterState, conn: sqlite3.Connection, idempotency: Optional[IdempotencyKey], now: float
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
    if row is not None and row[2] >= now - writer.idempotency_ttl:
        if row[0] != idempotency.digest:
            raise IdempotencyConflict(idempotency.key)
        jobs = [get_job(conn, job_id) for job_id in json.loads(row[1])]
        return Written(Submitted(jobs, replayed=True))
    if row is not None:
        conn.execute("DELETE FROM idempotency WHERE key = ?", (idempotency.key,))
    return None

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

def submit(
    writer: WriterState,
    conn: sqlite3.Connection,
    specs: list[JobSpec],
    now: float,
    ids: list[str],
    idempotency: Optional[IdempotencyKey],
) -> Written:
    """
    Store new jobs from their specs, all or nothing (L{Submit}): queued, pending on
    their dependencies or start time, or cancelled at once for a dependency
    that failed; or answer what an earlier request with the same
    idempotency key made.
    """
    replayed = _replayed(writer, conn, idempotency, now)
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
            writer.dependencies = True
            conn.executemany(
                "INSERT INTO dependencies (depends_on, job_id) VALUES (?, ?)",
                [(d, job_id) for d in deps],
            )
        in_batch[job_id] = state
        changed.append((job_id, state))
    insert_rows()
    _remember(conn, idempotency, ids, now)
    wake = [s.not_before for s in specs if s.not_before is not None and s.not_before > now]
    return Written(Submitted(jobs, replayed=False), tuple(changed),
                   min(wake) if wake else None)


# A claim's candidate rows: seq, id, the spec's columns, attempt_count.
_CLAIMED_PRIORITY = operator.itemgetter(2 + spec_position("priority"))
_CLAIMED_ATTEMPTS = 2 + SPEC_WIDTH


def _claimed_spec(row: Sequence[Any]) -> JobSpec:
    return spec_from_row(row[2:_CLAIMED_ATTEMPTS])


def claim(
    writer: WriterState,
    conn: sqlite3.Connection,
    offer: Offer,
    capacity: int,
    free: Resources,
    now: float,
    lease_seconds: float,
) -> Claimed:
    """
    Lease to C{offer.holder} up to C{capacity} queued jobs that fit in
    C{free}, as the claim policy picks them (L{Claim}).
    """
    # Running jobs count only against a queue's limit.
    running = running_by_queue(conn) if writer.limited else {}
    room = room_in_queues(writer.queues, writer.limits, running, capacity)
    # Each queue's queued jobs, read lazily in priority order: jobs that
    # do not fit this holder are passed over, so how far to read is not
    # known in advance.  Without INDEXED BY the planner, lacking
    # statistics, may walk the state index and sort every queued job: a
    # hundred times slower with ten thousand queued.
    cursors = {
        queue: conn.execute(
            f"SELECT seq, id, {SPEC_COLUMNS}, attempt_count"
            " FROM jobs INDEXED BY jobs_queued"
            " WHERE state = 'queued' AND queue = ?"
            " ORDER BY priority DESC, seq",
            (queue,),
        )
        for queue in writer.queues
        if room[queue] > 0
    }
    choice = choose_jobs(
        cursors, room, writer.queues, writer.turn, offer, free, capacity,
        _CLAIMED_PRIORITY, _claimed_spec,
    )
    writer.turn = choice.turn
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
        token = writer.next_token
        writer.next_token += 1
        number = row[_CLAIMED_ATTEMPTS] + 1
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
    if writer.limited:
        after = {q: running.get(q, 0) + taken.get(q, 0) for q in writer.limits}
        for queue in queues_at_limit(writer.limits, after):
            if conn.execute(
                "SELECT 1 FROM jobs WHERE state = 'queued' AND queue = ? LIMIT 1",
                (queue,),
            ).fetchone():
                blocked = True
    return Claimed(leases, blocked, choice.skipped, choice.drained)


def resume_leases(
    writer: WriterState, conn: sqlite3.Connection, local_holder: str, now: float, lease_seconds: float
) -> Written:
    """
    Move the expiry of every lease a remote holder has to C{now +
    lease_seconds} (L{ResumeLeases}).
    """
    expires = now + lease_seconds
    rows = conn.execute(
        f"SELECT id, {SPEC_COLUMNS}, attempt_count, lease_token,"
        " lease_holder, state, cancel_requested FROM jobs INDEXED BY jobs_state"
        f" WHERE {_LEASED} AND lease_holder != ?",
        (local_holder,),
    ).fetchall()
    conn.execute(
        "UPDATE jobs INDEXED BY jobs_state SET lease_expires = ?"
        f" WHERE {_LEASED} AND lease_holder != ?",
        (expires, local_holder),
    )
    resumed = []
    for row in rows:
        attempt, token, holder, state, cancel_requested = row[1 + SPEC_WIDTH:]
        spec = spec_from_row(row[1:1 + SPEC_WIDTH])
        resumed.append(ResumedLease(
            Lease(row[0], attempt, token, holder, expires, spec),
            JobState(state),
            bool(cancel_requested),
        ))
    return Written(resumed)


def record_process(
    writer: WriterState,
    conn: sqlite3.Connection,
    lease: Lease,
    pid: int,
    start_ticks: Optional[int],
    boot_id: Optional[str],
) -> None:
    """
    Remember the process that runs an attempt (L{RecordProcess}).
    """
    _check_lease(conn, lease)
    conn.execute(
        "UPDATE attempts SET pid = ?, start_ticks = ?, boot_id = ? WHERE token = ?",
        (pid, start_ticks, boot_id, lease.token),
    )


def mark_running(writer: WriterState, conn: sqlite3.Connection, lease: Lease, now: float) -> Written:
    """
    A staged job starts running (L{MarkRunning}).
    """
    state = _check_lease(conn, lease)
    if state is not JobState.STAGING:
        raise InvalidTransition(lease.job_id, state, JobState.RUNNING)
    conn.execute(
        "UPDATE jobs SET state = 'running', started_at = ? WHERE id = ?",
        (now, lease.job_id),
    )
    return Written(None, ((lease.job_id, JobState.RUNNING),))


def finish(
    writer: WriterState, conn: sqlite3.Connection, lease: Lease, outcome: Outcome, now: float
) -> Written:
    """
    Record how an attempt ended (L{Finish}): the job ends, or waits for its
    next attempt; its dependents move on or are cancelled.
    """
    row = _leased_row(conn, lease, _ENDING)
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
        return _retry_later(writer, conn, lease.job_id, state, spent, retry_delay, now, error,
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
        if writer.dependencies
        else None
    )
    return Written(None, tuple(changed), wake)

def _retry_later(
    writer: WriterState,
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
    delay = writer.backoff(retry_delay, spent)
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


def release(
    writer: WriterState, conn: sqlite3.Connection, lease: Lease, now: float, reason: str
) -> Written:
    """
    Give an attempt up without spending it (L{Release}): the job is queued
    again, or cancelled if a cancel was asked for.
    """
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


def cancel(writer: WriterState, conn: sqlite3.Connection, job_id: str, now: float) -> Written:
    """
    Cancel a job (L{Cancel}): at once if it is not running, else by asking
    its holder; the answer is the job and, if it runs, its lease.
    """
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
        job = get_job(conn, job_id, writer.limits)
        lease = Lease(job_id, attempt, token, holder, expires, job.spec)
        return Written((job, lease))
    conn.execute(
        "UPDATE jobs SET state = 'cancelled', finished_at = ?, wait_reason = NULL,"
        " error = 'cancelled before it ran' WHERE id = ?",
        (now, job_id),
    )
    changed = [(job_id, JobState.CANCELLED)]
    wake = _after_final(conn, job_id, JobState.CANCELLED, now, changed)
    return Written((get_job(conn, job_id, writer.limits), None), tuple(changed), wake)


def retry(
    writer: WriterState, conn: sqlite3.Connection, job_id: str, now: float, dependents: bool
) -> Written:
    """
    Put a failed or cancelled job back in line (L{Retry}), and with
    C{dependents} the jobs cancelled because of it.
    """
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
            (_QUEUED_REASON, job_id),
        )
        changed.append((job_id, JobState.QUEUED))
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


def recover(writer: WriterState, conn: sqlite3.Connection, holder: str, now: float) -> Written:
    """
    Record as lost the attempts C{holder} left running (L{Recover}).
    """
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
        written = finish(writer, conn, lease, Outcome(JobState.FAILED, error=reason), now
        )
        changed.extend(written.changed)
        if written.wake_at is not None:
            wakes.append(written.wake_at)
    return Written(lost, tuple(changed), min(wakes) if wakes else None)



def _leased_row(conn: sqlite3.Connection, lease: Lease, query: str) -> tuple[Any, ...]:
    """
    The row C{query} (which selects the job's state and lease token first)
    reads of the lease's job, once the lease is found to be the job's own:
    else L{UnknownJob} or L{StaleLease}.
    """
    row = conn.execute(query, (lease.job_id,)).fetchone()
    if row is None:
        raise UnknownJob(lease.job_id)
    if row[1] != lease.token:
        raise StaleLease(lease.job_id, lease.token)
    return row


def _check_lease(conn: sqlite3.Connection, lease: Lease) -> JobState:
    return JobState(_leased_row(conn, lease, _LEASE_STATE)[0])


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


# The operation that applies each kind of write command.
OPERATIONS: Mapping[type, Callable[..., Any]] = {
    Submit: submit,
    SubmitPlain: submit_plain,
    Claim: claim,
    ResumeLeases: resume_leases,
    RecordProcess: record_process,
    MarkRunning: mark_running,
    Finish: finish,
    Release: release,
    Cancel: cancel,
    Retry: retry,
    PromoteDue: promote_due,
    PurgeIdempotency: purge_idempotency,
    Recover: recover,
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
