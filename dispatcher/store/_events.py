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
number).
"""

from __future__ import annotations

import functools
import itertools
import operator
import sqlite3
from typing import TYPE_CHECKING, Any, Iterable, Optional, Sequence, Union

import attrs

from dispatcher.model._events import JobEvent, WorkerEvent
from dispatcher.model._jobs import JobSpec, JobState
from dispatcher.store._results import Written
from dispatcher.store._stored import decode_stored
from dispatcher.store._writes import (
    Cancel,
    Claim,
    Finish,
    MarkRunning,
    RecordPresence,
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
_NO_VALUES = (None,) * len(_OPTIONAL)

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
        for job_id, owner, name, queue, labels, array_id in conn.execute(
            "SELECT id, owner, name, queue, labels, array_id FROM jobs"
            f" WHERE id IN ({','.join('?' * len(chunk))})",
            chunk,
        ):
            found[job_id] = (owner, _shown_spec(name, queue, labels, array_id))
    return found


def _shown_spec(
    name: Optional[str], queue: str, labels: Optional[str], array_id: Optional[str]
) -> JobSpec:
    return JobSpec(
        name=name,
        queue=queue,
        labels=decode_stored(labels) if labels and labels != "{}" else {},
        array_id=array_id,
    )


def _known(write: Write, value: Any) -> Any:
    """
    What the write had in hand of the jobs it changed: a mapping of job id
    to C{(owner, spec)}, or a function of a job id giving the same or
    C{None}.  Anything else is looked up (L{_lookup}).
    """
    kind = type(write)
    if kind is SubmitPlain:
        # The same for every job of the request (plain jobs have no name,
        # labels or array).
        facts = (write.owner, JobSpec(queue=write.jobs.queue))  # type: ignore[union-attr]
        return lambda job_id: facts
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
    Runs on the writer thread, inside the group's transaction.
    """
    # Each pending event: time, job id, state, previous, attempt, exit
    # code, error, what is known of the job (owner, spec) or None, and the
    # write's place in the group.
    pending: list[tuple[Any, ...]] = []
    workers: list[tuple[int, float, str, str, int]] = []
    for place, (write, (ok, value)) in enumerate(zip(work, results)):
        if not ok:
            continue
        kind = type(write)
        if kind is Claim:
            now = write.now  # type: ignore[union-attr]
            for lease in value.leases:
                state = JobState.STAGING if lease.spec.inputs else JobState.RUNNING
                pending.append(
                    (now, lease.job_id, state, JobState.QUEUED, lease.attempt, None, None,
                     (lease.owner, lease.spec) if lease.owner is not None else None, place)
                )
            continue
        if kind is RecordPresence:
            workers.append(
                (len(pending), write.now, write.worker, write.change, place)  # type: ignore[union-attr]
            )
            pending.append(())
            continue
        if type(value) is not Written or not value.changed:
            continue
        now = write.now  # type: ignore[union-attr]
        known = _known(write, value.value)
        for change in value.changed:
            if len(change) < 6:
                change = change + (None,) * (6 - len(change))
            facts = None
            if known is not None:
                facts = known(change[0]) if callable(known) else known.get(change[0])
            pending.append((now, *change, facts, place))
    if not pending:
        return [()] * len(work)
    missing = [p[1] for p in pending if p and p[7] is None]
    looked_up = _lookup(conn, missing) if missing else {}
    (top,) = conn.execute("SELECT MAX(id) FROM events").fetchone()
    first = (top or 0) + 1
    shapes: dict[tuple[bool, ...], list[tuple[Any, ...]]] = {}
    events: list[Event] = []
    places: list[int] = []
    worker_rows = []
    for event_id, entry in zip(itertools.count(first), pending):
        if not entry:
            continue
        at, job_id, state, previous, attempt, exit_code, error, facts, place = entry
        optional = (
            None if previous is None else previous.value, attempt, exit_code, error,
        )
        present = tuple(map(operator.is_not, optional, _NO_VALUES))
        shapes.setdefault(present, []).append(
            (event_id, at, job_id, state.value, *itertools.compress(optional, present))
        )
        owner, spec = facts if facts is not None else looked_up.get(job_id, (None, None))
        events.append(
            JobEvent(job_id, state, None, event_id, at, previous, attempt, exit_code, error,
                     owner, spec)
        )
        places.append(place)
    for position, at, worker, change, place in workers:
        event_id = first + position
        worker_rows.append((event_id, at, change, worker))
        events.append(WorkerEvent(event_id, at, worker, change))
        places.append(place)
    for present, rows in shapes.items():
        conn.executemany(_insert_statement(present), rows)
    if worker_rows:
        conn.executemany(
            "INSERT INTO events (id, at, state, worker) VALUES (?, ?, ?, ?)", worker_rows
        )
    by_write: list[Sequence[Event]] = [()] * len(work)
    if workers:
        # Worker events are rare: put them in their place among the rest.
        ordered = sorted(zip(events, places), key=lambda pair: pair[0].id)
        events = [event for event, _ in ordered]
        places = [place for _, place in ordered]
    start = 0
    for place, group in itertools.groupby(places):
        count = len(list(group))
        by_write[place] = events[start:start + count]
        start += count
    return by_write


# What a read of stored events selects: the event's row, and what its job
# still says (nothing, for a job removed since).
_READ = (
    "SELECT e.id, e.at, e.job_id, e.state, e.previous, e.attempt, e.exit_code,"
    " e.error, e.worker, j.owner, j.name, j.queue, j.labels, j.array_id"
    " FROM events e LEFT JOIN jobs j ON j.id = e.job_id"
    " WHERE e.id > ? ORDER BY e.id LIMIT ?"
)
# Each on its own, so that SQLite reads one end of the index for each.
_BOUNDS = "SELECT (SELECT MIN(id) FROM events), (SELECT MAX(id) FROM events)"


def read_events(conn: sqlite3.Connection, after: int, limit: int) -> EventPage:
    """
    At most C{limit} stored events with ids above C{after}, in id order,
    and the oldest and newest ids stored.  On a reader thread.
    """
    oldest, newest = conn.execute(_BOUNDS).fetchone()
    events: list[Event] = []
    for row in conn.execute(_READ, (after, limit)):
        (event_id, at, job_id, state, previous, attempt, exit_code, error, worker,
         owner, name, queue, labels, array_id) = row
        if job_id is None:
            events.append(WorkerEvent(event_id, at, worker, state))
            continue
        # A job removed since: what its row said is gone.
        spec = None if queue is None else _shown_spec(name, queue, labels, array_id)
        events.append(
            JobEvent(
                job_id, _STATES[state], None, event_id, at,
                None if previous is None else _STATES[previous], attempt, exit_code,
                error, owner, spec,
            )
        )
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
        "SELECT id, at FROM events ORDER BY id LIMIT ?", (limit + 1,)
    ).fetchall()
    (newest,) = conn.execute("SELECT MAX(id) FROM events").fetchone()
    last = None
    done = True
    for i, (event_id, at) in enumerate(rows):
        if at >= cutoff or event_id == newest:
            break
        if i == limit:
            done = False
            break
        last = event_id
    if last is None:
        return Written(RemovedEvents(0, True))
    removed = conn.execute("DELETE FROM events WHERE id <= ?", (last,)).rowcount
    return Written(RemovedEvents(removed, done))


def record_presence(
    writer: WriterState, conn: sqlite3.Connection, worker: str, change: str, now: float
) -> Written:
    """
    A worker connected or left (L{RecordPresence}): its event is stored by
    L{record_events}, with the group's others.
    """
    return Written(None)
