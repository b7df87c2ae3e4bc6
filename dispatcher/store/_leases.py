"""
The SQLite store's operations on leases and attempts: a claim (which jobs
it takes is the model's claim policy), a lease resumed at start-up, an
attempt's process and start, its end (L{finish}, and a run of plain
successes at once: L{finish_together}), an attempt given up, the
attempts a holder lost, the renewal of a holder's leases, and the
recovery of leases that expired (several dispatchers on one database).
"""

from __future__ import annotations

import functools
import json
import operator
import sqlite3
from typing import TYPE_CHECKING, Any, Optional, Sequence

import attrs

from dispatcher.model._claims import choose_jobs, queues_at_limit, room_in_queues
from dispatcher.model._jobs import (
    InvalidTransition,
    JobSpec,
    JobState,
    Lease,
    Offer,
    Outcome,
    Resources,
    StaleLease,
    UnknownJob,
    format_time,
    may_transition,
)
from dispatcher.store._dialect import SQL, differs, paged
from dispatcher.store._queries import running_by_queue
from dispatcher.store._results import (
    Change,
    Claimed,
    ExpiredLease,
    LostAttempt,
    ResumedLease,
    Written,
)
from dispatcher.store._rows import (
    SPEC_COLUMNS,
    SPEC_WIDTH,
    spec_from_row,
    spec_position,
)
from dispatcher.store._stored import encode_stored, limits_to_stored, log_cut_to_stored
from dispatcher.store._waits import QUEUED_REASON, after_final
from dispatcher.store._writer import Replay
from dispatcher.store._writes import Finish

if TYPE_CHECKING:
    from dispatcher.store._operations import WriterState


# The jobs that hold a lease: only staging and running ones do.
_LEASED = "state IN ('staging', 'running') AND lease_token IS NOT NULL"

# An attempt's end, and a job's at its final state.
_END_ATTEMPT = (
    "UPDATE attempts SET finished_at = ?, exit_code = ?, error = ?, limits = ?,"
    " log_cut = ? WHERE token = ?"
)
_END_JOB = (
    "UPDATE jobs SET state = ?, finished_at = ?, exit_code = ?, result = ?,"
    " error = ?, attempts_spent = ?, wait_reason = NULL, lease_token = NULL,"
    " lease_holder = NULL, lease_expires = NULL, lease_server = NULL WHERE id = ?"
)


# What an end reads of the job, after its state and lease token.  On
# PostgreSQL the row is locked as it is read: a group of ends and claims
# takes the groups' lock only to number its events and commit (see
# dispatcher/store/_postgres.py), so another dispatcher's write (a lease
# it expires, a cancel) could otherwise change the row between this read
# and the end's update; locked, that write waits, or the read waits for
# it and sees what it committed.
_ENDING = differs(
    "SELECT state, lease_token, cancel_requested, attempts_spent, max_attempts,"
    " retry_delay, owner FROM jobs WHERE id = ?",
    "SELECT state, lease_token, cancel_requested, attempts_spent, max_attempts,"
    " retry_delay, owner FROM jobs WHERE id = %s FOR UPDATE",
)


@functools.lru_cache(maxsize=64)
def _ending_together(count: int) -> SQL:
    """
    A run of C{count} plain successes' read of their jobs (on PostgreSQL
    locked as L{_ENDING}'s row is).
    """
    text = (
        "SELECT id, state, lease_token, cancel_requested, attempts_spent, owner"
        f" FROM jobs WHERE id IN ({','.join('?' * count)})"
    )
    return differs(text, text.replace("?", "%s") + " FOR UPDATE")


_LEASE_STATE = "SELECT state, lease_token FROM jobs WHERE id = ?"


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


# A claim's candidate rows: seq, id, the spec's columns, attempt_count,
# owner.
_CLAIMED_PRIORITY_AT = 2 + spec_position("priority")
_CLAIMED_PRIORITY = operator.itemgetter(_CLAIMED_PRIORITY_AT)
_CLAIMED_ATTEMPTS = 2 + SPEC_WIDTH
_CLAIMED_OWNER = _CLAIMED_ATTEMPTS + 1
_CLAIMED_CREATED = _CLAIMED_OWNER + 1


