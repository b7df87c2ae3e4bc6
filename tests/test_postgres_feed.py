"""
Several PostgreSQL stores on one database hear each other
(dispatcher/store/_pg_events.py): each publishes every committed event
once, in id order, whoever committed it; a notification wakes the others
at once, and the polls alone (no notifications, or the listening
connection killed) still bring every event.  Real PostgreSQL, a database
for each test (tests/postgres.py), the real reactor.
"""

import time

import psycopg
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import Clock, deferLater

from dispatcher.model._events import SameChange, WorkerEvent
from dispatcher.model._jobs import JobIds, JobSpec, JobState, Offer, Outcome, PlainJobs
from dispatcher.store._events import EventPage
from dispatcher.store._pg_events import EventFeed
from dispatcher.store._postgres import PostgresJobStore
from tests.postgres import Databases
from tests.store_contract import no_jitter

ids = JobIds()


@pytest.fixture
def databases():
    """Databases of the test's own, dropped at teardown."""
    made = Databases()
    yield made
    made.drop()


class Heard:
    """What one store published: its own events and the others', in the
    order it published them (ids), and which came from whom."""

    def __init__(self, store):
        self.ids = []
        self.own = []
        self.others = []
        store.follow_events(self._own)
        store.follow_others(self._others)

    @staticmethod
    def _ids(events):
        if type(events) is SameChange:
            return list(range(events.first_id, events.first_id + len(events)))
        return [event.id for event in events]

    def _own(self, events):
        found = self._ids(events)
        self.ids.extend(found)
        self.own.extend(found)

    def _others(self, events):
        found = self._ids(events)
        self.ids.extend(found)
        self.others.extend(events)


@pytest.fixture
def stores():
    """Open PostgreSQL stores, each with what it published; all closed at
    teardown."""
    made = []

    async def open_store(url, **options):
        options.setdefault("backoff", no_jitter)
        store = PostgresJobStore(url, reactor, **options)
        heard = Heard(store)
        made.append(store)
        await store.open()
        return store, heard

    yield open_store
    for store in made:
        pytest_twisted.blockon(store.close())


