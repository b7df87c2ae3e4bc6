"""
Retention: finished jobs are removed with their attempts, logs and working
directories once past C{[retention] finished_days} or beyond
C{finished_count}, in small steps of the store's one writer, and what a
job that stays still needs is kept (a dependency whose dependent has not
succeeded, a job a live idempotency key made, an array until it can go
whole); C{DELETE /v1/jobs/{id}} removes one finished job at once.  Checked
on the store, on the retention's passes with a fake clock, on a daemon
with a fake clock, through the API, and on a real C{twistd}.
"""

import json
import os
import sqlite3
import time

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock
from twisted.python.threadpool import ThreadPool

from dispatcher.config._ini import ConfigError, RetentionConfig, parse_config
from dispatcher.core._retention import (
    BATCH,
    MAX_INTERVAL,
    MIN_INTERVAL,
    WINDOW_MARGIN,
    Retention,
    RetentionPolicy,
)
from dispatcher.execution._executor import job_path
from dispatcher.execution._job_dirs import JobDirectories, window_end, window_path
from dispatcher.model._jobs import JobIds, JobSpec, JobState, Offer, Outcome, UnknownJob
from dispatcher.store import _writes as writes
from dispatcher.store._results import (
    DependencyNotRetried,
    HasDependents,
    IdempotencyKey,
    NotFinished,
    RemovalCursor,
    UnknownDependency,
)
from dispatcher.store._sqlite import SQLiteJobStore

from .conftest import until
from .test_owners import call, with_credentials
from .test_twistd import Twistd

ids = JobIds()

FAILED = Outcome(JobState.FAILED, exit_code=1)
SUCCEEDED = Outcome(JobState.SUCCEEDED, exit_code=0)


# The store's rules


@pytest.fixture
def make_store(tmp_path):
    """Open SQLite stores in the test's directory; all closed at teardown."""
    made = []

    async def make(name="db", **options):
        store = SQLiteJobStore(str(tmp_path / f"{name}.sqlite3"), reactor, **options)
        made.append(store)
        await store.open()
        return store

    yield make
    for store in made:
        pytest_twisted.blockon(store.close())


async def submit(store, *specs, now=100.0, key=None, owner=None):
    written = await store.submit(
        list(specs), now, [ids.new() for _ in specs], key, owner=owner)
    return written.value.jobs


async def run_all(store, now, outcome=SUCCEEDED):
    """Claim every queued job and end each with C{outcome}; their ids."""
    leases = (await store.claim(Offer("h", 10000), 10000, now, 60)).leases
    for lease in leases:
        await store.finish(lease, outcome, now)
    return [lease.job_id for lease in leases]


async def sweep(store, now, cutoff=None, excess=0, limit=BATCH, scan=1000):
    """One whole removal pass: the ids removed, in order, and its steps."""
    cursor = RemovalCursor()
    removed = []
    steps = []
    while True:
        step = (await store.remove_finished(now, cutoff, excess, cursor, limit, scan)).value
        removed.extend(step.job_ids)
        steps.append(step)
        cursor, excess = step.cursor, step.excess
        if step.done:
            return removed, steps


async def stored(store, job_id):
    try:
        return await store.get(job_id)
    except UnknownJob:
        return None


def command(i=0, **kw):
    return JobSpec(command=("echo", str(i)), **kw)


@pytest_twisted.ensureDeferred
async def test_only_finished_jobs_past_the_age_go(make_store):
    """A pass removes the finished jobs that finished before the cutoff, with
    their attempts and labels; a finished job younger than it, and a
    queued, a pending and a running one however old, stay."""
    store = await make_store()
    old = await submit(store, command(1, labels={"team": "a"}), command(2), now=100.0)
    await run_all(store, 110.0)
    young = await submit(store, command(3), now=150.0)
    await run_all(store, 190.0)
    running = await submit(store, command(4), now=100.0)
    (lease,) = (await store.claim(Offer("h", 1), 1, 120.0, 60)).leases
    assert lease.job_id == running[0].id
    queued = await submit(store, command(5), now=100.0)
    pending = await submit(store, command(6, not_before=10_000.0), now=100.0)
    removed, _ = await sweep(store, 200.0, cutoff=180.0)
    assert sorted(removed) == sorted(j.id for j in old)
    for job in old:
        assert await stored(store, job.id) is None
    assert (await store.list_jobs(labels=[("team", "a")]))[0] == []
    for job, state in ((young[0], "succeeded"), (running[0], "running"),
                       (queued[0], "queued"), (pending[0], "pending")):
        assert (await store.get(job.id)).state.value == state
    # Not even a cutoff in the far future takes an unfinished job.
    removed, _ = await sweep(store, 1e9, cutoff=1e9)
    assert removed == [young[0].id]
    assert {j.state.value for j in (await store.list_jobs())[0]} == {
        "running", "queued", "pending"}
    # The attempts went with their jobs.
    conn = sqlite3.connect(store._path)
    (attempts,) = conn.execute("SELECT COUNT(*) FROM attempts").fetchone()
    conn.close()
    assert attempts == 1


