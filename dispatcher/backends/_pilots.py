"""
A Slurm backend's pilots: C{dispatcher worker} processes submitted as Slurm
jobs, which call back to the dispatcher and take the jobs of the backend's
queues (and only those: L{dispatcher.model._routing}).

Each pilot has a name C{pilot.BACKEND.TAG} (its worker name and its
credential's), a worker credential of its own, made before its C{sbatch}
and revoked once Slurm shows it ended, and a Slurm job named
C{dispatcher-pilot} whose comment is its name.  Its batch script writes
the token to a 0600 file on the node and C{exec}s the worker, so that the
signals Slurm sends the batch shell reach the worker itself: at
C{drain_before} seconds before the time limit (C{--signal=B:TERM@N}) and
when the pilot is scaled down (C{scancel --batch --signal=TERM}) the
worker stops taking jobs, lets its running ones finish for its grace, and
exits.

Scaling, every second: as many pilots as the backend's waiting and running
jobs fill (C{slots} each), up to C{max_pilots}, counting those still
pending in Slurm and not those past their drain point (another replaces
each); when no job waits, a pilot that has held no job for
C{idle_timeout} is drained.

Time limits: each pilot has a deadline in the hub (L{WorkerHub.deadlines}),
its Slurm end less L{STOP_MARGIN}: at first its submission plus its time
limit (it cannot end sooner), then what C{squeue} says is left.  A job
whose C{timeout} would run past it is not given to that pilot, and waits
saying so; a job without a timeout may be, and is stopped and given back
if the pilot's drain outlasts it.

Finding the dead: one C{squeue} for all pilots every C{poll_interval}
seconds.  A pilot whose Slurm job is gone or over (scancel, time limit,
node failure, preemption) has its credential revoked; the jobs it held go
back to the queue by the lease rules, when their leases expire.  A
C{squeue} that fails declares nothing lost.  A restarted dispatcher
finds its pilots from the credentials file and the next C{squeue} (by
their comments): it submits none twice and revokes the credentials of
pilots that ended while it was down.
"""

from __future__ import annotations

import math
import secrets
import shlex
from typing import Any, Optional

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from dispatcher.backends._slurm import SlurmCommands, SlurmError
from dispatcher.config._backends import SlurmBackend
from dispatcher.model._jobs import JobState
from dispatcher.model._principals import Role
from dispatcher.model._routing import PILOT_PREFIX, pilot_name
from dispatcher.store._credentials import CredentialError

log = Logger()

# The Slurm job name of every pilot.
PILOT_JOB_NAME = "dispatcher-pilot"

# Seconds between two scaling decisions.
SCALE_INTERVAL = 1.0

# How many pilots one decision submits at most (each an sbatch).
MAX_SUBMITS_PER_ROUND = 16

# Seconds a pilot's worker keeps of its drain for its own stop, before
# Slurm's time limit ends it.
STOP_MARGIN = 10.0

# How many revoked pilots' names are remembered, to cancel a Slurm job
# still running under one.
MAX_REVOKED = 10_000

# Pilots that end without ever calling (a worker_command that does not
# run, a URL the nodes cannot reach) hold further submissions back: 2 s
# after the first, doubled with each, up to this.
MAX_SUBMIT_BACKOFF = 300.0


@attrs.define
class Pilot:
    """
    One pilot as the service knows it.

    @ivar name: its worker and credential name.
    @ivar job_id: its Slurm job id (C{None}: not known yet, for a pilot
        found in the credentials at start until C{squeue} names it).
    @ivar submitted: when its C{sbatch} answered (the clock's time); a
        C{squeue} begun before then cannot show it.
    @ivar state: its Slurm state at the last look.
    @ivar draining: told to stop taking jobs.
    @ivar idle_since: since when it holds no job (while nothing waits).
    """

    name: str
    job_id: Optional[str]
    submitted: float
    state: str = "PENDING"
    draining: bool = False
    idle_since: Optional[float] = None
    connected: bool = False


