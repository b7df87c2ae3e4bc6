"""
Command jobs as processes, started through the spawner helper.

Starting a process from the daemon walks every open file descriptor in the
reactor thread, and the daemon may hold thousands of sockets.  So the
daemon starts one small helper (L{dispatcher.execution._spawner}) when the service
starts and asks it, over a pipe, to start jobs: each in its own session and
process group, and its own cgroups where the host allows, with what is left
of the group and of the cgroups killed when the job's leader exits.  The
helper says once what holds for jobs on this host, which is logged.
"""

import functools
import itertools
import json
import os
import resource
import signal
import sys

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from dispatcher.execution._interfaces import IProcessSpawner, IRunningProcess
from dispatcher.execution._spawner import read_boot_id, read_stat
from dispatcher.model._jobs import LOG_STREAMS, Limits, log_cut_marker

# The helper is run as a file, not with -m: -m would import the dispatcher
# package, and with it Twisted, into a process that needs only the standard
# library.  -I keeps PYTHON* variables and the script's own directory out of
# its path, -S skips site-packages: it starts in about 15 ms.
_HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_spawner.py")

# Indices in the fields of /proc/<pid>/stat (see read_stat).
_START_TICKS = 21
_PROCESS_GROUP = 4


@functools.lru_cache(maxsize=64)
def _limits(memory_mb, processes, enforced):
    # Most jobs run under the same few: each is made once.
    return Limits(memory_mb, processes, enforced)


class SpawnError(Exception):
    """
    A process could not be started.  The message says why, in words a user
    can act on (C{"no such file: foo (not found in PATH=/usr/bin:/bin)"}).
    """


class ProcessLost(Exception):
    """
    The spawner helper died while a process ran, so how the process ends can
    no longer be known; its process group was killed.
    """


@implementer(IRunningProcess)
class RunningProcess:
    """
    A process started by a L{ProcessSpawner}: the leader of its own session
    and process group.

    @ivar pid: its process id, which is also its process group id.
    @ivar start_ticks: its start time in clock ticks since boot (field 22 of
        C{/proc/<pid>/stat}).
    @ivar boot_id: the kernel boot id when it started.
    @ivar ended: a Deferred that fires with the exit code (minus the signal
        number if a signal killed it) once the process has exited and the
        rest of its group has been killed; or fails with L{ProcessLost}.
    @ivar killed_at_deadline: the helper killed it because its deadline
        (L{ProcessSpawner.set_deadline}) passed.
    @ivar limits: the L{Limits} it runs under.
    @ivar oom_kills: once it has ended, how many of its processes the
        out-of-memory killer killed.
    @ivar log_cut: once it has ended, the streams of its log that were cut.
    """

    killed_at_deadline = False
    # The helper's id of the process.
    spawn_id = None
    limits = None
    oom_kills = 0
    log_cut = ()

    def __init__(self, pid, start_ticks, boot_id, send_signal):
        """
        @param pid: the process id.
        @param start_ticks: its start time in clock ticks since boot.
        @param boot_id: the kernel boot id.
        @param send_signal: called with a signal number to signal the group;
            only the helper knows whether the leader is still unreaped, and
            so whether the group id is still this process's.
        """
        self.pid = pid
        self.start_ticks = start_ticks
        self.boot_id = boot_id
        self.ended = Deferred()
        self._send_signal = send_signal
        self._result = None
        self._waiting = []
        self._kill_calls = []

    def __repr__(self):
        return f"<RunningProcess pid={self.pid}>"

    def signal_group(self, signum):
        """
        Send C{signum} to the whole process group, unless the process has
        already ended.

        @param signum: a signal number, such as C{signal.SIGTERM}.
        """
        if self._result is None:
            self._send_signal(signum)

    def terminate(self, grace, clock):
        """
        Ask the process group to stop with C{SIGTERM}, and kill it with
        C{SIGKILL} if it has not ended C{grace} seconds later.

        @param grace: seconds between C{SIGTERM} and C{SIGKILL}.
        @param clock: the L{IReactorTime} that measures the grace.

        @return: a Deferred that fires with the exit code, like L{ended}.
        """
        if self._result is not None:
            return self._when_ended()
        self.signal_group(signal.SIGTERM)
        self._kill_calls.append(
            clock.callLater(grace, self.signal_group, signal.SIGKILL)
        )
        return self._when_ended()

    def _when_ended(self):
        # A fresh Deferred, so that callbacks added to C{ended} by others do
        # not change what this one fires with.
        if isinstance(self._result, Failure):
            return fail(self._result)
        if self._result is not None:
            return succeed(self._result)
        waiting = Deferred()
        self._waiting.append(waiting)
        return waiting

    def _end(self, result):
        """
        The process has ended with C{result}: an exit code, or a L{Failure}.
        """
        if self._result is not None:
            return
        self._result = result
        for call in self._kill_calls:
            if call.active():
                call.cancel()
        self._kill_calls = []
        waiting, self._waiting = [self.ended] + self._waiting, []
        for d in waiting:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)


