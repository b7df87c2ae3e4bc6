"""
The PostgreSQL job store: L{IJobStore} on a PostgreSQL database, chosen by
C{[store] url = postgresql://...}; the SQLite file stays the embedded
default.

The driver is psycopg 3 (C{psycopg[binary,pool]}): the PostgreSQL
driver its maintainers keep alongside the server's own releases, with
the server's protocol in C (the binary package bundles libpq), pipelined
C{executemany}, prepared statements by use, C{COPY}, C{LISTEN/NOTIFY},
and a thread-safe connection pool (psycopg_pool).  It is blocking, which
is what a store whose calls already run in threads wants (asyncpg would
need an asyncio loop of its own beside Twisted's reactor).

It is the SQLite store's own logic on another engine, not a copy of it:

  - The same group-commit writer (L{PostgresGroupWriter}, a
    L{GroupWriter}) on one connection of its own, on one thread: a group
    of writes is one transaction, each write replayed in its own
    savepoint if any fails, so that a failing write changes nothing
    beside its neighbours.  C{synchronous_commit} is on: every commit is
    durable before it is answered (C{sync_interval} is SQLite's alone).
  - The same operations and reads (L{dispatcher.store._operations},
    L{dispatcher.store._queries} and the rest), their SQL rewritten for
    PostgreSQL by L{dispatcher.store._dialect}, through L{PgConnection},
    which gives a psycopg connection the face of C{sqlite3}'s; where a
    statement must differ, its module holds both texts side by side.  The
    rows of a group that SQLite writes one statement a row (a claim's
    leases, a run of ends, the events) go to PostgreSQL as one statement
    over arrays (C{unnest}: L{ColumnTypes}), and a plain batch as one
    C{INSERT ... SELECT} over its JSON.
  - Reads on a pool of connections (psycopg_pool), each read one
    C{REPEATABLE READ} read-only transaction, on reader threads.  No
    database call runs on the reactor thread.
  - Its own schema and migrations (L{dispatcher.store._pg_schema}), run at
    open under an advisory lock.

Made for several dispatchers on one database:

  - Lease tokens come from a sequence (a block of
    L{dispatcher.store._pg_schema.TOKEN_BLOCK} at a time): never the same
    token from two dispatchers.
  - A claim reads the queued jobs C{FOR UPDATE SKIP LOCKED}, through a
    server-side cursor that locks only the rows it reads: a job another
    transaction is taking is passed over, never handed to two holders.
  - Counts are tables changed in each group's transaction
    (C{job_counts}); a quota of unfinished jobs is checked against the
    table (L{DatabaseOwnerCounts}), memory holding only the open
    transaction's own changes; the counts by queue and state that the
    API reads without a query are a copy re-read from the table at every
    turn of the writer's loop (C{refresh_interval}, a second: C{GET
    /v1/queues} on one dispatcher counts another's jobs within it).  A
    queue's running jobs (its C{max_running}) are counted in the database
    at each claim, under the write lock: the limit is global.
  - Whether any job has dependents is read at the start of each group.
  - Each dispatcher's local holder is its own (C{local@NAME}: C{[dispatcher]
    name}, or a name made once and kept in its data directory), and its
    local leases expire: it renews them, with the leases of the workers it
    serves, in one write every sixth of C{[store] lease_seconds}; after each
    renewal it records lost the attempts whose leases expired, whoever held
    them; and it fences itself (kills its local jobs) when no renewal has
    landed for half a lease (L{dispatcher.core._lease_keeper}).  A
    restarted dispatcher does not resume the workers' leases the store
    holds at its start (L{IJobStore.resume_leases} is SQLite's): it
    cannot tell its own from another's.  It takes each up as its worker
    calls (L{IJobStore.adopt_leases}), as any dispatcher a worker moves
    to does; C{jobs.lease_server} names the one that took it up last,
    the only one that may record it expired (L{IJobStore.finish_served}).
  - The webhook outbox is read by every dispatcher; the deliveries one
    reads are claimed for it in the same write for a try's time
    (L{IJobStore.due_deliveries} with a hold), so no other tries them
    meanwhile.
  - A database that cannot be reached fails a write or a read with
    L{StoreUnreachable} (L{unreachable}: a refused, broken or timed-out
    connection, a server going away), which the API answers C{503
    store_unavailable}; while renewals fail so, the API answers so at once.
    The writer connects again at its next group, the readers' pool checks
    each connection before it lends it.  libpq's keepalives and
    C{tcp_user_timeout} end a connection into a silent network within
    about 10 s, and the server ends a session idle inside a transaction
    after 10 s, so a dispatcher that vanished mid-group does not hold the
    groups' lock.
  - The dispatchers hear each other (L{dispatcher.store._pg_events}):
    each group that stores events sends one C{NOTIFY} as it commits; each
    store listens on a connection and a thread of its own (made again
    when lost) and reads the others' events after the last it published,
    and reads them every C{poll_interval} seconds whatever it heard.
    Every event is published once by every dispatcher, in id order,
    whoever committed it (L{follow_events} and L{follow_others}): the
    scheduler claims what others queued, a wait or an event stream on
    one sees the others' changes.  A client's cancel of a job another
    dispatcher runs changes no state until its holder stops it: it is
    notified too, and each poll reads the cancels asked of the jobs held
    here (L{follow_cancels}).

What one dispatcher may keep in memory and several may not, left for the
next steps (issue 19's N dispatchers):

  - Each group holds a transaction-level advisory lock
    (L{dispatcher.store._pg_schema.WRITE_LOCK}) from its start to its
    commit, so the groups of all dispatchers commit one at a time.  That
    keeps what is numbered from the table's greatest (a job's C{seq}, an
    event's id) unique and in commit order, which the list cursor and
    the event stream rely on (a reader resumes after the greatest id it
    saw; ids from a sequence could commit out of order and be skipped),
    lets a group read the others' events numbered before its own, and
    makes the quota check and the queue limit exact across dispatchers.
    A group of claims and ends alone (no queue with a limit, no job with
    dependents) takes it only for its tail, numbering its events and
    committing (L{PostgresGroupWriter._group_late}): its claims lock the
    rows they read (C{SKIP LOCKED}), its ends lock their job's row as
    they read it, so that such groups of several dispatchers run side by
    side; one that fails, meets a deadlock, finds a dependency stored
    meanwhile, or claimed short while others committed, runs again with
    the lock from its start.  Every other group holds it throughout, as
    a job's C{seq} is still numbered from the table's greatest.
  - The queues' turn (fairness) is each dispatcher's own
    (C{WriterState.turn}); the configured queues and limits are each
    dispatcher's configuration and must agree.  Whoever frees a place
    under a queue's limit mostly takes it (its claim joins the end's
    commit): nothing shares the places out between dispatchers.
  - The hosts' clocks must agree to well within half a lease: an expiry
    is written on the renewing dispatcher's clock and read on the
    sweeping one's.
"""

