"""
The remote worker's agent: a service that pulls jobs from a dispatcher
over HTTP with fenced leases (docs/worker-protocol.md), runs them with the
same L{LocalExecutor} the daemon uses, keeps their leases alive with
heartbeats, has their logs shipped and reports their results.

Nothing here touches the global reactor; L{dispatcher.app.worker_tap} builds the
service with it.
"""

from __future__ import annotations

import random
import re
import secrets
from collections import deque
from typing import Any, Callable, Mapping, Optional, Union

import attrs
import msgspec
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, succeed
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from dispatcher.execution._executor import RunningJob
from dispatcher.model._jobs import JobState, Lease, Outcome
from dispatcher.model._workers import default_fence_margin
from dispatcher.wire._forms import lease_from_grant, limits_form
from dispatcher.wire._json import encode
from dispatcher.wire._types import (
    MAX_SLOTS,
    HeartbeatAnswer,
    HeartbeatItem,
    LeaseAnswer,
    LeaseGrant,
    LeaseHeld,
    LeaseStatus,
    ResultItem,
    ResultsAnswer,
    WorkerOffer,
)
from dispatcher.workers._client import (
    POLL_WAIT_SECONDS,
    DispatcherClient,
    DispatcherError,
    DispatcherRefused,
)
from dispatcher.workers._logs import LogShipper, ShippedLog
from dispatcher.workers._sweep import JobDirectorySweeper

log = Logger()

# What a worker assumes until the dispatcher's first answer says otherwise
# (the protocol's defaults).
DEFAULT_LEASE_SECONDS = 30.0
DEFAULT_HEARTBEAT_SECONDS = 10.0

# How long the first of the jobs that ended waits for the others still
# running before their results are reported (the daemon's END_GATHER, for
# the same reason): jobs leased together mostly end close together, and
# reported as they came in, the first went alone and the rest waited for
# its answer to make the next report, so that a worker of eight slots sent
# a report (and asked for work) every three jobs.  A report waits for no
# more once no job runs.
REPORT_GATHER = 0.001

# How long the lease loop leaves free slots unasked for while every job
# still running started less than this many seconds ago: the report of
# their ends asks for those slots with its own.  Asked for at once, a slot
# or two of a worker of short jobs went in a long-poll that the queue
# answered at once, the report of the jobs ending meanwhile asked for none
# (one request for work at a time), and the worker locked into a cycle of
# leases granted in two answers (1 and 7 of 8 slots): two round trips for
# every eight jobs, never merging again.  A job older than this is a long
# job, and the slots free beside it are asked for at once; none waits
# longer than this.
REPORT_YOUNG = 0.010

# A worker uses its prefetch (leases held beyond its slots, their jobs
# started as slots free) only while the jobs it runs are this short: the
# last one to end ran for less than this many seconds.  Prefetch saves a
# round trip between one job's end and the next one's start, which counts
# only against jobs of a few round trips; a prefetched job waits for a
# slot meanwhile, when another worker might have had a slot free for it,
# at most the time of the short jobs ahead of it.
PREFETCH_BELOW = 1.0


# What the worker offers

@attrs.frozen
class WorkerDescription:
    """
    What a worker tells the dispatcher about itself in every request.

    @ivar name: unique per worker process.
    @ivar slots: jobs it runs at once (at least 1).
    @ivar cpus: CPUs it offers in all.
    @ivar memory_mb: memory it offers in all, in MiB.
    @ivar gpus: GPUs it offers in all.
    @ivar labels: what a job's C{requirements} are matched against.
    @ivar tasks: the task names its configuration knows.
    @ivar instance: this process's own random id, so that the dispatcher
        can tell two processes given the same name apart.
    @ivar prefetch: leases it may hold beyond its slots, their jobs started
        as slots free.
    """

    name: str
    slots: int
    cpus: float
    memory_mb: int
    gpus: int
    labels: Mapping[str, str] = attrs.field(factory=dict)
    tasks: tuple[str, ...] = ()
    instance: str = attrs.field(factory=lambda: secrets.token_hex(8), eq=False)
    prefetch: int = 0

    def offer(self) -> WorkerOffer:
        """
        The description as the protocol's C{"worker"} object (C{prefetch}
        left out when none, as a dispatcher older than it needs).
        """
        return WorkerOffer(
            name=self.name,
            slots=self.slots,
            cpus=self.cpus,
            memory_mb=self.memory_mb,
            gpus=self.gpus,
            labels=dict(self.labels),
            tasks=list(self.tasks),
            instance=self.instance,
            prefetch=self.prefetch if self.prefetch > 0 else msgspec.UNSET,
        )


# Waiting between tries

class Backoff:
    """
    Exponential back-off with jitter: the n-th delay in a row is drawn
    uniformly between half and all of C{initial * 2**n}, capped at
    C{maximum}.  The jitter keeps many workers that lost the same
    dispatcher from coming back all at once.
    """

    def __init__(
        self,
        initial: float = 0.5,
        maximum: float = 30.0,
        rng: Optional[random.Random] = None,
    ) -> None:
        self.initial = initial
        self.maximum = maximum
        self._random = rng if rng is not None else random.Random()
        self.failures = 0

    def next_delay(self) -> float:
        """
        The delay before the next try, after one more failure.
        """
        ceiling = min(self.maximum, self.initial * 2 ** min(self.failures, 64))
        self.failures += 1
        return self._random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        """
        A try succeeded: the next failure waits the shortest delay again.
        """
        self.failures = 0


# Leases held

@attrs.define(eq=False)
class HeldLease:
    """
    A lease the worker holds: from the answer that granted it until its
    result is acknowledged, or until the dispatcher said it is no longer
    current and its job has stopped.

    @ivar lease: the lease.
    @ivar running: what the executor runs for it.
    @ivar tell_running: its job has started after staging, and the
        dispatcher has not yet acknowledged a heartbeat saying so.
    @ivar shipped: how much of its log the dispatcher has.
    @ivar outcome: how the attempt ended, once it has.
    @ivar forgotten: the dispatcher no longer knows this lease: nothing more
        is sent about it.
    @ivar abandoned: stopped by the worker's own shutdown: it is reported
        as C{released}, its attempt unspent.
    @ivar stop_error: stopped by the shutdown of a one-job worker: it is
        reported failed, with this error, its attempt spent (the batch job
        it ran in was ended: it runs again only as its retries allow).
    @ivar fence_at: when its job must have stopped unless a heartbeat sent
        before then renews the lease, on the worker's fence clock (the
        spawner helper's deadline clock).
    @ivar fence_seconds: the dispatcher's C{fence_seconds} of the answer
        that last renewed it.
    @ivar fenced: the worker stopped its job at C{fence_at}, having heard
        nothing: it is renewed no more, and its result says so.
    @ivar unsendable: its own result could not be sent, and was replaced
        by a failed one saying why.
    @ivar started: when its job was handed to the executor (the worker's
        clock), or C{None} before.
    """

    lease: Lease
    running: Optional[RunningJob] = None
    tell_running: bool = False
    shipped: ShippedLog = attrs.field(factory=ShippedLog)
    outcome: Optional[Outcome] = None
    forgotten: bool = False
    abandoned: bool = False
    stop_error: Optional[str] = None
    fence_at: float = float("inf")
    fence_seconds: float = 0.0
    fenced: bool = False
    unsendable: bool = False
    started: Optional[float] = None

    @property
    def job_id(self) -> str:
        """
        The id of the lease's job.
        """
        return self.lease.job_id

    @property
    def ended(self) -> bool:
        """
        Its job has run and stopped.
        """
        return self.running is not None and self.running.done.called


