"""
What the PostgreSQL store does beyond the store contract (which it passes
as SQLite's does: tests/test_store_contract.py): its migrations, and what
makes it fit for several dispatchers on one database (tokens from a
sequence, claims that pass over rows another transaction holds, counts
that the database keeps).  Each test has databases of its own on the real
PostgreSQL (tests/postgres.py).
"""

import psycopg
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from dispatcher.model._jobs import JobIds, JobSpec, Offer, Outcome, JobState, StaleLease
from dispatcher.store._pg_schema import MIGRATIONS, WRITE_LOCK
from dispatcher.store._postgres import CLAIM_FETCH, PostgresJobStore, describe_url
from dispatcher.store._results import StoreUnusable, StoreVersionError, TooManyUnfinished
from tests.postgres import Databases, url_of
from tests.store_contract import no_jitter

ids = JobIds()


@pytest.fixture
def databases():
    """Databases of the test's own, dropped at teardown."""
    made = Databases()
    yield made
    made.drop()


@pytest.fixture
def stores():
    """Open PostgreSQL stores; all are closed at teardown."""
    made = []

    async def open_store(url, **options):
        options.setdefault("backoff", no_jitter)
        store = PostgresJobStore(url, reactor, **options)
        made.append(store)
        await store.open()
        return store

    yield open_store
    for store in made:
        pytest_twisted.blockon(store.close())


def rows(url, query, params=()):
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(query, params).fetchall()


async def submit(store, *specs, now=100.0, **options):
    written = await store.submit(list(specs), now, [ids.new() for _ in specs], **options)
    return written.value.jobs


@pytest_twisted.ensureDeferred
async def test_two_stores_opening_at_once_migrate_once(databases):
    """Two stores opening one new database at once both open it: the
    migrations run once, under the advisory lock, and the schema is at the
    newest version."""
    url = databases.url("db")
    first = PostgresJobStore(url, reactor)
    second = PostgresJobStore(url, reactor)
    try:
        await gatherResults([first.open(), second.open()])
        assert rows(url, "SELECT version FROM schema_version") == [(len(MIGRATIONS),)]
        (job,) = await submit(first, JobSpec(command=("true",)))
        assert (await second.get(job.id)).state is JobState.QUEUED
    finally:
        await first.close()
        await second.close()


@pytest_twisted.ensureDeferred
async def test_a_newer_schema_is_refused(databases, stores):
    """A database a newer dispatcher migrated past what this one knows is
    not opened: the error says which version and what to do."""
    url = databases.url("db")
    store = await stores(url)
    await store.close()
    rows(url, "UPDATE schema_version SET version = version + 1 RETURNING version")
    with pytest.raises(StoreVersionError, match="run a newer dispatcher"):
        await stores(url)


@pytest_twisted.ensureDeferred
async def test_a_database_from_before_batch_ranges_gets_them(databases, stores, monkeypatch):
    """A database at version 2 (batches found along their index) gets a
    range for each batch stored, others numbered among them, and loses the
    index; its batches read back whole."""
    from dispatcher.model._groups import GroupKind
    from dispatcher.store import _postgres

    url = databases.url("db")
    before = next(i for i, m in enumerate(MIGRATIONS) if "CREATE TABLE batches" in m)
    monkeypatch.setattr(_postgres, "MIGRATIONS", MIGRATIONS[:before])
    store = await stores(url)
    await store.close()
    monkeypatch.undo()
    with psycopg.connect(url, autocommit=True) as conn:
        for seq, batch in enumerate(["a", None, "b", "a", "b", None], start=1):
            conn.execute(
                "INSERT INTO jobs (seq, id, state, labels, spec, created_at, batch_id)"
                " VALUES (%s, %s, 'queued', '{}', '{\"command\":[\"true\"]}', 1.0, %s)",
                (seq, f"j{seq}", batch))
    store = await stores(url)
    assert (await store.group(GroupKind.BATCH, "a")).size == 2
    page, _ = await store.list_jobs(batch="b")
    assert [j.id for j in page] == ["j3", "j5"]
    assert sorted(rows(url, "SELECT * FROM batches")) == [("a", 1, 4), ("b", 3, 5)]
    assert rows(url, "SELECT 1 FROM pg_indexes WHERE indexname = 'jobs_batch'") == []
    assert rows(url, "SELECT version FROM schema_version") == [(len(MIGRATIONS),)]


