"""
What is the SQLite store's own, beyond the store contract (which
C{tests/test_store_contract.py} runs against it): the group commit and its
shared paths, syncing, the translation of SQLite's errors, the file's
journal mode, schema versions and migrations.
"""

import sqlite3

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.internet.task import Clock, deferLater

from dispatcher.model._events import JobEvent, SameChange
from dispatcher.model._jobs import JobSpec, JobState, Limits, Offer, Outcome, PlainJobs, StaleLease
from dispatcher.store import _schema, _sqlite, _submissions
from dispatcher.store._results import (
    CommitFailed,
    IdempotencyKey,
    ReadFailed,
    StoreVersionError,
    SubmittedIds,
    WriteRefused,
)
from dispatcher.store._schema import MIGRATIONS
from dispatcher.store._sqlite import SQLiteJobStore
from tests.store_contract import claim, ids, moved, no_jitter, spec, submit


@pytest.fixture
def make_store(tmp_path):
    """Open SQLite stores in the test's directory; all closed at teardown."""
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
    SQLite without JSON functions); the jobs' events with them."""
    if json_rows and not _submissions.JSON_ROWS:
        pytest.skip(f"SQLite {sqlite3.sqlite_version} has no JSON functions built in")
    monkeypatch.setattr(_submissions, "JSON_ROWS", json_rows)
    first, plain_ids, last = ids.new(), [ids.new(), ids.new()], ids.new()
    plain = PlainJobs([["true", "p0"], ["true", "p1"]],
                      priority=2, timeout=9.0)
    # A group that fails nowhere is stored in one insert, never replayed.
    replayed = []
    apply_one = store._writer._apply_one
    monkeypatch.setattr(
        store._writer, "_apply_one", lambda *a: replayed.append(a) or apply_one(*a))
    together = [ids.new(), [ids.new(), ids.new()], ids.new(), [ids.new()]]
    one_by_one = PlainJobs([["true", "q"]])
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
    seqs = store._writer.connection.execute(
        "SELECT seq FROM jobs ORDER BY seq").fetchall()
    assert [seq for (seq,) in seqs] == [1, 2, 3, 4, 5]
    # Each job's event, queued and new, numbered in the order submitted,
    # as stored and as published.
    stored_events = (await store.read_events(0, 100)).events
    assert [(e.id, e.job_id, e.state, e.previous) for e in stored_events] == [
        (n, job_id, JobState.QUEUED, None) for n, job_id in enumerate(
            [together[0], *together[1], together[2], *together[3]], 1)]
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
    assert moved(results[1]) == tuple((i, JobState.QUEUED) for i in plain_ids)
    assert results[3][0].check(WriteRefused)
    page, _ = await store.list_jobs()
    page = page[5:]
    assert [job.id for job in page] == [first, *plain_ids, last]
    assert [job.spec.command[1] for job in page] == ["1", "p0", "p1", "3"]
    made = page[1]
    assert (made.state, made.spec.priority, made.spec.timeout, made.spec.queue) == (
        JobState.QUEUED, 2, 9.0, "default")
    assert made.wait_reason == "waiting for a free slot"
    odd = PlainJobs([("t", ["\u0000 \u00e9 \"q\"", 1.5e300, 2**70], {})])
    (odd_id,) = (await store.submit_plain(odd, 1.5, [ids.new()])).value.ids
    stored = await store.get(odd_id)
    assert stored.spec.args == ("\u0000 \u00e9 \"q\"", 1.5e300, 2**70)
    assert (stored.spec.timeout, stored.spec.priority, stored.created_at) == (None, 0, 1.5)
    key = IdempotencyKey("plain", "digest")
    again = [ids.new(), ids.new()]
    once = await store.submit_plain(plain, 2.0, again, key)
    assert once.value == SubmittedIds(again)
    replay = await store.submit_plain(plain, 3.0, [ids.new(), ids.new()], key)
    assert replay.value.replayed and [job.id for job in replay.value.jobs] == again


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
async def test_successes_of_a_group_are_recorded_together(store):
    """Successes next to each other in a group share one read and two
    updates, with the same outcome as one by one: attempts closed, results
    and attempt counts kept; one whose cancel was asked meanwhile sends the
    group down the one-by-one path, and still succeeds."""
    await submit(store, spec(1), spec(2), spec(3))
    claimed = await store.claim(Offer("h", 3), 3, 200.0, 60)
    a, b, c = claimed.leases
    together = []
    alike, real = store._writer._shared[1]
    store._writer._shared[1] = (
        alike, lambda conn, work: (together.append(len(work)), real(conn, work))[1])
    before = store.batches
    done = [
        store.finish(a, Outcome(JobState.SUCCEEDED, exit_code=0, result={"n": 1}), 201.0),
        store.finish(b, Outcome(JobState.SUCCEEDED, exit_code=0), 202.0),
    ]
    written = [await d for d in done]
    assert store.batches - before == 1 and together == [2]
    assert [moved(w) for w in written] == [((a.job_id, JobState.SUCCEEDED),),
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
    assert moved(results[0]) == ((c.job_id, JobState.SUCCEEDED),)
    assert results[1][0].check(StaleLease)
    assert (await store.get(c.job_id)).state is JobState.SUCCEEDED


@pytest_twisted.ensureDeferred
async def test_a_submission_then_successes_share_without_a_replay(store):
    """A submission followed by successes: the successes are recorded
    together, and nothing of the group is replayed."""
    await submit(store, spec(1), spec(2))
    a, b = (await store.claim(Offer("h", 2), 2, 200.0, 60)).leases
    replayed = []
    real = store._writer._apply_one
    store._writer._apply_one = lambda conn, write: (replayed.append(write), real(conn, write))[1]
    asked = [
        store.submit([spec(3)], 201.0, [ids.new()]),
        store.finish(a, Outcome(JobState.SUCCEEDED), 201.0),
        store.finish(b, Outcome(JobState.SUCCEEDED), 201.0),
    ]
    for d in asked:
        await d
    assert replayed == []
    assert (await store.get(b.job_id)).state is JobState.SUCCEEDED


def synchronous(store):
    """The writer connection's synchronous setting: 2 is FULL, 1 NORMAL."""
    return store._writer.connection.execute("PRAGMA synchronous").fetchone()[0]


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
async def test_newer_schema_refused(tmp_path):
    """A database from a newer dispatcher is refused with words saying so."""
    path = str(tmp_path / "db.sqlite3")
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    conn.close()
    s = SQLiteJobStore(path, reactor)
    with pytest.raises(StoreVersionError, match="newer"):
        await s.open()
    await s.close()


# Scheduling rules


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
async def test_migration_to_owners(tmp_path):
    """A database of schema version 4 is migrated to owners: its jobs have
    none (null, and read as such) and stay listed to whoever sees every
    job, and the idempotency keys it kept belong to no principal, so that
    an owner's same key makes new jobs."""
    path = str(tmp_path / "v4.sqlite3")
    conn = sqlite3.connect(path, isolation_level=None)
    for migration in MIGRATIONS[:4]:
        for statement in migration.split(";"):
            if statement.strip():
                conn.execute(statement)
    conn.execute("PRAGMA user_version = 4")
    conn.execute(
        "INSERT INTO jobs (id, state, name, labels, spec, created_at) VALUES"
        " ('old', 'queued', NULL, '{}', '{\"command\":[\"true\"]}', 1.0)")
    conn.execute(
        "INSERT INTO idempotency (key, digest, job_ids, created_at)"
        " VALUES ('k', 'd', '[\"old\"]', 1.0)")
    conn.close()
    store = SQLiteJobStore(path, reactor)
    await store.open()
    old = await store.get("old")
    assert old.owner is None
    assert [j.id for j in (await store.list_jobs())[0]] == ["old"]
    assert (await store.list_jobs(owner="admin"))[0] == []
    made = await store.submit([spec(1)], 2.0, [ids.new()], IdempotencyKey("k", "d"),
                              owner="admin")
    assert not made.value.replayed and made.value.jobs[0].owner == "admin"
    await store.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    assert conn.execute("SELECT owner, key FROM idempotency ORDER BY owner").fetchall() == [
        ("", "k"), ("admin", "k")]
    conn.close()


def test_an_owners_list_reads_along_its_index(tmp_path):
    """A page of one owner's jobs reads the owner's index in submission
    order, from the cursor on, rather than every job or a sort; with a
    state too, an index in submission order still."""
    from dispatcher.store._rows import VIEW_COLUMNS
    from dispatcher.store._schema import migrate

    path = str(tmp_path / "plan.sqlite3")
    conn = sqlite3.connect(path, isolation_level=None)
    migrate(conn, path)

    def plan(where):
        return " / ".join(row[-1] for row in conn.execute(
            f"EXPLAIN QUERY PLAN SELECT {VIEW_COLUMNS} FROM jobs WHERE {where}"
            " ORDER BY seq LIMIT 101", (0, "ann")))

    owner = plan("seq > ? AND owner = ?")
    assert "USING INDEX jobs_owner (owner=? AND seq>?)" in owner, owner
    with_state = plan("seq > ? AND owner = ? AND state = 'failed'")
    assert "USING INDEX" in with_state and "seq>?" in with_state, with_state
    assert "TEMP B-TREE" not in owner + with_state
    conn.close()


@pytest_twisted.ensureDeferred
async def test_the_file_is_in_wal_mode(tmp_path):
    """The database file is left in WAL mode, which the readers beside the
    writer rely on."""
    path = str(tmp_path / "db.sqlite3")
    s = SQLiteJobStore(path, reactor)
    await s.open()
    await submit(s, spec())
    await s.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


class FailingConnection:
    """The writer's connection, made to fail the statements C{fails} picks
    with C{error}, as a full disk would."""

    def __init__(self, conn, fails, error):
        self.conn = conn
        self.fails = fails
        self.error = error
        self.failed = 0

    def execute(self, sql, *args):
        if self.fails(sql):
            self.failed += 1
            raise self.error
        return self.conn.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self.conn, name)


