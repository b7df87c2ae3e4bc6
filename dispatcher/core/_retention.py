"""
Retention: finished jobs are removed, with their attempts, logs and
working directories, once they are older than C{[retention]
finished_days} or beyond the C{finished_count} most recent; the disk a
long run of jobs uses stays flat.

A pass runs every L{RetentionPolicy.interval} seconds on the injected
clock.  It removes jobs in small steps (L{BATCH} jobs, a couple of
milliseconds of the store's one writer each), each its own write among
the others, and removes each step's job directories on the I/O pool
before the next; then the directories of id windows no job is left in,
and, on a store that can, gives free pages back to the file system a
step at a time.  What the store keeps whatever the rules say (a job that
a job which has not succeeded depends on; a job an idempotency key still
names; an array until it can go whole) is its own rule
(L{dispatcher.store._removal}).

The same passes remove the events older than C{[events] retention}
(L{dispatcher.store._events}), in steps of L{EVENTS_BATCH}; they run
whether finished jobs are ever removed or not.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import attrs
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from dispatcher.execution._job_dirs import WINDOW_DIGITS, JobDirectories, window_end
from dispatcher.model._jobs import FINAL_STATES, StoreClosed
from dispatcher.store._results import CommitFailed, RemovalCursor, StoreSpace

log = Logger()

# The most jobs one step removes.  A step of 100 finished jobs (two labels
# and an attempt each, among 50,000) held the writer 1.0 ms (median of 20
# steps, three runs: 0.97 to 1.00 ms; 200 took 1.9 ms).
BATCH = 100
# The most jobs one step looks at: a step that passes over jobs it may not
# remove (running ones, ones kept for a dependent) stays short too.
SCAN = 1000
# How often a pass runs: every tenth of finished_days, but no more often
# than once a second and no less often than once a minute.
MIN_INTERVAL = 1.0
MAX_INTERVAL = 60.0
# A window's directory goes only once it ended this long ago (one window
# of the deepest level, 65.5 s): a job id made by a clock a little behind
# may still fall in a window just ended.
WINDOW_MARGIN = 65.536
# Free space of the store's file is given back in steps of this many
# bytes (256 pages of 4 KiB: 0.9 ms of the writer, median of 20 steps),
# once it is more than twice what is kept for the next writes: a quarter
# of what is in use, and at least KEEP_FREE.
SHRINK_STEP = 1024 * 1024
KEEP_FREE = 4 * 1024 * 1024
# The most events one step removes: an event's row is small, and they go
# as one range of ids (5,000 took about 2 ms of the writer).
EVENTS_BATCH = 5000
# How long events are kept by default ([events] retention): a day.
EVENTS_RETENTION = 86400.0


@attrs.frozen
class RetentionPolicy:
    """
    How long finished jobs are kept: C{max_age} seconds after they
    finished (C{None}: for ever), and at most C{max_count} of them
    (C{None}: no bound).
    """

    max_age: Optional[float] = None
    max_count: Optional[int] = None

    @classmethod
    def from_days(
        cls, finished_days: Optional[float], finished_count: Optional[int]
    ) -> "RetentionPolicy":
        """
        The policy of C{[retention] finished_days} and C{finished_count}.
        """
        return cls(
            None if finished_days is None else finished_days * 86400.0, finished_count
        )

    @property
    def active(self) -> bool:
        """
        Whether any finished job is ever removed.
        """
        return self.max_age is not None or self.max_count is not None

    @property
    def interval(self) -> float:
        """
        Seconds between passes: a tenth of the age, within
        L{MIN_INTERVAL} and L{MAX_INTERVAL}.
        """
        if self.max_age is None:
            return MAX_INTERVAL
        return min(MAX_INTERVAL, max(MIN_INTERVAL, self.max_age / 10.0))


@attrs.frozen
class PassReport:
    """
    What one pass did: jobs removed, steps (writes) taken, window
    directories removed, and bytes of the store's file given back.
    """

    removed: int = 0
    steps: int = 0
    windows: int = 0
    shrunk: int = 0
    events: int = 0


class Retention:
    """
    Removes finished jobs as the policy says, pass after pass, while the
    dispatcher runs; and, asked by a client, one finished job at once.

    @param store: an L{IJobStore}.
    @param directories: the L{JobDirectories} of this host's jobs.
    @param reactor: the reactor the I/O pool reports to.
    @param io_pool: the pool file removals run on.
    @param clock: the C{IReactorTime} of passes and of what is old.
    @param policy: the L{RetentionPolicy}.
    @param batch: the most jobs a step removes (L{BATCH}).
    @param scan: the most jobs a step looks at (L{SCAN}).
    @param events_age: seconds events are kept (L{EVENTS_RETENTION});
        C{None}: for ever.
    @ivar events_batch: the most events a step removes (L{EVENTS_BATCH}).
    """

    def __init__(
        self,
        store: Any,
        directories: JobDirectories,
        reactor: Any,
        io_pool: Any,
        clock: Any,
        policy: RetentionPolicy,
        batch: int = BATCH,
        scan: int = SCAN,
        events_age: Optional[float] = EVENTS_RETENTION,
    ) -> None:
        self._store = store
        self.events_age = events_age
        self.events_batch = EVENTS_BATCH
        self.directories = directories
        self._reactor = reactor
        self._io_pool = io_pool
        self._clock = clock
        self.policy = policy
        self.batch = batch
        self.scan = scan
        self._call: Any = None
        self._pass: Optional[Deferred] = None
        self._waiters: list[Deferred] = []
        self._stopping = False
        self._told_no_shrink = False

    def start(self) -> None:
        """
        Run a pass every L{RetentionPolicy.interval} seconds, the first one
        interval from now, until L{stop}; nothing if the policy removes
        nothing.
        """
        self._stopping = False
        if self.policy.active or self.events_age is not None:
            self._call = self._clock.callLater(self.interval, self._tick)

    @property
    def interval(self) -> float:
        """
        Seconds between passes: the policy's, or a tenth of the events'
        age within the same bounds if that is sooner.
        """
        interval = self.policy.interval if self.policy.active else MAX_INTERVAL
        if self.events_age is not None:
            interval = min(interval, max(MIN_INTERVAL, self.events_age / 10.0))
        return interval

    def stop(self) -> Deferred:
        """
        Run no more passes; fires once the pass under way (if any) has
        ended, which it does after its current step.
        """
        self._stopping = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        if self._pass is None:
            return succeed(None)
        d: Deferred = Deferred()
        self._waiters.append(d)
        return d.addErrback(lambda _: None)

    def _tick(self) -> None:
        self._call = None

        def failed(failure: Failure) -> None:
            if failure.check(StoreClosed, CommitFailed):
                # A failed commit (a full disk) the store logs itself, once
                # a minute.
                return
            log.failure("removing finished jobs failed; trying again next pass", failure)

        def again(_: Any) -> None:
            if not self._stopping:
                self._call = self._clock.callLater(self.interval, self._tick)

        self.run_pass().addErrback(failed).addBoth(again)

    def run_pass(self) -> Deferred:
        """
        A pass now, or the end of the one under way: fires with its
        L{PassReport}.
        """
        if self._pass is None:
            self._pass = ensureDeferred(self._run_pass())
            self._pass.addBoth(self._passed)
        d: Deferred = Deferred()
        self._waiters.append(d)
        return d

    def _passed(self, result: Any) -> None:
        self._pass = None
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            # A Failure goes down each waiter's errbacks.
            waiter.callback(result)

    async def _run_pass(self) -> PassReport:
        now = self._clock.seconds()
        policy = self.policy
        cutoff = None if policy.max_age is None else now - policy.max_age
        excess = 0
        if policy.max_count is not None:
            counts = await self._store.count_by_state()
            excess = max(0, sum(counts[state] for state in FINAL_STATES) - policy.max_count)
        cursor = RemovalCursor()
        removed = steps = 0
        if cutoff is not None or excess > 0:
            while not self._stopping:
                written = await self._store.remove_finished(
                    now, cutoff, excess, cursor, self.batch, self.scan
                )
                step = written.value
                steps += 1
                if step.job_ids:
                    removed += len(step.job_ids)
                    await self._in_thread(self.directories.remove_jobs, step.job_ids)
                cursor, excess = step.cursor, step.excess
                if step.done:
                    break
        events = 0
        if self.events_age is not None:
            events_cutoff = now - self.events_age
            while not self._stopping:
                written = await self._store.remove_events(events_cutoff, self.events_batch)
                events += written.value.removed
                if written.value.done:
                    break
        if self._stopping:
            # The rest waits for the next start.
            return PassReport(removed, steps, events=events)
        # (Job directories are looked at only where jobs are removed.)
        windows = await self._remove_windows(now) if policy.active else 0
        shrunk = await self._shrink()
        if removed or windows or shrunk:
            log.info(
                "retention removed {removed} finished jobs in {steps} steps, "
                "{windows} emptied job directory windows and {events} old events, "
                "and gave {shrunk} KiB of the store back to the file system",
                removed=removed,
                steps=steps,
                windows=windows,
                events=events,
                shrunk=shrunk // 1024,
            )
        return PassReport(removed, steps, windows, shrunk, events)

    def _in_thread(self, function: Any, *args: Any) -> Deferred:
        return deferToThreadPool(self._reactor, self._io_pool, function, *args)

    async def _remove_windows(self, now: float, candidates: Optional[Iterable[str]] = None) -> int:
        """
        Remove the directories of the id windows that ended more than
        L{WINDOW_MARGIN} ago and hold no stored job: the ones with a
        directory, or of C{candidates}.
        """
        before = now - WINDOW_MARGIN
        if candidates is None:
            ended = await self._in_thread(self.directories.ended_windows, before)
        else:
            ended = [p for p in candidates if window_end(p) < before]
        if not ended:
            return 0
        used = await self._store.windows_in_use(ended)
        unused = {p for p in ended if p not in used}
        # A window inside one that goes, goes with it.
        outermost = [
            p for p in unused if not any(p[:n] in unused for n in WINDOW_DIGITS if n < len(p))
        ]
        if not outermost:
            return 0
        return await self._in_thread(self.directories.remove_windows, sorted(outermost))

    async def _shrink(self) -> int:
        """
        Give free space of the store's file back to the file system, a
        step at a time, down to what the next writes may use; the bytes
        given back.
        """
        space: StoreSpace = await self._store.space()
        if not space.can_shrink:
            if space.free > KEEP_FREE and not self._told_no_shrink:
                self._told_no_shrink = True
                log.info(
                    "the store's file was made before it could give space back: "
                    "{free} MiB of it are free, and are reused by the next writes; "
                    "to give them back, stop the dispatcher and run sqlite3 FILE "
                    "'PRAGMA auto_vacuum = INCREMENTAL; VACUUM' once",
                    free=space.free // (1024 * 1024),
                )
            return 0
        keep = max(KEEP_FREE, (space.size - space.free) // 4)
        if space.free <= 2 * keep:
            return 0
        free = space.free
        while free > keep and not self._stopping:
            written = await self._store.shrink(min(SHRINK_STEP, free - keep))
            if written.value >= free:
                break
            free = written.value
        return space.free - free

    def remove(self, job_id: str, owner: Optional[str] = None) -> Deferred:
        """
        Remove one finished job now (see L{IJobStore.remove}), then its
        directory and its windows' if they are left empty; fires with its
        id once all are gone.
        """
        return ensureDeferred(self._remove(job_id, owner))

    async def _remove(self, job_id: str, owner: Optional[str]) -> str:
        now = self._clock.seconds()
        await self._store.remove(job_id, now, owner)
        await self._in_thread(self.directories.remove_jobs, [job_id])
        await self._remove_windows(now, [job_id[:n] for n in WINDOW_DIGITS])
        return job_id
