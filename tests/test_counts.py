"""
The counts of jobs by queue, state and owner that the store's writer keeps
at each change (dispatcher/store/_counts.py): after any sequence of
submissions (one job, arrays, plain batches, into several queues), claims,
ends, cancels and retries (of one job and of whole groups), promotions,
removals (one job, and retention's steps), restarts and kill -9s, they are
what a fresh GROUP BY over the jobs' rows says, in memory and in the
table alike.
"""

import os
import pathlib
import shutil
import sqlite3

import psycopg
import pytest_twisted
from hypothesis import strategies as st
from hypothesis.stateful import invariant, precondition, rule
from twisted.internet import reactor

from dispatcher.model._groups import GroupKind, NothingToChange, UnknownGroup
from dispatcher.model._jobs import (
    FINAL_STATES,
    InvalidTransition,
    JobSpec,
    JobState,
    Offer,
    Outcome,
    PlainJobs,
)
from dispatcher.store._results import (
    DependencyNotRetried,
    HasDependents,
    RemovalCursor,
)
from dispatcher.store._sqlite import SQLiteJobStore
from tests.postgres import database_for
from tests.store_contract import no_jitter
from tests.test_invariants import HOLDER, SETTINGS, SQLiteScheduling, block, ids

QUEUES = {"default": 0, "gpu": 1, "slow": 0}


def counted_store(place, name, **options):
    """An SQLite store with three queues, one of them limited."""
    return SQLiteJobStore(str(place / f"{name}.sqlite3"), reactor, queues=QUEUES, **options)


def fresh_counts(path):
    """
    C{{(queue, state, owner): jobs}} counted now from the jobs' rows, and
    as the table the writer keeps holds them (zeros left out).
    """
    conn = sqlite3.connect(path)
    try:
        scanned = {
            (q, s, o): n
            for q, s, o, n in conn.execute(
                "SELECT queue, state, COALESCE(owner, ''), COUNT(*) FROM jobs"
                " GROUP BY queue, state, COALESCE(owner, '')"
            )
        }
        kept = {
            (q, s, o): n
            for q, s, o, n in conn.execute(
                "SELECT queue, state, owner, jobs FROM job_counts WHERE jobs != 0"
            )
        }
    finally:
        conn.close()
    return scanned, kept