@pytest_twisted.ensureDeferred
async def test_the_count_rule_removes_the_earliest_submitted(make_store):
    """With more finished jobs than the count keeps, the earliest submitted
    go, whatever their age; unfinished jobs neither count nor go."""
    store = await make_store()
    finished = await submit(store, *[command(i) for i in range(6)], now=100.0)
    await run_all(store, 101.0)
    await submit(store, command(9), now=100.0)
    counts = await store.count_by_state()
    assert counts[JobState.SUCCEEDED] == 6
    removed, _ = await sweep(store, 200.0, excess=6 - 4)
    assert removed == [j.id for j in finished[:2]]
    counts = await store.count_by_state()
    assert counts[JobState.SUCCEEDED] == 4 and counts[JobState.QUEUED] == 1


@pytest_twisted.ensureDeferred
async def test_a_dependency_is_kept_until_its_dependents_do_not_need_it(make_store):
    """A finished job stays while a job that depends on it has not
    succeeded: a pending dependent waits on it, and a dependent cancelled
    by its failure reads it when retried; once that dependent is removed
    (or succeeded), the dependency goes too."""
    store = await make_store()
    (first,) = await submit(store, command(1))
    later = await submit(store, command(2, not_before=10_000.0))
    (waiting,) = await submit(store, command(3, depends_on=(first.id, later[0].id)))
    (failing,) = await submit(store, command(4))
    (cancelled,) = await submit(store, command(5, depends_on=(failing.id,)))
    leases = (await store.claim(Offer("h", 10), 10, 110.0, 60)).leases
    for lease in leases:
        await store.finish(lease, SUCCEEDED if lease.job_id == first.id else FAILED, 110.0)
    assert (await store.get(waiting.id)).state is JobState.PENDING
    assert (await store.get(cancelled.id)).state is JobState.CANCELLED
    removed, _ = await sweep(store, 300.0, cutoff=200.0)
    # The cancelled dependent goes (nothing depends on it); the two
    # dependencies stay for the pending one and, this pass, the cancelled.
    assert removed == [cancelled.id]
    assert (await store.get(first.id)).state is JobState.SUCCEEDED
    assert (await store.get(failing.id)).state is JobState.FAILED
    removed, _ = await sweep(store, 300.0, cutoff=200.0)
    assert removed == [failing.id]
    # The succeeded one stays while its dependent waits.
    assert await stored(store, first.id) is not None
    with pytest.raises(HasDependents, match=waiting.id):
        await store.remove(first.id, 300.0)


@pytest_twisted.ensureDeferred
async def test_a_retried_dependent_still_sees_its_failed_dependency(make_store):
    """While a dependent cancelled by a failure is kept (here, by the key
    that made it), its failed dependency is kept too: a retry of the
    dependent is still refused until the dependency is retried, as without
    retention, rather than run as if the failure had never been."""
    store = await make_store(idempotency_ttl=1000.0)
    (failing,) = await submit(store, command(1))
    (dependent,) = await submit(store, command(2, depends_on=(failing.id,)),
                                key=IdempotencyKey("k", "d"))
    await run_all(store, 110.0, FAILED)
    assert (await store.get(dependent.id)).state is JobState.CANCELLED
    removed, _ = await sweep(store, 300.0, cutoff=200.0)
    assert removed == []
    with pytest.raises(DependencyNotRetried):
        await store.retry(dependent.id, 300.0, False)
    # Once the key has expired, both go: the dependent, then the failure.
    removed, _ = await sweep(store, 1200.0, cutoff=1150.0)
    assert removed == [dependent.id]
    removed, _ = await sweep(store, 1200.0, cutoff=1150.0)
    assert removed == [failing.id]


