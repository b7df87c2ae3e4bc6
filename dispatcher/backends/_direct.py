"""
A Slurm backend in direct mode: each job of its queues gets a Slurm job of
its own, sized to the job's resources, so that the site's accounting and
fair share see every job.

A Slurm job is a single-job pilot: it runs C{dispatcher worker --one-job}
under a credential made for that job alone (C{direct.JOB.TAG},
L{dispatcher.model._routing.direct_name}, whose claims read that job and
no other), takes the job under the same fenced lease as any worker, runs
it, reports it and exits.  So the job's outcome (its exit code, signal,
output) comes through the worker protocol, never from Slurm's view.

Submitting, every second and L{BATCH_WINDOW} after a job of the backend's
queues is queued: the queued jobs of the backend's queues that
have no Slurm job yet (up to C{max_jobs} bound at once) are grouped by
what they ask of Slurm (CPUs, memory, GPUs, time limit, requirements), and
each group is one C{sbatch}: a job array (C{--array=0-N}) when it holds
more than one job.  Before the C{sbatch}, the batch (its tag and its jobs,
in order) is written to C{DATA_DIR/slurm-direct-BACKEND.json} and the
jobs' credentials are made; its Slurm job carries C{--comment
direct.BACKEND.TAG}.  A restarted dispatcher reads the file, finds the
batches' Slurm jobs by their comments in the next C{squeue}, and submits
none of their jobs again; a batch written whose C{sbatch} never ran (a
crash between the two) is not in C{squeue}, and its jobs are submitted
anew.

Slurm's view is used only to find Slurm jobs that died or never started:
one C{squeue} for all the backend's Slurm jobs every C{poll_interval}.  A
Slurm job gone or over whose job its worker still holds: the attempt fails
at once with what Slurm says (its time limit, a cancel, its node's
failure, out of memory, preemption: from C{squeue}'s last state or
C{sacct}, else "ended without reporting"), and the job's retries decide
the rest.  One that ended before its worker took the job (cancelled or
failed while pending, a worker that could not start) fails an attempt of
the job just so, recorded under its worker's name, and submissions are
held back, doubling, while Slurm jobs end so.  A C{squeue} that fails
declares nothing lost.

Cancelling: a job cancelled (or ended) before its worker took it has its
Slurm job cancelled (C{scancel}) within L{BATCH_WINDOW}; a running one is
stopped by its worker, told in its heartbeat's answer, as on any worker.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shlex
from typing import Any, Optional, Sequence

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from dispatcher.backends._slurm import SlurmCommands, SlurmError, SlurmJob
from dispatcher.config._backends import SlurmBackend
from dispatcher.model._events import JobEvent, SameChange
from dispatcher.model._jobs import Job, JobState, Offer, Outcome, UnknownJob
from dispatcher.model._routing import direct_name
from dispatcher.store._credentials import CredentialError, write_private

log = Logger()

# The Slurm job name of every direct-mode job.
DIRECT_JOB_NAME = "dispatcher-direct"

# Seconds between two rounds (submissions, cancels).
ROUND_INTERVAL = 1.0

# Seconds a round waits, once a job of the backend's queues is queued or
# cancelled, for others to come with it: jobs queued within it go in one
# sbatch (an array) when they are of one shape.
BATCH_WINDOW = 0.2

# How many sbatch one round runs at most, and the most jobs in one array.
MAX_SUBMITS_PER_ROUND = 8
MAX_ARRAY = 1000

# Seconds added to a job's timeout for its Slurm time limit: its worker's
# start, staging and report.
TIME_MARGIN = 60.0

# Seconds a Slurm job may go on running once its job has ended (its worker
# reports and exits by itself) before it is cancelled.
LINGER = 30.0

# Slurm jobs that end before their worker took the job hold further
# submissions back: 2 s after the first, doubled with each, up to this.
MAX_SUBMIT_BACKOFF = 300.0

# How many tags of batches whose sbatch failed are remembered, to cancel a
# Slurm job that went through all the same.
MAX_FAILED_TAGS = 10_000

# What Slurm's final states mean for a job, as its error says it.
_STATE_ERRORS = {
    "TIMEOUT": "reached its Slurm time limit",
    "CANCELLED": "was cancelled in Slurm (scancel, or an administrator)",
    "NODE_FAIL": "ended in a failure of its node",
    "BOOT_FAIL": "could not start: its node failed to boot",
    "OUT_OF_MEMORY": "ran out of memory",
    "PREEMPTED": "was preempted",
    "DEADLINE": "passed its deadline",
    "REVOKED": "was revoked (another cluster runs it)",
}


def slurm_error(task: str, state: Optional[str], exit_code: Optional[str] = None) -> str:
    """
    The error of an attempt whose Slurm job C{task} ended, in C{state}
    (C{None}: Slurm no longer shows it, and C{sacct} did not say), without
    its worker reporting the job's result.
    """
    if state is None:
        return f"Slurm job {task} ended without reporting"
    word = state.split()[0]
    said = _STATE_ERRORS.get(word)
    code = f", exit code {exit_code}" if exit_code and exit_code != "0:0" else ""
    if said is not None:
        return f"its Slurm job {task} {said} ({word}{code}), and its worker did not report"
    return f"its Slurm job {task} ended ({word}{code}) without its worker reporting"


def split_task(job_id: str) -> tuple[str, Optional[int]]:
    """
    C{squeue}'s id of a job (C{123}) or an array's task (C{123_4}) as its
    job id and task index.
    """
    head, sep, tail = job_id.partition("_")
    if sep and tail.isdigit():
        return head, int(tail)
    return head, None


def _time(seconds: float) -> str:
    total = int(math.ceil(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{days}-{hours:02d}:{minutes:02d}:{secs:02d}"


@attrs.frozen
class SlurmShape:
    """
    What a direct-mode job asks of Slurm: jobs of one shape go in one
    array.
    """

    cpus: int
    memory_mb: int
    gpus: int
    time_limit: float
    # Its requirements, as the worker's labels (the job's own claim checks
    # them; Slurm sees them only through the backend's sbatch_options).
    labels: tuple[tuple[str, str], ...]
    offered_cpus: float

    @classmethod
    def of(cls, job: Job, backend: SlurmBackend) -> "SlurmShape":
        spec = job.spec
        need = spec.resources
        timeout = spec.timeout
        return cls(
            max(1, int(math.ceil(need.cpus))),
            need.memory_mb,
            need.gpus,
            timeout + TIME_MARGIN if timeout is not None else backend.time_limit,
            tuple(sorted(spec.requirements.items())),
            max(need.cpus, 1.0),
        )


def sbatch_options(
    backend: SlurmBackend, shape: SlurmShape, tag: str, count: int
) -> list[str]:
    """
    The C{sbatch} options of a batch of C{count} jobs of C{shape}; the
    backend's own C{sbatch_options} last, so that they win.
    """
    options = [
        f"--job-name={DIRECT_JOB_NAME}",
        f"--comment=direct.{backend.name}.{tag}",
        "--nodes=1",
        "--ntasks=1",
        f"--cpus-per-task={shape.cpus}",
        f"--time={_time(shape.time_limit)}",
        "--output=/dev/null",
        "--no-requeue",
    ]
    if count > 1:
        options.append(f"--array=0-{count - 1}")
    if shape.memory_mb:
        options.append(f"--mem={shape.memory_mb}")
    if shape.gpus:
        options.append(
            f"--gres=gpu:{shape.gpus}" if backend.gpu_option == "gres" else f"--gpus={shape.gpus}"
        )
    for key in ("partition", "account", "qos"):
        value = getattr(backend, key)
        if value is not None:
            options.append(f"--{key}={value}")
    options += backend.sbatch_options
    return options


def batch_script(
    backend: SlurmBackend, shape: SlurmShape, names: Sequence[str], tokens: Sequence[str]
) -> str:
    """
    The batch script of a batch: each array task (or the one job) picks
    its job's name and token, writes the token to a private file and
    C{exec}s a one-job worker (so Slurm's signals reach it).
    """
    if backend.pilot_dir is not None:
        directory = shlex.quote(backend.pilot_dir.rstrip("/")) + '/"$SLURM_JOB_ID"'
    else:
        directory = '"${TMPDIR:-/tmp}/dispatcher-direct-$SLURM_JOB_ID"'
    worker = [
        *backend.worker_command,
        "--url", backend.url,
        "--token-file", "@TOKEN@",
        "--name", "@NAME@",
        "--one-job",
        "--slots", "1",
        "--cpus", f"{shape.offered_cpus:g}",
        "--gpus", str(shape.gpus),
        "--grace", "0",
        "--keep-days", "0",
        "--data-dir", "@DATA@",
        "--label", f"backend={backend.name}",
        "--label", "slurm_job_id=@TASK@",
        "--stop-reason", "@STOP@",
        # The job sees its Slurm job's SLURM_* variables, as a batch
        # script's own commands would.
        "--slurm-environment",
    ]
    if shape.memory_mb:
        worker += ["--memory", str(shape.memory_mb)]
    for key, value in shape.labels:
        worker += ["--label", f"{key}={value}"]
    if backend.ca_file is not None:
        worker += ["--ca-file", backend.ca_file]
    command = " ".join(shlex.quote(word) for word in worker)
    stop = (
        "its Slurm job $task was ended by Slurm (scancel, preemption, or its time "
        f"limit of {_time(shape.time_limit)})"
    )
    command = (
        command.replace("@TOKEN@", '"$dir/token"')
        .replace("@NAME@", '"$name"')
        .replace("@DATA@", '"$dir/data"')
        .replace("slurm_job_id=@TASK@", 'slurm_job_id="$task"')
        .replace("@STOP@", f'"{stop}"')
    )
    cases = "".join(
        f"{index}) name={shlex.quote(name)} token={shlex.quote(token)} ;;\n"
        for index, (name, token) in enumerate(zip(names, tokens))
    )
    return (
        "#!/bin/sh\n"
        f"# dispatcher direct-mode jobs of backend {backend.name}\n"
        "umask 077\n"
        'case "${SLURM_ARRAY_TASK_ID:-0}" in\n'
        f"{cases}"
        '*) echo "dispatcher: no job for array task $SLURM_ARRAY_TASK_ID" >&2; exit 1 ;;\n'
        "esac\n"
        'task="${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}${SLURM_ARRAY_TASK_ID:+_$SLURM_ARRAY_TASK_ID}"\n'
        f"dir={directory}\n"
        'mkdir -p "$dir" || exit 1\n'
        'printf \'%s\\n\' "$token" > "$dir/token" || exit 1\n'
        # exec: Slurm signals the batch shell alone, so the worker must be it.
        f"exec {command}\n"
    )


@attrs.define(eq=False)
class Batch:
    """
    One C{sbatch} of direct-mode jobs: its tag (in its Slurm comment), its
    Slurm job id once known, and its jobs still bound, by array index.
    """

    tag: str
    array: bool
    submitted: float
    slurm_id: Optional[str] = None
    jobs: dict[int, "Binding"] = attrs.field(factory=dict)

    def task(self, index: int) -> str:
        """
        Slurm's id of the task C{index} (C{?} while the id is unknown).
        """
        slurm_id = self.slurm_id or "?"
        return f"{slurm_id}_{index}" if self.array else slurm_id


@attrs.define(eq=False)
class Binding:
    """
    A job and the Slurm job made for it.

    @ivar done_at: when the job left it (ended, or its attempt on it did),
        or C{None} while the Slurm job is the job's.
    @ivar claimed: its worker took the job.
    @ivar cancel: its Slurm job is to be cancelled (the job was cancelled
        or ended before its worker took it).
    """

    job_id: str
    name: str
    batch: Batch
    index: int
    state: str = "PENDING"
    claimed: bool = False
    done_at: Optional[float] = None
    cancel: bool = False

    @property
    def task(self) -> str:
        """
        Slurm's id of its Slurm job (C{ID_INDEX} in an array).
        """
        return self.batch.task(self.index)


class DirectService(Service):
    """
    Gives each job of one direct-mode Slurm backend's queues a Slurm job of
    its own (see the module's docstring).

    @param backend: the backend's configuration.
    @param commands: its cluster's L{SlurmCommands}.
    @param dispatcher: the L{Dispatcher} (its store, events and hub).
    @param credentials: the L{CredentialFile} the jobs' credentials go in.
    @param reactor: the reactor the I/O pool reports to.
    @param io_pool: where the credentials and the batches' file are written.
    @param data_dir: the directory of the batches' file.
    @param clock: the C{IReactorTime} rounds run on.
    """

    def __init__(
        self,
        backend: SlurmBackend,
        commands: SlurmCommands,
        dispatcher: Any,
        credentials: Any,
        reactor: Any,
        io_pool: Any,
        data_dir: str,
        clock: Any = None,
    ) -> None:
        self.backend = backend
        self.commands = commands
        self._dispatcher = dispatcher
        self._credentials = credentials
        self._reactor = reactor
        self._io_pool = io_pool
        self._clock = clock if clock is not None else reactor
        self.path = os.path.join(data_dir, f"slurm-direct-{backend.name}.json")
        self._comment_prefix = f"direct.{backend.name}."
        self.batches: dict[str, Batch] = {}
        # The jobs whose Slurm job is theirs still, by job id.
        self.bound: dict[str, Binding] = {}
        self._timer: Any = None
        self._round: Optional[Deferred] = None
        self._unfollow: Any = None
        self._last_look = float("-inf")
        self._looks_failing = False
        # Whether jobs may wait unbound (a job queued, a binding ended).
        self._dirty = True
        self._failed_tags: dict[str, None] = {}
        # Jobs given a Slurm job, Slurm jobs (sbatch) made, attempts lost
        # with their Slurm job, since start (the metrics' and the tests').
        self.submitted = 0
        self.submissions = 0
        self.lost = 0
        self.failures = 0
        self.hold_until = float("-inf")

    # Life cycle

    def startService(self) -> None:
        Service.startService(self)
        self._load()
        self._unfollow = self._dispatcher.events.follow(self._events)
        self._schedule(0.0)

    def stopService(self) -> Deferred:
        """
        Stop deciding; the Slurm jobs run on (a restart finds them again).
        Fires once the round under way is over.
        """
        Service.stopService(self)
        if self._unfollow is not None:
            self._unfollow()
            self._unfollow = None
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

    def _soon(self) -> None:
        """
        Run the next round within L{BATCH_WINDOW}, not at its time: a job
        queued waits no longer than that for its sbatch, nor a cancel for
        its scancel.
        """
        timer = self._timer
        if timer is not None and timer.active():
            if timer.getTime() - self._clock.seconds() > BATCH_WINDOW:
                timer.reset(BATCH_WINDOW)

    def _tick(self) -> None:
        self._timer = None
        self._round = ensureDeferred(self._one_round())

        def done(result: Any) -> None:
            self._round = None
            if result is not None and hasattr(result, "getTraceback"):
                log.failure("backend {backend}: a round failed", result,
                            backend=self.backend.name)
            # Jobs queued while the round ran go after the batch window.
            eager = (
                self._dirty
                and len(self.bound) < self.backend.max_jobs
                and self._clock.seconds() >= self.hold_until
            )
            self._schedule(BATCH_WINDOW if eager else ROUND_INTERVAL)

        self._round.addBoth(done)

    async def _one_round(self) -> None:
        now = self._clock.seconds()
        if now - self._last_look >= self.backend.poll_interval:
            self._last_look = now
            await self.look()
        if self.running:
            await self.cancel_unwanted()
        if self.running:
            await self.submit_waiting()

    # The batches' file

    def _load(self) -> None:
        """
        The batches an earlier run wrote: their jobs stay bound until the
        next C{squeue} says what became of their Slurm jobs.
        """
        try:
            with open(self.path, "rb") as f:
                stored = json.loads(f.read())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            raise RuntimeError(f"cannot read {self.path}: {e}") from e
        now = self._clock.seconds()
        for item in stored.get("batches", []):
            batch = Batch(item["tag"], bool(item["array"]), now, item.get("slurm_id"))
            for index, (job_id, name) in enumerate(item["jobs"]):
                if job_id is None:
                    continue
                binding = Binding(job_id, name, batch, index, "UNKNOWN")
                batch.jobs[index] = binding
                self.bound[job_id] = binding
            if batch.jobs:
                self.batches[batch.tag] = batch
        if self.bound:
            log.info(
                "backend {backend}: {count} jobs in {batches} Slurm submissions of an "
                "earlier run to find in Slurm",
                backend=self.backend.name,
                count=len(self.bound),
                batches=len(self.batches),
            )

    def _stored(self) -> bytes:
        batches = []
        for batch in self.batches.values():
            size = max(batch.jobs) + 1 if batch.jobs else 0
            jobs: list[Any] = [[None, None]] * size
            for index, binding in batch.jobs.items():
                jobs[index] = [binding.job_id, binding.name]
            batches.append({"tag": batch.tag, "array": batch.array,
                            "slurm_id": batch.slurm_id, "jobs": jobs})
        return json.dumps({"version": 1, "batches": batches}).encode("utf-8")

    async def _save(self) -> None:
        body = self._stored()
        await deferToThreadPool(self._reactor, self._io_pool, write_private, self.path, body)

    # What the jobs do

    def _events(self, events: Sequence[Any]) -> None:
        queues = self._dispatcher.routing.queues_of(self.backend.name)
        if type(events) is SameChange:
            # A submission's new jobs, all alike: none is bound yet, and a
            # batch of a hundred thousand is not walked job by job.
            if events.state is JobState.QUEUED and (
                events.spec is None or events.spec.queue in queues
            ):
                self._dirty = True
                self._soon()
            return
        now = self._clock.seconds()
        for event in events:
            if not isinstance(event, JobEvent):
                continue
            binding = self.bound.get(event.job_id)
            if binding is None:
                if event.state is JobState.QUEUED and (
                    event.spec is None or event.spec.queue in queues
                ):
                    self._dirty = True
                    self._soon()
                continue
            state = event.state
            if event.holder == binding.name and not binding.claimed:
                # (Also what tells a restarted run that its worker took it.)
                binding.claimed = True
                self.failures = 0
            if state.active:
                continue
            if state.final or binding.claimed:
                # The job, or its attempt on this Slurm job, is over.
                self._unbind(binding, now)
                if not binding.claimed:
                    binding.cancel = True
                    self._soon()
                if state is JobState.QUEUED:
                    self._dirty = True

    def _unbind(self, binding: Binding, now: float) -> None:
        if self.bound.get(binding.job_id) is binding:
            del self.bound[binding.job_id]
            self._dirty = True
        if binding.done_at is None:
            binding.done_at = now

    # Finding the dead

    async def look(self) -> bool:
        """
        One C{squeue} for every Slurm job of the backend: note their
        states, find those of an earlier run, and end the bindings of those
        Slurm no longer runs.  Whether the look succeeded (a failed one
        changes nothing).
        """
        began = self._clock.seconds()
        try:
            jobs = await self.commands.jobs(DIRECT_JOB_NAME, arrays=True)
        except SlurmError as e:
            if not self._looks_failing:
                log.warn(
                    "backend {backend}: squeue failed, so no Slurm job is taken for "
                    "lost until it works: {error}",
                    backend=self.backend.name,
                    error=str(e),
                )
            self._looks_failing = True
            return False
        if self._looks_failing:
            log.info("backend {backend}: squeue works again", backend=self.backend.name)
            self._looks_failing = False
        seen: dict[str, dict[Optional[int], SlurmJob]] = {}
        for job in jobs:
            if not job.comment.startswith(self._comment_prefix):
                continue
            tag = job.comment[len(self._comment_prefix):]
            _, index = split_task(job.job_id)
            seen.setdefault(tag, {})[index] = job
        strays = [
            job for tag, tasks in seen.items()
            if tag in self._failed_tags and tag not in self.batches
            for job in tasks.values() if not job.ended
        ]
        if strays:
            # Their credentials are gone: free their allocations.
            await self._scancel([job.job_id for job in strays], "whose sbatch had failed")
        ended: list[tuple[Binding, Optional[str]]] = []
        now = self._clock.seconds()
        for batch in list(self.batches.values()):
            if batch.submitted > began:
                # Submitted while squeue ran: not in its answer yet.
                continue
            tasks = seen.get(batch.tag, {})
            if batch.slurm_id is None and tasks:
                batch.slurm_id = split_task(next(iter(tasks.values())).job_id)[0]
                log.info(
                    "backend {backend}: Slurm job {slurm_id} of an earlier run found, "
                    "with {count} jobs",
                    backend=self.backend.name,
                    slurm_id=batch.slurm_id,
                    count=len(batch.jobs),
                )
            for index, binding in list(batch.jobs.items()):
                task = tasks.get(index if batch.array else None)
                if task is not None and not task.ended:
                    binding.state = task.state
                    if binding.done_at is not None and (
                        task.state == "PENDING" or now - binding.done_at >= LINGER
                    ):
                        binding.cancel = True
                    continue
                ended.append((binding, None if task is None else task.state))
        if ended:
            await self._ended(ended)
        return True

    async def _ended(self, ended: list[tuple[Binding, Optional[str]]]) -> None:
        """
        The Slurm jobs of C{ended} are over (their last state, C{None}
        when C{squeue} no longer shows them): fail the attempts their
        workers still hold, give the jobs they never took another, and
        revoke their credentials.
        """
        unknown = [b.task for b, state in ended if state is None and b.done_at is None]
        accounted = await self._accounting(unknown) if unknown else {}
        now = self._clock.seconds()
        for binding, state in ended:
            exit_code = None
            if state is None and binding.task in accounted:
                state, exit_code = accounted[binding.task]
            if binding.done_at is None:
                await self._lost(binding, state, exit_code)
                self._unbind(binding, now)
            # Its worker is gone with it: its name counts no more.
            self._dispatcher.hub.forget_worker(binding.name)
            batch = binding.batch
            batch.jobs.pop(binding.index, None)
            if not batch.jobs:
                self.batches.pop(batch.tag, None)
        try:
            await deferToThreadPool(
                self._reactor, self._io_pool, self._credentials.revoke_many,
                [binding.name for binding, _ in ended],
            )
        except CredentialError as e:
            log.warn("backend {backend}: revoking the credentials of ended Slurm jobs "
                     "failed: {error}", backend=self.backend.name, error=str(e))
        await self._save()

    async def _accounting(self, tasks: list[str]) -> dict[str, tuple[str, str]]:
        """
        What C{sacct} says of C{tasks} (their state and exit code), where it
        works; nothing where it does not (no accounting on the cluster).
        """
        try:
            return await self.commands.accounting(tasks)
        except SlurmError:
            return {}

    async def _lost(self, binding: Binding, state: Optional[str],
                    exit_code: Optional[str]) -> None:
        """
        The Slurm job of C{binding} ended while the job was still its: fail
        the attempt its worker holds, or, if its worker never took the
        job, let the job have another.
        """
        try:
            job = await self._dispatcher.store.get(binding.job_id)
        except UnknownJob:
            # Removed meanwhile: nothing is left to fail or to run.
            return
        error = slurm_error(binding.task, state, exit_code)
        if job.state.active and job.attempts and job.attempts[-1].holder == binding.name:
            self.lost += 1
            self._dispatcher.hub.holder_lost(binding.name, error)
            return
        if job.state.final or job.state.active:
            return
        if binding.batch.slurm_id is None:
            # Written down, and Slurm has no job of its comment: the
            # dispatcher stopped before its sbatch.
            log.info(
                "backend {backend}: job {job_id}'s batch {tag} of an earlier run never "
                "reached sbatch (Slurm has no job with its comment): it is submitted now",
                backend=self.backend.name,
                job_id=binding.job_id,
                tag=binding.batch.tag,
            )
            return
        # It ended before its worker took the job: that is the job's attempt
        # too (a Slurm job cancelled or failed while pending, a worker
        # that could not start), failed saying why, and its retries
        # decide; more such ends in a row hold further submissions back.
        await self._fail_unstarted(binding, job, error)
        self.failures += 1
        delay = min(MAX_SUBMIT_BACKOFF, 2.0 ** self.failures)
        self.hold_until = self._clock.seconds() + delay
        log.warn(
            "backend {backend}: job {job_id}'s Slurm job {task} ended before its worker "
            "took the job ({error}): its attempt failed, and no Slurm job is submitted "
            "for {delay:g} s ({failures} such in a row). Look at its output "
            "(sbatch_options = --output=PATH) and at worker_command and url",
            backend=self.backend.name,
            job_id=binding.job_id,
            task=binding.task,
            error=error,
            delay=delay,
            failures=self.failures,
        )

    async def _fail_unstarted(self, binding: Binding, job: Job, error: str) -> None:
        """
        Record an attempt of the queued C{job}, under its Slurm job's worker
        name, failed with C{error} (the attempt counted, the job retried by
        its rules), as if its worker had taken it and lost it.
        """
        store = self._dispatcher.store
        spec = job.spec
        offer = Offer(binding.name, 1, spec.resources, dict(spec.requirements),
                      queues=frozenset(), job=job.id)
        now = self._clock.seconds()
        claimed = await store.claim(offer, 1, now, 60.0)
        for lease in claimed.leases:
            self.lost += 1
            # Through the recorder, as any attempt's end: the retry's wake
            # is scheduled from what it wrote.
            await self._dispatcher.recorder.finish(
                lease, Outcome(JobState.FAILED, error=error), self._clock.seconds()
            )

    # Cancelling

    async def cancel_unwanted(self) -> None:
        """
        Cancel the Slurm jobs whose jobs no longer want them (cancelled or
        ended before their workers took them, or ended a while ago while
        their Slurm jobs run on), in one C{scancel}.
        """
        unwanted = [
            binding
            for batch in self.batches.values() if batch.slurm_id is not None
            for binding in batch.jobs.values() if binding.cancel
        ]
        if not unwanted:
            return
        # Asked once: a scancel that failed (one of them ended meanwhile,
        # say) is asked again only if the next look finds one still pending
        # or lingering.
        for binding in unwanted:
            binding.cancel = False
        await self._scancel([b.task for b in unwanted], "whose jobs no longer need them")

    async def _scancel(self, tasks: list[str], why: str) -> bool:
        try:
            await self.commands.cancel_many(tasks)
        except SlurmError as e:
            log.warn("backend {backend}: cancelling Slurm jobs {why} failed (tried "
                     "again): {error}", backend=self.backend.name, why=why, error=str(e))
            return False
        log.info("backend {backend}: cancelled {count} Slurm jobs {why}: {tasks}",
                 backend=self.backend.name, count=len(tasks), why=why,
                 tasks=" ".join(tasks[:20]) + (" ..." if len(tasks) > 20 else ""))
        return True

    # Submitting

    async def _waiting(self, room: int) -> list[Job]:
        """
        Up to C{room} queued jobs of the backend's queues with no Slurm job,
        oldest first.
        """
        store = self._dispatcher.store
        found: list[Job] = []
        for queue in sorted(self._dispatcher.routing.queues_of(self.backend.name)):
            cursor = None
            while len(found) < room:
                jobs, cursor = await store.list_jobs(
                    state=JobState.QUEUED, queue=queue, cursor=cursor,
                    limit=min(1000, room - len(found) + len(self.bound)),
                )
                found += [job for job in jobs if job.id not in self.bound]
                if cursor is None:
                    break
        return found[:room]

    async def submit_waiting(self) -> None:
        """
        Give the queued jobs with no Slurm job one each, an array a shape.
        """
        if not self._dirty or self._clock.seconds() < self.hold_until:
            return
        room = self.backend.max_jobs - len(self.bound)
        if room <= 0:
            return
        self._dirty = False
        jobs = await self._waiting(room)
        groups: dict[SlurmShape, list[Job]] = {}
        for job in jobs:
            if job.id not in self.bound:
                groups.setdefault(SlurmShape.of(job, self.backend), []).append(job)
        submits = 0
        for shape, members in groups.items():
            for start in range(0, len(members), MAX_ARRAY):
                if submits >= MAX_SUBMITS_PER_ROUND or not self.running:
                    # The rest in a round's time: at most so many sbatch a
                    # second.
                    self._dirty = True
                    self._rest(ROUND_INTERVAL)
                    return
                submits += 1
                if not await self._submit(shape, members[start:start + MAX_ARRAY]):
                    self._dirty = True
                    self._rest(ROUND_INTERVAL)
                    return

    def _rest(self, seconds: float) -> None:
        """
        Submit nothing for C{seconds} (or longer, if held longer already).
        """
        self.hold_until = max(self.hold_until, self._clock.seconds() + seconds)

    async def _submit(self, shape: SlurmShape, jobs: list[Job]) -> bool:
        """
        One C{sbatch} for C{jobs}, all of C{shape}: the batch is written
        and their credentials made first, so that a restart finds it.
        """
        tag = secrets.token_hex(4)
        batch = Batch(tag, len(jobs) > 1, float("inf"))
        names = [direct_name(job.id, tag) for job in jobs]
        for index, (job, name) in enumerate(zip(jobs, names)):
            binding = Binding(job.id, name, batch, index)
            batch.jobs[index] = binding
            self.bound[job.id] = binding
        self.batches[tag] = batch

        def forget() -> None:
            self.batches.pop(tag, None)
            for binding in batch.jobs.values():
                if self.bound.get(binding.job_id) is binding:
                    del self.bound[binding.job_id]

        try:
            await self._save()
            tokens = await deferToThreadPool(
                self._reactor, self._io_pool, self._credentials.create_workers, names
            )
        except CredentialError as e:
            forget()
            log.warn("backend {backend}: no Slurm job submitted: the credentials of "
                     "{count} jobs could not be made: {error}",
                     backend=self.backend.name, count=len(jobs), error=str(e))
            return False
        try:
            slurm_id = await self.commands.submit(
                batch_script(self.backend, shape, names, tokens),
                sbatch_options(self.backend, shape, tag, len(jobs)),
            )
        except SlurmError as e:
            forget()
            self._failed_tags[tag] = None
            while len(self._failed_tags) > MAX_FAILED_TAGS:
                del self._failed_tags[next(iter(self._failed_tags))]
            log.warn("backend {backend}: sbatch of {count} jobs failed (tried again in "
                     "{delay:g} s): {error}", backend=self.backend.name, count=len(jobs),
                     error=str(e), delay=ROUND_INTERVAL)
            try:
                await deferToThreadPool(
                    self._reactor, self._io_pool, self._credentials.revoke_many, names
                )
                await self._save()
            except CredentialError as e:
                log.warn("backend {backend}: revoking {count} credentials failed: {error}",
                         backend=self.backend.name, count=len(names), error=str(e))
            return False
        batch.slurm_id = slurm_id
        batch.submitted = self._clock.seconds()
        self.submitted += len(jobs)
        self.submissions += 1
        log.info(
            "backend {backend}: {count} {jobs} submitted as Slurm job {slurm_id}{array}",
            backend=self.backend.name,
            count=len(jobs),
            jobs="job" if len(jobs) == 1 else "jobs",
            slurm_id=slurm_id,
            array=f" (an array of {len(jobs)})" if len(jobs) > 1 else "",
        )
        # Cancelled while it was being submitted: cancelled now.
        for binding in batch.jobs.values():
            if binding.done_at is not None and not binding.claimed:
                binding.cancel = True
        return True
