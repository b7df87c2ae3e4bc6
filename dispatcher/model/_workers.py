"""
What the dispatcher decides about remote workers and their leases, as
values: why a lease ended, the verdict on a worker's write about a lease,
and a connected worker as people see it.

The worker hub (L{dispatcher.core._hub}) makes them; the API turns them
into the worker protocol's wire types (L{dispatcher.wire._forms}) and
chooses the HTTP status.  Nothing here knows JSON or HTTP.
"""

from __future__ import annotations

import enum
from typing import Optional

import attrs

from dispatcher.model._jobs import Offer, Resources


class LeaseEnd(str, enum.Enum):
    """
    Why a lease ended, and so why a write that names its token is refused.
    """

    # A client cancelled the job.
    CANCELLED = "cancelled"
    # No heartbeat came within the lease's life.
    EXPIRED = "expired"
    # Its holder reported how the attempt ended.
    REPORTED = "reported"
    # Any other reason the token is not the job's current one, including a
    # restart that forgot why.
    SUPERSEDED = "superseded"


def default_fence_margin(lease_seconds: float) -> float:
    """
    The dispatcher's default C{[workers] fence_margin}: how long before a
    lease runs out its worker, hearing nothing, has stopped the job.  A
    fifth of the lease, at least 2 s (a host too loaded to kill a process
    within that has other troubles), but never more than a third, so that a
    worker's deadline is still a heartbeat period after its next heartbeat.
    """
    return min(max(2.0, lease_seconds / 5.0), lease_seconds / 3.0)


def default_last_attempt_grace(lease_seconds: float) -> float:
    """
    The dispatcher's default C{[workers] last_attempt_grace}: how much
    longer than its lease a job's last attempt waits for a silent worker's
    result before it is recorded lost.  A minute, or two leases if that is
    longer: enough for a worker cut off for a lease or so to get its result
    through once it can (a report sent into a broken connection waits its
    30 s timeout before it is sent again).
    """
    return max(60.0, 2.0 * lease_seconds)


@attrs.frozen
class LeaseVerdict:
    """
    The answer to one item of a worker's heartbeat or report: accepted, or
    refused because the lease ended (C{refused}).  An accepted heartbeat
    carries the lease's new expiry on the dispatcher's clock (C{expires}).
    """

    job_id: str
    token: int
    refused: Optional[LeaseEnd] = None
    expires: Optional[float] = None

    @property
    def ok(self) -> bool:
        """
        Whether the item was accepted.
        """
        return self.refused is None


@attrs.frozen
class ConnectedWorker:
    """
    A worker heard from within a lease's life, or waiting for work: what it
    offers, what it has free, the jobs it holds (by id, sorted), whether its
    long-poll is open, when it was last heard from (dispatcher clock), and
    whether another process called under its name within a lease's life.
    """

    offer: Offer
    free_slots: int
    free: Resources
    running: tuple[str, ...]
    waiting_for_work: bool
    last_contact: float
    name_shared: bool


class TooManyWorkerNames(Exception):
    """
    A worker name heard for the first time is refused: its credential, or
    the dispatcher in all, already keeps as many worker names as it may.
    Names are kept while their workers are connected; the limit bounds the
    dispatcher's memory against a credential that makes up names.

    @ivar name: the name refused.
    @ivar credential: the name of the credential it came with.
    @ivar limit: the limit reached.
    @ivar per_credential: whether it was the credential's limit (else the
        dispatcher's in all).
    """

    def __init__(
        self, name: str, credential: Optional[str], limit: int, per_credential: bool
    ) -> None:
        if per_credential:
            what = f"credential {credential} already has {limit} worker names connected"
            key = "max_names_per_credential"
        else:
            what = f"the dispatcher already has {limit} worker names connected"
            key = "max_names"
        super().__init__(
            f"worker.name: {name!r} is refused: {what} ([workers] {key}); reuse a "
            "name, or wait until a worker gone silent is forgotten (a lease's "
            "life after its last contact)"
        )
        self.name = name
        self.credential = credential
        self.limit = limit
        self.per_credential = per_credential
