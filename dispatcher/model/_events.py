"""
The events a client can follow (C{GET /v1/events}): a job's committed
change of state (L{JobEvent}) and a remote worker's coming and going
(L{WorkerEvent}), each with its durable, increasing id; and what one
subscriber asks to see of them (L{EventFilter}).

They are C{NamedTuple}s, as the store's write commands are: the store's
one writer makes one for every change it commits, thousands a second, and
a tuple is made in a third of the time of a frozen attrs class.
"""

from __future__ import annotations

from itertools import repeat
from typing import Iterator, Mapping, NamedTuple, Optional, Sequence

import attrs

from dispatcher.model._jobs import JobSpec, JobState

# The types of event a client may ask for (?type=).
JOB = "job"
WORKER = "worker"
EVENT_TYPES = (JOB, WORKER)

# What a worker event says happened.
CONNECTED = "connected"
LEFT = "left"


class JobEvent(NamedTuple):
    """
    A job reached a new state, as committed.

    @ivar job_id: the job.
    @ivar state: its new state.
    @ivar job: the whole job, where the change produced it (C{None} mostly:
        the events the store publishes carry what follows instead).
    @ivar id: the event's id: durable and increasing, 0 for an event that
        was never stored.
    @ivar at: when it changed (seconds since the epoch).
    @ivar previous: the state it left, C{None} for a new job.
    @ivar attempt: the attempt the change belongs to (a claim's, a start's,
        an end's), or C{None}.
    @ivar exit_code: an ended attempt's exit code, if it had one.
    @ivar error: why it failed or was cancelled, if it did.
    @ivar owner: the job's owner (C{None} when it has none, or when the job
        was removed before a stored event was read).
    @ivar spec: what of the job's spec an event shows and is filtered on
        (name, queue, labels, array, batch): the job's own spec, or a spec
        made of those fields alone; C{None} when the job was removed before
        a stored event was read.
    @ivar holder: where the attempt runs or ran (the local executor's
        holder name, or a remote worker's), for the changes a lease made (a
        claim, a start, an end, a release) as they are published; C{None}
        for others, and for every stored event read back (the daemon's log
        tells it, L{dispatcher.core._joblog}; the event stream does not).
    """

    job_id: str
    state: JobState
    job: Optional[object] = None
    id: int = 0
    at: float = 0.0
    previous: Optional[JobState] = None
    attempt: Optional[int] = None
    exit_code: Optional[int] = None
    error: Optional[str] = None
    owner: Optional[str] = None
    spec: Optional[JobSpec] = None
    holder: Optional[str] = None

    @property
    def type(self) -> str:
        """
        The event's type as a client sees it: L{JOB}.
        """
        return JOB


class WorkerEvent(NamedTuple):
    """
    A remote worker connected (was heard from while it was not connected)
    or left (no request open and none for a lease's life), as committed.
    """

    id: int
    at: float
    worker: str
    change: str

    @property
    def type(self) -> str:
        """
        The event's type as a client sees it: L{WORKER}.
        """
        return WORKER


@attrs.frozen
class EventFilter:
    """
    What one subscriber sees: every condition given must hold (each set
    holds the values any of which may match; C{None}: no condition).

    @ivar types: the event types (L{EVENT_TYPES}).
    @ivar job_id: one job's events alone.
    @ivar array_id: one array's members' alone.
    @ivar batch_id: one batch's members' alone.
    @ivar labels: labels every job must carry, C{(key, value)}, a value of
        C{None} for any value.
    @ivar owner: one owner's jobs alone.
    @ivar states: the new states.
    @ivar sees_all: whether the subscriber may see every job; a submitter
        sees its own (C{owner} is then its name) and no worker events.
    """

    types: frozenset[str] = frozenset(EVENT_TYPES)
    job_id: Optional[str] = None
    array_id: Optional[str] = None
    batch_id: Optional[str] = None
    labels: tuple[tuple[str, Optional[str]], ...] = ()
    owner: Optional[str] = None
    states: Optional[frozenset[JobState]] = None
    sees_all: bool = True

    @property
    def jobs_only(self) -> bool:
        """
        Whether a condition on jobs is given, which no worker event meets.
        """
        return bool(
            self.job_id or self.array_id or self.batch_id or self.labels
            or self.owner is not None or self.states is not None or not self.sees_all
        )

    def matches(self, event: JobEvent | WorkerEvent) -> bool:
        """
        Whether the subscriber sees C{event}.
        """
        if type(event) is WorkerEvent:
            return WORKER in self.types and not self.jobs_only
        if JOB not in self.types:
            return False
        assert isinstance(event, JobEvent)
        if self.job_id is not None and event.job_id != self.job_id:
            return False
        if self.owner is not None and event.owner != self.owner:
            return False
        if self.states is not None and event.state not in self.states:
            return False
        if self.array_id is not None or self.batch_id is not None or self.labels:
            spec = event.spec
            if spec is None:
                return False
            if self.array_id is not None and spec.array_id != self.array_id:
                return False
            if self.batch_id is not None and spec.batch_id != self.batch_id:
                return False
            return _has_labels(spec.labels, self.labels)
        return True


def _has_labels(
    labels: Mapping[str, str], wanted: tuple[tuple[str, Optional[str]], ...]
) -> bool:
    for key, value in wanted:
        if key not in labels or (value is not None and labels[key] != value):
            return False
    return True


class SameChange(Sequence[JobEvent]):
    """
    The events of one write that made the same change to every job it
    changed, all of one queue and owner: a plain submission's jobs, new and
    queued, numbered from C{first_id} in the order of C{job_ids}.  The
    events are made as they are read (the store's writer makes none of
    them, one object a job being a third of what it spends on a batch's
    events), and whoever counts them may count them at once
    (L{dispatcher.store._counts.StateCounts.count_events}, the metrics'
    count of submissions).
    """

    __slots__ = ("job_ids", "first_id", "at", "state", "owner", "spec")

    def __init__(self, job_ids: Sequence[str], first_id: int, at: float, state: JobState,
                 owner: Optional[str], spec: Optional[JobSpec]) -> None:
        self.job_ids = job_ids
        self.first_id = first_id
        self.at = at
        self.state = state
        self.owner = owner
        self.spec = spec

    def __len__(self) -> int:
        return len(self.job_ids)

    def __iter__(self) -> Iterator[JobEvent]:
        # Made in C: zip, map and tuple.__new__ (not JobEvent's own
        # __new__, a Python function).
        return map(_new_tuple, repeat(JobEvent), zip(
            self.job_ids, repeat(self.state), repeat(None),
            range(self.first_id, self.first_id + len(self.job_ids)), repeat(self.at),
            repeat(None), repeat(None), repeat(None), repeat(None), repeat(self.owner),
            repeat(self.spec), repeat(None),
        ))

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return list(self)[index]
        job_id = self.job_ids[index]
        number = range(self.first_id, self.first_id + len(self.job_ids))[index]
        return JobEvent(job_id, self.state, None, number, self.at, owner=self.owner,
                        spec=self.spec)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (SameChange, list, tuple)):
            return list(self) == list(other)
        return NotImplemented

    def __repr__(self) -> str:
        return f"SameChange({list(self)!r})"


_new_tuple = tuple.__new__