from __future__ import annotations

import functools
import re
import threading
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import psycopg
import attrs
import psycopg.errors
from psycopg_pool import ConnectionPool
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from dispatcher._threads import TaskThreads
from dispatcher.model._jobs import StoreClosed
from dispatcher.store import _writes as writes
from dispatcher.store._counts import UNFINISHED, Journals, NO_OWNER, OwnerCounts
from dispatcher.store._dialect import PagedSQL, postgres_text
from dispatcher.store._interface import IJobStore
from dispatcher.store._operations import (
    OPERATIONS,
    WriterState,
    jittered_backoff,
    queue_limits,
    record_changes,
    shared_paths,
)
from dispatcher.store._events import read_events
from dispatcher.store._pg_events import (
    PAGE as FEED_PAGE,
    EventFeed,
    NotifyListener,
    first_id,
    last_id,
    notify_statement,
)
from dispatcher.store._pg_schema import (
    MIGRATION_LOCK,
    MIGRATIONS,
    TOKEN_BLOCK,
    VERSION_TABLE,
    WRITE_LOCK,
)
from dispatcher.store._results import (
    CommitFailed,
    ReadFailed,
    StorageFull,
    StoreError,
    StoreSpace,
    StoreUnreachable,
    StoreUnusable,
    StoreVersionError,
    WriteRefused,
    Written,
)
from dispatcher.store._sqlite import SQLiteJobStore
from dispatcher.store._writer import GroupWriter
from dispatcher.store._writes import Write

__all__ = ["PostgresJobStore", "describe_url"]

log = Logger()

# How many rows a claim's locking cursor fetches at once: each row read is
# locked until the group commits, so no more than a claim commonly takes
# (a holder's free slots), and few round trips for one that passes many
# over.
CLAIM_FETCH = 32

# Seconds a connection attempt waits for the server before it fails.
CONNECT_TIMEOUT = 10

# Seconds a read waits for a connection of the readers' pool (all busy, or
# the database away) before it fails.
READ_CONNECT_TIMEOUT = 5.0

# What libpq is told about a connection whose server goes silent (a
# network cut, a host that died): TCP keepalives after 5 s idle, every 2 s,
# given up after 3 unanswered; and data unacknowledged for 10 s ends it.
# Without them a statement sent into a cut network waits for the
# kernel's TCP timeout, many minutes.
KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 10_000,
}

# The application name of a store's listening connection: how the others
# find out whether anyone listens.
LISTENER_NAME = "dispatcher store listener"


def describe_url(url: str) -> str:
    """
    C{url} as a log line may show it: without its password.
    """
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://?"
    host = info.get("host", "") or "localhost"
    port = info.get("port", "")
    return (
        f"postgresql://{info.get('user', '') + '@' if info.get('user') else ''}"
        f"{host}{':' + str(port) if port else ''}/{info.get('dbname', '')}"
    )


class _NoRows:
    """
    What a statement PostgreSQL has no need of gives: no rows.
    """

    rowcount = 0

    def fetchone(self) -> None:
        return None

    def fetchall(self) -> list:
        return []

    def __iter__(self) -> Any:
        return iter(())

    def close(self) -> None:
        pass


_NO_ROWS = _NoRows()


class PgConnection:
    """
    A psycopg connection with the face of C{sqlite3}'s that the store's
    operations and reads use (C{execute}, C{executemany}; cursors that
    fetch, iterate, count rows and close): each statement's text is
    rewritten for PostgreSQL (L{dispatcher.store._dialect.postgres_text}).

    A statement read a page at a time (L{PagedSQL}: a claim, which locks
    what it reads and passes over what another holds) is read as the
    caller goes, so that it locks only about the rows read, L{CLAIM_FETCH}
    at a time.
    """

    def __init__(self, raw: psycopg.Connection, types: Optional["ColumnTypes"] = None) -> None:
        self.raw = raw
        self._types = types

    def execute(self, statement: str, params: Sequence[Any] = ()) -> Any:
        """
        Run C{statement} (SQLite's text) with C{params}; the cursor to read
        its rows from.
        """
        if type(statement) is PagedSQL:
            return _Pages(self.raw, statement, tuple(params))  # type: ignore[arg-type]
        text = postgres_text(statement)
        if text is None:
            return _NO_ROWS
        cursor = self.raw.cursor()
        cursor.execute(text, tuple(params))
        return cursor

    def executemany(self, statement: str, rows: Any) -> None:
        """
        Run C{statement} (SQLite's text) for each of C{rows}: as one
        statement over arrays where it has a bulk form (L{ColumnTypes}),
        else pipelined, a statement a row.
        """
        text = postgres_text(statement)
        if text is None:
            return
        rows = list(rows)
        if not rows:
            return
        if len(rows) > 1 and self._types is not None:
            bulk = self._types.bulk(statement)
            if bulk is not None:
                columns = bulk.columns(rows)
                if columns is not None:
                    self.raw.execute(bulk.text, columns)
                    return
        with self.raw.cursor() as cursor:
            cursor.executemany(text, rows)

    @property
    def in_transaction(self) -> bool:
        """
        Whether a transaction is open (or the connection is in doubt).
        """
        return self.raw.info.transaction_status != psycopg.pq.TransactionStatus.IDLE

    def close(self) -> None:
        """
        Close the connection.
        """
        self.raw.close()


class _Pages:
    """
    The rows of a L{PagedSQL} statement, read a page of L{CLAIM_FETCH} at
    a time as the caller iterates, each page after the last row read.
    """

    def __init__(self, raw: psycopg.Connection, statement: PagedSQL, params: tuple) -> None:
        self._raw = raw
        self._statement = statement
        self._params = params
        self._rows = self._read()

    def _read(self) -> Any:
        statement = self._statement
        rows = self._raw.execute(_page_text(statement.postgres), self._params).fetchall()
        while True:
            yield from rows
            if len(rows) < CLAIM_FETCH:
                return
            rows = self._raw.execute(
                _page_text(statement.after), self._params + statement.key(rows[-1])
            ).fetchall()

    def __iter__(self) -> "_Pages":
        return self

    def __next__(self) -> Any:
        return next(self._rows)

    def fetchone(self) -> Any:
        return next(self._rows, None)

    def fetchall(self) -> list:
        return list(self._rows)

    def close(self) -> None:
        self._rows.close()


