"""
The SQLite job store: durability, group commit, claims, fencing, cancel,
listing, recovery and migrations.
"""

import os
import sqlite3

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred, gatherResults
from zope.interface.verify import verifyObject

from dispatcher._interfaces import IJobStore
from dispatcher._model import (
    InputSpec,
    InvalidTransition,
    JobIds,
    JobSpec,
    JobState,
    Outcome,
    StaleLease,
    UnknownJob,
)
from dispatcher._sqlite import MIGRATIONS, SQLiteJobStore, StoreVersionError

ids = JobIds()


def spec(i=0, **kw):
    return JobSpec(command=("echo", str(i)), **kw)


@pytest.fixture
def store(tmp_path):
    s = SQLiteJobStore(str(tmp_path / "db.sqlite3"), reactor)
    pytest_twisted.blockon(s.open())
    yield s
    pytest_twisted.blockon(s.close())


async def submit(store, *specs, now=100.0):
    return await store.submit(list(specs), now, [ids.new() for _ in specs])


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
    # The first write commits alone; the other 199 wait and go together.
    assert store.batches - before < 20


@pytest_twisted.ensureDeferred
async def test_failed_write_changes_nothing_beside_others(store):
    """A write that fails inside a group rolls back alone; its neighbours commit."""
    job_id = ids.new()
    first = store.submit([spec(1)], 1.0, [job_id])
    duplicate = store.submit([spec(2), spec(3)], 1.0, [ids.new(), job_id])
    third = store.submit([spec(4)], 1.0, [ids.new()])
    await first
    with pytest.raises(sqlite3.IntegrityError):
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
    leases = await store.claim("h", 2, 200.0, 60)
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
        await store.finish(stale, Outcome(JobState.SUCCEEDED, exit_code=0), 300.0)
    assert (await store.get(jobs[0].id)).state is JobState.RUNNING
    done = await store.finish(leases[0], Outcome.from_exit_code(3), 300.0)
    assert done.state is JobState.FAILED
    assert done.exit_code == 3
    assert done.error == "exited with code 3"
    assert done.attempts[0].finished_at == 300.0
    with pytest.raises(StaleLease):
        await store.finish(leases[0], Outcome.from_exit_code(0), 301.0)
    assert (await store.claim("h", 5, 400.0, 60))[0].job_id == jobs[2].id
    assert await store.claim("h", 5, 400.0, 60) == []


@pytest_twisted.ensureDeferred
async def test_inputs_stage_first(store):
    """A job with inputs is claimed into staging, then marked running."""
    (job,) = await submit(store, spec(inputs=(InputSpec("http://x/y", "y"),)))
    (lease,) = await store.claim("h", 1, 1.0, 60)
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
    (lease,) = await store.claim("h", 1, 1.0, 60)
    assert lease.job_id == queued.id
    job, none = await store.cancel(running.id, 2.0)
    assert none is None and job.state is JobState.CANCELLED
    job, held = await store.cancel(queued.id, 2.0)
    assert job.state is JobState.RUNNING and held.token == lease.token
    ended = await store.finish(lease, Outcome.from_exit_code(-15), 3.0)
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
    (lease,) = await store.claim("h", 1, 1.0, 60)
    back = await store.release(lease, 2.0, "stopped")
    assert back.state is JobState.QUEUED
    assert back.attempts[0].error == "stopped"
    (again,) = await store.claim("h", 1, 3.0, 60)
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
    await store.claim("h", 1, 1.0, 60)
    running, _ = await store.list_jobs(state=JobState.RUNNING)
    assert [j.id for j in running] == [first[0].id]
    counts = await store.count_by_state()
    assert counts[JobState.RUNNING] == 1 and counts[JobState.QUEUED] == 5


@pytest_twisted.ensureDeferred
async def test_recover(store):
    """At start-up, attempts this holder left running are recorded as lost with
    their process identity, and other holders' are left alone."""
    await submit(store, spec(0), spec(1))
    (mine,) = await store.claim("me", 1, 1.0, 60)
    (theirs,) = await store.claim("other", 1, 1.0, 60)
    await store.record_process(mine, 1234, 5678, "boot")
    lost = await store.recover("me", 9.0)
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