@pytest_twisted.ensureDeferred
async def test_a_commit_that_fails_is_commit_failed(store):
    """When SQLite cannot commit a group, every write of it fails with the
    store's CommitFailed, whose message and cause are SQLite's; nothing of
    the group is stored, and the next commit works."""
    error = sqlite3.OperationalError("database or disk is full")
    real = store._writer.connection
    store._writer.connection = FailingConnection(real, lambda sql: sql == "COMMIT", error)
    try:
        asked = [store.submit([spec(1)], 1.0, [ids.new()]),
                 store.submit([spec(2)], 1.0, [ids.new()])]
        results = [await d.addErrback(lambda f: [f]) for d in asked]
    finally:
        store._writer.connection = real
    for (failure,) in results:
        assert failure.check(CommitFailed)
        assert failure.getErrorMessage() == "database or disk is full"
        assert failure.value.__cause__ is error
    assert (await store.list_jobs())[0] == []
    await submit(store, spec(3))
    assert len((await store.list_jobs())[0]) == 1


@pytest_twisted.ensureDeferred
async def test_a_write_sqlite_cannot_do_is_commit_failed_alone(store):
    """A write whose own statements SQLite fails (here the end of an attempt)
    fails with CommitFailed, and the rest of its group commits."""
    await submit(store, spec(1))
    (lease,) = await claim(store, "h", 1, 2.0)
    real = store._writer.connection
    store._writer.connection = FailingConnection(
        real, lambda sql: sql.startswith("UPDATE attempts SET finished_at"),
        sqlite3.OperationalError("disk I/O error"))
    try:
        asked = [store.finish(lease, Outcome.from_exit_code(0), 3.0),
                 store.submit([spec(2)], 3.0, [ids.new()])]
        results = [await d.addErrback(lambda f: [f]) for d in asked]
    finally:
        store._writer.connection = real
    assert results[0][0].check(CommitFailed)
    assert (await store.get(results[1].value.jobs[0].id)).state is JobState.QUEUED
    assert (await store.get(lease.job_id)).state is JobState.RUNNING
    await store.finish(lease, Outcome.from_exit_code(0), 4.0)
    assert (await store.get(lease.job_id)).state is JobState.SUCCEEDED


