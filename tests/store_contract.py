"""
The job store contract: what every L{IJobStore} must do, written against
the interface alone, so that each store (SQLite today, PostgreSQL next)
passes the same suite.

A test module runs it by importing these tests and defining a
C{make_store} fixture: C{await make_store(name="db", **options)} opens a
store and returns it, where C{options} may hold C{queues} (queue name to
limit of running jobs), C{idempotency_ttl} and C{backoff}; asking again
for the same C{name} after closing it opens the same jobs, and every store
it made is closed at teardown (see C{tests/test_store_contract.py}).

Time is always given (C{now}); nothing here sleeps.
"""

import attrs
import pytest
import pytest_twisted
from twisted.internet.defer import ensureDeferred
from zope.interface.verify import verifyObject

from dispatcher.model._events import JobEvent
from dispatcher.model._groups import GroupKind, JobGroup, NothingToChange, UnknownGroup
from dispatcher.model._jobs import (
    InputSpec,
    InvalidTransition,
    JobIds,
    JobSpec,
    JobState,
    Offer,
    Outcome,
    PlainJobs,
    Resources,
    StaleLease,
    StoreClosed,
    UnknownJob,
)
from dispatcher.store._interface import IJobStore
from dispatcher.store._results import (
    Claimed,
    DependencyNotRetried,
    IdempotencyConflict,
    IdempotencyKey,
    ResumedLease,
    Submitted,
    SubmittedIds,
    TooManyDependencies,
    TooManyUnfinished,
    UnknownDependency,
    WriteRefused,
    Written,
)

ids = JobIds()


def spec(i=0, **kw):
    """A command job told apart by C{i}."""
    return JobSpec(command=("echo", str(i)), **kw)


def moved(written):
    """The (job id, new state) of each change a write reports, in order:
    what the contract's tests compare (a change carries more besides)."""
    return tuple(change[:2] for change in written.changed)


def no_jitter(delay, spent):
    """The back-off without its random factor, for exact wake times."""
    return delay * 2 ** (spent - 1)


@pytest.fixture
def store(make_store):
    """A store opened with the default options."""
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
    assert (b.id, JobState.QUEUED) in moved(written)
    assert (await again.get(b.id)).state is JobState.QUEUED


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


@pytest_twisted.ensureDeferred
async def test_a_claim_for_one_job_takes_that_job_alone(make_store):
    """A holder that may take one job alone (a direct-mode Slurm job's
    worker, Offer.job) gets that job, whatever its queue and the older and
    higher jobs before it, and only while it is queued and its queue has
    room; its claim never says the queues drained, and a miss counts as
    one passed over, so that this holder alone rests."""
    store = await make_store(queues={"default": 0, "hpc": 1})
    older = await submit(store, spec(0, queue="hpc", priority=9), spec(1))
    (mine,) = await submit(store, spec(2, queue="hpc"))
    offer = Offer("direct.x", 1, queues=frozenset(), job=mine.id)
    got = await store.claim(offer, 1, 200.0, 60)
    assert [l.job_id for l in got.leases] == [mine.id] and not got.drained
    assert got.leases[0].holder == "direct.x" and got.skipped == 0
    again = await store.claim(offer, 1, 201.0, 60)
    assert again.leases == [] and again.skipped == 1 and not again.drained
    # Its queue at its limit (hpc's one running job is mine): none.
    other = Offer("direct.y", 1, queues=frozenset(), job=older[0].id)
    held = await store.claim(other, 1, 202.0, 60)
    assert held.leases == [] and held.skipped == 1
    await finish(store, got.leases[0], Outcome.from_exit_code(0), 203.0)
    freed = await store.claim(other, 1, 204.0, 60)
    assert [l.job_id for l in freed.leases] == [older[0].id]
    assert (await store.get(older[1].id)).state is JobState.QUEUED


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
async def test_durable_after_reopen(make_store):
    """Whatever a store has acknowledged (a submission, a claim, an end, a
    cancel, a retry) is there when it is opened again."""
    first = await make_store()
    done, failed, waiting, running = await submit(first, spec(0), spec(1), spec(2), spec(3))
    leases = await claim(first, "h", 4, 1.0)
    by_job = {lease.job_id: lease for lease in leases}
    await first.finish(by_job[done.id], Outcome.from_exit_code(0), 2.0)
    await first.finish(by_job[failed.id], Outcome.from_exit_code(1), 2.0)
    await first.release(by_job[waiting.id], 2.0, "given back")
    await first.cancel(running.id, 2.0)
    await first.retry(failed.id, 3.0, False)
    await first.close()
    again = await make_store()
    assert (await again.get(done.id)).state is JobState.SUCCEEDED
    assert (await again.get(failed.id)).state is JobState.QUEUED
    assert [a.number for a in (await again.get(failed.id)).attempts] == [1]
    assert (await again.get(waiting.id)).attempts[0].error == "given back"
    # A cancel asked for while a job runs waits for its end.
    written = await again.finish(by_job[running.id], Outcome.from_exit_code(-15), 4.0)
    assert moved(written) == ((running.id, JobState.CANCELLED),)
    # Tokens keep growing across a reopen: an old lease is never current.
    (lease,) = await claim(again, "h", 1, 5.0)
    assert lease.token > max(l.token for l in leases)


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
async def test_renewal_moves_a_holders_leases_and_named_tokens(store):
    """A renewal moves the expiry of every lease of the holder and of the
    tokens named, answers the holder's tokens still held, and leaves other
    leases alone: a sweep then recovers only the lease nobody renewed."""
    await submit(store, spec(0), spec(1), spec(2), spec(3))
    mine = await claim(store, "local@a", 2, 1.0, seconds=10)
    (remote,) = await claim(store, "worker", 1, 1.0, seconds=10)
    (other,) = await claim(store, "local@b", 1, 1.0, seconds=10)
    held = (await store.renew_leases("local@a", [remote.token], 8.0, 10, 20)).value
    assert held == frozenset(lease.token for lease in mine)
    # At 12 only local@b's lease (expiry 11) has run out.
    swept = (await store.expire_leases(12.0, "local@z", [], 1000)).value
    assert [(e.job_id, e.token, e.holder, e.expired_at) for e in swept] == [
        (other.job_id, other.token, "local@b", 11.0)
    ]
    job = await store.get(other.job_id)
    assert job.state is JobState.FAILED
    assert job.attempts[0].error.startswith("lost: its lease expired")
    for lease in mine + [remote]:
        assert (await store.get(lease.job_id)).state is JobState.RUNNING
    # The holder's leases run to 18, the worker's (renewed for 20 s) to 28.
    swept = (await store.expire_leases(19.0, "local@z", [], 1000)).value
    assert sorted(e.token for e in swept) == sorted(lease.token for lease in mine)
    assert (await store.get(remote.job_id)).state is JobState.RUNNING


@pytest_twisted.ensureDeferred
async def test_an_expired_lease_is_fenced_and_its_job_retried(store):
    """A lease recovered after its expiry is no longer the job's: the job is
    queued again if attempts remain, a late result of the old holder is
    refused (StaleLease) and changes nothing, and the renewal of the old
    holder no longer names it; the sweeper's own holder and the tokens it
    keeps are never swept."""
    (job, kept) = await submit(
        store, spec(0, max_attempts=2, retry_delay=0.0), spec(1)
    )
    (dead, mine) = await claim(store, "local@dead", 2, 1.0, seconds=5)
    assert (await store.expire_leases(7.0, "local@dead", [], 1000)).value == []
    assert (await store.expire_leases(7.0, "local@z", [mine.token], 1000)).value != []
    assert (await store.get(job.id)).state is JobState.QUEUED
    assert (await store.get(kept.id)).state is JobState.RUNNING
    with pytest.raises(StaleLease):
        await store.finish(dead, Outcome(JobState.SUCCEEDED, exit_code=0), 8.0)
    assert (await store.renew_leases("local@dead", [], 8.0, 5)).value == frozenset(
        {mine.token}
    )
    (again,) = await claim(store, "local@b", 1, 9.0)
    assert again.job_id == job.id and again.attempt == 2 and again.token != dead.token
    assert (await finish(store, again, Outcome(JobState.SUCCEEDED, exit_code=0), 10.0)
            ).state is JobState.SUCCEEDED