class _Helper(ProcessProtocol):
    """
    One run of the spawner helper: the requests it has not answered yet and
    the processes it watches.
    """

    _log = Logger()

    def __init__(self, on_end, on_ready):
        self._on_end = on_end
        self._on_ready = on_ready
        self._ids = itertools.count(1)
        self._spawning = {}
        self._running = {}
        self._buffers = {1: b"", 2: b""}
        self.stopping = False
        self.dead = False
        self.exited = Deferred()

    def spawn(
        self, argv, env, cwd, stdout_path, stderr_path, deadline=None, run_as=None, memory_mb=0
    ):
        job_id = next(self._ids)
        try:
            request = dict(
                op="spawn",
                id=job_id,
                argv=[os.fspath(arg) for arg in argv],
                env={os.fspath(k): os.fspath(v) for k, v in env.items()},
                cwd=os.fspath(cwd),
                stdout=os.fspath(stdout_path),
                stderr=os.fspath(stderr_path),
            )
        except (TypeError, AttributeError) as e:
            return fail(SpawnError(f"argv, env, cwd and paths must be strings: {e}"))
        if deadline is not None:
            request["deadline"] = deadline
        if run_as is not None:
            request["run_as"] = dict(
                user=run_as.user, uid=run_as.uid, gid=run_as.gid, groups=list(run_as.groups)
            )
        if memory_mb:
            request["memory_mb"] = memory_mb

        def cancel(d):
            # The request cannot be taken back; a process started for a
            # spawn nobody waits for any more is killed when it is reported.
            self._spawning[job_id] = None

        spawned = Deferred(cancel)
        self._spawning[job_id] = spawned
        self._send(request)
        return spawned

    def set_deadline(self, processes, at):
        """
        Move the deadline of those of C{processes} this helper started.
        """
        ids = [
            process.spawn_id
            for process in processes
            if self._running.get(process.spawn_id) is process
        ]
        if ids:
            self._send(dict(op="deadline", id=None, ids=ids, at=at))

    def stop(self):
        """
        Close the helper's stdin, which tells it to exit; fire when it has.
        """
        self.stopping = True
        self.transport.closeStdin()
        return self.exited

    def _send(self, message):
        if self.stopping or self.dead:
            # Its stdin is closed.  Spawns cannot get here (the spawner
            # sends them only to a live helper); signals for processes left
            # running at stop can.
            self._log.warn(
                "cannot send {op} request {job_id}: the process spawner "
                "helper has stopped",
                op=message["op"],
                job_id=message["id"],
            )
            return
        self.transport.write(json.dumps(message).encode("ascii") + b"\n")

    def childDataReceived(self, childFD, data):
        lines = (self._buffers.get(childFD, b"") + data).split(b"\n")
        self._buffers[childFD] = lines.pop()
        for line in lines:
            if childFD == 1:
                self._reply_received(line)
            elif line.strip():
                self._log.warn(
                    "process spawner helper says: {line}",
                    line=line.decode("utf-8", "replace"),
                )

    def _reply_received(self, line):
        try:
            reply = json.loads(line)
            op = reply["op"]
            job_id = reply["id"]
        except (ValueError, KeyError, TypeError):
            self._log.error("bad reply from the process spawner helper: {line!r}", line=line)
            return
        if op == "spawned":
            self._spawned(job_id, reply)
        elif op == "exited":
            process = self._running.pop(job_id, None)
            if process is not None:
                if reply.get("deadline"):
                    process.killed_at_deadline = True
                process.oom_kills = reply.get("oom_kills", 0)
                process.log_cut = tuple(reply.get("cut", ()))
                process._end(reply["code"])
        elif op == "ready":
            self._on_ready(reply["description"])
        elif op == "error":
            if job_id in self._spawning:
                spawned = self._spawning.pop(job_id)
                if spawned is not None:
                    spawned.errback(SpawnError(reply["error"]))
            else:
                self._log.warn(
                    "the process spawner helper refused request {job_id}: {error}",
                    job_id=job_id,
                    error=reply["error"],
                )

    def _spawned(self, job_id, reply):
        spawned = self._spawning.pop(job_id, None)
        process = RunningProcess(
            reply["pid"],
            reply["start_ticks"],
            reply["boot_id"],
            lambda signum: self._send(dict(op="signal", id=job_id, signal=signum)),
        )
        process.spawn_id = job_id
        limits = reply.get("limits")
        if limits is not None:
            process.limits = _limits(
                limits["memory_mb"], limits["processes"], limits["enforced"]
            )
        self._running[job_id] = process
        if spawned is None:
            process.signal_group(signal.SIGKILL)
        else:
            spawned.callback(process)

    def processEnded(self, reason):
        # First of all, so that the callbacks fired below, which may well
        # spawn again, find no helper and start a new one.
        self.dead = True
        self._on_end(self)
        if self.stopping:
            why = "the process spawner stopped"
        else:
            why = f"the process spawner helper exited unexpectedly ({reason.value})"
            self._log.error(
                "process spawner helper exited unexpectedly: {reason}",
                reason=reason.value,
            )
        spawning, self._spawning = self._spawning, {}
        for spawned in spawning.values():
            if spawned is not None:
                spawned.errback(SpawnError(f"{why}; the process was not started"))
        if not self.stopping:
            # Nobody is left to tell when these end, or to kill their
            # strays; rather than leave them running untracked, end them.
            running, self._running = self._running, {}
            for process in running.values():
                kill_group_if_ours(
                    process.pid, process.start_ticks, process.boot_id, signal.SIGKILL
                )
                process._end(
                    Failure(
                        ProcessLost(
                            f"{why} while process {process.pid} ran; "
                            f"its process group was killed"
                        )
                    )
                )
        self.exited.callback(None)


