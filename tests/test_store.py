"""
The SQLite job store: durability, group commit, claims, fencing, cancel,
listing, recovery and migrations.
"""

import sqlite3

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.internet.task import Clock, deferLater
from zope.interface.verify import verifyObject

from dispatcher.store import _sqlite as _sqlite
from dispatcher.store._interface import IJobStore
from dispatcher.model._jobs import (
    InputSpec,
    InvalidTransition,
    JobIds,
    JobSpec,
    JobState,
    Offer,
    Outcome,
    PlainJobs,
    StaleLease,
    UnknownJob,
)
from dispatcher.store._sqlite import (
    MIGRATIONS,
    DependencyNotRetried,
    IdempotencyConflict,
    IdempotencyKey,
    SQLiteJobStore,
    StoreVersionError,
    SubmittedIds,
    UnknownDependency,
    WriteRefused,
    Written,
)

ids = JobIds()


def spec(i=0, **kw):
    return JobSpec(command=("echo", str(i)), **kw)


def no_jitter(delay, spent):
    return delay * 2 ** (spent - 1)


@pytest.fixture
def make_store(tmp_path):
    made = []

    async def make(name="db.sqlite3", **kw):
        kw.setdefault("backoff", no_jitter)
        s = SQLiteJobStore(str(tmp_path / name), reactor, **kw)
        made.append(s)
        await s.open()
        return s

    yield make
    for s in made:
        pytest_twisted.blockon(s.close())


@pytest.fixture
def store(make_store):
    return pytest_twisted.blockon(ensureDeferred(make_store()))


async def submit(store, *specs, now=100.0):
    written = await store.submit(list(specs), now, [ids.new() for _ in specs])
    return written.value.jobs


async def claim(store, holder, capacity, now, seconds=60):
    return (await store.claim(Offer(holder, capacity), capacity, now, seconds)).leases


async def finish(store, lease, outcome, now):
    await store.finish(lease, outcome, now)
    return await store.get(lease.job_id)


def test_interface(store):
    """The SQLite store provides the whole store interface."""
    assert verifyObject(IJobStore, store)


@pytest_twisted.ensureDeferred
async def test_submit_then_get(store):
    """A submitted job is stored queued and read back with its spec and labels."""
    (job,) = await submit(store, spec(labels={"team": "ice"}, name="n"))
    got = await store.get(job.id)
    assert got.state is JobState.QUEUED
    assert got.spec.command == ("echo", "0")
    assert got.spec.labels == {"team": "ice"}
    assert got.spec.name == "n"
    assert got.wait_reason == "waiting for a free slot"
    assert got.created_at == 100.0


@pytest_twisted.ensureDeferred
async def test_unknown_job(store):
    """Reading a job that does not exist fails with UnknownJob."""
    with pytest.raises(UnknownJob):
        await store.get("nope")


@pytest_twisted.ensureDeferred
async def test_group_commit(store):
    """Writes asked for while a commit runs share the next transaction, and each
    fires only after it."""
    before = store.batches
    jobs = await gatherResults(
        [ensureDeferred(submit(store, spec(i))) for i in range(200)]
    )
    assert len({j[0].id for j in jobs}) == 200
    # All 200 were asked for in one reactor iteration: one transaction.
    assert store.batches - before == 1


@pytest_twisted.ensureDeferred
async def test_group_waits_for_the_iteration(store):
    """A write asked for in the same reactor iteration as an idle store's
    first one joins its transaction rather than waiting for the next."""
    before = store.batches
    first = store.submit([spec(1)], 1.0, [ids.new()])
    second = store.submit([spec(2)], 1.0, [ids.new()])
    await first
    await second
    assert store.batches - before == 1
    # A write asked for while a commit runs takes the next one.
    third = store.submit([spec(3)], 1.0, [ids.new()])
    await deferLater(reactor, 0)
    fourth = store.submit([spec(4)], 1.0, [ids.new()])
    await third
    await fourth
    assert store.batches - before == 3


@pytest_twisted.ensureDeferred
async def test_plain_submissions_of_a_group_are_stored_together(store):
    """Submissions with no idempotency key and no dependency are inserted
    together; the others of the group keep their own savepoint, and each
    answer holds its own jobs in the order they were asked for."""
    first_id, later_id, array_ids = ids.new(), ids.new(), [ids.new(), ids.new()]
    asked = [
        store.submit([spec(1, labels={"a": "1"})], 1.0, [first_id]),
        store.submit([spec(2), spec(3)], 1.0, array_ids),
        store.submit([spec(4)], 1.0, [ids.new()], IdempotencyKey("k", "d")),
        store.submit([spec(5, depends_on=(first_id,))], 1.0, [ids.new()]),
        store.submit([spec(6, not_before=50.0)], 1.0, [later_id]),
    ]
    before = store.batches
    written = [await d for d in asked]
    assert store.batches - before == 1
    assert [[job.id for job in w.value.jobs] for w in written][:2] == [[first_id], array_ids]
    assert written[0].value.jobs[0].spec.labels == {"a": "1"}
    assert written[3].value.jobs[0].state is JobState.PENDING
    assert written[4].value.jobs[0].state is JobState.PENDING
    assert written[4].wake_at == 50.0
    stored = [(await store.get(w.value.jobs[0].id)).spec.command[1] for w in written]
    assert stored == ["1", "2", "4", "5", "6"]
    page, _ = await store.list_jobs(labels=[("a", "1")])
    assert [job.id for job in page] == [first_id]