@pytest_twisted.ensureDeferred
async def test_a_worker_that_moves_takes_its_leases_to_the_other_dispatcher(store):
    """A dispatcher takes up a worker's live leases by job and token (its
    holder's alone, unexpired, current), their expiry moved on; from then on
    only it may record one expired, the one that granted them is refused
    (StaleLease) and changes nothing, until it takes them up again; the
    worker's own result is taken from either, and a new attempt of the job
    is served by its granter again."""
    (job, other) = await submit(store, spec(0, max_attempts=2, retry_delay=0.0), spec(1))
    (lease, second) = await claim(store, "mover", 2, 1.0, seconds=10)
    lost = Outcome(JobState.FAILED, error="lost: no heartbeat")
    # Not the holder's, not the current token, expired: nothing taken up.
    assert (await store.adopt_leases("someone", [(job.id, lease.token)], "local@b",
                                     2.0, 30)).value == []
    assert (await store.adopt_leases("mover", [(job.id, lease.token + 1000)], "local@b",
                                     2.0, 30)).value == []
    assert (await store.adopt_leases("mover", [(job.id, lease.token)], "local@b",
                                     12.0, 30)).value == []
    # (A job named twice, once with a token not its own, is taken up by
    # the right one.)
    taken = (await store.adopt_leases(
        "mover", [(job.id, lease.token), (other.id, second.token),
                  (other.id, second.token + 1000)], "local@b", 2.0, 30)
    ).value
    assert [(t.lease.job_id, t.lease.token, t.lease.holder, t.lease.expires_at, t.state)
            for t in taken] == [
        (job.id, lease.token, "mover", 32.0, JobState.RUNNING),
        (other.id, second.token, "mover", 32.0, JobState.RUNNING)]
    assert taken[0].lease.spec == spec(0, max_attempts=2, retry_delay=0.0)
    # Past the granter's expiry (11) no sweep takes them: b renewed them.
    assert (await store.expire_leases(20.0, "local@z", [], 1000)).value == []
    # The granter's expiry is refused; b's is written.
    with pytest.raises(StaleLease):
        await store.finish_served(lease, lost, 20.0, "local@a")
    assert (await store.get(job.id)).state is JobState.RUNNING
    # Taken up by a again: then b's expiry is refused.
    assert len((await store.adopt_leases(None, [(other.id, second.token)], "local@a",
                                         20.0, 30)).value) == 1
    with pytest.raises(StaleLease):
        await store.finish_served(second, lost, 21.0, "local@b")
    await store.finish_served(lease, lost, 21.0, "local@b")
    assert (await store.get(job.id)).state is JobState.QUEUED
    # The worker's own result goes through any dispatcher.
    await store.finish(second, Outcome(JobState.SUCCEEDED, exit_code=0), 22.0)
    assert (await store.get(other.id)).state is JobState.SUCCEEDED
    # The next attempt is served by the one that granted it.
    (again,) = await claim(store, "mover", 1, 23.0)
    assert again.job_id == job.id and again.attempt == 2
    await store.finish_served(again, lost, 24.0, "local@c")
    assert (await store.get(job.id)).state is JobState.FAILED


@pytest_twisted.ensureDeferred
async def test_resume_leaves_every_local_holders_leases(store):
    """A start resumes the workers' leases alone: no dispatcher's local
    holder (local@...) is taken for a worker."""
    await submit(store, spec(0), spec(1))
    await claim(store, "local@other", 1, 1.0)
    (remote,) = await claim(store, "worker", 1, 1.0)
    resumed = (await store.resume_leases("local@me", 2.0, 30)).value
    assert [r.lease.token for r in resumed] == [remote.token]


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
async def test_new_queue_limits_hold_from_the_next_claim(make_store):
    """Queue limits set anew (a reload) hold from the next claim: a lowered
    limit starts nothing more while its running jobs run on, a raised one
    starts more, a queue added is claimed from, and one removed is not
    (its jobs wait, and say why)."""
    store = await make_store(queues={"default": 0, "gpu": 2})
    gpu = await submit(store, *[spec(i, queue="gpu") for i in range(4)])
    late = await submit(store, spec(9, queue="new"))
    first = await claim(store, "h", 8, 1.0)
    assert sorted(l.job_id for l in first) == sorted([gpu[0].id, gpu[1].id])
    await store.set_queue_limits({"gpu": 1, "new": 0})
    assert store.queue_limits == {"default": 0, "gpu": 1, "new": 0}
    (new_lease,) = await claim(store, "h", 8, 2.0)
    assert new_lease.job_id == late[0].id
    await finish(store, first[0], Outcome.from_exit_code(0), 3.0)
    # Two ran under a limit now one: the one left running still fills it.
    assert await claim(store, "h", 8, 4.0) == []
    waiting = await store.get(gpu[2].id)
    assert waiting.wait_reason == "queue gpu is at its limit of 1 running jobs"
    await store.set_queue_limits({"gpu": 3})
    assert len(await claim(store, "h", 8, 5.0)) == 2
    await store.set_queue_limits({})
    assert store.queue_limits == {"default": 0}
    others = await submit(store, spec(10, queue="gpu"), spec(11))
    (plain,) = await claim(store, "h", 8, 6.0)
    assert plain.job_id == others[1].id
    assert (await store.get(others[0].id)).state is JobState.QUEUED


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
    assert moved((await store.promote_due(110.9))) == ()
    promoted = await store.promote_due(111.0)
    assert moved(promoted) == ((job.id, JobState.QUEUED),)
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
    assert moved(written) == ((a.id, JobState.SUCCEEDED),)
    waiting = await store.get(c.id)
    assert waiting.state is JobState.PENDING and b.id in waiting.wait_reason
    written = await store.finish(lb, Outcome.from_exit_code(1), 3.0)
    assert (c.id, JobState.CANCELLED) in moved(written)
    assert (d.id, JobState.CANCELLED) in moved(written)
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
    assert (b.id, JobState.QUEUED) in moved(written)
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
    assert (b.id, JobState.PENDING) in moved(written)
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
    assert moved(written) == ((job.id, JobState.QUEUED),)
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
    states = dict(moved(written))
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
async def test_unconfigured_queues_are_found_by_seeking(make_store):
    """Queued jobs of queues the configuration does not name (any more) are
    counted, queue by queue; configured ones are left out."""
    store = await make_store(queues={"default": 0, "a": 0, "b": 0, "z": 0})
    specs = [JobSpec(command=("true",), queue=q) for q in "aabbbzz"] + [
        JobSpec(command=("true",), queue="default")]
    await store.submit(specs, 1.0, [ids.new() for _ in specs])
    assert await store.unconfigured_queues() == {}
    await store.close()
    narrower = await make_store(queues={"default": 0, "a": 0})
    assert await narrower.unconfigured_queues() == {"b": 3, "z": 2}
    assert narrower.queue_limits == {"default": 0, "a": 0}


# Beyond the store's first tests: the rest of the interface.


@pytest_twisted.ensureDeferred
async def test_submit_plain(store):
    """Plain jobs are stored queued with their ids and the batch's queue
    settings, and read back as any job; a replayed key answers the jobs
    first made, another digest is a conflict."""
    plain = PlainJobs([["true", "p0"], ("t", [1], {})],
                      priority=3, timeout=5.0)
    made = [ids.new(), ids.new()]
    written = await store.submit_plain(plain, 7.0, made)
    assert written.value == SubmittedIds(made)
    assert moved(written) == ((made[0], JobState.QUEUED), (made[1], JobState.QUEUED))
    first, second = [await store.get(i) for i in made]
    assert first.state is JobState.QUEUED and first.created_at == 7.0
    assert first.spec.command == ("true", "p0") and first.spec.priority == 3
    assert first.spec.timeout == 5.0 and first.spec.queue == "default"
    assert second.spec.task == "t" and second.spec.args == (1,)
    key = IdempotencyKey("plain-key", "d1")
    once = await store.submit_plain(plain, 8.0, [ids.new(), ids.new()], key)
    replay = await store.submit_plain(plain, 9.0, [ids.new(), ids.new()], key)
    assert isinstance(replay.value, Submitted) and replay.value.replayed
    assert [job.id for job in replay.value.jobs] == once.value.ids
    with pytest.raises(IdempotencyConflict):
        await store.submit_plain(plain, 9.0, [ids.new(), ids.new()],
                                 IdempotencyKey("plain-key", "d2"))
    assert (await store.count_by_state())[JobState.QUEUED] == 4