@implementer(IProcessSpawner)
class ProcessSpawner(Service):
    """
    Starts command jobs through a helper process, which it starts with the
    service.  If the helper dies, the spawns it had not answered fail, the
    processes it watched are killed and their L{RunningProcess.ended} fails
    with L{ProcessLost}, and a new helper is started at the next spawn.

    @ivar child_open_files: the soft open-file limit the helper, and so
        every job, is given (C{None}: this process's).  The daemon raises
        its own to the hard limit for its connections and gives its jobs
        the one it started with (see L{dispatcher.app._limits}).
    """

    _log = Logger()
    child_open_files = None

    def __init__(self, reactor, max_processes=0, max_log_bytes=0, cgroups="auto"):
        """
        @param reactor: an L{IReactorProcess}, to start the helper with.
        @param max_processes: the most processes (and threads) of a job, 0
            for no limit; enforced where jobs get cgroups.
        @param max_log_bytes: the most bytes of each stream of a job its
            log file keeps, 0 for no limit.
        @param cgroups: C{"auto"}: each job in cgroups of its own where the
            host allows; C{"off"}: never.
        """
        self._reactor = reactor
        self._helper = None
        self._settings = {
            "cgroups": cgroups,
            "max_processes": max_processes,
            "max_log_bytes": max_log_bytes,
            "markers": {
                stream: log_cut_marker(stream, max_log_bytes) for stream in LOG_STREAMS
            },
        }
        # What the helper said holds for jobs, as it last said it.
        self.description = None

    def startService(self):
        """
        Start the helper.
        """
        super().startService()
        self._start_helper()

    def stopService(self):
        """
        Tell the helper to exit.  Processes still running are left running
        and their L{RunningProcess.ended} never fires: whoever starts the
        daemon again decides about them.

        @return: a Deferred that fires when the helper has exited.
        """
        super().stopService()
        if self._helper is None:
            return succeed(None)
        return self._helper.stop()

    def spawn(
        self, argv, env, cwd, stdout_path, stderr_path, deadline=None, run_as=None, memory_mb=0
    ):
        """
        Start C{argv} (no shell) in its own session and process group, and
        its own cgroups where the host allows.

        @param argv: the program and its arguments; a program name with no
            C{/} is looked for in C{env}'s C{PATH}.
        @param env: exactly the environment it gets.
        @param cwd: its working directory (made if need be).
        @param stdout_path: the file its stdout is appended to (created if
            need be, and its directory too).
        @param stderr_path: the file its stderr is appended to.
        @param deadline: C{None}, or a time on
            L{dispatcher.execution._spawner.deadline_clock} at which the
            helper kills the process group with C{SIGKILL}, whatever this
            process is doing then (L{set_deadline} moves it).
        @param run_as: C{None}, or the L{dispatcher.config._ini.RunAs}
            account it runs as (this process must then be root): its user
            and group ids, real, effective and saved, and its groups.  The
            working directory is given to it.
        @param memory_mb: its memory limit in MiB (0: none), enforced where
            jobs get cgroups.

        @return: a Deferred that fires with a L{RunningProcess} once the
            program is running, or fails with L{SpawnError}.
        """
        if not self.running:
            return fail(SpawnError("the process spawner is not running"))
        if self._helper is None:
            self._log.info("starting a new process spawner helper")
            try:
                self._start_helper()
            except OSError as e:
                return fail(SpawnError(f"cannot start the process spawner helper: {e}"))
        return self._helper.spawn(
            argv, env, cwd, stdout_path, stderr_path, deadline, run_as, memory_mb
        )

    def set_deadline(self, processes, at):
        """
        Move the deadline of C{processes} to C{at}, in one message to the
        helper: a remote worker renews all its leases with one heartbeat.

        @param processes: L{RunningProcess}es this spawner started; those
            that have ended, or whose helper has died, are left out.
        @param at: a time on L{dispatcher.execution._spawner.deadline_clock},
            or C{None} for no deadline.
        """
        if self._helper is not None and processes:
            self._helper.set_deadline(processes, at)

    def _start_helper(self):
        helper = _Helper(self._helper_ended, self._helper_ready)
        process = self._reactor.spawnProcess(
            helper,
            sys.executable,
            [sys.executable, "-I", "-S", _HELPER, json.dumps(self._settings)],
            env={},
            childFDs={0: "w", 1: "r", 2: "r"},
        )
        self._helper = helper
        if self.child_open_files is not None:
            # Before it is asked for any job: requests come through the
            # reactor, after this returns.
            try:
                _, hard = resource.prlimit(process.pid, resource.RLIMIT_NOFILE)
                resource.prlimit(
                    process.pid, resource.RLIMIT_NOFILE, (min(self.child_open_files, hard), hard)
                )
            except OSError as e:
                self._log.warn(
                    "cannot set the spawner helper's open-file limit to {limit}: {error}",
                    limit=self.child_open_files, error=e,
                )

    def _helper_ready(self, description):
        # Said once, and again only if a new helper finds otherwise.
        if description != self.description:
            self.description = description
            self._log.info("process spawner: {description}", description=description)

    def _helper_ended(self, helper):
        if helper is self._helper:
            self._helper = None


