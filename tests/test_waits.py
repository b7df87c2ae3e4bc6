"""
Waiting requests (dispatcher.core._waits) against a real store, with a
Clock for their time: woken by the job events, answered at their end,
bounded in number, freed when cancelled, ended by a stop.
"""

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock

from dispatcher.core._events import JobEvent, JobEvents
from dispatcher.core._waits import Waits
from dispatcher.model._groups import GroupKind, TooManyWaits
from dispatcher.model._jobs import JobIds, JobSpec, JobState, StoreClosed
from dispatcher.store._sqlite import SQLiteJobStore

from .conftest import until

ids = JobIds()


@pytest.fixture
def store(tmp_path):
    s = SQLiteJobStore(str(tmp_path / "waits.sqlite3"), reactor)
    pytest_twisted.blockon(s.open())
    yield s
    pytest_twisted.blockon(s.close())


def publish(events, written):
    """Tell the events what a write changed, as the store's commit does."""
    for change in written.changed:
        events.publish(JobEvent(change[0], change[1]))


@pytest_twisted.ensureDeferred
async def test_a_job_wait_is_woken_by_its_end(store):
    """A wait for a queued job answers once its cancel is published, with
    the job as stored, and then holds nothing (no subscription either)."""
    events, clock = JobEvents(), Clock()
    waits = Waits(events, store, clock, limit=5)
    (job,) = (await store.submit([JobSpec(command=("true",))], 1.0, [ids.new()])).value.jobs
    d = Deferred.fromCoroutine(waits.job(job.id, 60))
    # Registered, read, and waiting on its timer.
    await until(lambda: clock.getDelayedCalls())
    assert events._subscribers and not d.called
    publish(events, await store.cancel(job.id, 2.0))
    answered = await d
    assert answered.state is JobState.CANCELLED
    assert waits.waiting == 0 and waits._jobs == {} and events._subscribers == []
    assert clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_a_wait_answers_at_its_end_and_frees_its_place(store):
    """A wait whose job does not end answers as the job is when its time
    is up (on the clock); past the limit a wait is refused at once; a
    cancelled wait (its client left) frees its place and its timer."""
    events, clock = JobEvents(), Clock()
    waits = Waits(events, store, clock, limit=1)
    (job,) = (await store.submit([JobSpec(command=("true",))], 1.0, [ids.new()])).value.jobs
    d = Deferred.fromCoroutine(waits.job(job.id, 30))
    await until(lambda: clock.getDelayedCalls())
    with pytest.raises(TooManyWaits):
        await waits.job(job.id, 30)
    clock.advance(30)
    assert (await d).state is JobState.QUEUED
    d = Deferred.fromCoroutine(waits.job(job.id, 30))
    await until(lambda: clock.getDelayedCalls())
    d.cancel()
    with pytest.raises(CancelledError):
        await d
    assert waits.waiting == 0 and clock.getDelayedCalls() == []
    d = Deferred.fromCoroutine(waits.job(job.id, 30))
    await until(lambda: clock.getDelayedCalls())
    waits.stop()
    with pytest.raises(StoreClosed):
        await d
    with pytest.raises(StoreClosed):
        await waits.job(job.id, 30)


@pytest_twisted.ensureDeferred
async def test_a_group_wait_answers_once_every_member_is_final(store):
    """A wait for an array is not answered while a member is unfinished,
    and is once the last member's end is published; two waits on it share
    one watch of its members."""
    events, clock = JobEvents(), Clock()
    waits = Waits(events, store, clock)
    array_id = ids.new()
    jobs = (await store.submit(
        [JobSpec(command=("true",), array_id=array_id, array_index=i) for i in range(3)],
        1.0, [ids.new() for _ in range(3)])).value.jobs
    first = Deferred.fromCoroutine(waits.group(GroupKind.ARRAY, array_id, 60))
    second = Deferred.fromCoroutine(waits.group(GroupKind.ARRAY, array_id, 60))
    await until(lambda: len(waits._members) == 3 and len(clock.getDelayedCalls()) == 2)
    assert len(waits._groups) == 1
    for job in jobs[:2]:
        publish(events, await store.cancel(job.id, 2.0))
    assert not first.called and not second.called
    publish(events, await store.cancel(jobs[2].id, 2.0))
    for d in (first, second):
        group = await d
        assert group.final and group.counts[JobState.CANCELLED] == 3
    assert waits._groups == {} and waits._members == {} and waits.waiting == 0