@pytest_twisted.ensureDeferred
async def test_count_by_state_names_every_state(store):
    """The counts name every state, with zeros, and follow the jobs."""
    counts = await store.count_by_state()
    assert counts == {state: 0 for state in JobState}
    await submit(store, spec(0), spec(1), spec(2, not_before=500.0))
    await claim(store, "h", 1, 101.0)
    counts = await store.count_by_state()
    assert (counts[JobState.RUNNING], counts[JobState.QUEUED], counts[JobState.PENDING]) == (
        1, 1, 1)


@pytest_twisted.ensureDeferred
async def test_list_filters_combine(store):
    """State and label filters combine; several labels must all match; a
    page past the last job is empty."""
    jobs = await submit(store, spec(0, labels={"a": "1", "b": "x"}),
                        spec(1, labels={"a": "1"}), spec(2, labels={"b": "x"}))
    both, cursor = await store.list_jobs(labels=[("a", "1"), ("b", None)])
    assert [j.id for j in both] == [jobs[0].id] and cursor is None
    await claim(store, "h", 1, 101.0)
    queued_a, _ = await store.list_jobs(state=JobState.QUEUED, labels=[("a", "1")])
    assert [j.id for j in queued_a] == [jobs[1].id]
    page, cursor = await store.list_jobs(limit=3)
    assert len(page) == 3 and cursor is None
    _, cursor = await store.list_jobs(limit=1)
    rest, _ = await store.list_jobs(limit=10, cursor=cursor)
    assert [j.id for j in rest] == [jobs[1].id, jobs[2].id]


@pytest_twisted.ensureDeferred
async def test_claim_nothing_for_no_capacity(store):
    """A claim for no capacity takes nothing and leaves the jobs queued."""
    (job,) = await submit(store, spec())
    claimed = await store.claim(Offer("h", 0), 0, 101.0, 60)
    assert isinstance(claimed, Claimed) and claimed.leases == []
    assert (await store.get(job.id)).state is JobState.QUEUED


@pytest_twisted.ensureDeferred
async def test_claim_fits_resources_and_requirements(store):
    """A claim takes only the jobs that fit the holder's free resources and
    whose requirements its labels meet, counting those it passed over;
    without C{free} the offer's whole resources count."""
    big, small, picky, fits = await submit(
        store,
        spec(0, resources=Resources(cpus=4)),
        spec(1, resources=Resources(cpus=1, memory_mb=100)),
        spec(2, requirements={"gpu": "a100"}),
        spec(3, resources=Resources(cpus=1)),
    )
    offer = Offer("h", 4, Resources(cpus=2, memory_mb=1000))
    claimed = await store.claim(offer, 4, 101.0, 60, free=Resources(cpus=1, memory_mb=1000))
    assert [l.job_id for l in claimed.leases] == [small.id]
    assert claimed.skipped == 3 and not claimed.drained
    whole = await store.claim(offer, 4, 102.0, 60)
    assert [l.job_id for l in whole.leases] == [fits.id]
    labelled = Offer("g", 4, Resources(cpus=8, memory_mb=1000), labels={"gpu": "a100"})
    rest = await store.claim(labelled, 4, 103.0, 60)
    assert sorted(l.job_id for l in rest.leases) == sorted([big.id, picky.id])
    assert all(l.holder == "g" and l.expires_at == 163.0 for l in rest.leases)


@pytest_twisted.ensureDeferred
async def test_mark_running_needs_a_current_staging_lease(store):
    """Only a staging job on its current lease may start running; a stale
    lease or a running job is refused and nothing changes."""
    (job,) = await submit(store, spec(inputs=(InputSpec("http://x/y", "y"),)))
    (lease,) = await claim(store, "h", 1, 101.0)
    with pytest.raises(StaleLease):
        await store.mark_running(attrs.evolve(lease, token=lease.token + 100), 102.0)
    assert (await store.get(job.id)).state is JobState.STAGING
    written = await store.mark_running(lease, 102.0)
    assert moved(written) == ((job.id, JobState.RUNNING),)
    with pytest.raises(InvalidTransition):
        await store.mark_running(lease, 103.0)


@pytest_twisted.ensureDeferred
async def test_record_process_is_fenced(store):
    """A process is recorded for the current lease only."""
    (job,) = await submit(store, spec())
    (lease,) = await claim(store, "me", 1, 101.0)
    with pytest.raises(StaleLease):
        await store.record_process(attrs.evolve(lease, token=lease.token + 1), 1, 2, "b")
    with pytest.raises(UnknownJob):
        await store.record_process(attrs.evolve(lease, job_id="nope"), 1, 2, "b")
    await store.record_process(lease, 42, None, None)
    (lost,) = (await store.recover("me", 102.0)).value
    assert (lost.job_id, lost.token, lost.pid, lost.start_ticks, lost.boot_id) == (
        job.id, lease.token, 42, None, None)


@pytest_twisted.ensureDeferred
async def test_release_of_a_job_whose_cancel_waits_cancels_it(store):
    """Releasing a job whose cancel was asked for while it ran ends it
    cancelled, and its pending dependents with it."""
    (job,) = await submit(store, spec(0))
    (dependent,) = await submit(store, spec(1, depends_on=(job.id,)))
    (lease,) = await claim(store, "h", 1, 101.0)
    (_, held) = (await store.cancel(job.id, 102.0)).value
    assert held.token == lease.token
    written = await store.release(lease, 103.0, "stopping")
    assert moved(written) == ((job.id, JobState.CANCELLED),
                               (dependent.id, JobState.CANCELLED))
    with pytest.raises(StaleLease):
        await store.release(lease, 104.0, "again")


@pytest_twisted.ensureDeferred
async def test_cancel_a_pending_job_cancels_its_dependents(store):
    """Cancelling a pending job cancels it at once, and the jobs waiting
    for it, naming it."""
    (later,) = await submit(store, spec(0, not_before=900.0))
    (dependent,) = await submit(store, spec(1, depends_on=(later.id,)))
    written = await store.cancel(later.id, 101.0)
    job, lease = written.value
    assert lease is None and job.state is JobState.CANCELLED
    assert (dependent.id, JobState.CANCELLED) in moved(written)
    assert (await store.get(dependent.id)).cancelled_by == later.id


@pytest_twisted.ensureDeferred
async def test_finish_refuses_an_unknown_job(store):
    """An end for a job the store does not hold fails with UnknownJob."""
    (job,) = await submit(store, spec())
    (lease,) = await claim(store, "h", 1, 101.0)
    with pytest.raises(UnknownJob):
        await store.finish(attrs.evolve(lease, job_id="nope"), Outcome.from_exit_code(0), 102.0)


@pytest_twisted.ensureDeferred
async def test_promote_due_says_when_the_next_is_due(store):
    """Promoting queues the jobs whose time has come and says when the next
    pending one is due; next_due agrees."""
    early, late = await submit(store, spec(0, not_before=200.0), spec(1, not_before=300.0))
    assert await store.next_due() == 200.0
    written = await store.promote_due(250.0)
    assert moved(written) == ((early.id, JobState.QUEUED),) and written.wake_at == 300.0
    assert await store.next_due() == 300.0
    written = await store.promote_due(300.0)
    assert moved(written) == ((late.id, JobState.QUEUED),) and written.wake_at is None
    assert await store.next_due() is None


@pytest_twisted.ensureDeferred
async def test_purge_forgets_only_expired_keys(make_store):
    """Purging forgets the keys past their time to live and keeps the
    others: a kept key still replays."""
    store = await make_store(idempotency_ttl=100.0)
    old, new = IdempotencyKey("old", "d"), IdempotencyKey("new", "d")
    await store.submit([spec(0)], 10.0, [ids.new()], old)
    kept = await store.submit([spec(1)], 90.0, [ids.new()], new)
    assert (await store.purge_idempotency(150.0)).value == 1
    replay = await store.submit([spec(1)], 150.0, [ids.new()], new)
    assert replay.value.replayed and replay.value.jobs[0].id == kept.value.jobs[0].id
    assert (await store.purge_idempotency(150.0)).value == 0