@pytest.mark.parametrize("json_rows", [True, False])
@pytest_twisted.ensureDeferred
async def test_plain_jobs_join_the_submissions_stored_together(store, monkeypatch, json_rows):
    """PlainJobs are stored with the plain submissions next to them, in one
    insert, numbered in the order asked; their answer is their ids; a
    refused insert fails only its own; with an idempotency key they are
    stored alone, and a replay answers the jobs first made.  The same with
    rows read from JSON by SQLite and with rows bound from Python (for an
    SQLite without JSON functions)."""
    if json_rows and not _sqlite.JSON_ROWS:
        pytest.skip(f"SQLite {sqlite3.sqlite_version} has no JSON functions built in")
    monkeypatch.setattr(_sqlite, "JSON_ROWS", json_rows)
    first, plain_ids, last = ids.new(), [ids.new(), ids.new()], ids.new()
    plain = PlainJobs(['{"command":["true","p0"]}', '{"command":["true","p1"]}'],
                      priority=2, timeout=9.0)
    # A group that fails nowhere is stored in one insert, never replayed.
    replayed = []
    apply_one = store._apply_one
    monkeypatch.setattr(store, "_apply_one", lambda *a: replayed.append(a) or apply_one(*a))
    together = [ids.new(), [ids.new(), ids.new()], ids.new(), [ids.new()]]
    one_by_one = PlainJobs(['{"command":["true","q"]}'])
    asked = [
        store.submit([spec(10)], 1.0, [together[0]]),
        store.submit_plain(plain, 1.0, together[1]),
        store.submit([spec(11)], 1.0, [together[2]]),
        store.submit_plain(one_by_one, 1.0, together[3]),
    ]
    before = store.batches
    for d in asked:
        await d
    assert store.batches - before == 1 and replayed == []
    page, _ = await store.list_jobs()
    assert [job.id for job in page] == [together[0], *together[1], together[2], *together[3]]
    assert [job.spec.command[1] for job in page] == ["10", "p0", "p1", "11", "q"]
    seqs = store._writer.execute(
        "SELECT seq FROM jobs ORDER BY seq").fetchall()
    assert [seq for (seq,) in seqs] == [1, 2, 3, 4, 5]
    asked = [
        store.submit([spec(1)], 1.0, [first]),
        store.submit_plain(plain, 1.0, plain_ids),
        store.submit([spec(3)], 1.0, [last]),
        store.submit_plain(plain, 1.0, [first, ids.new()]),
    ]
    before = store.batches
    results = [await d.addErrback(lambda f: [f]) for d in asked]
    assert store.batches - before == 1 and len(replayed) == 4
    assert results[1].value == SubmittedIds(plain_ids)
    assert results[1].changed == tuple((i, JobState.QUEUED) for i in plain_ids)
    assert results[3][0].check(WriteRefused)
    page, _ = await store.list_jobs()
    page = page[5:]
    assert [job.id for job in page] == [first, *plain_ids, last]
    assert [job.spec.command[1] for job in page] == ["1", "p0", "p1", "3"]
    made = page[1]
    assert (made.state, made.spec.priority, made.spec.timeout, made.spec.queue) == (
        JobState.QUEUED, 2, 9.0, "default")
    assert made.wait_reason == "waiting for a free slot"
    odd = PlainJobs(['{"args":["\\u0000 \u00e9 \\"q\\"",1.5e300],"kwargs":{},"task":"t"}'])
    (odd_id,) = (await store.submit_plain(odd, 1.5, [ids.new()])).value.ids
    stored = await store.get(odd_id)
    assert stored.spec.args == ("\u0000 \u00e9 \"q\"", 1.5e300)
    assert (stored.spec.timeout, stored.spec.priority, stored.created_at) == (None, 0, 1.5)
    key = IdempotencyKey("plain", "digest")
    again = [ids.new(), ids.new()]
    once = await store.submit_plain(plain, 2.0, again, key)
    assert once.value == SubmittedIds(again)
    replay = await store.submit_plain(plain, 3.0, [ids.new(), ids.new()], key)
    assert replay.value.replayed and [job.id for job in replay.value.jobs] == again