@functools.lru_cache(maxsize=16)
def _page_text(text: str) -> str:
    return text.replace("{page}", str(CLAIM_FETCH))


@attrs.frozen
class Bulk:
    """
    One statement that does what an C{executemany} of a row-at-a-time
    statement does, reading its rows from one array a column
    (C{unnest}): one statement for a group's hundreds of rows, where
    the pipelined C{executemany} was a statement each (seven a no-op
    job).

    @ivar text: the statement, one array parameter a column.
    @ivar floats: the columns whose values go as doubles (an int among
        floats would make psycopg refuse the array).
    @ivar key: for an update or a delete, the column of the key each row
        names (rows must name distinct keys: an update of the same row
        twice in one statement takes one of them, not the last).
    """

    text: str
    floats: tuple[int, ...]
    key: Optional[int] = None

    def columns(self, rows: list) -> Optional[list]:
        """
        The arrays to bind, or C{None} if these rows cannot go at once.
        """
        columns = [list(column) for column in zip(*rows)]
        if self.key is not None and len(set(columns[self.key])) != len(rows):
            return None
        for i in self.floats:
            columns[i] = [None if v is None else float(v) for v in columns[i]]
        return columns


_BULK_INSERT = re.compile(r"INSERT INTO (\w+) \(([\w, ]+)\) VALUES \(([?, ]+)\)")
_BULK_UPDATE = re.compile(r"UPDATE (\w+) SET ([\w, =?'.]+) WHERE (\w+) = \?")
_BULK_DELETE = re.compile(r"DELETE FROM (\w+) WHERE (\w+) = \?")
_ASSIGNMENT = re.compile(r"(\w+) = (.+)")


class ColumnTypes:
    """
    The type of each column of the store's tables (read from the catalog
    once a connection), and the bulk form (L{Bulk}) of each statement an
    C{executemany} runs that has one: an C{INSERT ... VALUES} of
    placeholders alone, an C{UPDATE ... SET} of columns to placeholders
    or constants C{WHERE} one column is a placeholder, a C{DELETE ...
    WHERE} one column is.  Any other statement runs row by row.
    """

    def __init__(self, conn: psycopg.Connection) -> None:
        self._types: dict[tuple[str, str], str] = {
            (table, column): kind
            for table, column, kind in conn.execute(
                "SELECT table_name, column_name, data_type FROM information_schema.columns"
                " WHERE table_schema = current_schema()"
            )
        }
        self._bulk: dict[str, Optional[Bulk]] = {}

    def bulk(self, statement: str) -> Optional[Bulk]:
        """
        The bulk form of C{statement} (SQLite's text), or C{None}.
        """
        try:
            return self._bulk[statement]
        except KeyError:
            made = self._bulk[statement] = self._make(statement)
            return made

    def _array(self, table: str, column: str) -> tuple[str, bool]:
        kind = self._types[table, column]
        return f"%s::{kind}[]", kind == "double precision"

    def _make(self, statement: str) -> Optional[Bulk]:
        if type(statement) is not str or postgres_text(statement) is None:
            return None
        try:
            found = _BULK_INSERT.fullmatch(statement)
            if found:
                table, names = found[1], [n.strip() for n in found[2].split(",")]
                if found[3].count("?") != len(names):
                    return None
                arrays = [self._array(table, name) for name in names]
                return Bulk(
                    f"INSERT INTO {table} ({', '.join(names)})"
                    f" SELECT * FROM unnest({', '.join(a for a, _ in arrays)})",
                    tuple(i for i, (_, floats) in enumerate(arrays) if floats),
                )
            found = _BULK_UPDATE.fullmatch(statement)
            if found:
                table, key = found[1], found[3]
                bound: list[str] = []
                assignments = []
                for part in found[2].split(","):
                    matched = _ASSIGNMENT.fullmatch(part.strip())
                    if matched is None:
                        return None
                    column, value = matched[1], matched[2]
                    if value == "?":
                        bound.append(column)
                        assignments.append(f"{column} = given.{column}")
                    elif "?" not in value:
                        assignments.append(f"{column} = {value}")
                    else:
                        return None
                names = bound + [key]
                arrays = [self._array(table, name) for name in names]
                return Bulk(
                    f"UPDATE {table} SET {', '.join(assignments)}"
                    f" FROM unnest({', '.join(a for a, _ in arrays)})"
                    f" AS given({', '.join(names)})"
                    f" WHERE {table}.{key} = given.{key}",
                    tuple(i for i, (_, floats) in enumerate(arrays) if floats),
                    key=len(names) - 1,
                )
            found = _BULK_DELETE.fullmatch(statement)
            if found:
                table, key = found[1], found[2]
                array, floats = self._array(table, key)
                return Bulk(
                    f"DELETE FROM {table} WHERE {key} = ANY({array})",
                    (0,) if floats else (),
                )
        except KeyError:
            # A column the catalog does not know: left to run row by row.
            return None
        return None


def connect(url: str, application: str = "dispatcher") -> psycopg.Connection:
    """
    A connection to the database at C{url}, in autocommit mode (the
    writer says BEGIN and COMMIT itself), with C{synchronous_commit} on
    whatever the server's default: a commit answered is on the server's
    disk.
    """
    raw = psycopg.connect(
        url,
        autocommit=True,
        connect_timeout=CONNECT_TIMEOUT,
        application_name=application,
        **KEEPALIVES,
    )
    raw.execute("SET synchronous_commit = on")
    # The server's side of a cut: a dispatcher that vanishes within a
    # group must not hold the groups' lock (and every other dispatcher's
    # writes) until the server's TCP timeout, hours by default.  A group
    # never waits between its statements, so 10 s idle inside one is a
    # client gone.
    raw.execute(
        "SET idle_in_transaction_session_timeout = '10s';"
        " SET tcp_keepalives_idle = 5; SET tcp_keepalives_interval = 2;"
        " SET tcp_keepalives_count = 3; SET tcp_user_timeout = 10000"
    )
    return raw


