"""
The SQLite store's group-commit writer: one thread that owns the only
writing connection and commits the write commands
(L{dispatcher.store._writes}) in groups.

Every write asked for while a transaction is being committed (or in the
same reactor iteration as the first) waits for the next one, which takes
all of them at once, each in its own savepoint so that a failing write
changes nothing while its neighbours commit.  Every write's Deferred fires
only after the commit that holds it.

A commit that holds a durable write (L{DURABLE}: one a client is told is
done) syncs to the disk before its answer; one of run-state changes alone
syncs within C{sync_interval}, or with the next commit that does.

The writer knows commands and connections, not jobs: what a command does
is the operation it is given for the command's class.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Any, Callable, Mapping, Optional, Sequence

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from dispatcher._threads import TaskThreads
from dispatcher.model._jobs import StoreClosed
from dispatcher.store._mark import BUMP, Mark, MarkFile
from dispatcher.store._results import CommitFailed, StoreError, WriteRefused
from dispatcher.store._writes import DURABLE, Write

log = Logger()

# An operation: a connection and a command's fields in, the write's answer
# out.
Operation = Callable[..., Any]
# A shared path: which writes it takes (a run of them next to each other),
# and what stores such a run at once, with an answer for each.
SharedPath = tuple[Callable[[Write], bool], Callable[[sqlite3.Connection, list], list]]


class Replay(Exception):
    """
    A group's shared path met a case it leaves to the writes one by one.
    """


def store_error(error: Exception) -> StoreError:
    """
    The store's own error for what SQLite (or the file system) raised
    while writing: L{WriteRefused} for a broken constraint (the same write
    would be refused again), else L{CommitFailed}.
    """
    kind = WriteRefused if isinstance(error, sqlite3.IntegrityError) else CommitFailed
    failed = kind(str(error))
    failed.__cause__ = error
    return failed


class GroupWriter:
    """
    The writer thread and its group commit, on one SQLite file in WAL mode.

    @param path: the database file (its C{-wal} file is what a sync makes
        durable).
    @param reactor: the reactor the Deferreds fire in, and in whose next
        iteration a group starts.
    @param operations: the operation that applies each kind of write, with
        the connection and the write's fields as its arguments.
    @param shared: the shared paths a group's runs of like writes take,
        tried in order.
    @param sync_interval: seconds a commit of run-state changes alone may
        wait to reach the disk; 0 syncs every commit.
    @param clock: the clock that times those syncs.
    @param mark: the mark file each commit's sequence number is checked
        against at the next start (see L{dispatcher.store._mark}); none,
        no numbering.

    @ivar mark: the mark file, if any.
    @ivar last_commit: the last commit's L{Mark}.
    @ivar connection: the writing connection, once L{start} has opened it.
    @ivar batches: how many groups were committed.
    @ivar durable_batches: how many of those synced the disk.
    @ivar syncs: how many syncs made run-state commits durable.
    """

    def __init__(
        self,
        path: str,
        reactor: Any,
        operations: Mapping[type, Operation],
        shared: Sequence[SharedPath],
        sync_interval: float,
        clock: Any,
        mark: Optional[MarkFile] = None,
    ) -> None:
        self._path = path
        self._reactor = reactor
        self._operations = operations
        self._shared = shared
        self._sync_interval = sync_interval
        self._clock = clock
        self._threads = TaskThreads(reactor, 1, name="store-writer")
        self.connection: Optional[sqlite3.Connection] = None
        self._pending: list[tuple[Write, Deferred]] = []
        self._flushing = False
        self._syncer: Optional[LoopingCall] = None
        # The writer thread's own: the connection's synchronous setting,
        # and whether a commit since the last sync has not reached the disk.
        self._synchronous_full = True
        self.unsynced = False
        self.syncs = 0
        self.batches = 0
        self.durable_batches = 0
        self._closing: Optional[Deferred] = None
        self._shut = False
        # The writer thread's own: the last commit's number and time (the
        # open sets them from the database).
        self.mark = mark
        self.last_commit = Mark(0, 0.0)

    @property
    def started(self) -> bool:
        """
        Whether the writer thread has been started.
        """
        return self._threads.started

    def start(self, open_connection: Callable[[], sqlite3.Connection]) -> Deferred:
        """
        Start the writer thread and open the writing connection on it with
        C{open_connection}; then sync every C{sync_interval} seconds.
        """
        self._threads.start()

        def opened(conn: sqlite3.Connection) -> None:
            self.connection = conn
            if self._sync_interval > 0:
                self._syncer = LoopingCall(self.sync)
                self._syncer.clock = self._clock
                self._syncer.start(self._sync_interval, now=False).addErrback(
                    lambda f: log.failure("syncing the store stopped", f)
                )

        return self._threads.defer(open_connection).addCallback(opened)

    def sync(self) -> Deferred:
        """
        Make every commit so far durable; fires once it is.
        """
        if self._closing is not None and self._shut:
            return succeed(None)
        return self._threads.defer(self._sync_in_thread)

    def _sync_in_thread(self) -> None:
        self._sync_log()
        if self.mark is not None and self.connection is not None:
            # After the log's sync: the mark never runs ahead of the disk.
            self.mark.write(self.last_commit, sync=True)

    def _sync_log(self) -> None:
        # Runs on the writer thread between groups: no commit is under way.
        if not self.unsynced or self.connection is None:
            return
        try:
            fd = os.open(self._path + "-wal", os.O_RDONLY)
        except FileNotFoundError:
            # Checkpointed and gone: the database file holds it all.
            self.unsynced = False
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self.unsynced = False
        self.syncs += 1

    def close(self, then: Callable[[], None]) -> Deferred:
        """
        Finish the writes already asked for, sync, close the connection and
        stop the thread; then call C{then}.  Fires after it; every write
        asked for from now on fails with L{StoreClosed}.
        """
        if self._closing is None:
            self._closing = Deferred()
            self._closing.addCallback(lambda _: then())
            if not self._flushing:
                self._shutdown()
        d: Deferred = Deferred()
        self._closing.addBoth(lambda r: (d.callback(None), r)[1])
        return d

    @property
    def closing(self) -> bool:
        """
        Whether L{close} has been asked for.
        """
        return self._closing is not None

    def _shutdown(self) -> None:
        if self._shut:
            return
        self._shut = True
        assert self._closing is not None
        if not self._threads.started:
            # Never started: nothing to finish.
            self._closing.callback(None)
            return

        if self._syncer is not None and self._syncer.running:
            self._syncer.stop()

        def close_all() -> None:
            self._sync_in_thread()
            if self.connection is not None:
                self.connection.close()
                self.connection = None
            if self.mark is not None:
                self.mark.close()

        def closed(result: Any) -> None:
            self._threads.stop()
            assert self._closing is not None
            self._closing.callback(None)

        self._threads.defer(close_all).addBoth(closed)

    def write(self, write: Write) -> Deferred:
        """
        Apply C{write} in the next group; fires after the commit that holds
        it.  That commit syncs to the disk first if the write is durable
        (submissions, cancels, retries: a client is told they are done).
        A change of run state alone (a claim, a start, an end) does not
        wait for the sync: a power loss within C{sync_interval} of its
        commit may undo it, and the job then runs again, as one that was
        running when the power went does.  A crash of the daemon alone
        undoes nothing: the commit is in the kernel's hands.
        """
        if self._closing is not None:
            return fail(StoreClosed("the dispatcher is stopping"))
        d: Deferred = Deferred()
        self._pending.append((write, d))
        if not self._flushing:
            # The group starts at the end of this reactor iteration, so
            # that every request read in it joins.  Started at once, it
            # took only the first of the requests that came in together
            # after the last commit's answers went out, and every other
            # commit under load held a single job.
            self._flushing = True
            self._reactor.callLater(0, self._flush)
        return d

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        self._flushing = True
        work = [write for write, _ in batch]
        durable = self._sync_interval <= 0 or any(type(write) in DURABLE for write in work)
        d = self._threads.defer(self._commit, work, durable)
        d.addBoth(self._flushed, [deferred for _, deferred in batch])

    def _commit(self, work: list[Write], durable: bool = True) -> list[tuple[bool, Any]]:
        conn = self.connection
        assert conn is not None
        results: list[tuple[bool, Any]] = []
        try:
            if durable != self._synchronous_full:
                # In WAL mode FULL syncs the log at every commit; NORMAL
                # leaves it to the next FULL commit, the next sync or a
                # checkpoint.
                conn.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")
                self._synchronous_full = durable
            conn.execute("BEGIN IMMEDIATE")
            try:
                try:
                    results = self._run_together(conn, work)
                except Exception:
                    # The group is the whole transaction: undo it all
                    # (unless SQLite already has, as it does for a full
                    # disk) and run each write in its own savepoint, so
                    # that only the one that failed fails.  (A savepoint
                    # around the group cost every page the group changed a
                    # copy in the sub-journal, and past 64 KiB a temporary
                    # file, most groups under load.  Writes seldom fail; a
                    # write is undone whole or not at all either way.  What
                    # a replayed write did outside the database is harmless
                    # to do twice: it takes fresh lease tokens, and moves
                    # the queues' turn on.)
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    conn.execute("BEGIN IMMEDIATE")
                    results = [self._apply_one(conn, write) for write in work]
                if self.mark is not None:
                    made = Mark(self.last_commit.seq + 1, self._clock.seconds())
                    conn.execute(BUMP, (made.seq, made.at))
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except (sqlite3.Error, OSError) as e:
            raise store_error(e) from e
        self.unsynced = not durable
        self.batches += 1
        self.durable_batches += durable
        if self.mark is not None:
            self.last_commit = made
            if durable:
                # On the disk now: mark it (written, not synced; after a
                # crash of the daemon alone the kernel still holds it,
                # and the periodic sync makes it durable).
                try:
                    self.mark.write(made)
                except OSError as e:
                    log.warn(
                        "the store's mark file {path} could not be written: {error}",
                        path=self.mark.path,
                        error=e,
                    )
        return results

    def _apply_one(self, conn: sqlite3.Connection, write: Write) -> tuple[bool, Any]:
        """
        Run one write in its own savepoint: if it fails, what it did is
        undone and the rest of its group goes on.
        """
        conn.execute("SAVEPOINT operation")
        try:
            value = self._operations[type(write)](conn, *write)
        except Exception as e:
            conn.execute("ROLLBACK TO operation")
            conn.execute("RELEASE operation")
            if isinstance(e, (sqlite3.Error, OSError)):
                return (False, Failure(store_error(e)))
            return (False, Failure())
        conn.execute("RELEASE operation")
        return (True, value)

    def _run_together(
        self, conn: sqlite3.Connection, work: list[Write]
    ) -> list[tuple[bool, Any]]:
        """
        Run a group's writes one after the other (a savepoint for each was
        a tenth of the writer's time for a job); the first that fails
        raises, and L{_commit} replays the group one write at a time.

        A run of two or more writes that a shared path takes (plain
        submissions, plain successes) is stored by it at once.
        """
        results: list[tuple[bool, Any]] = []
        operations = self._operations
        shared = self._shared
        i = 0
        while i < len(work):
            for alike, together in shared:
                j = i
                while j < len(work) and alike(work[j]):
                    j += 1
                if j - i > 1:
                    results.extend((True, w) for w in together(conn, work[i:j]))
                    i = j
                    break
            else:
                write = work[i]
                results.append((True, operations[type(write)](conn, *write)))
                i += 1
        return results

    def _flushed(self, outcome: Any, deferreds: list[Deferred]) -> None:
        # Still flushing while the callbacks run: a write one of them asks
        # for joins the next group, which starts once they are done.
        if isinstance(outcome, Failure):
            # The commit itself failed (a full disk, say): nothing of the
            # batch was written, and every writer hears so.
            log.failure("store commit failed", outcome)
            for d in deferreds:
                d.errback(outcome)
        else:
            for d, (ok, value) in zip(deferreds, outcome):
                if ok:
                    d.callback(value)
                else:
                    d.errback(value)
        self._flushing = False
        if self._pending:
            self._flush()
        elif self._closing is not None and not self._closing.called:
            self._shutdown()

    def run(self, function: Callable[..., Any], *args: Any) -> Deferred:
        """
        Run C{function(*args)} on the writer thread, between groups.
        """
        return self._threads.defer(function, *args)
