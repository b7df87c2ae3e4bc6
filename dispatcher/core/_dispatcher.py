"""
The dispatcher: one path for a job, from submission to its recorded end.

It joins the store, the event stream, the scheduler, the recorder, the
local executor and the worker hub: the scheduler decides, the store claims,
the executor (or a worker) runs, and the recorder writes how each attempt
ended, again and again if a commit fails, before anything acts on it.
Time comes from an injected clock: pending jobs wake on it, timeouts and
back-offs run on it.
"""

from __future__ import annotations

import operator
from typing import Any, Callable, Mapping, Optional, Sequence

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from dispatcher._deferreds import shielded
from dispatcher.core._events import JobEvent, JobEvents
from dispatcher.model._events import SameChange
from dispatcher.core._waits import MAX_WAITS, Waits
from dispatcher.execution._executor import LocalExecutor, RunningJob
from dispatcher.execution._host import detect_resources
from dispatcher.execution._job_dirs import JobDirectories
from dispatcher.model._groups import GroupKind, JobGroup
from dispatcher.model._routing import Routing
from dispatcher.model._jobs import (
    Job,
    JobIds,
    JobState,
    Lease,
    Offer,
    Outcome,
    PlainJobs,
    Resources,
    StoreClosed,
)
from dispatcher.core._capacity import free_resources
from dispatcher.core._reasons import explainer
from dispatcher.core._recorder import Recorder
from dispatcher.core._retention import EVENTS_RETENTION, Retention, RetentionPolicy
from dispatcher.core._scheduler import Claim, Scheduler
from dispatcher.store._results import (
    Claimed,
    CommitFailed,
    ReadFailed,
    IdempotencyKey,
    Submitted,
    Written,
)
from dispatcher.wire._submission import Submission
from dispatcher.core._hub import MAX_NAMES, MAX_NAMES_PER_CREDENTIAL, WorkerHub
from dispatcher.core._lease_keeper import LeaseKeeper

log = Logger()

# On a store of its own, local leases are recovered at restart rather than
# by expiry, so their expiry only has to outlast any job; it is renewed by
# nothing.  (On a database shared with other dispatchers they expire:
# L{LeaseKeeper}.)
LOCAL_LEASE_SECONDS = 365 * 24 * 3600.0

# The longest a local job's end waits for the ends of the others running
# beside it, so that they are recorded together (see Dispatcher._ended).
END_GATHER = 0.001

# How often forgotten idempotency keys are purged.
PURGE_INTERVAL = 3600.0

_LEASE = operator.attrgetter("lease")
# The states of a job a holder has: one that leaves them frees a place
# under its queue's limit.
_HELD = (JobState.RUNNING, JobState.STAGING)


