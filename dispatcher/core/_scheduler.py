"""
The scheduler decides which holder should claim how many queued jobs, and
when.  It does no I/O: the store claims, the executors run.

It keeps a compact cache: how many jobs are queued (an estimate that is
never below the truth) and how many slots each holder has free.  A claim
that comes back short tells it the queue is empty, or, when the store
passed over jobs that did not fit that holder, that the holder has nothing
to take until a job is queued or one of its own slots frees.  Each holder
has at most one claim in flight, so a claim always sees what the holder's
earlier claims took.  Nothing polls: a job becoming queued and a slot
becoming free are the only events that lead to a claim (and, where
several dispatchers share a store, another's job queued or ended: the
store tells of them).
"""

from __future__ import annotations

from typing import Any

import attrs


@attrs.frozen
class Claim:
    """
    A decision: C{holder} should claim up to C{count} jobs, as of C{now}.
    """

    holder: str
    count: int
    now: float


class Scheduler:
    """
    Match queued jobs to free capacity.

    @param clock: an C{IReactorTime}; its C{seconds()} is the time claims
        are made at.
    """

    def __init__(self, clock: Any) -> None:
        self._clock = clock
        self._queued = 0
        self._free: dict[str, int] = {}
        self._dry: set[str] = set()
        self._in_flight: set[str] = set()
        self._blocked = False

    @property
    def queued(self) -> int:
        """
        The estimate of queued jobs not yet claimed.
        """
        return self._queued

    def free(self, holder: str) -> int:
        """
        Free slots of C{holder}, not counting claims in flight.
        """
        return self._free.get(holder, 0)

    def claiming(self, holder: str) -> bool:
        """
        Whether a claim for C{holder} is in flight.
        """
        return holder in self._in_flight

    def add_holder(self, holder: str, capacity: int) -> None:
        """
        C{holder} can run C{capacity} jobs at once.
        """
        self._free[holder] = self._free.get(holder, 0) + capacity

    def set_free(self, holder: str, free: int) -> None:
        """
        C{holder} has C{free} slots free now (a remote worker asking for
        work says how many).
        """
        self._free[holder] = free
        self._dry.discard(holder)

    def remove_holder(self, holder: str) -> None:
        """
        C{holder} takes no more jobs.
        """
        self._free.pop(holder, None)
        self._dry.discard(holder)

    def jobs_queued(self, count: int = 1) -> None:
        """
        C{count} more jobs are queued.
        """
        self._queued += count
        self._dry.clear()

    def slots_freed(self, holder: str, count: int = 1) -> None:
        """
        C{holder} finished with C{count} jobs.
        """
        if holder in self._free:
            self._free[holder] += count
        self._dry.discard(holder)
        if self._blocked:
            # Jobs wait behind a queue's limit, and the job that ended may
            # have been one of that queue's: look again.
            self._queued = max(self._queued, 1)

    def ended_elsewhere(self) -> None:
        """
        Another dispatcher's job left a queue's running jobs: if jobs wait
        behind a queue's limit, look again (a queue's limit counts every
        dispatcher's).
        """
        if self._blocked:
            self._queued = max(self._queued, 1)

    def queues_changed(self) -> None:
        """
        The queues or their limits changed (a reload): jobs held behind a
        limit, or in a queue just configured, may be claimable now; look
        again, for as many as the holders have room for.
        """
        self._queued = max(self._queued, sum(self._free.values()), 1)
        self._dry.clear()

    def next_claims(self) -> list[Claim]:
        """
        What to claim now; the slots and jobs named are reserved until
        L{claimed} reports how the claim went.
        """
        claims = []
        now = self._clock.seconds()
        for holder, free in self._free.items():
            if self._queued <= 0:
                break
            if holder in self._dry or holder in self._in_flight:
                continue
            count = min(free, self._queued)
            if count > 0:
                self._free[holder] -= count
                self._queued -= count
                self._in_flight.add(holder)
                claims.append(Claim(holder, count, now))
        return claims

    def claim_failed(self, claim: Claim) -> None:
        """
        A claim did not happen at all: its reservation is returned whole.
        """
        self._in_flight.discard(claim.holder)
        self.slots_freed(claim.holder, claim.count)
        self._queued += claim.count

    def claimed(
        self,
        claim: Claim,
        got: int,
        blocked: bool = False,
        skipped: int = 0,
        drained: bool = False,
    ) -> None:
        """
        A claim for C{claim.count} jobs got C{got}.  Fewer means no eligible
        job was left when the claim committed.  If the store passed over
        C{skipped} jobs that did not fit the holder, they wait for another
        holder: only this holder rests until a job is queued or one of its
        slots frees.  Otherwise the estimate goes to zero, and later events
        count up from there.  C{blocked} says queued jobs wait behind a
        queue's limit of running jobs; a slot freed later looks again.
        C{drained} says the claim got what it asked for and no job was left
        queued: the estimate goes to zero as well.
        """
        self._in_flight.discard(claim.holder)
        self._blocked = blocked
        unused = claim.count - got
        if unused > 0:
            if claim.holder in self._free:
                self._free[claim.holder] += unused
            if skipped:
                self._queued += unused
                self._dry.add(claim.holder)
            else:
                self._queued = 0
        elif drained:
            self._queued = 0