class RemoteWorker(Service):
    """
    Pulls jobs from a dispatcher and runs them: asks for work with a
    long-poll while it has free slots, runs each leased job on the
    executor, keeps its leases alive with heartbeats, ships its logs, and
    reports its results until they are acknowledged.

    A slot is taken from the lease's grant until its result is acknowledged
    (or its lease is gone and its job has stopped): the dispatcher counts
    the worker's leases the same way.  With a prefetch, the worker holds up
    to that many leases more while its jobs are short (L{PREFETCH_BELOW}):
    their jobs wait, in the order granted, and start as running jobs end,
    so that a job ends and the next starts without a round trip between.
    A prefetched lease is a lease like any other: heartbeats renew it, a
    cancel forgets it, its fence passed it is given back unstarted, and a
    stop gives it back.  No more than C{slots} jobs ever run at once.

    @param client: a L{DispatcherClient}.
    @param executor: a L{LocalExecutor} (or an object with its C{run},
        C{stop}, C{log_path} and C{kill_grace}).
    @param description: the L{WorkerDescription} sent with every request.
    @param clock: the C{IReactorTime} of heartbeats, back-offs and the
        shutdown grace.
    @param read_chunks: C{[(path, offset, size), ...] -> Deferred[[bytes,
        ...]]}: reads pieces of log files off the reactor thread, in one
        trip (L{dispatcher.workers._logs.read_chunks_blocking}).
    @param grace: seconds a stopping worker waits for running jobs before it
        stops them.
    @param flush_seconds: seconds a stopping worker goes on trying to
        deliver results that are not yet acknowledged.
    @param rng: the random source of the back-off jitter.
    @param poll_wait: the long-poll's C{wait}, in seconds.
    @param fence_clock: C{() -> float}: the clock of the jobs' fences
        (docs/worker-protocol.md, "Self-fencing"), the one the spawner
        helper keeps deadlines on
        (L{dispatcher.execution._spawner.deadline_clock}); C{clock}'s
        C{seconds} by default.
    @param sweeper: the L{JobDirectorySweeper} that removes the
        directories of the jobs it let go of, started and stopped with it;
        C{None}: they are kept.
    @param report_gather: seconds the first job to end waits for those
        still running before the results are reported (L{REPORT_GATHER});
        0 reports each end as it comes.
    @param report_young: how long at most free slots wait to be asked for
        with the ends of the jobs still running, while all of those started
        lately (L{REPORT_YOUNG}); 0: they are asked for at once.
    @param job_lines: whether the lines of each job's lease, end and
        recorded result (at debug) are made at all: a line that no observer
        keeps still costs microseconds to make and drop, a tenth of a
        remote no-op job's cost on its worker.
    @param one_job: take one job, and stop asking for work once it is
        granted; L{finished} fires once that job's result is delivered (a
        Slurm job of a direct-mode backend, which runs one job's worker).
        Its stop reports a job still running as failed, with
        C{stop_reason}, not as released.
    @param stop_reason: the error of a job a one-job worker's stop ended.
    @ivar finished: fires once a one-job worker has let go of its job.
    @param prefetch_below: the longest a job may have run for the worker
        to use its prefetch (L{PREFETCH_BELOW}).
    @ivar lease_answers: how many answers granted how many leases (the
        number of leases: the number of answers), told in the line the
        worker logs when it stops.
    """

    def __init__(
        self,
        client: DispatcherClient,
        executor: Any,
        description: WorkerDescription,
        clock: Any,
        read_chunks: Callable[[list[tuple[str, int, int]]], Deferred],
        grace: float = 30.0,
        flush_seconds: float = 10.0,
        rng: Optional[random.Random] = None,
        poll_wait: float = POLL_WAIT_SECONDS,
        fence_clock: Optional[Callable[[], float]] = None,
        sweeper: Optional[JobDirectorySweeper] = None,
        report_gather: float = REPORT_GATHER,
        report_young: float = REPORT_YOUNG,
        job_lines: bool = True,
        one_job: bool = False,
        stop_reason: Optional[str] = None,
        prefetch_below: float = PREFETCH_BELOW,
    ) -> None:
        self._client = client
        self._one_job = one_job
        self._stop_reason = stop_reason or "stopped: its worker was told to stop"
        # A one-job worker asks no more once its job is granted.
        self._asked_enough = False
        self._began = 0.0
        self.finished: Deferred = Deferred()
        self._job_lines = job_lines
        self._report_gather = report_gather
        self._report_young = report_young
        # The jobs that ended and wait for the others still running (at
        # most report_gather) before their logs and results go, how many
        # jobs hold a slot (run, or wait for their directory's removal to
        # run), and the timer that ends the wait.
        self._ending: list[HeldLease] = []
        self._running_count = 0
        # The leases held beyond the slots, their jobs waiting for a slot in
        # the order granted; whether the worker uses its prefetch now (the
        # last job to end was short), and how short that is.
        self._prefetched: deque[HeldLease] = deque()
        self._prefetching = False
        self._prefetch_below = prefetch_below
        self._gather_call: Any = None
        # A report asks for work too (max_jobs) while it is under way: no
        # other request for work is made meanwhile.
        self._report_asks = False
        self.lease_answers: dict[int, int] = {}
        self._sweeper = sweeper
        self._fence_clock = fence_clock if fence_clock is not None else clock.seconds
        self._fence_call: Any = None
        self._fence_due = float("inf")
        self._executor = executor
        self.description = description
        self._clock = clock
        self._logs = LogShipper(client, executor.log_path, read_chunks, self._forget)
        self._grace = grace
        self._flush_seconds = flush_seconds
        self._poll_wait = poll_wait
        self._random = rng if rng is not None else random.Random()
        self._poll_backoff = Backoff(rng=self._random)
        self._beat_backoff = Backoff(rng=self._random)
        # Results and their last output wait at most 10 s between tries: a
        # dispatcher back from an outage hears of ended jobs soon.
        self._report_backoff = Backoff(maximum=10.0, rng=self._random)
        self.lease_seconds = DEFAULT_LEASE_SECONDS
        self.heartbeat_seconds = DEFAULT_HEARTBEAT_SECONDS
        self.held: dict[str, HeldLease] = {}
        self.unreported: dict[str, HeldLease] = {}
        self._accepting = False
        self._stopped = False
        self._polling: Optional[Deferred] = None
        self._slot_waiter: Optional[Deferred] = None
        self._settled_waiters: list[Deferred] = []
        self._beat_call: Any = None
        self._beating: Optional[Deferred] = None
        self._beat_again = False
        self._reporting: Optional[Deferred] = None
        self._sleeps: set[Deferred] = set()
        self._asking: Optional[Deferred] = None
        # Whether requests for work list the leases held (a dispatcher older
        # than that field refuses it; then they go without).
        self._send_held = True
        # Whether results say the limits a command ran under and whether
        # its log was cut (likewise refused by an older dispatcher).
        self._send_limits = True
        # Whether reports ask for work (max_jobs; likewise refused by an
        # older dispatcher, and then work is asked for apart).
        self._ask_in_reports = True

    # Starting and stopping

    def startService(self) -> None:
        Service.startService(self)
        self._began = self._clock.seconds()
        self._accepting = True
        self._stopped = False
        log.info(
            "worker {name} asks {url} for work: {slots} slots, {cpus:g} CPUs, "
            "{memory} MiB, {gpus} GPUs, labels {labels}, tasks {tasks}",
            name=self.description.name,
            url=self._client.url().to_text(),
            slots=self.description.slots,
            cpus=self.description.cpus,
            memory=self.description.memory_mb,
            gpus=self.description.gpus,
            labels=dict(self.description.labels),
            tasks=list(self.description.tasks),
        )
        self._asking = self._guard(self._ask_for_work(), "asking for work")
        if self._sweeper is not None:
            self._sweeper.start()

    def stopService(self) -> Deferred:
        """
        Stop asking for work, give running jobs C{grace} seconds, then stop
        those still running, and go on for up to C{flush_seconds} trying to
        deliver the results of the jobs that ended.

        The jobs stopped here are reported as C{released} (unless they
        succeeded before the stop reached them): the dispatcher puts them
        back in the queue at once without spending their attempt, as the
        daemon does with its own jobs on SIGTERM.  Their logs are shipped
        first.  If the release cannot be delivered, their leases run out and
        the dispatcher queues them again (the attempt then counts).

        @return: a Deferred that fires when the worker has let go of
            everything.
        """
        Service.stopService(self)
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
        self._accepting = False
        for d in (self._polling, self._slot_waiter):
            # A lease request given up on is harmless: a lease granted on a
            # connection that is gone goes back unspent.
            if d is not None and not d.called:
                d.cancel()
        # The prefetched jobs never started: given back at once, their
        # attempts unspent, in one report.
        if self._prefetched:
            waiting = list(self._prefetched)
            self._prefetched.clear()
            for held in waiting:
                self._abandon(held)
            self._guard(
                self._finish_many(waiting), f"giving back {len(waiting)} prefetched jobs"
            )
        if self._sweeper is not None:
            # Its step under way ends first: a job it holds back starts
            # (or is given back) before the jobs are counted.
            await self._sweeper.stop()
        running = self._running()
        if running:
            log.info(
                "stopping: waiting up to {grace:g} s for {count} running jobs",
                grace=self._grace,
                count=len(running),
            )
            await self._within(self._grace, [h.running.done for h in running])
        still = self._running()
        if still:
            log.warn(
                "stopping {count} jobs still running after the grace period: "
                "{job_ids}; they are given back to the dispatcher's queue",
                **_naming(still),
            )
            # How long its batch job had run tells a time limit from a
            # cancel (a one-job worker starts with its batch job).
            ran = self._clock.seconds() - self._began
            for held in still:
                if self._one_job:
                    held.stop_error = f"{self._stop_reason}, {ran:.0f} s after its start"
                else:
                    held.abandoned = True
                self._executor.stop(held.job_id)
            # Processes get SIGKILL after the executor's kill grace; a task
            # that ignores its cancel may never return, so this is bounded.
            await self._within(
                getattr(self._executor, "kill_grace", 5.0) + 1.0,
                [h.running.done for h in still],
            )
        if self._reports_pending():
            await self._within(self._flush_seconds, [self._all_settled()])
        pending = self._reports_pending()
        if pending:
            log.warn(
                "stopping before the dispatcher acknowledged the last output "
                "or the result of {count} jobs: {job_ids}",
                **_naming(pending),
            )
        self._stopped = True
        for call in (self._beat_call, self._gather_call):
            if call is not None and call.active():
                call.cancel()
        if self._fence_call is not None and self._fence_call.active():
            self._fence_call.cancel()
        for d in [*self._sleeps, self._beating, self._reporting]:
            if d is not None and not d.called:
                d.cancel()
        if self._asking is not None:
            await self._asking
        log.info(
            "worker {name} stopped; it was granted {jobs} leases in {answers} "
            "answers (leases in an answer: answers {sizes})",
            name=self.description.name,
            jobs=sum(size * count for size, count in self.lease_answers.items()),
            answers=sum(self.lease_answers.values()),
            sizes=dict(sorted(self.lease_answers.items())),
        )

    def _running(self) -> list[HeldLease]:
        return [h for h in self.held.values() if h.running is not None and not h.ended]

    def _reports_pending(self) -> list[HeldLease]:
        # Ended jobs whose last output or result the dispatcher has not
        # acknowledged yet (a job stopped by the shutdown ships its output).
        return [
            h for h in self.held.values() if h.outcome is not None and not h.forgotten
        ]

    def _all_settled(self) -> Deferred:
        async def wait() -> None:
            while self._reports_pending():
                waiter: Deferred = Deferred()
                self._settled_waiters.append(waiter)
                await waiter

        return ensureDeferred(wait())

    async def _within(self, seconds: float, ds: list[Deferred]) -> None:
        """
        Wait until all of C{ds} have fired, or C{seconds} have passed,
        whichever comes first, without changing their results.
        """
        done: Deferred = Deferred()
        remaining = [len(ds)]

        def one(result: Any) -> Any:
            remaining[0] -= 1
            if remaining[0] == 0 and not done.called:
                done.callback(None)
            return result

        for d in ds:
            d.addBoth(one)
        if not ds and not done.called:
            done.callback(None)
        call = self._clock.callLater(
            seconds, lambda: done.called or done.callback(None)
        )
        await done
        if call.active():
            call.cancel()

    def _guard(self, coroutine: Any, what: str) -> Deferred:
        def failed(failure: Failure) -> None:
            if not failure.check(CancelledError):
                log.failure("the worker failed while {what}", failure, what=what)

        return ensureDeferred(coroutine).addErrback(failed)

    def _sleep(self, seconds: float) -> Deferred:
        d = deferLater(self._clock, seconds)
        if self._stopped:
            d.cancel()
            return d
        self._sleeps.add(d)
        d.addBoth(lambda result: (self._sleeps.discard(d), result)[1])
        return d

    @property
    def _offer(self) -> WorkerOffer:
        # The latest description counts: it goes with every request.
        return self.description.offer()

    # Asking for work

    @property
    def room(self) -> int:
        """
        How many leases the worker holds at most now: its slots, and its
        prefetch while the jobs it runs are short.
        """
        if self._prefetching:
            return min(MAX_SLOTS, self.description.slots + self.description.prefetch)
        return self.description.slots

    @property
    def free_slots(self) -> int:
        """
        Slots (and, while it prefetches, places for prefetched leases) not
        taken by a lease the worker holds.
        """
        return self.room - len(self.held)

    async def _ask_for_work(self) -> None:
        while self._accepting and not self._asked_enough:
            free = self.free_slots
            if free <= 0 or self._report_asks:
                # (A report under way asks for work: its answer wakes this.)
                if not await self._wait_for_slots():
                    return
                continue
            young = self._young_for()
            if young > 0:
                # (The report of their ends, or this wait's end, wakes this.)
                if not await self._wait_for_slots(young):
                    return
                continue
            asked_at = self._clock.seconds()
            sent = self._fence_clock()
            self._polling = self._client.lease(
                self._offer, free, self._poll_wait, self._held_items()
            )
            try:
                answer = await self._polling
            except CancelledError:
                return
            except DispatcherError as e:
                if not self._accepting:
                    return
                if self._refuses_prefetch(e):
                    continue
                if self._send_held and _refuses_held(e):
                    log.warn(
                        "the dispatcher does not know the held field: asking for "
                        "work without it (a lease answer lost on the way then runs "
                        "out its life on the dispatcher; upgrade the dispatcher)"
                    )
                    self._send_held = False
                    continue
                delay = self._poll_backoff.next_delay()
                _log_error(e, "asking for work", delay)
                await self._sleep(delay)
                continue
            finally:
                self._polling = None
            if self._poll_backoff.failures:
                log.info("the dispatcher answers again")
            self._poll_backoff.reset()
            self._learn_timing(answer)
            leases = answer.leases
            self._take(leases, answer, sent)
            if not leases and self._clock.seconds() - asked_at < 1.0:
                # An empty answer should come only when the wait ends;
                # one that comes at once must not turn into a busy loop.
                await self._sleep(self._random.uniform(0.5, 1.0))

    def _young_for(self) -> float:
        """
        How much longer the lease loop leaves the free slots to the report
        of the jobs running (see L{REPORT_YOUNG}): until the oldest of them
        has run for C{report_young}; 0 when none runs.
        """
        if self._report_young <= 0:
            return 0.0
        starts = [h.started for h in self._running() if h.started is not None]
        if not starts:
            return 0.0
        return min(starts) + self._report_young - self._clock.seconds()

    async def _wait_for_slots(self, at_most: Optional[float] = None) -> bool:
        """
        Wait until slots free (L{_slots_freed}) or a report's answer wakes
        the lease loop, or for C{at_most} seconds if given.

        @return: whether the loop goes on (C{False}: cancelled, it stops).
        """
        self._slot_waiter = Deferred()
        wake = None if at_most is None else self._clock.callLater(at_most, self._wake_lease_loop)
        try:
            await self._slot_waiter
        except CancelledError:
            return False
        finally:
            self._slot_waiter = None
            if wake is not None and wake.active():
                wake.cancel()
        return True

    def _wake_lease_loop(self) -> None:
        if self._slot_waiter is not None and not self._slot_waiter.called:
            self._slot_waiter.callback(None)

    def _take(
        self, leases: list[LeaseGrant], answer: Union[LeaseAnswer, ResultsAnswer], sent: float
    ) -> None:
        """
        Start the jobs of the C{leases} an answer granted to a request for
        work sent at C{sent} (on the fence clock).
        """
        if leases:
            count = len(leases)
            self.lease_answers[count] = self.lease_answers.get(count, 0) + 1
            if self._one_job:
                self._asked_enough = True
            if self._job_lines:
                log.debug(
                    "{count} {jobs} leased in one answer",
                    count=count,
                    jobs="job" if count == 1 else "jobs",
                )
        if answer.fence_seconds <= 0:
            # A dispatcher that does not say counts nothing for the
            # wait: from now is the best guess left.
            sent = self._fence_clock()
        fence_at = sent + self._fence_seconds(answer)
        for item in leases:
            self._start(item, fence_at)

    def _held_items(
        self, exclude: Mapping[str, HeldLease] = {}
    ) -> Optional[list[LeaseHeld]]:
        """
        Every lease this process holds, for a request for work.  The
        requests for work go one at a time, each after the answer to the one
        before has been read (its leases are held by then) or given up on,
        so a lease the dispatcher granted that is not listed here never
        reached this worker, and the dispatcher gives it back unspent.
        """
        if not self._send_held:
            return None
        return [
            LeaseHeld(h.job_id, h.lease.token)
            for h in self.held.values()
            if exclude.get(h.job_id) is not h
        ]

    def _refuses_prefetch(self, error: Exception) -> bool:
        """
        Whether C{error} is a dispatcher's refusal of the description's
        C{prefetch} (it predates the field, and counts only slots): if so,
        the worker goes on without a prefetch, and says so once.
        """
        if self.description.prefetch <= 0 or not _refuses_field(error, "worker.prefetch"):
            return False
        log.warn(
            "the dispatcher does not know the prefetch field: holding no lease "
            "beyond the {slots} slots (a round trip between one job's end and the "
            "next one's start; upgrade the dispatcher)",
            slots=self.description.slots,
        )
        self.description = attrs.evolve(self.description, prefetch=0)
        self._prefetching = False
        return True

    def _learn_timing(
        self, answer: Union[LeaseAnswer, HeartbeatAnswer, ResultsAnswer]
    ) -> None:
        if answer.lease_seconds > 0:
            self.lease_seconds = answer.lease_seconds
        if answer.heartbeat_seconds > 0:
            self.heartbeat_seconds = answer.heartbeat_seconds

    def _fence_seconds(
        self, answer: Union[LeaseAnswer, HeartbeatAnswer, ResultsAnswer]
    ) -> float:
        """
        The answer's C{fence_seconds}; from a dispatcher that gives none,
        the lease less the default margin.
        """
        if answer.fence_seconds > 0:
            return answer.fence_seconds
        return self.lease_seconds - default_fence_margin(self.lease_seconds)

    # Running

    def _start(self, grant: LeaseGrant, fence_at: float) -> None:
        """
        Run the job of C{grant}, which must have stopped by C{fence_at} (on
        the fence clock) unless a heartbeat renews it.
        """
        try:
            lease = lease_from_grant(grant, self._clock.seconds() + self.lease_seconds)
        except Exception:
            log.failure("cannot read a lease the dispatcher sent: {grant!r}", grant=grant)
            return
        if lease.job_id in self.held:
            log.warn(
                "job {job_id} was leased again while this worker holds it; "
                "the new lease is ignored",
                job_id=lease.job_id,
            )
            return
        now = self._fence_clock()
        held = HeldLease(lease, fence_at=fence_at, fence_seconds=fence_at - now)
        self.held[lease.job_id] = held
        if fence_at <= now:
            self._too_late(held, now)
            return
        if not self._accepting:
            # Granted by the answer to a report that asked for work as the
            # worker began to stop: given back unstarted, its attempt not
            # spent.
            self._give_back(held)
            return
        # (Its token is not logged: it is the lease's secret, which whoever
        # reads the log could write the job's log and result with.)
        if self._job_lines:
            log.debug(
                "job {job_id} attempt {attempt} leased",
                job_id=lease.job_id,
                attempt=lease.attempt,
            )
        if self._running_count >= self.description.slots:
            # Prefetched: it starts as a slot frees; heartbeats renew its
            # lease meanwhile.
            self._prefetched.append(held)
            self._ensure_heartbeats()
            return
        self._occupy(held)

    def _give_back(self, held: HeldLease) -> None:
        """
        Give C{held} back unstarted (the worker stops), its attempt unspent.
        """
        self._abandon(held)
        self._guard(self._finish(held), f"giving back job {held.job_id}")

    def _abandon(self, held: HeldLease) -> None:
        held.abandoned = True
        held.outcome = Outcome(JobState.FAILED, error="never started: its worker stopped")

    def _occupy(self, held: HeldLease) -> None:
        """
        C{held}'s job takes a slot: run it, once its directory is free.
        """
        self._running_count += 1
        busy = self._sweeper.busy(held.job_id) if self._sweeper is not None else None
        if busy is not None:
            # Its directory (or one on the way to it) is being removed: it
            # starts once that is done, a step of at most a hundred
            # directories.
            busy.addCallback(lambda _: self._run_later(held))
            self._ensure_heartbeats()
            return
        self._run(held, held.fence_at)

    def _start_prefetched(self) -> None:
        """
        Start prefetched jobs while slots are free: those whose lease was
        forgotten meanwhile are dropped, those whose fence passed are given
        back unstarted.
        """
        while self._prefetched and self._running_count < self.description.slots:
            held = self._prefetched.popleft()
            if held.forgotten:
                self._drop(held)
                continue
            now = self._fence_clock()
            if held.fence_at <= now:
                self._too_late(held, now)
                continue
            self._occupy(held)

    def _run_later(self, held: HeldLease) -> None:
        """
        Run C{held}'s job, which waited for its directory's removal, unless
        its lease ended meanwhile, the worker is stopping (it is given back
        unstarted) or its fence has passed.
        """
        now = self._fence_clock()
        if held.forgotten or not self._accepting or held.fence_at <= now:
            # The slot it took is free again.
            self._running_count -= 1
            if held.forgotten:
                self._drop(held)
            elif held.fence_at <= now:
                self._too_late(held, now)
            else:
                self._give_back(held)
            self._start_prefetched()
            return
        self._run(held, held.fence_at)

    def _run(self, held: HeldLease, fence_at: float) -> None:
        """
        Hand C{held}'s job to the executor.
        """

        def mark_running(lease: Lease) -> Deferred:
            # The job goes on at once; the dispatcher hears of it in a
            # heartbeat sent now, and a cancel that raced with staging
            # comes back in the answer.
            if not held.forgotten:
                held.tell_running = True
                self._beat_soon()
            return succeed(None)

        def record_process(lease: Lease, process: Any) -> Deferred:
            # Only the daemon records process identities (to kill what a
            # crash left); a worker's spawner helper kills its jobs when the
            # worker dies.
            return succeed(None)

        held.started = self._clock.seconds()
        held.running = self._executor.run(
            held.lease, mark_running, record_process, deadline=fence_at
        )
        held.running.done.addCallback(self._ended, held)
        self._ensure_heartbeats()
        self._arm_fence(fence_at - self._stop_grace(held))

    def _ended(self, outcome: Outcome, held: HeldLease) -> None:
        self._running_count -= 1
        if held.started is not None:
            self._prefetching = (
                self.description.prefetch > 0
                and self._clock.seconds() - held.started < self._prefetch_below
            )
        # The next job starts before this one's end is dealt with.
        self._start_prefetched()
        process = held.running.process if held.running is not None else None
        if not held.fenced and not held.forgotten and (
            self._fence_clock() >= held.fence_at
            or getattr(process, "killed_at_deadline", False)
        ):
            # Its end came before the worker's own timer (the process was
            # frozen, and the spawner helper kept the deadline).
            self._fence(held)
        if held.fenced and outcome.state is not JobState.SUCCEEDED:
            outcome = Outcome(
                JobState.FAILED,
                exit_code=outcome.exit_code,
                error=_fence_error(held),
                limits=outcome.limits,
                log_cut=outcome.log_cut,
            )
        if self._job_lines:
            log.debug(
                "job {job_id} attempt {attempt} ended: {state}{error}",
                job_id=held.job_id,
                attempt=held.lease.attempt,
                state=outcome.state.value,
                error=f" ({outcome.error})" if outcome.error else "",
            )
        if held.forgotten:
            self._drop(held)
            return
        if held.stop_error is not None and outcome.state is not JobState.SUCCEEDED:
            outcome = Outcome(
                JobState.FAILED,
                exit_code=outcome.exit_code,
                error=held.stop_error,
                limits=outcome.limits,
                log_cut=outcome.log_cut,
            )
        if held.abandoned and outcome.state is JobState.SUCCEEDED:
            # It finished on its own before the stop reached it: the work is
            # done, and is reported like any other (the stop was no cancel).
            held.abandoned = False
            outcome = attrs.evolve(outcome, stopped=False)
        held.outcome = outcome
        self._ending.append(held)
        if self._running_count <= 0 or self._report_gather <= 0:
            self._gathered()
        elif self._gather_call is None:
            self._gather_call = self._clock.callLater(self._report_gather, self._gathered)

    def _gathered(self) -> None:
        """
        Every job running has ended, or the first of those that ended has
        waited long enough: ship their logs (read in one trip) and report
        them together.
        """
        if self._gather_call is not None and self._gather_call.active():
            self._gather_call.cancel()
        self._gather_call = None
        ending, self._ending = self._ending, []
        if ending:
            self._guard(self._finish_many(ending), f"finishing {len(ending)} jobs")
        else:
            # Results held back for the jobs a report's answer started
            # (L{_hold_report}) go now.
            self._report()

    async def _finish_many(self, batch: list[HeldLease]) -> None:
        """
        L{_finish} for each of C{batch}, in one shipment of their logs and
        one report.
        """
        # A task that succeeded has no log to ship: the executor writes a
        # task's log only when it raised (its traceback).  Not looking
        # saves a trip off the reactor thread on every report of such jobs.
        shipping = [h for h in batch if not _no_log(h)]
        try:
            shipped = dict(zip(map(id, shipping), await self._logs.ship_many(shipping)))
        except CancelledError:
            return
        except Exception:
            log.failure("reading the logs of {count} jobs failed; each is tried "
                        "again on its own", count=len(batch))
            shipped = dict.fromkeys(map(id, shipping), False)
        for held in batch:
            done = shipped.get(id(held), True)
            if held.forgotten:
                self._drop(held)
            elif done:
                self.unreported[held.job_id] = held
            else:
                # Shipped again after a pause, on its own (a dispatcher that
                # did not answer, a log file that could not be read).
                self._guard(self._finish(held), f"finishing job {held.job_id}")
        self._report()

    async def _finish(self, held: HeldLease) -> None:
        # The last log bytes go first: once the result is recorded the
        # lease is no longer current, and neither is its log.
        backoff = Backoff(maximum=10.0, rng=self._random)
        try:
            while not held.forgotten and not await self._logs.ship(held):
                await self._sleep(backoff.next_delay())
        except CancelledError:
            return
        if held.forgotten:
            self._drop(held)
            return
        self.unreported[held.job_id] = held
        self._report()

    def _drop(self, held: HeldLease, wake: bool = True) -> None:
        """
        Free C{held}'s slot.  With C{wake} false the lease loop is not told
        yet: the caller frees more slots and then calls L{_slots_freed}.
        """
        if self.held.get(held.job_id) is held:
            del self.held[held.job_id]
            if self._sweeper is not None:
                self._sweeper.finished(held.job_id)
        if self.unreported.get(held.job_id) is held:
            del self.unreported[held.job_id]
        if wake:
            self._slots_freed()
        if self._asked_enough and not self.held and not self.finished.called:
            self.finished.callback(None)

    def _slots_freed(self) -> None:
        # The lease loop resumes inside this call and asks at once for
        # every slot free by then.
        self._wake_lease_loop()
        waiters, self._settled_waiters = self._settled_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _forget(self, held: HeldLease, reason: str, message: str = "") -> None:
        """
        The dispatcher no longer knows this lease: stop its job, send
        nothing more about it, and free its slot once the job has stopped.
        """
        if held.forgotten:
            return
        held.forgotten = True
        log.info(
            "job {job_id} attempt {attempt}: the lease is no longer current "
            "({reason}{message}); the job is stopped and its result will not "
            "be reported",
            job_id=held.job_id,
            attempt=held.lease.attempt,
            reason=reason,
            message=f": {message}" if message else "",
        )
        if held.running is None and held in self._prefetched:
            # Never started: its slot is free at once.
            self._prefetched.remove(held)
            self._drop(held)
        elif not held.ended:
            self._executor.stop(held.job_id)
        elif not held.shipped.lock.locked:
            # Otherwise _finish drops it when its shipping returns.
            self._drop(held)

    # Self-fencing

    def _too_late(self, held: HeldLease, now: float) -> None:
        """
        A lease whose answer was read only after its fence had passed (the
        worker was frozen, or its answer held up): its job is not started,
        and it is given back unspent.
        """
        log.warn(
            "job {job_id} attempt {attempt}: its lease came {late:.1f} s past "
            "the time by which its job would have had to stop; it is not "
            "started, and given back",
            job_id=held.job_id,
            attempt=held.lease.attempt,
            late=now - held.fence_at,
        )
        held.fenced = True
        held.abandoned = True
        held.outcome = Outcome(JobState.FAILED, error="never started: its lease came too late")
        self._guard(self._finish(held), f"giving back job {held.job_id}")

    def _stop_grace(self, held: HeldLease) -> float:
        """
        How long before its fence a job gets C{SIGTERM} (its C{SIGKILL}
        comes at the fence): the kill grace, but no more than half of what
        lies between the next heartbeat and the fence, so that a worker
        whose heartbeats get through never sends it.
        """
        room = (held.fence_seconds - self.heartbeat_seconds) / 2.0
        grace = getattr(self._executor, "kill_grace", 5.0)
        return max(0.0, min(grace, room))

    def _fencing(self) -> list[HeldLease]:
        # The leases whose jobs still run (or stage) and may need fencing.
        return [
            h
            for h in self.held.values()
            if not h.fenced and not h.forgotten and not h.ended and h.running is not None
        ]

    def _arm_fence(self, due: Optional[float] = None) -> None:
        """
        Wake by C{due} (on the fence clock), or, without it, when the
        earliest job must start stopping.  A wake-up already set no later
        is kept: renewals only move fences later, so a wake-up that comes
        early just finds nothing due and sets the next (one pass over the
        leases a fence period, not one a job start or a heartbeat).  The
        reactor's timers run on the wall clock, which may be set: the
        wake-up checks the fence clock.
        """
        if self._stopped:
            return
        armed = self._fence_call is not None and self._fence_call.active()
        if due is None:
            if armed:
                self._fence_call.cancel()
            dues = [h.fence_at - self._stop_grace(h) for h in self._fencing()]
            if not dues:
                self._fence_call = None
                return
            due = min(dues)
        elif armed:
            if self._fence_due <= due:
                return
            self._fence_call.cancel()
        self._fence_due = due
        delay = max(0.0, due - self._fence_clock())
        self._fence_call = self._clock.callLater(delay, self._check_fences)

    def _check_fences(self) -> None:
        now = self._fence_clock()
        for held in self._fencing():
            if now >= held.fence_at - self._stop_grace(held):
                self._fence(held)
        self._arm_fence()

    def _fence(self, held: HeldLease) -> None:
        """
        No heartbeat renewed C{held} in time: stop its job (C{SIGTERM} now,
        C{SIGKILL} at its fence, when the spawner helper kills it anyway),
        renew it no more, and report it failed.
        """
        if held.fenced:
            return
        held.fenced = True
        now = self._fence_clock()
        log.warn(
            "job {job_id} attempt {attempt}: no heartbeat was acknowledged "
            "for {silent:.1f} s; stopping it, so that it never runs beside "
            "another attempt once its lease runs out",
            job_id=held.job_id,
            attempt=held.lease.attempt,
            silent=now - (held.fence_at - held.fence_seconds),
        )
        if not held.ended:
            self._executor.stop(held.job_id, grace=max(0.0, held.fence_at - now))

    # Heartbeats

    def _live(self) -> list[HeldLease]:
        return [h for h in self.held.values() if not h.forgotten]

    def _ensure_heartbeats(self) -> None:
        if self._stopped or self._beating is not None:
            return
        if self._beat_call is None or not self._beat_call.active():
            self._beat_call = self._clock.callLater(self.heartbeat_seconds, self._beat)

    def _beat_soon(self) -> None:
        if self._stopped:
            return
        if self._beating is not None:
            self._beat_again = True
            return
        if self._beat_call is not None and self._beat_call.active():
            self._beat_call.cancel()
        self._beat()

    def _beat(self) -> None:
        self._beat_call = None
        d = self._guard(self._heartbeat(), "sending a heartbeat")
        self._beating = d
        d.addCallback(self._beaten)

    def _beaten(self, delay: Optional[float]) -> None:
        self._beating = None
        again, self._beat_again = self._beat_again, False
        if not self._stopped and self._live():
            if again:
                delay = 0
            elif delay is None:
                delay = self.heartbeat_seconds
            self._beat_call = self._clock.callLater(delay, self._beat)

    async def _heartbeat(self) -> Optional[float]:
        """
        Send one heartbeat for every live lease; return the seconds until
        the next one.
        """
        # A worker waking from a freeze may run this before its fence
        # timer: fence first.  A fenced lease is not renewed (its job has
        # been stopped, and its result says so).
        self._check_fences()
        live = [h for h in self._live() if not h.fenced]
        if not live:
            return None
        told = {h.job_id for h in live if h.tell_running}
        items = [
            HeartbeatItem(held.job_id, held.lease.token, held.job_id in told) for held in live
        ]
        shipping = [held for held in live if held.running is not None and not held.ended]
        if shipping:
            self._guard(
                self._logs.ship_many(shipping), f"shipping the logs of {len(shipping)} jobs"
            )
        sent = self._fence_clock()
        try:
            # A heartbeat not answered within half a period (the dispatcher
            # answers one without a disk write) is given up and sent again
            # on a new connection: one lost on a connection that silently
            # broke (a partition that healed, a proxy that dropped it) must
            # not hold back the next ones until the fence stops every job.
            answer = await self._client.heartbeat(
                self._offer, items, timeout=max(1.0, self.heartbeat_seconds / 2)
            )
        except DispatcherError as e:
            if self._refuses_prefetch(e):
                return 0.0
            # Never longer than a heartbeat period: a dispatcher that
            # comes back must hear from this worker before its leases
            # run out.
            delay = min(self._beat_backoff.next_delay(), self.heartbeat_seconds)
            _log_error(e, "sending a heartbeat", delay)
            return delay
        self._beat_backoff.reset()
        self._learn_timing(answer)
        self._renew(answer, sent)
        for result in answer.leases:
            held = self._matching(result)
            if held is None:
                continue
            if result.ok:
                if held.job_id in told:
                    held.tell_running = False
            elif result.reason == "reported" and held.outcome is not None:
                # Its result got through, but this answer came before the
                # report's own.
                held.forgotten = True
                self._drop(held)
            else:
                self._forget(
                    held,
                    _refusal(result),
                    result.message or "",
                )
        return self.heartbeat_seconds

    def _renew(self, answer: HeartbeatAnswer, sent: float) -> None:
        """
        Move the fence of every lease the answer renewed to C{sent} (when
        the heartbeat went) plus its C{fence_seconds}, here and in the
        spawner helper, in one message for them all.  A lease whose fence
        passed while the answer was on its way is not renewed: its job has
        been killed.
        """
        fence = self._fence_seconds(answer)
        at = sent + fence
        now = self._fence_clock()
        renewed = []
        for result in answer.leases:
            held = self._matching(result)
            if held is None or not result.ok or held.fenced:
                continue
            if now >= held.fence_at:
                self._fence(held)
                continue
            if at > held.fence_at:
                held.fence_at = at
                held.fence_seconds = fence
                if held.running is not None and not held.ended:
                    renewed.append(held.job_id)
        if renewed:
            self._executor.set_deadline(renewed, at)

    def _matching(self, status: LeaseStatus) -> Optional[HeldLease]:
        held = self.held.get(status.job_id)
        if held is None or held.lease.token != status.token:
            return None
        return held

    # Results

    def _report(self) -> None:
        if self._reporting is None and self.unreported and not self._stopped:
            # (A stopping worker still reports: it is how its abandoned
            # jobs go back unspent.)
            d = self._guard(self._send_results(), "reporting results")
            self._reporting = d
            d.addBoth(self._reported)

    def _reported(self, _: Any) -> None:
        self._reporting = None

    async def _send_results(self) -> None:
        while self.unreported:
            batch = list(self.unreported.values())
            asked = self._report_ask(batch)
            # The leases these results end need not be listed as held too.
            held = self._held_items(exclude=self.unreported) if asked else None
            sent = self._fence_clock()
            try:
                answer = await self._client.report(
                    self._offer, [self._result_item(h) for h in batch], asked, held
                )
            except CancelledError:
                self._report_asked()
                raise
            except DispatcherError as e:
                self._report_asked()
                if self._refuses_prefetch(e):
                    continue
                if asked and _refuses_field(e, "max_jobs"):
                    log.warn(
                        "the dispatcher does not take a request for work in a report "
                        "(max_jobs): asking for work apart (a round trip more every "
                        "few jobs; upgrade the dispatcher)"
                    )
                    self._ask_in_reports = False
                    continue
                if self._send_limits and _refuses_limits(e):
                    log.warn(
                        "the dispatcher does not know the limits and log_cut fields of "
                        "a result: reporting without them (the jobs' records will not "
                        "say what limits they ran under; upgrade the dispatcher)"
                    )
                    self._send_limits = False
                    continue
                if self._replace_refused(e, batch):
                    continue
                delay = self._report_backoff.next_delay()
                _log_error(e, "reporting results", delay)
                await self._sleep(delay)
                continue
            except Exception:
                self._report_asked()
                # Not the dispatcher's answer but ours: a result that cannot
                # be written as JSON fails only its own job, never the
                # reports of the others (all go in one request).
                if self._replace_unsendable(batch):
                    continue
                delay = self._report_backoff.next_delay()
                log.failure(
                    "reporting results failed; trying again in {delay:.1f} s", delay=delay
                )
                await self._sleep(delay)
                continue
            self._report_backoff.reset()
            dropped = False
            for result in answer.results:
                held = self._matching(result)
                if held is None or self.unreported.get(held.job_id) is not held:
                    continue
                if result.ok:
                    if self._job_lines:
                        log.debug(
                            "job {job_id} attempt {attempt}: result recorded",
                            job_id=held.job_id,
                            attempt=held.lease.attempt,
                        )
                else:
                    log.info(
                        "job {job_id} attempt {attempt}: result refused "
                        "({reason}); dropped",
                        job_id=held.job_id,
                        attempt=held.lease.attempt,
                        reason=_refusal(result),
                    )
                held.forgotten = True
                # Every slot of the answer is freed before the lease loop
                # hears of it: woken at the first, it would ask for one job
                # and hold the others idle until that answer came back.
                self._drop(held, wake=False)
                dropped = True
            if asked:
                self._learn_timing(answer)
                self._take(answer.leases, answer, sent)
                # The lease loop looks again: at the slots the answer freed
                # and did not fill, it asks for work with a long-poll.
                self._report_asked()
                if answer.leases and self.unreported and self._hold_report():
                    return
            elif dropped:
                self._slots_freed()

    def _hold_report(self) -> bool:
        """
        Whether the results that ended while a report was under way wait
        for the jobs its answer just started, as the first end waits for
        the others still running (at most C{report_gather}): sent at once,
        they would ask for the slots they free alone, and the jobs just
        started would end meanwhile and wait a whole round trip for the
        report after, so that a worker of short jobs would exchange half
        the leases it may hold in each round trip.
        """
        if self._report_gather <= 0 or self._running_count <= 0 or not self._accepting:
            return False
        if self._gather_call is None:
            self._gather_call = self._clock.callLater(self._report_gather, self._gathered)
        return True

    def _report_ask(self, batch: list[HeldLease]) -> Optional[int]:
        """
        How many jobs a report of C{batch} asks for (C{None}: it does not
        ask): every slot free once the dispatcher has recorded it, when the
        worker takes work and no other request for work is under way.  (The
        requests for work go one at a time, each listing the leases held:
        see L{_held_items}.)
        """
        if (
            not (self._ask_in_reports and self._accepting)
            or self._polling is not None
            or self._asked_enough
        ):
            return None
        free = min(self.room, self.free_slots + len(batch))
        if free <= 0:
            return None
        self._report_asks = True
        return free

    def _report_asked(self) -> None:
        """
        A report that asked for work, if this one did, was answered or
        given up on: the lease loop may ask again.
        """
        if self._report_asks:
            self._report_asks = False
            self._slots_freed()

    def _result_item(self, held: HeldLease) -> ResultItem:
        """
        C{held}'s result as the report carries it; a failed result saying
        why, if its own cannot be made.
        """
        try:
            return _result_item(held, self._send_limits)
        except Exception as e:
            self._fail_unsendable(held, f"{type(e).__name__}: {e}")
            return _result_item(held, self._send_limits)

    def _replace_unsendable(self, batch: list[HeldLease]) -> bool:
        """
        Find the results of C{batch} that cannot be written as JSON, and
        replace each with a failed result saying why; whether there was
        one.
        """
        found = False
        for held in batch:
            try:
                encode(_result_item(held, self._send_limits))
            except Exception as e:
                self._fail_unsendable(held, f"{type(e).__name__}: {e}")
                found = True
        return found

    def _replace_refused(self, error: DispatcherError, batch: list[HeldLease]) -> bool:
        """
        If C{error} is the dispatcher's refusal of one result's field
        (C{results[i].result}, C{results[i].exit_code}...), replace that
        result with a failed one saying why, and say so: sent again as it
        was, it would be refused again, with every result beside it.
        """
        if not isinstance(error, DispatcherRefused) or error.status != 400:
            return False
        match = _RESULT_FIELD.match(error.field or "")
        if match is None or int(match.group(1)) >= len(batch):
            return False
        self._fail_unsendable(batch[int(match.group(1))], f"the dispatcher refused it: {error}")
        return True

    def _fail_unsendable(self, held: HeldLease, reason: str) -> None:
        """
        C{held}'s result cannot be sent: it becomes a failed one saying
        why, so that its job fails and the other results go on.  One that
        cannot be sent even so is dropped (its lease runs out, and the
        dispatcher fails or retries the attempt).
        """
        outcome = held.outcome
        assert outcome is not None
        reason = _clip(reason)
        if held.unsendable:
            log.error(
                "job {job_id} attempt {attempt}: not even a failed result can be "
                "sent ({reason}); it is dropped, and the job's lease runs out",
                job_id=held.job_id,
                attempt=held.lease.attempt,
                reason=reason,
            )
            held.forgotten = True
            self._drop(held)
            return
        log.error(
            "job {job_id} attempt {attempt}: its result cannot be sent ({reason}); "
            "it is reported failed",
            job_id=held.job_id,
            attempt=held.lease.attempt,
            reason=reason,
        )
        held.unsendable = True
        held.outcome = Outcome(
            JobState.FAILED,
            exit_code=outcome.exit_code,
            error=f"the worker could not send the job's result: {reason}",
            stopped=outcome.stopped,
            log_cut=outcome.log_cut,
        )


