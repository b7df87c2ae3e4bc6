"""
The dispatcher: one path for a job, from submission to its recorded end.

It joins the store, the event stream, the scheduler and the local executor:
the scheduler decides, the store claims and records, the executor runs.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from twisted.application.service import Service
from twisted.internet.defer import (
    Deferred,
    DeferredList,
    ensureDeferred,
    maybeDeferred,
)
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from ._events import JobEvent, JobEvents
from ._execution import LocalExecutor, RunningJob
from ._model import Job, JobIds, JobSpec, JobState, Lease, Outcome, StaleLease
from ._scheduler import Claim, Scheduler

log = Logger()

# Local leases are recovered at restart rather than by expiry, so their
# expiry only has to outlast any job; it is renewed by nothing.
LOCAL_LEASE_SECONDS = 365 * 24 * 3600.0


class Dispatcher(Service):
    """
    Accepts jobs, hands them to free capacity, and records how they end.

    @param reactor: provides C{IReactorTime}; its C{seconds()} is the time
        every record is stamped with.
    @param store: an L{IJobStore}.
    @param executor: the L{LocalExecutor} of this host.
    @param slots: how many jobs the executor runs at once (0: none).
    @param io_pool: the pool for file-system work.
    @param shutdown_grace: how long a stop waits for running jobs before
        it stops them and puts them back in the queue.
    """

    def __init__(
        self,
        reactor: Any,
        store: Any,
        executor: LocalExecutor,
        slots: int,
        io_pool: Any,
        shutdown_grace: float,
        process_killer: Any = None,
    ) -> None:
        self._reactor = reactor
        self.store = store
        self.executor = executor
        self._slots = slots
        self._io_pool = io_pool
        self._grace = shutdown_grace
        self._process_killer = process_killer
        self.events = JobEvents()
        self.scheduler = Scheduler(reactor)
        self.ids = JobIds(reactor.seconds)
        self._recorded: dict[str, Deferred] = {}
        self._accepting = False
        self.events.subscribe(self._job_changed)

    # Life cycle

    async def start(self) -> None:
        """
        Open the store, settle what a previous run left, and begin
        running queued jobs.  The daemon serves only after this.
        """
        await self.store.open()
        now = self._reactor.seconds()
        lost = await self.store.recover(self.executor.holder, now)
        for attempt in lost:
            killed = False
            if self._process_killer is not None and attempt.pid is not None:
                killed = await deferToThreadPool(
                    self._reactor,
                    self._io_pool,
                    self._process_killer,
                    attempt.pid,
                    attempt.start_ticks,
                    attempt.boot_id,
                )
            log.warn(
                "job {job_id} attempt {attempt} was running when the dispatcher "
                "stopped; recorded as lost (its leftover processes "
                "{what})",
                job_id=attempt.job_id,
                attempt=attempt.attempt,
                what="were killed" if killed else "were gone",
            )
        counts = await self.store.count_by_state()
        self.scheduler.jobs_queued(counts[JobState.QUEUED])
        self.scheduler.add_holder(self.executor.holder, self._slots)
        self._accepting = True
        self._pump()

    def stopService(self) -> Deferred:
        Service.stopService(self)
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
        self._accepting = False
        self.scheduler.remove_holder(self.executor.holder)
        if self._recorded:
            log.info(
                "waiting up to {grace} s for {count} running jobs",
                grace=self._grace,
                count=len(self._recorded),
            )
            all_recorded = DeferredList(list(self._recorded.values()))
            timer = Deferred()
            call = self._reactor.callLater(self._grace, timer.callback, None)
            await DeferredList([all_recorded, timer], fireOnOneCallback=True)
            if call.active():
                call.cancel()
        if self._recorded:
            log.warn(
                "stopping {count} jobs still running after the grace period; "
                "they go back to the queue",
                count=len(self._recorded),
            )
            waits = []
            for running in list(self.executor.running.values()):
                running.interrupted = True
                if running.context is not None:
                    # A task thread cannot be killed: give its lease back
                    # now, and let its late result fall on a stale lease.
                    running.context.cancel()
                    waits.append(self._release(running))
                else:
                    self.executor.stop(running.lease.job_id)
            waits.extend(self._recorded.values())
            await DeferredList(waits)
        await self.store.close()

    # What the API asks

    def submit(self, specs: Sequence[JobSpec]) -> Deferred:
        """
        Store new jobs; fires with them once they are durable.
        """
        now = self._reactor.seconds()
        ids = [self.ids.new() for _ in specs]
        d = self.store.submit(list(specs), now, ids)

        def stored(jobs: list[Job]) -> list[Job]:
            for job in jobs:
                self.events.publish_job(job)
            return jobs

        return d.addCallback(stored)

    def get(self, job_id: str) -> Deferred:
        return self.store.get(job_id)

    def list_jobs(self, **kwargs: Any) -> Deferred:
        return self.store.list_jobs(**kwargs)

    async def cancel(self, job_id: str) -> tuple[Job, bool]:
        """
        Cancel a job; returns the job and whether it is already cancelled
        (C{False}: its holder is stopping it now).
        """
        job, lease = await self.store.cancel(job_id, self._reactor.seconds())
        if lease is None:
            self.events.publish_job(job)
            return job, True
        if lease.holder == self.executor.holder:
            self.executor.stop(job_id)
        return job, False

    def log_path(self, job: Job, stream: str) -> Optional[str]:
        """
        The file of one stream of the job's latest attempt, if it has one.
        """
        if not job.attempts:
            return None
        return self.executor.log_path(job.id, job.attempts[-1].number, stream)

    # The one path

    def _job_changed(self, event: JobEvent) -> None:
        if event.state is JobState.QUEUED:
            self.scheduler.jobs_queued(1)
            self._pump()

    def _pump(self) -> None:
        if not self._accepting:
            return
        for claim in self.scheduler.next_claims():
            d = self.store.claim(
                claim.holder, claim.count, claim.now, LOCAL_LEASE_SECONDS
            )
            d.addCallbacks(
                self._claimed,
                self._claim_failed,
                callbackArgs=(claim,),
                errbackArgs=(claim,),
            )

    def _claim_failed(self, failure: Failure, claim: Claim) -> None:
        log.failure("claiming jobs failed", failure)
        self.scheduler.claim_failed(claim)

    def _claimed(self, leases: list[Lease], claim: Claim) -> None:
        self.scheduler.claimed(claim, len(leases))
        for lease in leases:
            state = JobState.STAGING if lease.spec.inputs else JobState.RUNNING
            self.events.publish(JobEvent(lease.job_id, state))
            self._run(lease)

    def _run(self, lease: Lease) -> None:
        recorded: Deferred = Deferred()
        self._recorded[lease.job_id] = recorded

        def mark_running(lease: Lease) -> Deferred:
            d = self.store.mark_running(lease, self._reactor.seconds())
            return d.addCallback(
                lambda _: self.events.publish(JobEvent(lease.job_id, JobState.RUNNING))
            )

        def record_process(lease: Lease, process: Any) -> Deferred:
            return self.store.record_process(
                lease, process.pid, process.start_ticks, process.boot_id
            )

        running = self.executor.run(lease, mark_running, record_process)
        running.done.addCallback(self._ended, running)

    def _ended(self, outcome: Outcome, running: RunningJob) -> Deferred:
        lease = running.lease
        if lease.job_id not in self._recorded:
            # Released at shutdown while its thread still ran.
            return maybeDeferred(lambda: None)
        if running.interrupted:
            return self._release(running)
        d = self.store.finish(lease, outcome, self._reactor.seconds())
        return self._after_record(d, running)

    def _release(self, running: RunningJob) -> Deferred:
        d = self.store.release(
            running.lease,
            self._reactor.seconds(),
            "stopped by the dispatcher's shutdown; the job goes back to the queue",
        )
        return self._after_record(d, running)

    def _after_record(self, d: Deferred, running: RunningJob) -> Deferred:
        lease = running.lease
        recorded = self._recorded.pop(lease.job_id, None)

        def done(job: Job) -> None:
            self.events.publish_job(job)

        def failed(failure: Failure) -> None:
            if failure.check(StaleLease):
                log.info(
                    "job {job_id} attempt {attempt} ended on a lease that is no "
                    "longer current; its result is dropped",
                    job_id=lease.job_id,
                    attempt=lease.attempt,
                )
            else:
                log.failure("recording the end of job {job_id} failed", failure,
                            job_id=lease.job_id)

        def finally_(_: Any) -> None:
            self.scheduler.slots_freed(lease.holder)
            if recorded is not None:
                recorded.callback(None)
            self._pump()

        return d.addCallbacks(done, failed).addBoth(finally_)