def migrate(raw: psycopg.Connection, where: str) -> None:
    """
    Bring the database on C{raw} (autocommit) up to the newest schema
    (L{dispatcher.store._pg_schema.MIGRATIONS}), each migration in its own
    transaction, under a session advisory lock so that two dispatchers
    opening at once take turns.  Fails with L{StoreVersionError} if a
    newer dispatcher wrote it.
    """
    raw.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
    try:
        raw.execute(VERSION_TABLE)
        row = raw.execute("SELECT version FROM schema_version WHERE one = 1").fetchone()
        version = 0 if row is None else row[0]
        if version > len(MIGRATIONS):
            raise StoreVersionError(
                f"{where} has schema version {version}, newer than the "
                f"{len(MIGRATIONS)} this dispatcher knows; run a newer dispatcher"
            )
        for number in range(version, len(MIGRATIONS)):
            with raw.transaction():
                raw.execute(MIGRATIONS[number])
                raw.execute(
                    "INSERT INTO schema_version (one, version) VALUES (1, %s)"
                    " ON CONFLICT (one) DO UPDATE SET version = excluded.version",
                    (number + 1,),
                )
            if version:
                log.info(
                    "store {where} migrated to schema version {version}",
                    where=where,
                    version=number + 1,
                )
        if not version:
            log.info(
                "made a new store in {where} (schema version {version})",
                where=where,
                version=len(MIGRATIONS),
            )
    finally:
        raw.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))


# The SQLSTATEs of a server that is going away or not taking connections
# (besides class 08, connection exceptions): shut down by an
# administrator, crashed, starting up or shutting down.
_SERVER_GONE = frozenset({"57P01", "57P02", "57P03", "57P05"})


def unreachable(error: Exception) -> bool:
    """
    Whether C{error} says the database cannot be reached (the connection
    was refused, broken, timed out, or the server is going away) rather
    than that it refused what was asked.
    """
    if not isinstance(error, psycopg.OperationalError):
        return False
    state = getattr(error, "sqlstate", None)
    return state is None or state.startswith("08") or state in _SERVER_GONE


def store_error(error: Exception) -> StoreError:
    """
    The store's own error for what PostgreSQL raised while writing:
    L{StoreUnreachable} when the database cannot be reached,
    L{WriteRefused} for a broken constraint (the same write would be
    refused again), L{StorageFull} when its disk took no more, else
    L{CommitFailed}.
    """
    kind: type[StoreError]
    if unreachable(error):
        kind = StoreUnreachable
    elif isinstance(error, psycopg.errors.IntegrityError):
        kind = WriteRefused
    elif isinstance(error, psycopg.errors.DiskFull):
        kind = StorageFull
    else:
        kind = CommitFailed
    failed = kind(str(error).strip())
    failed.__cause__ = error
    return failed


class DatabaseOwnerCounts(OwnerCounts):
    """
    Each owner's unfinished jobs as the database counts them (the
    C{job_counts} table, changed in each group's transaction), plus the
    open transaction's own changes, which memory keeps until the group
    adds them to the table: the authority is the table, so that what
    another dispatcher committed counts too.  An owner's count is read
    once a transaction, at its first check.
    """

    def __init__(self) -> None:
        super().__init__()
        self.connection: Optional[PgConnection] = None
        self._read: dict[str, int] = {}

    def load(self, conn: Any) -> None:
        """
        Read from the database on C{conn} from now on.
        """
        self.connection = conn
        self._pending.clear()
        self._journal.clear()
        self._read.clear()

    def unfinished(self, owner: Optional[str]) -> int:
        """
        C{owner}'s unfinished jobs: the table's, and the open
        transaction's changes.
        """
        if owner is None:
            return 0
        stored = self._read.get(owner)
        if stored is None:
            stored = self._read[owner] = self._stored(owner)
        return stored + self._pending.get(owner, 0)

    def _stored(self, owner: str) -> int:
        assert self.connection is not None
        (count,) = self.connection.execute(
            _OWNER_UNFINISHED, (owner, list(UNFINISHED))
        ).fetchone()
        return int(count)

    def committed(self) -> dict[str, int]:
        """
        Each owner's unfinished jobs, as the table holds them.
        """
        assert self.connection is not None
        return _unfinished_by_owner(self.connection)

    def commit(self) -> None:
        """
        The transaction ended: its changes are the table's now (or gone),
        and the next reads the table again.
        """
        self._pending.clear()
        self._journal.clear()
        self._read.clear()

    def rollback(self) -> None:
        """
        The same as L{commit}: memory holds nothing the table does not.
        """
        self.commit()


# The greatest event id stored (0: none), as _NEXT in store._events
# reads the next.
_NEWEST_EVENT = (
    "SELECT COALESCE((SELECT id + COALESCE(jobs, 1) - 1 FROM events"
    " ORDER BY id DESC LIMIT 1), 0)"
)

# An owner's unfinished jobs, and every owner's (but those of no owner),
# as the counts table holds them.
_OWNER_UNFINISHED = (
    "SELECT COALESCE(SUM(jobs), 0) FROM job_counts WHERE owner = ? AND state = ANY(?)"
)
_UNFINISHED_BY_OWNER = (
    "SELECT owner, SUM(jobs) FROM job_counts WHERE owner != ? AND state = ANY(?)"
    " GROUP BY owner HAVING SUM(jobs) != 0"
)


class DatabaseWriterState(WriterState):
    """
    L{WriterState} whose lease tokens come from the database's sequence,
    a block at a time (C{next_token} is read and moved on as the claim
    does with the SQLite store's counter).
    """

    connection: Optional[PgConnection] = None
    # The block of tokens taken (its first), and the next to hand out.
    _block = 0
    _token = 0

    @property  # type: ignore[override]
    def next_token(self) -> int:
        """
        The next lease token: the next of the block taken, or the first of
        a new block from the sequence.
        """
        if not (self._block <= self._token < self._block + TOKEN_BLOCK) or not self._block:
            assert self.connection is not None
            (self._block,) = self.connection.execute(
                "SELECT nextval('lease_tokens')"
            ).fetchone()
            self._token = self._block
        return self._token

    @next_token.setter
    def next_token(self, value: int) -> None:
        self._token = value

    def load(self, conn: Any) -> None:
        """
        Read what the operations need from the database on C{conn}: whether
        any job has dependents, and the counts.
        """
        self.connection = conn
        self._block = 0
        (self.dependencies,) = conn.execute(
            "SELECT EXISTS (SELECT 1 FROM dependencies)"
        ).fetchone()
        self.owners.load(conn)
        self.counts.load(conn)