@pytest_twisted.ensureDeferred
async def test_a_refused_insert_fails_only_its_own_submission(store):
    """When SQLite refuses one of the submissions stored together (here an
    id already taken), the others are stored all the same."""
    taken = ids.new()
    await store.submit([spec(1)], 1.0, [taken])
    fresh = ids.new(), ids.new()
    asked = [
        store.submit([spec(2)], 1.0, [fresh[0]]),
        store.submit([spec(3)], 1.0, [taken]),
        store.submit([spec(4)], 1.0, [fresh[1]]),
    ]
    results = [await d.addErrback(lambda f: [f]) for d in asked]
    assert isinstance(results[0], Written) and isinstance(results[2], Written)
    assert results[1][0].check(WriteRefused)
    assert [(await store.get(i)).spec.command[1] for i in fresh] == ["2", "4"]
    assert (await store.get(taken)).spec.command[1] == "1"


@pytest_twisted.ensureDeferred
async def test_a_failed_write_leaves_the_rest_of_its_group(store):
    """A group's writes share one savepoint; when one fails (a finish on a
    stale lease) what it did is undone and the others of the group are
    committed as if each had been alone."""
    await submit(store, spec(1), spec(2))
    claimed = await store.claim(Offer("h", 2), 2, 200.0, 60)
    good, other = claimed.leases
    stale = attrs.evolve(other, token=other.token + 1000)
    before = store.batches
    asked = [
        store.finish(good, Outcome(JobState.SUCCEEDED, exit_code=0), 201.0),
        store.finish(stale, Outcome(JobState.SUCCEEDED, exit_code=0), 201.0),
        store.submit([spec(3)], 201.0, [ids.new()]),
    ]
    results = [await d.addErrback(lambda f: [f]) for d in asked]
    assert store.batches - before == 1
    assert results[1][0].check(StaleLease)
    assert (await store.get(good.job_id)).state is JobState.SUCCEEDED
    assert (await store.get(other.job_id)).state is JobState.RUNNING
    assert (await store.get(results[2].value.jobs[0].id)).state is JobState.QUEUED


@pytest_twisted.ensureDeferred
async def test_dependents_are_freed_after_a_restart(make_store):
    """A finish looks for dependents only once some job has depended on
    another; a store reopened over jobs with dependencies still frees
    them."""
    first = await make_store()
    (a,) = await submit(first, spec(1))
    (b,) = await submit(first, spec(2, depends_on=(a.id,)))
    await first.close()
    again = await make_store()
    claimed = await again.claim(Offer("h", 1), 1, 200.0, 60)
    assert [lease.job_id for lease in claimed.leases] == [a.id]
    written = await again.finish(claimed.leases[0], Outcome(JobState.SUCCEEDED), 201.0)
    assert (b.id, JobState.QUEUED) in written.changed
    assert (await again.get(b.id)).state is JobState.QUEUED


@pytest_twisted.ensureDeferred
async def test_successes_of_a_group_are_recorded_together(store):
    """Successes next to each other in a group share one read and two
    updates, with the same outcome as one by one: attempts closed, results
    and attempt counts kept; one whose cancel was asked meanwhile sends the
    group down the one-by-one path, and still succeeds."""
    await submit(store, spec(1), spec(2), spec(3))
    claimed = await store.claim(Offer("h", 3), 3, 200.0, 60)
    a, b, c = claimed.leases
    together = []
    real = store._finish_together
    store._finish_together = lambda conn, work: (together.append(len(work)), real(conn, work))[1]
    before = store.batches
    done = [
        store.finish(a, Outcome(JobState.SUCCEEDED, exit_code=0, result={"n": 1}), 201.0),
        store.finish(b, Outcome(JobState.SUCCEEDED, exit_code=0), 202.0),
    ]
    written = [await d for d in done]
    assert store.batches - before == 1 and together == [2]
    assert [w.changed for w in written] == [((a.job_id, JobState.SUCCEEDED),),
                                            ((b.job_id, JobState.SUCCEEDED),)]
    job = await store.get(a.job_id)
    assert job.state is JobState.SUCCEEDED and job.result == {"n": 1}
    assert job.finished_at == 201.0 and job.attempts[-1].finished_at == 201.0
    assert (await store.get(b.job_id)).attempts[-1].exit_code == 0

    # A cancel asked for while c ran, then c and a stale end in one group.
    await store.cancel(c.job_id, 203.0)
    stale = attrs.evolve(a, token=a.token + 1000)
    done = [
        store.finish(c, Outcome(JobState.SUCCEEDED, exit_code=0), 204.0),
        store.finish(stale, Outcome(JobState.SUCCEEDED, exit_code=0), 204.0),
    ]
    results = [await d.addErrback(lambda f: [f]) for d in done]
    assert results[0].changed == ((c.job_id, JobState.SUCCEEDED),)
    assert results[1][0].check(StaleLease)
    assert (await store.get(c.job_id)).state is JobState.SUCCEEDED


