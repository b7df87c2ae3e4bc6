"""
The scheduler's decisions, with a Clock and no I/O, and the event stream.
"""

from twisted.internet.task import Clock

from dispatcher.core._events import JobEvent, JobEvents
from dispatcher.model._jobs import JobState
from dispatcher.core._scheduler import Claim, Scheduler


def test_claims_meet_queued_jobs_and_free_slots():
    """A claim asks for as many jobs as are both queued and free, at the
    clock's time, and reserves them."""
    clock = Clock()
    clock.advance(42)
    s = Scheduler(clock)
    assert s.next_claims() == []
    s.add_holder("h", 3)
    assert s.next_claims() == []
    s.jobs_queued(5)
    assert s.next_claims() == [Claim("h", 3, 42.0)]
    assert s.next_claims() == []  # reserved: nothing free
    assert s.queued == 2


def test_short_claim_empties_the_estimate():
    """A claim that comes back short returns the unused slots and sets the queue
    estimate to zero; later events count up from there."""
    s = Scheduler(Clock())
    s.add_holder("h", 4)
    s.jobs_queued(4)
    (claim,) = s.next_claims()
    s.claimed(claim, 1)
    assert s.free("h") == 3 and s.queued == 0
    s.jobs_queued(1)
    assert s.next_claims() == [Claim("h", 1, 0.0)]


def test_drained_claim_empties_the_estimate():
    """A claim that got all it asked for but saw the queue end sets the
    estimate (counted high, say twice for the same jobs) to zero; one that
    did not see the end leaves it."""
    s = Scheduler(Clock())
    s.add_holder("h", 4)
    s.jobs_queued(2)
    (claim,) = s.next_claims()
    s.jobs_queued(2)
    s.claimed(claim, 2)
    assert s.queued == 2
    s.slots_freed("h", 2)
    (claim,) = s.next_claims()
    s.jobs_queued(1)
    s.claimed(claim, 2, drained=True)
    assert s.queued == 0 and s.next_claims() == []


def test_failed_claim_returns_everything():
    """A claim that failed gives back its slots and its jobs."""
    s = Scheduler(Clock())
    s.add_holder("h", 2)
    s.jobs_queued(2)
    (claim,) = s.next_claims()
    s.claim_failed(claim)
    assert s.free("h") == 2 and s.queued == 2


def test_slots_freed_and_removed_holder():
    """Freed slots are claimable again; a removed holder gets no claims."""
    s = Scheduler(Clock())
    s.add_holder("a", 1)
    s.jobs_queued(3)
    (claim,) = s.next_claims()
    s.claimed(claim, 1)
    s.slots_freed("a")
    assert s.next_claims() == [Claim("a", 1, 0.0)]
    s.remove_holder("a")
    s.slots_freed("a")
    assert s.next_claims() == []


def test_several_holders_share_the_queue():
    """Queued jobs are spread over holders with free slots, never more than
    are queued."""
    s = Scheduler(Clock())
    s.add_holder("a", 2)
    s.add_holder("b", 2)
    s.jobs_queued(3)
    claims = s.next_claims()
    assert sum(c.count for c in claims) == 3
    assert {c.holder for c in claims} == {"a", "b"}


def test_events_reach_subscribers_in_order():
    """Every subscriber gets every event after it subscribed; one that raises
    does not stop the others; unsubscribing ends it."""
    events = JobEvents()
    seen = []
    events.subscribe(lambda e: 1 / 0)
    stop = events.subscribe(seen.append)
    first = JobEvent("a", JobState.QUEUED)
    events.publish(first)
    stop()
    events.publish(JobEvent("b", JobState.RUNNING))
    assert seen == [first]
