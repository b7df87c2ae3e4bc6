"""
The values of the domain: job specs, jobs, attempts and leases, the job
states and the transitions allowed between them, ids and times.

Everything here is a frozen value; nothing here does I/O.
"""

from __future__ import annotations

import datetime
import enum
import math
import os
import threading
import time
from typing import Any, Mapping, Optional, Union

import attrs


class JobState(str, enum.Enum):
    """
    Where a job stands.

    ``pending`` jobs wait for a time or for other jobs, ``queued`` jobs wait
    for capacity, ``staging`` jobs hold a slot while their inputs are
    fetched, ``running`` jobs run; the last three are final.
    """

    PENDING = "pending"
    QUEUED = "queued"
    STAGING = "staging"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        """
        Whether a job in this state is finished.
        """
        return self in FINAL_STATES

    @property
    def active(self) -> bool:
        """
        Whether a job in this state holds a lease (and with it a slot).
        """
        return self in (JobState.STAGING, JobState.RUNNING)


FINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})

# The allowed transitions.  A finished job changes state only through an
# explicit retry, which the scheduling rules add; an active job goes back to
# queued when the daemon stops it without spending its attempt.
TRANSITIONS: Mapping[JobState, frozenset[JobState]] = {
    JobState.PENDING: frozenset({JobState.QUEUED, JobState.CANCELLED}),
    JobState.QUEUED: frozenset(
        {JobState.STAGING, JobState.RUNNING, JobState.CANCELLED, JobState.PENDING}
    ),
    JobState.STAGING: frozenset(
        {
            JobState.RUNNING,
            JobState.FAILED,
            JobState.CANCELLED,
            JobState.QUEUED,
        }
    ),
    JobState.RUNNING: frozenset(
        {
            JobState.SUCCEEDED,
            JobState.FAILED,
            JobState.CANCELLED,
            JobState.QUEUED,
        }
    ),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}


def may_transition(source: JobState, target: JobState) -> bool:
    """
    Whether a job may go from C{source} to C{target}.
    """
    return target in TRANSITIONS[source]


class InvalidTransition(Exception):
    """
    A change of state that the job's current state does not allow.
    """

    def __init__(self, job_id: str, source: JobState, target: JobState) -> None:
        super().__init__(
            f"job {job_id} is {source.value} and cannot become {target.value}"
        )
        self.job_id = job_id
        self.source = source
        self.target = target


class UnknownJob(KeyError):
    """
    No job has this id.
    """

    def __init__(self, job_id: str) -> None:
        super().__init__(job_id)
        self.job_id = job_id

    def __str__(self) -> str:
        return f"no job has the id {self.job_id!r}"


class StaleLease(Exception):
    """
    A write for an attempt whose fencing token is no longer current; it
    changed nothing.
    """

    def __init__(self, job_id: str, token: int) -> None:
        super().__init__(f"lease {token} of job {job_id} is no longer current")
        self.job_id = job_id
        self.token = token


class StoreClosed(Exception):
    """
    The store is closing or closed (the daemon is stopping); nothing was
    written.
    """


@attrs.frozen
class InputSpec:
    """
    One input file of a job: fetched from C{url} to C{path} (relative to the
    job's working directory) before the job starts, and checked against
    C{sha256} when it is given.
    """

    url: str
    path: str
    sha256: Optional[str] = None

@attrs.frozen
class Resources:
    """
    Resources a job needs, or a holder offers: CPUs (fractions allowed),
    memory in MiB and GPUs.  A job that asks for nothing needs one slot and
    nothing else.
    """

    cpus: float = 0.0
    memory_mb: int = 0
    gpus: int = 0

    def __add__(self, other: "Resources") -> "Resources":
        return Resources(
            self.cpus + other.cpus, self.memory_mb + other.memory_mb, self.gpus + other.gpus
        )

    def __sub__(self, other: "Resources") -> "Resources":
        return Resources(
            self.cpus - other.cpus, self.memory_mb - other.memory_mb, self.gpus - other.gpus
        )

    def covers(self, need: "Resources") -> bool:
        """
        Whether this much is at least C{need} in every resource.
        """
        # A small tolerance: fractions of CPUs added and taken away again
        # must not leave 3.9999999 where 4 was.
        return (
            self.cpus + 1e-9 >= need.cpus
            and self.memory_mb >= need.memory_mb
            and self.gpus >= need.gpus
        )

NO_RESOURCES = Resources()


@attrs.frozen
class Notify:
    """
    Where a job's changes of state are posted (a webhook), and which of
    its states are: by default the final ones.  The URL is an http(s) URL
    without credentials, checked against the address policy where it comes
    in and again where it is sent.
    """

    url: str
    events: frozenset[JobState] = FINAL_STATES