def test_every_write_command_has_its_operation(tmp_path):
    """Each kind of write command is applied by one operation of the store,
    whose arguments after the connection are the command's fields, in
    order: a command unpacks into them."""
    import inspect
    import typing

    from dispatcher.store import _writes

    s = SQLiteJobStore(str(tmp_path / "db.sqlite3"), reactor)
    kinds = typing.get_args(_writes.Write)
    assert set(kinds) == set(s._operations)
    assert _writes.DURABLE <= set(kinds)
    for kind in kinds:
        parameters = list(inspect.signature(s._operations[kind]).parameters)
        assert parameters[1:] == list(kind._fields), kind


@pytest_twisted.ensureDeferred
async def test_a_read_sqlite_cannot_do_is_read_failed(store, monkeypatch):
    """A read that SQLite fails fails with the store's ReadFailed, with
    SQLite's message, and the next read works."""
    (job,) = await submit(store, spec())
    real = _sqlite.get_job

    def failing(conn, job_id, limits={}):
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(_sqlite, "get_job", failing)
    with pytest.raises(ReadFailed, match="disk I/O error"):
        await store.get(job.id)
    monkeypatch.setattr(_sqlite, "get_job", real)
    assert (await store.get(job.id)).id == job.id


def test_the_column_table_is_the_schema_and_a_job_reads_back_as_made(tmp_path):
    """Every column of the rows' column table is a column of the migrated
    jobs table, and a job with every stored field set, inserted from the
    row the table makes, reads back (as a spec, and as a job) as it was
    made."""
    from dispatcher.model._jobs import InputSpec, JobSpec, Resources
    from dispatcher.store import _rows
    from dispatcher.store._schema import migrate

    path = str(tmp_path / "rows.sqlite3")
    conn = sqlite3.connect(path, isolation_level=None)
    migrate(conn, path)
    columns = {row[1] for row in conn.execute("PRAGMA table_info(jobs)")}
    assert {c.name for c in _rows.JOB_COLUMNS} <= columns
    made = JobSpec(
        command=("echo", "hi"), name="n", env={"A": "1"}, labels={"k": "v"},
        inputs=(InputSpec("http://x/a", "a", "0" * 64),), priority=5, queue="q",
        timeout=3.0, max_attempts=3, retry_delay=2.0, not_before=5.0, depends_on=("d",),
        array_id="arr", array_index=2, resources=Resources(cpus=1.5, memory_mb=10, gpus=1),
        requirements={"os": "linux"},
    )
    row, job = _rows.new_job(
        made, seq=7, id="j", state=JobState.CANCELLED, created_at=1.0, finished_at=2.0,
        error="e", wait_reason=None, waiting_on=1, cancelled_by="d", owner="ann",
    )
    conn.execute(
        f"INSERT INTO jobs ({', '.join(_rows.INSERTED_COLUMNS)})"
        f" VALUES ({', '.join('?' * len(row))})",
        row,
    )
    (spec_row,) = conn.execute(f"SELECT {_rows.SPEC_COLUMNS} FROM jobs").fetchall()
    assert _rows.spec_from_row(spec_row) == made
    (view_row,) = conn.execute(f"SELECT {_rows.VIEW_COLUMNS} FROM jobs").fetchall()
    assert _rows.job_from_row(view_row, (), {}) == job
    assert job.cancelled_by == "d" and job.finished_at == 2.0 and job.spec is made
    assert job.owner == "ann"
    conn.close()


