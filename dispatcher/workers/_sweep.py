"""
A remote worker's own retention: the directory of each job it ran (its
working directory and logs) is removed once the dispatcher no longer
needs anything of it (its result was accepted, or refused, or its lease
ended and its job stopped) and C{keep} seconds have passed since; the
directories an earlier run of the worker left in its data directory are
found after a start and removed by the age of their last write.  So a
worker host's disk stays flat, as the dispatcher's does with C{[retention]
finished_days}.

The worker's data directory is its own (L{dispatcher.workers._service}
locks it): a job directory no job of this process holds is of a job that
has ended.  Nothing here blocks: the file system is read and written on the
I/O pool, a step at a time, each step bounded.
"""

from __future__ import annotations

import heapq
import math
import re
from typing import Any, Callable, Iterator, Optional

from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from dispatcher.execution._job_dirs import JobDirectories

log = Logger()

# The most job directories one step removes, and the most an earlier run's
# walk reads, in one job on the I/O pool each.
BATCH = 100
SCAN = 1000
# The most steps of each kind a pass takes; a pass that leaves work is
# followed by the next one after MIN_INTERVAL, one that leaves none after
# the interval.
STEPS = 10
# How often a pass runs: every tenth of the age kept, but no more often
# than once a second and no less often than once a minute (as the
# dispatcher's retention).
MIN_INTERVAL = 1.0
MAX_INTERVAL = 60.0

# A job id as the dispatcher makes them (a UUID, lower case), kept in 16
# bytes; any other is kept as it is.
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _unpack(raw: bytes) -> str:
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class _Bucket:
    """
    The job ids that became removable within one span of time.
    """

    __slots__ = ("packed", "odd", "taken")

    def __init__(self) -> None:
        self.packed = bytearray()
        self.odd: list[str] = []
        self.taken = 0

    def add(self, job_id: str) -> None:
        if _UUID.fullmatch(job_id):
            self.packed += bytes.fromhex(job_id.replace("-", ""))
        else:
            self.odd.append(job_id)

    def take(self, limit: int) -> list[str]:
        taken: list[str] = []
        while self.odd and len(taken) < limit:
            taken.append(self.odd.pop())
        while self.taken < len(self.packed) and len(taken) < limit:
            taken.append(_unpack(bytes(self.packed[self.taken : self.taken + 16])))
            self.taken += 16
        return taken

    @property
    def empty(self) -> bool:
        return not self.odd and self.taken >= len(self.packed)


class KeptDirectories:
    """
    The job directories kept until they are old enough, by when each
    became removable, in spans of C{span} seconds: 16 bytes a job (a
    week's directories of a worker that runs one job a second take 10 MB).
    A span's jobs are due once all of it is older than the cutoff.

    @param span: the width of a span, in seconds.
    """

    def __init__(self, span: float) -> None:
        self.span = span
        self._buckets: dict[int, _Bucket] = {}
        self._keys: list[int] = []
        self.count = 0

    def add(self, job_id: str, at: float) -> None:
        """
        C{job_id}'s directory may be removed once C{at} is old enough.
        """
        key = math.floor(at / self.span)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket()
            heapq.heappush(self._keys, key)
        bucket.add(job_id)
        self.count += 1

    def due(self, cutoff: float) -> bool:
        """
        Whether a job is due: its span ended by C{cutoff}.
        """
        return bool(self._keys) and (self._keys[0] + 1) * self.span <= cutoff

    def take_due(self, cutoff: float, limit: int) -> list[str]:
        """
        Up to C{limit} of the jobs due by C{cutoff}, the oldest spans
        first; they are kept no more.
        """
        taken: list[str] = []
        while len(taken) < limit and self.due(cutoff):
            key = self._keys[0]
            bucket = self._buckets[key]
            taken += bucket.take(limit - len(taken))
            if bucket.empty:
                heapq.heappop(self._keys)
                del self._buckets[key]
        self.count -= len(taken)
        return taken


