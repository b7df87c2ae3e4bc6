"""
A remote worker's own retention (L{dispatcher.workers._sweep}) on a test
clock: its jobs' directories go C{keep} seconds after it let go of them,
never while it holds them, those an earlier run left are found and go by
age, each step is bounded, and a job whose directory is being removed
starts only once that is done.
"""

import os
import time
import uuid

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock

from dispatcher.execution._executor import job_path
from dispatcher.execution._job_dirs import JobDirectories
from dispatcher.model._jobs import JobState, Outcome
from dispatcher.workers._sweep import (
    MIN_INTERVAL,
    JobDirectorySweeper,
    KeptDirectories,
)

from .test_worker import Harness, lease, recorded, unavailable


def job_id(n, at=None):
    """A UUIDv7-shaped id made at C{at} (now by default)."""
    ms = int((time.time() if at is None else at) * 1000)
    return str(uuid.UUID(f"{ms:012x}7000{n:016x}"[:32]))


class Blocking:
    """Runs the sweeper's blocking calls at once, or holds them until the
    test releases them; counts them by function."""

    def __init__(self):
        self.calls = []
        self.held = None

    def __call__(self, function, *args):
        self.calls.append(function.__name__)
        if self.held is not None:
            d = Deferred()
            self.held.append((d, function, args))
            return d
        return maybeDeferred(function, *args)

    def hold(self):
        self.held = []

    def release(self):
        held, self.held = self.held, None
        for d, function, args in held:
            d.callback(function(*args))


def make_dir(jobs, ident, age=0.0, clock=None):
    """A job directory as the executor leaves it, last written C{age}
    seconds before the clock's now."""
    path = jobs / job_path(ident)
    (path / "work").mkdir(parents=True)
    (path / "attempt-1").mkdir()
    (path / "attempt-1" / "stdout").write_bytes(b"out\n")
    when = (clock.seconds() if clock is not None else time.time()) - age
    for p in (path / "attempt-1" / "stdout", path / "attempt-1", path / "work", path):
        os.utime(p, (when, when))
    return path


def sweeper(tmp_path, keep, held=(), **kwargs):
    jobs = tmp_path / "jobs"
    jobs.mkdir(exist_ok=True)
    clock = Clock()
    clock.advance(time.time())
    blocking = Blocking()
    held = set(held)
    sweep = JobDirectorySweeper(
        JobDirectories(str(jobs)), clock, blocking, keep, lambda j: j in held, **kwargs)
    return sweep, clock, jobs, blocking, held


def test_a_directory_goes_keep_seconds_after_its_job_was_let_go(tmp_path):
    """A job's directory stays while less than C{keep} seconds have passed
    since the worker let go of its job, and goes with the window
    directories it leaves empty once they have, at a pass."""
    running = job_id(2)
    sweep, clock, jobs, blocking, held = sweeper(tmp_path, keep=100.0, held={running})
    ident = job_id(1)
    path = make_dir(jobs, ident, clock=clock)
    other = make_dir(jobs, running, clock=clock)
    sweep.start()
    sweep.finished(ident)
    clock.advance(90)
    assert path.exists()
    clock.advance(30)
    assert not path.exists()
    assert other.exists(), "a running job's directory stays"
    assert sweep.removed == 1
    # Its parents went with it where nothing else was in them.
    assert not path.parent.exists()
    held.clear()
    sweep.finished(running)
    clock.pump([10.0] * 11)
    assert os.listdir(jobs) == []
    sweep.stop()
    assert clock.getDelayedCalls() == []


def test_zero_keep_removes_at_the_next_pass(tmp_path):
    """With C{keep} 0 a directory goes at the first pass after the worker
    let go of its job, within a couple of seconds."""
    sweep, clock, jobs, blocking, held = sweeper(tmp_path, keep=0.0)
    ident = job_id(1)
    path = make_dir(jobs, ident, clock=clock)
    sweep.start()
    clock.advance(MIN_INTERVAL)
    sweep.finished(ident)
    clock.advance(MIN_INTERVAL)
    clock.advance(MIN_INTERVAL)
    assert not path.exists()
    sweep.stop()


def test_a_held_job_directory_is_never_removed(tmp_path):
    """A directory of a job the worker holds (it runs, or its result is not
    yet accepted) stays however old it is, found by the walk or let go of
    before; let go of again, it goes C{keep} later."""
    ident = job_id(1)
    sweep, clock, jobs, blocking, held = sweeper(tmp_path, keep=10.0, held={ident})
    path = make_dir(jobs, ident, age=1000, clock=clock)
    sweep.start()
    sweep.finished(ident)
    clock.pump([1.0] * 60)
    assert path.exists()
    held.clear()
    sweep.finished(ident)
    clock.pump([1.0] * 5)
    assert path.exists()
    clock.pump([1.0] * 10)
    assert not path.exists()
    sweep.stop()


def test_what_an_earlier_run_left_is_found_and_removed_by_age(tmp_path):
    """After a start, the directories an earlier run left are found and go
    once their last write is C{keep} seconds old; a directory the job
    layout does not name stays."""
    sweep, clock, jobs, blocking, held = sweeper(tmp_path, keep=100.0)
    old = make_dir(jobs, job_id(1, at=time.time() - 86400), age=500, clock=clock)
    recent = make_dir(jobs, job_id(2), age=50, clock=clock)
    stray = jobs / "0000" / "00" / "00" / "00" / "not-a-job"
    stray.mkdir(parents=True)
    sweep.start()
    clock.advance(sweep.interval)
    assert not old.exists()
    assert recent.exists()
    assert stray.exists()
    clock.pump([1.0] * 30)
    assert recent.exists()
    clock.pump([1.0] * 40)
    assert not recent.exists()
    assert stray.exists()
    sweep.stop()