class PostgresGroupWriter(GroupWriter):
    """
    The group-commit writer (L{GroupWriter}: one thread, one connection,
    one transaction a group, a savepoint a write when one fails) on a
    PostgreSQL connection.  Every commit is durable (C{synchronous_commit}
    on), so there is nothing to sync later; the writer's loop instead
    re-reads the counts of jobs by queue and state (which other
    dispatchers change too) every C{refresh} seconds.  A connection the
    server broke is made again at the next group.

    @param connect: makes the writer's connection.
    @param begun: called at the start of each group's transaction, after
        its lock is taken, with whether any job has dependents.
    @param refresh: called with the connection on the writer thread
        between groups, every C{interval} seconds.
    @param late: whether a group of claims and ends alone may take the
        groups' lock at its tail (no queue has a limit, no job has
        dependents); never, if not given.
    """

    def __init__(
        self,
        where: str,
        reactor: Any,
        operations: Mapping[type, Any],
        shared: Sequence[Any],
        interval: float,
        clock: Any,
        connect: Callable[[], PgConnection],
        begun: Callable[[bool], None],
        refresh: Callable[[PgConnection], None],
        journal: Any = None,
        record: Any = None,
        late: Optional[Callable[[], bool]] = None,
    ) -> None:
        super().__init__(
            where, reactor, operations, shared, interval, clock, journal=journal, record=record
        )
        self._late = late
        # Groups that took the lock at their tail, and groups run again
        # (from a tail-locked try, or after a deadlock).
        self.late_groups = 0
        self.late_retries = 0
        self._connect = connect
        self._begun = begun
        self._refresh = refresh
        # The feed of other dispatchers' events, and whether groups notify
        # them; the others' events a group read, for its answers.
        self.feed: Optional[EventFeed] = None
        self.notify = True
        self._foreign: list = []
        # How many groups read others' events numbered before their own.
        self.foreign_reads = 0

    def start(self, open_connection: Callable[[], Any]) -> Deferred:
        """
        Start the writer thread and open its connection with
        C{open_connection}; then re-read what other dispatchers change
        every C{interval} seconds, until L{close}.
        """
        self._threads.start()

        def opened(conn: PgConnection) -> None:
            self.connection = conn
            self._syncer = LoopingCall(self._watch)
            self._syncer.clock = self._clock
            self._syncer.start(self._sync_interval, now=False)

        return self._threads.defer(open_connection).addCallback(opened)

    def sync(self) -> Deferred:
        """
        Every commit is already durable: nothing to do.
        """
        return succeed(None)

    def _sync_in_thread(self) -> None:
        pass

    def _watch_in_thread(self) -> tuple[Optional[Exception], Optional[Exception], int]:
        try:
            conn = self._usable()
            self._refresh(conn)
        except psycopg.Error as e:
            return e, None, 0
        return None, None, 0

    def _watched(self, found: tuple[Optional[Exception], Optional[Exception], int]) -> None:
        error = found[0]
        if error is None:
            count = self._sync_trouble.cleared()
            if count is not None:
                log.info("the store {where} answers again", where=self._path)
            return
        count = self._sync_trouble.happened()
        if count is not None:
            log.error(
                "re-reading the counts of jobs from the store {where} failed ({error}); "
                "trying again every turn ({count} failed since the last line; logged "
                "at most once a minute)",
                where=self._path,
                error=str(error).strip(),
                count=count,
            )

    def _usable(self) -> PgConnection:
        conn = self.connection
        if conn is None or conn.raw.closed or conn.raw.broken:
            if conn is not None:
                conn.close()
            self.connection = None
            conn = self.connection = self._connect()
        return conn

    def _begin(self, conn: Any) -> None:
        # One round trip: the transaction, its lock, and what the group
        # must know of what others committed.
        cursor = conn.raw.execute(_BEGIN)
        cursor.nextset()
        cursor.nextset()
        (dependencies,) = cursor.fetchone()
        self._begun(dependencies)

    def _commit(
        self, work: list[Write], durable: bool = True
    ) -> tuple[list[tuple[bool, Any]], list]:
        began = time.perf_counter()
        try:
            conn = self._usable()
            late = self._late is not None and self._late() and _lockable_late(work)
            tries = 0
            while True:
                tries += 1
                try:
                    if late:
                        results, events = self._group_late(conn, work)
                    else:
                        results, events = self._group_early(conn, work)
                    break
                except BaseException as e:
                    if not conn.raw.closed and conn.in_transaction:
                        try:
                            conn.raw.execute("ROLLBACK")
                        except psycopg.Error:
                            pass
                    self._journal.rollback()
                    self._foreign = []
                    if late and isinstance(e, Exception) and (
                        not isinstance(e, psycopg.OperationalError) or _rolled_back(e)
                    ):
                        # Whatever went wrong without the lock (a write that
                        # failed, a shared path's Replay, a deadlock with a
                        # group that held it, a dependency stored meanwhile)
                        # is done again from the start under it, as every
                        # group was before: one write's failure is then its
                        # own alone.
                        late = False
                        self.late_retries += 1
                        continue
                    if _rolled_back(e) and tries < GROUP_TRIES:
                        # The server ended the group to break a deadlock
                        # with another dispatcher's group: nothing of it
                        # was written; again.
                        self.late_retries += 1
                        continue
                    raise
        except psycopg.Error as e:
            raise store_error(e) from e
        self._journal.commit()
        self._commit_seconds = time.perf_counter() - began
        self._commit_wrote = True
        self.batches += 1
        self.durable_batches += 1
        return results, events

    def _group_early(self, conn: PgConnection, work: list[Write]) -> tuple[list, list]:
        """
        One group's transaction with the groups' lock taken at its start
        (any write but claims and ends, or a database whose queues have
        limits or whose jobs have dependents): every write sees what every
        other dispatcher committed before it, and nothing they commit
        until it has.
        """
        events: list = [()] * len(work)
        self._begin(conn)
        try:
            results = self._run_together(conn, work)
        except Exception as e:
            if _rolled_back(e):
                raise
            # As the SQLite writer does: undo the group, and run each
            # write in its own savepoint.
            conn.raw.execute("ROLLBACK")
            self._journal.rollback()
            self._begin(conn)
            results = [self._apply_one(conn, write) for write in work]
        if self._record is not None:
            events = self._record(conn, work, results)
        conn.raw.execute(self._end_group(conn, work, results, events))
        return results, events

    def _group_late(self, conn: PgConnection, work: list[Write]) -> tuple[list, list]:
        """
        One group of claims and ends alone, with the groups' lock taken
        only for its tail: its writes run beside other dispatchers'
        groups (the jobs a claim reads are locked as read and those
        another claim holds are passed over; an end locks its job's row
        as it reads it), and under the lock it numbers its events and
        commits, so that ids still commit in their order.  Whatever fails
        here raises, and the group runs again with the lock from its
        start (L{_group_early}); so does one that finds, once it holds
        the lock, that a job now has dependents while it ended jobs (their
        dependents would wait for ends that did not look for them).
        """
        events: list = [()] * len(work)
        conn.raw.execute("BEGIN")
        results = self._run_together(conn, work)
        cursor = conn.raw.execute(_TAIL_LOCK)
        cursor.nextset()
        dependencies, newest = cursor.fetchone()
        if dependencies and any(type(write) is writes.Finish for write in work):
            raise _LockEarly()
        if self._others_before(newest) and _claimed_short(work, results):
            # A claim that got fewer jobs than it asked for (or saw none
            # left) tells the scheduler that no job was queued when it
            # committed; but it did not see what others committed while it
            # ran, whose events come before its own.  Under the lock from
            # the start it does.
            raise _LockEarly()
        self._begun(dependencies)
        self.late_groups += 1
        if self._record is not None:
            events = self._record(conn, work, results)
        conn.raw.execute(self._end_group(conn, work, results, events))
        return results, events

    def _others_before(self, newest: int) -> bool:
        """
        Whether events up to C{newest} may hold some this store has not
        published (other dispatchers', committed before the group's own).
        """
        feed = self.feed
        return feed is None or not feed.following or newest > feed.delivered

    def _end_group(self, conn: PgConnection, work: list, results: list, events: list) -> str:
        """
        What commits the group: with events (or a cancel that asks a
        running job's holder to stop it), a notification to the other
        dispatchers first (sent only if the group commits), and the
        others' events numbered before the group's own read for the feed
        to publish first (L{dispatcher.store._pg_events}).  On the writer
        thread, in the group's transaction.
        """
        feed = self.feed
        if feed is None or not feed.following:
            return "COMMIT"
        written = [told for told in events if told]
        asked = self.notify and _asks_holders(work, results)
        if not written and not asked:
            return "COMMIT"
        last = 0
        if written:
            first = first_id(written[0])
            if first - 1 > feed.delivered:
                self._foreign = _events_between(conn, feed.delivered, first)
                self.foreign_reads += 1
            last = last_id(written[-1])
        if not self.notify or not feed.others_listening:
            # No one to tell (a dispatcher that starts reads what it
            # missed; one that starts listening is seen at the next poll).
            return "COMMIT"
        return f"{notify_statement(feed.token, last, asked)}; COMMIT"

    def _flush(self) -> None:
        if self.feed is not None:
            self.feed.group_starting()
        super()._flush()

    def _flushed(self, outcome: Any, deferreds: list[Deferred]) -> None:
        foreign, self._foreign = self._foreign, []
        if foreign and self.feed is not None and not isinstance(outcome, Failure):
            # Numbered before the group's own: published first.
            self.feed.publish(foreign)
        super()._flushed(outcome, deferreds)
        if not self._flushing and self.feed is not None:
            self.feed.group_answered()

    def _apply_one(self, conn: Any, write: Write) -> tuple[bool, Any]:
        conn.raw.execute("SAVEPOINT operation")
        mark = self._journal.savepoint()
        try:
            value = self._operations[type(write)](conn, *write)
        except Exception as e:
            conn.raw.execute("ROLLBACK TO SAVEPOINT operation")
            conn.raw.execute("RELEASE SAVEPOINT operation")
            self._journal.rollback_to(mark)
            if isinstance(e, psycopg.OperationalError):
                # The connection is gone: the whole group fails.
                raise
            if isinstance(e, psycopg.Error):
                return (False, Failure(store_error(e)))
            return (False, Failure())
        conn.raw.execute("RELEASE SAVEPOINT operation")
        return (True, value)