@attrs.frozen
class JobSpec:
    """
    What a client asked for: a command (argv) or a task name with its
    arguments, and how it is to be scheduled.  Validated before it gets
    here; queue defaults are already applied.
    """

    command: Optional[tuple[str, ...]] = None
    task: Optional[str] = None
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = attrs.field(factory=dict)
    name: Optional[str] = None
    env: Mapping[str, str] = attrs.field(factory=dict)
    labels: Mapping[str, str] = attrs.field(factory=dict)
    inputs: tuple[InputSpec, ...] = ()
    priority: int = 0
    queue: str = "default"
    timeout: Optional[float] = None
    max_attempts: int = 1
    retry_delay: float = 1.0
    not_before: Optional[float] = None
    depends_on: tuple[str, ...] = ()
    array_id: Optional[str] = None
    array_index: Optional[int] = None
    resources: Resources = NO_RESOURCES
    requirements: Mapping[str, str] = attrs.field(factory=dict)
    # The batch (POST /v1/jobs/batch) it was submitted in, if any.
    batch_id: Optional[str] = None
    notify: Optional[Notify] = None

    @property
    def kind(self) -> str:
        """
        C{"command"} or C{"task"}.
        """
        return "command" if self.command is not None else "task"

@attrs.frozen
class PlainJobs:
    """
    Jobs of one request that say only what they run (a command, or a task
    with its arguments) and take the default queue's defaults: the common
    bulk submission.  Each job is kept as what it runs, not as a
    L{JobSpec}: making a thousand specs, only for the store to write them
    out again, was most of a large batch's time.

    @ivar work: one entry a job: a command job's argv, as a C{list} of
        strings; a task job's C{(task, args, kwargs)}, as a C{tuple} of a
        string, a list and a dict.  L{specs} gives the jobs' specs.
    """

    work: list[Any]
    priority: int = 0
    timeout: Optional[float] = None
    # A spec's own defaults.
    queue: str = attrs.fields(JobSpec).queue.default
    max_attempts: int = attrs.fields(JobSpec).max_attempts.default
    retry_delay: float = attrs.fields(JobSpec).retry_delay.default
    # The batch they were submitted as, if any (one id for all).
    batch_id: Optional[str] = None

    def __len__(self) -> int:
        return len(self.work)

    def specs(self) -> list[JobSpec]:
        """
        The jobs as L{JobSpec}s.
        """
        columns = {
            "priority": self.priority,
            "timeout": self.timeout,
            "queue": self.queue,
            "max_attempts": self.max_attempts,
            "retry_delay": self.retry_delay,
            "batch_id": self.batch_id,
        }
        return [
            JobSpec(command=tuple(job), **columns)
            if type(job) is list
            else JobSpec(task=job[0], args=tuple(job[1]), kwargs=dict(job[2]), **columns)
            for job in self.work
        ]


# The streams of a command job's log.
LOG_STREAMS = ("stdout", "stderr")


def log_cut_marker(stream: str, limit: int) -> str:
    """
    The line written where a job's log stream is cut at C{limit} bytes
    (C{[executor] max_log_bytes}), by the spawner helper or by the
    dispatcher for a remote worker's log.
    """
    return (
        f"[dispatcher: {stream} cut at {limit} bytes ([executor] max_log_bytes); "
        f"the rest was dropped]\n"
    )


@attrs.frozen
class Limits:
    """
    The limits an attempt of a command job ran under: its memory (MiB) and
    its processes, each C{None} for none; and whether they were enforced,
    through cgroups of its own, which also killed every process it left
    at its end.
    """

    memory_mb: Optional[int]
    processes: Optional[int]
    enforced: bool


@attrs.frozen
class Attempt:
    """
    One try at running a job, by one holder; C{limits} and C{log_cut} for
    a command that ran (the streams of its log that were cut).
    """

    number: int
    holder: str
    started_at: float
    finished_at: Optional[float] = None
    exit_code: Optional[int] = None
    error: Optional[str] = None
    limits: Optional[Limits] = None
    log_cut: tuple[str, ...] = ()

@attrs.frozen
class Lease:
    """
    The right to run one attempt of one job, until C{expires_at}.

    The fencing C{token} grows with every lease the store grants; a write
    that carries a token that is no longer the job's current one changes
    nothing.  A remote worker's lease carries instead the text the
    dispatcher gave it, which it sends back as it is (the counter and a MAC
    of it, L{dispatcher.wire._tokens}).

    C{owner} is the job's owner where the holder needs it (to choose the
    account a command runs as), else C{None}.
    """

    job_id: str
    attempt: int
    token: Union[int, str]
    holder: str
    expires_at: float
    spec: JobSpec
    owner: Optional[str] = None