@pytest_twisted.ensureDeferred
async def test_resume_leases_of_remote_holders(make_store):
    """At start-up the leases of other holders live on, their expiry moved
    on, with the job's state and whether a cancel waits; the local
    holder's are left to recover."""
    first = await make_store()
    staged, running, mine = await submit(
        first, spec(0, inputs=(InputSpec("http://x/y", "y"),)), spec(1), spec(2))
    (staged_lease,) = await claim(first, "worker-a", 1, 101.0)
    (running_lease,) = await claim(first, "worker-b", 1, 101.0)
    await claim(first, "local", 1, 101.0)
    await first.cancel(running.id, 102.0)
    await first.close()
    again = await make_store()
    written = await again.resume_leases("local", 500.0, 30.0)
    resumed = sorted(written.value, key=lambda r: r.lease.holder)
    assert all(isinstance(r, ResumedLease) for r in resumed)
    assert [(r.lease.job_id, r.lease.token, r.lease.expires_at, r.state, r.cancel_requested)
            for r in resumed] == [
        (staged.id, staged_lease.token, 530.0, JobState.STAGING, False),
        (running.id, running_lease.token, 530.0, JobState.RUNNING, True),
    ]
    assert resumed[0].lease.spec.inputs == (InputSpec("http://x/y", "y"),)
    # The resumed lease is current: its start and end are recorded.
    await again.mark_running(resumed[0].lease, 501.0)
    await again.finish(resumed[0].lease, Outcome.from_exit_code(0), 501.0)
    assert (await again.get(staged.id)).state is JobState.SUCCEEDED


@pytest_twisted.ensureDeferred
async def test_a_closed_store_refuses_work(make_store):
    """Once closed, a store fails reads and writes with StoreClosed, and a
    second close fires too."""
    store = await make_store()
    await submit(store, spec())
    await store.close()
    with pytest.raises(StoreClosed):
        await store.submit([spec()], 1.0, [ids.new()])
    with pytest.raises(StoreClosed):
        await store.get("anything")
    await store.close()


@pytest_twisted.ensureDeferred
async def test_writes_asked_together_all_land(store):
    """Writes asked for at once (submissions, a claim, ends, a cancel) each
    get their own answer, as if asked one by one."""
    a, b, c = await submit(store, spec(0), spec(1), spec(2))
    la, lb = await claim(store, "h", 2, 101.0)
    asked = [
        store.submit([spec(3)], 102.0, [ids.new()]),
        store.finish(la, Outcome.from_exit_code(0), 102.0),
        store.finish(lb, Outcome.from_exit_code(1), 102.0),
        store.cancel(c.id, 102.0),
        store.claim(Offer("h", 5), 5, 102.0, 60),
    ]
    results = [await d for d in asked]
    assert all(isinstance(r, (Written, Claimed)) for r in results)
    assert moved(results[1]) == ((a.id, JobState.SUCCEEDED),)
    assert moved(results[2]) == ((b.id, JobState.FAILED),)
    assert results[3].value[0].state is JobState.CANCELLED
    assert [l.job_id for l in results[4].leases] == [results[0].value.jobs[0].id]


# Owners


@pytest_twisted.ensureDeferred
async def test_every_job_keeps_its_owner(store):
    """The owner a submission gives is every job's it makes, by each way
    of submitting (specs, an array's members, plain jobs, submissions
    stored together); a job submitted without one has none."""
    (one,) = (await store.submit([spec(0)], 1.0, [ids.new()], owner="ann")).value.jobs
    members = [spec(i, array_id="arr", array_index=i) for i in range(3)]
    array = (await store.submit(members, 1.0, [ids.new() for _ in members],
                                owner="bob")).value.jobs
    plain_ids = [ids.new(), ids.new()]
    await store.submit_plain(PlainJobs([["true"], ["false"]]), 1.0, plain_ids, owner="cy")
    together = [
        store.submit([spec(5)], 1.0, [ids.new()], owner="dee"),
        store.submit_plain(PlainJobs([["true"]]), 1.0, [ids.new()], owner="eve"),
        store.submit([spec(6)], 1.0, [ids.new()]),
    ]
    dee, eve, nobody = [await d for d in together]
    assert one.owner == "ann" and [j.owner for j in array] == ["bob"] * 3
    assert (await store.get(one.id)).owner == "ann"
    assert {(await store.get(j.id)).owner for j in array} == {"bob"}
    assert [(await store.get(i)).owner for i in plain_ids] == ["cy", "cy"]
    assert (await store.get(dee.value.jobs[0].id)).owner == "dee"
    assert (await store.get(eve.value.ids[0])).owner == "eve"
    assert (await store.get(nobody.value.jobs[0].id)).owner is None


@pytest_twisted.ensureDeferred
async def test_list_jobs_by_owner(store):
    """Listing by owner gives that owner's jobs alone, in submission order,
    a page at a time, with the other filters too."""
    made: dict = {"ann": [], "bob": []}
    odd_ann = []
    for i in range(6):
        owner = "ann" if i % 3 else "bob"
        (job,) = (await store.submit([spec(i, labels={"k": str(i % 2)})], 1.0, [ids.new()],
                                     owner=owner)).value.jobs
        made[owner].append(job.id)
        if owner == "ann" and i % 2:
            odd_ann.append(job.id)
    page, cursor = await store.list_jobs(owner="ann", limit=3)
    assert [j.id for j in page] == made["ann"][:3] and cursor is not None
    rest, cursor = await store.list_jobs(owner="ann", limit=3, cursor=cursor)
    assert [j.id for j in rest] == made["ann"][3:] and cursor is None
    bob, _ = await store.list_jobs(owner="bob")
    assert [j.id for j in bob] == made["bob"] and {j.owner for j in bob} == {"bob"}
    odd, _ = await store.list_jobs(owner="ann", labels=[("k", "1")])
    assert [j.id for j in odd] == odd_ann and len(odd_ann) == 2
    await claim(store, "h", 1, 2.0)
    running, _ = await store.list_jobs(owner="bob", state=JobState.RUNNING)
    assert [j.id for j in running] == [made["bob"][0]]
    assert (await store.list_jobs(owner="ann", state=JobState.RUNNING))[0] == []
    assert (await store.list_jobs(owner="cy"))[0] == []


@pytest_twisted.ensureDeferred
async def test_queue_counts_of_one_owner(make_store):
    """Queue counts for an owner count its jobs alone, every configured
    queue still named."""
    store = await make_store(queues={"default": 0, "gpu": 2})
    await store.submit([spec(0, queue="gpu"), spec(1)], 1.0, [ids.new(), ids.new()],
                       owner="ann")
    await store.submit([spec(2), spec(3)], 1.0, [ids.new(), ids.new()], owner="bob")
    await store.submit([spec(4)], 1.0, [ids.new()], owner="bob")
    await claim(store, "h", 4, 2.0)
    ann = await store.queue_counts("ann")
    assert ann["gpu"][JobState.RUNNING] == 1 and ann["default"][JobState.RUNNING] == 1
    assert ann["default"][JobState.QUEUED] == 0
    bob = await store.queue_counts("bob")
    assert bob["gpu"] == {state: 0 for state in JobState}
    assert bob["default"][JobState.RUNNING] == 2 and bob["default"][JobState.QUEUED] == 1
    assert (await store.queue_counts("cy"))["default"] == {state: 0 for state in JobState}
    assert (await store.queue_counts())["default"][JobState.RUNNING] == 3


@pytest_twisted.ensureDeferred
async def test_which_jobs_an_owner_owns(store):
    """Of a list of ids, those of one owner's jobs are told apart from
    another's, from jobs without an owner and from ids of no job, however
    many are asked about at once."""
    ann = (await store.submit([spec(i) for i in range(600)], 1.0,
                              [ids.new() for _ in range(600)], owner="ann")).value.jobs
    (bob,) = (await store.submit([spec(0)], 1.0, [ids.new()], owner="bob")).value.jobs
    (nobody,) = await submit(store, spec(1))
    asked = [bob.id, nobody.id, "missing"] + [j.id for j in ann]
    assert await store.owned(asked, "ann") == {j.id for j in ann}
    assert await store.owned(asked, "bob") == {bob.id}
    assert await store.owned([], "bob") == frozenset()


@pytest_twisted.ensureDeferred
async def test_a_cancel_limited_to_an_owner(store):
    """A cancel limited to one owner takes another owner's job for one that
    does not exist and changes nothing; its own, or any without the limit,
    it cancels."""
    (ann,) = (await store.submit([spec(0)], 1.0, [ids.new()], owner="ann")).value.jobs
    (bob,) = (await store.submit([spec(1)], 1.0, [ids.new()], owner="bob")).value.jobs
    with pytest.raises(UnknownJob) as refused:
        await store.cancel(ann.id, 2.0, owner="bob")
    with pytest.raises(UnknownJob) as missing:
        await store.cancel("missing", 2.0, owner="bob")
    assert str(refused.value) == str(missing.value).replace("missing", ann.id)
    assert (await store.get(ann.id)).state is JobState.QUEUED
    job, lease = (await store.cancel(bob.id, 2.0, owner="bob")).value
    assert job.state is JobState.CANCELLED and lease is None
    job, _ = (await store.cancel(ann.id, 2.0)).value
    assert job.state is JobState.CANCELLED


