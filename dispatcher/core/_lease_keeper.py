"""
The leases of a dispatcher that shares its database with others
(PostgreSQL): their renewal, the recovery of the leases others stopped
renewing, and the self-fence of a dispatcher that lost the database.

With one dispatcher on its own store (SQLite), its local jobs' leases need
no expiry: its next start records what its last run left as lost.  With
several on one database, a dispatcher that dies (or is cut off) cannot
do that for itself, so its local leases expire like a worker's:

  - B{Renewal}: every C{lease_seconds / 6} the keeper moves the expiry of
    every lease this dispatcher holds, its local executor's (all of them,
    by holder name) and its remote workers' (by token), to C{now +
    lease_seconds}, in one write (L{IJobStore.renew_leases}).  The answer
    names the local leases still held: a job whose lease is missing was
    recovered elsewhere, and is stopped.
  - B{Sweep}: after each renewal, the attempts whose leases expired, of any
    holder but this dispatcher's own (another dispatcher's local jobs
    included), are recorded lost (L{IJobStore.expire_leases}): retried if
    attempts remain, failed otherwise; their tokens are no longer the
    jobs', so a late result of the old holder changes nothing.
  - B{Self-fence}: a renewal issued at C{t} that committed means no one
    may recover these leases before C{t + lease_seconds}.  If none has
    committed for C{lease_seconds / 2}, the keeper assumes the database
    is lost for good and fences: the dispatcher kills its local jobs
    (their processes are gone well before anyone may take them: half a
    lease is left for the kill, and for the hosts' clocks to disagree)
    and claims nothing for itself until a renewal commits again.
  - B{Availability}: while renewals fail because the database cannot be
    reached (not merely while they are slow), L{trouble} says why, and the API answers requests that need
    the store C{503 store_unavailable} at once rather than letting each
    wait for its own connection to fail.

Time is the injected clock's; the renewal's C{now} is taken when it is
asked for, not when it commits, so the fence is measured from the
earliest moment the expiry could have been written.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from dispatcher._throttle import Throttle
from dispatcher.model._jobs import StoreClosed
from dispatcher.store._results import StoreError, StoreUnreachable, Written

log = Logger()

# The most expired leases one sweep records.
SWEEP_LIMIT = 1000


class LeaseKeeper:
    """
    Renews this dispatcher's leases, recovers those others let expire, and
    fences this dispatcher when it cannot renew (see the module's
    docstring).

    @param store: the L{IJobStore} (shared with other dispatchers).
    @param clock: the C{IReactorTime} renewals and the fence run on.
    @param lease_seconds: a local lease's life without renewal.
    @param holder: gives this dispatcher's local holder name.
    @param remote_tokens: gives the tokens of the remote workers' leases
        this dispatcher serves (renewed with the local ones, never swept
        by it).
    @param remote_seconds: how long a remote worker's lease is renewed
        for: past its worker's own fence, which counts from the worker's
        last heartbeat (C{[workers] lease_seconds} less the fence margin),
        however long before this dispatcher's death its last renewal came.
    @param fence: called with why, when the dispatcher must kill its
        local jobs and claim none.
    @param unfence: called when a renewal commits after a fence.
    @param returned: called when a renewal commits after renewals failed
        (before C{unfence}): the store answers again.
    @param taken: called with the tokens this dispatcher's holder still
        holds, after each renewal: a local job whose token is not among
        them must stop.
    @param recovered: called with the L{Written} of each sweep that
        recorded expired leases.
    """

    def __init__(
        self,
        store: Any,
        clock: Any,
        lease_seconds: float,
        holder: Callable[[], str],
        remote_tokens: Callable[[], Iterable[int]],
        fence: Callable[[str], None],
        unfence: Callable[[], None],
        taken: Callable[[frozenset], None],
        recovered: Callable[[Written], None],
        remote_seconds: Optional[float] = None,
        returned: Optional[Callable[[], None]] = None,
    ) -> None:
        self._store = store
        self._clock = clock
        self.lease_seconds = lease_seconds
        self.renew_interval = lease_seconds / 6.0
        self.fence_after = lease_seconds / 2.0
        self.remote_seconds = (
            lease_seconds if remote_seconds is None else remote_seconds
        ) + self.renew_interval
        self._holder = holder
        self._remote_tokens = remote_tokens
        self._fence = fence
        self._unfence = unfence
        self._taken = taken
        self._recovered = recovered
        self._returned = returned
        # The issue time of the latest renewal that committed.
        self.confirmed_at = 0.0
        self.fenced = False
        # Why the store cannot be reached now (None: it can).
        self.trouble: Optional[str] = None
        self._renewing: Optional[Deferred] = None
        self._tick: Any = None
        self._fence_call: Any = None
        self._running = False
        self._failures = Throttle(clock)
        self.renewals = 0
        self.swept = 0

    def start(self) -> None:
        """
        Begin renewing now; this dispatcher holds no lease yet (its
        start-up recorded its last run's as lost).
        """
        self._running = True
        self.confirmed_at = self._clock.seconds()
        self._arm_fence()
        self._renew()

    def stop(self) -> Deferred:
        """
        Renew no more; fires once a renewal under way has ended.  (A stop
        that gives its jobs back does so through the store: their leases
        need no renewal after.)
        """
        self._running = False
        for call in (self._tick, self._fence_call):
            if call is not None and call.active():
                call.cancel()
        d: Deferred = Deferred()
        if self._renewing is None:
            d.callback(None)
        else:
            self._renewing.addBoth(lambda _: d.callback(None))
        return d

    def _next(self) -> None:
        if self._running:
            self._tick = self._clock.callLater(self.renew_interval, self._renew)

    def _renew(self) -> None:
        if not self._running or self._renewing is not None:
            return
        now = self._clock.seconds()
        remote = sorted(self._remote_tokens())
        d = self._store.renew_leases(
            self._holder(), remote, now, self.lease_seconds, self.remote_seconds
        )
        self._renewing = d
        d.addCallbacks(self._renewed, self._failed, callbackArgs=(now, remote))
        d.addBoth(self._done)

    def _done(self, _: Any) -> None:
        self._renewing = None
        self._next()

    def _renewed(self, written: Written, issued: float, remote: list[int]) -> Deferred:
        self.renewals += 1
        self.confirmed_at = max(self.confirmed_at, issued)
        if self.trouble is not None or self._failures.on or self.fenced:
            count = self._failures.cleared()
            log.info(
                "the store answers again: this dispatcher's leases are renewed "
                "({count} renewals failed since the last line)",
                count=count if count is not None else 0,
            )
            if self._returned is not None:
                self._returned()
        self.trouble = None
        if self.fenced:
            self.fenced = False
            self._unfence()
        self._arm_fence()
        self._taken(written.value)
        # Then the leases others let expire (on the same clock: a lease is
        # recovered only once its expiry has passed here).
        swept = self._store.expire_leases(
            self._clock.seconds(), self._holder(), remote, SWEEP_LIMIT
        )
        return swept.addCallbacks(self._swept, self._failed)

    def _swept(self, written: Written) -> None:
        if written.value:
            self.swept += len(written.value)
            self._recovered(written)

    def _failed(self, failure: Failure) -> None:
        if failure.check(StoreClosed):
            return
        if not failure.check(StoreError):
            log.failure("renewing this dispatcher's leases failed", failure)
            return
        if failure.check(StoreUnreachable):
            self.trouble = f"the database cannot be reached: {failure.getErrorMessage()}"
        count = self._failures.happened()
        if count is not None:
            left = self.confirmed_at + self.fence_after - self._clock.seconds()
            log.error(
                "renewing this dispatcher's leases failed ({error}); {count} failed "
                "since the last line (logged at most once a minute); "
                "{what}",
                error=failure.getErrorMessage(),
                count=count,
                what=(
                    "its local jobs are stopped (fenced) until a renewal lands"
                    if self.fenced
                    else f"its local jobs are stopped in {max(0.0, left):.1f} s unless "
                    "one lands"
                ),
            )

    def _arm_fence(self) -> None:
        if self._fence_call is not None and self._fence_call.active():
            self._fence_call.cancel()
        if not self._running:
            return
        delay = max(0.0, self.confirmed_at + self.fence_after - self._clock.seconds())
        self._fence_call = self._clock.callLater(delay, self._check_fence)

    def _check_fence(self) -> None:
        self._fence_call = None
        if not self._running or self.fenced:
            return
        silent = self._clock.seconds() - self.confirmed_at
        if silent < self.fence_after:
            self._arm_fence()
            return
        # (The API goes on serving while the store answers, however slowly:
        # only a store that cannot be reached is a trouble to answer 503.)
        self.fenced = True
        why = (
            f"no lease renewal has landed for {silent:.1f} s (half of [store] "
            f"lease_seconds = {self.lease_seconds:g}): another dispatcher may take "
            f"this one's jobs from {self.confirmed_at + self.lease_seconds - self._clock.seconds():.1f} s on"
        )
        self._fence(why)