class CountedScheduling(SQLiteScheduling):
    """The scheduling machine's operations, and more that change counts,
    against the counts the store keeps."""

    factory = staticmethod(counted_store)
    name = "db"

    def _open(self):
        store = self.factory(pathlib.Path(self.dir), self.name, backoff=no_jitter)
        block(store.open())
        return store

    def _forget(self, job_id):
        self.jobs.remove(job_id)
        self.final.pop(job_id, None)
        self.leases.pop(job_id, None)
        self.attempts_seen.pop(job_id, None)

    @rule(n=st.integers(1, 4))
    def claim(self, n):
        # Queues take turns (and one has a limit): the order the base
        # machine checks holds within one queue alone.
        claimed = block(self.store.claim(Offer(HOLDER, 1), n, self.now, 3600)).leases
        assert len(claimed) <= n
        for lease in claimed:
            assert lease.job_id not in self.leases
            self.leases[lease.job_id] = lease

    @rule(
        queue=st.sampled_from(sorted(QUEUES)),
        owner=st.sampled_from([None, "ann", "bob"]),
        size=st.integers(1, 4),
        wait=st.sampled_from([None, 10.0]),
    )
    def submit_array(self, queue, owner, size, wait):
        array_id = ids.new()
        specs = [
            JobSpec(command=("true",), queue=queue, array_id=array_id, array_index=i,
                    not_before=None if wait is None else self.now + wait)
            for i in range(size)
        ]
        job_ids = [ids.new() for _ in specs]
        block(self.store.submit(specs, self.now, job_ids, owner=owner))
        self.jobs.extend(job_ids)
        for job_id, spec in zip(job_ids, specs):
            self.specs[job_id] = spec

    @rule(
        queue=st.sampled_from(sorted(QUEUES)),
        owner=st.sampled_from([None, "ann", "bob"]),
        size=st.integers(1, 5),
        batch=st.booleans(),
    )
    def submit_plain(self, queue, owner, size, batch):
        jobs = PlainJobs([["true"]] * size, queue=queue,
                         batch_id=ids.new() if batch else None)
        job_ids = [ids.new() for _ in range(size)]
        block(self.store.submit_plain(jobs, self.now, job_ids, owner=owner))
        self.jobs.extend(job_ids)
        for job_id in job_ids:
            self.specs[job_id] = JobSpec(command=("true",), queue=queue)

    @precondition(lambda self: self.jobs)
    @rule(data=st.data(), retry=st.booleans())
    def change_group(self, data, retry):
        job_id = data.draw(st.sampled_from(self.jobs))
        job = self._job(job_id)
        if job.spec.array_id is not None:
            kind, group_id = GroupKind.ARRAY, job.spec.array_id
        elif job.spec.batch_id is not None:
            kind, group_id = GroupKind.BATCH, job.spec.batch_id
        else:
            return
        try:
            if retry:
                block(self.store.retry_group(kind, group_id, self.now))
            else:
                block(self.store.cancel_group(kind, group_id, self.now))
        except (NothingToChange, UnknownGroup, InvalidTransition, DependencyNotRetried):
            return
        # A running member is cancelled by its holder: it reports the end.
        for member in list(self.leases):
            if self._job(member).state is JobState.RUNNING and self._cancel_asked(member):
                block(self.store.finish(self.leases.pop(member), Outcome.from_exit_code(-15),
                                        self.now))
        self._settle()

    def _cancel_asked(self, job_id):
        conn = sqlite3.connect(self._path())
        try:
            (asked,) = conn.execute(
                "SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)
            ).fetchone()
        finally:
            conn.close()
        return bool(asked)

    def _settle(self):
        """What a group's change did to the jobs' finished states."""
        for job_id in self.jobs:
            state = self._job(job_id).state
            if state in FINAL_STATES:
                self.final[job_id] = state
            else:
                self.final.pop(job_id, None)

    @precondition(lambda self: self.final)
    @rule(data=st.data())
    def remove(self, data):
        job_id = data.draw(st.sampled_from(sorted(self.final)))
        try:
            block(self.store.remove(job_id, self.now))
        except HasDependents:
            return
        self._forget(job_id)

    @rule(limit=st.integers(1, 6))
    def retention_step(self, limit):
        removed = block(self.store.remove_finished(
            self.now + 1, self.now + 1, 0, RemovalCursor(), limit, 50
        )).value
        for job_id in removed.job_ids:
            self._forget(job_id)

    def _path(self):
        return os.path.join(self.dir, f"{self.name}.sqlite3")

    @rule()
    def kill(self):
        """The daemon is killed with SIGKILL between two commits: its files
        are as it left them (no close, no checkpoint), and it starts again
        on them."""
        killed = f"{self.name}k"
        for suffix in ("", "-wal", ".mark"):
            source = self._path() + suffix
            if os.path.exists(source):
                shutil.copyfile(source, os.path.join(self.dir, f"{killed}.sqlite3{suffix}"))
        block(self.store.close())
        self.name = killed
        self.store = self._open()
        block(self.store.recover(HOLDER, self.now))
        self.leases.clear()
        self._note_finished()

    @invariant()
    def counts_are_a_fresh_group_by(self):
        scanned, kept = fresh_counts(self._path())
        assert kept == scanned
        self._counts_answered(scanned)

    def _counts_answered(self, scanned):
        """The counts the store answers with are those C{scanned} from its
        rows."""
        for owner in ("ann", "bob"):
            assert {
                (queue, state.value): n
                for queue, states in self.store.job_counts(owner).items()
                for state, n in states.items()
            } == {(q, s): n for (q, s, o), n in scanned.items() if o == owner}
        totals = {}
        for (queue, state, _), n in scanned.items():
            totals[(queue, state)] = totals.get((queue, state), 0) + n
        assert {
            (queue, state.value): n
            for queue, states in self.store.job_counts().items()
            for state, n in states.items()
        } == totals
        counts = block(self.store.queue_counts())
        assert sorted(counts) == sorted(set(QUEUES) | {q for q, _ in totals})
        for queue, states in counts.items():
            for state, n in states.items():
                assert n == totals.get((queue, state.value), 0)


TestCountedScheduling = CountedScheduling.TestCase
TestCountedScheduling.settings = SETTINGS


def counted_postgresql_store(place, name, **options):
    """A PostgreSQL store with the same three queues, in a database of the
    test's own (tests/postgres.py)."""
    from dispatcher.store._postgres import PostgresJobStore

    return PostgresJobStore(database_for(place, name), reactor, queues=QUEUES, **options)


def _postgresql_rows(url, query, params=()):
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(query, params).fetchall()