def batch_script(backend: SlurmBackend, name: str, token: str) -> str:
    """
    The batch script of the pilot C{name}: the token to a private file,
    then C{exec} the worker (so Slurm's signals reach it).
    """
    grace = max(0.0, backend.drain_before - STOP_MARGIN)
    if backend.pilot_dir is not None:
        directory = shlex.quote(backend.pilot_dir.rstrip("/")) + '/"$SLURM_JOB_ID"'
    else:
        directory = '"${TMPDIR:-/tmp}/dispatcher-pilot-$SLURM_JOB_ID"'
    worker = [
        *backend.worker_command,
        "--url", backend.url,
        "--token-file", "@TOKEN@",
        "--name", name,
        "--slots", str(backend.slots),
        "--cpus", f"{backend.pilot_cpus:g}",
        "--grace", f"{grace:g}",
        "--keep-days", "0",
        "--data-dir", "@DATA@",
        "--label", f"backend={backend.name}",
        "--label", "slurm_job_id=@JOBID@",
    ]
    if backend.memory_mb is not None:
        worker += ["--memory", str(backend.memory_mb)]
    if backend.ca_file is not None:
        worker += ["--ca-file", backend.ca_file]
    command = " ".join(shlex.quote(word) for word in worker)
    command = (
        command.replace("@TOKEN@", '"$pilot/token"')
        .replace("@DATA@", '"$pilot/data"')
        .replace("slurm_job_id=@JOBID@", 'slurm_job_id="$SLURM_JOB_ID"')
    )
    return (
        "#!/bin/sh\n"
        f"# dispatcher pilot {name} of backend {backend.name}\n"
        "umask 077\n"
        f"pilot={directory}\n"
        'mkdir -p "$pilot" || exit 1\n'
        f"printf '%s\\n' {shlex.quote(token)} > \"$pilot/token\" || exit 1\n"
        # exec: Slurm signals the batch shell alone, so the worker must be it.
        f"exec {command}\n"
    )