@pytest_twisted.ensureDeferred
async def test_a_submission_then_successes_share_without_a_replay(store):
    """A submission followed by successes: the successes are recorded
    together, and nothing of the group is replayed."""
    await submit(store, spec(1), spec(2))
    a, b = (await store.claim(Offer("h", 2), 2, 200.0, 60)).leases
    replayed = []
    real = store._apply_one
    store._apply_one = lambda conn, write: (replayed.append(write), real(conn, write))[1]
    asked = [
        store.submit([spec(3)], 201.0, [ids.new()]),
        store.finish(a, Outcome(JobState.SUCCEEDED), 201.0),
        store.finish(b, Outcome(JobState.SUCCEEDED), 201.0),
    ]
    for d in asked:
        await d
    assert replayed == []
    assert (await store.get(b.job_id)).state is JobState.SUCCEEDED


@pytest_twisted.ensureDeferred
async def test_claim_says_when_it_drained_the_queue(store):
    """A claim that took the last queued jobs says it drained the queue; one
    that left a job, or passed over one that did not fit, does not."""
    await submit(store, spec(1), spec(2), spec(3))
    first = await store.claim(Offer("h", 2), 2, 200.0, 60)
    assert len(first.leases) == 2 and not first.drained
    last = await store.claim(Offer("h", 2), 1, 200.0, 60)
    assert len(last.leases) == 1 and last.drained
    await submit(store, spec(4, requirements={"site": "x"}))
    unfit = await store.claim(Offer("h", 2), 1, 200.0, 60)
    assert unfit.leases == [] and unfit.skipped == 1 and not unfit.drained


def synchronous(store):
    """The writer connection's synchronous setting: 2 is FULL, 1 NORMAL."""
    return store._writer.execute("PRAGMA synchronous").fetchone()[0]


@pytest_twisted.ensureDeferred
async def test_only_run_state_commits_wait_for_their_sync(make_store):
    """A commit that holds a submission syncs before it is answered; one of
    run-state changes alone (a claim, an end) does not, and sync() makes
    it durable.  With sync_interval = 0 every commit syncs."""
    store = await make_store("deferred.sqlite3", sync_interval=3600)
    (job,) = await submit(store, spec(1))
    assert synchronous(store) == 2 and not store.unsynced
    (lease,) = await claim(store, "h", 1, 200.0)
    assert synchronous(store) == 1 and store.unsynced
    await store.finish(lease, Outcome(JobState.SUCCEEDED, exit_code=0), 201.0)
    assert store.unsynced
    await store.sync()
    assert not store.unsynced and store.syncs == 1
    # A submission's commit syncs what came before it too.
    await submit(store, spec(2))
    (lease,) = await claim(store, "h", 1, 300.0)
    assert store.unsynced
    await submit(store, spec(3))
    assert not store.unsynced and synchronous(store) == 2
    await store.sync()
    assert store.syncs == 1  # nothing was left to sync

    always = await make_store("always.sqlite3", sync_interval=0)
    await submit(always, spec(1))
    await claim(always, "h", 1, 200.0)
    assert synchronous(always) == 2 and not always.unsynced


@pytest_twisted.ensureDeferred
async def test_run_state_is_synced_within_the_interval(make_store):
    """A run-state commit left unsynced is synced by the store's own timer,
    once its interval has passed."""
    clock = Clock()
    store = await make_store("timer.sqlite3", sync_interval=2.0, clock=clock)
    await submit(store, spec(1))
    await claim(store, "h", 1, 200.0)
    clock.advance(1.9)
    assert store.unsynced and store.syncs == 0
    clock.advance(0.1)
    # The sync runs on the writer thread, in real time.
    for _ in range(500):
        if not store.unsynced:
            break
        await deferLater(reactor, 0.01)
    assert not store.unsynced and store.syncs == 1


@pytest_twisted.ensureDeferred
async def test_failed_write_changes_nothing_beside_others(store):
    """A write that fails inside a group rolls back alone; its neighbours commit."""
    job_id = ids.new()
    first = store.submit([spec(1)], 1.0, [job_id])
    duplicate = store.submit([spec(2), spec(3)], 1.0, [ids.new(), job_id])
    third = store.submit([spec(4)], 1.0, [ids.new()])
    await first
    with pytest.raises(WriteRefused):
        await duplicate
    await third
    jobs, _ = await store.list_jobs(limit=100)
    assert [j.spec.command[1] for j in jobs] == ["1", "4"]


@pytest_twisted.ensureDeferred
async def test_durable_after_reopen(tmp_path):
    """A job acknowledged by submit is there when the file is opened again."""
    path = str(tmp_path / "db.sqlite3")
    s = SQLiteJobStore(path, reactor)
    await s.open()
    (job,) = await submit(s, spec())
    await s.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    s2 = SQLiteJobStore(path, reactor)
    await s2.open()
    assert (await s2.get(job.id)).id == job.id
    await s2.close()