@pytest_twisted.ensureDeferred
async def test_a_job_a_live_idempotency_key_made_is_kept(make_store):
    """Retention keeps a job while the idempotency key that made it is
    live, so that a replay answers with it; once the key has expired the
    job goes.  A delete forgets the key with the job: a replay then makes
    the job again."""
    store = await make_store(idempotency_ttl=1000.0)
    key = IdempotencyKey("k1", "digest")
    (keyed,) = await submit(store, command(1), now=100.0, key=key, owner="ann")
    (plain,) = await submit(store, command(2), now=100.0, owner="ann")
    await run_all(store, 110.0)
    removed, _ = await sweep(store, 500.0, cutoff=400.0)
    assert removed == [plain.id]
    replay = await store.submit([command(1)], 500.0, [ids.new()], key, owner="ann")
    assert replay.value.replayed and replay.value.jobs[0].id == keyed.id
    removed, _ = await sweep(store, 1101.0, cutoff=1000.0)
    assert removed == [keyed.id]

    key2 = IdempotencyKey("k2", "digest")
    (deleted,) = await submit(store, command(3), now=2000.0, key=key2, owner="ann")
    await run_all(store, 2001.0)
    await store.remove(deleted.id, 2002.0, "ann")
    again = await store.submit([command(3)], 2003.0, [ids.new()], key2, owner="ann")
    assert not again.value.replayed and again.value.jobs[0].id != deleted.id


@pytest_twisted.ensureDeferred
async def test_an_array_goes_whole_and_its_failed_members_last(make_store):
    """An array is removed only once every member is finished and past the
    rule, over as many steps as its size takes, its failed members last:
    a job submitted between two steps that depends on the array still
    sees a failed member and is cancelled, not run."""
    store = await make_store()
    members = await submit(store, *[command(i, array_id="arr", array_index=i)
                                    for i in range(5)])
    leases = (await store.claim(Offer("h", 4), 4, 110.0, 60)).leases
    for lease in leases:
        outcome = FAILED if lease.job_id == members[0].id else SUCCEEDED
        await store.finish(lease, outcome, 110.0)
    # One member is still queued: nothing of the array goes.
    removed, _ = await sweep(store, 300.0, cutoff=200.0)
    assert removed == []
    await run_all(store, 120.0)
    step = (await store.remove_finished(
        300.0, 200.0, 0, RemovalCursor(), 2, 1000)).value
    assert len(step.job_ids) == 2 and not step.done
    assert members[0].id not in step.job_ids
    (late,) = await submit(store, command(9, depends_on=("arr",)), now=300.0)
    assert (await store.get(late.id)).state is JobState.CANCELLED
    cursor = step.cursor
    taken = list(step.job_ids)
    while True:
        step = (await store.remove_finished(300.0, 200.0, 0, cursor, 2, 1000)).value
        taken.extend(step.job_ids)
        cursor = step.cursor
        if step.done:
            break
    assert set(taken) == {m.id for m in members}
    assert taken[-1] == members[0].id
    with pytest.raises(UnknownDependency):
        await submit(store, command(10, depends_on=("arr",)), now=301.0)


@pytest_twisted.ensureDeferred
async def test_a_removed_jobs_number_is_never_given_again(make_store):
    """Once the newest job is removed, the next job still comes after it in
    submission order: a client's list cursor taken before sees the new job,
    after a restart too."""
    store = await make_store()
    jobs = await submit(store, command(1), command(2), command(3))
    await run_all(store, 101.0)
    page, cursor = await store.list_jobs(limit=2)
    assert [j.id for j in page] == [jobs[0].id, jobs[1].id]
    # The cursor's own job and every later one go.
    await store.remove(jobs[2].id, 102.0)
    await store.remove(jobs[1].id, 102.0)
    await store.close()
    store = await make_store()
    (new,) = await submit(store, command(4), now=103.0)
    page, _ = await store.list_jobs(cursor=cursor)
    assert [j.id for j in page] == [new.id]


@pytest_twisted.ensureDeferred
async def test_a_batchs_range_goes_with_its_last_member(make_store, tmp_path):
    """A batch's range of numbers (what finds its members) stays while a
    member is stored, whichever goes first, and goes with the last one,
    removed by a pass or by a DELETE; the batch is then unknown."""
    from dispatcher.model._groups import GroupKind, UnknownGroup

    store = await make_store()
    batch, other = ids.new(), ids.new()
    jobs = await submit(store, *(command(i, batch_id=batch) for i in range(3)))
    await submit(store, command(9, batch_id=other))
    await run_all(store, 101.0)

    def ranges():
        conn = sqlite3.connect(str(tmp_path / "db.sqlite3"))
        try:
            return dict(conn.execute("SELECT batch, last_seq - first_seq + 1 FROM batches"))
        finally:
            conn.close()

    assert ranges() == {batch: 3, other: 1}
    await store.remove(jobs[1].id, 102.0)
    await store.remove(jobs[0].id, 102.0)
    assert ranges() == {batch: 3, other: 1}
    assert (await store.group(GroupKind.BATCH, batch)).size == 1
    await store.remove(jobs[2].id, 102.0)
    assert ranges() == {other: 1}
    with pytest.raises(UnknownGroup):
        await store.group(GroupKind.BATCH, batch)
    removed, _ = await sweep(store, 200.0, cutoff=150.0)
    assert len(removed) == 1
    assert ranges() == {}