def _time(seconds: float) -> str:
    total = int(math.ceil(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{days}-{hours:02d}:{minutes:02d}:{secs:02d}"


def sbatch_options(backend: SlurmBackend, name: str) -> list[str]:
    """
    The C{sbatch} options of the pilot C{name}; the backend's own
    C{sbatch_options} last, so that they win.
    """
    options = [
        f"--job-name={PILOT_JOB_NAME}",
        f"--comment={name}",
        "--nodes=1",
        "--ntasks=1",
        f"--cpus-per-task={int(backend.pilot_cpus)}",
        f"--time={_time(backend.time_limit)}",
        "--output=/dev/null",
        "--no-requeue",
    ]
    if backend.drain_before > 0:
        options.append(f"--signal=B:TERM@{int(backend.drain_before)}")
    if backend.memory_mb is not None:
        options.append(f"--mem={backend.memory_mb}")
    for key in ("partition", "account", "qos"):
        value = getattr(backend, key)
        if value is not None:
            options.append(f"--{key}={value}")
    options += backend.sbatch_options
    return options


class PilotService(Service):
    """
    Keeps one Slurm backend's pilots running (see the module's docstring).

    @param backend: the backend's configuration.
    @param commands: its cluster's L{SlurmCommands}.
    @param dispatcher: the L{Dispatcher} (its queues' counts, its hub).
    @param credentials: the L{CredentialFile} pilots' credentials go in.
    @param reactor: the reactor the I/O pool reports to.
    @param io_pool: where the credentials file is written.
    @param clock: the C{IReactorTime} decisions run on.
    """

    def __init__(
        self,
        backend: SlurmBackend,
        commands: SlurmCommands,
        dispatcher: Any,
        credentials: Any,
        reactor: Any,
        io_pool: Any,
        clock: Any = None,
    ) -> None:
        self.backend = backend
        self.commands = commands
        self._dispatcher = dispatcher
        self._credentials = credentials
        self._reactor = reactor
        self._io_pool = io_pool
        self._clock = clock if clock is not None else reactor
        self.pilots: dict[str, Pilot] = {}
        # When each pilot's jobs must have ended (the hub's, shared).
        self._deadlines: dict[str, float] = dispatcher.hub.deadlines
        self._prefix = f"{PILOT_PREFIX}{backend.name}."
        self._timer: Any = None
        self._round: Optional[Deferred] = None
        self._last_look = float("-inf")
        # Whether the last squeue failed (said once, then when it works).
        self._looks_failing = False
        # Pilots submitted since start, and those found ended (the metrics'
        # and the tests').
        self.submitted = 0
        self.ended = 0
        # The names whose credentials this run revoked (the last
        # MAX_REVOKED): a Slurm job that still runs under one (an sbatch
        # that timed out but went through) is cancelled when seen.
        self._revoked: dict[str, None] = {}
        # Pilots in a row that ended without ever calling, and the time
        # before which no pilot is submitted because of them.
        self.failures = 0
        self.hold_until = float("-inf")

    # Life cycle

    def startService(self) -> None:
        Service.startService(self)
        now = self._clock.seconds()
        for credential in self._credentials.credentials():
            name = credential.principal.name
            if name.startswith(self._prefix) and name not in self.pilots:
                # Left by an earlier run: its job id comes from the next
                # squeue, or it is revoked when that shows no such pilot.
                self.pilots[name] = Pilot(name, None, now, "UNKNOWN")
                # Its end is unknown until squeue says: no job with a
                # timeout goes to it meanwhile.
                self._deadlines[name] = now
        if self.pilots:
            log.info(
                "backend {backend}: {count} pilots of an earlier run to find in Slurm",
                backend=self.backend.name,
                count=len(self.pilots),
            )
        self._schedule(0.0)

    def stopService(self) -> Deferred:
        """
        Stop deciding; the pilots run on (a restart finds them again).
        Fires once the round under way is over.
        """
        Service.stopService(self)
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        d: Deferred = Deferred()
        if self._round is None:
            d.callback(None)
        else:
            self._round.addBoth(lambda _: d.callback(None))
        return d

    def _schedule(self, delay: float) -> None:
        if self.running:
            self._timer = self._clock.callLater(delay, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self._round = ensureDeferred(self._one_round())

        def done(result: Any) -> None:
            self._round = None
            if result is not None and hasattr(result, "getTraceback"):
                log.failure("backend {backend}: a round failed", result,
                            backend=self.backend.name)
            self._schedule(SCALE_INTERVAL)

        self._round.addBoth(done)

    async def _one_round(self) -> None:
        now = self._clock.seconds()
        if now - self._last_look >= self.backend.poll_interval:
            self._last_look = now
            await self.look()
        if self.running:
            await self.scale()

    # Finding the dead

    async def look(self) -> bool:
        """
        One C{squeue} for every pilot: note their states, adopt the
        pilots of an earlier run, and end those Slurm no longer runs.
        Whether the look succeeded (a failed one changes nothing).
        """
        began = self._clock.seconds()
        try:
            jobs = await self.commands.jobs(PILOT_JOB_NAME)
        except SlurmError as e:
            if not self._looks_failing:
                log.warn(
                    "backend {backend}: squeue failed, so no pilot is taken for lost "
                    "until it works: {error}",
                    backend=self.backend.name,
                    error=str(e),
                )
            self._looks_failing = True
            return False
        if self._looks_failing:
            log.info("backend {backend}: squeue works again", backend=self.backend.name)
            self._looks_failing = False
        by_name = {job.comment: job for job in jobs if job.comment.startswith(self._prefix)}
        for name, job in by_name.items():
            if name in self._revoked and name not in self.pilots and not job.ended:
                # Its credential is gone, so it can do nothing but retry
                # until its time limit: free its allocation.
                try:
                    await self.commands.cancel(job.job_id)
                except SlurmError as e:
                    log.warn("backend {backend}: cancelling Slurm job {job_id}, a pilot "
                             "without a credential, failed: {error}",
                             backend=self.backend.name, job_id=job.job_id, error=str(e))
                else:
                    self._revoked.pop(name, None)
                    log.warn("backend {backend}: Slurm job {job_id} runs pilot {name}, "
                             "whose credential was revoked: cancelled",
                             backend=self.backend.name, job_id=job.job_id, name=name)
        gone = []
        for pilot in list(self.pilots.values()):
            if pilot.submitted > began:
                # Submitted while squeue ran: not in its answer yet.
                continue
            job = by_name.get(pilot.name)
            if pilot.job_id is not None and (job is None or job.job_id != pilot.job_id):
                job = None
            if job is None or job.ended:
                gone.append((pilot, None if job is None else job.state))
                continue
            if pilot.job_id is None:
                pilot.job_id = job.job_id
                log.info(
                    "backend {backend}: pilot {name} of an earlier run found as Slurm "
                    "job {job_id} ({state})",
                    backend=self.backend.name,
                    name=pilot.name,
                    job_id=job.job_id,
                    state=job.state,
                )
            pilot.state = job.state
            if job.time_left is not None:
                # From when squeue began: an end no later than the truth.
                self._deadlines[pilot.name] = began + job.time_left - STOP_MARGIN
        for pilot, state in gone:
            await self._ended(pilot, state)
        return True

    async def _ended(self, pilot: Pilot, state: Optional[str]) -> None:
        self.pilots.pop(pilot.name, None)
        self._deadlines.pop(pilot.name, None)
        self.ended += 1
        if not pilot.connected and not pilot.draining and pilot.job_id is not None:
            # It never called: submitting the next at once would make a
            # storm of pilots that fail the same way.
            self.failures += 1
            delay = min(MAX_SUBMIT_BACKOFF, 2.0 ** self.failures)
            self.hold_until = self._clock.seconds() + delay
            log.warn(
                "backend {backend}: pilot {name} (Slurm job {job_id}) ended ({state}) "
                "without ever calling the dispatcher at {url}; no pilot is submitted "
                "for {delay:g} s ({failures} such in a row). Look at its output "
                "(sbatch_options = --output=PATH) and at worker_command and url",
                backend=self.backend.name,
                name=pilot.name,
                job_id=pilot.job_id,
                state=state or "no longer in squeue",
                url=self.backend.url,
                delay=delay,
                failures=self.failures,
            )
        log.info(
            "backend {backend}: pilot {name} (Slurm job {job_id}) has ended ({state}); "
            "its credential is revoked{jobs}",
            backend=self.backend.name,
            name=pilot.name,
            job_id=pilot.job_id or "unknown",
            state=state or "no longer in squeue",
            jobs=", and the jobs it held go back to the queue as their leases expire"
            if self._held(pilot.name)
            else "",
        )
        await self._revoke(pilot.name)

    async def _revoke(self, name: str) -> None:
        self._revoked[name] = None
        while len(self._revoked) > MAX_REVOKED:
            del self._revoked[next(iter(self._revoked))]
        try:
            await deferToThreadPool(
                self._reactor, self._io_pool, self._credentials.revoke, name
            )
        except CredentialError as e:
            log.warn("backend {backend}: revoking {name}'s credential failed: {error}",
                     backend=self.backend.name, name=name, error=str(e))

    # Scaling

    def _held(self, name: str) -> int:
        worker = self._dispatcher.hub.workers.get(name)
        return 0 if worker is None else len(worker.jobs)

    async def _demand(self) -> tuple[int, int]:
        """
        How many jobs of the backend's queues wait (queued) that a pilot
        could run, and how many run (staging or running).
        """
        routing = self._dispatcher.routing
        queues = routing.queues_of(self.backend.name)
        if not queues:
            return 0, 0
        store = self._dispatcher.store
        counts = await store.queue_counts(None)
        waiting = running = 0
        shape = routing.shapes.get(self.backend.name)
        for queue in sorted(queues):
            states = counts.get(queue)
            if states is None:
                continue
            queued = states[JobState.QUEUED]
            running += states[JobState.RUNNING] + states[JobState.STAGING]
            if queued and shape is not None:
                queued = await self._fitting(queue, queued, shape)
            waiting += queued
        return waiting, running

    async def _fitting(self, queue: str, queued: int, shape: Any) -> int:
        """
        Of the C{queued} jobs of C{queue}, how many a pilot could run: a
        sample of the oldest (enough to fill every pilot) is looked at, and
        its share that fits stands for the rest.  Jobs no pilot could run
        call for none (they wait, saying why).
        """
        sample = max(1, self.backend.max_pilots * self.backend.slots)
        jobs, _ = await self._dispatcher.store.list_jobs(
            state=JobState.QUEUED, queue=queue, limit=sample
        )
        if not jobs:
            return queued
        fit = sum(1 for job in jobs if shape.refuses(job.spec) is None)
        if len(jobs) >= queued or not fit:
            return fit
        return max(fit, round(queued * fit / len(jobs)))

    async def scale(self) -> None:
        """
        Submit the pilots the backend's jobs need, drain those idle.
        """
        waiting, running = await self._demand()
        backend = self.backend
        workers = self._dispatcher.hub.workers
        for pilot in self.pilots.values():
            if not pilot.connected and pilot.name in workers and workers[pilot.name].heard:
                pilot.connected = True
                self.failures = 0
        now = self._clock.seconds()
        # A pilot past its drain point (Slurm's SIGTERM before its time
        # limit) takes nothing more: another replaces it.
        drain_margin = backend.drain_before - STOP_MARGIN
        live = [
            p for p in self.pilots.values()
            if not p.draining
            and not (
                p.state == "RUNNING"
                and self._deadlines.get(p.name, float("inf")) - drain_margin <= now
            )
        ]
        want = min(backend.max_pilots, math.ceil((waiting + running) / backend.slots))
        missing = min(want - len(live), MAX_SUBMITS_PER_ROUND)
        if now < self.hold_until:
            missing = 0
        for _ in range(missing):
            if not self.running:
                return
            if not await self._submit():
                break
        now = self._clock.seconds()
        for pilot in live:
            if waiting or self._held(pilot.name):
                pilot.idle_since = None
                continue
            if pilot.idle_since is None:
                pilot.idle_since = now
            elif now - pilot.idle_since >= backend.idle_timeout and pilot.job_id is not None:
                await self._drain(pilot)

    async def _submit(self) -> bool:
        name = pilot_name(self.backend.name, secrets.token_hex(6))
        try:
            token, _ = await deferToThreadPool(
                self._reactor, self._io_pool, self._credentials.create, name, Role.WORKER
            )
        except CredentialError as e:
            log.warn("backend {backend}: no pilot submitted: its credential could not be "
                     "made: {error}", backend=self.backend.name, error=str(e))
            return False
        try:
            job_id = await self.commands.submit(
                batch_script(self.backend, name, token), sbatch_options(self.backend, name)
            )
        except SlurmError as e:
            log.warn("backend {backend}: sbatch of a pilot failed (tried again in "
                     "{delay:g} s): {error}", backend=self.backend.name, error=str(e),
                     delay=SCALE_INTERVAL)
            # Unless it ran after all (a timeout): then squeue finds it
            # without a credential, and it stops at its first call.
            await self._revoke(name)
            return False
        submitted = self._clock.seconds()
        self.pilots[name] = Pilot(name, job_id, submitted)
        # It cannot end before its time limit counted from now: a bound
        # below the truth until squeue tells how long it has left.
        self._deadlines[name] = submitted + self.backend.time_limit - STOP_MARGIN
        self.submitted += 1
        log.info(
            "backend {backend}: pilot {name} submitted as Slurm job {job_id} "
            "({count} of at most {most})",
            backend=self.backend.name,
            name=name,
            job_id=job_id,
            count=len(self.pilots),
            most=self.backend.max_pilots,
        )
        return True

    async def _drain(self, pilot: Pilot) -> None:
        """
        Tell C{pilot} to stop: a pending one is cancelled, a running one's
        worker gets SIGTERM and exits once its jobs are done.
        """
        assert pilot.job_id is not None
        try:
            if pilot.state == "PENDING":
                await self.commands.cancel(pilot.job_id)
            else:
                await self.commands.signal_batch(pilot.job_id, "TERM")
        except SlurmError as e:
            log.warn("backend {backend}: draining pilot {name} failed (tried again): "
                     "{error}", backend=self.backend.name, name=pilot.name, error=str(e))
            return
        pilot.draining = True
        log.info(
            "backend {backend}: pilot {name} (Slurm job {job_id}) idle for {idle:g} s "
            "with no job waiting: drained",
            backend=self.backend.name,
            name=pilot.name,
            job_id=pilot.job_id,
            idle=self.backend.idle_timeout,
        )