@pytest_twisted.ensureDeferred
async def test_an_attempts_limits_and_cut_log_are_kept(store):
    """The limits an attempt ran under and the streams of its log that were
    cut are stored with its end and read back, on the one-by-one path and
    on the path of successes recorded together; an attempt that says
    nothing of them reads back with none."""
    await submit(store, spec(1), spec(2), spec(3))
    a, b, c = (await store.claim(Offer("h", 3), 3, 200.0, 60)).leases
    limits = Limits(512, 4096, True)
    done = [
        store.finish(a, Outcome(JobState.FAILED, exit_code=-9, error="out of memory",
                                limits=limits, log_cut=("stdout", "stderr")), 201.0),
        store.finish(b, Outcome(JobState.SUCCEEDED, exit_code=0,
                                limits=Limits(None, None, False)), 201.0),
        store.finish(c, Outcome(JobState.SUCCEEDED, exit_code=0), 201.0),
    ]
    for d in done:
        await d
    first, second, third = [(await store.get(lease.job_id)).attempts[-1] for lease in (a, b, c)]
    assert (first.limits, first.log_cut) == (limits, ("stdout", "stderr"))
    assert (second.limits, second.log_cut) == (Limits(None, None, False), ())
    assert (third.limits, third.log_cut) == (None, ())


