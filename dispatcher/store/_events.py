"""
The SQLite store's events: a row for every committed change of a job's
state and every worker's coming and going, written by the group-commit
writer in the same transaction as the changes (L{record_events}); the
stored events read back after an id, a page at a time (L{read_events});
and the removal of the old ones (L{remove_events}).

Every write reports the jobs whose state it changed (L{Written.changed}),
and a claim the leases it made: those are the one place every change
passes, so the recorder runs once a group, after its writes and before
its commit, and sees them all.  An event's id is one past the greatest
stored; removal never takes the newest, so ids never go back, and they
have no gaps (a group that rolls back rolls its rows back with it).

A row is small: the id, the time, the job, its new and previous states,
the attempt, and an end's exit code and error; what the job is (owner,
name, queue, labels, array) is read from the job's row when a stored
event is read, and taken from what the write had in hand for the events
it publishes live (a claim's lease, a submission's jobs), so that the
no-op path reads nothing more.  A column without a value is left out of
the statement (SQLite binds a Python C{None} several times slower than a
number).  The events of a plain submission's jobs (a batch of commands or
tasks: all new, queued, of one owner) are one row: C{jobs} of them, their
ids a JSON array in C{job_ids}, numbered from the row's id on, read back
one event a job.
"""

from __future__ import annotations

import functools
import itertools
import sqlite3
from typing import TYPE_CHECKING, Any, Iterable, Optional, Sequence, Union

import attrs
import orjson

from dispatcher.model._events import JobEvent, SameChange, WorkerEvent
from dispatcher.model._jobs import JobSpec, JobState
from dispatcher.store._results import Written
from dispatcher.store._stored import decode_stored
from dispatcher.store._writes import (
    Cancel,
    Claim,
    Finish,
    MarkRunning,
    RecordPresence,
    Recover,
    Release,
    Retry,
    Submit,
    SubmitPlain,
    Write,
)

if TYPE_CHECKING:
    from dispatcher.store._operations import WriterState

Event = Union[JobEvent, WorkerEvent]

# The columns of an event's row after its id, time, job and state, which
# are always given: each left out of the INSERT when it has no value.
_OPTIONAL = ("previous", "attempt", "exit_code", "error")

_STATES = {state.value: state for state in JobState}

# The most ids in one IN (...) list of a lookup of jobs (SQLite allows
# 32,766 variables; a shorter list keeps each statement small).
_LOOKUP_CHUNK = 500


@attrs.frozen
class EventPage:
    """
    Stored events after an id, in id order, and the ids the store holds:
    C{oldest} and C{newest} (both C{None} when it holds none).
    """

    events: list[Event]
    oldest: Optional[int]
    newest: Optional[int]


@attrs.frozen
class RemovedEvents:
    """
    What one step of removing old events did: how many it removed, and
    whether none older is left (C{done}).
    """

    removed: int
    done: bool


@functools.lru_cache(maxsize=32)
def _insert_statement(present: tuple[bool, ...]) -> str:
    columns = ["id", "at", "job_id", "state", *itertools.compress(_OPTIONAL, present)]
    return (
        f"INSERT INTO events ({', '.join(columns)})"
        f" VALUES ({', '.join('?' * len(columns))})"
    )


def _lookup(
    conn: sqlite3.Connection, job_ids: Iterable[str]
) -> dict[str, tuple[Optional[str], JobSpec]]:
    """
    The owner and the shown fields of the spec of the jobs C{job_ids}
    (those still stored), read from their rows: for the changes whose
    write had no job in hand (a promotion, a dependent freed or cancelled,
    a recovery at start).
    """
    found: dict[str, tuple[Optional[str], JobSpec]] = {}
    ids = list(dict.fromkeys(job_ids))
    for start in range(0, len(ids), _LOOKUP_CHUNK):
        chunk = ids[start:start + _LOOKUP_CHUNK]
        for job_id, owner, name, queue, labels, array_id, batch_id in conn.execute(
            "SELECT id, owner, name, queue, labels, array_id, batch_id FROM jobs"
            f" WHERE id IN ({','.join('?' * len(chunk))})",
            chunk,
        ):
            found[job_id] = (owner, _shown_spec(name, queue, labels, array_id, batch_id))
    return found