@pytest_twisted.ensureDeferred
async def test_claim_oldest_first_and_fencing(store):
    """A claim leases the oldest queued jobs with growing tokens; a write with a
    stale token changes nothing."""
    jobs = await submit(store, spec(0), spec(1), spec(2))
    leases = await claim(store, "h", 2, 200.0)
    assert [l.job_id for l in leases] == [jobs[0].id, jobs[1].id]
    assert leases[0].token < leases[1].token
    assert leases[0].attempt == 1
    assert leases[0].expires_at == 260.0
    running = await store.get(jobs[0].id)
    assert running.state is JobState.RUNNING
    assert running.started_at == 200.0
    assert running.attempts[0].holder == "h"
    stale = attrs.evolve(leases[0], token=999)
    with pytest.raises(StaleLease):
        await finish(store, stale, Outcome(JobState.SUCCEEDED, exit_code=0), 300.0)
    assert (await store.get(jobs[0].id)).state is JobState.RUNNING
    done = await finish(store, leases[0], Outcome.from_exit_code(3), 300.0)
    assert done.state is JobState.FAILED
    assert done.exit_code == 3
    assert done.error == "exited with code 3"
    assert done.attempts[0].finished_at == 300.0
    with pytest.raises(StaleLease):
        await finish(store, leases[0], Outcome.from_exit_code(0), 301.0)
    assert (await claim(store, "h", 5, 400.0))[0].job_id == jobs[2].id
    assert await claim(store, "h", 5, 400.0) == []


@pytest_twisted.ensureDeferred
async def test_inputs_stage_first(store):
    """A job with inputs is claimed into staging, then marked running."""
    (job,) = await submit(store, spec(inputs=(InputSpec("http://x/y", "y"),)))
    (lease,) = await claim(store, "h", 1, 1.0)
    assert (await store.get(job.id)).state is JobState.STAGING
    await store.mark_running(lease, 2.0)
    got = await store.get(job.id)
    assert got.state is JobState.RUNNING
    assert got.started_at == 2.0
    assert got.spec.inputs == (InputSpec("http://x/y", "y"),)


@pytest_twisted.ensureDeferred
async def test_cancel(store):
    """Cancel is immediate for a queued job, two-step for a running one, and
    refused for a finished one."""
    queued, running = await submit(store, spec(0), spec(1))
    (lease,) = await claim(store, "h", 1, 1.0)
    assert lease.job_id == queued.id
    job, none = (await store.cancel(running.id, 2.0)).value
    assert none is None and job.state is JobState.CANCELLED
    job, held = (await store.cancel(queued.id, 2.0)).value
    assert job.state is JobState.RUNNING and held.token == lease.token
    ended = await finish(store, lease, Outcome.from_exit_code(-15), 3.0)
    assert ended.state is JobState.CANCELLED
    assert ended.exit_code == -15
    with pytest.raises(InvalidTransition):
        await store.cancel(queued.id, 4.0)
    with pytest.raises(UnknownJob):
        await store.cancel("nope", 4.0)


@pytest_twisted.ensureDeferred
async def test_release_requeues(store):
    """A released attempt stays in the history and the job is queued again."""
    (job,) = await submit(store, spec())
    (lease,) = await claim(store, "h", 1, 1.0)
    await store.release(lease, 2.0, "stopped")
    back = await store.get(job.id)
    assert back.state is JobState.QUEUED
    assert back.attempts[0].error == "stopped"
    (again,) = await claim(store, "h", 1, 3.0)
    assert again.attempt == 2 and again.token > lease.token


@pytest_twisted.ensureDeferred
async def test_list_pagination_and_filters(store):
    """Listing pages in submission order with a cursor that holds under new
    inserts, and filters by state and label."""
    first = await submit(store, *[spec(i, labels={"k": str(i % 2)}) for i in range(5)])
    page, cursor = await store.list_jobs(limit=2)
    assert [j.id for j in page] == [j.id for j in first[:2]]
    await submit(store, spec(9))
    page2, cursor2 = await store.list_jobs(limit=2, cursor=cursor)
    assert [j.id for j in page2] == [j.id for j in first[2:4]]
    page3, cursor3 = await store.list_jobs(limit=2, cursor=cursor2)
    assert len(page3) == 2 and cursor3 is None
    odd, _ = await store.list_jobs(labels=[("k", "1")])
    assert [j.id for j in odd] == [first[1].id, first[3].id]
    has, _ = await store.list_jobs(labels=[("k", None)])
    assert len(has) == 5
    await claim(store, "h", 1, 1.0)
    running, _ = await store.list_jobs(state=JobState.RUNNING)
    assert [j.id for j in running] == [first[0].id]
    counts = await store.count_by_state()
    assert counts[JobState.RUNNING] == 1 and counts[JobState.QUEUED] == 5