@pytest_twisted.ensureDeferred
async def test_an_unreachable_database_is_one_line(stores):
    """A database that cannot be reached fails the open with one line that
    names it, without its password."""
    url = url_of("dispatcher_no_such_database").replace(
        "postgres@", "postgres:secret@"
    )
    with pytest.raises(StoreUnusable) as raised:
        await stores(url)
    message = str(raised.value)
    assert "dispatcher_no_such_database" in message
    assert "secret" not in message
    assert "\n" not in message
    assert "secret" not in describe_url(url)


@pytest_twisted.ensureDeferred
async def test_a_claim_passes_over_a_job_another_transaction_holds(databases, stores):
    """A queued job whose row another transaction has locked (another
    dispatcher's claim under way) is passed over, not handed out a second
    time; once that transaction ends it is claimed."""
    url = databases.url("db")
    store = await stores(url)
    first, second = await submit(
        store, JobSpec(command=("true",), priority=1), JobSpec(command=("true",))
    )
    with psycopg.connect(url) as other:
        other.execute("SELECT 1 FROM jobs WHERE id = %s FOR UPDATE", (first.id,))
        claimed = await store.claim(Offer("a", 2), 2, 101.0, 60)
        assert [lease.job_id for lease in claimed.leases] == [second.id]
        other.rollback()
    claimed = await store.claim(Offer("a", 2), 2, 102.0, 60)
    assert [lease.job_id for lease in claimed.leases] == [first.id]


@pytest_twisted.ensureDeferred
async def test_two_stores_on_one_database_never_share_a_token(databases, stores):
    """Lease tokens come from the database's sequence: two stores on one
    database (two dispatchers), and a store opened again, never give the
    same token."""
    url = databases.url("db")
    one = await stores(url)
    two = await stores(url)
    await submit(one, *[JobSpec(command=("true",)) for _ in range(6)])
    tokens = []
    for store in (one, two, one, two):
        (lease,) = (await store.claim(Offer("a", 1), 1, 101.0, 60)).leases
        tokens.append(lease.token)
    await one.close()
    again = await stores(url)
    (lease,) = (await again.claim(Offer("a", 1), 1, 101.0, 60)).leases
    tokens.append(lease.token)
    assert len(set(tokens)) == len(tokens)
    assert sorted(t for (t,) in rows(url, "SELECT token FROM attempts")) == sorted(tokens)


@pytest_twisted.ensureDeferred
async def test_a_delivery_read_with_a_hold_is_the_readers_alone(databases, stores):
    """Two stores on one database (two dispatchers) read the webhook
    outbox: what one reads with a hold, the other is not given until the
    hold has passed (then it is, as after its reader's death); the ids a
    reader excludes (its own, being tried) are passed over; a read without
    a hold claims nothing."""
    from tests.store_contract import notified

    url = databases.url("db")
    one = await stores(url)
    two = await stores(url)
    await submit(one, *[notified(i, JobState.QUEUED) for i in range(3)])
    free = await two.due_deliveries(200.0, 10)
    assert len(free) == 3
    first = await one.due_deliveries(200.0, 2, 20.0)
    assert [d.id for d in first] == [d.id for d in free[:2]]
    assert [d.id for d in await two.due_deliveries(200.0, 10, 20.0)] == [free[2].id]
    assert await one.due_deliveries(210.0, 10, 20.0) == []
    assert await two.due_deliveries(210.0, 10, 20.0, exclude=[free[2].id]) == []
    again = await two.due_deliveries(221.0, 10, 20.0, exclude=[free[2].id])
    assert [d.id for d in again] == [d.id for d in first]


