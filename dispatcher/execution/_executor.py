"""
Running leased jobs on this host: command jobs as processes through the
spawner, task jobs as functions on a bounded thread pool.

The local executor is one lease holder; it knows nothing of HTTP, and the
remote worker reuses it.
"""

from __future__ import annotations

import json
import os
import re
import stat
import threading
import traceback
from typing import Any, Callable, Mapping, Optional

import attrs
from twisted.internet.defer import CancelledError, Deferred, DeferredList, FirstError
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.defer import ensureDeferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from dispatcher.config._ini import TaskRef
from dispatcher._deferreds import shielded
from dispatcher.execution._accounts import AS_THE_DISPATCHER, JobAccounts
from dispatcher.execution._spawner import (
    LOG_MODE,
    LOGS_MODE,
    PASSAGE_MODE,
    WORK_MODE,
    make_job_dirs,
    make_passage,
)
from dispatcher.model._jobs import JobSpec, JobState, Lease, Outcome
from dispatcher.model._limits import MAX_RESULT_BYTES, result_size
from dispatcher.model._values import UnservableValue, servable_text, storable
from dispatcher._threads import TaskThreads

log = Logger()

# The environment every command starts from; the job's own env is merged
# over it.  Never the daemon's own environment: it may hold secrets.
BASE_ENVIRONMENT: Mapping[str, str] = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
}


def job_path(job_id: str) -> str:
    """
    Where a job's directory goes under C{data_dir/jobs}:
    C{<id[:4]>/<id[4:6]>/<id[6:8]>/<id[-2:]>/<id>}.

    A UUIDv7 id (C{TTTTTTTT-TTTT-7CCC-VRRR-RRRRRRRRRRRR}) starts with 48
    bits of milliseconds, then a counter and random bits.  Its first four
    hex digits change every 49.7 days (about 7 entries a year at the top,
    735 in a century), the next two every 4.7 hours (256 in each), the next
    two every 65.5 seconds (256 in each); the last two are random, so the
    jobs of one 65.5 s span (458,000 at 7,000 jobs/s sustained, or a whole
    batch made in one millisecond) spread over 256 directories, about 1,800
    each.  The old layout, C{<id[:8]>/<id>}, put every job of 65.5 s in
    one directory: 50,000 and more under load.
    """
    return f"{job_id[:4]}/{job_id[4:6]}/{job_id[6:8]}/{job_id[-2:]}/{job_id}"


# A directory of the old layout, C{jobs/<id[:8]>/<id>}: eight hex digits
# (the new layout's top directories have four).
_OLD_BUCKET = re.compile(r"[0-9a-f]{8}")


def move_old_job_dirs(jobs_dir: str) -> int:
    """
    Move every job directory of the old layout (C{jobs/<id[:8]>/<id>}) to
    where L{job_path} puts it, and remove the emptied old directories; the
    number moved.  Blocking: run at start-up on the I/O pool, before any
    job runs or any log is read.

    Moved once rather than looked up in both places: every path of a job
    (its logs read by the API, the log chunks a remote worker sends at an
    offset into the file it began, the working directory of a job run
    again after a crash) is then one rule, with no lookup of two places on
    every read.  Each move is one rename within the file system; a start
    cut short leaves the rest where they were, and the next start moves
    them.
    """
    try:
        buckets = [
            entry.path
            for entry in os.scandir(jobs_dir)
            if _OLD_BUCKET.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False)
        ]
    except FileNotFoundError:
        return 0
    moved = 0
    made: set[str] = set()
    for bucket in sorted(buckets):
        for name in sorted(os.listdir(bucket)):
            target = os.path.join(jobs_dir, job_path(name))
            parent = os.path.dirname(target)
            if parent not in made:
                make_passage(parent)
                made.add(parent)
            try:
                os.rename(os.path.join(bucket, name), target)
            except OSError as e:
                log.warn(
                    "could not move job directory {source} to {target} ({error}); "
                    "it stays where it is",
                    source=os.path.join(bucket, name),
                    target=target,
                    error=e.strerror or str(e),
                )
                continue
            moved += 1
        try:
            os.rmdir(bucket)
        except OSError:
            pass
    return moved