def _made_before(tmp_path, monkeypatch, says):
    """A database (its path, and a connection to it) made by the migrations
    before the first that says C{says}."""
    path = str(tmp_path / "old.sqlite3")
    conn = sqlite3.connect(path, isolation_level=None)
    before = next(i for i, m in enumerate(MIGRATIONS) if isinstance(m, str) and says in m)
    monkeypatch.setattr(_schema, "MIGRATIONS", MIGRATIONS[:before])
    _schema.migrate(conn, path)
    monkeypatch.undo()
    return path, conn


@pytest_twisted.ensureDeferred
async def test_migration_to_limits(tmp_path, monkeypatch):
    """A database from before attempts had limits gets the columns; its
    attempts read back with none, and new ends store theirs."""
    path, conn = _made_before(tmp_path, monkeypatch, "COLUMN limits")
    conn.execute(
        "INSERT INTO jobs (id, state, name, labels, spec, created_at, attempt_count)"
        " VALUES ('old', 'failed', NULL, '{}', '{\"command\":[\"true\"]}', 1.0, 1)")
    conn.execute(
        "INSERT INTO attempts (job_id, number, token, holder, started_at, finished_at,"
        " exit_code) VALUES ('old', 1, 1, 'h', 1.0, 2.0, 1)")
    conn.close()
    store = SQLiteJobStore(path, reactor)
    await store.open()
    (attempt,) = (await store.get("old")).attempts
    assert (attempt.exit_code, attempt.limits, attempt.log_cut) == (1, None, ())
    await store.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    conn.close()


@pytest_twisted.ensureDeferred
async def test_migration_to_batch_ranges(tmp_path, monkeypatch):
    """A database from before batches had ranges gets one for each batch
    stored (from its members' numbers, others numbered among them) and
    loses the index it replaces; its batches read back whole."""
    from dispatcher.model._groups import GroupKind

    path, conn = _made_before(tmp_path, monkeypatch, "CREATE TABLE batches")
    for seq, batch in enumerate(["a", None, "b", "a", "b", None], start=1):
        conn.execute(
            "INSERT INTO jobs (seq, id, state, labels, spec, created_at, batch_id)"
            " VALUES (?, ?, 'queued', '{}', '{\"command\":[\"true\"]}', 1.0, ?)",
            (seq, f"j{seq}", batch))
    conn.close()
    store = SQLiteJobStore(path, reactor)
    await store.open()
    try:
        assert (await store.group(GroupKind.BATCH, "a")).size == 2
        page, _ = await store.list_jobs(batch="b")
        assert [j.id for j in page] == ["j3", "j5"]
    finally:
        await store.close()
    conn = sqlite3.connect(path)
    try:
        assert sorted(conn.execute("SELECT * FROM batches")) == [("a", 1, 4), ("b", 3, 5)]
        assert conn.execute(
            "SELECT name FROM sqlite_master WHERE name = 'jobs_batch'").fetchall() == []
    finally:
        conn.close()