# A refused field of one result of a report, and the result's index.
_RESULT_FIELD = re.compile(r"results\[(\d+)\](\.|$)")

# How much of an error's text a failed result quotes.
_ERROR_TEXT = 500


def _clip(text: str) -> str:
    """
    C{text}, cut to L{_ERROR_TEXT} characters.
    """
    return text if len(text) <= _ERROR_TEXT else text[: _ERROR_TEXT - 3] + "..."


def _naming(held: list[HeldLease]) -> dict[str, Any]:
    """
    The fields of a log event about several leases: C{count} and the
    sorted C{job_ids}.
    """
    return {"count": len(held), "job_ids": sorted(h.job_id for h in held)}


def _no_log(held: HeldLease) -> bool:
    """
    Whether C{held}'s attempt has no log for certain: a task that
    succeeded (the executor writes a task attempt's log only with the
    traceback of an exception it raised).
    """
    outcome = held.outcome
    return (
        held.lease.spec.task is not None
        and outcome is not None
        and outcome.state is JobState.SUCCEEDED
    )


def _refuses_field(error: Exception, field: str) -> bool:
    """
    Whether C{error} is a dispatcher's refusal of a request's C{field}
    as unknown (it predates the field).
    """
    return (
        isinstance(error, DispatcherRefused)
        and error.code == "unknown_field"
        and error.field == field
    )