@pytest_twisted.ensureDeferred
async def test_recover(store):
    """At start-up, attempts this holder left running are recorded as lost with
    their process identity, and other holders' are left alone."""
    await submit(store, spec(0), spec(1))
    (mine,) = await claim(store, "me", 1, 1.0)
    (theirs,) = await claim(store, "other", 1, 1.0)
    await store.record_process(mine, 1234, 5678, "boot")
    lost = (await store.recover("me", 9.0)).value
    assert [(l.job_id, l.pid, l.start_ticks, l.boot_id) for l in lost] == [
        (mine.job_id, 1234, 5678, "boot")
    ]
    job = await store.get(mine.job_id)
    assert job.state is JobState.FAILED
    assert "lost" in job.attempts[0].error
    assert (await store.get(theirs.job_id)).state is JobState.RUNNING


@pytest_twisted.ensureDeferred
async def test_newer_schema_refused(tmp_path):
    """A database from a newer dispatcher is refused with words saying so."""
    path = str(tmp_path / "db.sqlite3")
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    conn.close()
    s = SQLiteJobStore(path, reactor)
    with pytest.raises(StoreVersionError, match="newer"):
        await s.open()
    s._writer_pool.stop()
    s._reader_pool.stop()


# Scheduling rules


@pytest_twisted.ensureDeferred
async def test_priority_then_fifo(store):
    """Higher priority is claimed first; within a priority, first in first out."""
    jobs = await submit(store, spec(0), spec(1, priority=5), spec(2), spec(3, priority=5))
    leases = await claim(store, "h", 4, 1.0)
    assert [l.job_id for l in leases] == [jobs[1].id, jobs[3].id, jobs[0].id, jobs[2].id]


@pytest_twisted.ensureDeferred
async def test_queue_limit_blocks_only_its_queue(make_store):
    """A queue at its limit never holds other queues up, and says so in the
    wait reason of its queued jobs."""
    store = await make_store(queues={"default": 0, "gpu": 1})
    gpu = await submit(store, spec(0, queue="gpu"), spec(1, queue="gpu"))
    other = await submit(store, spec(2))
    first = await store.claim(Offer("h", 3), 3, 1.0, 60)
    assert sorted(l.job_id for l in first.leases) == sorted([gpu[0].id, other[0].id])
    assert first.blocked
    waiting = await store.get(gpu[1].id)
    assert waiting.wait_reason == "queue gpu is at its limit of 1 running jobs"
    again = await store.claim(Offer("h", 3), 3, 2.0, 60)
    assert again.leases == [] and again.blocked
    gpu_lease = next(l for l in first.leases if l.job_id == gpu[0].id)
    await finish(store, gpu_lease, Outcome.from_exit_code(0), 3.0)
    (next_gpu,) = await claim(store, "h", 3, 4.0)
    assert next_gpu.job_id == gpu[1].id


@pytest_twisted.ensureDeferred
async def test_queues_take_turns(make_store):
    """Among jobs of equal priority the queues take turns, so a busy queue
    cannot starve another."""
    store = await make_store(queues={"default": 0, "a": 0, "b": 0})
    busy = await submit(store, *[spec(i, queue="a") for i in range(10)])
    quiet = await submit(store, spec(99, queue="b"))
    leases = await claim(store, "h", 2, 1.0)
    assert {l.job_id for l in leases} == {busy[0].id, quiet[0].id}


@pytest_twisted.ensureDeferred
async def test_retry_with_backoff(store):
    """A failed attempt with attempts left waits in pending for its back-off,
    saying so, then is queued again; the last failure is final."""
    (job,) = await submit(store, spec(max_attempts=3, retry_delay=10.0))
    (lease,) = await claim(store, "h", 1, 100.0)
    written = await store.finish(lease, Outcome.from_exit_code(1), 101.0)
    waiting = await store.get(job.id)
    assert waiting.state is JobState.PENDING
    assert written.wake_at == 111.0
    assert "attempt 1 failed; retrying at" in waiting.wait_reason
    assert (await store.promote_due(110.9)).changed == ()
    promoted = await store.promote_due(111.0)
    assert promoted.changed == ((job.id, JobState.QUEUED),)
    (lease2,) = await claim(store, "h", 1, 112.0)
    assert lease2.attempt == 2
    written = await store.finish(lease2, Outcome.from_exit_code(1), 113.0)
    assert written.wake_at == 133.0  # doubled
    await store.promote_due(133.0)
    (lease3,) = await claim(store, "h", 1, 134.0)
    final = await finish(store, lease3, Outcome.from_exit_code(2), 135.0)
    assert final.state is JobState.FAILED and final.exit_code == 2
    assert [a.number for a in final.attempts] == [1, 2, 3]


@pytest_twisted.ensureDeferred
async def test_not_before(store):
    """A job with not_before waits in pending until then."""
    (job,) = await submit(store, spec(not_before=500.0), now=100.0)
    assert job.state is JobState.PENDING
    assert job.wait_reason.startswith("waiting until 1970-01-01T00:08:20")
    assert await store.next_due() == 500.0
    assert await claim(store, "h", 1, 200.0) == []
    await store.promote_due(500.0)
    assert len(await claim(store, "h", 1, 501.0)) == 1