@pytest_twisted.ensureDeferred
async def test_a_retry_limited_to_an_owner(store):
    """A retry limited to one owner takes another owner's job for one that
    does not exist and changes nothing, and brings back only that owner's
    dependents with its own job; without the limit, all of them."""
    (a,) = (await store.submit([spec(0)], 1.0, [ids.new()], owner="ann")).value.jobs
    (mine,) = (await store.submit([spec(1, depends_on=(a.id,))], 1.0, [ids.new()],
                                  owner="ann")).value.jobs
    (theirs,) = (await store.submit([spec(2, depends_on=(a.id,))], 1.0, [ids.new()],
                                    owner="root")).value.jobs
    (lease,) = await claim(store, "h", 1, 2.0)
    await store.finish(lease, Outcome.from_exit_code(1), 3.0)
    with pytest.raises(UnknownJob):
        await store.retry(a.id, 4.0, True, owner="bob")
    assert (await store.get(a.id)).state is JobState.FAILED
    written = await store.retry(a.id, 4.0, True, owner="ann")
    assert dict(moved(written)) == {a.id: JobState.QUEUED, mine.id: JobState.PENDING}
    assert (await store.get(theirs.id)).state is JobState.CANCELLED
    (again,) = await claim(store, "h", 1, 5.0)
    await store.finish(again, Outcome.from_exit_code(1), 6.0)
    written = await store.retry(a.id, 7.0, True)
    assert set(dict(moved(written))) == {a.id, mine.id, theirs.id}


@pytest_twisted.ensureDeferred
async def test_dependencies_limited_to_an_owner(store):
    """A submission that may name only its owner's jobs is refused a job or
    an array of another owner as one naming nothing is, and stores
    nothing; its owner's own it may name, and without the limit any."""
    (ann,) = (await store.submit([spec(0)], 1.0, [ids.new()], owner="ann")).value.jobs
    members = [spec(i, array_id="ann-array", array_index=i) for i in range(2)]
    await store.submit(members, 1.0, [ids.new(), ids.new()], owner="ann")
    before = await store.count_by_state()
    for name in (ann.id, "ann-array", "missing"):
        with pytest.raises(UnknownDependency) as refused:
            await store.submit([spec(1), spec(2, depends_on=(name,))], 1.0,
                               [ids.new(), ids.new()], owner="bob", sees_all=False)
        assert (refused.value.job_index, refused.value.position) == (1, 0)
        assert str(refused.value) == f"no job or array has the id {name!r}"
    assert await store.count_by_state() == before
    (own,) = (await store.submit([spec(3, depends_on=(ann.id, "ann-array"))], 1.0,
                                 [ids.new()], owner="ann", sees_all=False)).value.jobs
    assert "3 job(s)" in own.wait_reason
    (admin,) = (await store.submit([spec(4, depends_on=(ann.id,))], 1.0, [ids.new()],
                                   owner="root")).value.jobs
    assert admin.state is JobState.PENDING


@pytest_twisted.ensureDeferred
async def test_idempotency_keys_are_each_owners_own(store):
    """Two owners sending the same key each get their own jobs, by either
    way of submitting; a replay answers its owner's jobs alone, and another
    owner's body under the same key is no conflict."""
    key = IdempotencyKey("k", "digest-1")
    ann = await store.submit([spec(0)], 1.0, [ids.new()], key, owner="ann")
    bob = await store.submit([spec(0)], 1.0, [ids.new()], key, owner="bob")
    assert not bob.value.replayed
    assert bob.value.jobs[0].id != ann.value.jobs[0].id
    again = await store.submit([spec(0)], 2.0, [ids.new()], key, owner="bob")
    assert again.value.replayed and again.value.jobs == bob.value.jobs
    other = await store.submit([spec(1)], 2.0, [ids.new()], IdempotencyKey("k", "digest-2"),
                               owner="cy")
    assert not other.value.replayed and other.value.jobs[0].owner == "cy"
    with pytest.raises(IdempotencyConflict):
        await store.submit([spec(1)], 2.0, [ids.new()], IdempotencyKey("k", "digest-2"),
                           owner="ann")
    plain = PlainJobs([["true"]])
    plain_key = IdempotencyKey("p", "digest-3")
    first = await store.submit_plain(plain, 3.0, [ids.new()], plain_key, owner="ann")
    second = await store.submit_plain(plain, 3.0, [ids.new()], plain_key, owner="bob")
    assert isinstance(second.value, SubmittedIds) and second.value != first.value
    replay = await store.submit_plain(plain, 4.0, [ids.new()], plain_key, owner="ann")
    assert [j.id for j in replay.value.jobs] == first.value.ids
    assert (await store.count_by_state())[JobState.QUEUED] == 5


# Quotas: each owner's unfinished jobs, counted by the store.


async def _unfinished(store, owner):
    return (await store.unfinished_jobs()).get(owner, 0)


@pytest_twisted.ensureDeferred
async def test_a_submission_past_its_owners_limit_stores_nothing(store):
    """A submission that would give its owner more unfinished jobs than
    max_unfinished fails with TooManyUnfinished and stores nothing, by
    either way of submitting, each job of it counted; another owner, or no
    limit, is not held back."""
    await store.submit([spec(0), spec(1)], 1.0, [ids.new(), ids.new()], owner="ann",
                       max_unfinished=3)
    before = await store.count_by_state()
    with pytest.raises(TooManyUnfinished) as refused:
        await store.submit([spec(2), spec(3)], 1.0, [ids.new(), ids.new()], owner="ann",
                           max_unfinished=3)
    assert (refused.value.owner, refused.value.unfinished, refused.value.jobs,
            refused.value.limit) == ("ann", 2, 2, 3)
    with pytest.raises(TooManyUnfinished):
        await store.submit_plain(PlainJobs([["true"], ["true"]]), 1.0, [ids.new(), ids.new()],
                                 owner="ann", max_unfinished=3)
    assert await store.count_by_state() == before
    assert await _unfinished(store, "ann") == 2
    await store.submit_plain(PlainJobs([["true"]]), 1.0, [ids.new()], owner="ann",
                             max_unfinished=3)
    await store.submit([spec(4)] * 5, 1.0, [ids.new() for _ in range(5)], owner="bob",
                       max_unfinished=5)
    await store.submit([spec(5)] * 5, 1.0, [ids.new() for _ in range(5)], owner="ann")
    assert await store.unfinished_jobs() == {"ann": 8, "bob": 5}


@pytest_twisted.ensureDeferred
async def test_the_count_is_exact_under_concurrent_submissions(store):
    """Of many submissions of one owner asked for at once (one group, by
    either way of submitting), exactly as many as the limit allows are
    stored, and the others fail with TooManyUnfinished."""
    asked = []
    for i in range(30):
        if i % 2:
            asked.append(store.submit([spec(i)], 1.0, [ids.new()], owner="ann",
                                      max_unfinished=10))
        else:
            asked.append(store.submit_plain(PlainJobs([["true"]]), 1.0, [ids.new()],
                                            owner="ann", max_unfinished=10))
    stored = refused = 0
    for d in asked:
        try:
            await d
            stored += 1
        except TooManyUnfinished:
            refused += 1
    assert (stored, refused) == (10, 20)
    assert (await store.count_by_state())[JobState.QUEUED] == 10
    assert await _unfinished(store, "ann") == 10


