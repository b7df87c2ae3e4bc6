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

A failed commit is logged at most once a minute, with how many writes
failed meanwhile (a full disk fails every write until it is freed), and
once more when commits write again.  The sync loop also watches the
write-ahead log: SQLite's own checkpoints fail in silence (a full disk, a
database file that cannot be written), so a log past L{WAL_WATCH} bytes is
checkpointed here, and a failure said.  Neither a failed sync nor a failed
checkpoint stops the loop: each is tried again at its next turn.  A
commit that waits more than C{lock_warning} seconds for the database's
write lock (another process holds it) says so.

The writer knows commands and connections, not jobs: what a command does
is the operation it is given for the command's class.  What a group
changed is stored as events by the recorder it is given, after the
group's writes and in its transaction; once the group has committed, each
write's events go to whoever L{GroupWriter.committed} names just before
that write is answered: in the order of their ids, and each where its
change was told before events had ids (a claim that took every queued job
is answered before the submissions after it in its group are, and the
scheduler counts those as queued after the claim).
"""

from __future__ import annotations

import errno
import os
import sqlite3
import time
from typing import Any, Callable, Mapping, Optional, Protocol, Sequence

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from dispatcher._threads import TaskThreads
from dispatcher._throttle import Throttle
from dispatcher.model._jobs import StoreClosed
from dispatcher.store._mark import BUMP, Mark, MarkFile
from dispatcher.store._results import CommitFailed, StorageFull, StoreError, WriteRefused
from dispatcher.store._writes import DURABLE, Write

log = Logger()

# An operation: a connection and a command's fields in, the write's answer
# out.
Operation = Callable[..., Any]
# A shared path: which writes it takes (a run of them next to each other),
# and what stores such a run at once, with an answer for each.
SharedPath = tuple[Callable[[Write], bool], Callable[[sqlite3.Connection, list], list]]
# What stores a group's events: the connection, the group's writes and
# their results (C{(ok, value)} each) in, each write's events stored out.
EventRecorder = Callable[[sqlite3.Connection, list, list], list]


# The write-ahead log's size past which the sync loop checkpoints it itself
# and says if that fails.  SQLite checkpoints at commits once the log holds
# 1000 pages (4 MiB); a log far past that means those checkpoints fail (a
# full disk, a database file that cannot be written) or a reader holds
# them back.  The log is also cut back to this size once a checkpoint has
# taken all of it.
WAL_WATCH = 64 * 1024 * 1024

# How long a commit waits for the database's write lock (another process
# holds it) before that is logged, and how long in all before it fails.
LOCK_WARNING = 5.0
LOCK_TIMEOUT = 30.0

# How often the write-ahead log is watched when commits are never left to
# sync later (sync_interval = 0).
WATCH_INTERVAL = 1.0

# SQLite's result codes (sqlite3.Error.sqlite_errorcode) that say the disk
# took no more: a full disk (SQLITE_FULL), and the I/O errors a full disk
# gives as well: a failed write (SQLite reports ENOSPC on a write as
# SQLITE_FULL, but a short write on some file systems as this), a failed
# fsync (thin-provisioned and network storage fail it when out of space),
# and the shared-memory index that could not grow.
SQLITE_BUSY = 5
SQLITE_FULL = 13
_IOERR = 10
FULL_CODES = frozenset(
    {
        SQLITE_FULL,
        _IOERR | (3 << 8),  # SQLITE_IOERR_WRITE
        _IOERR | (4 << 8),  # SQLITE_IOERR_FSYNC
        _IOERR | (5 << 8),  # SQLITE_IOERR_DIR_FSYNC
        _IOERR | (19 << 8),  # SQLITE_IOERR_SHMSIZE
    }
)
# The errno values of a file system that takes no more.
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def storage_full(error: BaseException) -> bool:
    """
    Whether C{error}, raised by SQLite or the file system, says the disk
    took no more (see L{FULL_CODES}, L{FULL_ERRNOS}).
    """
    if isinstance(error, OSError):
        return error.errno in FULL_ERRNOS
    if isinstance(error, sqlite3.Error):
        code = getattr(error, "sqlite_errorcode", None)
        if code is not None:
            return code in FULL_CODES
        # Made by hand (in a test, say): SQLite's own message.
        return str(error) == "database or disk is full"
    return False


def _busy(error: sqlite3.Error) -> bool:
    code = getattr(error, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF == SQLITE_BUSY
    return str(error) == "database is locked"


class Journal(Protocol):
    """
    What the operations keep in memory that must follow the database's
    transactions (L{dispatcher.store._counts.OwnerCounts}): told where a
    write's savepoint begins and whether it was rolled back, and whether
    the group's transaction committed or was rolled back.
    """

    def savepoint(self) -> int: ...

    def rollback_to(self, mark: int) -> None: ...

    def commit(self) -> None: ...

    def rollback(self) -> None: ...


class _NoJournal:
    def savepoint(self) -> int:
        return 0

    def rollback_to(self, mark: int) -> None:
        pass

    def commit(self) -> None:
        pass

    def rollback(self) -> None:
        pass


_NO_JOURNAL = _NoJournal()


class Replay(Exception):
    """
    A group's shared path met a case it leaves to the writes one by one.
    """


def store_error(error: Exception) -> StoreError:
    """
    The store's own error for what SQLite (or the file system) raised
    while writing: L{WriteRefused} for a broken constraint (the same write
    would be refused again), L{StorageFull} when the disk took no more,
    else L{CommitFailed}.
    """
    kind: type[StoreError]
    if isinstance(error, sqlite3.IntegrityError):
        kind = WriteRefused
    elif storage_full(error):
        kind = StorageFull
    else:
        kind = CommitFailed
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
    @param clock: the clock that times those syncs, the watch of the
        write-ahead log and how often troubles are logged.
    @param mark: the mark file each commit's sequence number is checked
        against at the next start (see L{dispatcher.store._mark}); none,
        no numbering.
    @param fsync: what syncs the write-ahead log's file descriptor.
    @param journal: what the operations keep in memory alongside the
        database and must follow its transactions (L{Journal}), or
        C{None}.
    @param record: what stores the events of a group (L{EventRecorder}),
        or C{None}.
    @ivar committed: called in the reactor thread with the events of each
        write of a group that committed (never an empty list), in order,
        each just before the write's answer; C{None}: no one.
    @ivar observe_commit: called in the reactor thread after each group
        that committed, before its answers, with the seconds its commit
        took on the writer thread (from its C{BEGIN} to its C{COMMIT},
        its sync included) and how many writes it held; C{None}: no one
        (the metrics' commit latency and group size).
    @ivar fsync: the same, which a test may replace.
    @ivar lock_warning: seconds a commit waits for the write lock before
        it is logged (L{LOCK_WARNING}).
    @ivar lock_timeout: seconds in all a commit waits for it before it
        fails (L{LOCK_TIMEOUT}).
    @ivar wal_watch: the write-ahead log's size in bytes past which the
        sync loop checkpoints it (L{WAL_WATCH}).

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
        fsync: Callable[[int], None] = os.fsync,
        journal: Optional[Journal] = None,
        record: Optional[EventRecorder] = None,
    ) -> None:
        self._path = path
        self._record = record
        self.committed: Optional[Callable[[list], None]] = None
        self.observe_commit: Optional[Callable[[float, int], None]] = None
        # The writer thread's, read once the group is back: how long the
        # last commit took.
        self._commit_seconds = 0.0
        self._journal: Journal = journal if journal is not None else _NO_JOURNAL
        self.fsync = fsync
        self.lock_warning = LOCK_WARNING
        self.lock_timeout = LOCK_TIMEOUT
        self.wal_watch = WAL_WATCH
        # Troubles logged at most once a minute each, with how often they
        # came meanwhile.
        self._commit_trouble = Throttle(clock)
        self._sync_trouble = Throttle(clock)
        self._checkpoint_trouble = Throttle(clock)
        # Set on the writer thread by each commit: whether it changed rows
        # (a commit that changes none succeeds on a full disk too).
        self._commit_wrote = False
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
        C{open_connection}; then sync every C{sync_interval} seconds (and
        watch the write-ahead log), until L{close}.
        """
        self._threads.start()

        def open_writer() -> sqlite3.Connection:
            conn = open_connection()
            # A commit waits for the write lock this long before the wait
            # is logged; then (see _begin) the rest of lock_timeout.
            conn.execute(f"PRAGMA busy_timeout = {int(self.lock_warning * 1000)}")
            conn.execute(f"PRAGMA journal_size_limit = {int(self.wal_watch)}")
            return conn

        def opened(conn: sqlite3.Connection) -> None:
            self.connection = conn
            self._syncer = LoopingCall(self._watch)
            self._syncer.clock = self._clock
            interval = self._sync_interval if self._sync_interval > 0 else WATCH_INTERVAL
            # _watch never fails: a failed sync or checkpoint is logged and
            # tried again at the next turn, and the loop runs until close.
            self._syncer.start(interval, now=False)

        return self._threads.defer(open_writer).addCallback(opened)

    def sync(self) -> Deferred:
        """
        Make every commit so far durable; fires once it is.
        """
        if self._closing is not None and self._shut:
            return succeed(None)
        return self._threads.defer(self._sync_in_thread)

    def _watch(self) -> Deferred:
        """
        One turn of the sync loop: sync, and checkpoint a write-ahead log
        grown past C{wal_watch}; log what failed (at most once a minute
        each) and what works again.  Never fails.
        """
        if self._closing is not None:
            return succeed(None)
        d = self._threads.defer(self._watch_in_thread)
        d.addCallbacks(self._watched, self._watch_failed)
        return d

    def _watch_in_thread(self) -> tuple[Optional[Exception], Optional[Exception], int]:
        # On the writer thread, between groups.
        sync_error: Optional[Exception] = None
        try:
            self._sync_in_thread()
        except OSError as e:
            # unsynced stays true: the next turn syncs.
            sync_error = e
        checkpoint_error: Optional[Exception] = None
        size = self._wal_size()
        if size > self.wal_watch and self.connection is not None:
            try:
                self.connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            except sqlite3.Error as e:
                checkpoint_error = e
        return sync_error, checkpoint_error, size

    def _wal_size(self) -> int:
        try:
            return os.stat(self._path + "-wal").st_size
        except OSError:
            return 0

    def _watched(self, found: tuple[Optional[Exception], Optional[Exception], int]) -> None:
        sync_error, checkpoint_error, size = found
        if sync_error is None:
            count = self._sync_trouble.cleared()
            if count is not None:
                log.info(
                    "syncing the store works again ({count} more syncs failed since "
                    "the last line)",
                    count=count,
                )
        else:
            count = self._sync_trouble.happened()
            if count is not None:
                log.error(
                    "syncing the store's write-ahead log {path} failed ({error}); "
                    "claims, starts and ends committed since the last sync are not "
                    "yet durable; trying again every turn ({count} failed since "
                    "the last line; logged at most once a minute)",
                    path=self._path + "-wal",
                    error=_describe(sync_error),
                    count=count,
                )
        if checkpoint_error is None:
            count = self._checkpoint_trouble.cleared()
            if count is not None:
                log.info(
                    "checkpointing the store works again ({count} more checkpoints "
                    "failed since the last line)",
                    count=count,
                )
        else:
            count = self._checkpoint_trouble.happened()
            if count is not None:
                log.error(
                    "checkpointing the store {path} failed ({error}): its write-ahead "
                    "log is {size} MiB and grows until a checkpoint succeeds; trying "
                    "again every turn ({count} failed since the last line; logged at "
                    "most once a minute)",
                    path=self._path,
                    error=_describe(checkpoint_error),
                    size=size // (1024 * 1024),
                    count=count,
                )

    def _watch_failed(self, failure: Failure) -> None:
        # Not a sync or a checkpoint failing (those are results): the
        # writer thread itself.  Logged, and the loop goes on.
        if self._sync_trouble.happened() is not None:
            log.failure("watching the store failed; trying again at the next turn", failure)

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
            self.fsync(fd)
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
            try:
                self._sync_in_thread()
            except OSError as e:
                # The connection is closed all the same (SQLite syncs the
                # log as it closes); said, for what may not be durable.
                self._reactor.callFromThread(
                    log.error,
                    "syncing the store as it closed failed ({error}): the last "
                    "run-state changes may not be durable",
                    error=_describe(e),
                )
            finally:
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

    def _commit(
        self, work: list[Write], durable: bool = True
    ) -> tuple[list[tuple[bool, Any]], list]:
        conn = self.connection
        assert conn is not None
        results: list[tuple[bool, Any]] = []
        events: list = [()] * len(work)
        began = time.perf_counter()
        try:
            if durable != self._synchronous_full:
                # In WAL mode FULL syncs the log at every commit; NORMAL
                # leaves it to the next FULL commit, the next sync or a
                # checkpoint.
                conn.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")
                self._synchronous_full = durable
            changes = conn.total_changes
            self._begin(conn)
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
                    self._journal.rollback()
                    self._begin(conn)
                    results = [self._apply_one(conn, write) for write in work]
                if self._record is not None:
                    # After every write of the group, so that each change
                    # is seen once, in order; a failure here fails the
                    # commit, as a failed write of the group's would.
                    events = self._record(conn, work, results)
                if self.mark is not None:
                    made = Mark(self.last_commit.seq + 1, self._clock.seconds())
                    conn.execute(BUMP, (made.seq, made.at))
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                self._journal.rollback()
                raise
        except (sqlite3.Error, OSError) as e:
            raise store_error(e) from e
        self._journal.commit()
        self._commit_seconds = time.perf_counter() - began
        self._commit_wrote = conn.total_changes != changes
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
        return results, events

    def _begin(self, conn: sqlite3.Connection) -> None:
        """
        Begin the group's transaction, taking the database's write lock.
        Another process holding it (a backup, an operator's C{sqlite3}
        shell) is waited for C{lock_warning} seconds, then logged, then
        waited for up to C{lock_timeout} in all before the commit fails.
        """
        try:
            conn.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as e:
            if not _busy(e):
                raise
        started = time.monotonic() - self.lock_warning
        self._reactor.callFromThread(
            log.warn,
            "the store's database {path} has been locked by another process for "
            "{waited:g} s; writes wait for it, up to {limit:g} s",
            path=self._path,
            waited=self.lock_warning,
            limit=self.lock_timeout,
        )
        rest = max(0.0, self.lock_timeout - self.lock_warning)
        conn.execute(f"PRAGMA busy_timeout = {int(rest * 1000)}")
        try:
            conn.execute("BEGIN IMMEDIATE")
        finally:
            conn.execute(f"PRAGMA busy_timeout = {int(self.lock_warning * 1000)}")
        self._reactor.callFromThread(
            log.info,
            "the store's database {path} was unlocked after {waited:.1f} s",
            path=self._path,
            waited=time.monotonic() - started,
        )

    def _apply_one(self, conn: sqlite3.Connection, write: Write) -> tuple[bool, Any]:
        """
        Run one write in its own savepoint: if it fails, what it did is
        undone and the rest of its group goes on.
        """
        conn.execute("SAVEPOINT operation")
        mark = self._journal.savepoint()
        try:
            value = self._operations[type(write)](conn, *write)
        except Exception as e:
            conn.execute("ROLLBACK TO operation")
            conn.execute("RELEASE operation")
            self._journal.rollback_to(mark)
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
            self._commit_failed(outcome, len(deferreds))
            for d in deferreds:
                d.errback(outcome)
        else:
            outcome, events = outcome
            failed: Optional[Failure] = None
            count = 0
            for _, value in outcome:
                if isinstance(value, Failure) and value.check(CommitFailed):
                    failed = value
                    count += 1
            if failed is not None:
                self._commit_failed(failed, count)
            elif self._commit_wrote:
                self._commits_again()
            if self.observe_commit is not None:
                try:
                    self.observe_commit(self._commit_seconds, len(deferreds))
                except Exception:
                    log.failure("observing a commit failed")
            committed = self.committed
            for d, (ok, value), told in zip(deferreds, outcome, events):
                if told and committed is not None:
                    # Just before its answer: a caller told its write is
                    # done finds its events published.
                    try:
                        committed(told)
                    except Exception:
                        log.failure("publishing the events of a commit failed")
                if ok:
                    d.callback(value)
                else:
                    d.errback(value)
        self._flushing = False
        if self._pending:
            self._flush()
        elif self._closing is not None and not self._closing.called:
            self._shutdown()

    def _commit_failed(self, failure: Failure, writes: int) -> None:
        """
        C{writes} writes failed to commit with C{failure}: say so, at most
        once a minute, with how many failed meanwhile.  (A full disk fails
        every write until it has room: a line with a traceback for each
        was a log that grew by 10 KB a second on the disk that was full.)
        """
        count = self._commit_trouble.happened(writes)
        if count is None:
            return
        if failure.check(StorageFull):
            log.error(
                "the store's disk took no more ({error}): {count} writes failed "
                "since the last line; submissions are answered 507 until it has "
                "room, ends of jobs are written again (logged at most once a minute)",
                error=failure.getErrorMessage(),
                count=count,
            )
        elif failure.check(CommitFailed):
            log.error(
                "the store could not commit ({error}): {count} writes failed since "
                "the last line (logged at most once a minute)",
                error=failure.getErrorMessage(),
                count=count,
            )
        else:
            log.failure("store commit failed", failure)

    def _commits_again(self) -> None:
        count = self._commit_trouble.cleared()
        if count is not None:
            log.info(
                "the store commits again ({count} more writes failed since the last line)",
                count=count,
            )

    def run(self, function: Callable[..., Any], *args: Any) -> Deferred:
        """
        Run C{function(*args)} on the writer thread, between groups.
        """
        return self._threads.defer(function, *args)


def _describe(error: BaseException) -> str:
    """
    An error as a log line tells it: its message, and its errno's name.
    """
    if isinstance(error, OSError) and error.errno is not None:
        return f"{errno.errorcode.get(error.errno, error.errno)}: {error.strerror}"
    return str(error)