class PostgresCountedScheduling(CountedScheduling):
    """The same machine on the PostgreSQL store: its counts table and the
    counts it answers from are what a GROUP BY of its rows says."""

    factory = staticmethod(counted_postgresql_store)

    def _url(self):
        return database_for(self.dir, self.name)

    def _cancel_asked(self, job_id):
        ((asked,),) = _postgresql_rows(
            self._url(), "SELECT cancel_requested FROM jobs WHERE id = %s", (job_id,)
        )
        return bool(asked)

    @rule()
    def kill(self):
        """The daemon is killed with SIGKILL between two commits: what
        PostgreSQL committed is all there is, and a new store opens on it."""
        block(self.store.close())
        self.store = self._open()
        block(self.store.recover(HOLDER, self.now))
        self.leases.clear()
        self._note_finished()

    @invariant()
    def only_staging_and_running_jobs_hold_a_lease(self):
        for state, token, holder in _postgresql_rows(
            self._url(), "SELECT state, lease_token, lease_holder FROM jobs"
        ):
            leased = state in ("staging", "running")
            assert (token is not None) == leased, (state, token)
            assert (holder is not None) == leased, (state, holder)

    @invariant()
    def counts_are_a_fresh_group_by(self):
        url = self._url()
        scanned = {
            (q, s, o): n
            for q, s, o, n in _postgresql_rows(
                url,
                "SELECT queue, state, COALESCE(owner, ''), COUNT(*) FROM jobs"
                " GROUP BY queue, state, COALESCE(owner, '')",
            )
        }
        kept = {
            (q, s, o): n
            for q, s, o, n in _postgresql_rows(
                url, "SELECT queue, state, owner, jobs FROM job_counts WHERE jobs != 0"
            )
        }
        assert kept == scanned
        self._counts_answered(scanned)
        # The quota's count is the table's.
        unfinished = block(self.store.unfinished_jobs())
        expected = {}
        for (_, state, owner), n in scanned.items():
            if owner and state in ("pending", "queued", "staging", "running"):
                expected[owner] = expected.get(owner, 0) + n
        assert unfinished == expected


TestPostgresCountedScheduling = PostgresCountedScheduling.TestCase
TestPostgresCountedScheduling.settings = SETTINGS


@pytest_twisted.ensureDeferred
async def test_migration_counts_the_jobs_stored(tmp_path):
    """A store made before the counts (schema 11) gets them counted from its
    jobs by migration 12, and they change from there."""
    from dispatcher.store._schema import MIGRATIONS, migrate

    path = str(tmp_path / "old.sqlite3")
    store = SQLiteJobStore(path, reactor)
    await store.open()
    specs = [JobSpec(command=("true",), queue="default") for _ in range(3)]
    await store.submit(specs, 1000.0, [ids.new() for _ in specs], owner="ann")
    await store.close()
    conn = sqlite3.connect(path)
    # Back to schema 11: without the counts, and without what the
    # migrations after 12 added (13: the events' rows of several jobs;
    # 14: the batches' ranges for the index they replaced; 15: the
    # dispatcher serving a remote worker's lease).
    conn.execute("DROP TABLE job_counts")
    conn.execute("ALTER TABLE events DROP COLUMN jobs")
    conn.execute("ALTER TABLE events DROP COLUMN job_ids")
    conn.execute("DROP TABLE batches")
    conn.execute("CREATE INDEX jobs_batch ON jobs (batch_id) WHERE batch_id IS NOT NULL")
    conn.execute("ALTER TABLE jobs DROP COLUMN lease_server")
    assert len(MIGRATIONS) == 15
    conn.execute("PRAGMA user_version = 11")
    conn.commit()
    migrate(conn, path)
    conn.close()
    store = SQLiteJobStore(path, reactor)
    await store.open()
    try:
        assert store.job_counts() == {"default": {JobState.QUEUED: 3}}
        assert store.job_counts("ann") == {"default": {JobState.QUEUED: 3}}
        await store.submit([JobSpec(command=("true",))], 1001.0, [ids.new()], owner="bob")
        assert store.job_counts() == {"default": {JobState.QUEUED: 4}}
        assert store.job_counts("bob") == {"default": {JobState.QUEUED: 1}}
        assert store.job_counts("cy") == {}
    finally:
        await store.close()
    assert fresh_counts(path)[0] == fresh_counts(path)[1]


@pytest_twisted.ensureDeferred
async def test_a_change_and_a_removal_in_one_group(tmp_path):
    """A job whose change the recorder must look up (a group's cancel) and
    that is removed later in the same commit is counted off its queue as
    it was cancelled, not lost."""
    store = counted_store(tmp_path, "db")
    await store.open()
    try:
        array_id = ids.new()
        specs = [JobSpec(command=("true",), queue="slow", array_id=array_id, array_index=i)
                 for i in range(2)]
        job_ids = [ids.new() for _ in specs]
        await store.submit(specs, 1000.0, job_ids, owner="ann")
        # Asked for in one reactor turn: one group, in this order.
        cancelled = store.cancel_group(GroupKind.ARRAY, array_id, 1001.0)
        removed = store.remove(job_ids[0], 1001.0)
        await cancelled
        await removed
        assert store.batches >= 2
        assert store.job_counts() == {"slow": {JobState.CANCELLED: 1}}
        assert store.job_counts("ann") == {"slow": {JobState.CANCELLED: 1}}
    finally:
        await store.close()
    scanned, kept = fresh_counts(str(tmp_path / "db.sqlite3"))
    assert kept == scanned == {("slow", "cancelled", "ann"): 1}