def test_a_directory_written_since_is_kept_from_that_write(tmp_path):
    """A directory written after the worker let go of its job (the job ran
    here again) is kept C{keep} seconds from that write."""
    sweep, clock, jobs, blocking, held = sweeper(tmp_path, keep=100.0)
    ident = job_id(1)
    path = make_dir(jobs, ident, clock=clock)
    sweep.start()
    sweep.finished(ident)
    clock.advance(50)
    again = clock.seconds()
    os.utime(path / "attempt-1" / "stdout", (again, again))
    clock.advance(60)
    assert path.exists()
    clock.advance(30)
    assert path.exists()
    clock.advance(40)
    assert not path.exists()
    sweep.stop()


def test_each_step_is_bounded_and_a_pass_that_leaves_work_comes_back_soon(tmp_path):
    """A step removes at most C{batch} directories and reads at most
    C{scan} of the walk, a pass takes at most C{steps} of each, and a pass
    that left work is followed by the next after a second, not the
    interval."""
    sweep, clock, jobs, blocking, held = sweeper(
        tmp_path, keep=600.0, batch=3, scan=4, steps=2)
    paths = [make_dir(jobs, job_id(n), age=10_000, clock=clock) for n in range(1, 11)]
    assert sweep.interval == 60.0
    sweep.start()
    clock.advance(60)
    # Two walk steps read 8 of 10; two removal steps removed 6.
    assert blocking.calls == ["_read_walk", "_read_walk",
                              "remove_unwritten_since", "remove_unwritten_since"]
    assert sum(p.exists() for p in paths) == 4
    blocking.calls.clear()
    clock.advance(MIN_INTERVAL)
    assert blocking.calls == ["_read_walk", "remove_unwritten_since",
                              "remove_unwritten_since"]
    assert not any(p.exists() for p in paths)
    blocking.calls.clear()
    clock.advance(MIN_INTERVAL)
    # Nothing left: the next pass is an interval away.
    assert blocking.calls == []
    assert [c.getTime() - clock.seconds() for c in clock.getDelayedCalls()] == [59.0]
    sweep.stop()


def test_a_job_whose_directory_is_being_removed_starts_once_it_is_gone(tmp_path):
    """A job leased while a step removes its directory, or one on the way
    to it, starts only when the step has ended; a job of another window
    starts at once."""
    h = Harness(slots=2)
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    blocking = Blocking()
    sweep = JobDirectorySweeper(
        JobDirectories(str(jobs)), h.clock, blocking, 0.0, lambda j: j in h.worker.held)
    h.worker._sweeper = sweep
    h.clock.advance(time.time())
    h.worker.startService()
    h.clock.advance(MIN_INTERVAL)
    assert blocking.calls == ["_read_walk"]
    make_dir(jobs, "job-1", age=10, clock=h.clock)
    sweep.finished("job-1")
    blocking.hold()
    h.clock.advance(MIN_INTERVAL)
    assert [f.__name__ for _, f, _ in blocking.held] == ["remove_unwritten_since"]
    assert sweep.busy("job-2") is not None  # same window ("job-")
    assert sweep.busy("abcd-other") is None
    h.grant(lease(1))
    assert "job-1" in h.worker.held
    assert h.executor.runs == {}
    blocking.release()
    assert list(h.executor.runs) == ["job-1"]
    assert not (jobs / job_path("job-1")).exists()


def test_a_worker_keeps_a_directory_until_its_result_is_accepted(tmp_path):
    """With C{keep} 0, a job's directory stays while its result waits for
    the dispatcher, however long, and goes at the first pass after the
    dispatcher accepted it."""
    h = Harness(slots=1)
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    blocking = Blocking()
    sweep = JobDirectorySweeper(
        JobDirectories(str(jobs)), h.clock, blocking, 0.0, lambda j: j in h.worker.held)
    h.worker._sweeper = sweep
    h.clock.advance(time.time())
    h.worker.startService()
    h.grant(lease(1))
    path = make_dir(jobs, "job-1", clock=h.clock)
    h.executor.finish("job-1", Outcome(JobState.SUCCEEDED, exit_code=0))
    unavailable(h, h.one("/v1/leases/results"))
    h.advance(30, step=0.5)
    assert path.exists()
    h.results(h.one("/v1/leases/results"), recorded(1))
    h.advance(2 * MIN_INTERVAL, step=0.5)
    assert not path.exists()


def test_kept_directories_take_sixteen_bytes_a_job_and_come_back_in_order():
    """Kept job ids come back as they went in, the oldest spans first, only
    once their span is past the cutoff; a UUID takes 16 bytes, any other
    id is kept as it is."""
    kept = KeptDirectories(span=10.0)
    ids = [job_id(n) for n in range(5)]
    kept.add(ids[3], 35.0)
    kept.add(ids[0], 1.0)
    kept.add(ids[1], 2.0)
    kept.add("odd-id", 5.0)
    kept.add(ids[2], 12.0)
    assert kept.count == 5
    assert kept.take_due(9.9, 10) == []
    assert sorted(kept.take_due(10.0, 10)) == sorted([ids[0], ids[1], "odd-id"])
    assert kept.take_due(40.0, 1) == [ids[2]]
    assert kept.take_due(40.0, 10) == [ids[3]]
    assert kept.count == 0 and not kept.due(1e12)
    for n in range(100):
        kept.add(job_id(n), 1.0)
    assert len(kept._buckets[0].packed) == 1600