@attrs.frozen
class Offer:
    """
    What one lease holder (the local executor or a remote worker) can run:
    its slots, its resources, its labels and the task names it knows
    (C{None}: any).

    A job fits a holder when the holder's labels meet the job's
    requirements, it knows the job's task, and its resources, less what its
    running jobs use, cover what the job asks for.
    """

    holder: str
    slots: int
    resources: Resources = NO_RESOURCES
    labels: Mapping[str, str] = attrs.field(factory=dict)
    tasks: Optional[frozenset[str]] = None
    # A remote worker process's own random id, when it sends one: two
    # processes under one holder name tell themselves apart by it.
    instance: Optional[str] = None
    # The only queues it takes jobs from (None: any), and queues it never
    # takes jobs from: a backend's pilots take its queues alone, and those
    # queues are kept from every other holder (dispatcher.model._routing).
    queues: Optional[frozenset[str]] = None
    excluded: frozenset[str] = frozenset()
    # Seconds a job may still run on it before it ends (a Slurm pilot's
    # time limit), as of the claim or the look it is made for; None: no end.
    time_left: Optional[float] = None
    # The one job it may take (a Slurm job of a direct-mode backend, which
    # runs a worker for that job alone): its claims read that job and no
    # other, whatever its queues say.  None: any job of its queues.
    job: Optional[str] = None
    # Leases a remote worker may hold beyond its slots, their jobs started
    # on it as its slots free (docs/worker-protocol.md, "Prefetch").
    prefetch: int = 0

    @property
    def capacity(self) -> int:
        """
        How many leases it may hold at once: its slots and its prefetch.
        """
        return self.slots + self.prefetch

    def takes(self, queue: str) -> bool:
        """
        Whether this holder takes jobs of C{queue}.
        """
        return (self.queues is None or queue in self.queues) and queue not in self.excluded

    def refuses(self, spec: JobSpec) -> Optional[str]:
        """
        Why this holder could never run C{spec}, even idle; C{None} if it
        could.
        """
        if (self.queues is not None or self.excluded) and not self.takes(spec.queue):
            return f"takes no job of queue {spec.queue}"
        if (
            self.time_left is not None
            and spec.timeout is not None
            and spec.timeout > self.time_left
        ):
            return (
                f"ends in {max(0.0, self.time_left):.0f} s (its Slurm time limit), "
                f"before the job's timeout of {spec.timeout:g} s"
            )
        if spec.task is not None and self.tasks is not None and spec.task not in self.tasks:
            return f"does not know the task {spec.task!r}"
        for key, value in spec.requirements.items():
            if self.labels.get(key) != value:
                return f"lacks the label {key}={value}"
        need = spec.resources
        have = self.resources
        if need.cpus > have.cpus + 1e-9:
            return f"has {have.cpus:g} CPUs, not {need.cpus:g}"
        if need.memory_mb > have.memory_mb:
            return f"has {have.memory_mb} MiB of memory, not {need.memory_mb}"
        if need.gpus > have.gpus:
            return f"has {have.gpus} GPUs, not {need.gpus}"
        return None


@attrs.frozen
class Job:
    """
    A job as the store holds it.

    @ivar owner: the name of the principal that submitted it
        (L{dispatcher.model._principals.Principal}); C{None} for a job
        stored before jobs had owners.
    """

    id: str
    state: JobState
    spec: JobSpec
    created_at: float
    started_at: Optional[float] = None
    finished_at: Optional[float] = None
    exit_code: Optional[int] = None
    result: Any = None
    error: Optional[str] = None
    wait_reason: Optional[str] = None
    attempts: tuple[Attempt, ...] = ()
    cancelled_by: Optional[str] = None
    owner: Optional[str] = None

    def waiting(self, reason: Optional[str]) -> "Job":
        """
        This job with another wait reason.  (C{attrs.evolve} does the
        same, three times slower, and every answer to a submission made
        while no holder could run it pays for it.)
        """
        return Job(
            self.id, self.state, self.spec, self.created_at, self.started_at,
            self.finished_at, self.exit_code, self.result, self.error, reason,
            self.attempts, self.cancelled_by, self.owner,
        )