# A queue's queued jobs, in the order a claim takes them.  On PostgreSQL
# each row read is locked, and a row another transaction holds (another
# dispatcher's claim, say) is passed over: never one job to two holders.
# It reads them a page at a time (PagedSQL), each page after the last row
# read (its priority and seq), so that it locks only about the rows a
# claim reads.
_QUEUED_IN = paged(
    f"SELECT seq, id, {SPEC_COLUMNS}, attempt_count, owner, created_at"
    " FROM jobs INDEXED BY jobs_queued"
    " WHERE state = 'queued' AND queue = ?"
    " ORDER BY priority DESC, seq",
    f"SELECT seq, id, {SPEC_COLUMNS}, attempt_count, owner, created_at"
    " FROM jobs WHERE state = 'queued' AND queue = %s"
    " ORDER BY priority DESC, seq LIMIT {page} FOR UPDATE SKIP LOCKED",
    f"SELECT seq, id, {SPEC_COLUMNS}, attempt_count, owner, created_at"
    " FROM jobs WHERE state = 'queued' AND queue = %s"
    " AND (priority < %s OR (priority = %s AND seq > %s))"
    " ORDER BY priority DESC, seq LIMIT {page} FOR UPDATE SKIP LOCKED",
    lambda row: (row[_CLAIMED_PRIORITY_AT], row[_CLAIMED_PRIORITY_AT], row[0]),
)