@pytest_twisted.ensureDeferred
async def test_remove_refuses_what_may_not_go(make_store):
    """Removing a job that has not finished says its state; another owner's
    job is unknown to an owner, as a missing one is; a dependent of another
    owner that needs the job is not named to it."""
    store = await make_store()
    (queued,) = await submit(store, command(1), owner="ann")
    with pytest.raises(NotFinished, match="is queued"):
        await store.remove(queued.id, 200.0)
    await run_all(store, 110.0)
    with pytest.raises(UnknownJob):
        await store.remove(queued.id, 200.0, owner="bob")
    (later,) = await submit(store, command(2, not_before=1e6), owner="bob")
    await submit(store, command(3, depends_on=(queued.id, later.id)), owner="bob")
    with pytest.raises(HasDependents) as refused:
        await store.remove(queued.id, 200.0, owner="ann")
    assert refused.value.dependent is None and "bob" not in str(refused.value)
    with pytest.raises(UnknownJob):
        await store.remove("no-such-job", 200.0)


@pytest_twisted.ensureDeferred
async def test_a_step_looks_at_no_more_than_its_scan(make_store):
    """A step looks at most at C{scan} jobs and removes at most C{limit}:
    a pass over many unfinished jobs is many short steps, not one long
    one, and still finds the finished job behind them."""
    store = await make_store()
    await submit(store, *[command(i) for i in range(50)], now=100.0)
    (last,) = await submit(store, command(99), now=100.0)
    leases = (await store.claim(Offer("h", 100), 100, 101.0, 60)).leases
    for lease in leases:
        if lease.job_id == last.id:
            await store.finish(lease, SUCCEEDED, 101.0)
    removed, steps = await sweep(store, 300.0, cutoff=200.0, scan=10)
    assert removed == [last.id]
    assert len(steps) >= 5


@pytest_twisted.ensureDeferred
async def test_a_pass_stops_at_the_first_job_submitted_after_the_cutoff(make_store):
    """No job submitted after the cutoff can have finished before it: a
    pass by age alone ends at the first such job rather than read every
    job after it."""
    store = await make_store()
    (old,) = await submit(store, command(0), now=100.0)
    await run_all(store, 110.0)
    await submit(store, *[command(i) for i in range(50)], now=250.0)
    await run_all(store, 260.0)
    removed, steps = await sweep(store, 400.0, cutoff=200.0, scan=10)
    assert removed == [old.id]
    assert len(steps) == 1 and steps[0].done


# Directories


def test_a_window_is_named_by_the_ids_time():
    """A window's directory is the leading levels of its jobs' directory,
    and it ends when ids of its time do: 65.5 s, 4.7 hours, 49.7 days."""
    now = [1_800_000_000.0]
    job_id = JobIds(lambda: now[0]).new()
    assert job_path(job_id).startswith(window_path(job_id[:8]) + "/")
    assert window_path(job_id[:6]) == f"{job_id[:4]}/{job_id[4:6]}"
    for digits, span in ((8, 65.536), (6, 16777.216), (4, 4294967.296)):
        end = window_end(job_id[:digits])
        assert now[0] < end <= now[0] + span + 0.001
        after = JobIds(lambda: end).new()
        assert after[:digits] != job_id[:digits]
        just_before = JobIds(lambda: end - 0.002).new()
        assert just_before[:digits] == job_id[:digits]