# What begins a group: its transaction, the lock that makes the groups of
# every dispatcher on the database commit one at a time (see the module's
# docstring), and whether any job has dependents.
# The check is a statement of its own: one beside the lock would read the
# snapshot taken when that statement began, before the wait, and miss a
# first dependency another dispatcher committed meanwhile.
_BEGIN = (
    f"BEGIN; SELECT pg_advisory_xact_lock({WRITE_LOCK});"
    " SELECT EXISTS (SELECT 1 FROM dependencies)"
)

# What a group of claims and ends alone runs before it numbers its events
# (L{PostgresGroupWriter._group_late}): the same lock, and then, in a
# statement of its own so that it sees what was committed while it
# waited, whether any job has dependents and the greatest event id stored
# (as _NEWEST_EVENT reads it).
_TAIL_LOCK = (
    f"SELECT pg_advisory_xact_lock({WRITE_LOCK});"
    " SELECT EXISTS (SELECT 1 FROM dependencies),"
    " COALESCE((SELECT id + COALESCE(jobs, 1) - 1 FROM events ORDER BY id DESC LIMIT 1), 0)"
)

# The writes a group may be made of and still take the lock at its tail:
# a claim (its jobs locked as read, SKIP LOCKED) and an end (its job's row
# locked as read: dispatcher/store/_leases.py).  Any other write may read
# what it must see whole (a quota, a queue's running jobs, a lease another
# holds) or number what it stores (a job's seq).
_LATE_WRITES = frozenset({writes.Claim, writes.Finish})

# How many times a group the server ended to break a deadlock (with
# another dispatcher's) is run again before its writes fail.
GROUP_TRIES = 5


class _LockEarly(Exception):
    """
    A group that took the lock at its tail must run again with it taken
    at its start.
    """


def _rolled_back(error: BaseException) -> bool:
    """
    Whether the server ended the transaction to break a deadlock or a
    serialization failure (SQLSTATE class 40: psycopg's DeadlockDetected
    and SerializationFailure are not TransactionRollback's subclasses),
    so that it may simply be run again.
    """
    return isinstance(error, psycopg.Error) and (error.sqlstate or "").startswith("40")