@pytest_twisted.ensureDeferred
async def test_finished_jobs_leave_the_count_and_retried_ones_come_back(store):
    """A job leaves its owner's count when it succeeds, fails, is cancelled
    (and so do the dependents cancelled with it), and comes back with a
    retry, which the limit refuses like a submission."""
    jobs = [j for j in (await store.submit(
        [spec(0), spec(1), spec(2)], 1.0, [ids.new() for _ in range(3)], owner="ann",
        max_unfinished=4)).value.jobs]
    (dependent,) = (await store.submit([spec(3, depends_on=(jobs[2].id,))], 1.0,
                                       [ids.new()], owner="ann")).value.jobs
    assert await _unfinished(store, "ann") == 4
    leases = await claim(store, "h", 2, 2.0)
    await finish(store, leases[0], Outcome.from_exit_code(0), 3.0)
    await finish(store, leases[1], Outcome.from_exit_code(1), 3.0)
    assert await _unfinished(store, "ann") == 2
    await store.cancel(jobs[2].id, 4.0)
    assert (await store.get(dependent.id)).state is JobState.CANCELLED
    assert await store.unfinished_jobs() == {}
    await store.submit([spec(4), spec(5)], 5.0, [ids.new(), ids.new()], owner="ann")
    with pytest.raises(TooManyUnfinished):
        await store.retry(jobs[2].id, 6.0, True, max_unfinished=3)
    assert (await store.get(jobs[2].id)).state is JobState.CANCELLED
    await store.retry(jobs[2].id, 6.0, True, max_unfinished=4)
    assert (await store.get(dependent.id)).state is JobState.PENDING
    assert await _unfinished(store, "ann") == 4


@pytest_twisted.ensureDeferred
async def test_the_count_survives_a_reopen(make_store):
    """The count is read back from the jobs when the store opens again."""
    store = await make_store()
    await store.submit([spec(0), spec(1)], 1.0, [ids.new(), ids.new()], owner="ann")
    await store.submit_plain(PlainJobs([["true"]]), 1.0, [ids.new()], owner="bob")
    await store.submit([spec(2)], 1.0, [ids.new()])
    (lease,) = await claim(store, "h", 1, 2.0)
    await finish(store, lease, Outcome.from_exit_code(0), 3.0)
    await store.close()
    store = await make_store()
    assert await store.unfinished_jobs() == {"ann": 1, "bob": 1}


@pytest_twisted.ensureDeferred
async def test_a_dependency_named_again_is_resolved_once(store):
    """An id named many times in depends_on makes one dependency (an
    array's members, once each) and is read once."""
    array_id = ids.new()
    members = [ids.new() for _ in range(20)]
    await store.submit([spec(i, array_id=array_id, array_index=i) for i in range(20)],
                       1.0, members)
    (job,) = (await store.submit([spec(99, depends_on=(array_id,) * 500 + (members[0],))],
                                 1.0, [ids.new()])).value.jobs
    assert job.state is JobState.PENDING
    assert job.wait_reason.startswith("waiting for 20 job(s) to succeed")
    # Its members succeed: the job waits for the rest, then is queued.
    leases = await claim(store, "h", 20, 2.0)
    for lease in leases[:19]:
        await store.finish(lease, Outcome.from_exit_code(0), 3.0)
    assert (await store.get(job.id)).state is JobState.PENDING
    await store.finish(leases[19], Outcome.from_exit_code(0), 3.0)
    assert (await store.get(job.id)).state is JobState.QUEUED


@pytest_twisted.ensureDeferred
async def test_a_submission_depending_on_too_many_jobs_stores_nothing(store, monkeypatch):
    """With an entry of depends_on past MAX_DEPENDENCY_LINKS jobs in all
    (an array counting as its members, across the jobs of one submission),
    the submission fails with TooManyDependencies naming the job and the
    entry, and stores nothing."""
    monkeypatch.setattr("dispatcher.store._submissions.MAX_DEPENDENCY_LINKS", 50)
    array_id = ids.new()
    await store.submit([spec(i, array_id=array_id, array_index=i) for i in range(30)],
                       1.0, [ids.new() for _ in range(30)])
    before = await store.count_by_state()
    with pytest.raises(TooManyDependencies) as refused:
        await store.submit(
            [spec(0, depends_on=(array_id,)), spec(1, depends_on=(array_id, array_id))],
            1.0, [ids.new(), ids.new()])
    assert (refused.value.job_index, refused.value.position) == (1, 0)
    assert await store.count_by_state() == before
    (job,) = (await store.submit([spec(2, depends_on=(array_id,) * 3)], 1.0,
                                 [ids.new()])).value.jobs
    assert job.state is JobState.PENDING


# Arrays and batches (issue 17)

ARRAY, BATCH = GroupKind.ARRAY, GroupKind.BATCH


def members(array_id, count, **kw):
    """The specs of an array of C{count} members."""
    return [spec(i, array_id=array_id, array_index=i, **kw) for i in range(count)]


@pytest_twisted.ensureDeferred
async def test_a_group_counts_its_members_by_state(store):
    """An array and a batch are read with their owner, creation time and
    every state's count of members, as their members change; an id no job
    carries is UnknownGroup, an array's id is no batch's."""
    array_id, batch_id = ids.new(), ids.new()
    written = await store.submit(
        members(array_id, 3, batch_id=batch_id) + [spec(9, batch_id=batch_id)], 50.0,
        [ids.new() for _ in range(4)], owner="ann")
    group = await store.group(ARRAY, array_id)
    assert isinstance(group, JobGroup)
    assert (group.id, group.kind, group.owner, group.created_at) == (array_id, ARRAY, "ann", 50.0)
    assert group.counts == {**{s: 0 for s in JobState}, JobState.QUEUED: 3}
    assert (group.size, group.finished, group.final, group.succeeded) == (3, 0, False, False)
    batch = await store.group(BATCH, batch_id)
    assert batch.size == 4 and batch.owner == "ann"
    (lease,) = await claim(store, "h", 1, 51.0)
    await finish(store, lease, Outcome(JobState.SUCCEEDED, 0), 52.0)
    group = await store.group(ARRAY, array_id)
    assert group.counts[JobState.SUCCEEDED] == 1 and group.counts[JobState.QUEUED] == 2
    assert group.finished == 1
    assert sorted(await store.unfinished_members(ARRAY, array_id)) == sorted(
        j.id for j in written.value.jobs[1:3])
    for kind, missing in [(ARRAY, "nothing"), (BATCH, array_id), (ARRAY, batch_id)]:
        with pytest.raises(UnknownGroup):
            await store.group(kind, missing)
    assert await store.unfinished_members(ARRAY, "nothing") == []


@pytest_twisted.ensureDeferred
async def test_plain_jobs_carry_their_batch_id(store):
    """Plain jobs stored with a batch id show it, and are a batch."""
    batch_id = ids.new()
    made = [ids.new(), ids.new()]
    await store.submit_plain(PlainJobs([["true"], ["false"]], batch_id=batch_id), 7.0, made)
    assert [(await store.get(i)).spec.batch_id for i in made] == [batch_id, batch_id]
    assert (await store.group(BATCH, batch_id)).size == 2
    await store.submit_plain(PlainJobs([["true"]]), 8.0, [ids.new()])
    page, _ = await store.list_jobs(batch=batch_id)
    assert [j.id for j in page] == made


@pytest_twisted.ensureDeferred
async def test_a_batch_is_its_members_alone_whatever_is_numbered_among_them(store):
    """A batch's members are the jobs that carry its id, though jobs of
    other requests were stored between two writes of it: its counts, its
    listing (both orders, by cursor) and its cancel see them alone, and a
    plain write and a full one add to the same batch."""
    batch_id = ids.new()
    first = (await store.submit([spec(0, batch_id=batch_id)], 1.0, [ids.new()])).value.jobs
    between = await submit(store, spec(1), spec(2, batch_id=ids.new()))
    plain = [ids.new(), ids.new()]
    await store.submit_plain(PlainJobs([["true"], ["false"]], batch_id=batch_id), 2.0, plain)
    after = await submit(store, spec(3))
    members = [first[0].id, *plain]
    assert (await store.group(BATCH, batch_id)).size == 3
    page, cursor = await store.list_jobs(batch=batch_id, limit=2)
    assert [j.id for j in page] == members[:2] and cursor is not None
    rest, end = await store.list_jobs(batch=batch_id, limit=2, cursor=cursor)
    assert [j.id for j in rest] == members[2:] and end is None
    newest, _ = await store.list_jobs(batch=batch_id, newest=True)
    assert [j.id for j in newest] == members[::-1]
    listed, _ = await store.list_jobs(batch=batch_id, states=(JobState.QUEUED,))
    assert [j.id for j in listed] == members
    assert sorted(await store.unfinished_members(BATCH, batch_id)) == sorted(members)
    written = await store.cancel_group(BATCH, batch_id, 3.0)
    assert sorted(moved(written)) == sorted((j, JobState.CANCELLED) for j in members)
    for job in [*between, *after]:
        assert (await store.get(job.id)).state is JobState.QUEUED