@pytest_twisted.ensureDeferred
async def test_the_quota_counts_what_another_store_committed(databases, stores):
    """An owner's limit of unfinished jobs is checked against the counts the
    database keeps: jobs submitted through another store (another
    dispatcher) count, and so do their ends."""
    url = databases.url("db")
    one = await stores(url)
    two = await stores(url)
    await submit(one, JobSpec(command=("true",)), JobSpec(command=("true",)),
                 owner="ann", max_unfinished=2)
    with pytest.raises(TooManyUnfinished):
        await submit(two, JobSpec(command=("true",)), owner="ann", max_unfinished=2)
    (lease,) = (await one.claim(Offer("a", 1), 1, 101.0, 60)).leases
    await one.finish(lease, Outcome(JobState.SUCCEEDED), 102.0)
    await submit(two, JobSpec(command=("true",)), owner="ann", max_unfinished=2)
    assert await two.unfinished_jobs() == {"ann": 2}


@pytest_twisted.ensureDeferred
async def test_a_queue_limit_counts_the_running_jobs_of_every_store(databases, stores):
    """A queue's max_running is counted in the database: jobs another store
    started count against it."""
    url = databases.url("db")
    one = await stores(url, queues={"default": 0, "gpu": 1})
    two = await stores(url, queues={"default": 0, "gpu": 1})
    await submit(one, JobSpec(command=("true",), queue="gpu"),
                 JobSpec(command=("true",), queue="gpu"))
    assert len((await one.claim(Offer("a", 2), 2, 101.0, 60)).leases) == 1
    claimed = await two.claim(Offer("b", 2), 2, 101.0, 60)
    assert claimed.leases == []
    assert claimed.blocked


@pytest_twisted.ensureDeferred
async def test_counts_by_queue_are_reread_from_the_database(databases, stores):
    """The counts by queue and state answered without a query are a copy of
    the database's table, read again at the writer's turns: what another
    store committed shows in them."""
    from twisted.internet.task import Clock

    url = databases.url("db")
    clock = Clock()
    one = await stores(url)
    two = await stores(url, clock=clock)
    await submit(one, JobSpec(command=("true",)))
    assert two.job_counts() == {}
    clock.advance(1.0)
    # The turn runs on the writer thread; a write after it answers once
    # it is done.
    await two.purge_idempotency(100.0)
    assert two.job_counts() == {"default": {JobState.QUEUED: 1}}


def test_rows_written_at_once_do_what_one_at_a_time_does(databases):
    """The PostgreSQL store writes a group's many rows with one statement
    (arrays unnested) where the SQLite store runs one a row: the same rows
    result, a time given as an int among floats included, and an update
    that names one row twice still ends with the last of them."""
    from dispatcher.store._postgres import ColumnTypes, PgConnection, connect, migrate

    url = databases.url("db")
    raw = connect(url)
    try:
        migrate(raw, "db")
        conn = PgConnection(raw, ColumnTypes(raw))
        conn.executemany(
            "INSERT INTO events (id, at, job_id, state) VALUES (?, ?, ?, ?)",
            [(1, 1, "a", "queued"), (2, 2.5, None, "running"), (3, 3.0, "c", "queued")],
        )
        conn.executemany(
            "UPDATE events SET state = ?, error = NULL WHERE id = ?",
            [("x", 1), ("y", 1), ("z", 2)],
        )
        conn.executemany("DELETE FROM events WHERE id = ?", [(3,), (4,)])
        assert rows(url, "SELECT id, at, job_id, state FROM events ORDER BY id") == [
            (1, 1.0, "a", "y"), (2, 2.5, None, "z"),
        ]
    finally:
        raw.close()


@pytest_twisted.ensureDeferred
async def test_a_claim_reads_on_past_a_page_in_claim_order(databases, stores):
    """A claim reads the queued jobs a page at a time, each page after the
    last row read: one that takes more than a page gets every job once,
    by priority and then in the order they were queued, across the
    pages' edges (equal priorities and lower ones)."""
    url = databases.url("db")
    store = await stores(url)
    count = CLAIM_FETCH * 2 + 5
    jobs = await submit(store, *[JobSpec(command=("true",), priority=i % 3) for i in range(count)])
    claimed = await store.claim(Offer("a", count + 1), count + 1, 101.0, 60)
    order = sorted(range(count), key=lambda i: (-(i % 3), i))
    assert [lease.job_id for lease in claimed.leases] == [jobs[i].id for i in order]