@pytest_twisted.ensureDeferred
async def test_dependencies(store):
    """A job waits until all its dependencies succeed; when one fails, it and
    its own dependents are cancelled with errors naming the cause."""
    a, b = await submit(store, spec(0), spec(1))
    (c,) = await submit(store, spec(2, depends_on=(a.id, b.id)))
    (d,) = await submit(store, spec(3, depends_on=(c.id,)))
    assert c.state is JobState.PENDING and "2 job(s)" in c.wait_reason
    la, lb = await claim(store, "h", 5, 1.0)
    written = await store.finish(la, Outcome.from_exit_code(0), 2.0)
    assert written.changed == ((a.id, JobState.SUCCEEDED),)
    waiting = await store.get(c.id)
    assert waiting.state is JobState.PENDING and b.id in waiting.wait_reason
    written = await store.finish(lb, Outcome.from_exit_code(1), 3.0)
    assert (c.id, JobState.CANCELLED) in written.changed
    assert (d.id, JobState.CANCELLED) in written.changed
    cancelled = await store.get(c.id)
    assert cancelled.error == f"cancelled because its dependency {b.id} failed"
    assert (await store.get(d.id)).error == (
        f"cancelled because its dependency {c.id} was cancelled")


@pytest_twisted.ensureDeferred
async def test_dependency_success_queues(store):
    """When the last dependency succeeds the dependent is queued."""
    (a,) = await submit(store, spec(0))
    (b,) = await submit(store, spec(1, depends_on=(a.id,)))
    (la,) = await claim(store, "h", 5, 1.0)
    written = await store.finish(la, Outcome.from_exit_code(0), 2.0)
    assert (b.id, JobState.QUEUED) in written.changed
    (lb,) = await claim(store, "h", 5, 3.0)
    assert lb.job_id == b.id


@pytest_twisted.ensureDeferred
async def test_dependency_on_dead_job_and_unknown(store):
    """Depending on a job that already failed cancels at once; an unknown id
    is refused and nothing is stored."""
    (a,) = await submit(store, spec(0))
    await store.cancel(a.id, 1.0)
    (b,) = await submit(store, spec(1, depends_on=(a.id,)))
    assert b.state is JobState.CANCELLED and a.id in b.error
    with pytest.raises(UnknownDependency) as e:
        await submit(store, spec(2), spec(3, depends_on=(a.id, "nope")))
    assert (e.value.job_index, e.value.position, e.value.name) == (1, 1, "nope")
    jobs, _ = await store.list_jobs()
    assert len(jobs) == 2


@pytest_twisted.ensureDeferred
async def test_array_dependency(store):
    """depends_on may name an array id: all of its members."""
    members = [spec(i, array_id="arr", array_index=i) for i in range(3)]
    await submit(store, *members)
    (after,) = await submit(store, spec(9, depends_on=("arr",)))
    assert "3 job(s)" in after.wait_reason


@pytest_twisted.ensureDeferred
async def test_idempotency(make_store):
    """The same key and body replays the original jobs; another body is a
    conflict; concurrent duplicates make one job; keys expire."""
    store = await make_store(idempotency_ttl=100.0)
    key = IdempotencyKey("k", "digest-1")
    one = store.submit([spec(0)], 1.0, [ids.new()], key)
    two = store.submit([spec(0)], 1.0, [ids.new()], key)
    first, second = await one, await two
    assert not first.value.replayed and second.value.replayed
    assert [j.id for j in second.value.jobs] == [j.id for j in first.value.jobs]
    with pytest.raises(IdempotencyConflict):
        await store.submit([spec(1)], 2.0, [ids.new()], IdempotencyKey("k", "digest-2"))
    later = await store.submit([spec(0)], 200.0, [ids.new()], key)
    assert not later.value.replayed
    jobs, _ = await store.list_jobs()
    assert len(jobs) == 2
    assert (await store.purge_idempotency(400.0)).value == 1


@pytest_twisted.ensureDeferred
async def test_retry_with_dependents(store):
    """Retrying a failed job with dependents requeues it and brings its
    cancelled dependents back to pending; attempt numbers keep growing."""
    (a,) = await submit(store, spec(0))
    (b,) = await submit(store, spec(1, depends_on=(a.id,)))
    (la,) = await claim(store, "h", 1, 1.0)
    await store.finish(la, Outcome.from_exit_code(1), 2.0)
    with pytest.raises(DependencyNotRetried):
        await store.retry(b.id, 3.0, False)
    written = await store.retry(a.id, 3.0, True)
    assert written.value.state is JobState.QUEUED
    assert (b.id, JobState.PENDING) in written.changed
    with pytest.raises(InvalidTransition):
        await store.retry(a.id, 3.0, False)
    (again,) = await claim(store, "h", 1, 4.0)
    assert again.attempt == 2
    await store.finish(again, Outcome.from_exit_code(0), 5.0)
    assert (await store.get(b.id)).state is JobState.QUEUED


