"""
The SQLite store's write commands: one small class per kind of write, as
the group-commit writer queues them.

A command is a value: what to write, its fields in the order of the
store's operation for it.  L{DURABLE} names the kinds whose commit must
reach the disk before their answer.  The writer
tells by a command's class which operation applies it, and which writes it
may store together (plain submissions, plain successes).  They are
C{NamedTuple}s, not attrs classes, so that a command unpacks straight into
its operation's arguments: the writer applies thousands a second.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple, Optional, Sequence, Union

from dispatcher.model._groups import GroupKind
from dispatcher.model._jobs import JobSpec, JobState, Lease, Offer, Outcome, PlainJobs, Resources
from dispatcher.store._results import IdempotencyKey, RemovalCursor


class Submit(NamedTuple):
    """
    Store new jobs from their specs, all or nothing, owned by C{owner};
    unless C{sees_all}, their C{depends_on} may name only C{owner}'s jobs;
    if C{max_unfinished} is given, only while C{owner} then has at most
    that many unfinished jobs.
    """

    specs: Sequence[JobSpec]
    now: float
    ids: Sequence[str]
    idempotency: Optional[IdempotencyKey]
    owner: Optional[str] = None
    sees_all: bool = True
    max_unfinished: Optional[int] = None

    @property
    def plain(self) -> bool:
        """
        Whether nothing but the database itself can refuse it: no
        idempotency key to check, no dependency to look up.
        """
        return self.idempotency is None and not any(spec.depends_on for spec in self.specs)


class SubmitPlain(NamedTuple):
    """
    Store L{PlainJobs}, all or nothing, owned by C{owner}, with their
    specs' stored texts (made before the write is queued, so that the one
    writer thread does not spend its time encoding them); with
    C{max_unfinished}, as L{Submit}.
    """

    jobs: PlainJobs
    now: float
    ids: Sequence[str]
    idempotency: Optional[IdempotencyKey]
    stored: Sequence[str]
    owner: Optional[str] = None
    max_unfinished: Optional[int] = None


class Claim(NamedTuple):
    """
    Lease queued jobs to a holder.
    """

    offer: Offer
    capacity: int
    free: Resources
    now: float
    lease_seconds: float


class ResumeLeases(NamedTuple):
    """
    Extend the leases of remote holders at start-up.
    """

    local_holder: str
    now: float
    lease_seconds: float


class RecordProcess(NamedTuple):
    """
    Remember the process group that runs an attempt.
    """

    lease: Lease
    pid: int
    start_ticks: Optional[int]
    boot_id: Optional[str]


class MarkRunning(NamedTuple):
    """
    A staged job starts running.
    """

    lease: Lease
    now: float


class Finish(NamedTuple):
    """
    Record how an attempt ended.
    """

    lease: Lease
    outcome: Outcome
    now: float

    @property
    def success(self) -> bool:
        """
        Whether the attempt succeeded on its own (no cancel stopped it).
        """
        return self.outcome.state is JobState.SUCCEEDED and not self.outcome.stopped


class Release(NamedTuple):
    """
    Give an attempt up without spending it.
    """

    lease: Lease
    now: float
    reason: str


class Cancel(NamedTuple):
    """
    Cancel a job (at once, or by asking its holder); if C{owner} is given,
    only a job of that owner.
    """

    job_id: str
    now: float
    owner: Optional[str] = None


class Retry(NamedTuple):
    """
    Put a failed or cancelled job back in line; if C{owner} is given, only
    a job of that owner, and only its dependents of that owner with it; if
    C{max_unfinished} is given, only while the job's owner then has at most
    that many unfinished jobs.
    """

    job_id: str
    now: float
    dependents: bool
    owner: Optional[str] = None
    max_unfinished: Optional[int] = None


class PromoteDue(NamedTuple):
    """
    Queue the pending jobs whose time has come.
    """

    now: float


class PurgeIdempotency(NamedTuple):
    """
    Forget idempotency keys past their time to live.
    """

    now: float


class RemoveFinished(NamedTuple):
    """
    One step of a removal pass: remove at most C{limit} finished jobs,
    looking at most at C{scan} jobs from C{cursor} on: those finished
    before C{cutoff} (C{None}: no age rule), and the C{excess} earliest
    submitted (the count rule).
    """

    now: float
    cutoff: Optional[float]
    excess: int
    cursor: RemovalCursor
    limit: int
    scan: int


class Remove(NamedTuple):
    """
    Remove one finished job now; if C{owner} is given, only a job of that
    owner.
    """

    job_id: str
    now: float
    owner: Optional[str] = None


class Shrink(NamedTuple):
    """
    Give at most C{limit} bytes of free pages back to the file system.
    """

    limit: int


class ClaimDeliveries(NamedTuple):
    """
    Take at most C{limit} webhook deliveries due at C{now}, but those of
    C{exclude}, for this dispatcher alone until C{now + hold}.
    """

    now: float
    limit: int
    hold: float
    exclude: Sequence[int]


class RecordDeliveries(NamedTuple):
    """
    What the delivery service did with the webhook deliveries it tried:
    the ids C{done} (delivered, or given up) go; each of C{later} (an id
    and when it is due again) has one more try counted.
    """

    done: Sequence[int]
    later: Sequence[tuple[int, float]]


class Recover(NamedTuple):
    """
    Record the attempts a holder left running as lost.
    """

    holder: str
    now: float


class RenewLeases(NamedTuple):
    """
    Move the expiry of every lease C{holder} has to C{now +
    lease_seconds}, and of the leases of C{tokens} to C{now +
    token_seconds}.
    """

    holder: str
    tokens: Sequence[int]
    now: float
    lease_seconds: float
    token_seconds: float


class AdoptLeases(NamedTuple):
    """
    Take up the live leases of C{items} (C{(job_id, token)}) that the
    remote worker C{holder} holds, for the dispatcher C{server}: their
    expiry moves to C{now + seconds}.
    """

    holder: Optional[str]
    items: Sequence[tuple[str, int]]
    server: str
    now: float
    seconds: float


class FinishServed(NamedTuple):
    """
    Record how an attempt ended, as L{Finish}, if the dispatcher C{server}
    still serves its lease (no other took it up since).
    """

    lease: Lease
    outcome: Outcome
    now: float
    server: str


class ExpireLeases(NamedTuple):
    """
    Record as lost the attempts whose leases expired before C{now}, but
    C{keep_holder}'s and those of C{keep_tokens}; at most C{limit}.
    """

    now: float
    keep_holder: str
    keep_tokens: Sequence[int]
    limit: int


class RecordPresence(NamedTuple):
    """
    A remote worker connected or left: stored as an event
    (L{dispatcher.store._events}).
    """

    worker: str
    change: str
    now: float


class SetQueueLimits(NamedTuple):
    """
    Take each queue's limit of running jobs from now on (a reload of the
    configuration): the queues' names and limits, C{default} among them.
    """

    limits: Mapping[str, int]


class RemoveEvents(NamedTuple):
    """
    One step of removing old events: at most C{limit} of those older than
    C{cutoff}.
    """

    cutoff: float
    limit: int


class CancelGroup(NamedTuple):
    """
    Cancel every unfinished member of an array or a batch; if C{owner} is
    given, only a group of that owner.
    """

    kind: GroupKind
    group_id: str
    now: float
    owner: Optional[str] = None


class RetryGroup(NamedTuple):
    """
    Put every failed or cancelled member of an array or a batch back in
    line; if C{owner} is given, only a group of that owner; if
    C{max_unfinished} is given, only while the group's owner then has at
    most that many unfinished jobs.
    """

    kind: GroupKind
    group_id: str
    now: float
    owner: Optional[str] = None
    max_unfinished: Optional[int] = None


# The writes a client is told are done (submissions, cancels, retries, a
# removal asked for): their commit syncs to the disk before they are
# answered.  The others change run state alone (or remove what retention
# removes: undone by a power cut, it is removed again; or record webhook
# deliveries: undone, a delivery is sent again, which its receiver tells
# by its id), and may reach the disk within the store's sync interval.
DURABLE = frozenset({Submit, SubmitPlain, Cancel, Retry, Remove, CancelGroup, RetryGroup})

# Any of the commands.
Write = Union[
    Submit, SubmitPlain, Claim, ResumeLeases, RecordProcess, MarkRunning, Finish, Release,
    Cancel, Retry, PromoteDue, PurgeIdempotency, RemoveFinished, Remove, Shrink,
    Recover, RenewLeases, ExpireLeases, AdoptLeases, FinishServed, RecordPresence,
    RemoveEvents, CancelGroup,
    RetryGroup, RecordDeliveries, ClaimDeliveries,
    SetQueueLimits,
]
