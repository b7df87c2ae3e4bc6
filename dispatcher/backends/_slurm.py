"""
Slurm's commands, run as child processes of the reactor.

Why the commands and not slurmrestd: they work wherever a user may submit
jobs (a login node, the dispatcher's host with the cluster's client
configuration), while slurmrestd needs a site to run it and to set up JWT
keys for it, and its API's paths change with each Slurm release
(C{/slurm/v0.0.38/} ...).  Each call is a process (a few tens of ms of
slurmctld's and our time), which is why calls are batched: one C{squeue}
for every pilot a look, one C{sbatch} a pilot, one C{scancel} a pilot
stopped.

A call never blocks the reactor: the process is spawned with
C{IReactorProcess.spawnProcess}, its output gathered by a protocol, and a
call that outlives its timeout is killed and fails (L{SlurmError}).  A
failed call changes nothing the caller knows: a C{squeue} that failed says
nothing of which jobs are gone.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

# How long one command may take before it is killed.
COMMAND_TIMEOUT = 60.0

# The most bytes of a command's output kept (squeue of thousands of jobs
# fits).
MAX_OUTPUT = 16 * 1024 * 1024

# Slurm's states in which a job is no longer running nor about to
# (squeue --states=all shows them for MinJobAge after the end).
ENDED_STATES = frozenset({
    "BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL",
    "OUT_OF_MEMORY", "PREEMPTED", "REVOKED", "SPECIAL_EXIT", "TIMEOUT",
})


def parse_time(text: str) -> Optional[float]:
    """
    Seconds of a Slurm duration as squeue writes it (C{[D-][[H:]M:]S}),
    or C{None} for one it does not give (C{UNLIMITED}, C{NOT_SET},
    C{INVALID}, anything else).
    """
    days = 0
    if "-" in text:
        head, _, text = text.partition("-")
        if not head.isdigit():
            return None
        days = int(head)
    parts = text.split(":")
    if not 1 <= len(parts) <= 3 or not all(p.isdigit() for p in parts):
        return None
    seconds = 0
    for part in parts:
        seconds = seconds * 60 + int(part)
    return float(days * 86400 + seconds)


class SlurmError(Exception):
    """
    A Slurm command failed: it could not start, exited non-zero, was
    killed at its timeout, or said what could not be read.
    """


@attrs.frozen
class SlurmJob:
    """
    One job as C{squeue} shows it: its id, its state (C{PENDING},
    C{RUNNING}, ... as Slurm names them) and its comment.
    """

    job_id: str
    state: str
    comment: str
    # Seconds before its time limit ends it, when it runs and has one.
    time_left: Optional[float] = None

    @property
    def ended(self) -> bool:
        """
        Whether the job is over (or as good as: a job being completed
        runs nothing more).
        """
        return self.state in ENDED_STATES


class _Gather(ProcessProtocol):
    def __init__(self, stdin: Optional[bytes], done: Deferred) -> None:
        self._stdin = stdin
        self._done = done
        self.out: list[bytes] = []
        self.err: list[bytes] = []
        self._size = 0

    def connectionMade(self) -> None:
        if self._stdin is not None:
            self.transport.write(self._stdin)
        self.transport.closeStdin()

    def _keep(self, into: list[bytes], data: bytes) -> None:
        if self._size < MAX_OUTPUT:
            into.append(data[: MAX_OUTPUT - self._size])
            self._size += len(into[-1])

    def outReceived(self, data: bytes) -> None:
        self._keep(self.out, data)

    def errReceived(self, data: bytes) -> None:
        self._keep(self.err, data)

    def processEnded(self, reason: Failure) -> None:
        code: Optional[int] = None
        signal: Optional[int] = None
        if reason.check(ProcessDone):
            code = 0
        elif reason.check(ProcessTerminated):
            code = reason.value.exitCode
            signal = reason.value.signal
        self._done.callback((code, signal, b"".join(self.out), b"".join(self.err)))


class SlurmCommands:
    """
    C{sbatch}, C{squeue} and C{scancel} of one cluster.

    @param reactor: an C{IReactorProcess} and C{IReactorTime}.
    @param slurm_bin: the directory of the commands (C{None}: each is
        looked for on C{PATH}).
    @param env: the commands' environment (C{None}: this process's, which
        carries C{SLURM_CONF} where one is set).
    @param timeout: seconds one command may take.
    """

    def __init__(
        self,
        reactor: Any,
        slurm_bin: Optional[str] = None,
        env: Optional[dict[str, str]] = None,
        timeout: float = COMMAND_TIMEOUT,
    ) -> None:
        self._reactor = reactor
        self._bin = slurm_bin
        self._env = env
        self.timeout = timeout

    def _path(self, command: str) -> str:
        if self._bin is not None:
            return os.path.join(self._bin, command)
        env = self._env if self._env is not None else os.environ
        for directory in env.get("PATH", os.defpath).split(os.pathsep):
            candidate = os.path.join(directory or ".", command)
            if os.access(candidate, os.X_OK):
                return candidate
        raise SlurmError(f"{command} is not on PATH; install Slurm's client commands "
                         "or set [backend:NAME] slurm_bin")

    async def run(self, command: str, args: Sequence[str], stdin: Optional[bytes] = None) -> bytes:
        """
        Run C{command} with C{args}; its standard output, if it exits 0.

        @raise SlurmError: otherwise, with what it wrote to standard error.
        """
        path = self._path(command)
        done: Deferred = Deferred()
        protocol = _Gather(stdin, done)
        env = dict(self._env if self._env is not None else os.environ)
        try:
            process = self._reactor.spawnProcess(
                protocol, path, [command, *args], env=env
            )
        except OSError as e:
            raise SlurmError(f"{command} could not start: {e.strerror}") from e
        killed: list[bool] = []

        def kill() -> None:
            killed.append(True)
            try:
                process.signalProcess("KILL")
            except Exception:
                pass

        timer = self._reactor.callLater(self.timeout, kill)
        try:
            code, signal, out, err = await done
        finally:
            if timer.active():
                timer.cancel()
        if code != 0:
            said = " ".join(err.decode("utf-8", "replace").split())[:500]
            how = f"was killed by signal {signal}" if signal else f"exited {code}"
            if killed:
                how = f"took over {self.timeout:g} s and was killed"
            raise SlurmError(f"{command} {how}: {said or '(it said nothing)'}")
        return out

    async def submit(self, script: str, options: Sequence[str]) -> str:
        """
        Submit the batch script C{script} with C{options}; its job id.
        """
        out = await self.run("sbatch", ["--parsable", *options], script.encode("utf-8"))
        job_id = out.decode("utf-8", "replace").strip().split(";")[0]
        if not job_id.isdigit():
            raise SlurmError(f"sbatch answered {out[:200]!r}, not a job id")
        return job_id

    async def jobs(self, name: str, arrays: bool = False) -> list[SlurmJob]:
        """
        The jobs of this user named C{name}, in every state Slurm still
        shows (one C{squeue} for them all); with C{arrays}, each task of a
        job array on a line of its own (C{ID_INDEX}), pending ones too.
        """
        out = await self.run(
            "squeue",
            ["--noheader", "--me", f"--name={name}", "--states=all",
             *(["--array"] if arrays else []), "--format=%i|%T|%L|%k"],
        )
        found = []
        for line in out.decode("utf-8", "replace").splitlines():
            if not line.strip():
                continue
            parts = line.split("|", 3)
            if len(parts) != 4 or not parts[0].strip().replace("_", "").isdigit():
                raise SlurmError(f"squeue wrote a line it should not have: {line[:200]!r}")
            state = parts[1].strip()
            left = parse_time(parts[2].strip()) if state == "RUNNING" else None
            found.append(SlurmJob(parts[0].strip(), state, parts[3].strip(), left))
        return found

    async def cancel(self, job_id: str) -> None:
        """
        End the job C{job_id} (C{scancel}): its batch shell gets SIGTERM,
        then everything SIGKILL after the cluster's C{KillWait}.
        """
        await self.run("scancel", [job_id])

    async def cancel_many(self, job_ids: Sequence[str]) -> None:
        """
        End the jobs (or array tasks, C{ID_INDEX}) C{job_ids}, in one
        C{scancel}.
        """
        await self.run("scancel", list(job_ids))

    async def accounting(self, job_ids: Sequence[str]) -> dict[str, tuple[str, str]]:
        """
        The state and exit code (C{CODE:SIGNAL}) C{sacct} keeps of each of
        C{job_ids} that it knows, in one call.

        @raise SlurmError: C{sacct} failed (a cluster without accounting).
        """
        out = await self.run(
            "sacct",
            ["--noheader", "--parsable2", "--allocations", "--format=JobID,State,ExitCode",
             f"--jobs={','.join(job_ids)}"],
        )
        found = {}
        for line in out.decode("utf-8", "replace").splitlines():
            parts = line.split("|")
            if len(parts) == 3 and parts[1].strip():
                found[parts[0].strip()] = (parts[1].strip(), parts[2].strip())
        return found

    async def signal_batch(self, job_id: str, signal: str = "TERM") -> None:
        """
        Send C{signal} to the batch shell of C{job_id} alone (a pilot that
        C{exec}s its worker: the worker drains and exits), ending nothing.
        """
        await self.run("scancel", ["--batch", f"--signal={signal}", job_id])