# The one job a job-scoped offer may take (Offer.job), if it is queued.
_QUEUED_ONE = differs(
    f"SELECT seq, id, {SPEC_COLUMNS}, attempt_count, owner, created_at"
    " FROM jobs WHERE id = ? AND state = 'queued'",
    f"SELECT seq, id, {SPEC_COLUMNS}, attempt_count, owner, created_at"
    " FROM jobs WHERE id = %s AND state = 'queued' FOR UPDATE SKIP LOCKED",
)
_CLAIMED_QUEUE = 2 + spec_position("queue")


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
    if offer.job is not None:
        return _claim_one(writer, conn, offer, free, now, lease_seconds, room, running)
    # Each queue's queued jobs, read lazily in priority order: jobs that
    # do not fit this holder are passed over, so how far to read is not
    # known in advance.  Without INDEXED BY the planner, lacking
    # statistics, may walk the state index and sort every queued job: a
    # hundred times slower with ten thousand queued.
    cursors = {
        queue: conn.execute(_QUEUED_IN, (queue,))
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
    return _lease_chosen(writer, conn, offer, choice.chosen, choice.taken, running, now,
                         lease_seconds, choice.skipped, choice.drained)


def _claim_one(
    writer: WriterState,
    conn: sqlite3.Connection,
    offer: Offer,
    free: Resources,
    now: float,
    lease_seconds: float,
    room: dict[str, int],
    running: dict[str, int],
) -> Claimed:
    """
    The claim of a holder that may take one job alone (C{offer.job}): that
    job, read by its id, if it is queued, its queue has room and it fits.
    Whatever it gets, it says nothing of the other queued jobs (not
    drained, and a miss counts as one passed over, so that this holder
    alone rests until a job is queued or it asks again).
    """
    row = conn.execute(_QUEUED_ONE, (offer.job,)).fetchone()
    queue = row[_CLAIMED_QUEUE] if row is not None else None
    if row is None or room.get(queue, 0) <= 0:
        return Claimed([], False, 1, False, ())
    # The one job's own queue alone, as any holder of it would see it.
    plain = attrs.evolve(offer, queues=None, excluded=frozenset(), job=None)
    choice = choose_jobs(
        {queue: iter([row])}, room, [queue], 0, plain, free, 1,
        _CLAIMED_PRIORITY, _claimed_spec,
    )
    return _lease_chosen(writer, conn, offer, choice.chosen, choice.taken, running, now,
                         lease_seconds, 0 if choice.chosen else 1, False)


def _lease_chosen(
    writer: WriterState,
    conn: sqlite3.Connection,
    offer: Offer,
    chosen: list[tuple[Any, JobSpec]],
    taken: dict[str, int],
    running: dict[str, int],
    now: float,
    lease_seconds: float,
    skipped: int,
    drained: bool,
) -> Claimed:
    """
    Lease C{chosen} (rows of a claim's queries) to C{offer.holder}.
    """
    leases = []
    expires = now + lease_seconds
    holder = offer.holder
    updates = []
    attempts = []
    waited = []
    for row, spec in chosen:
        seq, job_id = row[0], row[1]
        token = writer.next_token
        writer.next_token += 1
        number = row[_CLAIMED_ATTEMPTS] + 1
        if number == 1:
            waited.append((spec.queue, now - row[_CLAIMED_CREATED]))
        if spec.inputs:
            updates.append(("staging", number, token, holder, expires, None, seq))
        else:
            updates.append(("running", number, token, holder, expires, now, seq))
        attempts.append((job_id, number, token, holder, now))
        leases.append(Lease(job_id, number, token, holder, expires, spec, row[_CLAIMED_OWNER]))
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
    return Claimed(leases, blocked, skipped, drained, tuple(waited))


def resume_leases(
    writer: WriterState,
    conn: sqlite3.Connection,
    local_holder: str,
    now: float,
    lease_seconds: float,
) -> Written:
    """
    Move the expiry of every lease a remote holder has to C{now +
    lease_seconds} (L{ResumeLeases}).
    """
    expires = now + lease_seconds
    # Every dispatcher's local holder is local@NAME: another dispatcher's
    # local jobs (on a shared database) are not a worker's to resume.
    rows = conn.execute(
        f"SELECT id, {SPEC_COLUMNS}, attempt_count, lease_token,"
        " lease_holder, state, cancel_requested FROM jobs INDEXED BY jobs_state"
        f" WHERE {_LEASED} AND lease_holder != ? AND lease_holder NOT LIKE 'local@%'",
        (local_holder,),
    ).fetchall()
    conn.execute(
        "UPDATE jobs INDEXED BY jobs_state SET lease_expires = ?"
        f" WHERE {_LEASED} AND lease_holder != ? AND lease_holder NOT LIKE 'local@%'",
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


def adopt_leases(
    writer: WriterState,
    conn: sqlite3.Connection,
    holder: Optional[str],
    items: Sequence[tuple[str, int]],
    server: str,
    now: float,
    seconds: float,
) -> Written:
    """
    Take up, for the dispatcher C{server}, those of the leases C{items}
    (C{(job_id, token)}) that are live and C{holder}'s (C{None}: anyone's):
    each one's job holds that token, C{holder} holds it, and its expiry
    has not passed
    (L{AdoptLeases}).  Their expiry moves to C{now + seconds}, and
    C{server} is written as the one that serves them: from then on only
    it may record them expired (L{finish_served}).  Fires with the
    L{ResumedLease}s taken up; a lease not among them is not current.
    """
    expires = now + seconds
    # (One job may be named twice, once with a token that is not its own.)
    wanted: dict[str, set[int]] = {}
    for job_id, token in items:
        wanted.setdefault(job_id, set()).add(token)
    if not wanted:
        return Written([])
    # Two statements however many leases: a heartbeat takes its worker's
    # leases up every time.
    marks = ",".join("?" * len(wanted))
    adopted = []
    for row in conn.execute(
        f"SELECT id, {SPEC_COLUMNS}, attempt_count, lease_token, lease_holder,"
        f" state, cancel_requested, lease_expires FROM jobs WHERE id IN ({marks})"
        f" AND {_LEASED}",
        list(wanted),
    ).fetchall():
        attempt, token, lease_holder, state, cancel_requested, lease_expires = row[
            1 + SPEC_WIDTH:
        ]
        if (
            token not in wanted[row[0]]
            or holder is not None and lease_holder != holder
            or lease_expires is None or lease_expires < now
        ):
            continue
        adopted.append(ResumedLease(
            Lease(row[0], attempt, token, lease_holder, expires,
                  spec_from_row(row[1:1 + SPEC_WIDTH])),
            JobState(state),
            bool(cancel_requested),
        ))
    if adopted:
        order = {job_id: i for i, job_id in enumerate(wanted)}
        adopted.sort(key=lambda item: order[item.lease.job_id])
        marks = ",".join("?" * len(adopted))
        conn.execute(
            f"UPDATE jobs SET lease_server = ?, lease_expires = ? WHERE id IN ({marks})",
            [server, expires, *(item.lease.job_id for item in adopted)],
        )
    return Written(adopted)


def finish_served(
    writer: WriterState,
    conn: sqlite3.Connection,
    lease: Lease,
    outcome: Outcome,
    now: float,
    server: str,
) -> Written:
    """
    Record how an attempt ended, as L{finish} does, if the dispatcher
    C{server} serves its lease: it granted it and none took it up since,
    or it took it up last (L{FinishServed}).  Else L{StaleLease}: another
    dispatcher serves the worker that holds it now.
    """
    row = _leased_row(
        conn, lease, "SELECT state, lease_token, lease_server FROM jobs WHERE id = ?"
    )
    if row[2] is not None and row[2] != server:
        raise StaleLease(lease.job_id, lease.token)
    return finish(writer, conn, lease, outcome, now)


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


def mark_running(
    writer: WriterState, conn: sqlite3.Connection, lease: Lease, now: float
) -> Written:
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
    return Written(None, ((lease.job_id, JobState.RUNNING, state, lease.attempt),))


def finish(
    writer: WriterState, conn: sqlite3.Connection, lease: Lease, outcome: Outcome, now: float
) -> Written:
    """
    Record how an attempt ended (L{Finish}): the job ends, or waits for its
    next attempt; its dependents move on or are cancelled.
    """
    row = _leased_row(conn, lease, _ENDING)
    state = JobState(row[0])
    cancel_requested, spent, max_attempts, retry_delay, owner = row[2:]
    error = outcome.error
    result = None if outcome.result is None else encode_stored(outcome.result)
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
    conn.execute(
        _END_ATTEMPT,
        (now, outcome.exit_code, error, limits_to_stored(outcome.limits),
         log_cut_to_stored(outcome.log_cut), lease.token),
    )
    spent += 1
    if retried:
        return _retry_later(writer, conn, lease.job_id, state, spent, retry_delay, now, error,
            outcome.exit_code, result, lease.attempt,
        )
    conn.execute(
        _END_JOB,
        (target.value, now, outcome.exit_code, result, error, spent, lease.job_id),
    )
    writer.owners.add(owner, -1)
    changed: list[Change] = [
        (lease.job_id, target, state, lease.attempt, outcome.exit_code, error)
    ]
    # Until a job has depended on another, no job has dependents to
    # free or cancel (the query was a twentieth of a no-op job's time).
    wake = (
        after_final(conn, lease.job_id, target, now, changed, writer.owners)
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
    attempt: Optional[int] = None,
) -> Written:
    delay = writer.backoff(retry_delay, spent)
    if delay > 0:
        target, due = JobState.PENDING, now + delay
        reason = f"attempt {spent} failed; retrying at {format_time(due)}"
    else:
        target, due = JobState.QUEUED, None
        reason = QUEUED_REASON
    if not may_transition(state, JobState.QUEUED):
        raise InvalidTransition(job_id, state, target)
    conn.execute(
        "UPDATE jobs SET state = ?, not_before = ?, wait_reason = ?, error = ?,"
        " exit_code = ?, result = ?, attempts_spent = ?, started_at = NULL,"
        " lease_token = NULL, lease_holder = NULL, lease_expires = NULL,"
        " lease_server = NULL WHERE id = ?",
        (target.value, due, reason, error, exit_code, result, spent, job_id),
    )
    return Written(None, ((job_id, target, state, attempt, exit_code, error),), due)


def finish_together(
    writer: WriterState, conn: sqlite3.Connection, work: list[Finish]
) -> list[Written]:
    """
    Record several plain successes with one read and two updates, as
    L{finish} would one by one.  Anything L{finish} would treat
    otherwise (a stale lease, a cancel asked for meanwhile) raises
    L{Replay}, and the group is replayed one write at a time.
    """
    leases = [write.lease for write in work]
    rows = {
        row[0]: row[1:]
        for row in conn.execute(
            _ending_together(len(leases)), [lease.job_id for lease in leases]
        )
    }
    attempts = []
    jobs = []
    written = []
    owners = writer.owners
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
        result = None if outcome.result is None else encode_stored(outcome.result)
        attempts.append(
            (now, outcome.exit_code, outcome.error, limits_to_stored(outcome.limits),
             log_cut_to_stored(outcome.log_cut), lease.token)
        )
        jobs.append(
            ("succeeded", now, outcome.exit_code, result, outcome.error, row[3] + 1,
             lease.job_id)
        )
        written.append(Written(None, ((
            lease.job_id, JobState.SUCCEEDED, JobState(row[0]), lease.attempt,
            outcome.exit_code, outcome.error,
        ),)))
        owners.add(row[4], -1)
    conn.executemany(_END_ATTEMPT, attempts)
    conn.executemany(_END_JOB, jobs)
    return written


def release(
    writer: WriterState, conn: sqlite3.Connection, lease: Lease, now: float, reason: str
) -> Written:
    """
    Give an attempt up without spending it (L{Release}): the job is queued
    again, or cancelled if a cancel was asked for.
    """
    state = _check_lease(conn, lease)
    cancel_requested, owner = conn.execute(
        "SELECT cancel_requested, owner FROM jobs WHERE id = ?", (lease.job_id,)
    ).fetchone()
    conn.execute(
        "UPDATE attempts SET finished_at = ?, error = ? WHERE token = ?",
        (now, reason, lease.token),
    )
    if cancel_requested:
        target, wait_reason, finished = JobState.CANCELLED, None, now
    else:
        target, wait_reason, finished = JobState.QUEUED, QUEUED_REASON, None
    if not may_transition(state, target):
        raise InvalidTransition(lease.job_id, state, target)
    # The attempt stays in the history, but a released attempt is not
    # spent: attempts_spent counts attempts that ended on their own.
    conn.execute(
        "UPDATE jobs SET state = ?, wait_reason = ?, started_at = NULL,"
        " finished_at = ?, lease_token = NULL, lease_holder = NULL,"
        " lease_expires = NULL, lease_server = NULL WHERE id = ?",
        (target.value, wait_reason, finished, lease.job_id),
    )
    changed: list[Change] = [(lease.job_id, target, state, lease.attempt)]
    wake = None
    if target is JobState.CANCELLED:
        writer.owners.add(owner, -1)
        wake = after_final(conn, lease.job_id, target, now, changed, writer.owners)
    return Written(None, tuple(changed), wake)


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
    changed: list[Change] = []
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


def renew_leases(
    writer: WriterState,
    conn: sqlite3.Connection,
    holder: str,
    tokens: Sequence[int],
    now: float,
    lease_seconds: float,
    token_seconds: float,
) -> Written:
    """
    Move the expiry of every lease C{holder} has (a dispatcher's local
    executor: one statement, however many) to C{now + lease_seconds}, and
    of each live lease of C{tokens} (its remote workers') to C{now +
    token_seconds} (L{RenewLeases}).  Fires with the tokens C{holder} still holds: a
    lease of its own missing from them was taken from it (its expiry
    passed and another dispatcher recovered it), and its job must stop.
    """
    expires = now + lease_seconds
    held = [
        token
        for (token,) in conn.execute(
            f"SELECT lease_token FROM jobs INDEXED BY jobs_state"
            f" WHERE {_LEASED} AND lease_holder = ?",
            (holder,),
        )
    ]
    if held:
        conn.execute(
            "UPDATE jobs INDEXED BY jobs_state SET lease_expires = ?"
            f" WHERE {_LEASED} AND lease_holder = ?",
            (expires, holder),
        )
    if tokens:
        conn.execute(
            _RENEW_TOKENS, (now + token_seconds, json.dumps(sorted(set(tokens))))
        )
    return Written(frozenset(held))


# The leases of a list of tokens (a JSON array), found along the index of
# states (no index has the tokens).
_RENEW_TOKENS = differs(
    "UPDATE jobs INDEXED BY jobs_state SET lease_expires = ?"
    f" WHERE {_LEASED} AND lease_token IN (SELECT value FROM json_each(?))",
    "UPDATE jobs SET lease_expires = %s"
    f" WHERE {_LEASED} AND lease_token IN"
    " (SELECT value::bigint FROM json_array_elements_text(%s::json))",
)


# The attempts whose leases ran out, oldest expiry first.
_EXPIRED = (
    "SELECT a.job_id, a.number, a.token, j.lease_holder, j.lease_expires"
    " FROM jobs j INDEXED BY jobs_state JOIN attempts a ON a.token = j.lease_token"
    f" WHERE {_LEASED} AND j.lease_expires < ? AND j.lease_holder != ?"
    " ORDER BY j.lease_expires LIMIT ?"
)


def expire_leases(
    writer: WriterState,
    conn: sqlite3.Connection,
    now: float,
    keep_holder: str,
    keep_tokens: Sequence[int],
    limit: int,
) -> Written:
    """
    Record as lost the attempts whose leases expired before C{now} (their
    holder stopped renewing them: a dispatcher that died or lost the
    database, a worker that fell silent), but C{keep_holder}'s and those
    of C{keep_tokens} (the caller's own, which it renews itself): each is
    retried if it has attempts left and failed otherwise, as L{finish}
    does; its token is no longer the job's, so a late result of the old
    holder changes nothing (L{ExpireLeases}).  At most C{limit} a call.
    """
    keep = set(keep_tokens)
    rows = [
        row
        for row in conn.execute(_EXPIRED, (now, keep_holder, limit + len(keep))).fetchall()
        if row[2] not in keep
    ][:limit]
    expired = []
    changed: list[Change] = []
    wakes = []
    for job_id, number, token, holder, expires in rows:
        reason = (
            f"lost: its lease expired at {format_time(expires)} without being renewed "
            f"by its holder {holder}"
        )
        lease = Lease(job_id, number, token, holder, 0.0, JobSpec())
        written = finish(writer, conn, lease, Outcome(JobState.FAILED, error=reason), now)
        expired.append(ExpiredLease(job_id, number, token, holder, expires))
        changed.extend(written.changed)
        if written.wake_at is not None:
            wakes.append(written.wake_at)
    return Written(expired, tuple(changed), min(wakes) if wakes else None)
