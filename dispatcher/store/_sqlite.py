"""
The SQLite job store: the default, embedded store.

Submissions, cancels and retries sync to the disk before their answer;
commits of run-state changes alone (claims, starts, ends) sync within
C{sync_interval}, or with the next commit that does.

One writer thread owns the only writing connection and commits in groups
(L{dispatcher.store._writer}), applying each write command with its
operation (L{dispatcher.store._operations}).  Reads
(L{dispatcher.store._queries}) run on a small pool of WAL reader
connections.  No SQLite call runs on the reactor thread.
"""

from __future__ import annotations

import functools
import os
import sqlite3
import threading
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from zope.interface import implementer

from dispatcher._threads import TaskThreads
from dispatcher.model._groups import GroupKind
from dispatcher.model._limits import MAX_LIST_EXAMINED
from dispatcher.model._jobs import (
    JobSpec,
    JobState,
    Lease,
    Offer,
    Outcome,
    PlainJobs,
    Resources,
    StoreClosed,
)
from dispatcher.store import _writes as writes
from dispatcher.store._groups import group, unfinished_members
from dispatcher.store._interface import IJobStore
from dispatcher.store._counts import Journals
from dispatcher.store._operations import (
    OPERATIONS,
    WriterState,
    jittered_backoff,
    queue_limits,
    record_changes,
    shared_paths,
)
from dispatcher.store._queries import (
    cancels_asked,
    get_job,
    list_jobs,
    next_due,
    owned,
    unconfigured_queues,
)
from dispatcher.store._mark import (
    MarkFile,
    check_commits,
    damaged,
    is_damage,
    make_private,
    quick_check,
    start_marking,
)
from dispatcher.store._deliveries import due_deliveries
from dispatcher.store._events import read_events
from dispatcher.store._removal import space, windows_in_use
from dispatcher.store._results import (
    Claimed,
    IdempotencyKey,
    ReadFailed,
    RemovalCursor,
    StoreDamaged,
    StoreUnusable,
)
from dispatcher.store._schema import migrate
from dispatcher.store._stored import plain_stored
from dispatcher.store._writer import GroupWriter

__all__ = ["SQLiteJobStore", "jittered_backoff"]

log = Logger()