def tighten_job_dirs(jobs_dir: str) -> int:
    """
    Give everything under C{jobs_dir} the mode it is made with now, where
    an older version (or a wider umask) left group or others more: the
    jobs directory, its buckets and each job's directory L{PASSAGE_MODE},
    attempts' directories L{LOGS_MODE} and their files L{LOG_MODE}, working
    directories L{WORK_MODE} (not what is in them: that is the job's).
    The number of entries changed.  Blocking: run at start-up, before any
    job runs; a jobs directory that already has its mode is taken as done
    (it is given it last), so the walk is made once.

    Symbolic links are left alone, and nothing below a working directory
    is entered.
    """
    try:
        top = os.lstat(jobs_dir)
    except FileNotFoundError:
        return 0
    if stat.S_IMODE(top.st_mode) == PASSAGE_MODE:
        return 0
    changed = 0

    def give(path: str, found: os.stat_result, mode: int) -> None:
        nonlocal changed
        if stat.S_IMODE(found.st_mode) != mode:
            os.chmod(path, mode)
            changed += 1

    def walk(directory: str) -> None:
        for entry in os.scandir(directory):
            if entry.is_symlink():
                continue
            found = entry.stat(follow_symlinks=False)
            if entry.name == "work" and entry.is_dir():
                give(entry.path, found, WORK_MODE)
            elif entry.name.startswith("attempt-") and entry.is_dir():
                give(entry.path, found, LOGS_MODE)
                for log_file in os.scandir(entry.path):
                    if log_file.is_file(follow_symlinks=False):
                        give(log_file.path, log_file.stat(follow_symlinks=False), LOG_MODE)
            elif entry.is_dir():
                give(entry.path, found, PASSAGE_MODE)
                walk(entry.path)
            elif stat.S_IMODE(found.st_mode) & 0o077:
                give(entry.path, found, stat.S_IMODE(found.st_mode) & 0o700)

    walk(jobs_dir)
    os.chmod(jobs_dir, PASSAGE_MODE)
    return changed + 1


class TaskContext:
    """
    What a task function gets as its first argument.

    @ivar job_id: the job's id.
    @ivar attempt: the attempt number, 1 for the first.
    @ivar labels: the job's labels.
    @ivar workdir: the job's working directory (its inputs are there); it
        is made when a task first asks for it, so that tasks that never
        touch a file cost no directories.
    @ivar array_id: the array the job belongs to, or C{None}.
    @ivar array_index: its index in the array (0 to N-1), or C{None}.
    """

    def __init__(
        self,
        job_id: str,
        attempt: int,
        labels: Mapping[str, str],
        workdir: str,
        array_id: Optional[str] = None,
        array_index: Optional[int] = None,
    ) -> None:
        self.job_id = job_id
        self.attempt = attempt
        self.labels = dict(labels)
        self._workdir = workdir
        self.array_id = array_id
        self.array_index = array_index
        # The event is made only for a task that waits on it: most never do,
        # and an Event costs a lock and a condition.
        self._cancelled = False
        self._event: Optional[threading.Event] = None

    @property
    def workdir(self) -> str:
        make_job_dirs(self._workdir)
        return self._workdir

    @property
    def cancelled(self) -> bool:
        """
        Whether the job was cancelled; a long task should check this and
        return early.
        """
        return self._cancelled

    def wait_cancelled(self, timeout: Optional[float] = None) -> bool:
        """
        Block up to C{timeout} seconds until the job is cancelled; return
        whether it was.  Use it instead of C{time.sleep} in a task.
        """
        with _EVENTS_LOCK:
            if self._event is None:
                self._event = threading.Event()
                if self._cancelled:
                    self._event.set()
            event = self._event
        return event.wait(timeout)

    def cancel(self) -> None:
        """
        Ask the task to stop.
        """
        with _EVENTS_LOCK:
            self._cancelled = True
            if self._event is not None:
                self._event.set()


_EVENTS_LOCK = threading.Lock()