class JobDirectorySweeper:
    """
    Removes a worker's job directories C{keep} seconds after the worker
    let go of their jobs, and those an earlier run left, by age: a pass
    every L{interval} seconds on the injected clock, each a few bounded
    steps on the I/O pool.

    @param directories: the L{JobDirectories} of the worker's data
        directory.
    @param clock: the C{IReactorTime} of passes and of ages (its
        C{seconds} is the wall clock the file system's times are on).
    @param run_blocking: C{(function, *args) -> Deferred}: runs C{function}
        on the I/O pool.
    @param keep: seconds a job's directory is kept after the worker let go
        of its job (0: removed at the next pass); C{None}: kept for ever.
    @param is_held: C{job_id -> bool}: whether the worker holds a lease of
        that job (it runs, or its result is not yet accepted); such a
        directory is never removed.
    @param batch: the most directories a step removes (L{BATCH}).
    @param scan: the most directories a step of the walk reads (L{SCAN}).
    @param steps: the most steps of each kind a pass takes (L{STEPS}).
    """

    def __init__(
        self,
        directories: JobDirectories,
        clock: Any,
        run_blocking: Callable[..., Deferred],
        keep: Optional[float],
        is_held: Callable[[str], bool] = lambda job_id: False,
        batch: int = BATCH,
        scan: int = SCAN,
        steps: int = STEPS,
    ) -> None:
        self.directories = directories
        self._clock = clock
        self._run_blocking = run_blocking
        self.keep = keep
        self.is_held = is_held
        self.batch = batch
        self.scan = scan
        self.steps = steps
        self.kept = KeptDirectories(self.interval)
        self.removed = 0
        self._walk: Optional[Iterator[str]] = None
        self._walked = False
        self._call: Any = None
        self._pass: Optional[Deferred] = None
        self._pass_waiters: list[Deferred] = []
        self._stopping = False
        # The windows (first four hex digits of their ids) of the jobs
        # whose directories the step under way removes, and who waits for
        # it to end.
        self._removing: frozenset[str] = frozenset()
        self._step_waiters: list[Deferred] = []

    @property
    def interval(self) -> float:
        """
        Seconds between passes: a tenth of C{keep}, within L{MIN_INTERVAL}
        and L{MAX_INTERVAL}.
        """
        if self.keep is None:
            return MAX_INTERVAL
        return min(MAX_INTERVAL, max(MIN_INTERVAL, self.keep / 10.0))

    @property
    def active(self) -> bool:
        """
        Whether any directory is ever removed.
        """
        return self.keep is not None

    def start(self) -> None:
        """
        Run a pass every L{interval} seconds, the first one interval from
        now, until L{stop}; the first passes walk what an earlier run left.
        Nothing if C{keep} is C{None}.
        """
        self._stopping = False
        if self.active and self._call is None:
            if not self._walked:
                self._walk = None
            self._call = self._clock.callLater(self.interval, self._tick)

    def stop(self) -> Deferred:
        """
        Run no more passes; fires once the step under way (if any) has
        ended.
        """
        self._stopping = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        if self._pass is None:
            return succeed(None)
        d: Deferred = Deferred()
        self._pass_waiters.append(d)
        return d.addErrback(lambda _: None)

    def finished(self, job_id: str) -> None:
        """
        The worker let go of C{job_id} (its result was accepted, or its
        lease ended and its job stopped): its directory goes C{keep}
        seconds from now.
        """
        if self.active:
            self.kept.add(job_id, self._clock.seconds())

    def busy(self, job_id: str) -> Optional[Deferred]:
        """
        A Deferred that fires when the step under way ends, if it may
        remove C{job_id}'s directory or one on the way to it; C{None}
        otherwise.  The worker starts no job before: its directory would
        be made while it goes.
        """
        if job_id[:4] not in self._removing:
            return None
        d: Deferred = Deferred()
        self._step_waiters.append(d)
        return d

    def run_pass(self) -> Deferred:
        """
        A pass now, or the end of the one under way; fires with whether it
        left work for the next.
        """
        d: Deferred = Deferred()
        self._pass_waiters.append(d)
        if self._pass is None:
            # (It may end before this returns.)
            self._pass = Deferred()
            ensureDeferred(self._run_pass()).addBoth(self._passed)
        return d

    def _passed(self, result: Any) -> None:
        self._pass = None
        waiters, self._pass_waiters = self._pass_waiters, []
        for waiter in waiters:
            # A Failure goes down each waiter's errbacks.
            waiter.callback(result)

    def _tick(self) -> None:
        self._call = None

        def failed(failure: Failure) -> bool:
            if not failure.check(CancelledError):
                log.failure(
                    "removing old job directories failed; trying again next pass", failure
                )
            return False

        def again(more: bool) -> None:
            if not self._stopping:
                delay = MIN_INTERVAL if more else self.interval
                self._call = self._clock.callLater(delay, self._tick)

        self.run_pass().addErrback(failed).addCallback(again)

    async def _run_pass(self) -> bool:
        assert self.keep is not None
        for _ in range(self.steps):
            if self._stopping or self._walked:
                break
            await self._walk_step()
        removed = 0
        for _ in range(self.steps):
            if self._stopping:
                break
            cutoff = self._clock.seconds() - self.keep
            due = [j for j in self.kept.take_due(cutoff, self.batch) if not self.is_held(j)]
            if not due and not self.kept.due(cutoff):
                break
            if due:
                removed += await self._remove_step(due, cutoff)
        if removed:
            log.info(
                "removed {removed} job directories older than {keep:g} s "
                "({kept} kept)",
                removed=removed,
                keep=self.keep,
                kept=self.kept.count,
            )
        cutoff = self._clock.seconds() - self.keep
        return not self._walked or self.kept.due(cutoff)

    async def _walk_step(self) -> None:
        """
        Read the next L{scan} directories of the walk of what an earlier
        run left, and keep each that no lease of this run holds, by when it
        was last written.
        """
        if self._walk is None:
            self._walk = self.directories.walk_jobs()
        found, ended = await self._run_blocking(_read_walk, self.directories, self._walk, self.scan)
        for job_id, last in found:
            if not self.is_held(job_id):
                self.kept.add(job_id, last)
        if ended:
            self._walk = None
            self._walked = True

    async def _remove_step(self, due: list[str], cutoff: float) -> int:
        self._removing = frozenset(j[:4] for j in due)
        try:
            removed, written = await self._run_blocking(
                self.directories.remove_unwritten_since, due, cutoff
            )
        finally:
            self._removing = frozenset()
            waiters, self._step_waiters = self._step_waiters, []
            for waiter in waiters:
                waiter.callback(None)
        # Written since (a job that ran here again): kept from that time.
        for job_id, last in written:
            self.kept.add(job_id, last)
        self.removed += removed
        return removed


def _read_walk(
    directories: JobDirectories, walk: Iterator[str], limit: int
) -> tuple[list[tuple[str, float]], bool]:
    """
    The next C{limit} job directories of C{walk} with when each was last
    written, and whether the walk has ended.  Blocking.
    """
    found: list[tuple[str, float]] = []
    for job_id in walk:
        try:
            last = directories.last_written(job_id)
        except OSError:
            last = None
        if last is not None:
            found.append((job_id, last))
        if len(found) >= limit:
            return found, False
    return found, True
