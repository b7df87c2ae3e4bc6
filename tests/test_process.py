"""
Tests for L{dispatcher.execution._process} and its helper, with real processes.
"""

import json
import os
import select
import signal
import subprocess
import sys
import time

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from dispatcher.execution._interfaces import IProcessSpawner, IRunningProcess
from dispatcher.execution._process import (
    _HELPER,
    ProcessLost,
    ProcessSpawner,
    SpawnError,
    kill_group_if_ours,
    process_identity,
)
from dispatcher.execution._spawner import deadline_clock, read_boot_id, read_stat
from .test_remote import poll

PATH = {"PATH": "/usr/bin:/bin"}


def sleep(seconds):
    """Real time, only to wait for a real process to end."""
    from twisted.internet.task import deferLater

    return deferLater(reactor, seconds, lambda: None)


def is_alive(pid):
    """
    Whether process C{pid} exists and has not exited; a zombie has exited,
    even if nobody has reaped it yet.
    """
    fields = read_stat(pid)
    return fields is not None and fields[2] != "Z"


def helper_pid_of(process):
    """
    The pid of the spawner helper that started C{process}: its parent.
    """
    return int(read_stat(process.pid)[3])


async def eventually(predicate, timeout=5.0):
    """
    Wait, without blocking the reactor, until C{predicate()} is true.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{predicate} still false after {timeout}s")
        await task.deferLater(reactor, 0.01, lambda: None)


class Jobs:
    """
    Starts processes through a spawner, with their output in a temporary
    directory, and remembers them so that teardown can kill what is left.
    """

    def __init__(self, spawner, directory):
        self.spawner = spawner
        self.directory = directory
        self.started = []

    def spawn(self, argv, env=PATH, cwd=None, name="job", deadline=None):
        d = self.spawner.spawn(
            argv,
            env,
            str(cwd or self.directory),
            str(self.directory / f"{name}.out"),
            str(self.directory / f"{name}.err"),
            deadline=deadline,
        )
        d.addCallback(self._started)
        return d

    def _started(self, process):
        self.started.append(process)
        return process

    def output(self, name="job"):
        """
        The stdout and stderr of the job called C{name}.
        """
        return (
            (self.directory / f"{name}.out").read_text(),
            (self.directory / f"{name}.err").read_text(),
        )

    async def read_pid(self, filename):
        """
        Wait for a job to write a pid to C{filename}, and return it.
        """
        path = self.directory / filename
        await eventually(lambda: path.exists() and path.read_text().endswith("\n"))
        return int(path.read_text())


@pytest_twisted.async_yield_fixture
async def jobs(tmp_path):
    # Only the calls this test leaves count, not those of earlier tests.
    earlier = set(reactor.getDelayedCalls())
    spawner = ProcessSpawner(reactor)
    spawner.startService()
    jobs = Jobs(spawner, tmp_path)
    yield jobs
    for process in jobs.started:
        process.signal_group(signal.SIGKILL)
    await defer.DeferredList([p.ended for p in jobs.started], consumeErrors=True)
    await spawner.stopService()
    assert set(reactor.getDelayedCalls()) - earlier == set()


@pytest_twisted.ensureDeferred
async def test_interfaces(jobs):
    """
    The spawner and the processes it starts provide their interfaces.
    """
    process = await jobs.spawn(["true"])
    assert verifyObject(IProcessSpawner, jobs.spawner)
    assert verifyObject(IRunningProcess, process)
    await process.ended


@pytest_twisted.ensureDeferred
async def test_exit_code_zero(jobs):
    """
    A process that succeeds ends with exit code 0.
    """
    process = await jobs.spawn(["true"])
    assert await process.ended == 0


@pytest_twisted.ensureDeferred
async def test_exit_code_nonzero(jobs):
    """
    A process that fails ends with its exit status.
    """
    process = await jobs.spawn(["sh", "-c", "exit 3"])
    assert await process.ended == 3


@pytest_twisted.ensureDeferred
async def test_killed_by_signal(jobs):
    """
    A process killed by a signal ends with minus the signal number.
    """
    process = await jobs.spawn(["sh", "-c", "kill -KILL $$"])
    assert await process.ended == -signal.SIGKILL


@pytest_twisted.ensureDeferred
async def test_output_files(jobs):
    """
    stdout and stderr are appended to their files, which are created if
    need be.
    """
    (jobs.directory / "job.out").write_text("earlier\n")
    process = await jobs.spawn(["sh", "-c", "echo out; echo err >&2"])
    assert await process.ended == 0
    assert jobs.output() == ("earlier\nout\n", "err\n")


@pytest_twisted.ensureDeferred
async def test_stdin_is_dev_null(jobs):
    """
    A process reads end of file from its stdin.
    """
    process = await jobs.spawn(["sh", "-c", "cat; echo done"])
    assert await process.ended == 0
    assert jobs.output() == ("done\n", "")


@pytest_twisted.ensureDeferred
async def test_no_other_descriptors(jobs):
    """
    A process inherits no file descriptors but its stdin, stdout and stderr.
    """
    process = await jobs.spawn(["sh", "-c", "ls /proc/$$/fd"])
    assert await process.ended == 0
    stdout, _ = jobs.output()
    assert sorted(stdout.split()) == ["0", "1", "2"]


@pytest_twisted.ensureDeferred
async def test_signals_not_ignored(jobs):
    """
    A process starts with no standard signal ignored, although Python
    ignores SIGPIPE and SIGXFSZ and the helper ignores SIGINT.
    """
    process = await jobs.spawn(["sh", "-c", "grep SigIgn /proc/$$/status"])
    assert await process.ended == 0
    stdout, _ = jobs.output()
    ignored = int(stdout.split()[1], 16)
    # Bit n - 1 stands for signal n.  glibc's posix_spawn itself leaves its
    # two internal signals (32 and 33) ignored; only the standard ones count.
    assert [n for n in range(1, 32) if ignored & (1 << (n - 1))] == []


@pytest_twisted.ensureDeferred
async def test_environment_is_exact(jobs):
    """
    A process gets exactly the environment given, nothing of the daemon's.
    """
    env = {"ONLY": "this", "OTHER": "two words"}
    process = await jobs.spawn(["/usr/bin/env"], env=env)
    assert await process.ended == 0
    stdout, _ = jobs.output()
    assert sorted(stdout.splitlines()) == ["ONLY=this", "OTHER=two words"]


@pytest_twisted.ensureDeferred
async def test_program_found_in_job_path(jobs):
    """
    A program name without a slash is looked for in the job's PATH.
    """
    bin_dir = jobs.directory / "bin"
    bin_dir.mkdir()
    program = bin_dir / "greet"
    program.write_text("#!/bin/sh\necho hello\n")
    program.chmod(0o755)
    process = await jobs.spawn(["greet"], env={"PATH": str(bin_dir)})
    assert await process.ended == 0
    assert jobs.output() == ("hello\n", "")
    with pytest.raises(SpawnError, match="no such file: greet"):
        await jobs.spawn(["greet"], env=PATH)


@pytest_twisted.ensureDeferred
async def test_cwd(jobs):
    """
    A process runs in the working directory given.
    """
    workdir = jobs.directory / "work"
    workdir.mkdir()
    process = await jobs.spawn(["pwd"], cwd=workdir)
    assert await process.ended == 0
    stdout, _ = jobs.output()
    assert stdout == os.path.realpath(workdir) + "\n"


@pytest_twisted.ensureDeferred
async def test_missing_executable(jobs):
    """
    Starting a program that does not exist fails with a SpawnError naming
    it, and the spawner goes on working.
    """
    with pytest.raises(SpawnError, match="no such file: no-such-program-4242"):
        await jobs.spawn(["no-such-program-4242"])
    with pytest.raises(SpawnError, match="no such file: /nonexistent/program"):
        await jobs.spawn(["/nonexistent/program"])
    process = await jobs.spawn(["true"])
    assert await process.ended == 0


@pytest_twisted.ensureDeferred
async def test_not_executable(jobs):
    """
    Starting a file that is not executable fails with a SpawnError saying
    permission is denied.
    """
    path = jobs.directory / "data.txt"
    path.write_text("not a program\n")
    with pytest.raises(SpawnError, match=f"permission denied: {path}"):
        await jobs.spawn([str(path)])


@pytest_twisted.ensureDeferred
async def test_missing_directories_are_made(jobs):
    """
    A working directory and output directories that do not exist yet are
    made before the process starts in them.
    """
    workdir = jobs.directory / "new" / "work"
    logs = jobs.directory / "new" / "logs"
    process = await jobs.spawner.spawn(
        ["pwd"], PATH, str(workdir), str(logs / "out"), str(logs / "err")
    ).addCallback(jobs._started)
    assert await process.ended == 0
    assert (logs / "out").read_text() == os.path.realpath(workdir) + "\n"


@pytest_twisted.ensureDeferred
async def test_bad_cwd(jobs):
    """
    Starting a process in a directory that cannot be made fails with a
    SpawnError naming the directory.
    """
    (jobs.directory / "file").write_text("")
    impossible = jobs.directory / "file" / "work"
    with pytest.raises(SpawnError, match=f"cannot make the directory {impossible}"):
        await jobs.spawn(["true"], cwd=impossible)


@pytest_twisted.ensureDeferred
async def test_signal_group_reaches_grandchild(jobs):
    """
    signal_group signals every process of the group, not only its leader.
    """
    # The leader ignores SIGUSR1 but its background child does not; the
    # leader's wait then reports the child killed by SIGUSR1.
    process = await jobs.spawn(
        ["sh", "-c", 'sleep 100 & echo $! > child.pid; trap "" USR1; echo > ready; wait $!']
    )
    child = await jobs.read_pid("child.pid")
    await eventually((jobs.directory / "ready").exists)
    process.signal_group(signal.SIGUSR1)
    assert await process.ended == 128 + signal.SIGUSR1
    await eventually(lambda: not is_alive(child))


@pytest_twisted.ensureDeferred
async def test_background_child_killed_when_leader_exits(jobs):
    """
    A background process left behind by a job is killed when the job's
    leader exits.
    """
    process = await jobs.spawn(["sh", "-c", "sleep 100 & echo $! > child.pid"])
    assert await process.ended == 0
    child = await jobs.read_pid("child.pid")
    await eventually(lambda: not is_alive(child))


@pytest_twisted.ensureDeferred
async def test_terminate(jobs):
    """
    terminate() ends a process with SIGTERM and then cancels its SIGKILL.
    """
    clock = Clock()
    process = await jobs.spawn(["sleep", "100"])
    assert await process.terminate(10, clock) == -signal.SIGTERM
    assert clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_terminate_escalates(jobs):
    """
    terminate() kills with SIGKILL a process that ignores SIGTERM, once the
    grace period is over.
    """
    clock = Clock()
    process = await jobs.spawn(["sh", "-c", 'trap "" TERM; echo > ready; sleep 100'])
    await eventually((jobs.directory / "ready").exists)
    ended = process.terminate(10, clock)
    clock.advance(9)
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(1)
    assert await ended == -signal.SIGKILL
    assert await process.terminate(10, clock) == -signal.SIGKILL
    assert clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_process_identity(jobs):
    """
    process_identity tells a running process's start time and boot, and
    None for a pid nobody has.
    """
    process = await jobs.spawn(["sleep", "100"])
    assert process_identity(process.pid) == (process.start_ticks, process.boot_id)
    assert process.boot_id == read_boot_id()
    with open("/proc/sys/kernel/pid_max") as f:
        assert process_identity(int(f.read()) + 1) is None


@pytest_twisted.ensureDeferred
async def test_kill_group_if_ours(jobs):
    """
    kill_group_if_ours signals a group only if its leader's start time and
    the boot id are the ones recorded.
    """
    process = await jobs.spawn(["sleep", "100"])
    pid, ticks, boot = process.pid, process.start_ticks, process.boot_id
    assert not kill_group_if_ours(pid, ticks + 1, boot, signal.SIGKILL)
    assert not kill_group_if_ours(pid, ticks, "another-boot", signal.SIGKILL)
    assert not kill_group_if_ours(pid, None, None, signal.SIGKILL)
    assert is_alive(pid)
    assert kill_group_if_ours(pid, ticks, boot, signal.SIGKILL)
    assert await process.ended == -signal.SIGKILL
    assert not kill_group_if_ours(pid, ticks, boot, signal.SIGKILL)


@pytest_twisted.ensureDeferred
async def test_many_concurrent_spawns(jobs):
    """
    Many processes started at once all start and report their exit.
    """
    processes = await defer.gatherResults([jobs.spawn(["true"]) for _ in range(200)])
    assert len({p.pid for p in processes}) == 200
    codes = await defer.gatherResults([p.ended for p in processes])
    assert codes == [0] * 200


@pytest_twisted.ensureDeferred
async def test_helper_dies(jobs):
    """
    When the helper dies, its unanswered spawns fail, its processes are
    killed and reported lost, and the next spawn starts a new helper.
    """
    running = await jobs.spawn(["sleep", "100"])
    helper = helper_pid_of(running)
    # Stopped, it cannot answer the next spawn before it is killed.
    os.kill(helper, signal.SIGSTOP)
    unanswered = jobs.spawn(["true"])
    os.kill(helper, signal.SIGKILL)
    with pytest.raises(SpawnError, match="exited unexpectedly"):
        await unanswered
    with pytest.raises(ProcessLost):
        await running.ended
    await eventually(lambda: not is_alive(running.pid))
    after = await jobs.spawn(["sleep", "100"])
    assert helper_pid_of(after) != helper
    after.signal_group(signal.SIGTERM)
    assert await after.ended == -signal.SIGTERM


@pytest_twisted.ensureDeferred
async def test_stop(tmp_path):
    """
    Stopping the service ends the helper, which kills the processes still
    running (the daemon is going away, so nothing would watch them), leaves
    no delayed calls behind, and later spawns fail.
    """
    earlier = set(reactor.getDelayedCalls())
    spawner = ProcessSpawner(reactor)
    spawner.startService()
    jobs = Jobs(spawner, tmp_path)
    process = await jobs.spawn(["sleep", "100"])
    helper = helper_pid_of(process)
    try:
        await spawner.stopService()
        assert read_stat(helper) is None
        for _ in range(200):
            if not is_alive(process.pid):
                break
            await sleep(0.01)
        assert not is_alive(process.pid)
        assert set(reactor.getDelayedCalls()) - earlier == set()
        with pytest.raises(SpawnError, match="not running"):
            await jobs.spawn(["true"])
    finally:
        kill_group_if_ours(
            process.pid, process.start_ticks, process.boot_id, signal.SIGKILL
        )


# Deadlines, kept by the helper itself

class RawHelper:
    """
    The spawner helper as a bare subprocess, spoken to in JSON lines, with
    nobody but the test to talk to it: what keeps a deadline is the helper,
    not a reactor in the process that asked for it.
    """

    def __init__(self, directory, settings=None):
        self.directory = directory
        self.process = subprocess.Popen(
            [sys.executable, "-I", "-S", _HELPER]
            + ([json.dumps(settings)] if settings is not None else []),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={},
        )
        self.replies = []
        self._pending = b""
        # Its first word says what holds for jobs.
        self.ready = self.reply(lambda r: r["op"] == "ready")

    def send(self, **request):
        self.process.stdin.write(json.dumps(request).encode() + b"\n")
        self.process.stdin.flush()

    def send_together(self, *requests):
        """Send C{requests} in one write, which the helper reads at once
        (a pipe write below PIPE_BUF is atomic)."""
        data = b"".join(json.dumps(request).encode() + b"\n" for request in requests)
        assert len(data) < select.PIPE_BUF
        os.write(self.process.stdin.fileno(), data)

    def spawn_request(self, job_id, argv, **extra):
        request = dict(
            op="spawn", id=job_id, argv=argv, env=PATH, cwd=str(self.directory),
            stdout=str(self.directory / f"{job_id}.out"),
            stderr=str(self.directory / f"{job_id}.err"))
        request.update(extra)
        return request

    def spawn(self, job_id, argv, **extra):
        self.send(**self.spawn_request(job_id, argv, **extra))
        return self.reply(lambda r: r["id"] == job_id and r["op"] == "spawned")

    def reply(self, match, timeout=10.0):
        """The first reply matching C{match}, waiting for it up to C{timeout}."""
        deadline = time.monotonic() + timeout
        while True:
            for reply in self.replies:
                if match(reply):
                    self.replies.remove(reply)
                    return reply
            left = deadline - time.monotonic()
            assert left > 0, f"no matching reply; got {self.replies}"
            ready, _, _ = select.select([self.process.stdout], [], [], left)
            if ready:
                # Unbuffered: a line left in a file object's buffer would
                # never wake the select.
                data = os.read(self.process.stdout.fileno(), 65536)
                assert data, "the helper exited"
                lines = (self._pending + data).split(b"\n")
                self._pending = lines.pop()
                self.replies.extend(json.loads(line) for line in lines)

    def exited(self, job_id, timeout=10.0):
        return self.reply(lambda r: r["id"] == job_id and r["op"] == "exited", timeout)

    def close(self):
        self.process.stdin.close()
        self.process.wait(10)
        self.process.stdout.close()


@pytest.fixture
def raw_helper(tmp_path):
    helper = RawHelper(tmp_path)
    yield helper
    helper.close()


def test_a_job_past_its_deadline_is_killed_and_reported(raw_helper):
    """
    The helper kills a job whose deadline passes (its whole process group,
    with SIGKILL) and reports its exit as killed at its deadline, while a
    job whose deadline was moved later, and one without any, run on.
    """
    start = deadline_clock()
    fenced = raw_helper.spawn(1, ["sleep", "30"], deadline=start + 0.5)
    # Spawned and moved in one read: a busy host must not let its first
    # deadline pass between the two.
    raw_helper.send_together(
        raw_helper.spawn_request(2, ["sleep", "30"], deadline=start + 0.5),
        dict(op="deadline", ids=[2, 99], at=start + 60))
    extended = raw_helper.reply(lambda r: r["id"] == 2 and r["op"] == "spawned")
    free = raw_helper.spawn(3, ["sleep", "30"])
    exited = raw_helper.exited(1)
    assert exited == {"op": "exited", "id": 1, "code": -signal.SIGKILL, "deadline": True}
    assert deadline_clock() >= start + 0.5
    assert not is_alive(fenced["pid"])
    assert is_alive(extended["pid"]) and is_alive(free["pid"])
    # A deadline moved earlier, to a time already past, kills at once.
    raw_helper.send(op="deadline", ids=[2], at=deadline_clock() - 1)
    assert raw_helper.exited(2)["deadline"] is True
    raw_helper.send(op="signal", id=3, signal=signal.SIGTERM)
    assert raw_helper.exited(3) == {"op": "exited", "id": 3, "code": -signal.SIGTERM}


def test_a_deadline_taken_away_kills_nothing(raw_helper):
    """
    A deadline of null takes a job's deadline away; a stray process the job
    left in its group dies with it at its deadline.
    """
    start = deadline_clock()
    # The spawn and the deadline taken away arrive in one read: on a busy
    # host the test's own turn between them could take longer than the
    # deadline, which would then (rightly) kill the job first.
    raw_helper.send_together(
        raw_helper.spawn_request(1, ["sleep", "30"], deadline=start + 0.3),
        dict(op="deadline", ids=[1], at=None))
    kept = raw_helper.reply(lambda r: r["id"] == 1 and r["op"] == "spawned")
    stray_file = raw_helper.directory / "stray.pid"
    group = raw_helper.spawn(
        2, ["sh", "-c", f"sleep 30 & echo $! > {stray_file}.new; "
            f"mv {stray_file}.new {stray_file}; wait"],
        deadline=start + 60)
    # Its deadline is brought to now once its stray is known, and past
    # the first job's old one: the helper looks at deadlines after that
    # request, so it would have killed the first job had it kept its own.
    poll(stray_file.exists, what="the stray's pid")
    time.sleep(max(0.0, start + 0.4 - deadline_clock()))
    raw_helper.send(op="deadline", ids=[2], at=deadline_clock())
    assert raw_helper.exited(2)["deadline"] is True
    stray = int(stray_file.read_text())
    assert not is_alive(stray) and not is_alive(group["pid"])
    assert is_alive(kept["pid"])
    raw_helper.send(op="signal", id=1, signal=signal.SIGKILL)
    assert "deadline" not in raw_helper.exited(1)


def test_a_bad_deadline_is_refused_in_words(raw_helper):
    """
    A deadline that is not a number is refused, and the job is not started.
    """
    raw_helper.send(op="spawn", id=1, argv=["true"], env=PATH,
                    cwd=str(raw_helper.directory), stdout="/dev/null",
                    stderr="/dev/null", deadline="soon")
    reply = raw_helper.reply(lambda r: r["id"] == 1)
    assert reply["op"] == "error"
    assert "a deadline must be a number of seconds" in reply["error"]


@pytest_twisted.ensureDeferred
async def test_spawner_deadlines_kill_and_say_so(jobs):
    """
    Through the ProcessSpawner, a process spawned with a deadline that
    set_deadline moves earlier is killed by the helper and says it was
    killed at its deadline; one moved later is not.
    """
    later = deadline_clock() + 60
    doomed = await jobs.spawn(["sleep", "30"], deadline=later)
    spared = await jobs.spawn(["sleep", "30"], deadline=deadline_clock() + 0.3)
    jobs.spawner.set_deadline([spared], later)
    jobs.spawner.set_deadline([doomed], deadline_clock() + 0.2)
    assert await doomed.ended == -signal.SIGKILL
    assert doomed.killed_at_deadline
    await sleep(0.3)
    assert is_alive(spared.pid) and not spared.killed_at_deadline