def _shown_spec(
    name: Optional[str],
    queue: str,
    labels: Optional[str],
    array_id: Optional[str],
    batch_id: Optional[str],
) -> JobSpec:
    return JobSpec(
        name=name,
        queue=queue,
        labels=decode_stored(labels) if labels and labels != "{}" else {},
        array_id=array_id,
        batch_id=batch_id,
    )


@functools.lru_cache(maxsize=256)
def _queue_spec(queue: str) -> JobSpec:
    """
    What a plain job shows of its spec, by its queue: made once a queue (a
    spec took five microseconds to make, a tenth of the recorder's time a
    plain job).
    """
    return JobSpec(queue=queue)


def _known(write: Write, value: Any) -> Any:
    """
    What the write had in hand of the jobs it changed: a mapping of job id
    to C{(owner, spec)}, or one C{(owner, spec)} for all of them, or
    C{None}.  Anything else is looked up (L{_lookup}).
    """
    kind = type(write)
    if kind is SubmitPlain:
        # The same for every job of the request (plain jobs have no name,
        # labels or array; a batch's share its id).
        jobs, owner = write.jobs, write.owner  # type: ignore[union-attr]
        if jobs.batch_id is not None:
            return (owner, JobSpec(queue=jobs.queue, batch_id=jobs.batch_id))
        return (owner, _queue_spec(jobs.queue))
    if kind is Submit:
        return {job.id: (job.owner, job.spec) for job in value.jobs}
    if kind is MarkRunning or kind is Finish or kind is Release:
        lease = write.lease  # type: ignore[union-attr]
        if lease.owner is None:
            # A lease a restart resumed does not know its job's owner.
            return None
        return {lease.job_id: (lease.owner, lease.spec)}
    if kind is Cancel:
        job = value[0]
        return {job.id: (job.owner, job.spec)}
    if kind is Retry:
        return {value.id: (value.owner, value.spec)}
    return None


