"""
What the store's single writer counts as it changes jobs, exactly and
without a scan: each owner's unfinished jobs (L{OwnerCounts}), and every
job by queue, state and owner (L{StateCounts}, below).

Each owner's unfinished jobs (pending, queued, staging or running) are
what a quota of unfinished jobs per owner is checked against.

The count is kept in memory on the writer thread and follows the
transactions: a write changes it as it changes rows (L{OwnerCounts.add}),
and the change holds once the commit does; a write undone (its savepoint
rolled back, or the whole group's transaction) undoes its changes of the
count too.  The writer tells it where its transactions and savepoints
begin and end (L{dispatcher.store._writer.GroupWriter}'s C{journal}).

Counted where a job starts or stops being unfinished: its submission, its
end (an attempt's, a cancel's, a dependency's), and a retry.  It is read
whole from the database when the store opens (one pass over the
unfinished jobs), so that a migration or another process's change of the
file is counted too.  A trigger on the jobs table would count the same in
SQLite itself; it cost every change of a job's state about 7 µs on the
writer (twice a plain end's time), even one that fires nothing.
"""

from __future__ import annotations

import sqlite3
import threading
from typing import Any, Optional, Sequence

from dispatcher.model._events import JobEvent, SameChange
from dispatcher.model._jobs import FINAL_STATES, JobState

# The states of an unfinished job, as the jobs table writes them.
UNFINISHED = tuple(s.value for s in JobState if s not in FINAL_STATES)


class OwnerCounts:
    """
    Each owner's unfinished jobs, with the changes of the transaction
    under way kept apart until it commits.  Jobs without an owner (stored
    before owners) are not counted.
    """

    def __init__(self) -> None:
        self._committed: dict[str, int] = {}
        # The open transaction's changes, summed by owner, and one by one
        # (so that a savepoint rolled back takes back its own).
        self._pending: dict[str, int] = {}
        self._journal: list[tuple[str, int]] = []

    def load(self, conn: sqlite3.Connection) -> None:
        """
        Count every owner's unfinished jobs in the database on C{conn}.
        """
        marks = ", ".join("?" * len(UNFINISHED))
        self._committed = dict(
            conn.execute(
                "SELECT owner, COUNT(*) FROM jobs INDEXED BY jobs_state"
                f" WHERE state IN ({marks}) AND owner IS NOT NULL GROUP BY owner",
                UNFINISHED,
            ).fetchall()
        )
        self._pending.clear()
        self._journal.clear()

    def add(self, owner: Optional[str], jobs: int) -> None:
        """
        C{jobs} more (or, negative, fewer) of C{owner}'s jobs are
        unfinished, in the transaction under way.
        """
        if owner is None or not jobs:
            return
        self._pending[owner] = self._pending.get(owner, 0) + jobs
        self._journal.append((owner, jobs))

    def unfinished(self, owner: Optional[str]) -> int:
        """
        C{owner}'s unfinished jobs, the transaction under way's changes
        included.
        """
        if owner is None:
            return 0
        return self._committed.get(owner, 0) + self._pending.get(owner, 0)

    def committed(self) -> dict[str, int]:
        """
        Each owner's unfinished jobs as last committed (owners with none
        left out).
        """
        return dict(self._committed)

    # What the writer tells of its transactions.

    def savepoint(self) -> int:
        """
        Mark where a savepoint begins; L{rollback_to} takes this mark.
        """
        return len(self._journal)

    def rollback_to(self, mark: int) -> None:
        """
        Take back the changes made since the savepoint C{mark}.
        """
        for owner, jobs in self._journal[mark:]:
            self._pending[owner] -= jobs
        del self._journal[mark:]

    def commit(self) -> None:
        """
        The transaction committed: its changes hold.
        """
        for owner, jobs in self._pending.items():
            total = self._committed.get(owner, 0) + jobs
            if total:
                self._committed[owner] = total
            else:
                self._committed.pop(owner, None)
        self._pending.clear()
        self._journal.clear()

    def rollback(self) -> None:
        """
        The transaction was rolled back: its changes are gone.
        """
        self._pending.clear()
        self._journal.clear()


