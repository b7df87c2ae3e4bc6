"""
Each owner's unfinished jobs (pending, queued, staging or running), counted
by the store's single writer as it changes them: what a quota of
unfinished jobs per owner is checked against, exactly and without a scan.

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
from typing import Optional

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