def _claimed_short(work: list, results: list) -> bool:
    """
    Whether a claim of C{work} got fewer jobs than it asked for, or saw no
    job left queued.
    """
    for write, (ok, value) in zip(work, results):
        if type(write) is writes.Claim and ok and (
            value.drained or len(value.leases) < write.capacity
        ):
            return True
    return False


def _lockable_late(work: list) -> bool:
    """
    Whether C{work} is made of claims and ends alone.
    """
    return all(type(write) in _LATE_WRITES for write in work)


def _asks_holders(work: list, results: list) -> bool:
    """
    Whether a write of the group stored a cancel of a running job, which
    its holder (perhaps another dispatcher's) is to hear of.
    """
    for write, (ok, value) in zip(work, results):
        if not ok:
            continue
        kind = type(write)
        if kind is writes.Cancel and value.value[1] is not None:
            return True
        if kind is writes.CancelGroup and value.value[1]:
            return True
    return False


def _events_between(conn: PgConnection, after: int, before: int) -> list:
    """
    The stored events with ids above C{after} and below C{before}, in id
    order (what other dispatchers committed before a group took the write
    lock).
    """
    found: list = []
    while True:
        page = read_events(conn, after, FEED_PAGE)  # type: ignore[arg-type]
        for event in page.events:
            if event.id >= before:
                return found
            found.append(event)
        if len(page.events) < FEED_PAGE or not page.events:
            return found
        after = page.events[-1].id


def _other_listeners(conn: PgConnection, backend: int) -> int:
    """
    How many dispatchers' listening connections the database has, but the
    one whose server process is C{backend}.
    """
    (count,) = conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND application_name = ? AND pid <> ?",
        (LISTENER_NAME, backend),
    ).fetchone()
    return int(count)


def _space(conn: PgConnection) -> StoreSpace:
    (size,) = conn.execute("SELECT pg_database_size(current_database())").fetchone()
    # PostgreSQL reuses the space removals free (autovacuum); giving it
    # back to the file system is VACUUM FULL's, an operator's choice.
    return StoreSpace(int(size), 0, False)


def _shrink(writer: WriterState, conn: Any, limit: int) -> Written:
    return Written(0)