async def until(condition, timeout=10.0, what="the condition"):
    """Let the reactor run until condition() is true; fail after timeout."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not come within {timeout} s")
        await deferLater(reactor, 0.01, lambda: None)


def newest(url):
    with psycopg.connect(url, autocommit=True) as conn:
        (found,) = conn.execute(
            "SELECT COALESCE(MAX(id + COALESCE(jobs, 1) - 1), 0) FROM events"
        ).fetchone()
    return found


async def submit(store, *specs, now=100.0):
    written = await store.submit(list(specs), now, [ids.new() for _ in specs])
    return written.value.jobs


def listener_backends(url):
    with psycopg.connect(url, autocommit=True) as conn:
        return [pid for (pid,) in conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name = 'dispatcher store listener'"
        )]


@pytest_twisted.ensureDeferred
async def test_a_notification_brings_another_stores_events_at_once(databases, stores):
    """A store hears the jobs another store queued, with their owner and
    queue, as soon as they commit: by the notification (its polls are a
    minute apart), with one read of the store however many jobs the other
    group held."""
    url = databases.url("db")
    a, _ = await stores(url, poll_interval=60.0)
    b, heard = await stores(url, poll_interval=60.0)
    await until(lambda: b.feed.listener.connections == 1, what="the listener")
    await until(lambda: b.feed.reads >= 1 and not b.feed._reading, what="the first read")
    reads = b.feed.reads
    started = time.monotonic()
    jobs = await submit(a, *[JobSpec(command=("true",), queue="default")] * 3)
    await until(lambda: len(heard.others) == 3, what="the other store's events")
    assert time.monotonic() - started < 2.0
    assert [e.job_id for e in heard.others] == [job.id for job in jobs]
    assert {e.state for e in heard.others} == {JobState.QUEUED}
    assert {e.spec.queue for e in heard.others} == {"default"}
    assert heard.own == []
    assert b.feed.reads == reads + 1
    assert heard.ids == list(range(1, newest(url) + 1))


@pytest_twisted.ensureDeferred
async def test_the_polls_alone_bring_the_events_without_notifications(databases, stores):
    """With notifications off, a store still hears another's commits, at
    its next poll: nothing is stranded."""
    url = databases.url("db")
    a, _ = await stores(url, notify=False, poll_interval=0.2)
    b, heard = await stores(url, notify=False, poll_interval=0.2)
    assert b.feed.listener is None
    (job,) = await submit(a, JobSpec(command=("true",)))
    await until(lambda: len(heard.others) == 1, what="the polled events")
    assert heard.others[0].job_id == job.id
    assert listener_backends(url) == []


@pytest_twisted.ensureDeferred
async def test_a_killed_listening_connection_is_made_again(databases, stores):
    """The listening connection killed by the server (pg_terminate_backend)
    is made again, and the commits made while it was away and after are
    heard, though the polls are a minute apart."""
    url = databases.url("db")
    a, _ = await stores(url, poll_interval=60.0)
    b, heard = await stores(url, poll_interval=60.0)
    await until(lambda: b.feed.listener.connections == 1, what="the listener")
    await until(lambda: a.feed.listener.connections == 1, what="the listener")
    # Both stores listen: both connections are killed.
    pids = listener_backends(url)
    assert len(pids) == 2
    with psycopg.connect(url, autocommit=True) as conn:
        for pid in pids:
            conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
    # Committed while no one may be listening.
    (first,) = await submit(a, JobSpec(command=("true",)))
    await until(lambda: b.feed.listener.connections == 2, what="a new listening connection")
    await until(lambda: len(heard.others) == 1, what="the event made meanwhile")
    (second,) = await submit(a, JobSpec(command=("true",)))
    await until(lambda: len(heard.others) == 2, what="the event made after")
    assert [e.job_id for e in heard.others] == [first.id, second.id]


@pytest_twisted.ensureDeferred
async def test_every_store_publishes_every_event_once_in_id_order(databases, stores):
    """Two stores writing at once (submissions, batches, claims, ends,
    cancels) each publish every committed event exactly once, in id order
    with no gap, their own and the other's interleaved as they were
    numbered; whether heard by notification or read inside a group."""
    url = databases.url("db")
    a, heard_a = await stores(url, poll_interval=0.5)
    b, heard_b = await stores(url, poll_interval=0.5)
    offer_a = Offer("holder-a", 64)
    offer_b = Offer("holder-b", 64)

    async def work(store, offer, rounds):
        for i in range(rounds):
            jobs = await submit(store, JobSpec(command=("true",)),
                                JobSpec(command=("false",), not_before=1e9))
            await store.submit_plain(
                PlainJobs([["true"]] * 3), 100.0, ids.new_many(3))
            claimed = await store.claim(offer, 2, 101.0, 300.0)
            for lease in claimed.leases:
                await store.finish(lease, Outcome(JobState.SUCCEEDED, exit_code=0), 103.0)
            await store.cancel(jobs[1].id, 104.0)

    await gatherResults([
        Deferred.fromCoroutine(work(a, offer_a, 15)),
        Deferred.fromCoroutine(work(b, offer_b, 15)),
    ])
    top = newest(url)
    await until(lambda: heard_a.ids[-1:] == [top] and heard_b.ids[-1:] == [top],
                what="every event")
    for heard in (heard_a, heard_b):
        assert heard.ids == list(range(1, top + 1))
        assert heard.own and heard.others
    # Groups that read the other's events numbered before their own did.
    assert a._writer.foreign_reads + b._writer.foreign_reads > 0
    # Each store's own events are the other's others.
    assert sorted(heard_a.own) == sorted(e.id for e in heard_b.others)
    assert sorted(heard_b.own) == sorted(e.id for e in heard_a.others)


def worker_event(number):
    return WorkerEvent(number, 1.0, "w", "connected")


def test_a_read_that_comes_back_during_a_group_waits_for_its_answers():
    """The feed's read of the others' events that comes back while a group
    of the store's own is in flight (it may hold that group's events) is
    published only after the group's own, less what they published; a
    notification of what is published already reads nothing, and the
    polls read on the clock.  (No database: the feed alone.)"""
    reads = []

    def read(after, limit):
        d = Deferred()
        reads.append((after, d))
        return d

    clock = Clock()
    feed = EventFeed(read, clock, 1.0)
    published = []
    feed.own = lambda events: published.append(("own", [e.id for e in events]))
    feed.others = lambda events: published.append(("others", [e.id for e in events]))
    feed.start(10, None)
    feed.heard(12)
    assert [after for after, _ in reads] == [10]
    feed.group_starting()
    # Read while the group committed 13 and 14 and before its answers.
    reads[0][1].callback(EventPage([worker_event(n) for n in (11, 12, 13, 14)], 1, 14))
    assert published == []
    # The group read 11 and 12 inside its transaction: published first.
    feed.publish([worker_event(11), worker_event(12)])
    feed.committed([worker_event(13), worker_event(14)])
    feed.group_answered()
    assert published == [("others", [11, 12]), ("own", [13, 14])]
    feed.heard(14)
    assert len(reads) == 1
    clock.advance(1.0)
    assert [after for after, _ in reads] == [10, 14]
    reads[1][1].callback(EventPage([worker_event(15)], 1, 15))
    assert published[-1] == ("others", [15])
    assert feed.delivered == 15
    feed.stop()
    assert clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_a_store_notifies_only_while_another_listens(databases, stores):
    """A store that found no other dispatcher listening at its last poll
    sends no notification with its commits; one that starts listening
    says so, and the store notifies again at once."""
    url = databases.url("db")
    probe = psycopg.connect(url, autocommit=True, application_name="probe")
    try:
        probe.execute("LISTEN dispatcher_events")
        a, _ = await stores(url, poll_interval=0.1)
        await until(lambda: not a.feed.others_listening, what="a poll that finds no one")
        # (What a's listener said as it began.)
        assert [n.payload.split()[1:] for n in probe.notifies(timeout=0.1)] == [["0", "listening"]]
        await submit(a, JobSpec(command=("true",)))
        assert list(probe.notifies(timeout=0.3)) == []
        b, heard = await stores(url, poll_interval=60.0)
        await until(lambda: a.feed.others_listening, what="the new listener's word")
        (job,) = await submit(a, JobSpec(command=("true",)))
        said = [n.payload for n in probe.notifies(timeout=0.3)]
        assert said[-1] == f"{a.feed.token} {newest(url)}", said
        await until(lambda: [e.job_id for e in heard.others][-1:] == [job.id],
                    what="the event")
    finally:
        probe.close()
