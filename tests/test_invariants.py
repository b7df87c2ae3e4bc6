"""
A Hypothesis state machine over the store and its scheduling rules: random
sequences of submit, claim (start), finish, fail, cancel, retry, clock
advances and restarts, checking after every step the invariants users rely
on.
"""

import os
import pathlib
import sqlite3
import tempfile

import pytest
import pytest_twisted
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from dispatcher.model._jobs import FINAL_STATES, JobIds, JobSpec, JobState, Offer, Outcome
from dispatcher.model._jobs import InvalidTransition, StaleLease
from dispatcher.store._results import DependencyNotRetried
from tests.store_contract import moved, no_jitter
from tests.postgres import drop_databases
from tests.test_store_contract import STORES, sqlite_store

HOLDER = "local@test"
ids = JobIds()


def block(d):
    return pytest_twisted.blockon(d)


class Scheduling(RuleBasedStateMachine):
    """The store under random operations, against what must always hold."""

    # The store under test: a factory of tests/test_store_contract.py.
    factory = staticmethod(sqlite_store)

    @initialize()
    def open(self):
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.dir = tempfile.mkdtemp(dir=base)
        self.now = 1000.0
        self.store = self._open()
        self.jobs = []  # ids in submission order
        self.leases = {}  # job id -> lease we hold
        self.final = {}  # job id -> final state seen, until an explicit retry
        self.attempts_seen = {}  # job id -> number of attempts seen
        self.specs = {}

    def _open(self):
        store = self.factory(pathlib.Path(self.dir), "db", backoff=no_jitter)
        block(store.open())
        return store

    def teardown(self):
        block(self.store.close())
        for name in os.listdir(self.dir):
            os.unlink(os.path.join(self.dir, name))
        os.rmdir(self.dir)
        # A PostgreSQL store's databases (none for SQLite's).
        drop_databases(self.dir)

    def _job(self, job_id):
        return block(self.store.get(job_id))

    # Rules

    @rule(
        priority=st.integers(-2, 2),
        wait=st.sampled_from([None, 0.0, 5.0, 30.0]),
        attempts=st.integers(1, 3),
        delay=st.sampled_from([0.0, 10.0]),
        deps=st.lists(st.integers(0, 50), max_size=2, unique=True),
        owner=st.sampled_from([None, "ann", "bob"]),
    )
    def submit(self, priority, wait, attempts, delay, deps, owner):
        depends = tuple(self.jobs[d] for d in deps if d < len(self.jobs))
        spec = JobSpec(
            command=("true",),
            priority=priority,
            not_before=None if wait is None else self.now + wait,
            max_attempts=attempts,
            retry_delay=delay,
            depends_on=depends,
        )
        job_id = ids.new()
        (job,) = block(self.store.submit([spec], self.now, [job_id], owner=owner)).value.jobs
        self.jobs.append(job_id)
        self.specs[job_id] = spec
        if job.state in FINAL_STATES:
            self.final[job_id] = job.state

    @rule(n=st.integers(1, 4))
    def claim(self, n):
        queued_before = [self._job(j) for j in self.jobs]
        eligible = [j for j in queued_before if j.state is JobState.QUEUED]
        claimed = block(self.store.claim(Offer(HOLDER, 1), n, self.now, 3600)).leases
        assert len(claimed) == min(n, len(eligible))
        # Highest priority first, first in first out within a priority.
        order = sorted(eligible, key=lambda j: (-j.spec.priority, self.jobs.index(j.id)))
        assert [l.job_id for l in claimed] == [j.id for j in order[: len(claimed)]]
        for lease in claimed:
            job = self._job(lease.job_id)
            # Never before not_before, never before its dependencies succeed.
            spec = self.specs[lease.job_id]
            if spec.not_before is not None:
                assert self.now >= spec.not_before
            for dep in job.spec.depends_on:
                assert self._job(dep).state is JobState.SUCCEEDED
            assert lease.job_id not in self.leases
            self.leases[lease.job_id] = lease

    @precondition(lambda self: self.leases)
    @rule(data=st.data(), succeed=st.booleans())
    def finish(self, data, succeed):
        job_id = data.draw(st.sampled_from(sorted(self.leases)))
        lease = self.leases.pop(job_id)
        outcome = Outcome.from_exit_code(0 if succeed else 1)
        block(self.store.finish(lease, outcome, self.now))
        self._note_finished()
        # A second report of the same attempt changes nothing.
        with pytest.raises(StaleLease):
            block(self.store.finish(lease, outcome, self.now))

    @precondition(lambda self: self.jobs)
    @rule(data=st.data())
    def cancel(self, data):
        job_id = data.draw(st.sampled_from(self.jobs))
        try:
            job, lease = block(self.store.cancel(job_id, self.now)).value
        except InvalidTransition:
            assert job_id in self.final
            return
        if lease is None:
            self.final[job_id] = JobState.CANCELLED
        else:
            # The holder stops it and reports the end.
            held = self.leases.pop(job_id)
            block(self.store.finish(held, Outcome.from_exit_code(-15), self.now))
            assert self._job(job_id).state is JobState.CANCELLED
            self.final[job_id] = JobState.CANCELLED
        self._note_finished()

    @precondition(lambda self: self.final)
    @rule(data=st.data(), dependents=st.booleans())
    def retry(self, data, dependents):
        job_id = data.draw(st.sampled_from(sorted(self.final)))
        try:
            written = block(self.store.retry(job_id, self.now, dependents))
        except (InvalidTransition, DependencyNotRetried):
            return
        for changed_id, state in moved(written):
            self.final.pop(changed_id, None)

    @rule(seconds=st.sampled_from([1.0, 5.0, 20.0, 60.0]))
    def advance(self, seconds):
        self.now += seconds
        block(self.store.promote_due(self.now))

    @rule()
    def restart(self):
        """The daemon is killed and starts again: leases it held are lost."""
        block(self.store.close())
        self.store = self._open()
        block(self.store.recover(HOLDER, self.now))
        self.leases.clear()
        self._note_finished()

    def _note_finished(self):
        """Remember every job now finished: from here on only an explicit
        retry may change it."""
        for job_id in self.jobs:
            if job_id not in self.final:
                job = self._job(job_id)
                if job.state in FINAL_STATES:
                    self.final[job_id] = job.state

    # Invariants

    @invariant()
    def finished_jobs_stay_finished(self):
        for job_id, state in self.final.items():
            assert self._job(job_id).state is state

    @invariant()
    def each_owners_unfinished_jobs_are_counted(self):
        # What a quota of unfinished jobs is checked against, kept by the
        # store at each change, is what the jobs' states say.
        counted = {}
        for job_id in self.jobs:
            job = self._job(job_id)
            if job.owner is not None and job.state not in FINAL_STATES:
                counted[job.owner] = counted.get(job.owner, 0) + 1
        assert block(self.store.unfinished_jobs()) == counted

    @invariant()
    def attempts_only_grow_and_one_lease_at_most(self):
        for job_id in self.jobs:
            job = self._job(job_id)
            numbers = [a.number for a in job.attempts]
            assert numbers == list(range(1, len(numbers) + 1))
            assert len(numbers) >= self.attempts_seen.get(job_id, 0)
            self.attempts_seen[job_id] = len(numbers)
            live = [a for a in job.attempts if a.finished_at is None]
            assert len(live) <= 1
            assert bool(live) == job.state.active
            assert (job_id in self.leases) == job.state.active



class SQLiteScheduling(Scheduling):
    """The SQLite store under the same operations, and what must hold of
    its rows."""

    @invariant()
    def only_staging_and_running_jobs_hold_a_lease(self):
        # Start-up finds leased jobs through the state index on this.
        conn = sqlite3.connect(os.path.join(self.dir, "db.sqlite3"))
        try:
            for state, token, holder in conn.execute(
                "SELECT state, lease_token, lease_holder FROM jobs"
            ):
                leased = state in ("staging", "running")
                assert (token is not None) == leased, (state, token)
                assert (holder is not None) == leased, (state, holder)
        finally:
            conn.close()


SETTINGS = settings(
    max_examples=100,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

# The SQLite store with its own invariant; any other store of the contract
# under the common ones.
TestSQLiteScheduling = SQLiteScheduling.TestCase
TestSQLiteScheduling.settings = SETTINGS
for _name, _factory in STORES.items():
    if _name != "sqlite":
        _machine = type(f"Scheduling_{_name}", (Scheduling,), {"factory": staticmethod(_factory)})
        globals()[f"TestScheduling_{_name}"] = _machine.TestCase
        _machine.TestCase.settings = SETTINGS