@pytest_twisted.ensureDeferred
async def test_recover_retries_when_attempts_remain(store):
    """An attempt lost in a crash counts; the job is retried if attempts remain."""
    (job,) = await submit(store, spec(max_attempts=2, retry_delay=0.0))
    await claim(store, "me", 1, 1.0)
    written = await store.recover("me", 2.0)
    assert written.changed == ((job.id, JobState.QUEUED),)
    (lease,) = await claim(store, "me", 1, 3.0)
    assert lease.attempt == 2


@pytest_twisted.ensureDeferred
async def test_queue_counts(make_store):
    """Queue counts cover every configured queue, by state."""
    store = await make_store(queues={"default": 0, "gpu": 2})
    await submit(store, spec(0, queue="gpu"), spec(1), spec(2))
    await claim(store, "h", 2, 1.0)
    counts = await store.queue_counts()
    assert counts["gpu"][JobState.RUNNING] == 1
    assert counts["default"][JobState.RUNNING] == 1
    assert counts["default"][JobState.QUEUED] == 1


@pytest_twisted.ensureDeferred
async def test_migration_from_version_1(tmp_path):
    """A database of schema version 1 is migrated and keeps its jobs."""
    path = str(tmp_path / "old.sqlite3")
    conn = sqlite3.connect(path)
    for statement in MIGRATIONS[0].split(";"):
        if statement.strip():
            conn.execute(statement)
    conn.execute("PRAGMA user_version = 1")
    conn.execute(
        "INSERT INTO jobs (id, state, name, labels, spec, created_at) VALUES"
        " ('old', 'queued', NULL, '{}', '{\"command\":[\"true\"]}', 1.0)")
    conn.commit()
    conn.close()
    store = SQLiteJobStore(path, reactor)
    await store.open()
    job = await store.get("old")
    assert job.spec.queue == "default" and job.spec.max_attempts == 1
    (lease,) = await claim(store, "h", 1, 2.0)
    assert lease.job_id == "old"
    await store.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    conn.close()


@pytest_twisted.ensureDeferred
async def test_retry_dependents_across_a_diamond(store):
    """Retrying with dependents brings back a job whose other dependency comes
    back with it, instead of refusing."""
    (a,) = await submit(store, spec(0))
    (b,) = await submit(store, spec(1, depends_on=(a.id,)))
    (c,) = await submit(store, spec(2, depends_on=(a.id,)))
    (e,) = await submit(store, spec(3, depends_on=(b.id,)))
    (d,) = await submit(store, spec(4, depends_on=(c.id, e.id)))
    (la,) = await claim(store, "h", 1, 1.0)
    await store.finish(la, Outcome.from_exit_code(1), 2.0)
    assert (await store.get(d.id)).state is JobState.CANCELLED
    written = await store.retry(a.id, 3.0, True)
    states = dict(written.changed)
    assert states[a.id] is JobState.QUEUED
    for job in (b, c, d, e):
        assert states[job.id] is JobState.PENDING


@pytest_twisted.ensureDeferred
async def test_success_before_cancel_is_kept(store):
    """A job that succeeded on its own before a cancel reached it stays
    succeeded; one the cancel stopped is cancelled without its result."""
    a, b = await submit(store, spec(0), spec(1))
    la, lb = await claim(store, "h", 2, 1.0)
    await store.cancel(a.id, 2.0)
    await store.cancel(b.id, 2.0)
    kept = await finish(store, la, Outcome(JobState.SUCCEEDED, exit_code=0), 3.0)
    assert kept.state is JobState.SUCCEEDED
    stopped = await finish(
        store, lb, Outcome(JobState.SUCCEEDED, result=1, stopped=True), 3.0)
    assert stopped.state is JobState.CANCELLED and stopped.result is None


@pytest_twisted.ensureDeferred
async def test_unconfigured_queues_are_found_by_seeking(tmp_path):
    """Queued jobs of queues the configuration does not name are counted,
    queue by queue; configured ones are left out."""
    store = SQLiteJobStore(str(tmp_path / "q.sqlite3"), reactor,
                           queues={"default": 0, "a": 0, "b": 0, "z": 0})
    await store.open()
    specs = [JobSpec(command=("true",), queue=q) for q in "aabbbzz"] + [
        JobSpec(command=("true",), queue="default")]
    await store.submit(specs, 1.0, [f"id-{i}" for i in range(len(specs))])
    await store.close()
    narrower = SQLiteJobStore(str(tmp_path / "q.sqlite3"), reactor,
                              queues={"default": 0, "a": 0})
    await narrower.open()
    assert await narrower.unconfigured_queues() == {"b": 3, "z": 2}
    await narrower.close()