def test_ended_windows_are_listed_deepest_first(tmp_path):
    """The windows with a directory that ended before a time are listed,
    deepest first; windows still open are not, though their ended inner
    windows are."""
    jobs = tmp_path / "jobs"
    early = JobIds(lambda: 1_800_000_000.0).new()
    late = JobIds(lambda: 1_800_000_200.0).new()
    for job_id in (early, late):
        (jobs / job_path(job_id) / "work").mkdir(parents=True)
    directories = JobDirectories(str(jobs))
    ended = directories.ended_windows(1_800_000_150.0)
    assert ended == [early[:8]]
    everything = directories.ended_windows(1e12)
    assert set(everything[:2]) == {early[:8], late[:8]}
    assert [len(p) for p in everything] == sorted((len(p) for p in everything), reverse=True)
    assert directories.remove_windows([early[:8]]) == 1
    assert not (jobs / window_path(early[:8])).exists()
    assert (jobs / job_path(late)).exists()
    assert directories.remove_jobs([late, early]) == 1
    assert not (jobs / job_path(late)).exists()


# Passes on a fake clock


def make_retention(store, tmp_path, clock, **policy):
    pool = ThreadPool(1, 2, "retention-test")
    pool.start()
    retention = Retention(store, JobDirectories(str(tmp_path / "jobs")), reactor, pool,
                          clock, RetentionPolicy(**policy))
    return retention, pool


def make_dirs(tmp_path, *job_ids):
    for job_id in job_ids:
        attempt = tmp_path / "jobs" / job_path(job_id) / "attempt-1"
        attempt.mkdir(parents=True)
        (attempt / "stdout").write_text("output\n" * 100)
        (tmp_path / "jobs" / job_path(job_id) / "work").mkdir()


def test_the_interval_follows_the_age():
    """A pass runs every tenth of the age, no more often than once a second
    and no less often than once a minute; the count rule alone, once a
    minute."""
    assert RetentionPolicy(max_age=86400.0 * 7).interval == MAX_INTERVAL
    assert RetentionPolicy(max_age=60.48).interval == pytest.approx(6.048)
    assert RetentionPolicy(max_age=0.5).interval == MIN_INTERVAL
    assert RetentionPolicy(max_count=10).interval == MAX_INTERVAL
    assert not RetentionPolicy().active
    assert RetentionPolicy.from_days(0.5, None).max_age == 43200.0


async def advance(clock, seconds, retention):
    """Move the clock on by C{seconds}, and wait (in real time) for the pass
    it started, if any, to end: its steps are real commits and file
    removals."""
    clock.advance(seconds)
    await until(lambda: retention._pass is None)


@pytest_twisted.ensureDeferred
async def test_passes_run_on_the_clock_and_remove_dirs_and_windows(make_store, tmp_path):
    """On the injected clock, a pass comes every interval and removes the
    jobs past the age with their directories; a window's directory goes once
    it ended more than a window ago and holds no stored job, not before;
    a pass removes nothing of a running job."""
    store = await make_store()
    clock = Clock()
    clock.advance(1_800_000_000.0)
    start = clock.seconds()
    made = JobIds(clock.seconds)
    first = [made.new(), made.new()]
    await store.submit([command(1), command(2)], start, first)
    running_id = made.new()
    await store.submit([command(3)], start, [running_id])
    leases = (await store.claim(Offer("h", 3), 3, start, 60)).leases
    for lease in leases:
        if lease.job_id != running_id:
            await store.finish(lease, SUCCEEDED, start)
    make_dirs(tmp_path, *first, running_id)
    retention, pool = make_retention(store, tmp_path, clock, max_age=100.0)
    try:
        retention.start()
        assert [c.getTime() - start for c in clock.getDelayedCalls()] == [10.0]
        await advance(clock, 10, retention)  # a pass: nothing is old enough
        assert all((tmp_path / "jobs" / job_path(j)).exists() for j in first)
        assert [c.getTime() - start for c in clock.getDelayedCalls()] == [20.0]
        await advance(clock, 95, retention)  # the pass at 105 s: they go
        for job_id in first:
            assert not (tmp_path / "jobs" / job_path(job_id)).exists()
            assert await stored(store, job_id) is None
        assert (await store.get(running_id)).state is JobState.RUNNING
        assert (tmp_path / "jobs" / job_path(running_id)).exists()
        window = tmp_path / "jobs" / window_path(running_id[:8])
        assert window.exists()
        # Once it has finished and is past the age, it goes, and with it
        # its window, which has ended long enough and holds no job.
        await store.finish(next(l for l in leases if l.job_id == running_id), SUCCEEDED,
                           clock.seconds())
        await advance(clock, 110, retention)
        assert await stored(store, running_id) is None
        assert not window.exists()
    finally:
        await retention.stop()
        pool.stop()
    assert clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_a_pass_gives_the_stores_free_space_back(make_store, tmp_path):
    """A store made now can give space back: after many jobs are removed,
    the pass shrinks the file to what the next writes may use; a store
    made before (auto_vacuum off) reuses its free pages and says how to
    give them back."""
    store = await make_store()
    space = await store.space()
    assert space.can_shrink
    for _ in range(4):
        await submit(store, *[command(i, labels={"pad": "x" * 2000}) for i in range(1000)])
        await run_all(store, 101.0)
    before = await store.space()
    retention, pool = make_retention(store, tmp_path, Clock(), max_count=1)
    try:
        report = await retention.run_pass()
    finally:
        pool.stop()
    after = await store.space()
    assert report.removed == 3999 and report.steps >= 3999 // BATCH
    assert report.shrunk > 0
    assert after.size < before.size / 2

    # A store made before stores could give space back reuses its pages.
    conn = sqlite3.connect(str(tmp_path / "old.sqlite3"))
    conn.execute("PRAGMA auto_vacuum = NONE")
    conn.execute("CREATE TABLE made_before (x)")
    conn.close()
    old = await make_store("old")
    assert not (await old.space()).can_shrink