# The table the writer keeps the counts of jobs by queue, state and owner
# in (migration 12), and how a group's changes are added to it.  A job
# without an owner is counted under '' (a principal's name is never
# empty).
NO_OWNER = ""
_ADD_TO_COUNT = (
    "INSERT INTO job_counts (queue, state, owner, jobs) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (queue, state, owner) DO UPDATE SET jobs = job_counts.jobs + excluded.jobs"
)
_STATES = {state.value: state for state in JobState}


class StateCounts:
    """
    Every job counted by queue, state and owner, kept by the store's
    single writer at each change rather than counted by a scan: what
    C{GET /v1/queues} and the metrics' jobs by state answer from.

    The counts are a table of the database (C{job_counts}, migration 12),
    changed in the transaction of each group of writes, so that they are
    exactly what the jobs' rows say after a commit, a rollback, a restart
    or a kill -9; and a copy in memory, changed once the commit holds,
    that readers on any thread take under a lock without reading the
    database.

    A group's changes come from what its writes report: every change of a
    job's state (L{dispatcher.store._results.Written.changed}, a claim's
    leases), as the recorder has made them into events with each job's
    queue and owner (L{count_events}), and every job removed
    (L{removed}, told by the removal as it deletes the rows, in the
    write's savepoint).  A change whose job was removed later in the same
    group, so that the recorder found no row to read its queue from, takes
    its queue and owner from the removal.

    Kept by the writer's own code rather than by triggers on the jobs
    table: triggers that kept the same table cost a no-op job 26 us more
    of the writer's CPU (127.8 against 101.7 us a job without counts,
    medians of eleven alternating rounds of 2,000 jobs submitted, claimed
    and finished in groups of 20: bench/counts_cost.py); this costs 1.7 us
    (103.4).  A second run: 157.1 with triggers, 120.6 with this, 123.1
    without (this one's cost is within the rounds' noise).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # As committed: queue -> state -> jobs, and owner -> queue ->
        # state -> jobs (zeros left out).
        self._by_queue: dict[str, dict[str, int]] = {}
        self._by_owner: dict[str, dict[str, dict[str, int]]] = {}
        # The open transaction's changes: (queue, owner, state) -> jobs.
        self._pending: dict[tuple[str, str, str], int] = {}
        # The removals of the open transaction, one by one (so that a
        # savepoint rolled back takes back its own), and the queue and
        # owner of each job removed in it.
        self._journal: list[tuple[str, str, str]] = []
        self._removed: dict[str, tuple[str, str]] = {}

    def load(self, conn: sqlite3.Connection) -> None:
        """
        Read the counts from the database on C{conn} (the table is small:
        a row for each queue, state and owner that has held jobs).
        """
        by_queue: dict[str, dict[str, int]] = {}
        by_owner: dict[str, dict[str, dict[str, int]]] = {}
        for queue, state, owner, jobs in conn.execute(
            "SELECT queue, state, owner, jobs FROM job_counts WHERE jobs != 0"
        ):
            _add(by_queue, by_owner, queue, owner, state, jobs)
        with self._lock:
            self._by_queue, self._by_owner = by_queue, by_owner
        self._pending.clear()
        self._journal.clear()
        self._removed.clear()

    # What the operations tell, on the writer thread.

    def removed(self, job_id: str, queue: str, owner: Optional[str], state: str) -> None:
        """
        The job C{job_id} of C{queue} and C{owner}, in C{state} (its
        value), is deleted in the transaction under way.
        """
        owner_key = NO_OWNER if owner is None else owner
        key = (queue, owner_key, state)
        self._pending[key] = self._pending.get(key, 0) - 1
        self._journal.append(key)
        self._removed[job_id] = (queue, owner_key)

    def count_events(self, conn: sqlite3.Connection, events_by_write: Sequence[Sequence[Any]]) -> None:
        """
        Count the changes of state of a group, from the events its writes
        made (each job event with its queue and owner, and the state it
        left: none for a new job), and add the group's changes to the
        table, in its transaction.  Runs once a group, after its writes.
        """
        pending = self._pending
        removed = self._removed
        for events in events_by_write:
            if type(events) is SameChange:
                # Counted at once (a batch's jobs, new and queued).
                owner = NO_OWNER if events.owner is None else events.owner
                key = (events.spec.queue, owner, events.state._value_)
                pending[key] = pending.get(key, 0) + len(events)
                continue
            for event in events:
                spec = event.spec if type(event) is JobEvent else _NOT_A_JOB
                if spec is _NOT_A_JOB:
                    continue
                if spec is None:
                    # Removed later in the group: the removal knew it.
                    facts = removed.get(event.job_id)
                    if facts is None:
                        continue
                    queue, owner = facts
                else:
                    queue = spec.queue
                    owner = NO_OWNER if event.owner is None else event.owner
                key = (queue, owner, event.state._value_)
                pending[key] = pending.get(key, 0) + 1
                previous = event.previous
                if previous is not None:
                    key = (queue, owner, previous._value_)
                    pending[key] = pending.get(key, 0) - 1
        rows = [(q, s, o, n) for (q, o, s), n in pending.items() if n]
        if rows:
            conn.executemany(_ADD_TO_COUNT, rows)

    # What the writer tells of its transactions.

    def savepoint(self) -> int:
        """
        Mark where a savepoint begins; L{rollback_to} takes this mark.
        """
        return len(self._journal)

    def rollback_to(self, mark: int) -> None:
        """
        Take back the removals told since the savepoint C{mark}.
        """
        for key in self._journal[mark:]:
            self._pending[key] += 1
        del self._journal[mark:]

    def commit(self) -> None:
        """
        The transaction committed: its changes hold.
        """
        if self._pending:
            with self._lock:
                by_queue, by_owner = self._by_queue, self._by_owner
                for (queue, owner, state), jobs in self._pending.items():
                    if jobs:
                        _add(by_queue, by_owner, queue, owner, state, jobs)
        self.rollback()

    def rollback(self) -> None:
        """
        The transaction was rolled back (or has committed): forget its
        changes.
        """
        self._pending.clear()
        self._journal.clear()
        self._removed.clear()

    # What readers ask, on any thread.

    def by_queue(self, owner: Optional[str] = None) -> dict[str, dict[JobState, int]]:
        """
        C{{queue: {state: jobs}}} as last committed, for every queue that
        holds jobs (states without any left out); only C{owner}'s jobs, if
        it is given.
        """
        with self._lock:
            if owner is None:
                source = self._by_queue
            else:
                source = self._by_owner.get(owner, {})
            return {
                queue: {_STATES[state]: jobs for state, jobs in states.items()}
                for queue, states in source.items()
            }


# Not a job event's spec (a worker's event has none).
_NOT_A_JOB = object()


def _add(
    by_queue: dict[str, dict[str, int]],
    by_owner: dict[str, dict[str, dict[str, int]]],
    queue: str,
    owner: str,
    state: str,
    jobs: int,
) -> None:
    for counts in (by_queue.setdefault(queue, {}),
                   by_owner.setdefault(owner, {}).setdefault(queue, {})):
        total = counts.get(state, 0) + jobs
        if total:
            counts[state] = total
        else:
            counts.pop(state, None)


class Journals:
    """
    Several journals (L{dispatcher.store._writer.Journal}) told together,
    in order.
    """

    def __init__(self, *journals: Any) -> None:
        self._journals = journals

    def savepoint(self) -> tuple[int, ...]:  # type: ignore[override]
        """
        Each journal's mark.
        """
        return tuple(j.savepoint() for j in self._journals)

    def rollback_to(self, mark: Any) -> None:
        """
        Take each journal back to its mark.
        """
        for journal, own in zip(self._journals, mark):
            journal.rollback_to(own)

    def commit(self) -> None:
        """
        Tell each journal its transaction committed.
        """
        for journal in self._journals:
            journal.commit()

    def rollback(self) -> None:
        """
        Tell each journal its transaction was rolled back.
        """
        for journal in self._journals:
            journal.rollback()