def _refuses_held(error: Exception) -> bool:
    """
    Whether C{error} is a dispatcher's refusal of a request for work's
    C{held} field (it predates the field).
    """
    return _refuses_field(error, "held")


# The fields of a result a dispatcher older than them refuses.
_LIMIT_FIELDS = re.compile(r"results\[\d+\]\.(limits|log_cut)")


def _refuses_limits(error: Exception) -> bool:
    """
    Whether C{error} is a dispatcher's refusal of a result's C{limits} or
    C{log_cut} field (it predates them).
    """
    return (
        isinstance(error, DispatcherRefused)
        and error.code == "unknown_field"
        and error.field is not None
        and _LIMIT_FIELDS.fullmatch(error.field) is not None
    )


def _refusal(status: LeaseStatus) -> str:
    """
    Why the dispatcher refused a lease, as its answer says.
    """
    return status.reason or (str(status.status) if status.status else "refused")


def _fence_error(held: HeldLease) -> str:
    """
    The error of an attempt its worker stopped at its fence.
    """
    return (
        f"stopped by its worker: no heartbeat was acknowledged for "
        f"{held.fence_seconds:.3g} s, so its lease may have run out and the "
        f"job been given to another worker"
    )


def _result_item(held: HeldLease, with_limits: bool = True) -> ResultItem:
    outcome = held.outcome
    assert outcome is not None
    item = ResultItem(
        held.job_id,
        held.lease.token,
        # A job the worker's own shutdown stopped goes back to the queue,
        # its attempt not spent.
        "released" if held.abandoned else outcome.state.value,
        outcome.exit_code,
        outcome.result,
        outcome.error,
        outcome.stopped,
    )
    if with_limits:
        if outcome.limits is not None:
            item.limits = limits_form(outcome.limits)
        if outcome.log_cut:
            item.log_cut = list(outcome.log_cut)
    return item


def _log_error(error: Exception, what: str, delay: float) -> None:
    if isinstance(error, DispatcherRefused):
        log.error(
            "the dispatcher refused {what}: {error}; trying again in {delay:.1f} s",
            what=what,
            error=error,
            delay=delay,
        )
    else:
        log.warn(
            "{what} failed: {error}; trying again in {delay:.1f} s",
            what=what,
            error=error,
            delay=delay,
        )