def record_events(
    writer: WriterState,
    conn: sqlite3.Connection,
    work: Sequence[Write],
    results: Sequence[tuple[bool, Any]],
) -> list[Sequence[Event]]:
    """
    Store an event for every change the group's writes that succeeded
    made, in their order, numbered after the greatest id stored; return
    each write's events (an empty tuple for most), for the dispatcher to
    publish once the group commits, each write's just before its answer.
    Runs on the writer thread, inside the group's transaction, for every
    group: written for speed (a no-op job makes three events).
    """
    by_write: list[Sequence[Event]] = [()] * len(work)
    # Rows by the optional columns they have (see _insert_statement).
    shapes: dict[tuple[bool, ...], list[Any]] = {}
    worker_rows: list[tuple[int, float, str, str]] = []
    # Plain submissions' events, one row a write: the first id, the time,
    # how many jobs and their ids as a JSON array.
    plain_rows: list[tuple[int, float, int, str]] = []
    # Events whose job's owner and spec are to be read from its row.
    unknown: list[tuple[list[Event], int]] = []
    next_id = 0
    for place, (write, (ok, value)) in enumerate(zip(work, results)):
        if not ok:
            continue
        kind = type(write)
        if kind is Claim:
            leases = value.leases
            if not leases:
                continue
            if not next_id:
                next_id = _next_id(conn)
            now = write.now  # type: ignore[union-attr]
            events: list[Event] = []
            rows = shapes.setdefault(_CLAIMED, [])
            for lease in leases:
                state = JobState.STAGING if lease.spec.inputs else JobState.RUNNING
                rows.append((next_id, now, lease.job_id, state._value_, _QUEUED_VALUE,
                             lease.attempt))
                if lease.owner is None:
                    unknown.append((events, len(events)))
                events.append(JobEvent(lease.job_id, state, None, next_id, now,
                                       JobState.QUEUED, lease.attempt, None, None,
                                       lease.owner, lease.spec, lease.holder))
                next_id += 1
            by_write[place] = events
            continue
        if kind is RecordPresence:
            if not next_id:
                next_id = _next_id(conn)
            now, worker, change = write.now, write.worker, write.change  # type: ignore[union-attr]
            worker_rows.append((next_id, now, change, worker))
            by_write[place] = [WorkerEvent(next_id, now, worker, change)]
            next_id += 1
            continue
        if type(value) is not Written or not value.changed:
            continue
        if not next_id:
            next_id = _next_id(conn)
        now = write.now  # type: ignore[union-attr]
        known = _known(write, value.value)
        if kind is SubmitPlain:
            # Every job of the request new and queued, with the same owner
            # and shown spec: one row for all, the ids a JSON array
            # numbered from the row's id (a row a job cost a batch a sixth
            # of its rate), and the events made only as they are read
            # (SameChange), on the reactor thread (a loop here was half the
            # writer's time for a batch of plain jobs).
            ids = value.value.ids
            plain_rows.append((next_id, now, len(ids), orjson.dumps(ids).decode()))
            owner, spec = known  # type: ignore[misc]
            by_write[place] = SameChange(ids, next_id, now, JobState.QUEUED, owner, spec)
            next_id += len(ids)
            continue
        if kind in _LEASED:
            holder = write.lease.holder  # type: ignore[union-attr]
        elif kind is Recover:
            holder = write.holder  # type: ignore[union-attr]
        else:
            holder = None
        events = []
        shared = known if type(known) is tuple else None
        for change in value.changed:
            size = len(change)
            job_id, state = change[0], change[1]
            row = [next_id, now, job_id, state._value_]
            previous = attempt = exit_code = error = None
            if size > 2:
                previous, attempt, exit_code, error = (change + _PADDING)[2:6]
                if previous is not None:
                    row.append(previous._value_)
                if attempt is not None:
                    row.append(attempt)
                if exit_code is not None:
                    row.append(exit_code)
                if error is not None:
                    row.append(error)
                shape = (previous is not None, attempt is not None, exit_code is not None,
                         error is not None)
            else:
                shape = _NOTHING
            shapes.setdefault(shape, []).append(row)
            if shared is not None:
                facts = shared
            else:
                facts = None if known is None else known.get(job_id)
            if facts is None:
                unknown.append((events, len(events)))
                facts = (None, None)
            events.append(JobEvent(job_id, state, None, next_id, now, previous, attempt,
                                   exit_code, error, facts[0], facts[1], holder))
            next_id += 1
        by_write[place] = events
    if not next_id:
        return by_write
    if unknown:
        found = _lookup(
            conn, (events[i].job_id for events, i in unknown)  # type: ignore[union-attr]
        )
        for events, i in unknown:
            event = events[i]
            facts = found.get(event.job_id)  # type: ignore[union-attr]
            if facts is not None:
                events[i] = event._replace(  # type: ignore[union-attr]
                    owner=facts[0], spec=facts[1]
                )
    for shape, rows in shapes.items():
        conn.executemany(_insert_statement(shape), rows)
    if plain_rows:
        conn.executemany(_INSERT_QUEUED, plain_rows)
    if worker_rows:
        conn.executemany(
            "INSERT INTO events (id, at, state, worker) VALUES (?, ?, ?, ?)", worker_rows
        )
    return by_write


def _next_id(conn: sqlite3.Connection) -> int:
    """
    The next event's id: one past the greatest stored (one seek to the end
    of the table's key; a row of several jobs' events holds the ids from
    its own on).
    """
    found = conn.execute(_NEXT).fetchone()
    return 1 if found is None else found[0]


# The shapes of the commonest rows: no optional column (a new job), and a
# claim's (previous state and attempt).
_NOTHING = (False, False, False, False)
_PADDING = (None, None, None, None)
_CLAIMED = (True, True, False, False)
_QUEUED_VALUE = JobState.QUEUED.value
# The events of a plain submission's jobs, new and queued: one row, their
# ids a JSON array, numbered from the row's id.
_INSERT_QUEUED = (
    f"INSERT INTO events (id, at, state, jobs, job_ids) VALUES (?, ?, '{_QUEUED_VALUE}', ?, ?)"
)
# The writes made for a lease, whose events carry its holder.
_LEASED = (MarkRunning, Finish, Release)