@pytest_twisted.ensureDeferred
async def test_a_steps_size_bounds_what_the_writer_holds(make_store, tmp_path):
    """A pass removes a batch a transaction, never more, each step a write of
    its own: other writes asked for meanwhile commit between its steps (a
    submission made as the pass begins lands long before its last step),
    and each step's operation takes milliseconds on the writer thread."""
    store = await make_store()
    for _ in range(3):
        await submit(store, *[command(i, labels={"team": "a", "n": str(i)})
                              for i in range(500)])
        await run_all(store, 101.0)
    # Every group of writes the writer commits, as the kinds it holds, and
    # how long each removal step's operation took on the writer thread.
    groups = []
    timings = []
    commit = store._writer._commit
    operation = store._operations[writes.RemoveFinished]

    def recording_commit(work, durable=True):
        groups.append([type(w).__name__ for w in work])
        return commit(work, durable)

    def timed(*args):
        started = time.perf_counter()
        try:
            return operation(*args)
        finally:
            timings.append(time.perf_counter() - started)

    store._writer._commit = recording_commit
    store._operations[writes.RemoveFinished] = timed
    clock = Clock()
    clock.advance(1000.0)
    retention, pool = make_retention(store, tmp_path, clock, max_age=10.0)
    retention.batch = 50
    try:
        passing = retention.run_pass()
        submitted = ensureDeferred(submit(store, command(7), now=1000.0))
        report = await passing
        await submitted
    finally:
        pool.stop()
    assert report.removed == 1500 and report.steps >= 30
    steps = [g for g in groups if "RemoveFinished" in g]
    assert all(g.count("RemoveFinished") == 1 for g in steps)
    first_submit = next(i for i, g in enumerate(groups) if "Submit" in g)
    last_step = max(i for i, g in enumerate(groups) if "RemoveFinished" in g)
    assert first_submit < last_step
    # Generous against a busy machine: a step of 50 took about 1 ms here.
    assert max(timings) < 0.25, timings


@pytest_twisted.ensureDeferred
async def test_a_stop_ends_a_pass_after_its_step(make_store, tmp_path):
    """A stop asked for during a pass lets its current step finish and takes
    no further one, and fires once it has; no pass is scheduled after."""
    store = await make_store()
    await submit(store, *[command(i) for i in range(100)])
    await run_all(store, 101.0)
    clock = Clock()
    clock.advance(1000.0)
    retention, pool = make_retention(store, tmp_path, clock, max_age=10.0)
    retention.batch = 10
    try:
        retention.start()
        passing = retention.run_pass()
        await retention.stop()
        report = await passing
    finally:
        pool.stop()
    assert report.removed == 10 and report.steps == 1
    assert (await store.count_by_state())[JobState.SUCCEEDED] == 90
    assert clock.getDelayedCalls() == []


# The daemon, on a fake clock


