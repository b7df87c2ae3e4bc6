"""
The dispatcher's side of remote workers (docs/worker-protocol.md).

A worker is a lease holder like the local executor: its claims go through
the same scheduler and the same C{store.claim}.  What is its own is here:
who is connected and what they offer, their open long-polls, the expiry of
their leases on the dispatcher's clock, and the answers to their
heartbeats and reports.

Lease expiry is kept in memory: a heartbeat renews without a disk write.
The store keeps which leases are live, so a restarted dispatcher gives
every one of them a fresh C{lease_seconds} (L{SQLiteJobStore.resume_leases})
and downtime alone never expires a worker's job.

A lease's end (a result, an expiry, a cancel told) goes through the
L{Recorder}, which writes it again until it commits.  Until then the hub
keeps the lease and its slot: a reported lease stays current (a heartbeat
is answered C{ok}, a resent report waits for the same write), an expired
or cancelled one is refused with its reason, and no expiry runs on it.

On a database shared with other dispatchers (PostgreSQL), a worker may
move from one dispatcher to another (its own went away, or stopped
answering) with its jobs running.  Its leases are the store's, fenced by
their tokens: the dispatcher it moves to takes them up from the store
(L{IJobStore.adopt_leases}) at its first heartbeat, report, request for
work or log chunk there, and at every heartbeat after, so that the store
always names the dispatcher its worker last renewed them with.  (A
heartbeat's take-up is not skipped for leases this dispatcher granted or
took up itself: a worker that moved away and back has been taken up by
the other meanwhile, which would then record them expired.)  Only that
dispatcher may
record one expired (L{IJobStore.finish_served}): the one it left keeps
its copy in memory until that copy runs out, and then forgets it, its
expiry refused.  A restarted dispatcher takes its workers' leases up the
same way.

The hub answers with model values (L{LeaseVerdict}, L{ConnectedWorker});
the API turns them into the protocol's wire types and HTTP statuses.

It also says when a worker connects (is heard from while it was not
connected) and leaves (has no request open and has not been heard from
for a lease's life, as C{GET /v1/workers} stops showing it), for the
event stream.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Union

import attrs
from twisted.internet.defer import Deferred, DeferredList, FirstError, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from dispatcher._throttle import Throttle
from dispatcher.core._capacity import free_resources
from dispatcher.core._reasons import silent_worker
from dispatcher.core._recorder import Recorder
from dispatcher.model._events import CONNECTED, LEFT
from dispatcher.model._routing import Routing
from dispatcher.model._jobs import (
    LOG_STREAMS,
    JobState,
    Lease,
    Offer,
    Outcome,
    Resources,
    StaleLease,
    StoreClosed,
)
from dispatcher.model._workers import (
    ConnectedWorker,
    LeaseEnd,
    LeaseVerdict,
    TooManyWorkerNames,
    default_fence_margin,
    default_last_attempt_grace,
)

log = Logger()

# How many ended leases keep the reason they ended, for the answer to a
# late heartbeat (cancelled, expired); older ones are superseded.
REMEMBERED_ENDINGS = 100_000

# The longest a worker's long-poll is held open.
MAX_WAIT = 60.0

# How often two processes sharing a worker name are logged, at most.
DUPLICATE_LOG_INTERVAL = 60.0

# The worker names kept at most, for one credential and in all (the daemon
# reads them from [workers] max_names_per_credential and max_names).
MAX_NAMES_PER_CREDENTIAL = 256
MAX_NAMES = 4096

# A worker name unheard from this many lease lives, with no lease and no
# poll open, is forgotten.
FORGET_AFTER_LEASES = 10

# The period of the stall watchdog while leases are out (a quarter of
# lease_seconds when that is shorter).  A timer of the hub that fires more
# than this late finds the dispatcher stalled.
STALL_TICK = 1.0


@attrs.define
class RemoteLease:
    """
    A lease a worker holds: when it expires (dispatcher clock), whether its
    job still stages, whether a cancel waits to be told, and which worker
    process it was granted to (C{instance}; unknown when a restart
    C{resumed} it).
    """

    lease: Lease
    expires: float
    staging: bool
    cancel: bool = False
    # Why it ended (reported, expired, cancelled), from the moment that is
    # decided until the end has committed and the lease is forgotten; and
    # the reports waiting for a result's commit (the first and any resend).
    ending: Optional[LeaseEnd] = None
    waiting: Optional[list[Deferred]] = None
    instance: Optional[str] = None
    resumed: bool = False
    # A last attempt whose lease ran out waits for its worker's word until
    # C{expires} again (see WorkerHub._reap): since when it is silent.
    silent_since: Optional[float] = None
    # The streams of its log the dispatcher cut at its own
    # [executor] max_log_bytes, for its result to say.
    log_cut: frozenset[str] = frozenset()
    # The report whose result it is being recorded for, until that ends.
    report: Optional["Report"] = None


@attrs.define(eq=False)
class Report:
    """
    The results of one report being recorded: how many have not ended
    yet.  The scheduler looks again for free capacity once, as the last of
    them ends, not once for each.
    """

    pending: int = 0


@attrs.define(eq=False)
class Poll:
    """
    A worker's open request for work.
    """

    answer: Deferred
    count: int
    timer: Any = None
    expired: bool = False
    # The worker process that asked (its offer's instance).
    instance: Optional[str] = None


@attrs.define
class Worker:
    """
    A worker as last heard from.
    """

    offer: Offer
    last_contact: float
    jobs: set[str] = attrs.field(factory=set)
    poll: Optional[Poll] = None
    # False for a worker known only from the leases a restart resumed: what
    # it offers is unknown until it calls.
    heard: bool = True
    # Until when another process was last heard under the same name, and
    # when that was last logged.
    shared_until: float = float("-inf")
    shared_logged: float = float("-inf")
    # The name of the credential it calls with (None: not known yet, for a
    # worker known only from the leases a restart resumed).
    credential: Optional[str] = None

    @property
    def free_slots(self) -> int:
        """
        How many more jobs it could take: its slots and its prefetch less
        the jobs it holds (none, if it now offers fewer than it holds).  A
        prefetched lease is a lease like any other (fenced, renewed by
        heartbeats, run out, cancelled, listed as held): only where its job
        waits for a slot, on the worker, is it any different.
        """
        return max(0, self.offer.capacity - len(self.jobs))

    def free_after_reports(self, leases: Mapping[str, RemoteLease]) -> int:
        """
        L{free_slots}, counting free the slots of the jobs whose results
        are being recorded: the worker that asks for work in the report
        that carries them counts them free once that report is answered,
        and the answer comes after their commit.
        """
        busy = 0
        for job_id in self.jobs:
            remote = leases.get(job_id)
            if remote is None or remote.ending is not LeaseEnd.REPORTED:
                busy += 1
        return max(0, self.offer.capacity - busy)

    def held(self, leases: Mapping[str, RemoteLease]) -> Iterator[Lease]:
        """
        The leases of C{leases} that this worker holds and whose jobs may
        still run: a job whose result is being recorded has ended on its
        worker, and what it asked for is free there.
        """
        for job_id in self.jobs:
            remote = leases.get(job_id)
            if remote is not None and remote.ending is not LeaseEnd.REPORTED:
                yield remote.lease


class WorkerHub:
    """
    Remote workers and their leases.

    @param scheduler: the L{Scheduler} the dispatcher claims through.
    @param clock: the dispatcher's C{IReactorTime}.
    @param lease_seconds: how long a lease lives without a heartbeat.
    @param recorder: the L{Recorder} every end of a lease is written through.
    @param capacity_changed: called when a worker's free capacity changed
        (it asked for work, or a lease's end committed), so that jobs are
        claimed for it.
    @param fence_margin: how long before a lease runs out its worker has
        stopped the job when it hears nothing (C{None}: the default for
        C{lease_seconds}); workers are told C{fence_seconds}, the lease
        less this margin (docs/worker-protocol.md, "Self-fencing").
    @param last_attempt_grace: how much longer than its lease a job's
        last attempt waits for its silent worker's result before it is
        recorded lost (C{None}: L{default_last_attempt_grace}).
    @param max_names_per_credential: how many worker names one credential
        may have connected at once; a new name beyond it is refused
        (L{TooManyWorkerNames}).
    @param max_names: how many worker names all credentials may have
        connected at once.
    @param presence: told C{(name, CONNECTED)} when a worker connects and
        C{(name, LEFT)} when it leaves; C{None}: no one.
    @param adopt: on a database shared with other dispatchers, C{(holder,
        items) -> Deferred}: take up from the store the live leases of
        C{items} (C{(job_id, token)}) that C{holder} holds (C{None}: any),
        firing with the L{Written} of their L{ResumedLease}s; C{None}: a
        store of its own, whose leases no other dispatcher serves.
    @param server: with C{adopt}, gives this dispatcher's name in the
        store; its expiries are written only where it serves the lease.
    @ivar leases_expired: how many leases ran out without a heartbeat.
    """

    def __init__(
        self,
        scheduler: Any,
        clock: Any,
        lease_seconds: float,
        recorder: Recorder,
        capacity_changed: Callable[[], None],
        fence_margin: Optional[float] = None,
        last_attempt_grace: Optional[float] = None,
        max_names_per_credential: int = MAX_NAMES_PER_CREDENTIAL,
        max_names: int = MAX_NAMES,
        presence: Optional[Callable[[str, str], None]] = None,
        adopt: Optional[Callable[[Optional[str], list[tuple[str, int]]], Deferred]] = None,
        server: Optional[Callable[[], str]] = None,
    ) -> None:
        self._scheduler = scheduler
        # On a database shared with other dispatchers: takes leases up from
        # the store for this one (holder, [(job_id, token)]), and gives the
        # name that the store says serves them (see the module docstring).
        self._adopt = adopt
        self._server = server
        self._presence = presence
        # The names told connected and not yet left, and the timer that
        # looks for those that left.
        self._present: set[str] = set()
        self._presence_timer: Any = None
        self._clock = clock
        self.lease_seconds = lease_seconds
        self.heartbeat_seconds = lease_seconds / 3.0
        if fence_margin is None:
            fence_margin = default_fence_margin(lease_seconds)
        self.fence_margin = fence_margin
        # A heartbeat renews at its receipt, to now + lease_seconds: a
        # worker that counts this from when it sent the heartbeat has
        # stopped the job by the margin before the lease can run out.
        self.fence_seconds = lease_seconds - fence_margin
        if last_attempt_grace is None:
            last_attempt_grace = default_last_attempt_grace(lease_seconds)
        self.last_attempt_grace = last_attempt_grace
        self._recorder = recorder
        self._capacity_changed = capacity_changed
        # Which queues each worker takes (the dispatcher sets it).
        self.routing = Routing()
        # The time (dispatcher clock) by which a worker's jobs must have
        # ended, by its name: a Slurm pilot's end less its stop margin,
        # which its backend keeps up to date.  A job whose timeout would
        # run past it is not given to that worker.
        self.deadlines: dict[str, float] = {}
        self.workers: dict[str, Worker] = {}
        # How many remote leases ran out without a heartbeat (the metrics').
        self.leases_expired = 0
        # The names of self.workers by the credential they call with.
        self._names: dict[Optional[str], set[str]] = {}
        self.max_names_per_credential = max_names_per_credential
        self.max_names = max_names
        self._names_refused = Throttle(clock)
        self.leases: dict[str, RemoteLease] = {}
        # The leases of last attempts waiting for their silent workers (a
        # few, if any): what job reads look up, without a scan of them all.
        self._silent: dict[str, RemoteLease] = {}
        self._endings: OrderedDict[int, LeaseEnd] = OrderedDict()
        self._reaper: Any = None
        self._writes: set[Deferred] = set()
        self.accepting = False
        # The stall watchdog: its timer, its period, and when a timer of
        # the hub last ran (see _stalled).
        self._watchdog: Any = None
        self.stall_tick = min(STALL_TICK, lease_seconds / 4.0)
        self._ran = float("-inf")

    # What the dispatcher asks

    def resume(self, resumed: Iterable[Any]) -> None:
        """
        Take over the live leases a previous run left (L{ResumedLease}s).
        """
        now = self._clock.seconds()
        for item in resumed:
            lease = item.lease
            self.leases[lease.job_id] = RemoteLease(
                lease,
                lease.expires_at,
                item.state is JobState.STAGING,
                cancel=item.cancel_requested,
                resumed=True,
            )
            self._held_by(lease, now)
        self._arm_reaper()

    def _held_by(self, lease: Lease, now: float) -> None:
        """
        Count C{lease}'s job among its holder's, a worker known only by
        name until it calls again if none is here.
        """
        worker = self.workers.get(lease.holder)
        if worker is None:
            worker = Worker(Offer(lease.holder, 0), now, heard=False)
            self.workers[lease.holder] = worker
            self._names.setdefault(None, set()).add(lease.holder)
        worker.jobs.add(lease.job_id)

    def take_up(
        self,
        holder: Optional[str],
        items: list[tuple[str, int]],
        instance: Optional[str] = None,
    ) -> Deferred:
        """
        Take up from the store the live leases of C{items} (C{(job_id,
        token)}) that C{holder} holds (C{None}: whoever does): this
        dispatcher serves them from now on.  A lease already here under the
        same token is renewed; one the store gives that is not here (its
        worker moved here from another dispatcher, or this one restarted)
        is kept from now on, for the worker process C{instance}.  Fires
        with the set of C{(job_id, token)} taken up; the others are not
        current.
        """
        assert self._adopt is not None
        d = self._adopt(holder, items)

        def adopted(written: Any) -> set[tuple[str, int]]:
            now = self._clock.seconds()
            taken = set()
            for item in written.value:
                lease = item.lease
                taken.add((lease.job_id, lease.token))
                remote = self.leases.get(lease.job_id)
                if remote is not None and remote.lease.token == lease.token:
                    if remote.ending is None:
                        remote.expires = max(remote.expires, now + self.lease_seconds)
                    continue
                if remote is not None:
                    # An older lease of the job, ended elsewhere.
                    old = self.workers.get(remote.lease.holder)
                    if old is not None:
                        old.jobs.discard(lease.job_id)
                    if self._silent.get(lease.job_id) is remote:
                        del self._silent[lease.job_id]
                log.info(
                    "job {job_id} attempt {attempt}: worker {holder} goes on with its "
                    "lease here (taken up from the store)",
                    job_id=lease.job_id,
                    attempt=lease.attempt,
                    holder=lease.holder,
                )
                self.leases[lease.job_id] = RemoteLease(
                    lease,
                    now + self.lease_seconds,
                    item.state is JobState.STAGING,
                    cancel=item.cancel_requested,
                    instance=instance,
                )
                self._held_by(lease, now)
            if taken and self.accepting:
                self._arm_reaper()
            return taken

        return d.addCallback(adopted)

    def offer(self, holder: str) -> Optional[Offer]:
        """
        What the worker C{holder} offers now: a worker with a deadline
        (L{deadlines}) offers the time left until it.
        """
        worker = self.workers.get(holder)
        if worker is None:
            return None
        deadline = self.deadlines.get(holder)
        if deadline is None:
            return worker.offer
        return attrs.evolve(worker.offer, time_left=deadline - self._clock.seconds())

    def free(self, holder: str) -> Resources:
        """
        What the worker C{holder} has free: its resources less what the
        jobs it holds leases on ask for.
        """
        worker = self.workers[holder]
        if not worker.jobs:
            return worker.offer.resources
        return free_resources(worker.offer.resources, worker.held(self.leases))

    def connected(self) -> list[Worker]:
        """
        The workers heard from within a lease's life, or waiting for work.
        """
        now = self._clock.seconds()
        return [
            w
            for w in self.workers.values()
            if w.heard
            and (w.poll is not None or now - w.last_contact <= self.lease_seconds)
        ]

    def now(self) -> float:
        """
        The time on the dispatcher's clock, to measure an answer's timing
        against (L{fence_after}).
        """
        return self._clock.seconds()

    def fence_after(self, received: float, job_ids: Iterable[str]) -> float:
        """
        The C{fence_seconds} of an answer to a request received at
        C{received} that granted the leases of C{job_ids}: the seconds from
        that request until its worker must have stopped their jobs
        unrenewed, the margin before the earliest of their expiries.  A
        long-poll grants long after its receipt, which this counts; with no
        lease, the plain C{fence_seconds}.
        """
        expiries = [
            remote.expires
            for remote in (self.leases.get(job_id) for job_id in job_ids)
            if remote is not None
        ]
        if not expiries:
            return self.fence_seconds
        return max(0.0, min(expiries) - self.fence_margin - received)

    def cancel_requested(self, job_id: str) -> None:
        """
        A client cancelled a job a worker runs: it hears at its next
        contact.
        """
        remote = self.leases.get(job_id)
        if remote is not None:
            remote.cancel = True

    def stop(self) -> Deferred:
        """
        The dispatcher stops: answer every open poll with nothing, leave
        the leases live (a restart resumes them), and wait for the writes
        in flight.
        """
        self.accepting = False
        for timer in (self._reaper, self._watchdog, self._presence_timer):
            if timer is not None and timer.active():
                timer.cancel()
        for worker in self.workers.values():
            if worker.poll is not None:
                self._end_poll(worker, [])
        return DeferredList(list(self._writes), consumeErrors=True)

    # What workers ask

    def contact(self, offer: Offer, credential: Optional[str] = None) -> Worker:
        """
        A worker called, with the credential named C{credential}: remember
        what it offers and when.  A name heard for the first time is
        logged, and refused (L{TooManyWorkerNames}, nothing changed) when
        its credential or the dispatcher has as many names as it may keep.
        """
        now = self._clock.seconds()
        # Which queues it takes: a backend's pilot its backend's alone.
        offer = self.routing.remote(offer, credential)
        worker = self.workers.get(offer.holder)
        if worker is None:
            # A new name: a good moment to forget the long gone (the reaper
            # does too, but runs only while leases are out).
            self._forget_idle(now)
            self._admit(offer.holder, credential, now)
            worker = self.workers[offer.holder] = Worker(offer, now, credential=credential)
            self._names.setdefault(credential, set()).add(offer.holder)
            log.info(
                "worker {name} is heard from for the first time, with credential "
                "{credential}",
                name=offer.holder,
                credential=credential,
            )
        else:
            self._check_instance(worker, offer, now)
            worker.offer = offer
            worker.last_contact = now
            worker.heard = True
            if worker.credential is None and credential is not None:
                # Known from resumed leases until now: the name counts for
                # the credential it calls with (over its limit, if need be:
                # it holds leases already).
                self._uncount(worker)
                worker.credential = credential
                self._names.setdefault(credential, set()).add(offer.holder)
        if offer.holder not in self._present:
            self._present.add(offer.holder)
            self._tell(offer.holder, CONNECTED)
            if self.accepting:
                self._arm_presence()
        return worker

    # Presence

    def _tell(self, name: str, change: str) -> None:
        if self._presence is not None:
            try:
                self._presence(name, change)
            except Exception:
                log.failure("telling that worker {name} {change} failed",
                            name=name, change=change)

    def _arm_presence(self) -> None:
        """
        Wake when the first worker told connected that has no request open
        would have gone unheard for a lease's life.
        """
        if self._presence_timer is not None and self._presence_timer.active():
            return
        due = None
        for name in self._present:
            worker = self.workers.get(name)
            if worker is None:
                due = self._clock.seconds()
                break
            if worker.poll is None:
                left_at = worker.last_contact + self.lease_seconds
                if due is None or left_at < due:
                    due = left_at
        if due is not None:
            self._presence_timer = self._clock.callLater(
                max(0.0, due - self._clock.seconds()), self._look_for_leavers
            )

    def _look_for_leavers(self) -> None:
        """
        Tell of the workers that left: forgotten, or with no request open
        and unheard from for a lease's life.
        """
        self._presence_timer = None
        now = self._clock.seconds()
        for name in sorted(self._present):
            worker = self.workers.get(name)
            if worker is None or (
                worker.poll is None and now - worker.last_contact >= self.lease_seconds
            ):
                self._present.discard(name)
                self._tell(name, LEFT)
        if self.accepting:
            self._arm_presence()

    def _admit(self, name: str, credential: Optional[str], now: float) -> None:
        """
        Let the new worker name C{name} of C{credential} in, or refuse it
        (L{TooManyWorkerNames}) when its credential, or the dispatcher in
        all, keeps as many names as it may.  At a limit, names no longer
        connected (no lease, no poll open, unheard from for a lease's life)
        are forgotten first: a fleet whose workers restart under new names
        (the default name has the pid in it) is not held up by its dead.
        """
        names = self._names.get(credential, ())
        per_credential = len(names) >= self.max_names_per_credential
        if per_credential or len(self.workers) >= self.max_names:
            self._forget_idle(now, self.lease_seconds)
            names = self._names.get(credential, ())
            per_credential = len(names) >= self.max_names_per_credential
            if not per_credential and len(self.workers) < self.max_names:
                return
            limit = self.max_names_per_credential if per_credential else self.max_names
            refused = TooManyWorkerNames(name, credential, limit, per_credential)
            count = self._names_refused.happened()
            if count is not None:
                log.warn(
                    "{count} new worker names refused (the latest {name}, with "
                    "credential {credential}): {why}",
                    count=count,
                    name=name,
                    credential=credential,
                    why=str(refused),
                )
            raise refused

    def _check_instance(self, worker: Worker, offer: Offer, now: float) -> None:
        """
        Warn when a second worker process calls under a name whose first
        was heard from within a lease's life (a restart of the same worker
        comes later, or from the same process).  Both go on working: their
        leases stay fenced by token, but they share the name's slots and
        take each other's long-polls.  Logged at most once a minute a name;
        C{GET /v1/workers} shows it while it lasts.
        """
        before = worker.offer.instance
        if (
            before is None
            or offer.instance is None
            or before == offer.instance
            or now - worker.last_contact > self.lease_seconds
        ):
            return
        worker.shared_until = now + self.lease_seconds
        if now - worker.shared_logged >= DUPLICATE_LOG_INTERVAL:
            worker.shared_logged = now
            log.warn(
                "two worker processes call themselves {name} (instances "
                "{first} and {second}): they share its slots and take each "
                "other's long-polls; give each its own --name",
                name=offer.holder,
                first=before,
                second=offer.instance,
            )

    def poll(
        self,
        offer: Offer,
        max_jobs: int,
        wait: float,
        held: Optional[Iterable[tuple[str, int]]] = None,
        credential: Optional[str] = None,
        after_report: bool = False,
    ) -> Deferred:
        """
        A worker asks for up to C{max_jobs} jobs; fire with the leases it
        got, as soon as it gets any, or with none after C{wait} seconds.
        Cancelling the result (the worker hung up) gives back whatever a
        claim still in flight brings.  C{held} lists the leases the worker
        process holds, as C{(job_id, token)} (C{None}: it does not say);
        those it was granted and does not list never reached it, and go
        back to the queue unspent (L{_release_unheld}).  C{credential} names
        the credential the worker calls with (see L{contact}).

        With C{after_report}, the request for work rides on a report just
        given to L{report}: the slots of the results being recorded count
        free (L{Worker.free_after_reports}), and the claim made now goes to
        the store behind their ends, in the same commit, as the local
        executor's claims do.  (It takes only queued jobs, so a job whose
        end is still being written is never handed out.  A report answered
        with an error delivers no leases: those the claim granted then are
        the worker process's, and its next request for work, which does not
        list them, gives them back unspent.)

        On a shared database, the leases C{held} lists that are not kept
        here are taken up from the store first (L{take_up}: its worker
        moved here with them), so that they count against its slots: else
        it would be granted a lease for each of them too many until its
        first heartbeat here.
        """
        worker = self.contact(offer, credential)
        if self._adopt is not None and held and self.accepting:
            held = list(held)
            leases = self.leases
            unknown = [
                (job_id, token)
                for job_id, token in held
                if job_id not in leases or leases[job_id].lease.token != token
            ]
            if unknown:
                return self._poll_after_take_up(
                    worker, offer, max_jobs, wait, held, after_report, unknown
                )
        return self._open_poll(worker, offer, max_jobs, wait, held, after_report)

    def _poll_after_take_up(
        self,
        worker: Worker,
        offer: Offer,
        max_jobs: int,
        wait: float,
        held: list[tuple[str, int]],
        after_report: bool,
        unknown: list[tuple[str, int]],
    ) -> Deferred:
        """
        L{poll}, once the leases C{unknown} of C{held} are taken up.
        Cancelling the result meanwhile opens no poll; a take-up that fails
        (the store cannot be reached) fails the request.
        """
        opened: list[Deferred] = []

        def hung_up(_: Deferred) -> None:
            if opened:
                opened[0].cancel()

        answer: Deferred = Deferred(hung_up)

        def taken(_: Any) -> None:
            if answer.called:
                return
            d = self._open_poll(worker, offer, max_jobs, wait, held, after_report)
            opened.append(d)

            def answered(result: Any) -> None:
                if not answer.called:
                    answer.callback(result)

            def failed(failure: Failure) -> None:
                if not answer.called:
                    answer.errback(failure)

            d.addCallbacks(answered, failed)

        def not_taken(failure: Failure) -> None:
            if not answer.called:
                answer.errback(failure)

        self.take_up(offer.holder, unknown, offer.instance).addCallbacks(taken, not_taken)
        return answer

    def _open_poll(
        self,
        worker: Worker,
        offer: Offer,
        max_jobs: int,
        wait: float,
        held: Optional[Iterable[tuple[str, int]]],
        after_report: bool,
    ) -> Deferred:
        """
        The request for work of L{poll}, once its worker is heard and the
        leases it lists are here.
        """
        if held is not None and self.accepting:
            self._release_unheld(worker, offer.instance, held)
        if worker.poll is not None:
            # A worker has one poll open: the new one replaces the old.
            self._end_poll(worker, [])
        free = worker.free_after_reports(self.leases) if after_report else worker.free_slots
        count = max(0, min(max_jobs, free))

        def hung_up(_: Deferred) -> None:
            if worker.poll is poll:
                self._close_poll(worker)

        poll = Poll(Deferred(hung_up), count, instance=offer.instance)
        worker.poll = poll
        if wait > 0:
            poll.timer = self._clock.callLater(
                min(wait, MAX_WAIT), self._poll_timed_out, worker, poll
            )
        if not self.accepting:
            self._end_poll(worker, [])
            return poll.answer
        if count > 0:
            self._scheduler.set_free(offer.holder, count)
            self._capacity_changed()
        if wait <= 0 and worker.poll is poll:
            # Not held open: answered with what the claim just made brings
            # (its answer ends the poll), or at once with nothing.
            self._poll_timed_out(worker, poll)
        return poll.answer

    def _release_unheld(
        self, worker: Worker, instance: Optional[str], held: Iterable[tuple[str, int]]
    ) -> None:
        """
        A worker process (C{instance}) asks for work listing the leases it
        holds (C{held}).  Its requests for work go one at a time: this one
        was sent after the answer to the one before had come, or had been
        given up on.  So a lease granted to this same process before this
        request arrived, which it does not list, never reached it (the
        answer was lost on the way, or its connection was gone as it was
        written): it goes back to the queue at once, its attempt not
        counted, instead of running out its life as an orphan and failing.

        (A heartbeat is no such proof: one may be sent while the answer
        granting a lease is still on its way.)  A lease a restart resumed
        counts as granted to whichever process of its holder asks first
        after the restart, its connection to the old dispatcher being gone,
        unless two processes are known to share the name; listed, it is
        that process's from then on.  A worker that gives no instance
        releases nothing.
        """
        if instance is None:
            return
        listed = set(held)
        now = self._clock.seconds()
        lost = []
        for job_id in sorted(worker.jobs):
            remote = self.leases.get(job_id)
            if remote is None or remote.ending is not None:
                continue
            if (job_id, remote.lease.token) in listed:
                if remote.resumed:
                    remote.instance, remote.resumed = instance, False
                continue
            if remote.resumed:
                if worker.shared_until >= now:
                    continue
            elif remote.instance != instance:
                continue
            lost.append(remote)
        for remote in lost:
            lease = remote.lease
            log.warn(
                "job {job_id} attempt {attempt}: worker {holder} asks for work "
                "without listing its lease{since}: the lease never reached it, or "
                "the process that held it is gone; the job goes back to the "
                "queue, the attempt not counted",
                job_id=lease.job_id,
                attempt=lease.attempt,
                holder=lease.holder,
                since=" (its first request since the dispatcher restarted)"
                if remote.resumed
                else "",
            )
            # Its slot is free at once: the worker does not hold the job,
            # and this request asks for work in its place.
            worker.jobs.discard(lease.job_id)
            self._end(
                remote,
                LeaseEnd.SUPERSEDED,
                None,
                released=f"its worker {lease.holder} does not hold its lease (the "
                "answer granting it was lost); back to the queue, not counted",
            )

    def _poll_timed_out(self, worker: Worker, poll: Poll) -> None:
        if worker.poll is not poll:
            return
        if self._scheduler.claiming(worker.offer.holder):
            # A claim for it is in flight: its answer ends the poll.
            poll.expired = True
            return
        self._end_poll(worker, [])

    def _close_poll(self, worker: Worker) -> None:
        poll = worker.poll
        worker.poll = None
        self._scheduler.remove_holder(worker.offer.holder)
        if poll is not None and poll.timer is not None and poll.timer.active():
            poll.timer.cancel()
        if self.accepting:
            self._arm_presence()

    def _end_poll(self, worker: Worker, leases: list[Lease]) -> None:
        poll = worker.poll
        self._close_poll(worker)
        if poll is not None and not poll.answer.called:
            poll.answer.callback(leases)

    def claimed(self, holder: str, leases: list[Lease]) -> None:
        """
        A claim for C{holder} committed: hand the leases to its open poll,
        or give them back unspent if it hung up meanwhile.
        """
        worker = self.workers.get(holder)
        if worker is None or worker.poll is None or not self.accepting:
            for lease in leases:
                d = self._recorder.release(
                    lease,
                    self._clock.seconds(),
                    "its worker was gone before it got the job; back to the queue",
                )
                # A failure is the recorder's to log; a restart settles it.
                self._track(d.addErrback(lambda _: None))
            return
        if not leases:
            if worker.poll.expired:
                self._end_poll(worker, [])
            return
        now = self._clock.seconds()
        for lease in leases:
            self.leases[lease.job_id] = RemoteLease(
                lease,
                now + self.lease_seconds,
                bool(lease.spec.inputs),
                instance=worker.poll.instance,
            )
            worker.jobs.add(lease.job_id)
        self._arm_reaper()
        self._end_poll(worker, leases)

    def heartbeat(
        self,
        offer: Offer,
        items: list[tuple[str, int, bool]],
        credential: Optional[str] = None,
    ) -> Deferred:
        """
        Renew the leases a worker names, as C{(job_id, token, running)};
        fire with one L{LeaseVerdict} per item, carrying the new expiry.  A
        lease whose result is being recorded is still the worker's: it is
        renewed as any other.  A lease held under another worker name is
        refused, and left as it is.

        On a shared database every heartbeat takes its leases up from the
        store first (L{take_up}): this dispatcher serves them from now on,
        and one the store no longer gives is refused.
        """
        self.contact(offer, credential)
        if self._adopt is None or not items:
            return self._beat(offer, items)
        d = self.take_up(offer.holder, [(j, t) for j, t, _ in items], offer.instance)

        def taken_up(taken: set[tuple[str, int]]) -> Deferred:
            for job_id, token, _ in items:
                if (job_id, token) in taken:
                    continue
                remote = self.current(job_id, token, offer.holder)
                if remote is not None and remote.ending is None:
                    # Ended elsewhere (recovered once its expiry passed).
                    self._forget(remote, LeaseEnd.SUPERSEDED, None)
            return self._beat(offer, items)

        return d.addCallback(taken_up)

    def _beat(self, offer: Offer, items: list[tuple[str, int, bool]]) -> Deferred:
        """
        The heartbeat of L{heartbeat}, once its worker is heard.
        """
        now = self._clock.seconds()
        answers: list[LeaseVerdict] = []
        writes: list[Deferred] = []
        for job_id, token, running in items:
            remote = self.current(job_id, token, offer.holder)
            if remote is None:
                answers.append(LeaseVerdict(job_id, token, self.refusal(job_id, token)))
                continue
            if remote.cancel and remote.ending is None:
                # Told at once, whether or not the end has committed yet:
                # the lease is refused as cancelled from now on.  (Waiting
                # for a write the store keeps failing would hold back the
                # heartbeat of the worker's other leases.)
                self._end(
                    remote,
                    LeaseEnd.CANCELLED,
                    Outcome(JobState.FAILED, error="stopped on its worker", stopped=True),
                )
                answers.append(LeaseVerdict(job_id, token, self.refusal(job_id, token)))
                continue
            expires = remote.expires = now + self.lease_seconds
            if remote.silent_since is not None:
                remote.silent_since = None
                del self._silent[job_id]
            if running and remote.staging and remote.ending is None:
                remote.staging = False
                writes.append(self._mark_running(remote.lease))
            answers.append(LeaseVerdict(job_id, token, None, expires))
        d = DeferredList(writes, consumeErrors=True) if writes else succeed(None)
        return d.addCallback(lambda _: answers)

    def report(
        self,
        offer: Offer,
        results: list[tuple[str, int, Optional[Outcome]]],
        credential: Optional[str] = None,
    ) -> Deferred:
        """
        Record how attempts ended, as C{(job_id, token, outcome)}; an
        outcome of C{None} gives the job back unspent (the worker stopped it
        on its own shutdown).  Fire with one L{LeaseVerdict} per item, once
        the accepted ones are durable.

        A result whose commit fails is written again until it lands, and
        its answer waits for that; a resent report of a result still being
        written waits for the same write (the first outcome is the one
        recorded).  Until the commit the lease stays current and holds its
        slot; after it, a resend is refused as C{reported}.  A result for a
        lease held under another worker name is refused, and changes
        nothing.  On a shared database, a result for a lease not kept here
        takes it up from the store first (its worker moved here).
        """
        self.contact(offer, credential)
        if self._adopt is not None:
            unknown = [
                (job_id, token)
                for job_id, token, _ in results
                if job_id not in self.leases or self.leases[job_id].lease.token != token
            ]
            if unknown:
                d = self.take_up(offer.holder, unknown, offer.instance)
                return d.addCallback(lambda _: self._report(offer, results))
        return self._report(offer, results)

    def _report(
        self, offer: Offer, results: list[tuple[str, int, Optional[Outcome]]]
    ) -> Deferred:
        """
        The report of L{report}, once its worker is heard and its leases
        are here.
        """
        answers: list[Union[LeaseVerdict, Deferred]] = []
        waits: list[Deferred] = []
        batch = Report()
        for job_id, token, outcome in results:
            remote = self.current(job_id, token, offer.holder)
            if remote is None:
                answers.append(LeaseVerdict(job_id, token, self.refusal(job_id, token)))
                continue
            d: Deferred = Deferred()
            if remote.ending is None:
                if outcome is not None and not remote.log_cut <= set(outcome.log_cut):
                    # Cut here too, at this dispatcher's own limit.
                    cut = set(outcome.log_cut) | remote.log_cut
                    outcome = attrs.evolve(
                        outcome, log_cut=tuple(s for s in LOG_STREAMS if s in cut)
                    )
                remote.report = batch
                batch.pending += 1
                self._end(remote, LeaseEnd.REPORTED, outcome, d)
            else:
                assert remote.waiting is not None
                remote.waiting.append(d)
            waits.append(d)
            answers.append(d)

        def gathered(_: Any) -> list[LeaseVerdict]:
            return [a.result if isinstance(a, Deferred) else a for a in answers]

        def first_failure(failure: Failure) -> Failure:
            failure.trap(FirstError)
            return failure.value.subFailure

        d = DeferredList(waits, fireOnOneErrback=True, consumeErrors=True)
        return d.addCallbacks(gathered, first_failure)

    def current(
        self, job_id: str, token: int, holder: Optional[str] = None
    ) -> Optional[RemoteLease]:
        """
        The lease of C{job_id} if C{token} is its current one (and, when
        given, C{holder} holds it); C{None} otherwise.
        """
        remote = self.leases.get(job_id)
        if remote is None or remote.lease.token != token:
            return None
        if holder is not None and remote.lease.holder != holder:
            return None
        if remote.ending is not None and remote.ending is not LeaseEnd.REPORTED:
            # Expired or cancelled, its end not yet committed.
            return None
        return remote

    def current_here(self, job_id: str, token: int) -> Deferred:
        """
        L{current}, on a shared database after taking the lease up from the
        store if it is not kept here (a log chunk of a worker that moved
        here): fires with the L{RemoteLease} or C{None}.
        """
        remote = self.current(job_id, token)
        if remote is not None or self._adopt is None:
            return succeed(remote)
        known = self.leases.get(job_id)
        if known is not None and known.lease.token == token:
            # Kept here and ended: refused as it is.
            return succeed(None)
        d = self.take_up(None, [(job_id, token)])
        return d.addCallback(lambda _: self.current(job_id, token))

    def refusal(self, job_id: str, token: int) -> LeaseEnd:
        """
        Why a write whose lease is not current (L{current} gave C{None}) is
        refused.
        """
        remote = self.leases.get(job_id)
        if (
            remote is not None
            and remote.lease.token == token
            and remote.ending is not None
            and remote.ending is not LeaseEnd.REPORTED
        ):
            return remote.ending
        return self._endings.get(token, LeaseEnd.SUPERSEDED)

    # Leases ending

    def _end(
        self,
        remote: RemoteLease,
        reason: LeaseEnd,
        outcome: Optional[Outcome],
        waiter: Optional[Deferred] = None,
        released: Optional[str] = None,
        served: bool = False,
    ) -> None:
        """
        The lease of C{remote} ended, for C{reason}, with C{outcome}
        (C{None}: given back unspent, C{released} saying why when it is not
        the worker's own stop): record it through the recorder; the lease
        is forgotten and its slot freed once that has committed, and
        C{waiter} then fires with the report's L{LeaseVerdict}.  With
        C{served} (an expiry), on a shared database, it is written only if
        this dispatcher still serves the lease (L{IJobStore.finish_served}).
        """
        remote.ending = reason
        remote.waiting = [] if waiter is None else [waiter]
        lease = remote.lease
        now = self._clock.seconds()
        if outcome is None:
            d = self._recorder.release(
                lease,
                now,
                released or f"its worker {lease.holder} stopped; the job goes back to the queue",
            )
        elif served and self._server is not None:
            d = self._recorder.finish(lease, outcome, now, server=self._server())
        else:
            d = self._recorder.finish(lease, outcome, now)
        d.addCallbacks(
            self._recorded, self._not_recorded, callbackArgs=(remote,), errbackArgs=(remote,)
        )
        self._track(d)

    def _recorded(self, written: Any, remote: RemoteLease) -> None:
        ok = LeaseVerdict(remote.lease.job_id, remote.lease.token)
        self._forget(remote, remote.ending or LeaseEnd.REPORTED, ok)

    def _not_recorded(self, failure: Failure, remote: RemoteLease) -> None:
        """
        The end of C{remote} failed for good (the recorder logged why).
        """
        if failure.check(StaleLease):
            self._forget(remote, LeaseEnd.SUPERSEDED, None)
            return
        if remote.ending is not LeaseEnd.REPORTED:
            # An expiry or a cancel the store refused: the lease is over in
            # memory all the same; a restart settles what the store holds.
            self._forget(remote, remote.ending or LeaseEnd.SUPERSEDED, None)
            return
        # The result is not recorded (the dispatcher is stopping, or the
        # store failed in a way it does not write again): the lease stays
        # the worker's, with a fresh life, and a resend writes it again.
        if self._report_ended(remote):
            # (The others of its report that did end freed their slots.)
            self._scheduler.slots_freed(remote.lease.holder, 0)
            self._capacity_changed()
        remote.ending = None
        waiting, remote.waiting = remote.waiting or [], None
        remote.expires = self._clock.seconds() + self.lease_seconds
        if self.accepting:
            # (A stopped hub leaves no timer behind: a restart resumes.)
            self._arm_reaper()
        for d in waiting:
            d.errback(failure)

    def _forget(
        self, remote: RemoteLease, reason: LeaseEnd, answer: Optional[LeaseVerdict]
    ) -> None:
        """
        The end of C{remote} committed (or failed for good): forget the
        lease, remember why it ended, free its slot, and answer the reports
        that wait (C{answer}, or the refusal that now applies).
        """
        lease = remote.lease
        if self.leases.get(lease.job_id) is remote:
            del self.leases[lease.job_id]
        if self._silent.get(lease.job_id) is remote:
            del self._silent[lease.job_id]
        worker = self.workers.get(lease.holder)
        if worker is not None:
            worker.jobs.discard(lease.job_id)
        self._endings[lease.token] = reason
        while len(self._endings) > REMEMBERED_ENDINGS:
            self._endings.popitem(last=False)
        waiting, remote.waiting = remote.waiting or [], None
        if answer is None and waiting:
            refused = self.refusal(lease.job_id, lease.token)
            answer = LeaseVerdict(lease.job_id, lease.token, refused)
        for d in waiting:
            d.callback(answer)
        if self._report_ended(remote):
            self._scheduler.slots_freed(lease.holder, 0)
            self._capacity_changed()

    def _report_ended(self, remote: RemoteLease) -> bool:
        """
        The end of C{remote} is settled: whether the scheduler should look
        for free capacity now.  The results of one report commit together,
        and the scheduler looks once, at the last of them: a report of
        sixteen results made sixteen passes over the holders, where one
        does (the report's own request for work claimed for its slots
        already).
        """
        batch, remote.report = remote.report, None
        if batch is None:
            return True
        batch.pending -= 1
        return batch.pending <= 0

    def _mark_running(self, lease: Lease) -> Deferred:
        d = self._recorder.mark_running(lease, self._clock.seconds())
        d.addErrback(
            lambda f: None
            if f.check(StaleLease, StoreClosed)
            else log.failure("marking job {job_id} running failed", f, job_id=lease.job_id)
        )
        return self._track(d)

    def _track(self, d: Deferred) -> Deferred:
        self._writes.add(d)

        def untrack(result: Any) -> Any:
            self._writes.discard(d)
            return result

        return d.addBoth(untrack)

    def _arm_reaper(self) -> None:
        """
        Wake at the earliest expiry.  Renewals only move expiries later, so
        a wake-up that finds nothing due just sets the next one.  The stall
        watchdog runs as long as leases are out.
        """
        if not self.leases:
            return
        self._arm_watchdog()
        if self._reaper is not None and self._reaper.active():
            return
        # A lease whose end is being recorded does not expire.
        earliest = min(
            (remote.expires for remote in self.leases.values() if remote.ending is None),
            default=None,
        )
        if earliest is None:
            return
        self._reaper = self._clock.callLater(
            max(0.0, earliest - self._clock.seconds()), self._reap
        )

    def _reap(self) -> None:
        if self._stalled(self._reaper.getTime()):
            return
        now = self._clock.seconds()
        due = [r for r in self.leases.values() if r.expires <= now and r.ending is None]
        for remote in due:
            lease = remote.lease
            if self._wait_for_silent(remote, now):
                continue
            self.leases_expired += 1
            log.warn(
                "the lease of job {job_id} attempt {attempt} on worker {holder} "
                "expired: no heartbeat for {seconds:g} s{elsewhere}",
                job_id=lease.job_id,
                attempt=lease.attempt,
                holder=lease.holder,
                seconds=self.lease_seconds,
                elsewhere=""
                if self._adopt is None
                else " here (if its worker moved to another dispatcher, that one "
                "serves it now, and this expiry is refused)",
            )
            worker = self.workers.get(lease.holder)
            if worker is not None and worker.poll is not None:
                # A worker that let a lease run out is presumed stopped or
                # cut off, and its open poll with it: left open, it would
                # swallow the job again, and each job it got would run out
                # in turn.  A live worker just asks again.
                self._end_poll(worker, [])
            self._end(
                remote,
                LeaseEnd.EXPIRED,
                Outcome(
                    JobState.FAILED,
                    error=f"lost: its worker {lease.holder} sent no heartbeat for "
                    f"{self.lease_seconds:g} s",
                ),
                served=True,
            )
        self._forget_idle(now)
        self._arm_reaper()

    def holder_lost(self, holder: str, error: str) -> list[str]:
        """
        The worker C{holder} is known to be gone, with everything it ran
        (its backend saw the batch job it ran in end): its leases end now,
        each attempt failed with C{error} (and retried by its job's rules),
        instead of when they run out.  The ids of the jobs whose leases
        ended.
        """
        ended = []
        for remote in list(self.leases.values()):
            lease = remote.lease
            if lease.holder != holder or remote.ending is not None:
                continue
            if self._silent.get(lease.job_id) is remote:
                del self._silent[lease.job_id]
            self.leases_expired += 1
            log.warn(
                "job {job_id} attempt {attempt} on worker {holder} is lost: {error}",
                job_id=lease.job_id,
                attempt=lease.attempt,
                holder=holder,
                error=error,
            )
            ended.append(lease.job_id)
            self._end(remote, LeaseEnd.EXPIRED, Outcome(JobState.FAILED, error=error))
        worker = self.workers.get(holder)
        if ended and worker is not None and worker.poll is not None:
            self._end_poll(worker, [])
        return ended

    def _wait_for_silent(self, remote: RemoteLease, now: float) -> bool:
        """
        Whether the lease of C{remote}, which ran out now, waits longer for
        its worker instead of ending.

        Once a job's last attempt is over, no other attempt can run beside
        it, so nothing is won by ending it the moment its lease runs out:
        its worker may be cut off (a partition, a proxy, a dispatcher it
        could not reach), and its job may have succeeded meanwhile.  Its
        lease waits C{last_attempt_grace} more for the worker's word: a
        result is then recorded as it came, and a heartbeat renews it.  The
        worker has stopped a job still running at its fence all the same
        (docs/worker-protocol.md, "Self-fencing"), and reports it so.  A job
        with attempts left goes back to the queue at once: waiting would
        delay every retry of a worker that died.  (After an explicit retry
        the attempt numbers run past C{max_attempts}: such a job waits too.)
        """
        lease = remote.lease
        if (
            remote.silent_since is not None
            or self.last_attempt_grace <= 0
            or lease.attempt < lease.spec.max_attempts
        ):
            return False
        remote.silent_since = remote.expires - self.lease_seconds
        remote.expires = now + self.last_attempt_grace
        self._silent[lease.job_id] = remote
        log.warn(
            "the lease of job {job_id} attempt {attempt} on worker {holder} ran "
            "out (no heartbeat for {seconds:g} s); as its last attempt it waits "
            "{grace:g} s more for its worker's result before it is recorded lost",
            job_id=lease.job_id,
            attempt=lease.attempt,
            holder=lease.holder,
            seconds=self.lease_seconds,
            grace=self.last_attempt_grace,
        )
        return True

    def silent(self) -> dict[str, tuple[int, str]]:
        """
        The jobs whose last attempt waits for a silent worker: by job id,
        the attempt and its wait reason.
        """
        return {
            job_id: (
                remote.lease.attempt,
                silent_worker(remote.lease.holder, remote.silent_since, remote.expires),
            )
            for job_id, remote in self._silent.items()
            if remote.ending is None
        }

    # Stalls

    def _arm_watchdog(self) -> None:
        if self._watchdog is None or not self._watchdog.active():
            # Nothing ran the watchdog while no lease was out: time starts
            # counting now.
            self._ran = self._clock.seconds()
            self._watchdog = self._clock.callLater(self.stall_tick, self._watch)

    def _watch(self) -> None:
        """
        The watchdog's tick: notice a stall, and tick again while leases are
        out.
        """
        self._stalled(self._watchdog.getTime())
        if self.leases:
            # (Unless a stall's re-arming of the reaper armed it already.)
            self._arm_watchdog()

    def _stalled(self, due: float) -> bool:
        """
        A timer of the hub that was due at C{due} runs now.  If it runs more
        than a watchdog tick late, the dispatcher could not run meanwhile
        (stopped, swapped out, a long pause or a blocking call), and the
        heartbeats and results its workers sent meanwhile wait unread in
        its sockets: push every live lease's expiry later by that time, so
        that the time the dispatcher could not run does not count against
        any lease; and re-arm the reaper, so that what waits in the sockets
        is read before anything expires (the reactor runs due timers before
        it polls for I/O).  True if it found a stall.

        The watchdog ticks while leases are out, so no stall goes unseen
        for longer than a tick; the time counted is the time since the
        later of C{due} and the last run of any timer of the hub, during
        which the reactor certainly did not run (a stall that began before
        that is counted short by less than a tick).  No lease is left to
        expire within a tick of the dispatcher's waking, the time it takes
        to read its sockets again (a worker that retried on a new connection
        waits to be accepted first).
        """
        now = self._clock.seconds()
        stalled = now - max(due, self._ran)
        self._ran = now
        if stalled <= self.stall_tick:
            return False
        extended = 0
        floor = now + self.stall_tick
        for remote in self.leases.values():
            if remote.ending is None:
                remote.expires = max(remote.expires + stalled, floor)
                extended += 1
        log.warn(
            "the dispatcher did not run for {seconds:.1f} s (stopped, swapped "
            "out or blocked): {count} remote leases extended by that much, so "
            "that the heartbeats and results sent meanwhile are read before "
            "any lease expires",
            seconds=stalled,
            count=extended,
        )
        if self._reaper is not None and self._reaper.active():
            self._reaper.cancel()
        self._arm_reaper()
        return True

    def _forget_idle(self, now: float, after: Optional[float] = None) -> None:
        """
        Forget the workers with no lease and no poll open that were last
        heard from more than C{after} seconds ago (by default
        L{FORGET_AFTER_LEASES} lease lives).
        """
        if after is None:
            after = FORGET_AFTER_LEASES * self.lease_seconds
        for name, worker in list(self.workers.items()):
            if worker.poll is None and not worker.jobs and now - worker.last_contact > after:
                del self.workers[name]
                self._uncount(worker)

    def forget_worker(self, name: str) -> bool:
        """
        Forget the worker C{name} now, if it holds no lease and has no poll
        open (its backend saw the batch job it ran in end, and its
        credential is revoked): its name no longer counts against
        C{max_names}.  Whether it was forgotten.
        """
        worker = self.workers.get(name)
        if worker is None or worker.poll is not None or worker.jobs:
            return False
        del self.workers[name]
        self._uncount(worker)
        return True

    def _uncount(self, worker: Worker) -> None:
        """
        The name of C{worker} no longer counts for its credential.
        """
        names = self._names.get(worker.credential)
        if names is not None:
            names.discard(worker.offer.holder)
            if not names:
                del self._names[worker.credential]

    # What people see

    def describe(self) -> list[ConnectedWorker]:
        """
        The connected workers, by name, for C{GET /v1/workers}.
        """
        now = self._clock.seconds()
        return [
            ConnectedWorker(
                worker.offer,
                worker.free_slots,
                self.free(worker.offer.holder),
                tuple(sorted(worker.jobs)),
                worker.poll is not None,
                worker.last_contact,
                worker.shared_until >= now,
            )
            for worker in sorted(self.connected(), key=lambda w: w.offer.holder)
        ]