def process_identity(pid):
    """
    Tell which process has id C{pid} now, to compare with what was recorded
    when a job started: pids get reused.

    @param pid: a process id.

    @return: C{(start_ticks, boot_id)}, or C{None} if there is no such process.
    """
    fields = read_stat(pid)
    if fields is None:
        return None
    return int(fields[_START_TICKS]), read_boot_id()


def kill_group_if_ours(pid, start_ticks, boot_id, signum):
    """
    Signal the process group that a job led, but only if process C{pid} is
    still that job: same start time, same boot, still its group's leader.
    Used when the daemon starts again after a crash, to end the jobs it lost.

    A group whose leader has already exited and been reaped is not signalled:
    nothing then tells its members from those of a newer group with the same
    id.

    @param pid: the pid recorded when the job started.
    @param start_ticks: the start time recorded then; with C{None}, nothing
        is signalled.
    @param boot_id: the boot id recorded then; with C{None}, nothing is
        signalled.
    @param signum: the signal to send.

    @return: whether the group was signalled.
    """
    if start_ticks is None or boot_id is None:
        # Nothing recorded to tell this job from whoever has its pid now.
        return False
    fields = read_stat(pid)
    if fields is None:
        return False
    if (
        int(fields[_START_TICKS]) != int(start_ticks)
        or read_boot_id() != boot_id
        or int(fields[_PROCESS_GROUP]) != int(pid)
    ):
        return False
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:
        return False
    return True