@pytest_twisted.ensureDeferred
async def test_a_daemon_removes_finished_jobs_on_its_clock(make_daemon):
    """A daemon with [retention] finished_days removes a finished job, its
    log and directory once the age has passed on its clock; a job still
    running and one still pending are never removed."""
    clock = Clock()
    clock.advance(1_800_000_000.0)
    daemon = await make_daemon("[retention]\nfinished_days = 0.001\n", clock=clock)
    done = await daemon.submit({"command": ["sh", "-c", "echo written"]})
    done = await daemon.wait(done["id"])
    assert (await daemon.request("GET", f"/v1/jobs/{done['id']}/log"))[1] == b"written\n"
    running = await daemon.submit({"command": ["sleep", "60"]})
    await daemon.wait(running["id"], states=("running",))
    pending = await daemon.submit({"command": ["true"], "delay": 100000})
    executor = daemon.service.dispatcher.executor
    retention = daemon.service.dispatcher.retention
    assert os.path.exists(executor.job_dir(done["id"]))
    for _ in range(100):
        await advance(clock, 1, retention)
    assert not os.path.exists(executor.job_dir(done["id"]))
    code, _ = await daemon.json("GET", f"/v1/jobs/{done['id']}")
    assert code == 404
    assert (await daemon.json("GET", f"/v1/jobs/{running['id']}"))[1]["state"] == "running"
    assert (await daemon.json("GET", f"/v1/jobs/{pending['id']}"))[1]["state"] == "pending"
    assert os.path.exists(executor.job_dir(running["id"]))
    await daemon.json("POST", f"/v1/jobs/{running['id']}/cancel")
    await daemon.wait(running["id"])


# DELETE /v1/jobs/{id}


@pytest.fixture
def people(make_daemon):
    """A daemon that runs jobs, with an admin, two submitters and a reader."""
    return pytest_twisted.blockon(Deferred.fromCoroutine(
        _with_people(make_daemon)))


async def _with_people(make_daemon):
    return await with_credentials(await make_daemon())


async def finished(daemon, who, body=None):
    code, job = await call(daemon, who, "POST", "/v1/jobs",
                           body or {"command": ["sh", "-c", "echo out; echo err >&2"]})
    assert code == 201, job
    return await daemon.wait(job["id"])


@pytest_twisted.ensureDeferred
async def test_delete_removes_a_finished_job_now(people):
    """An admin's DELETE of a finished job is a 204: from then on its id is
    a 404 for the job and its log, and its directory is gone; deleting it
    again is a 404."""
    job = await finished(people, "ann")
    job_dir = people.service.dispatcher.executor.job_dir(job["id"])
    assert os.path.exists(job_dir)
    response, body = await people.request("DELETE", f"/v1/jobs/{job['id']}")
    assert response.code == 204 and body == b""
    assert not os.path.exists(job_dir)
    for path in (f"/v1/jobs/{job['id']}", f"/v1/jobs/{job['id']}/log"):
        code, error = await people.json("GET", path)
        assert code == 404 and error["error"]["code"] == "not_found"
    code, error = await people.json("DELETE", f"/v1/jobs/{job['id']}")
    assert code == 404 and error["error"]["field"] == "id"


@pytest_twisted.ensureDeferred
async def test_delete_of_a_job_not_finished_says_its_state(people):
    """DELETE of a queued or running job is a 409 naming its state, and
    changes nothing."""
    code, job = await call(people, "ann", "POST", "/v1/jobs", {"command": ["sleep", "30"]})
    await people.wait(job["id"], states=("running",))
    code, error = await call(people, "ann", "DELETE", f"/v1/jobs/{job['id']}")
    assert code == 409
    assert error["error"]["code"] == "conflict" and error["error"]["field"] == "id"
    assert "is running" in error["error"]["message"]
    assert "cancel it first" in error["error"]["message"]
    assert (await people.json("GET", f"/v1/jobs/{job['id']}"))[1]["state"] == "running"
    await people.json("POST", f"/v1/jobs/{job['id']}/cancel")
    await people.wait(job["id"])
    code, _ = await call(people, "ann", "DELETE", f"/v1/jobs/{job['id']}")
    assert code == 204


@pytest_twisted.ensureDeferred
async def test_delete_is_an_owners_or_an_admins(people):
    """A submitter deletes its own finished job; another submitter's DELETE
    of it is a 404, as its GET is; a reader's is a 403; and none of the
    refused ones changed anything."""
    job = await finished(people, "ann")
    code, error = await call(people, "bob", "DELETE", f"/v1/jobs/{job['id']}")
    assert code == 404 and error["error"]["message"] == f"no job has the id {job['id']!r}"
    code, error = await call(people, "rita", "DELETE", f"/v1/jobs/{job['id']}")
    assert code == 403 and error["error"]["code"] == "forbidden"
    assert (await call(people, "ann", "GET", f"/v1/jobs/{job['id']}"))[0] == 200
    code, _ = await call(people, "ann", "DELETE", f"/v1/jobs/{job['id']}")
    assert code == 204
    assert (await call(people, "ann", "GET", f"/v1/jobs/{job['id']}"))[0] == 404