def _triggers(path):
    conn = sqlite3.connect(path)
    try:
        return sorted(r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'trigger'"))
    finally:
        conn.close()


@pytest_twisted.ensureDeferred
async def test_webhook_triggers_come_with_the_first_job_that_names_notify(make_store, tmp_path):
    """The triggers that write webhook deliveries cost every job's changes
    of state: a store whose jobs never named notify has none; the first
    submission of one makes them in its own transaction, so that one
    refused (and rolled back) leaves none behind and the next makes them
    again."""
    from dispatcher.model._jobs import Notify
    from dispatcher.store._results import UnknownDependency

    store = await make_store()
    path = str(tmp_path / "db.sqlite3")
    await submit(store, spec(1))
    await store.submit_plain(PlainJobs([["true"]]), 1.0, [ids.new()])
    assert _triggers(path) == []
    hooked = spec(2, notify=Notify("https://hooks.example/x"))
    with pytest.raises(UnknownDependency):
        await submit(store, attrs.evolve(hooked, depends_on=("no-such-job",)))
    assert _triggers(path) == []
    (job,) = await submit(store, hooked)
    assert _triggers(path) == [
        "jobs_notify_changed", "jobs_notify_made", "jobs_notify_removed"]
    await store.cancel(job.id, 200.0)
    (delivery,) = await store.due_deliveries(10.0**12, 10)
    assert (delivery.job_id, delivery.state) == (job.id, JobState.CANCELLED)


@pytest_twisted.ensureDeferred
async def test_a_plain_batch_publishes_an_event_for_each_of_its_jobs(store):
    """A plain batch's jobs are published as they are stored: one event a
    job, in order, new and queued, with the owner and what of the spec an
    event shows (its queue and batch), numbered after the events before."""
    published = []
    store.follow_events(published.extend)
    await submit(store, spec(0))
    made = [ids.new() for _ in range(3)]
    jobs = PlainJobs([["true", "a"], ["true", "b"], ["true", "c"]], batch_id="b-1")
    await store.submit_plain(jobs, 7.5, made, owner="ann")
    assert len(published) == 4
    assert published[1:] == [
        JobEvent(job_id, JobState.QUEUED, None, n, 7.5, None, None, None, None, "ann",
                 JobSpec(queue="default", batch_id="b-1"), None)
        for n, job_id in enumerate(made, published[0].id + 1)]
    assert all(type(event) is JobEvent for event in published)


def test_same_change_reads_as_the_events_it_stands_for():
    """A SameChange is the sequence of its events: iterated, indexed from
    either end, sliced, compared, counted."""
    spec = JobSpec(queue="q", batch_id="b")
    events = SameChange(["j1", "j2", "j3"], 10, 2.5, JobState.QUEUED, "ann", spec)
    expected = [JobEvent(job_id, JobState.QUEUED, None, n, 2.5, owner="ann", spec=spec)
                for n, job_id in enumerate(["j1", "j2", "j3"], 10)]
    assert list(events) == expected and events == expected and len(events) == 3
    assert [type(event) for event in events] == [JobEvent] * 3
    assert events[0] == expected[0] and events[-1] == expected[-1]
    assert events[1:] == expected[1:]
    assert bool(events) and not SameChange([], 1, 0.0, JobState.QUEUED, None, spec)
    with pytest.raises(IndexError):
        events[3]


@pytest_twisted.ensureDeferred
async def test_a_plain_batchs_events_are_one_row(store):
    """The events of a plain batch's jobs are one row of the events table
    (migration 13), read back one event a job (the contract's test)."""
    made = [ids.new() for _ in range(4)]
    await store.submit_plain(PlainJobs([["true"]] * 4), 2.0, made)
    conn = store._writer.connection
    assert conn.execute("SELECT id, jobs FROM events").fetchall() == [(1, 4)]
    assert [e.job_id for e in (await store.read_events(0, 10)).events] == made