class Dispatcher(Service):
    """
    Accepts jobs, hands them to free capacity, and records how they end.

    @param reactor: the reactor the store's threads report to.
    @param store: an L{IJobStore}.
    @param executor: the L{LocalExecutor} of this host.
    @param slots: how many jobs the executor runs at once (0: none).
    @param io_pool: the pool for file-system work.
    @param shutdown_grace: how long a stop waits for running jobs before
        it stops them and puts them back in the queue.
    @param process_killer: C{(pid, start_ticks, boot_id) -> bool}, run on
        C{io_pool} at start-up for each attempt lost in a crash.
    @param clock: the C{IReactorTime} every record is stamped with and
        every wait runs on; the reactor by default.
    @param resources: what the local executor offers jobs that ask for
        resources; this host's, detected, by default.
    @param tasks: the task names the local executor knows (C{None}: any).
    @param lease_seconds: how long a remote worker's lease lives without a
        heartbeat.
    @param fence_margin: how long before its lease runs out a worker that
        hears nothing has stopped the job (C{None}: the default).
    @param last_attempt_grace: how much longer a job's last attempt waits
        for its silent worker's result (C{None}: the default).
    @param max_worker_names_per_credential: how many worker names one
        credential may have connected at once.
    @param max_worker_names: how many worker names may be connected at
        once in all.
    @param retention: how long finished jobs are kept (the
        L{RetentionPolicy}; none: for ever).
    @param events_retention: seconds events are kept (none: for ever).
    @param max_waits: how many requests may wait for a job or a group to
        be final at once (L{Waits}).
    @param shared_lease_seconds: on a database shared with other
        dispatchers (PostgreSQL), the life of a local lease, which a
        L{LeaseKeeper} renews; C{None} (a store of its own): local leases
        never expire, and a start recovers what the last run left.
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
        clock: Any = None,
        resources: Optional[Resources] = None,
        tasks: Optional[frozenset[str]] = None,
        lease_seconds: float = 30.0,
        fence_margin: Optional[float] = None,
        last_attempt_grace: Optional[float] = None,
        max_worker_names_per_credential: int = MAX_NAMES_PER_CREDENTIAL,
        max_worker_names: int = MAX_NAMES,
        retention: Optional[RetentionPolicy] = None,
        events_retention: Optional[float] = EVENTS_RETENTION,
        max_waits: int = MAX_WAITS,
        shared_lease_seconds: Optional[float] = None,
    ) -> None:
        self._reactor = reactor
        self._clock = clock if clock is not None else reactor
        self.store = store
        self.executor = executor
        self._slots = slots
        self._io_pool = io_pool
        self._grace = shutdown_grace
        self._process_killer = process_killer
        self.events = JobEvents()
        # Told of each claim's first attempts' waits since submission (the
        # metrics'): C{(queue, seconds)} each.
        self.observe_claimed: Optional[Callable[[Sequence[tuple[str, float]]], None]] = None
        self.scheduler = Scheduler(self._clock)
        self.ids = JobIds(self._clock.seconds)
        # Local jobs running, until their end (or release) goes to the
        # recorder; those ends not yet committed; who waits for all.
        self._running: set[str] = set()
        self._recording = 0
        self._recorded_waiters: list[Deferred] = []
        # Local jobs that have ended, with when, waiting to be recorded
        # together; and the timer that records them at the latest.
        self._ending: list[tuple[Outcome, RunningJob, float]] = []
        self._ending_call: Any = None
        self.end_gather = END_GATHER
        # A failed commit of an end is written again when the store says
        # the commit failed (its disk, its database), not the write.
        self.recorder = Recorder(store, self._clock, self._apply, (CommitFailed,))
        self._local_explainer: Optional[tuple[Any, Callable[[Job], Job]]] = None
        self._accepting = False
        # The stop's wait for running jobs, and whether it is cut short.
        self._grace_timer: Optional[Deferred] = None
        self._grace_ended = False
        self._wake_call: Any = None
        self._purge_call: Any = None
        self._claims: set[Deferred] = set()
        self._releases: list[Deferred] = []
        self._resources = resources if resources is not None else detect_resources()
        self._tasks = tasks
        # Holder names of earlier runs (another [dispatcher] name) whose
        # jobs a start recovers too.
        self.former_holders: Sequence[str] = ()
        self.lease_keeper: Optional[LeaseKeeper] = None
        self._local_lease_seconds = LOCAL_LEASE_SECONDS
        if shared_lease_seconds is not None:
            self._local_lease_seconds = shared_lease_seconds
            self.lease_keeper = LeaseKeeper(
                store,
                self._clock,
                shared_lease_seconds,
                lambda: self.executor.holder,
                lambda: [remote.lease.token for remote in self.hub.leases.values()],
                self._fence,
                self._unfence,
                self._lost_leases,
                self._leases_recovered,
                remote_seconds=lease_seconds,
                returned=lambda: self.recorder.write_waiting_now(),
            )
        self.hub = WorkerHub(
            self.scheduler,
            self._clock,
            lease_seconds,
            self.recorder,
            self.capacity_changed,
            fence_margin,
            last_attempt_grace,
            max_worker_names_per_credential,
            max_worker_names,
            presence=self._worker_presence,
            adopt=self._adopt_leases if self.lease_keeper is not None else None,
            server=(lambda: self.executor.holder) if self.lease_keeper is not None else None,
        )
        self.events.follow(self._jobs_changed)
        # Every commit's events, with their ids, as the store commits them
        # (before its writes are answered): the one publication of every
        # change, in id order.
        store.follow_events(self.events.publish_committed)
        # And those of other dispatchers on the same store, in their place.
        store.follow_others(self._others_committed)
        # And their clients' cancels of the jobs held here.
        store.follow_cancels(self._cancels_maybe)
        self._reading_due = False
        self._reading_cancels = False
        self.waits = Waits(self.events, store, self._clock, max_waits)
        self.retention = Retention(
            store,
            JobDirectories(executor.jobs_dir),
            reactor,
            io_pool,
            self._clock,
            retention if retention is not None else RetentionPolicy(),
            events_age=events_retention,
        )

    @property
    def local_offer(self) -> Offer:
        """
        What the local executor offers, under its holder name (which start-up
        may read from the data directory).
        """
        offer = Offer(self.executor.holder, self._slots, self._resources, {}, self._tasks)
        return self.routing.local(offer)

    @property
    def routing(self) -> Routing:
        """
        Which holders take which queues' jobs (L{Routing}).
        """
        return self.hub.routing

    def set_routing(self, routing: Routing) -> None:
        """
        Take C{routing} from the next claim on (at start, and at a reload
        that changed a queue's backend), and claim what it lets start now.
        """
        self.hub.routing = routing
        for worker in self.hub.workers.values():
            worker.offer = routing.remote(worker.offer, worker.credential)
        self._local_explainer = None
        self.scheduler.queues_changed()
        self._pump()

    # Life cycle

    async def start(self) -> None:
        """
        Open the store, settle what a previous run left, and begin
        running queued jobs.  The daemon serves only after this.
        """
        moved = await deferToThreadPool(
            self._reactor, self._io_pool, self.executor.move_old_job_dirs
        )
        if moved:
            log.info(
                "moved {count} job directories from jobs/<time>/ to the spread "
                "layout jobs/<time>/<time>/<time>/<random>/ (once)",
                count=moved,
            )
        await self.store.open()
        written = await self.store.recover(self.executor.holder, self._clock.seconds())
        for former in self.former_holders:
            more = await self.store.recover(former, self._clock.seconds())
            written = Written(
                list(written.value) + list(more.value),
                tuple(written.changed) + tuple(more.changed),
                min((w for w in (written.wake_at, more.wake_at) if w is not None),
                    default=None),
            )
        for attempt in written.value:
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
                "stopped; recorded as lost (its leftover processes {what})",
                job_id=attempt.job_id,
                attempt=attempt.attempt,
                what="were killed" if killed else "were gone",
            )
        if self.lease_keeper is None:
            resumed = await self.store.resume_leases(
                self.executor.holder, self._clock.seconds(), self.hub.lease_seconds
            )
            self.hub.resume(resumed.value)
        # (On a shared database the workers' leases are taken up as their
        # workers call, here or after a move from another dispatcher:
        # WorkerHub.take_up.)
        counts = await self.store.count_by_state()
        self.scheduler.jobs_queued(counts[JobState.QUEUED])
        for queue, waiting in sorted((await self.store.unconfigured_queues()).items()):
            log.warn(
                "{count} jobs wait in queue {queue}, which the configuration "
                "no longer names: they run once [queue:{queue}] is back",
                count=waiting,
                queue=queue,
            )
        self.scheduler.add_holder(self.executor.holder, self._slots)
        self.recorder.start()
        self.hub.accepting = True
        self._accepting = True
        self._schedule_wake(await self.store.next_due())
        self._purge_call = self._clock.callLater(PURGE_INTERVAL, self._purge)
        self.retention.start()
        if self.lease_keeper is not None:
            self.lease_keeper.start()
        self._apply(written)
        self._pump()

    def stopService(self) -> Deferred:
        Service.stopService(self)
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
        self._accepting = False
        # A request waiting for a job hears now that the dispatcher stops.
        self.waits.stop()
        # Ends waiting for company are recorded now; ends waiting to be
        # written again after a failed commit are given up.
        self._record_ends()
        self.recorder.stop()
        # A removal pass under way ends after its step; waited for before
        # the store closes.
        retention_stopped = self.retention.stop()
        for call in (self._wake_call, self._purge_call):
            if call is not None and call.active():
                call.cancel()
        self.scheduler.remove_holder(self.executor.holder)
        # Claims already asked for commit before anything else: their jobs
        # either start (and get the grace period) or go straight back.
        # Remote workers' leases stay live: a restart resumes them.
        await DeferredList(list(self._claims), consumeErrors=True)
        await self.hub.stop()
        await DeferredList(self._releases, consumeErrors=True)
        if self._running and not self._grace_ended:
            log.info(
                "waiting up to {grace} s for {count} running jobs",
                grace=self._grace,
                count=len(self._running),
            )
            timer = self._grace_timer = Deferred()
            call = self._clock.callLater(self._grace, timer.callback, None)
            await DeferredList([self._all_recorded(), timer], fireOnOneCallback=True)
            self._grace_timer = None
            if call.active():
                call.cancel()
        if self._running:
            log.warn(
                "stopping {count} jobs still running after the grace period; "
                "they go back to the queue",
                count=len(self._running),
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
            waits.append(self._all_recorded())
            await DeferredList(waits)
        await retention_stopped
        if self.lease_keeper is not None:
            await self.lease_keeper.stop()
        await self.store.close()

    def end_grace(self) -> None:
        """
        Stop waiting for running jobs now (a second SIGTERM): a stop under
        way, or the next one, stops them at once and puts them back in the
        queue, their attempts not counted, as at the end of the grace
        period.
        """
        self._grace_ended = True
        timer = self._grace_timer
        if timer is not None and not timer.called:
            timer.callback(None)

    # What the API asks

    def submit(
        self,
        submissions: Sequence[Submission],
        idempotency: Optional[IdempotencyKey] = None,
        explain: bool = True,
        owner: Optional[str] = None,
        sees_all: bool = True,
        max_unfinished: Optional[int] = None,
    ) -> Deferred:
        """
        Store the jobs of one request, all or nothing, owned by C{owner};
        an array becomes its members, and batch indexes in C{depends_on}
        become ids.  Fires with the L{Submitted} jobs once they are
        durable, their wait reasons as the holders connected now see them
        unless C{explain} is false (an answer that shows no wait reason
        need not pay for them).  Unless C{sees_all}, C{depends_on} may name
        only C{owner}'s jobs; C{max_unfinished} bounds C{owner}'s
        unfinished jobs (see L{IJobStore.submit}).
        """
        specs = []
        ids = []
        names: list[str] = []
        for submission in submissions:
            spec = submission.spec
            if submission.batch_dependencies:
                depends = list(spec.depends_on)
                for position, index in submission.batch_dependencies:
                    depends[position] = names[index]
                spec = attrs.evolve(spec, depends_on=tuple(depends))
            if submission.array is None:
                job_id = self.ids.new()
                specs.append(spec)
                ids.append(job_id)
                names.append(job_id)
            else:
                array_id = self.ids.new()
                for index in range(submission.array):
                    specs.append(attrs.evolve(spec, array_id=array_id, array_index=index))
                    ids.append(self.ids.new())
                names.append(array_id)
        d = self.store.submit(
            specs, self._clock.seconds(), ids, idempotency, owner, sees_all, max_unfinished
        )
        ready = sum(1 for spec in specs if not spec.depends_on and spec.not_before is None)
        if ready:
            # Claim for them now: the claim joins the submission's commit
            # and runs after it in the same transaction, so a job meant
            # for a free slot starts one commit sooner.  They are counted
            # again when the commit reports them queued; the scheduler's
            # count may be high, never low, and a claim that comes back
            # short sets it right.
            self.scheduler.jobs_queued(ready)
            self._pump()
        return shielded(d.addCallback(self._submitted, explain))

    def submit_plain(
        self,
        jobs: PlainJobs,
        idempotency: Optional[IdempotencyKey] = None,
        owner: Optional[str] = None,
        max_unfinished: Optional[int] = None,
    ) -> Deferred:
        """
        Store L{PlainJobs}, all or nothing, owned by C{owner}; fires with
        their L{dispatcher.store._results.SubmittedIds} once they are
        durable (or with the L{Submitted} jobs of an earlier request of the
        same owner with the same idempotency key).  C{max_unfinished} is as
        for L{submit}.
        """
        ids = self.ids.new_many(len(jobs))
        d = self.store.submit_plain(
            jobs, self._clock.seconds(), ids, idempotency, owner, max_unfinished
        )
        # Claimed for at once, as submit() does.
        self.scheduler.jobs_queued(len(ids))
        self._pump()
        return shielded(d.addCallback(self._submitted, False))

    def _submitted(self, written: Written, explain_jobs: bool = True) -> Any:
        self._apply(written)
        value = written.value
        if not explain_jobs:
            return value
        explain = self._explainer()
        if isinstance(value, Submitted):
            jobs = [explain(job) for job in value.jobs]
            if all(map(operator.is_, jobs, value.jobs)):
                return value
            return Submitted(jobs, value.replayed)
        return explain(value)

    def get(self, job_id: str) -> Deferred:
        return self.store.get(job_id).addCallback(self._explainer())

    def list_jobs(self, **kwargs: Any) -> Deferred:
        def explained(page: tuple[list[Job], Any]) -> tuple[list[Job], Any]:
            jobs, cursor = page
            explain = self._explainer()
            return [explain(job) for job in jobs], cursor

        return self.store.list_jobs(**kwargs).addCallback(explained)

    def _explainer(self) -> Callable[[Job], Job]:
        """
        A function that gives a queued job that no holder could ever take a
        wait reason saying so, and a running job whose end waits to be
        written (L{Recorder.unrecorded}) one saying that; the holders are
        looked at once, and jobs
        that need the same are judged once.  While no remote worker has
        ever called, the holders are this host alone, and one function
        serves every call (making it was a twentieth of a single
        submission's time on the reactor thread).
        """
        if not self.hub.workers:
            key = (self.executor.holder, self._slots)
            if self._local_explainer is None or self._local_explainer[0] != key:
                self._local_explainer = (key, self._make_explainer([]))
            explain = self._local_explainer[1]
        else:
            offer = self.hub.offer
            explain = self._make_explainer(
                [offer(worker.offer.holder) or worker.offer for worker in self.hub.connected()]
            )
        # Running jobs the store cannot tell about: an end whose commit
        # failed (a full disk) and is written again, and a last attempt
        # that waits for its silent worker.  By job id: attempt, reason.
        unrecorded = self.recorder.unrecorded
        silent = self.hub.silent()
        if not unrecorded and not silent:
            return explain
        waits = dict(silent)
        waits.update(
            (job_id, (waiting.attempt, waiting.wait_reason))
            for job_id, waiting in unrecorded.items()
        )

        def running_wait(job: Job) -> Job:
            waiting = waits.get(job.id)
            if (
                waiting is not None
                and job.state in (JobState.RUNNING, JobState.STAGING)
                and job.attempts
                and job.attempts[-1].number == waiting[0]
            ):
                return job.waiting(waiting[1])
            return explain(job)

        return running_wait

    def _make_explainer(self, remote: list[Offer]) -> Callable[[Job], Job]:
        offers = ([self.local_offer] if self._slots > 0 else []) + remote
        routing = self.routing
        return explainer(
            offers, self.store.queue_limits, routing.backends, shapes=routing.shapes,
            direct=routing.direct,
        )

    def cancel(self, job_id: str, owner: Optional[str] = None) -> Deferred:
        """
        Cancel a job; fires with the job and whether it is already cancelled
        (C{False}: its holder is stopping it now).  Given C{owner}, a job
        of another owner fails with L{UnknownJob}, as a missing one does.
        """
        d = self.store.cancel(job_id, self._clock.seconds(), owner)

        def cancelled(written: Written) -> tuple[Job, bool]:
            self._apply(written)
            job, lease = written.value
            if lease is None:
                return job, True
            self._stop_held(lease)
            return job, False

        return shielded(d.addCallback(cancelled))

    def _stop_held(self, lease: Lease) -> None:
        """
        Have the holder of C{lease} stop its job, whose cancel is stored.
        """
        if lease.holder == self.executor.holder:
            self.executor.stop(lease.job_id)
        else:
            # (A holder of another dispatcher on the store hears of it from
            # there: IJobStore.follow_cancels.)
            self.hub.cancel_requested(lease.job_id)

    def _stop_held_here(self, job_id: str) -> None:
        """
        Have this dispatcher's holder of C{job_id} (the local executor or a
        worker) stop it: its attempt was ended elsewhere.
        """
        if job_id in self.executor.running:
            self.executor.stop(job_id)
        else:
            self.hub.cancel_requested(job_id)

    def retry(
        self,
        job_id: str,
        dependents: bool,
        owner: Optional[str] = None,
        max_unfinished: Optional[int] = None,
    ) -> Deferred:
        """
        Put a failed or cancelled job back in line with a fresh budget.
        Given C{owner}, a job of another owner fails with L{UnknownJob}, and
        only C{owner}'s dependents come back with it; given
        C{max_unfinished}, only while the job's owner then has at most that
        many unfinished jobs.
        """
        d = self.store.retry(
            job_id, self._clock.seconds(), dependents, owner, max_unfinished
        )
        return shielded(d.addCallback(self._submitted))

    # Arrays and batches

    def group(self, kind: GroupKind, group_id: str) -> Deferred:
        """
        Fire with the L{JobGroup} of an array or a batch, or fail with
        L{UnknownGroup}.
        """
        return self.store.group(kind, group_id)

    def cancel_group(
        self, kind: GroupKind, group_id: str, owner: Optional[str] = None
    ) -> Deferred:
        """
        Cancel every unfinished member of an array or a batch, in one
        write; fires with the L{JobGroup} and whether every member it
        cancelled is cancelled already (C{False}: some ran, and their
        holders are stopping them now).  Given C{owner}, another owner's
        group fails with L{UnknownGroup}, as a missing one does.
        """
        d = self.store.cancel_group(kind, group_id, self._clock.seconds(), owner)

        def cancelled(written: Written) -> tuple[JobGroup, bool]:
            self._apply(written)
            group, leases = written.value
            for lease in leases:
                self._stop_held(lease)
            return group, not leases

        return shielded(d.addCallback(cancelled))

    def retry_group(
        self,
        kind: GroupKind,
        group_id: str,
        owner: Optional[str] = None,
        max_unfinished: Optional[int] = None,
    ) -> Deferred:
        """
        Put every failed or cancelled member of an array or a batch back in
        line, in one write; fires with the L{JobGroup}.  C{owner} and
        C{max_unfinished} are as for L{retry}, every member coming back
        counted.
        """
        d = self.store.retry_group(
            kind, group_id, self._clock.seconds(), owner, max_unfinished
        )

        def retried(written: Written) -> JobGroup:
            self._apply(written)
            return written.value

        return shielded(d.addCallback(retried))

    def wait_for_job(self, job_id: str, seconds: float) -> Deferred:
        """
        Fire with the job C{job_id} once it is final, or as it is after
        C{seconds} (see L{Waits.job}).
        """
        d = Deferred.fromCoroutine(self.waits.job(job_id, seconds))
        return d.addCallback(lambda job: self._explainer()(job))

    def wait_for_group(self, kind: GroupKind, group_id: str, seconds: float) -> Deferred:
        """
        Fire with the L{JobGroup} of an array or a batch once every member
        is final, or as it is after C{seconds} (see L{Waits.group}).
        """
        return Deferred.fromCoroutine(self.waits.group(kind, group_id, seconds))

    def remove(self, job_id: str, owner: Optional[str] = None) -> Deferred:
        """
        Remove a finished job now, with its attempts, logs and working
        directory; fires with its id once they are gone.  Given C{owner},
        a job of another owner fails with L{UnknownJob}, as a missing one
        does (see L{IJobStore.remove} for the other refusals).
        """
        return shielded(self.retention.remove(job_id, owner))

    async def queues(self, owner: Optional[str] = None) -> dict[str, Any]:
        """
        Per queue: jobs by state, and running jobs against the limit; only
        C{owner}'s jobs, if it is given.
        """
        counts = await self.store.queue_counts(owner)
        limits = self.store.queue_limits
        out = {}
        for queue, states in sorted(counts.items()):
            running = states[JobState.RUNNING] + states[JobState.STAGING]
            out[queue] = {
                "counts": {state.value: n for state, n in states.items()},
                "running": running,
                "max_running": limits.get(queue) or None,
            }
        return out

    def log_path(self, job: Job, stream: str) -> Optional[str]:
        """
        The file of one stream of the job's latest attempt, if it has one.
        """
        if not job.attempts:
            return None
        return self.executor.log_path(job.id, job.attempts[-1].number, stream)

    # The one path

    def _apply(self, written: Written) -> None:
        """
        Claim for what a write queued, and wake up when the next pending job
        it touched becomes due.  (Its events were published as it
        committed: L{IJobStore.follow_events}.)
        """
        # One pump for the whole write, not one per job it queued (a batch
        # queues thousands): every queued event comes through here.
        if any(change[1] is JobState.QUEUED for change in written.changed):
            self._pump()
        self._schedule_wake(written.wake_at)

    def _schedule_wake(self, when: Optional[float]) -> None:
        if when is None or not self._accepting:
            return
        if self._wake_call is not None and self._wake_call.active():
            if self._wake_call.getTime() <= when:
                return
            self._wake_call.cancel()
        delay = max(0.0, when - self._clock.seconds())
        self._wake_call = self._clock.callLater(delay, self._wake)

    def _wake(self) -> None:
        d = self.store.promote_due(self._clock.seconds())

        def failed(failure: Failure) -> None:
            if failure.check(StoreClosed):
                return
            if not failure.check(CommitFailed):
                # A failed commit the store logs itself, once a minute.
                log.failure("waking due jobs failed; trying again in 5 s", failure)
            self._schedule_wake(self._clock.seconds() + 5.0)

        d.addCallbacks(self._apply, failed)

    def _purge(self) -> None:
        d = self.store.purge_idempotency(self._clock.seconds())
        d.addErrback(lambda f: log.failure("purging idempotency keys failed", f))
        if self._accepting:
            self._purge_call = self._clock.callLater(PURGE_INTERVAL, self._purge)

    async def set_queue_limits(self, queues: Mapping[str, int]) -> None:
        """
        Take new queue limits (a reload of the configuration) from the
        next claim on, and claim what they let start now.
        """
        await self.store.set_queue_limits(queues)
        self.scheduler.queues_changed()
        self._pump()

    # A database shared with other dispatchers (see LeaseKeeper)

    @property
    def store_trouble(self) -> Optional[str]:
        """
        Why the store cannot serve now (its database cannot be reached), or
        C{None}: the API answers requests that need the store C{503
        store_unavailable} meanwhile.
        """
        keeper = self.lease_keeper
        return None if keeper is None else keeper.trouble

    def _adopt_leases(self, holder: Optional[str], items: list[tuple[str, int]]) -> Deferred:
        """
        Take up from the shared store the live leases of C{items} that the
        worker C{holder} holds, for this dispatcher: renewed as long as its
        others are (L{LeaseKeeper.remote_seconds}).
        """
        assert self.lease_keeper is not None
        return self.store.adopt_leases(
            holder, items, self.executor.holder, self._clock.seconds(),
            self.lease_keeper.remote_seconds,
        )

    def _fence(self, why: str) -> None:
        """
        This dispatcher could not renew its leases for half a lease: kill
        every local job now, before another dispatcher may take it, and
        claim nothing for this host until a renewal lands.  Each job goes
        back to the queue unspent once the store answers (or is found
        recovered elsewhere by then, and its release changes nothing).
        """
        holder = self.executor.holder
        running = list(self.executor.running.values())
        log.error(
            "fenced: {why}; stopping {count} local jobs and claiming none until "
            "the store answers again",
            why=why,
            count=len(running),
        )
        self.scheduler.remove_holder(holder)
        self._stop_local(running)

    def _stop_local(self, running: Sequence[RunningJob]) -> None:
        for job in running:
            job.interrupted = True
            if job.context is not None:
                # A task thread cannot be killed: its lease is given back,
                # its late result falls on a stale lease.
                job.context.cancel()
                self._release(job)
            else:
                self.executor.stop(job.lease.job_id, grace=0.0)

    def _unfence(self) -> None:
        holder = self.executor.holder
        log.info("a lease renewal landed: this dispatcher runs jobs again")
        # Slots held by jobs whose ends (or releases) are not recorded yet
        # come back as they are.
        self.scheduler.add_holder(
            holder, max(0, self._slots - len(self._running) - self._recording)
        )
        self._pump()

    def _lost_leases(self, held: frozenset) -> None:
        """
        A renewal found which of this host's leases the store still gives
        it: a local job whose lease is gone (recovered by another
        dispatcher after it expired) is stopped.
        """
        lost = [
            job
            for job in self.executor.running.values()
            if job.lease.token not in held and not job.interrupted
            and job.lease.job_id in self._running
        ]
        if lost:
            log.error(
                "{count} local jobs lost their leases to another dispatcher "
                "(their leases expired); stopping them",
                count=len(lost),
            )
            self._stop_local(lost)

    def _leases_recovered(self, written: Written) -> None:
        # Each job's line comes from its event (the job log); this one says
        # whose leases they were.
        holders = sorted({expired.holder for expired in written.value})
        log.warn(
            "recorded {count} attempts lost whose leases expired without being "
            "renewed, of {holders}",
            count=len(written.value),
            holders=", ".join(holders),
        )
        self._apply(written)

    def capacity_changed(self) -> None:
        """
        A holder's free capacity changed (a slot freed, a worker asked for
        work): claim queued jobs for every holder that has room now.
        """
        self._pump()

    def _worker_presence(self, name: str, change: str) -> None:
        """
        A remote worker connected or left: store it as an event (published
        as it commits).
        """
        d = self.store.record_presence(name, change, self._clock.seconds())

        def failed(failure: Failure) -> None:
            if not failure.check(StoreClosed, CommitFailed):
                # A failed commit (a full disk) the store logs itself.
                log.failure("recording that worker {name} {change} failed", failure,
                            name=name, change=change)

        d.addCallbacks(lambda _: None, failed)

    def _jobs_changed(self, events: Sequence[Any]) -> None:
        """
        The events of one committed write: count the jobs it queued for
        the scheduler (L{_apply}, which runs after, pumps once for them).
        """
        if type(events) is SameChange:
            # A batch's jobs, all new and queued: counted at once.
            if events.state is JobState.QUEUED:
                self.scheduler.jobs_queued(len(events))
            return
        queued = 0
        for event in events:
            if type(event) is JobEvent and event.state is JobState.QUEUED:
                queued += 1
        if queued:
            self.scheduler.jobs_queued(queued)

    def _others_committed(self, events: Sequence[Any]) -> None:
        """
        Events other dispatchers on the store committed: publish them, and
        claim what they queued (or what a queue's limit let go when their
        jobs ended); a job they made pending is woken when due here too
        (its dispatcher may be gone by then).
        """
        self.events.publish_others(events)
        queued = 0
        ended = pending = False
        running = self.executor.running
        leases = self.hub.leases
        for event in events:
            if type(event) is not JobEvent:
                continue
            state = event.state
            if state is JobState.QUEUED:
                queued += 1
            elif state is JobState.PENDING:
                pending = True
            if event.previous in _HELD:
                ended = True
                job_id = event.job_id
                if state not in _HELD and (job_id in running or job_id in leases):
                    # Another dispatcher ended an attempt held here (a
                    # client's cancel there): its holder stops it.  (Every
                    # event before this one's id was published before, so
                    # the attempt it ended is the one held here.)
                    self._stop_held_here(job_id)
        if queued:
            self.scheduler.jobs_queued(queued)
        if ended:
            self.scheduler.ended_elsewhere()
        if pending:
            self._read_next_due()
        self._pump()

    def _cancels_maybe(self) -> None:
        """
        Another dispatcher may have stored a client's cancel of a job held
        here: read which of them, and have their holders stop them.
        """
        if self._reading_cancels or not self._accepting:
            return
        running = self.executor.running
        held = [job_id for job_id, job in running.items() if not job.stopping]
        held.extend(job_id for job_id, lease in self.hub.leases.items() if not lease.cancel)
        if not held:
            return
        self._reading_cancels = True

        def read(asked: list[str]) -> None:
            self._reading_cancels = False
            for job_id in asked:
                self._stop_held_here(job_id)

        def failed(failure: Failure) -> None:
            # Asked again at the next poll.
            self._reading_cancels = False
            if not failure.check(StoreClosed, ReadFailed):
                log.failure("reading the cancels asked of held jobs failed", failure)

        self.store.cancels_asked(held).addCallbacks(read, failed)

    def _read_next_due(self) -> None:
        if self._reading_due or not self._accepting:
            return
        self._reading_due = True

        def read(when: Optional[float]) -> None:
            self._reading_due = False
            self._schedule_wake(when)

        def failed(failure: Failure) -> None:
            self._reading_due = False
            if not failure.check(StoreClosed):
                log.failure("reading when the next pending job is due failed", failure)

        self.store.next_due().addCallbacks(read, failed)

    def _pump(self) -> None:
        if not self._accepting:
            return
        for claim in self.scheduler.next_claims():
            if claim.holder == self.executor.holder:
                offer = self.local_offer
                running = self.executor.running
                # (Claims mostly come as the last jobs have ended: nothing
                # held, nothing to add up.)
                free = (
                    free_resources(offer.resources, map(_LEASE, running.values()))
                    if running
                    else offer.resources
                )
                if self.lease_keeper is not None and self.lease_keeper.fenced:
                    # Fenced: nothing runs here until a renewal lands.
                    self.scheduler.claim_failed(claim)
                    continue
                lease_seconds = self._local_lease_seconds
            else:
                found = self.hub.offer(claim.holder)
                if found is None:
                    self.scheduler.claim_failed(claim)
                    self.scheduler.remove_holder(claim.holder)
                    continue
                offer = found
                free = self.hub.free(claim.holder)
                lease_seconds = self.hub.lease_seconds
            d = self.store.claim(offer, claim.count, claim.now, lease_seconds, free)
            self._claims.add(d)
            d.addCallbacks(
                self._claimed,
                self._claim_failed,
                callbackArgs=(claim,),
                errbackArgs=(claim,),
            )
            d.addBoth(lambda _, d=d: self._claims.discard(d))

    def _claim_failed(self, failure: Failure, claim: Claim) -> None:
        self.scheduler.claim_failed(claim)
        if failure.check(StoreClosed):
            return
        if not failure.check(CommitFailed):
            # A failed commit (a full disk) the store logs itself, once a
            # minute: a traceback every second here said nothing more.
            log.failure("claiming jobs failed; trying again in a second", failure)
        self._clock.callLater(1.0, self._pump)

    def _claimed(self, claimed: Claimed, claim: Claim) -> None:
        if claimed.waited and self.observe_claimed is not None:
            self.observe_claimed(claimed.waited)
        self.scheduler.claimed(
            claim, len(claimed.leases), claimed.blocked, claimed.skipped, claimed.drained
        )
        if claim.holder != self.executor.holder:
            self.hub.claimed(claim.holder, claimed.leases)
            self._pump()
            return
        fenced = self.lease_keeper is not None and self.lease_keeper.fenced
        if not self._accepting or fenced:
            # The claim committed as the stop began (or as this dispatcher
            # lost its database): give the jobs back unspent rather than
            # start them behind the stop's back.
            for lease in claimed.leases:
                d = self.recorder.release(
                    lease,
                    self._clock.seconds(),
                    "the dispatcher was stopping; the job goes back to the queue",
                )
                self._releases.append(d)
            return
        for lease in claimed.leases:
            self._run(lease)
        self._pump()

    def _all_recorded(self) -> Deferred:
        """
        Fires once every local job has ended and its end (or release) has
        been committed or has failed.
        """
        d: Deferred = Deferred()
        if self._running or self._recording:
            self._recorded_waiters.append(d)
        else:
            d.callback(None)
        return d

    def _run(self, lease: Lease) -> None:
        self._running.add(lease.job_id)
        running = self.executor.run(lease, self._mark_running, self._record_process)
        running.done.addCallback(self._ended, running)

    def _mark_running(self, lease: Lease) -> Deferred:
        return self.recorder.mark_running(lease, self._clock.seconds())

    def _record_process(self, lease: Lease, process: Any) -> Deferred:
        return self.store.record_process(
            lease, process.pid, process.start_ticks, process.boot_id
        )

    def _ended(self, outcome: Outcome, running: RunningJob) -> None:
        """
        A local job has ended: record it once every local job running has
        ended too, or after C{end_gather} seconds (L{END_GATHER}) at the
        latest.

        Each end frees a slot, and the claim for it joins the end's commit;
        jobs that start together mostly end close together.  Recorded as
        they came in, the first ends of a round went to the store alone and
        the rest waited for that commit to make the next: eight slots of
        no-op tasks made a commit for every four jobs, and each commit cost
        a tenth of a millisecond of the one core.  Waiting for the others
        halves the commits.  The wait is on real time, not the injected
        clock: it is not part of a job's semantics, and C{finished_at} is
        the time the job ended.
        """
        lease = running.lease
        if lease.job_id not in self._running:
            # Released at shutdown while its thread still ran.
            return
        if running.interrupted:
            self._release(running)
            return
        self._ending.append((outcome, running, self._clock.seconds()))
        if len(self._ending) >= len(self._running):
            self._record_ends()
        elif self._ending_call is None:
            self._ending_call = self._reactor.callLater(self.end_gather, self._record_ends)

    def _record_ends(self) -> None:
        if self._ending_call is not None and self._ending_call.active():
            self._ending_call.cancel()
        self._ending_call = None
        ending, self._ending = self._ending, []
        finish = self.recorder.finish
        for outcome, running, now in ending:
            lease = running.lease
            # (No one reports a local end again: one the store cannot
            # write is written as a failure saying why.)
            d = finish(lease, outcome, now, final=True)
            # The slot is free once the job has ended: the next claim goes
            # to the store behind the ends, so all share one commit.  (The
            # store orders the claim after them; and it takes only queued
            # jobs, so an end still being written is never handed out.)
            self.scheduler.slots_freed(lease.holder)
            self._follow(d, lease, True)
        self._pump()

    def _release(self, running: RunningJob) -> Deferred:
        d = self.recorder.release(
            running.lease,
            self._clock.seconds(),
            "stopped by the dispatcher's shutdown; the job goes back to the queue",
        )
        return self._follow(d, running.lease, False)

    def _follow(self, d: Deferred, lease: Lease, freed: bool) -> Deferred:
        """
        Count the end (or release) C{d} of a local job, recorded by the
        L{Recorder} (which writes it again until it lands, while the
        dispatcher runs), until it has committed or failed for good.
        """
        self._running.discard(lease.job_id)
        self._recording += 1
        return d.addBoth(self._recorded, lease.holder, freed)

    def _recorded(self, result: Any, holder: str, freed: bool) -> None:
        # A failure is the recorder's to log; the next start settles an end
        # that never landed.
        if not freed:
            self.scheduler.slots_freed(holder)
        self._recording -= 1
        if not self._running and not self._recording and self._recorded_waiters:
            waiters, self._recorded_waiters = self._recorded_waiters, []
            for waiter in waiters:
                waiter.callback(None)
        self._pump()