@implementer(IJobStore)
class PostgresJobStore(SQLiteJobStore):
    """
    L{IJobStore} on a PostgreSQL database (see the module's docstring).
    The methods that queue a write command or run a read are the SQLite
    store's (this class is one of it for them); what differs is where the
    writer and the readers connect, the schema, and the few reads and
    writes of the file itself (its size, giving pages back).

    @param url: the database's C{postgresql://} URL (libpq's form).
    @param reactor: the reactor the Deferreds fire in.
    @param readers: how many reader threads (and connections) to keep.
    @param queues: the queue names and their limits of running jobs (0: no
        limit); C{default} is always there.
    @param idempotency_ttl: seconds an idempotency key is kept.
    @param backoff: the wait before a retry, from the retry delay and the
        number of attempts spent.
    @param refresh_interval: seconds between re-reads of the counts of
        jobs by queue and state (what other dispatchers changed).
    @param clock: the clock that times those re-reads (the reactor's if
        not given).
    @param poll_interval: seconds between reads of the events other
        dispatchers committed, whatever was heard of them (the fallback
        of the notifications: L{dispatcher.store._pg_events}).
    @param notify: whether groups notify the other dispatchers and this
        one listens for theirs (C{False}: the polls alone).
    """

    def __init__(
        self,
        url: str,
        reactor: Any,
        readers: int = 2,
        queues: Optional[Mapping[str, int]] = None,
        idempotency_ttl: float = 86400.0,
        backoff: Callable[[float, int], float] = jittered_backoff,
        refresh_interval: float = 1.0,
        clock: Any = None,
        poll_interval: float = 1.0,
        notify: bool = True,
    ) -> None:
        self._url = url
        self._where = describe_url(url)
        self._path = self._where
        self._limits = queue_limits(queues)
        self._state = DatabaseWriterState(self._limits, idempotency_ttl, backoff)
        self._state.owners = DatabaseOwnerCounts()
        operations = dict(OPERATIONS)
        operations[writes.Shrink] = _shrink
        self._operations = {
            kind: functools.partial(operation, self._state)
            for kind, operation in operations.items()
        }
        self._writer = PostgresGroupWriter(
            self._where,
            reactor,
            self._operations,
            shared_paths(self._state),
            refresh_interval,
            clock if clock is not None else reactor,
            connect=self._connect_writer,
            begun=self._group_begun,
            refresh=self._refresh,
            journal=Journals(self._state.owners, self._state.counts),
            record=functools.partial(record_changes, self._state),
            late=self._may_lock_late,
        )
        self._feed = EventFeed(
            self.read_events,
            clock if clock is not None else reactor,
            poll_interval,
            lambda backend: self._read(_other_listeners, backend),
        )
        self._writer.feed = self._feed
        self._writer.committed = self._feed.committed
        self._writer.notify = notify
        self._notify = notify
        # The greatest event id stored when the store opened.
        self._newest_at_open = 0
        self._write = self._writer.write
        self._readers = readers
        self._reactor = reactor
        self._reader_pool = TaskThreads(reactor, readers, name="store-reader")
        self._pool: Optional[ConnectionPool] = None
        self._pool_lock = threading.Lock()

    # Life cycle

    def open(self) -> Deferred:
        """
        Connect, bring the schema up to date (under the migrations' lock)
        and start the writer and the readers; fires once open, or with
        L{StoreUnusable} (one line, naming the database without its
        password).
        """
        self._reader_pool.start()
        d = self._writer.start(self._open_in_thread)
        return d.addCallback(self._start_feed)

    def _start_feed(self, _: Any) -> None:
        listener = None
        if self._notify:
            listener = NotifyListener(
                self._reactor,
                lambda: connect(self._url, LISTENER_NAME),
                self._feed.token,
                self._feed.notified,
                self._feed.clock,
            )
        self._feed.start(self._newest_at_open, listener)

    def _connect_writer(self) -> PgConnection:
        raw = connect(self._url, "dispatcher store writer")
        conn = PgConnection(raw, ColumnTypes(raw))
        self._state.owners.load(conn)  # type: ignore[arg-type]
        self._state.connection = conn
        return conn

    def _open_in_thread(self) -> PgConnection:
        """
        Connect the writer, bring the schema up to date and load what the
        operations keep between writes; on the writer thread.
        """
        try:
            raw = connect(self._url, "dispatcher store writer")
        except psycopg.Error as e:
            raise StoreUnusable(
                f"the store {self._where} cannot be opened: {str(e).strip()}"
            ) from e
        try:
            migrate(raw, self._where)
            conn = PgConnection(raw, ColumnTypes(raw))
            self._state.load(conn)
            (newest,) = conn.execute(_NEWEST_EVENT).fetchone()
            self._newest_at_open = int(newest)
        except psycopg.Error as e:
            raw.close()
            raise StoreUnusable(
                f"the store {self._where} cannot be opened: {str(e).strip()}"
            ) from e
        except BaseException:
            raw.close()
            raise
        self._pool = ConnectionPool(
            self._url,
            min_size=1,
            max_size=self._readers,
            kwargs={
                "connect_timeout": CONNECT_TIMEOUT,
                "application_name": "dispatcher store reader",
                **KEEPALIVES,
            },
            # A connection the server broke (the database went away and
            # came back) is replaced at its next use, not handed out.
            check=ConnectionPool.check_connection,
            configure=_configure_reader,
            name="dispatcher-readers",
            open=True,
        )
        return conn

    def _may_lock_late(self) -> bool:
        # A queue's limit is counted in the database at each claim and
        # must be exact across dispatchers; an end of a job with
        # dependents reads and frees them (see _group_late).
        return not self._state.limited and not self._state.dependencies

    def _group_begun(self, dependencies: bool) -> None:
        # Another dispatcher may have stored the first dependency.
        self._state.dependencies = self._state.dependencies or dependencies

    def _refresh(self, conn: PgConnection) -> None:
        # Between groups: the counts as committed, by every dispatcher.
        self._state.counts.load(conn)

    @property
    def unsynced(self) -> bool:
        """
        Always false: every commit is durable before its answer.
        """
        return False

    def sync(self) -> Deferred:
        """
        Nothing to sync: fires at once.
        """
        return self._writer.sync()

    def close(self) -> Deferred:
        """
        Finish the writes already asked for, then close every connection
        (the readers' pool on a thread of its own: closing it waits for
        its connections to close).
        """
        # The feed reads no more from now on (its listener stops beside the
        # writer's last groups).
        listener_stopped = self._feed.stop()
        d = self._writer.close(self._reader_pool.stop)
        d.addCallback(lambda _: listener_stopped)
        return d.addCallback(lambda _: self._close_pool())

    def _close_pool(self) -> Deferred:
        pool, self._pool = self._pool, None
        closed: Deferred = Deferred()
        if pool is None:
            closed.callback(None)
            return closed

        def close() -> None:
            try:
                pool.close()
            finally:
                self._reactor.callFromThread(closed.callback, None)

        threading.Thread(target=close, name="store-pool-close").start()
        return closed

    # Events

    def follow_events(self, listener: Optional[Callable[[list], None]]) -> None:
        """
        Call C{listener} in the reactor thread with the events of each of
        this store's writes, in id order, just before the write is
        answered (see L{IJobStore.follow_events}); the events of other
        dispatchers on the database that come before them go to
        L{follow_others}'s listener first.
        """
        self._feed.own = listener

    def follow_others(self, listener: Optional[Callable[[list], None]]) -> None:
        """
        Call C{listener} in the reactor thread with the events other
        dispatchers on the database committed, a list at a time, in id
        order and in their place among this store's own (see
        L{IJobStore.follow_others}); given before L{open}.
        """
        self._feed.others = listener

    def follow_cancels(self, listener: Optional[Callable[[], None]]) -> None:
        """
        Call C{listener} in the reactor thread whenever another dispatcher
        on the database may have stored a cancel of a running job: when
        its notification comes, and at every poll (see
        L{IJobStore.follow_cancels}); given before L{open}.
        """
        self._feed.cancels = listener

    @property
    def feed(self) -> EventFeed:
        """
        The feed of other dispatchers' events (for tests and metrics).
        """
        return self._feed

    # Reads

    def _read_in_thread(self, operation: Callable[..., Any], args: tuple) -> Any:
        pool = self._pool
        if pool is None:
            raise StoreClosed("the dispatcher is stopping")
        try:
            with pool.connection(timeout=READ_CONNECT_TIMEOUT) as raw:
                return operation(PgConnection(raw), *args)
        except psycopg.Error as e:
            if unreachable(e):
                raise StoreUnreachable(str(e).strip()) from e
            raise ReadFailed(str(e).strip()) from e

    def unfinished_jobs(self) -> Deferred:
        """
        Fire with each owner's unfinished jobs as committed, read from the
        counts table (every dispatcher's).
        """
        if self._writer.closing:
            return fail(StoreClosed("the dispatcher is stopping"))
        return self._read(_unfinished_by_owner)

    def due_deliveries(
        self, now: float, limit: int, hold: float = 0.0, exclude: Sequence[int] = ()
    ) -> Deferred:
        """
        Fire with at most C{limit} webhook deliveries due at C{now} (see
        L{IJobStore.due_deliveries}); with C{hold}, claimed for this
        dispatcher alone until C{now + hold}, so that no other on the
        database tries them meanwhile.  A read finds whether any is due
        first: an outbox with nothing due costs no write.
        """
        d = super().due_deliveries(now, limit, 0.0, exclude)
        if hold <= 0:
            return d

        def claim(due: list) -> Any:
            if not due:
                return due
            claimed = self._write(writes.ClaimDeliveries(now, limit, hold, tuple(exclude)))
            return claimed.addCallback(lambda written: written.value)

        return d.addCallback(claim)

    def space(self) -> Deferred:
        """
        Fire with the L{StoreSpace} of the database: its size; nothing to
        give back (PostgreSQL reuses what removals free).
        """
        return self._read(_space)


def _unfinished_by_owner(conn: PgConnection) -> dict[str, int]:
    """
    Each owner's unfinished jobs, as committed (owners with none left
    out).
    """
    return {
        owner: int(count)
        for owner, count in conn.execute(_UNFINISHED_BY_OWNER, (NO_OWNER, list(UNFINISHED)))
    }


def _configure_reader(raw: psycopg.Connection) -> None:
    # Each read one snapshot: a page and its attempts agree.
    raw.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    raw.read_only = True
