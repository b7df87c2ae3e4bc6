"""
Requests that wait (C{?wait=SECONDS}) for a job, an array or a batch to
be final: each is answered as soon as it is, or when its time runs out,
woken by the job events (L{dispatcher.core._events}) and never by reading
the store in a loop.

A wait reads the store when it begins, when an event says what it waits
for may be final, and when its time runs out; between those it costs a
dictionary entry.  It is registered before its first read, so that an
end committed meanwhile wakes it rather than slipping by.

A job's wait is woken by the final event of its job.  A group's wait
watches the group's unfinished members (read once, then kept as the
events take them off): the group may be final once none is left, and is
read again then.  The waits on one group share one watch, so what they
hold is at most the store's unfinished jobs, whoever waits.  A member
retried after the watch read it is found when the group is read again.

How many requests may wait at once is bounded (L{TooManyWaits} past
it), and a stopping dispatcher ends every wait at once (L{StoreClosed}:
the API answers C{503 shutting_down}), so that no wait holds a stop.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from dispatcher.core._events import JobEvent, JobEvents
from dispatcher.model._groups import GroupKind, JobGroup, TooManyWaits
from dispatcher.model._jobs import Job, StoreClosed

log = Logger()

# How many requests may wait at once by default ([api] max_waits).
MAX_WAITS = 1000


class _Waiter:
    """
    One waiting request's wake-up: L{wait} fires with C{True} once it is
    woken (at once if it was woken since the last wait), C{False} when its
    time is up; cancelling it stops its timer.
    """

    def __init__(self, clock: Any) -> None:
        self._clock = clock
        self._woken = False
        self._stopped = False
        self._waiting: Optional[Deferred] = None
        self._timer: Any = None

    def wake(self) -> None:
        """
        What it waits for may have happened.
        """
        self._woken = True
        d = self._settle()
        if d is not None:
            d.callback(True)

    def stop(self) -> None:
        """
        The dispatcher stops: the wait ends with L{StoreClosed}, now or
        as soon as it waits again.
        """
        self._stopped = True
        d = self._settle()
        if d is not None:
            d.errback(StoreClosed("the dispatcher is stopping; ask again once it is back"))

    def wait(self, seconds: float) -> Deferred:
        """
        Fire with C{True} once woken, or with C{False} after C{seconds}.
        """
        if self._stopped:
            d: Deferred = Deferred()
            d.errback(StoreClosed("the dispatcher is stopping; ask again once it is back"))
            return d
        if self._woken:
            self._woken = False
            d = Deferred()
            d.callback(True)
            return d
        self._waiting = Deferred(lambda _: self._settle())
        self._timer = self._clock.callLater(max(0.0, seconds), self._time_up)
        return self._waiting

    def _time_up(self) -> None:
        self._timer = None
        d = self._settle()
        if d is not None:
            d.callback(False)

    def _settle(self) -> Optional[Deferred]:
        """
        End the wait under way (its timer stopped); it, if there was one.
        """
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        d, self._waiting = self._waiting, None
        if d is not None:
            self._woken = False
        return d


class _GroupWatch:
    """
    The unfinished members of one group that its waits watch; C{members}
    is C{None} until they are read (and while they are read again), the
    final events meanwhile gathered in C{early}.
    """

    def __init__(self) -> None:
        self.members: Optional[set[str]] = None
        self.early: set[str] = set()
        self.loading: Optional[list[Deferred]] = None
        self.waiters: set[_Waiter] = set()


class Waits:
    """
    Every waiting request of the API.

    @param events: the L{JobEvents} every committed change is published
        to; subscribed to only while some request waits.
    @param store: the L{IJobStore} read for the job or group.
    @param clock: the C{IReactorTime} the waits' times run on.
    @param limit: how many requests may wait at once.
    """

    def __init__(self, events: JobEvents, store: Any, clock: Any, limit: int = MAX_WAITS) -> None:
        self._events = events
        self._store = store
        self._clock = clock
        self.limit = limit
        self._jobs: dict[str, set[_Waiter]] = {}
        self._groups: dict[tuple[GroupKind, str], _GroupWatch] = {}
        # Member id to the watches of the groups it belongs to (an array
        # of a batch belongs to both).
        self._members: dict[str, list[_GroupWatch]] = {}
        self._loading: list[_GroupWatch] = []
        self._count = 0
        self._unsubscribe: Optional[Callable[[], None]] = None
        self._stopped = False

    @property
    def waiting(self) -> int:
        """
        How many requests wait now.
        """
        return self._count

    def stop(self) -> None:
        """
        End every wait now (they fail with L{StoreClosed}), and refuse new
        ones the same way: the dispatcher stops.
        """
        self._stopped = True
        waiters = [w for ws in self._jobs.values() for w in ws]
        waiters += [w for watch in self._groups.values() for w in watch.waiters]
        for waiter in waiters:
            waiter.stop()

    # Jobs

    async def job(self, job_id: str, seconds: float) -> Job:
        """
        The job C{job_id} once it is final, or as it is after C{seconds}.
        Fails with L{TooManyWaits} at once if as many requests wait as
        may, with L{StoreClosed} when the dispatcher stops, and with what
        the store's read fails with (L{UnknownJob}: it was removed).
        """
        waiter = self._begin()
        self._jobs.setdefault(job_id, set()).add(waiter)
        try:
            deadline = self._clock.seconds() + seconds
            while True:
                job = await self._store.get(job_id)
                left = deadline - self._clock.seconds()
                if job.state.final or left <= 0:
                    return job
                if not await waiter.wait(left):
                    return await self._store.get(job_id)
        finally:
            waiters = self._jobs.get(job_id)
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del self._jobs[job_id]
            self._end()

    # Groups

    async def group(self, kind: GroupKind, group_id: str, seconds: float) -> JobGroup:
        """
        The array or batch C{group_id} once every member is final, or as it
        is after C{seconds}; fails as L{job} does (L{UnknownGroup} for a
        group removed meanwhile).
        """
        waiter = self._begin()
        key = (kind, group_id)
        watch = self._groups.get(key)
        if watch is None:
            watch = self._groups[key] = _GroupWatch()
        watch.waiters.add(waiter)
        try:
            deadline = self._clock.seconds() + seconds
            while True:
                group = await self._store.group(kind, group_id)
                left = deadline - self._clock.seconds()
                if group.final or left <= 0:
                    return group
                if not watch.members:
                    # Not read yet, or every member read then is final now
                    # and the group is not: a member came back since.
                    await self._load(watch, kind, group_id)
                    if not watch.members:
                        continue
                if not await waiter.wait(left):
                    return await self._store.group(kind, group_id)
        finally:
            watch.waiters.discard(waiter)
            if not watch.waiters:
                self._forget(key, watch)
            self._end()

    async def _load(self, watch: _GroupWatch, kind: GroupKind, group_id: str) -> None:
        """
        Read the group's unfinished members into C{watch}; the waits that
        ask meanwhile wait for the same read.
        """
        if watch.loading is not None:
            d: Deferred = Deferred()
            watch.loading.append(d)
            await d
            return
        watch.loading = []
        self._unwatch_members(watch)
        watch.members = None
        watch.early = set()
        self._loading.append(watch)
        try:
            found = await self._store.unfinished_members(kind, group_id)
            members = set(found) - watch.early
            if watch.waiters:
                watch.members = members
                for member in members:
                    self._members.setdefault(member, []).append(watch)
        finally:
            self._loading.remove(watch)
            watch.early = set()
            waiting, watch.loading = watch.loading, None
            # (A read that failed: each wait reads again, or fails, itself.)
            for d in waiting:
                if not d.called:
                    d.callback(None)

    def _unwatch_members(self, watch: _GroupWatch) -> None:
        for member in watch.members or ():
            watches = self._members.get(member)
            if watches is not None:
                if watch in watches:
                    watches.remove(watch)
                if not watches:
                    del self._members[member]

    def _forget(self, key: tuple[GroupKind, str], watch: _GroupWatch) -> None:
        self._unwatch_members(watch)
        watch.members = None
        if self._groups.get(key) is watch:
            del self._groups[key]

    # Events

    def _changed(self, event: JobEvent) -> None:
        if not event.state.final:
            return
        job_id = event.job_id
        waiters = self._jobs.get(job_id)
        if waiters:
            for waiter in list(waiters):
                waiter.wake()
        for watch in self._loading:
            watch.early.add(job_id)
        watches = self._members.pop(job_id, None)
        if watches:
            for watch in watches:
                members = watch.members
                if members is None:
                    continue
                members.discard(job_id)
                if not members:
                    for waiter in list(watch.waiters):
                        waiter.wake()

    # Counting

    def _begin(self) -> _Waiter:
        if self._stopped:
            raise StoreClosed("the dispatcher is stopping; ask again once it is back")
        if self._count >= self.limit:
            raise TooManyWaits(self.limit)
        self._count += 1
        if self._unsubscribe is None:
            self._unsubscribe = self._events.subscribe(self._changed)
        return _Waiter(self._clock)

    def _end(self) -> None:
        self._count -= 1
        if not self._count and self._unsubscribe is not None:
            # No cost to the events while nothing waits.
            self._unsubscribe()
            self._unsubscribe = None