@attrs.frozen
class Outcome:
    """
    How an attempt ended, as its holder reports it; C{stopped} says the
    holder stopped it (a cancel, a shutdown) rather than it ending on its
    own.  A command that ran has the L{Limits} it ran under, and the
    streams of its log that were cut.
    """

    state: JobState
    exit_code: Optional[int] = None
    result: Any = None
    error: Optional[str] = None
    stopped: bool = False
    limits: Optional[Limits] = None
    log_cut: tuple[str, ...] = ()

    @classmethod
    def from_exit_code(
        cls, code: int, limits: Optional[Limits] = None, log_cut: tuple[str, ...] = ()
    ) -> "Outcome":
        """
        The outcome of a process that exited with C{code} (negative for a
        signal, as Python's subprocess reports it), having run under
        C{limits} with the streams C{log_cut} of its log cut.
        """
        if code == 0:
            return cls(JobState.SUCCEEDED, 0, None, None, False, limits, log_cut)
        if code < 0:
            error = f"killed by signal {-code}"
        else:
            error = f"exited with code {code}"
        return cls(JobState.FAILED, code, None, error, False, limits, log_cut)

    def out_of_memory(self, kills: int, memory_mb: Optional[int]) -> "Outcome":
        """
        This outcome of a command whose processes the out-of-memory killer
        killed C{kills} of, over its memory limit: failed, and saying so.
        """
        limit = f" of {memory_mb} MiB (resources.memory_mb)" if memory_mb else ""
        why = (
            f"out of memory: the OOM killer killed {kills} of its processes, over its "
            f"memory limit{limit}"
        )
        error = why if self.error is None else f"{why} ({self.error})"
        return attrs.evolve(self, state=JobState.FAILED, error=error)


# The last whole second format_time formatted, and its text: every job a
# submission answers shows its creation time, and strftime was a tenth of
# a single submit's time on the reactor thread.  One tuple, replaced whole,
# so threads may share it.
_last_second: tuple[int, str] = (0, "1970-01-01T00:00:00")


def format_time(when: Optional[float]) -> Optional[str]:
    """
    An RFC 3339 UTC time with microseconds, or C{None}: what
    C{datetime.fromtimestamp(when, utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")}
    gives, rounded the same way.
    """
    global _last_second
    if when is None:
        return None
    fraction, whole = math.modf(when)
    second = int(whole)
    micro = round(fraction * 1e6)
    if micro >= 1_000_000:
        second += 1
        micro -= 1_000_000
    elif micro < 0:
        second -= 1
        micro += 1_000_000
    last = _last_second
    if last[0] != second:
        moment = datetime.datetime.fromtimestamp(second, datetime.timezone.utc)
        last = _last_second = (second, moment.strftime("%Y-%m-%dT%H:%M:%S"))
    return f"{last[1]}.{micro:06d}Z"


class JobIds:
    """
    UUIDv7 job ids (RFC 9562): a millisecond timestamp, then a counter that
    keeps ids made in the same millisecond in order, then random bits that
    keep ids of different hosts apart.
    """

    # Random bits are read from the kernel this many ids at a time (80 KiB):
    # os.urandom lets go of the GIL, and on the reactor thread, while the
    # store's writer thread runs Python, getting it back can take the
    # interpreter's whole switch interval (5 ms).  One call per id made
    # JobIds.new a sixth of a large batch's reactor time.
    _RANDOM_IDS = 8192

    def __init__(self, clock=time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._last_ms = -1
        self._counter = 0
        self._random = b""
        self._offset = 0
        # A forked child must not hand out the random bits its parent will.
        os.register_at_fork(after_in_child=self._forget_random)

    def _forget_random(self) -> None:
        self._random = b""
        self._offset = 0

    def new(self) -> str:
        """
        A new id, later than every id this object made before.
        """
        return self.new_many(1)[0]

    def new_many(self, count: int) -> list[str]:
        """
        C{count} new ids, in order, each later than every id this object
        made before.
        """
        with self._lock:
            ms = int(self._clock() * 1000)
            need = 8 * count + 2
            if self._offset + need > len(self._random):
                self._random = os.urandom(max(need, 10 * self._RANDOM_IDS))
                self._offset = 0
            start = self._offset
            self._offset = start + need
            bits = self._random[start:start + need]
            if ms <= self._last_ms:
                # Same millisecond (or the clock stepped back): count on
                # from the last id so order still holds.
                ms = self._last_ms
                counter = self._counter
            else:
                counter = (int.from_bytes(bits[-2:], "big") & 0x3FF) - 1
            ids = []
            # The random bits of every id, as hex, in one go; each id is
            # then sliced out, the text of str(uuid.UUID(int=value)) built
            # without the UUID or its 128-bit integer.
            random_hex = bits[:-2].hex()
            stamp = ""
            shown = -1
            for i in range(0, 16 * count, 16):
                counter += 1
                if counter > 0xFFF:
                    ms += 1
                    counter = 0
                if ms != shown:
                    shown = ms
                    text = f"{ms & 0xFFFFFFFFFFFF:012x}"
                    stamp = f"{text[:8]}-{text[8:]}-7"
                r = random_hex[i:i + 16]
                ids.append(f"{stamp}{_COUNTERS[counter]}-{_VARIANT[r[0]]}{r[1:4]}-{r[4:]}")
            self._last_ms = ms
            self._counter = counter
        return ids


# The first hex digit of an id's last 64 bits: the variant (0b10) and the
# next two random bits.
_VARIANT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}
# Every counter as its three hex digits.
_COUNTERS = [f"{counter:03x}" for counter in range(0x1000)]