@pytest_twisted.ensureDeferred
async def test_an_end_sees_what_another_dispatcher_committed_on_its_job(databases, stores):
    """An end (whose group takes the groups' lock only at its tail) reads
    its job's row locked: a write of another dispatcher under way on that
    job (here its lease taken away) is waited for, and the end then finds
    its lease stale, instead of writing over what the other committed."""
    url = databases.url("db")
    store = await stores(url)
    (job,) = await submit(store, JobSpec(command=("true",)))
    (lease,) = (await store.claim(Offer("a", 1), 1, 101.0, 60)).leases
    with psycopg.connect(url) as other:
        other.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
        other.execute(
            "UPDATE jobs SET state = 'queued', lease_token = NULL, lease_holder = NULL"
            " WHERE id = %s",
            (job.id,),
        )
        ended = store.finish(lease, Outcome(JobState.SUCCEEDED), 102.0)
        # The end is under way, waiting for the other's row or lock.
        await deferLater(reactor, 0.3, lambda: None)
        assert not ended.called
        other.commit()
    with pytest.raises(StaleLease):
        await ended
    assert rows(url, "SELECT state FROM jobs WHERE id = %s", (job.id,)) == [("queued",)]


@pytest_twisted.ensureDeferred
async def test_a_group_in_a_deadlock_with_another_dispatcher_runs_again(databases, stores):
    """A group of ends holds its job's row and waits for the groups' lock
    while another dispatcher's group holds that lock and waits for the
    row: the server ends one of them, and the store's runs again: the end
    is written, and the other's write too if it was not the one ended."""
    url = databases.url("db")
    store = await stores(url)
    (job,) = await submit(store, JobSpec(command=("true",)))
    (lease,) = (await store.claim(Offer("a", 1), 1, 101.0, 60)).leases
    retries = store._writer.late_retries
    with psycopg.connect(url) as other:
        other.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
        ended = store.finish(lease, Outcome(JobState.SUCCEEDED), 102.0)
        # The end holds the row and waits for the lock.
        await deferLater(reactor, 0.3, lambda: None)

        def cancel():
            try:
                other.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = %s", (job.id,))
            except psycopg.errors.DeadlockDetected:
                other.rollback()
                return False
            other.commit()
            return True

        cancelled = await deferToThread(cancel)
        await ended
    assert store._writer.late_retries - retries == (1 if cancelled else 0)
    assert rows(url, "SELECT state, cancel_requested FROM jobs WHERE id = %s", (job.id,)) == [
        ("succeeded", 1 if cancelled else 0)
    ]


@pytest_twisted.ensureDeferred
async def test_a_group_waiting_for_the_lock_sees_a_first_dependency_stored_meanwhile(
    databases, stores
):
    """A group that takes the groups' lock from its start asks, once it
    holds it, whether any job has dependents: a first dependency another
    dispatcher committed while the group waited for the lock is seen, so
    this dispatcher's later ends of the jobs depended on free their
    dependents (a check read in the lock's own statement would see the
    database as it was before the wait)."""
    url = databases.url("db")
    store = await stores(url)
    (job,) = await submit(store, JobSpec(command=("true",)))
    assert store._state.dependencies is False
    with psycopg.connect(url) as other:
        other.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
        submitted = ensureDeferred(submit(store, JobSpec(command=("true",))))
        # The submission's group waits for the lock the other holds.
        await deferLater(reactor, 0.3, lambda: None)
        assert not submitted.called
        other.execute(
            "INSERT INTO dependencies (depends_on, job_id) VALUES (%s, %s)",
            (job.id, "elsewhere"),
        )
        other.commit()
    await submitted
    assert store._state.dependencies is True