@implementer(IJobStore)
class SQLiteJobStore:
    """
    L{IJobStore} on one SQLite file, in WAL mode with C{synchronous=FULL}:
    a committed job survives power loss, not only a killed process.  The
    interface documents the methods it declares; each queues a typed
    write command (L{dispatcher.store._writes}) or runs a read.

    @param path: the database file.
    @param reactor: the reactor the Deferreds fire in.
    @param readers: how many reader threads (and connections) to keep.
    @param queues: the queue names and their limits of running jobs (0: no
        limit); C{default} is always there.
    @param idempotency_ttl: seconds an idempotency key is kept.
    @param backoff: the wait before a retry, from the retry delay and the
        number of attempts spent.
    @param sync_interval: seconds a commit of nothing but run-state changes
        (claims, starts, ends, releases, wake-ups) may wait to reach the
        disk; 0 syncs every commit.  Submissions, cancels and retries, which
        a client is told are done, always sync before their answer, and the
        sync of one makes every earlier commit durable as well.
    @param clock: the clock that times those syncs (the reactor's if not
        given).

    Opening checks the file first (L{dispatcher.store._mark}): SQLite's
    C{quick_check} must find no damage, and the database must hold every
    commit its mark file (C{path + ".mark"}) says was made; else the open
    fails with L{StoreDamaged} or L{CommitsLost}, before anything writes.
    """

    def __init__(
        self,
        path: str,
        reactor: Any,
        readers: int = 2,
        queues: Optional[Mapping[str, int]] = None,
        idempotency_ttl: float = 86400.0,
        backoff: Callable[[float, int], float] = jittered_backoff,
        sync_interval: float = 1.0,
        clock: Any = None,
    ) -> None:
        self._path = path
        # Queue names and their limits of running jobs (0: none).
        self._limits = queue_limits(queues)
        self._state = WriterState(self._limits, idempotency_ttl, backoff)
        # The operation that applies each kind of write, with the
        # connection and the write's fields as its arguments.
        self._operations = {
            kind: functools.partial(operation, self._state)
            for kind, operation in OPERATIONS.items()
        }
        self._writer = GroupWriter(
            path,
            reactor,
            self._operations,
            shared_paths(self._state),
            sync_interval,
            clock if clock is not None else reactor,
            mark=MarkFile(path),
            journal=Journals(self._state.owners, self._state.counts),
            record=functools.partial(record_changes, self._state),
        )
        self._write = self._writer.write
        self._reader_pool = TaskThreads(reactor, readers, name="store-reader")
        self._readers_local = threading.local()
        self._reader_connections: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()

    @property
    def queue_limits(self) -> Mapping[str, int]:
        """
        Each queue's limit of running jobs (0: none).
        """
        return dict(self._limits)

    @property
    def batches(self) -> int:
        """
        How many groups of writes were committed.
        """
        return self._writer.batches

    @property
    def durable_batches(self) -> int:
        """
        How many of those commits synced the disk.
        """
        return self._writer.durable_batches

    def observe_commits(self, observer: Optional[Callable[[float, int], None]]) -> None:
        """
        Call C{observer} in the reactor thread after each group of writes
        that committed, with the seconds its commit took and how many
        writes it held (the metrics'); C{None}: no one.
        """
        self._writer.observe_commit = observer

    @property
    def syncs(self) -> int:
        """
        How many syncs made run-state commits durable.
        """
        return self._writer.syncs

    # Life cycle

    def open(self) -> Deferred:
        self._reader_pool.start()
        return self._writer.start(self._open_in_thread)

    @property
    def unsynced(self) -> bool:
        """
        Whether a commit has not reached the disk yet (one of run-state
        changes alone, since the last sync).
        """
        return self._writer.unsynced

    def sync(self) -> Deferred:
        """
        Make every commit so far durable; fires once it is.  Run every
        C{sync_interval} seconds, and as the store closes.
        """
        return self._writer.sync()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self._path, isolation_level=None, check_same_thread=False, timeout=30
        )
        # A new file is made so that the pages removals free can be given
        # back to the file system (shrink); this must come before the file
        # exists, which journal_mode makes it.  On a file made before, it
        # changes nothing: its freed pages are reused, never given back.
        # (Measured: no cost to a job's life on the writer, 42.3 against
        # 42.4 us of CPU a job in ten alternating rounds of 30,000.)  Only
        # on an empty file: on one that exists the pragma may write its
        # header, and a reader connected while the disk is full then fails
        # its first read with "database or disk is full".
        if os.path.getsize(self._path) == 0:
            conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    def _open_in_thread(self) -> sqlite3.Connection:
        """
        Open the writing connection, bring the schema up to date and load
        what the operations keep between writes; on the writer thread.
        """
        path = self._path
        directory = os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(directory, 0o700, exist_ok=True)
            # Made before SQLite makes it (with 0644 less the umask): it
            # holds every job's env, and SQLite gives the write-ahead log
            # and its index the database's mode.
            make_private(path)
            conn = self._connect()
        except sqlite3.Error as e:
            if is_damage(e):
                raise StoreDamaged(damaged(path, str(e))) from e
            raise StoreUnusable(f"the store {path} cannot be opened: {e}") from e
        except OSError as e:
            raise StoreUnusable(f"the store {path} cannot be opened: {e}") from e
        try:
            # Checked before anything writes: a write would overwrite what
            # is left of a write-ahead log SQLite's recovery cut short.
            quick_check(conn, path)
            warning = check_commits(conn, path, self._writer.mark)
            if warning is not None:
                log.warn("{warning}; a new mark starts now", warning=warning)
            migrate(conn, path)
            self._state.load(conn)
            self._writer.last_commit = start_marking(conn, path, self._writer.mark)
        except sqlite3.Error as e:
            conn.close()
            if is_damage(e):
                raise StoreDamaged(damaged(path, str(e))) from e
            raise StoreUnusable(f"the store {path} cannot be opened: {e}") from e
        except OSError as e:
            conn.close()
            raise StoreUnusable(f"the store {path} cannot be opened: {e}") from e
        except BaseException:
            conn.close()
            raise
        return conn

    def close(self) -> Deferred:
        """
        Finish the writes already asked for, then close every connection.
        """
        return self._writer.close(self._close_readers)

    def _close_readers(self) -> None:
        self._reader_pool.stop()
        for conn in self._reader_connections:
            conn.close()
        self._reader_connections.clear()

    # Reads

    def _read(self, operation: Callable[..., Any], *args: Any) -> Deferred:
        if self._writer.closing:
            # A stopped pool would drop the work and leave the caller hanging.
            return fail(StoreClosed("the dispatcher is stopping"))
        return self._reader_pool.defer(self._read_in_thread, operation, args)

    def _read_in_thread(self, operation: Callable[..., Any], args: tuple) -> Any:
        try:
            conn = getattr(self._readers_local, "conn", None)
            if conn is None:
                conn = self._connect()
                self._readers_local.conn = conn
                with self._readers_lock:
                    self._reader_connections.append(conn)
            conn.execute("BEGIN")
            try:
                return operation(conn, *args)
            finally:
                conn.execute("COMMIT")
        except (sqlite3.Error, OSError) as e:
            raise ReadFailed(str(e)) from e

    # The interface

    def submit(
        self,
        specs: Sequence[JobSpec],
        now: float,
        ids: Sequence[str],
        idempotency: Optional[IdempotencyKey] = None,
        owner: Optional[str] = None,
        sees_all: bool = True,
        max_unfinished: Optional[int] = None,
    ) -> Deferred:
        return self._write(
            writes.Submit(
                list(specs), now, list(ids), idempotency, owner, sees_all, max_unfinished
            )
        )

    def submit_plain(
        self,
        jobs: PlainJobs,
        now: float,
        ids: Sequence[str],
        idempotency: Optional[IdempotencyKey] = None,
        owner: Optional[str] = None,
        max_unfinished: Optional[int] = None,
    ) -> Deferred:
        """
        Store L{PlainJobs} with their new ids, all or nothing; fires with
        L{SubmittedIds}, or with the L{Submitted} jobs of an earlier request
        with the same idempotency key.
        """
        return self._write(
            writes.SubmitPlain(
                jobs, now, list(ids), idempotency, plain_stored(jobs), owner, max_unfinished
            )
        )

    def get(self, job_id: str) -> Deferred:
        return self._read(get_job, job_id, self._limits)

    def list_jobs(
        self,
        state: Optional[JobState] = None,
        labels: Iterable[tuple[str, Optional[str]]] = (),
        limit: int = 100,
        cursor: Optional[int] = None,
        owner: Optional[str] = None,
        states: Iterable[JobState] = (),
        array: Optional[str] = None,
        batch: Optional[str] = None,
        name: Optional[str] = None,
        queue: Optional[str] = None,
        worker: Optional[str] = None,
        created_after: Optional[float] = None,
        created_before: Optional[float] = None,
        newest: bool = False,
        examine: int = MAX_LIST_EXAMINED,
    ) -> Deferred:
        wanted = tuple(states) + ((state,) if state is not None else ())
        return self._read(
            list_jobs, wanted, tuple(labels), limit, cursor, self._limits, owner,
            array, batch, name, queue, worker, created_after, created_before, newest,
            examine,
        )

    # Arrays and batches

    def group(self, kind: GroupKind, group_id: str) -> Deferred:
        return self._read(group, kind, group_id)

    def unfinished_members(self, kind: GroupKind, group_id: str) -> Deferred:
        return self._read(unfinished_members, kind, group_id)

    def cancel_group(
        self, kind: GroupKind, group_id: str, now: float, owner: Optional[str] = None
    ) -> Deferred:
        return self._write(writes.CancelGroup(kind, group_id, now, owner))

    def retry_group(
        self,
        kind: GroupKind,
        group_id: str,
        now: float,
        owner: Optional[str] = None,
        max_unfinished: Optional[int] = None,
    ) -> Deferred:
        return self._write(writes.RetryGroup(kind, group_id, now, owner, max_unfinished))

    def owned(self, job_ids: Sequence[str], owner: str) -> Deferred:
        return self._read(owned, list(job_ids), owner)

    def unfinished_jobs(self) -> Deferred:
        # On the writer thread, between groups: the count as committed.
        if self._writer.closing:
            return fail(StoreClosed("the dispatcher is stopping"))
        return self._writer.run(self._state.owners.committed)

    def job_counts(self, owner: Optional[str] = None) -> dict[str, dict[JobState, int]]:
        # Kept by the writer at each change (StateCounts): no read of the
        # database, on any thread.
        return self._state.counts.by_queue(owner)

    def count_by_state(self) -> Deferred:
        counts = {state: 0 for state in JobState}
        for states in self._state.counts.by_queue().values():
            for state, jobs in states.items():
                counts[state] += jobs
        return succeed(counts)

    def queue_counts(self, owner: Optional[str] = None) -> Deferred:
        """
        Fire with C{{queue: {state: count}}} for every configured queue,
        and any other that holds jobs: from the counts the writer keeps
        (L{job_counts}), at once.
        """
        counts = {queue: {state: 0 for state in JobState} for queue in self._state.queues}
        for queue, states in self._state.counts.by_queue(owner).items():
            counts.setdefault(queue, {state: 0 for state in JobState}).update(states)
        return succeed(counts)

    def unconfigured_queues(self) -> Deferred:
        """
        Fire with C{{queue: queued jobs}} for the queues that hold queued
        jobs but are not configured.
        """
        return self._read(unconfigured_queues, frozenset(self._state.queues))

    def next_due(self) -> Deferred:
        """
        Fire with the earliest time a pending job becomes due, or C{None}.
        """
        return self._read(next_due)

    def claim(
        self,
        offer: Offer,
        capacity: int,
        now: float,
        lease_seconds: float,
        free: Optional[Resources] = None,
    ) -> Deferred:
        """
        Lease to C{offer.holder} up to C{capacity} queued jobs that fit it,
        highest priority first; C{free} is what its resources are less what
        its running jobs use (all of C{offer.resources} if not given).
        """
        if capacity <= 0:
            return succeed(Claimed([], blocked=False))
        if free is None:
            free = offer.resources
        return self._write(writes.Claim(offer, capacity, free, now, lease_seconds))

    def resume_leases(self, local_holder: str, now: float, lease_seconds: float) -> Deferred:
        """
        At start-up: every lease held by a remote worker lives on, its
        expiry moved to C{now + lease_seconds} (the dispatcher's downtime
        must not count against a worker that kept working).  Fires with the
        L{Written} list of L{ResumedLease}s.
        """
        return self._write(writes.ResumeLeases(local_holder, now, lease_seconds))

    def record_process(
        self, lease: Lease, pid: int, start_ticks: Optional[int], boot_id: Optional[str]
    ) -> Deferred:
        return self._write(writes.RecordProcess(lease, pid, start_ticks, boot_id))

    def mark_running(self, lease: Lease, now: float) -> Deferred:
        return self._write(writes.MarkRunning(lease, now))

    def finish(self, lease: Lease, outcome: Outcome, now: float) -> Deferred:
        return self._write(writes.Finish(lease, outcome, now))

    def release(self, lease: Lease, now: float, reason: str) -> Deferred:
        return self._write(writes.Release(lease, now, reason))

    def adopt_leases(
        self,
        holder: Optional[str],
        items: Sequence[tuple[str, int]],
        server: str,
        now: float,
        seconds: float,
    ) -> Deferred:
        """
        Take up the live leases of C{items} that C{holder} holds: see
        L{IJobStore.adopt_leases}.
        """
        return self._write(writes.AdoptLeases(holder, tuple(items), server, now, seconds))

    def finish_served(self, lease: Lease, outcome: Outcome, now: float, server: str) -> Deferred:
        """
        L{finish}, if C{server} serves the lease: see
        L{IJobStore.finish_served}.
        """
        return self._write(writes.FinishServed(lease, outcome, now, server))

    def cancel(self, job_id: str, now: float, owner: Optional[str] = None) -> Deferred:
        return self._write(writes.Cancel(job_id, now, owner))

    def retry(
        self,
        job_id: str,
        now: float,
        dependents: bool,
        owner: Optional[str] = None,
        max_unfinished: Optional[int] = None,
    ) -> Deferred:
        """
        Put a failed or cancelled job back in line with a fresh budget of
        attempts (and, with C{dependents}, the jobs cancelled because of
        it); its attempts stay in its history.
        """
        return self._write(writes.Retry(job_id, now, dependents, owner, max_unfinished))

    def promote_due(self, now: float) -> Deferred:
        """
        Queue every pending job whose time has come; the answer's wake time
        is when the next one is due.
        """
        return self._write(writes.PromoteDue(now))

    def purge_idempotency(self, now: float) -> Deferred:
        """
        Forget idempotency keys older than their time to live.
        """
        return self._write(writes.PurgeIdempotency(now))

    def remove_finished(
        self,
        now: float,
        cutoff: Optional[float],
        excess: int,
        cursor: RemovalCursor,
        limit: int,
        scan: int,
    ) -> Deferred:
        """
        One step of a removal pass: see L{IJobStore.remove_finished}.
        """
        return self._write(writes.RemoveFinished(now, cutoff, excess, cursor, limit, scan))

    def remove(self, job_id: str, now: float, owner: Optional[str] = None) -> Deferred:
        """
        Remove one finished job now: see L{IJobStore.remove}.
        """
        return self._write(writes.Remove(job_id, now, owner))

    def windows_in_use(self, prefixes: Sequence[str]) -> Deferred:
        """
        Fire with those of C{prefixes} that a stored job's id starts with.
        """
        return self._read(windows_in_use, list(prefixes))

    def space(self) -> Deferred:
        """
        Fire with the L{StoreSpace} of the database file.
        """
        return self._read(space)

    def shrink(self, limit: int) -> Deferred:
        """
        Give at most C{limit} bytes of free pages back to the file system;
        fires with a L{Written} whose value is the free bytes left.
        """
        return self._write(writes.Shrink(limit))

    def recover(self, holder: str, now: float) -> Deferred:
        return self._write(writes.Recover(holder, now))

    def renew_leases(
        self,
        holder: str,
        tokens: Sequence[int],
        now: float,
        lease_seconds: float,
        token_seconds: Optional[float] = None,
    ) -> Deferred:
        """
        Renew every lease of C{holder} and the leases of C{tokens}: see
        L{IJobStore.renew_leases}.
        """
        return self._write(writes.RenewLeases(
            holder, tuple(tokens), now, lease_seconds,
            lease_seconds if token_seconds is None else token_seconds,
        ))

    def expire_leases(
        self, now: float, keep_holder: str, keep_tokens: Sequence[int], limit: int = 1000
    ) -> Deferred:
        """
        Record as lost the attempts whose leases expired: see
        L{IJobStore.expire_leases}.
        """
        return self._write(writes.ExpireLeases(now, keep_holder, tuple(keep_tokens), limit))

    # The webhook outbox

    def due_deliveries(
        self, now: float, limit: int, hold: float = 0.0, exclude: Sequence[int] = ()
    ) -> Deferred:
        """
        Fire with at most C{limit} webhook deliveries due at C{now}: see
        L{IJobStore.due_deliveries}.  (A store of its own has one reader of
        its outbox: C{hold} claims nothing.)
        """
        return self._read(due_deliveries, now, limit, tuple(exclude))

    def record_deliveries(
        self, done: Sequence[int], later: Sequence[tuple[int, float]]
    ) -> Deferred:
        """
        Record what became of tried deliveries: see
        L{IJobStore.record_deliveries}.
        """
        return self._write(writes.RecordDeliveries(tuple(done), tuple(later)))

    # Events

    def follow_events(self, listener: Optional[Callable[[list], None]]) -> None:
        """
        Call C{listener} in the reactor thread with the events of each
        write, in id order, just before the write is answered (C{None}: no
        one); see L{IJobStore.follow_events}.
        """
        self._writer.committed = listener

    def follow_others(self, listener: Optional[Callable[[list], None]]) -> None:
        """
        No other dispatcher writes to the SQLite file: C{listener} is never
        called (see L{IJobStore.follow_others}).
        """

    def follow_cancels(self, listener: Optional[Callable[[], None]]) -> None:
        """
        No other dispatcher writes to the SQLite file: C{listener} is never
        called (see L{IJobStore.follow_cancels}).
        """

    def cancels_asked(self, job_ids: Sequence[str]) -> Deferred:
        """
        Fire with those of C{job_ids} whose cancel was asked for while
        they ran (see L{IJobStore.cancels_asked}).
        """
        return self._read(cancels_asked, list(job_ids))

    def read_events(self, after: int, limit: int) -> Deferred:
        """
        Fire with an L{EventPage}: at most C{limit} stored events after the
        id C{after}, and the oldest and newest ids stored.
        """
        return self._read(read_events, after, limit)

    def set_queue_limits(self, queues: Mapping[str, int]) -> Deferred:
        """
        Take C{queues} (each queue's limit of running jobs, 0 for none;
        C{default} is added if missing) as the configured queues from now
        on; fires once the writer has them, and L{queue_limits} says so.
        """
        limits = queue_limits(queues)

        def taken(written: Any) -> Any:
            # Also when the group's commit failed: the writer took them
            # (they are its own, not stored).
            self._limits = limits
            return written

        return self._write(writes.SetQueueLimits(dict(limits))).addBoth(taken)

    def record_presence(self, worker: str, change: str, now: float) -> Deferred:
        """
        Store the event of a worker that connected or left; fires once it
        has committed (and been published).
        """
        return self._write(writes.RecordPresence(worker, change, now))

    def remove_events(self, cutoff: float, limit: int) -> Deferred:
        """
        One step of removing old events: at most C{limit} of those older
        than C{cutoff}, never the newest; fires with a L{Written} whose
        value is the L{RemovedEvents}.
        """
        return self._write(writes.RemoveEvents(cutoff, limit))