# What a read of stored events selects: the event's row, and what its job
# still says (nothing, for a job removed since; a row of several jobs'
# events looks its jobs up after).  From the last row that begins at or
# before the id asked for (a row of several may hold the events after
# it); the rows after it follow.
_READ = (
    "SELECT e.id, e.at, e.job_id, e.state, e.previous, e.attempt, e.exit_code,"
    " e.error, e.worker, e.job_ids,"
    " j.owner, j.name, j.queue, j.labels, j.array_id, j.batch_id"
    " FROM events e LEFT JOIN jobs j ON j.id = e.job_id"
    " WHERE e.id >= (SELECT COALESCE(MAX(id), 0) FROM events WHERE id <= ?)"
    " ORDER BY e.id LIMIT ?"
)
# The id after the newest event: the last row's, past its jobs.
_NEXT = "SELECT id + COALESCE(jobs, 1) FROM events ORDER BY id DESC LIMIT 1"
# The oldest and newest ids, each read at one end of the key.
_BOUNDS = (
    "SELECT (SELECT MIN(id) FROM events),"
    " (SELECT id + COALESCE(jobs, 1) - 1 FROM events ORDER BY id DESC LIMIT 1)"
)


def read_events(conn: sqlite3.Connection, after: int, limit: int) -> EventPage:
    """
    At most C{limit} stored events with ids above C{after}, in id order,
    and the oldest and newest ids stored.  On a reader thread.
    """
    oldest, newest = conn.execute(_BOUNDS).fetchone()
    events: list[Event] = []
    # The events of rows of several jobs, whose owner and spec are read
    # from the jobs' rows once the page is made.
    unknown: list[int] = []
    # Each row holds one event at least: one more row than events asked
    # for covers a first row that ends at or before after.
    for row in conn.execute(_READ, (after, limit + 1)):
        (event_id, at, job_id, state, previous, attempt, exit_code, error, worker,
         job_ids, owner, name, queue, labels, array_id, batch_id) = row
        if job_ids is not None:
            # A row of several jobs' events: those after `after`, as many
            # as the page has room for.
            members = orjson.loads(job_ids)
            skip = max(0, after + 1 - event_id)
            for member_event_id, member in enumerate(
                members[skip:skip + limit - len(events)], event_id + skip
            ):
                unknown.append(len(events))
                events.append(JobEvent(member, _STATES[state], None, member_event_id, at))
        elif event_id <= after:
            continue
        elif job_id is None:
            events.append(WorkerEvent(event_id, at, worker, state))
        else:
            # A job removed since: what its row said is gone.
            spec = None if queue is None else _shown_spec(
                name, queue, labels, array_id, batch_id)
            events.append(
                JobEvent(
                    job_id, _STATES[state], None, event_id, at,
                    None if previous is None else _STATES[previous], attempt, exit_code,
                    error, owner, spec,
                )
            )
        if len(events) >= limit:
            break
    if unknown:
        found = _lookup(conn, (events[i].job_id for i in unknown))  # type: ignore[union-attr]
        for i in unknown:
            event = events[i]
            facts = found.get(event.job_id)  # type: ignore[union-attr]
            if facts is not None:
                events[i] = event._replace(owner=facts[0], spec=facts[1])  # type: ignore[union-attr]
    return EventPage(events, oldest, newest)


def remove_events(
    writer: WriterState, conn: sqlite3.Connection, cutoff: float, limit: int
) -> Written:
    """
    One step of removing old events (L{RemoveEvents}): the oldest, up to
    C{limit} of them, as long as they are older than C{cutoff}; never the
    newest, whose id the next event's counts from.  Ids and times rise
    together, so the first event not older than C{cutoff} ends the pass.
    """
    rows = conn.execute(
        "SELECT id, at, jobs FROM events ORDER BY id LIMIT ?", (limit + 1,)
    ).fetchall()
    (newest,) = conn.execute("SELECT MAX(id) FROM events").fetchone()
    last = None
    done = True
    removed = 0
    for i, (event_id, at, jobs) in enumerate(rows):
        if at >= cutoff or event_id == newest:
            break
        if i == limit:
            done = False
            break
        last = event_id
        # (A row of several jobs' events is removed whole, and counted as
        # the events it held.)
        removed += jobs or 1
    if last is None:
        return Written(RemovedEvents(0, True))
    conn.execute("DELETE FROM events WHERE id <= ?", (last,))
    return Written(RemovedEvents(removed, done))


def record_presence(
    writer: WriterState, conn: sqlite3.Connection, worker: str, change: str, now: float
) -> Written:
    """
    A worker connected or left (L{RecordPresence}): its event is stored by
    L{record_events}, with the group's others.
    """
    return Written(None)