def _call_task(
    function: Callable[..., Any],
    context: TaskContext,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    stderr_path: str,
) -> Outcome:
    # Runs in a task thread.  A result must survive the trip through JSON
    # and be served back, so it is checked here (not on the reactor
    # thread), where a failure can still be told in words.
    try:
        value = function(context, *args, **kwargs)
    except BaseException:
        return _task_exception(stderr_path)
    try:
        value = storable(value)
    except UnservableValue as e:
        return Outcome(
            JobState.FAILED,
            error=f"the task returned a value that is not JSON the dispatcher can "
            f"store and serve: {e}",
        )
    except Exception:
        # (A subclass of a JSON type whose conversion fails, say.)
        return _task_exception(stderr_path)
    # Bounded here too, where the job can still fail in words: a result is
    # stored whole and shown in every answer about its job.
    if type(value) in (list, dict, str):
        size = result_size(json.dumps(value, separators=(",", ":"), ensure_ascii=False))
        if size > MAX_RESULT_BYTES:
            return Outcome(
                JobState.FAILED,
                error=f"the task's result is {size} bytes of JSON, more than the "
                f"{MAX_RESULT_BYTES} a result may be; write a larger output to a file "
                "in the job's working directory and return its name",
            )
    return Outcome(JobState.SUCCEEDED, result=value)


def _task_exception(stderr_path: str) -> Outcome:
    text = traceback.format_exc()
    try:
        make_job_dirs(logs_dirs=[os.path.dirname(stderr_path)])
        fd = os.open(
            stderr_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, LOG_MODE
        )
        with open(fd, "a", encoding="utf-8", errors="backslashreplace") as f:
            f.write(text)
    except OSError:
        pass
    # (An exception's words may hold a lone surrogate: they are stored as
    # its escape.)
    last = servable_text(text.strip().splitlines()[-1])
    return Outcome(JobState.FAILED, error=f"the task raised {last}")


@attrs.define
class RunningJob:
    """
    A lease the local executor is working on.
    """

    lease: Lease
    done: Deferred
    process: Any = None
    context: Optional[TaskContext] = None
    staging: Optional[Deferred] = None
    abort: Optional[Deferred] = None
    stopping: bool = False
    interrupted: bool = False
    timed_out: bool = False
    # When the spawner helper kills its process (a remote worker's fence),
    # on the spawner's deadline clock; None: never.
    deadline: Optional[float] = None