@pytest_twisted.ensureDeferred
async def test_a_group_cancel_is_one_write(store):
    """Cancelling a group cancels its pending and queued members at once
    (and their dependents outside it), asks the holders of its running ones
    to stop them (their leases are the answer), and leaves its finished
    ones; a second cancel of a group all final changes nothing; another
    owner's group is unknown to a cancel limited to an owner."""
    array_id = ids.new()
    jobs = await submit(store, *members(array_id, 4))
    outside = (await submit(store, spec(8, depends_on=(array_id,))))[0]
    (lease,) = await claim(store, "h", 1, 101.0)
    assert lease.job_id == jobs[0].id
    with pytest.raises(UnknownGroup):
        await store.cancel_group(ARRAY, array_id, 102.0, owner="bob")
    written = await store.cancel_group(ARRAY, array_id, 102.0)
    group, leases = written.value
    assert [l.job_id for l in leases] == [jobs[0].id]
    assert group.counts[JobState.CANCELLED] == 3 and group.counts[JobState.RUNNING] == 1
    assert set(moved(written)) == {
        *((j.id, JobState.CANCELLED) for j in jobs[1:]), (outside.id, JobState.CANCELLED)}
    assert (await store.get(outside.id)).state is JobState.CANCELLED
    await finish(store, lease, Outcome(JobState.FAILED, 1, stopped=True), 103.0)
    assert (await store.group(ARRAY, array_id)).counts[JobState.CANCELLED] == 4
    with pytest.raises(NothingToChange):
        await store.cancel_group(ARRAY, array_id, 104.0)


@pytest_twisted.ensureDeferred
async def test_a_group_retry_brings_back_every_failed_or_cancelled_member(store):
    """Retrying a batch puts its failed and cancelled members back in line
    in one write (a member waiting on another that comes back is pending),
    leaves its succeeded ones, is refused with nothing changed past the
    owner's limit (every member coming back counted) and when no member can
    come back, and a retry limited to an owner sees only its groups."""
    batch_id = ids.new()
    first = (await store.submit([spec(0, batch_id=batch_id)], 1.0, [ids.new()],
                                owner="ann")).value.jobs[0]
    later = await store.submit(
        [spec(1, batch_id=batch_id, depends_on=(first.id,)), spec(2, batch_id=batch_id)],
        1.0, [ids.new(), ids.new()], owner="ann")
    dependent, third = later.value.jobs
    leases = await claim(store, "h", 2, 2.0)
    by_id = {l.job_id: l for l in leases}
    await finish(store, by_id[first.id], Outcome(JobState.FAILED, 1), 3.0)
    await finish(store, by_id[third.id], Outcome(JobState.SUCCEEDED, 0), 3.0)
    assert (await store.get(dependent.id)).state is JobState.CANCELLED
    with pytest.raises(TooManyUnfinished):
        await store.retry_group(BATCH, batch_id, 4.0, max_unfinished=1)
    assert (await store.get(first.id)).state is JobState.FAILED
    with pytest.raises(UnknownGroup):
        await store.retry_group(BATCH, batch_id, 4.0, owner="bob")
    written = await store.retry_group(BATCH, batch_id, 4.0, owner="ann", max_unfinished=2)
    group = written.value
    assert group.counts[JobState.QUEUED] == 1 and group.counts[JobState.PENDING] == 1
    assert group.counts[JobState.SUCCEEDED] == 1
    assert dict(moved(written)) == {first.id: JobState.QUEUED, dependent.id: JobState.PENDING}
    assert (await store.get(first.id)).attempts[0].number == 1
    with pytest.raises(NothingToChange):
        await store.retry_group(BATCH, batch_id, 5.0)
    assert await _unfinished(store, "ann") == 2


@pytest_twisted.ensureDeferred
async def test_list_jobs_filters_of_issue_17(store):
    """The list filters by any of several states, array, batch, exact name,
    queue, the holder of the latest attempt and creation time, each alone
    and together, newest first with a cursor that goes on that way."""
    array_id, batch_id = ids.new(), ids.new()
    arr = await submit(store, *members(array_id, 3), now=10.0)
    named = (await store.submit([spec(5, name="nightly", batch_id=batch_id),
                                 spec(6, name="other", batch_id=batch_id)],
                                20.0, [ids.new(), ids.new()])).value.jobs
    (lease,) = await claim(store, "worker-1", 1, 21.0)
    assert lease.job_id == arr[0].id
    await finish(store, lease, Outcome(JobState.FAILED, 1), 22.0)
    everyone = [*arr, *named]

    async def listed(**kw):
        page, cursor = await store.list_jobs(**kw)
        return [j.id for j in page]

    assert await listed(array=array_id) == [j.id for j in arr]
    assert await listed(batch=batch_id) == [j.id for j in named]
    assert await listed(name="nightly") == [named[0].id]
    assert await listed(name="nope") == []
    assert await listed(states=[JobState.FAILED, JobState.QUEUED]) == [j.id for j in everyone]
    assert await listed(states=[JobState.FAILED]) == [arr[0].id]
    assert await listed(states=[JobState.QUEUED], array=array_id) == [arr[1].id, arr[2].id]
    assert await listed(queue="default", name="other") == [named[1].id]
    assert await listed(queue="elsewhere") == []
    assert await listed(worker="worker-1") == [arr[0].id]
    assert await listed(worker="worker-2", array=array_id) == []
    assert await listed(created_after=15.0) == [j.id for j in named]
    assert await listed(created_before=15.0, states=[JobState.QUEUED]) == [
        arr[1].id, arr[2].id]
    assert await listed(created_after=10.0, created_before=20.0) == []
    assert await listed(newest=True) == [j.id for j in reversed(everyone)]
    page, cursor = await store.list_jobs(newest=True, limit=2)
    assert [j.id for j in page] == [named[1].id, named[0].id]
    page, cursor = await store.list_jobs(newest=True, limit=2, cursor=cursor)
    assert [j.id for j in page] == [arr[2].id, arr[1].id] and cursor is not None
    page, cursor = await store.list_jobs(newest=True, limit=2, cursor=cursor)
    assert [j.id for j in page] == [arr[0].id] and cursor is None


@pytest_twisted.ensureDeferred
async def test_a_page_examines_a_bounded_number_of_jobs(store):
    """A page reads at most its bound of jobs along the index it chose: a
    filter that matches little ends pages short, even empty, with a cursor
    that goes on, and following the cursors finds every match once, either
    way."""
    jobs = await submit(store, *[spec(i, name="n" if i in (1, 7) else None)
                                 for i in range(10)])
    found, cursor, pages = [], None, 0
    while True:
        page, cursor = await store.list_jobs(
            queue="default", labels=[], created_after=0.0, limit=5, cursor=cursor,
            examine=3, name=None, states=[], worker=None)
        pages += 1
        found += [j.id for j in page]
        if cursor is None:
            break
    # Three jobs a page at most, though the limit is five.
    assert found == [j.id for j in jobs] and pages == 4
    found, cursor, pages = [], None, 0
    while True:
        page, cursor = await store.list_jobs(created_before=0.0, examine=3, cursor=cursor)
        assert page == []
        pages += 1
        if cursor is None:
            break
    assert pages == 4
    for newest in (False, True):
        found, cursor = [], None
        while True:
            page, cursor = await store.list_jobs(
                name="n", states=[JobState.QUEUED, JobState.PENDING], examine=1, limit=1,
                cursor=cursor, newest=newest)
            found += [j.id for j in page]
            if cursor is None:
                break
        expected = [jobs[1].id, jobs[7].id]
        assert found == (expected[::-1] if newest else expected)


# The webhook outbox

# Every delivery is due at once until a try puts it later: read "now" as
# any time at all.
LATER = 10.0**12


def notified(i=0, *states, url="https://example.com/hook?k=a b", **kw):
    """A command job whose webhook names C{states} (by default the final
    ones)."""
    from dispatcher.model._jobs import Notify

    notify = Notify(url) if not states else Notify(url, frozenset(states))
    return spec(i, notify=notify, **kw)