@pytest_twisted.ensureDeferred
async def test_delete_of_a_job_a_waiting_job_needs_is_refused(people):
    """DELETE of a finished job that a pending job depends on is a 409
    naming that job; once the dependent is gone, the delete works."""
    first = await finished(people, "ann")
    code, dependent = await call(people, "ann", "POST", "/v1/jobs", {
        "command": ["true"], "depends_on": [first["id"]], "delay": 100000})
    assert code == 201 and dependent["state"] == "pending"
    code, error = await call(people, "ann", "DELETE", f"/v1/jobs/{first['id']}")
    assert code == 409 and dependent["id"] in error["error"]["message"]
    await call(people, "ann", "POST", f"/v1/jobs/{dependent['id']}/cancel")
    assert (await call(people, "ann", "DELETE", f"/v1/jobs/{dependent['id']}"))[0] == 204
    assert (await call(people, "ann", "DELETE", f"/v1/jobs/{first['id']}"))[0] == 204


def test_the_document_says_who_may_delete_and_what_it_answers():
    """The OpenAPI document has DELETE /v1/jobs/{id} for admins and
    submitters, answering 204, 404 and 409."""
    from dispatcher.api._openapi import openapi_document

    operation = openapi_document()["paths"]["/v1/jobs/{id}"]["delete"]
    assert operation["x-roles"] == ["admin", "submitter"]
    assert {"204", "404", "409", "507"} <= set(operation["responses"])
    assert "content" not in operation["responses"]["204"]


# Configuration


@pytest.mark.parametrize("text, days, count", [
    ("", 7.0, None),
    ("[retention]\nfinished_days = 0.0007\n", 0.0007, None),
    ("[retention]\nfinished_days = none\nfinished_count = 1000\n", None, 1000),
])
def test_retention_is_read_from_the_ini(text, days, count):
    """[retention] takes a number of days (fractions allowed) or none, and
    a count of at least 1 or none; by default finished jobs are kept a
    week and their number is not bounded."""
    config = parse_config(text)
    assert config.retention == RetentionConfig(days, count)


@pytest.mark.parametrize("line, allowed", [
    ("finished_days = 0", "expected a number of days above 0"),
    ("finished_days = -1", "expected a number of days above 0"),
    ("finished_days = week", "expected a number of days above 0"),
    ("finished_days = inf", "expected a number of days above 0"),
    ("finished_count = 0", "expected an integer of at least 1, or none"),
    ("finished_count = 2.5", "expected an integer of at least 1, or none"),
])
def test_a_wrong_retention_value_is_refused(line, allowed):
    """A wrong [retention] value stops the start with a line naming the
    file, the section, the key, the value and what is allowed."""
    with pytest.raises(ConfigError) as refused:
        parse_config(f"[retention]\n{line}\n", "r.ini")
    key, _, value = line.partition(" = ")
    assert str(refused.value).startswith(f"r.ini: [retention] {key} = {value!r}: {allowed}")


# A real twistd


def test_a_real_daemon_keeps_its_disk_flat(tmp_path):
    """A real twistd with a short finished_days removes the jobs that wrote
    output, their logs and their directories, soon after they finish;
    a job still running stays."""
    daemon = Twistd(str(tmp_path), "[retention]\nfinished_days = 0.00005\n")
    daemon.start()
    try:
        code, running = daemon.request("POST", "/v1/jobs", {"command": ["sleep", "60"]})
        assert code == 201
        made = []
        for i in range(5):
            code, job = daemon.request("POST", "/v1/jobs", {
                "command": ["sh", "-c", f"head -c 100000 /dev/zero; echo {i}"]})
            assert code == 201
            made.append(job["id"])
        for job_id in made:
            daemon.wait(job_id, ("succeeded",))
        jobs_dir = tmp_path / "data" / "jobs"
        assert all((jobs_dir / job_path(j)).exists() for j in made)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if not any((jobs_dir / job_path(j)).exists() for j in made):
                break
            time.sleep(0.2)
        for job_id in made:
            assert not (jobs_dir / job_path(job_id)).exists()
            assert daemon.request("GET", f"/v1/jobs/{job_id}")[0] == 404
        code, job = daemon.request("GET", f"/v1/jobs/{running['id']}")
        assert code == 200 and job["state"] == "running"
        assert (jobs_dir / job_path(running["id"])).exists()
        log = (tmp_path / "out.log").read_text()
        assert "retention removed" in log
    finally:
        daemon.stop()