class LocalExecutor:
    """
    Runs leased jobs on this host.

    @param reactor: provides C{IReactorTime}.
    @param holder: this executor's holder name in leases.
    @param data_dir: the daemon's data directory; jobs run under
        C{data_dir/jobs}.
    @param spawner: an L{IProcessSpawner} for command jobs.
    @param stager: an L{IInputStager} for inputs.
    @param tasks: the task names and their functions.
    @param task_pool: the bounded pool task functions run on.
    @param io_pool: the pool for file-system work.
    @param clock: the C{IReactorTime} of timeouts and kill grace periods.
    @param kill_grace: seconds between SIGTERM and SIGKILL.
    @param accounts: the L{JobAccounts} command jobs run as (by default,
        the dispatcher's own account).
    @param environment: variables each command job gets over
        L{BASE_ENVIRONMENT} and under its own C{env} (a direct-mode Slurm
        job's worker gives its jobs the C{SLURM_*} variables of their
        Slurm job).
    """

    def __init__(
        self,
        reactor: Any,
        holder: str,
        data_dir: str,
        spawner: Any,
        stager: Any,
        tasks: Mapping[str, TaskRef],
        task_pool: TaskThreads,
        io_pool: ThreadPool,
        kill_grace: float = 5.0,
        clock: Any = None,
        accounts: JobAccounts = AS_THE_DISPATCHER,
        environment: Mapping[str, str] = {},
    ) -> None:
        self._reactor = reactor
        self.environment = dict(environment)
        self.accounts = accounts
        self._clock = clock if clock is not None else reactor
        self.holder = holder
        self._jobs_dir = os.path.join(data_dir, "jobs")
        self._spawner = spawner
        self._stager = stager
        self._tasks = tasks
        self._task_pool = task_pool
        self._io_pool = io_pool
        self.kill_grace = kill_grace
        self.running: dict[str, RunningJob] = {}
        self._lingering: dict[str, Deferred] = {}

    @property
    def jobs_dir(self) -> str:
        """
        C{data_dir/jobs}, where the jobs' directories are.
        """
        return self._jobs_dir

    def job_dir(self, job_id: str) -> str:
        """
        The directory of one job: its working directory and its logs (see
        L{job_path} for how jobs spread over directories).
        """
        return f"{self._jobs_dir}/{job_path(job_id)}"

    def move_old_job_dirs(self) -> int:
        """
        Move the job directories of the old layout into the new one
        (L{move_old_job_dirs}); blocking, for the I/O pool at start-up.
        """
        return move_old_job_dirs(self._jobs_dir)

    def tighten_job_dirs(self) -> int:
        """
        Narrow the modes an older version left under the jobs directory
        (L{tighten_job_dirs}); blocking, for start-up.
        """
        return tighten_job_dirs(self._jobs_dir)

    def make_jobs_dir(self) -> None:
        """
        Make the jobs directory (a passage); blocking.
        """
        make_passage(self._jobs_dir)

    def make_data_dir(self, data_dir: str) -> int:
        """
        Make a remote worker's data directory, which holds the jobs
        directory alone, and the jobs directory, as passages, narrowing
        what an older version left open (L{tighten_job_dirs}); the number
        of entries whose modes were narrowed.  Blocking, for start-up.
        """
        os.makedirs(data_dir, WORK_MODE, exist_ok=True)
        mode = stat.S_IMODE(os.stat(data_dir).st_mode)
        narrowed = 0
        if mode != PASSAGE_MODE:
            os.chmod(data_dir, PASSAGE_MODE)
            # Opening a 0700 directory to passers-by is not narrowing.
            narrowed = 1 if mode & ~PASSAGE_MODE else 0
        narrowed += self.tighten_job_dirs()
        self.make_jobs_dir()
        return narrowed

    def workdir(self, job_id: str) -> str:
        """
        Where a job's process runs and its inputs land.
        """
        return f"{self.job_dir(job_id)}/work"

    @staticmethod
    def open_log(log_path: str) -> int:
        """
        Open a log file (L{log_path}) for reading and writing, made if need
        be as the spawner makes a local job's; its descriptor.  Blocking.
        For the logs remote workers send.
        """
        make_job_dirs(logs_dirs=[os.path.dirname(log_path)])
        return os.open(
            log_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, LOG_MODE
        )

    def log_path(self, job_id: str, attempt: int, stream: str) -> str:
        """
        The file holding one stream (C{stdout}/C{stderr}) of one attempt.
        """
        return f"{self.job_dir(job_id)}/attempt-{attempt}/{stream}"

    def run(
        self,
        lease: Lease,
        mark_running: Callable[[Lease], Deferred],
        record_process: Callable[[Lease, Any], Deferred],
        deadline: Optional[float] = None,
    ) -> RunningJob:
        """
        Start working on C{lease}: stage its inputs, tell C{mark_running},
        run it, and fire C{RunningJob.done} with its L{Outcome}.  Failures
        of our own making (staging, spawning) are outcomes too.

        @param deadline: C{None}, or when the spawner helper kills a
            command's process group (a time on the spawner's deadline
            clock), given to the helper with the spawn itself; see
            L{set_deadline}.  A task has no process to kill: its deadline
            is its caller's to keep (L{stop}).
        """
        running = RunningJob(lease, Deferred(), deadline=deadline)
        self.running[lease.job_id] = running
        spec = lease.spec

        def finished(result: Any) -> Any:
            del self.running[lease.job_id]
            if (
                isinstance(result, Failure)
                and result.check(CancelledError)
                and running.stopping
            ):
                # Its thread never took it: the pool stopped first.
                result = Outcome(JobState.FAILED, error="stopped before it started")
            if isinstance(result, Failure):
                log.failure("job {job_id} failed in the executor", result,
                            job_id=lease.job_id)
                result = Outcome(
                    JobState.FAILED,
                    error=f"internal error: {result.getErrorMessage()}",
                )
            if running.stopping:
                result = attrs.evolve(result, stopped=True)
            running.done.callback(result)

        if (
            spec.task is not None
            and not spec.inputs
            and spec.timeout is None
            and lease.job_id not in self._lingering
        ):
            # The common task job (no inputs, no timeout) needs none of the
            # steps of work() below: straight to its thread.
            started = self._start_task(running, spec, self.workdir(lease.job_id))
            if isinstance(started, Outcome):
                finished(started)
            else:
                started.addBoth(finished)
            return running

        async def work() -> Outcome:
            spec = lease.spec
            workdir = self.workdir(lease.job_id)
            attempt_dir = os.path.dirname(self.log_path(lease.job_id, lease.attempt, "x"))
            # The spawner makes a command's directories as it starts it;
            # inputs need the working directory before that.
            run_as = (
                self.accounts.for_owner(lease.owner) if spec.command is not None else None
            )
            owner = None if run_as is None else (run_as.uid, run_as.gid)
            if spec.inputs:
                await deferToThreadPool(
                    self._reactor, self._io_pool, make_job_dirs, workdir, [attempt_dir], owner
                )
            if spec.inputs and not running.stopping:
                staging = (
                    self._stager.stage_inputs(spec.inputs, workdir)
                    if owner is None
                    else self._stager.stage_inputs(spec.inputs, workdir, owner)
                )
                running.staging = staging
                # A stop ends the wait at once, whatever the fetch in flight
                # does with its cancellation.
                running.abort = Deferred()
                try:
                    await DeferredList(
                        [staging, running.abort],
                        fireOnOneCallback=True,
                        fireOnOneErrback=True,
                        consumeErrors=True,
                    )
                except FirstError as e:
                    if not running.stopping:
                        return Outcome(
                            JobState.FAILED,
                            error=f"staging failed: {e.subFailure.getErrorMessage()}",
                        )
                finally:
                    running.staging = None
                if not running.stopping:
                    await mark_running(lease)
            if running.stopping:
                return Outcome(JobState.FAILED, error="stopped before it started")
            if spec.command is not None:
                return await self._run_command(running, spec, workdir, record_process)
            return await self._run_task(running, spec, workdir)

        ensureDeferred(work()).addBoth(finished)
        return running

    async def _run_command(
        self,
        running: RunningJob,
        spec: JobSpec,
        workdir: str,
        record_process: Callable[[Lease, Any], Deferred],
    ) -> Outcome:
        lease = running.lease
        env = dict(BASE_ENVIRONMENT)
        env.update(self.environment)
        env["HOME"] = workdir
        env.update(spec.env)
        env["DISPATCHER_JOB_ID"] = lease.job_id
        env["DISPATCHER_ATTEMPT"] = str(lease.attempt)
        if spec.array_id is not None:
            env["DISPATCHER_ARRAY_ID"] = spec.array_id
            env["DISPATCHER_ARRAY_INDEX"] = str(spec.array_index)
        assert spec.command is not None
        paths = (
            self.log_path(lease.job_id, lease.attempt, "stdout"),
            self.log_path(lease.job_id, lease.attempt, "stderr"),
        )
        deadline = running.deadline
        # Left out when not used: an IProcessSpawner of before takes none.
        options: dict[str, Any] = {}
        if deadline is not None:
            options["deadline"] = deadline
        run_as = self.accounts.for_owner(lease.owner)
        if run_as is not None:
            options["run_as"] = run_as
        if spec.resources.memory_mb:
            options["memory_mb"] = spec.resources.memory_mb
        try:
            process = await self._spawner.spawn(
                list(spec.command), env, workdir, *paths, **options
            )
        except Exception as e:
            return Outcome(JobState.FAILED, error=f"could not start the command: {e}")
        running.process = process
        if running.deadline != deadline:
            # Moved while the spawn was under way.
            self._spawner.set_deadline([process], running.deadline)
        if running.stopping:
            self._terminate(process)
        timer = None
        if spec.timeout is not None:

            def time_out() -> None:
                running.timed_out = True
                self._terminate(process)

            timer = self._clock.callLater(spec.timeout, time_out)
        try:
            await record_process(lease, process)
        except Exception as e:
            # A store write that failed (a full disk): one line, not a
            # traceback; the job runs on all the same.
            log.warn(
                "recording the process of job {job_id} failed ({error}); should the "
                "dispatcher crash while it runs, a restart cannot find its leftover "
                "processes",
                job_id=lease.job_id,
                error=str(e) or type(e).__name__,
            )
        limits = getattr(process, "limits", None)
        try:
            code = await process.ended
        except Exception as e:
            return Outcome(JobState.FAILED, error=f"lost: {e}", limits=limits)
        finally:
            if timer is not None and timer.active():
                timer.cancel()
        log_cut = tuple(getattr(process, "log_cut", ()))
        if running.timed_out:
            outcome = Outcome(
                JobState.FAILED,
                exit_code=code,
                error=f"timed out after {spec.timeout:g} s",
                limits=limits,
                log_cut=log_cut,
            )
        else:
            outcome = Outcome.from_exit_code(code, limits, log_cut)
        kills = getattr(process, "oom_kills", 0)
        if kills:
            outcome = outcome.out_of_memory(kills, limits.memory_mb if limits else None)
        return outcome

    def _terminate(self, process: Any, grace: Optional[float] = None) -> None:
        d = process.terminate(self.kill_grace if grace is None else grace, self._clock)
        d.addErrback(
            lambda f: log.failure("stopping process {pid} failed", f, pid=process.pid)
        )

    async def _run_task(
        self, running: RunningJob, spec: JobSpec, workdir: str
    ) -> Outcome:
        lease = running.lease
        lingering = self._lingering.get(lease.job_id)
        if lingering is not None:
            # An earlier attempt timed out but its thread still runs the
            # function: never run the same job twice at once.
            waiter: Deferred = Deferred()
            lingering.addBoth(lambda r: (waiter.callback(None), r)[1])
            await waiter
        call = self._start_task(running, spec, workdir)
        if isinstance(call, Outcome) or spec.timeout is None:
            return await call if isinstance(call, Deferred) else call
        context = running.context
        assert context is not None
        # A thread cannot be stopped: past the timeout the attempt ends, the
        # context says cancelled, and whatever the function returns later is
        # dropped.  The thread's own Deferred is kept until it returns.
        outcome = shielded(call)
        outcome.addTimeout(spec.timeout, self._clock)
        try:
            return await outcome
        except DeferredTimeout:
            context.cancel()
            self._lingering[lease.job_id] = call
            call.addBoth(lambda result: (self._lingering.pop(lease.job_id, None), result)[1])
            return Outcome(
                JobState.FAILED,
                error=f"timed out after {spec.timeout:g} s; the task's thread "
                "runs on until the function returns, and its result is discarded",
            )

    def _start_task(
        self, running: RunningJob, spec: JobSpec, workdir: str
    ) -> "Outcome | Deferred":
        """
        Call the task's function on the task pool: a Deferred of its
        L{Outcome}, or the outcome at once if it cannot start.
        """
        lease = running.lease
        ref = self._tasks.get(spec.task or "")
        if ref is None:
            return Outcome(
                JobState.FAILED,
                error=f"the task {spec.task!r} is not configured on this host",
            )
        context = TaskContext(
            lease.job_id,
            lease.attempt,
            spec.labels,
            workdir,
            spec.array_id,
            spec.array_index,
        )
        running.context = context
        return self._task_pool.defer(
            _call_task,
            ref.function,
            context,
            spec.args,
            spec.kwargs,
            self.log_path(lease.job_id, lease.attempt, "stderr"),
        )

    def set_deadline(self, job_ids: list[str], at: Optional[float]) -> None:
        """
        Move the deadline of the running jobs C{job_ids} to C{at}: the
        spawner helper kills their process groups then (one message for
        them all), and a command not started yet gets it with its spawn.
        """
        processes = []
        for job_id in job_ids:
            running = self.running.get(job_id)
            if running is None:
                continue
            running.deadline = at
            if running.process is not None:
                processes.append(running.process)
        if processes:
            self._spawner.set_deadline(processes, at)

    def stop(self, job_id: str, grace: Optional[float] = None) -> None:
        """
        Stop a running job: its process group gets SIGTERM, then SIGKILL
        after C{grace} seconds (the kill grace by default); a task is asked
        to stop through its context.
        """
        running = self.running.get(job_id)
        if running is None:
            return
        # Whatever stage the job is at, the flag stops the next one from
        # starting; the current one is stopped here.
        running.stopping = True
        if running.staging is not None:
            running.staging.cancel()
        if running.abort is not None and not running.abort.called:
            running.abort.callback(None)
        if running.process is not None:
            self._terminate(running.process, grace)
        elif running.context is not None:
            running.context.cancel()