@pytest_twisted.ensureDeferred
async def test_a_job_with_notify_shows_it(store):
    """A job's notify is stored with its spec and read back as given,
    its URL whole (a space and a query included)."""
    (job,) = await submit(store, notified(1, JobState.QUEUED, JobState.FAILED))
    got = await store.get(job.id)
    assert got.spec.notify.url == "https://example.com/hook?k=a b"
    assert got.spec.notify.events == {JobState.QUEUED, JobState.FAILED}
    assert (await store.get((await submit(store, spec(2)))[0].id)).spec.notify is None


@pytest_twisted.ensureDeferred
async def test_each_change_to_a_named_state_writes_one_delivery(store):
    """A delivery is written for each change of a job's state that its
    notify names, its making included, with the state before it and the
    job's fields as they were; a job without notify, and states not
    named, write none."""
    (job,) = await submit(
        store,
        notified(1, JobState.QUEUED, JobState.RUNNING, JobState.FAILED),
    )
    await submit(store, spec(2))
    (lease,) = await claim(store, "h", 1, 200.0)
    await finish(store, lease, Outcome(JobState.FAILED, exit_code=3, error="exited with code 3"),
                 300.0)
    due = await store.due_deliveries(LATER, 10)
    assert [(d.job_id, d.state, d.previous) for d in due] == [
        (job.id, JobState.QUEUED, None),
        (job.id, JobState.RUNNING, JobState.QUEUED),
        (job.id, JobState.FAILED, JobState.RUNNING),
    ]
    assert [(d.attempt, d.exit_code, d.error) for d in due] == [
        (None, None, None), (1, None, None), (1, 3, "exited with code 3")
    ]
    assert {(d.url, d.queue, d.tries) for d in due} == {
        ("https://example.com/hook?k=a b", "default", 0)
    }
    assert due[0].id < due[1].id < due[2].id


@pytest_twisted.ensureDeferred
async def test_the_default_states_are_the_final_ones(store):
    """Without states named, only the final state is delivered, however it
    is reached: a cancel before the job ran, or a dependency's failure."""
    (first,) = await submit(store, notified(1))
    (third,) = await submit(store, spec(3))
    (dependent,) = await submit(store, notified(4, depends_on=(third.id,)))
    await store.cancel(first.id, 150.0)
    leases = await claim(store, "h", 5, 200.0)
    lease = next(l for l in leases if l.job_id == third.id)
    await finish(store, lease, Outcome(JobState.FAILED, exit_code=1), 300.0)
    due = await store.due_deliveries(LATER, 10)
    assert [(d.job_id, d.state) for d in due] == [
        (first.id, JobState.CANCELLED),
        (dependent.id, JobState.CANCELLED),
    ]
    assert due[1].previous is JobState.PENDING


@pytest_twisted.ensureDeferred
async def test_a_failed_write_writes_no_delivery(store):
    """A write that fails (here a finish with a stale lease) writes no
    delivery: it is made with the change or not at all."""
    (job,) = await submit(store, notified(1, JobState.SUCCEEDED))
    (lease,) = await claim(store, "h", 1, 200.0)
    stale = attrs.evolve(lease, token=lease.token + 100)
    with pytest.raises(StaleLease):
        await store.finish(stale, Outcome(JobState.SUCCEEDED, exit_code=0), 300.0)
    assert await store.due_deliveries(LATER, 10) == []
    await store.finish(lease, Outcome(JobState.SUCCEEDED, exit_code=0), 300.0)
    assert [d.state for d in await store.due_deliveries(LATER, 10)] == [JobState.SUCCEEDED]


@pytest_twisted.ensureDeferred
async def test_recorded_deliveries_go_or_wait(store):
    """A delivery recorded done is gone; one put later has a try counted
    and is not due before its time, and comes after those due sooner."""
    jobs = await submit(store, notified(1, JobState.QUEUED), notified(2, JobState.QUEUED),
                        notified(3, JobState.QUEUED))
    first, second, third = await store.due_deliveries(LATER, 10)
    assert [d.job_id for d in (first, second, third)] == [j.id for j in jobs]
    await store.record_deliveries([first.id], [(second.id, 500.0)])
    assert [d.id for d in await store.due_deliveries(499.0, 10)] == [third.id]
    due = await store.due_deliveries(500.0, 10)
    assert [(d.id, d.tries) for d in due] == [(third.id, 0), (second.id, 1)]
    assert [d.id for d in await store.due_deliveries(500.0, 1)] == [third.id]
    # An id no longer there is passed over.
    await store.record_deliveries([first.id], [(first.id, 600.0)])
    assert len(await store.due_deliveries(LATER, 10)) == 2


@pytest_twisted.ensureDeferred
async def test_deliveries_survive_a_reopen_and_go_with_their_job(make_store):
    """The outbox is durable (a reopened store still holds its
    deliveries); a removed job's deliveries are removed with it; and an
    id is never given twice, even after the newest delivery is gone."""
    first = await make_store()
    (job,) = await submit(first, notified(1))
    await first.cancel(job.id, 150.0)
    (kept,) = await first.due_deliveries(LATER, 10)
    await first.close()
    again = await make_store()
    assert [d.id for d in await again.due_deliveries(LATER, 10)] == [kept.id]
    await again.remove(job.id, 200.0)
    assert await again.due_deliveries(LATER, 10) == []
    (other,) = await submit(again, notified(2))
    await again.cancel(other.id, 250.0)
    (made,) = await again.due_deliveries(LATER, 10)
    assert made.id > kept.id


@pytest_twisted.ensureDeferred
async def test_a_delivery_carries_the_jobs_array_and_batch(store):
    """A delivery tells which array and batch its job belongs to, and its
    name and owner, as the job's row has them."""
    written = await store.submit(
        [notified(1, JobState.QUEUED, name="member", array_id="arr-1", array_index=0,
                  batch_id="batch-1")],
        100.0, [ids.new()], owner="alice",
    )
    (job,) = written.value.jobs
    (delivery,) = await store.due_deliveries(LATER, 10)
    assert (delivery.job_id, delivery.name, delivery.owner, delivery.array_id,
            delivery.batch_id) == (job.id, "member", "alice", "arr-1", "batch-1")


@pytest_twisted.ensureDeferred
async def test_a_plain_batchs_events_are_one_row_read_as_one_event_a_job(store):
    """A plain batch's events are read back one event a job (stored as one
    row), numbered in order: from its first id, from the middle of it
    (a page that begins or ends inside it), with the ids after it going on
    from its last; a job removed since is read without owner or spec;
    removing old events takes the row whole and counts its events."""
    (first,) = [job.id for job in await submit(store, spec(0), now=1.0)]
    made = [ids.new() for _ in range(5)]
    jobs = PlainJobs([["true", str(i)] for i in range(5)], batch_id="b-1")
    await store.submit_plain(jobs, 2.0, made, owner="ann")
    (last,) = [job.id for job in await submit(store, spec(1), now=3.0)]
    page = await store.read_events(0, 100)
    assert (page.oldest, page.newest) == (1, 7)
    assert [(e.id, e.job_id) for e in page.events] == list(enumerate([first, *made, last], 1))
    shown = JobSpec(queue="default", batch_id="b-1")
    assert page.events[1:6] == [
        JobEvent(job_id, JobState.QUEUED, None, n, 2.0, owner="ann", spec=shown)
        for n, job_id in enumerate(made, 2)]
    # Pages that begin and end inside the batch's row.
    assert [e.id for e in (await store.read_events(2, 2)).events] == [3, 4]
    assert [e.id for e in (await store.read_events(5, 10)).events] == [6, 7]
    assert [e.id for e in (await store.read_events(1, 1)).events] == [2]
    assert [e.id for e in (await store.read_events(7, 10)).events] == []
    # The greatest id a client may name: nothing after it, and no error.
    page = await store.read_events(2**63 - 1, 10)
    assert (page.events, page.oldest, page.newest) == ([], 1, 7)
    # A job of the batch cancelled and removed: its event 8, then read
    # without what its row said.
    await store.cancel(made[2], 4.0)
    await store.remove(made[2], 4.5)
    page = await store.read_events(3, 2)
    assert [(e.id, e.job_id, e.owner, e.spec) for e in page.events] == [
        (4, made[2], None, None), (5, made[3], "ann", shown)]
    assert (await store.read_events(0, 100)).newest == 8
    # Removing what is older than 2.5 takes the first job's row and the
    # batch's whole: six events.
    removed = (await store.remove_events(2.5, 100)).value
    assert (removed.removed, removed.done) == (6, True)
    page = await store.read_events(0, 100)
    assert page.oldest == 7 and [e.id for e in page.events] == [7, 8]
