"""
The SQLite store's schema: its migrations, one a version, and the step
that brings a database file up to the newest.  A migration is SQL, or a
Python step (a function of the connection) where SQL cannot say it: each
runs in its own transaction with the version it brings.
"""

from __future__ import annotations

import sqlite3
from typing import Callable, Sequence, Union

from twisted.logger import Logger

from dispatcher.store._dialect import differs
from dispatcher.store._repair import repair_unservable
from dispatcher.store._results import StoreVersionError

log = Logger()


# The webhook outbox (issue 17): each change of state of a job that names
# notify, among the states it names, is a row of deliveries, written by
# the triggers below in the statement that changes the state, so in its
# transaction: a commit makes the change and its delivery together, a
# crash before it neither, and every path that changes a job's state
# (a submission, a claim, an end, a cancel, a retry, a release, a
# dependency's end, a promotion, and any added later) writes them without
# a line of its own.  The delivery service reads the rows due and deletes
# them once delivered or given up; a job's removal removes its rows with
# it.
#
# The triggers are made by the first submission of a job that names notify
# (install_webhook_triggers, in its transaction), not by the migration: a
# trigger on the jobs table costs every claim and end of every job a call
# of its program, notify or not (the WHEN test runs inside it): 2.9 us of
# CPU a job on the writer's SQLite work for a no-op job (30.3 against 27.4,
# medians of ten alternating rounds of 20,000 jobs submitted in batches,
# claimed and finished), a tenth.  A store whose jobs never name notify
# pays nothing; one that has had such a job pays that from then on.
#
# The row holds the event as it was (the job's fields may change before
# it is sent) and the URL; its id (AUTOINCREMENT: never given twice, even
# after the newest row is deleted) is the delivery's Dispatcher-Event-Id.
# Its time is the wall clock's as SQLite reads it when the change is
# written (a daemon's clock is the wall clock too); due is 0 until a
# failed try puts it later, so that a new delivery is due at once,
# whatever clock the reader asks with.
_DELIVERY_COLUMNS = (
    "job_id, url, at, state, previous, owner, queue, name, array_id, batch_id,"
    " attempt, exit_code, error"
)


def _delivery_values(previous: str) -> str:
    # The values of a delivery row made from the job row NEW.
    return (
        "NEW.id, substr(NEW.notify, instr(NEW.notify, ' ') + 1),"
        " (julianday('now') - 2440587.5) * 86400.0, NEW.state, "
        f"{previous}, NEW.owner, NEW.queue, NEW.name, NEW.array_id, NEW.batch_id,"
        " NULLIF(NEW.attempt_count, 0), NEW.exit_code, NEW.error"
    )


# Whether the job row NEW names its new state among its notify states
# (store/_stored.py: notify_to_stored's form).
_NAMES_STATE = (
    "NEW.notify IS NOT NULL AND instr(substr(NEW.notify, 1, instr(NEW.notify, ' ')),"
    " ',' || NEW.state || ',') > 0"
)

WEBHOOK_OUTBOX = (
    "ALTER TABLE jobs ADD COLUMN notify TEXT",
    """
    CREATE TABLE deliveries (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id TEXT NOT NULL,
        url TEXT NOT NULL,
        at REAL NOT NULL,
        state TEXT NOT NULL,
        previous TEXT,
        owner TEXT,
        queue TEXT NOT NULL,
        name TEXT,
        array_id TEXT,
        batch_id TEXT,
        attempt INTEGER,
        exit_code INTEGER,
        error TEXT,
        tries INTEGER NOT NULL DEFAULT 0,
        due REAL NOT NULL DEFAULT 0
    )
    """,
    "CREATE INDEX deliveries_due ON deliveries (due, id)",
    "CREATE INDEX deliveries_job ON deliveries (job_id)",
)

# The triggers that write the deliveries (and remove them with their job),
# made once a job names notify (see above); PostgreSQL's are made by its
# schema (dispatcher/store/_pg_schema.py).
WEBHOOK_TRIGGERS = tuple(differs(statement, None) for statement in (
    f"""
    CREATE TRIGGER IF NOT EXISTS jobs_notify_made AFTER INSERT ON jobs WHEN {_NAMES_STATE}
    BEGIN
        INSERT INTO deliveries ({_DELIVERY_COLUMNS}) VALUES ({_delivery_values("NULL")});
    END
    """,
    f"""
    CREATE TRIGGER IF NOT EXISTS jobs_notify_changed AFTER UPDATE OF state ON jobs
    WHEN NEW.state IS NOT OLD.state AND {_NAMES_STATE}
    BEGIN
        INSERT INTO deliveries ({_DELIVERY_COLUMNS}) VALUES ({_delivery_values("OLD.state")});
    END
    """,
    """
    CREATE TRIGGER IF NOT EXISTS jobs_notify_removed AFTER DELETE ON jobs WHEN OLD.notify IS NOT NULL
    BEGIN
        DELETE FROM deliveries WHERE job_id = OLD.id;
    END
    """,
))


def webhook_outbox(conn: sqlite3.Connection) -> None:
    """
    The migration that adds the webhook outbox (L{WEBHOOK_OUTBOX}).
    """
    for statement in WEBHOOK_OUTBOX:
        conn.execute(statement)


def install_webhook_triggers(conn: sqlite3.Connection) -> None:
    """
    Make the triggers that write webhook deliveries (L{WEBHOOK_TRIGGERS}),
    unless they are there: in the transaction of a submission of a job
    that names notify, before its rows are inserted, so that they commit
    (or roll back) together.  Run for every such submission rather than
    remembered: a transaction rolled back would take the triggers with
    it.  Finding them there is a look in the schema the connection holds.
    """
    for statement in WEBHOOK_TRIGGERS:
        conn.execute(statement)


# Each entry is one schema version; a database at version N has had the
# first N applied.  Never edit an entry that has shipped: add another.
MIGRATIONS: Sequence[Union[str, Callable[[sqlite3.Connection], None]]] = (
    """
    CREATE TABLE jobs (
        seq INTEGER PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        state TEXT NOT NULL,
        name TEXT,
        labels TEXT NOT NULL,
        spec TEXT NOT NULL,
        priority INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        exit_code INTEGER,
        result TEXT,
        error TEXT,
        wait_reason TEXT,
        attempt_count INTEGER NOT NULL DEFAULT 0,
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        lease_token INTEGER,
        lease_holder TEXT,
        lease_expires REAL
    );
    CREATE INDEX jobs_queued ON jobs (priority DESC, seq) WHERE state = 'queued';
    CREATE INDEX jobs_state ON jobs (state, seq);
    CREATE INDEX jobs_holder ON jobs (lease_holder) WHERE lease_token IS NOT NULL;
    CREATE TABLE job_labels (
        key TEXT NOT NULL,
        value TEXT NOT NULL,
        seq INTEGER NOT NULL,
        PRIMARY KEY (key, value, seq)
    ) WITHOUT ROWID;
    CREATE TABLE attempts (
        job_id TEXT NOT NULL,
        number INTEGER NOT NULL,
        token INTEGER NOT NULL UNIQUE,
        holder TEXT NOT NULL,
        started_at REAL NOT NULL,
        finished_at REAL,
        exit_code INTEGER,
        error TEXT,
        pid INTEGER,
        start_ticks INTEGER,
        boot_id TEXT,
        PRIMARY KEY (job_id, number)
    );
    """,
    """
    ALTER TABLE jobs ADD COLUMN queue TEXT NOT NULL DEFAULT 'default';
    ALTER TABLE jobs ADD COLUMN max_attempts INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE jobs ADD COLUMN attempts_spent INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN retry_delay REAL NOT NULL DEFAULT 1.0;
    ALTER TABLE jobs ADD COLUMN timeout REAL;
    ALTER TABLE jobs ADD COLUMN not_before REAL;
    ALTER TABLE jobs ADD COLUMN waiting_on INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN array_id TEXT;
    ALTER TABLE jobs ADD COLUMN array_index INTEGER;
    ALTER TABLE jobs ADD COLUMN cancelled_by TEXT;
    DROP INDEX jobs_queued;
    CREATE INDEX jobs_queued ON jobs (queue, priority DESC, seq) WHERE state = 'queued';
    CREATE INDEX jobs_due ON jobs (not_before) WHERE state = 'pending' AND waiting_on = 0;
    CREATE INDEX jobs_array ON jobs (array_id) WHERE array_id IS NOT NULL;
    CREATE INDEX jobs_cancelled_by ON jobs (cancelled_by) WHERE cancelled_by IS NOT NULL;
    CREATE TABLE dependencies (
        depends_on TEXT NOT NULL,
        job_id TEXT NOT NULL,
        PRIMARY KEY (depends_on, job_id)
    ) WITHOUT ROWID;
    CREATE INDEX dependencies_job ON dependencies (job_id);
    CREATE TABLE idempotency (
        key TEXT PRIMARY KEY,
        digest TEXT NOT NULL,
        job_ids TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE INDEX idempotency_age ON idempotency (created_at);
    """,
    # Only start-up looked jobs up by their lease holder, and the jobs that
    # hold a lease are the staging and running ones, which jobs_state
    # finds; keeping this index cost every claim and every end a move in
    # it (about a tenth of the writer's SQLite time for a no-op job).
    """
    DROP INDEX jobs_holder;
    """,
    # Every commit bumps the one row's sequence number, which the mark
    # file beside the database is checked against (see _mark).
    """
    CREATE TABLE commits (
        one INTEGER PRIMARY KEY CHECK (one = 1),
        seq INTEGER NOT NULL,
        at REAL NOT NULL
    );
    INSERT INTO commits (one, seq, at) VALUES (1, 0, 0);
    """,
    # Every job has an owner: the name of the principal that submitted it
    # (issue 15).  Jobs stored before have none (NULL, shown as null): no
    # one submitted them under a name, so only the principals that see
    # every job (admins, readers) see them, and no submitter does.  The
    # index serves ?owner= and a submitter's own lists, in seq order: a
    # page of an owner of 100 jobs spread among 100,000 was read in 1.6 ms
    # with it, 18 ms without (a scan in seq order), and of an owner of
    # none in 0.01 ms against 15.  With the owner a plain batch's writer
    # spends about half a microsecond more a job (4.5 against 4.0), the
    # index about half of that.
    #
    # Idempotency keys are an owner's own: two owners' same key makes each
    # its own jobs.  The table is made again (a key was its primary key);
    # the keys kept from before belong to no one ('') and answer no
    # principal, so a request first sent before the upgrade and sent again
    # after it makes its jobs again (keys live a day:
    # [dispatcher] idempotency_ttl).
    """
    ALTER TABLE jobs ADD COLUMN owner TEXT;
    CREATE INDEX jobs_owner ON jobs (owner, seq) WHERE owner IS NOT NULL;
    CREATE TABLE idempotency_owned (
        owner TEXT NOT NULL,
        key TEXT NOT NULL,
        digest TEXT NOT NULL,
        job_ids TEXT NOT NULL,
        created_at REAL NOT NULL,
        PRIMARY KEY (owner, key)
    );
    INSERT INTO idempotency_owned (owner, key, digest, job_ids, created_at)
        SELECT '', key, digest, job_ids, created_at FROM idempotency;
    DROP TABLE idempotency;
    ALTER TABLE idempotency_owned RENAME TO idempotency;
    CREATE INDEX idempotency_age ON idempotency (created_at);
    """,
    # What cannot be served (a lone surrogate escape, NaN or Infinity in
    # the JSON that versions before the store's own form wrote) is
    # repaired, and each job repaired says so in its error (issue 16;
    # dispatcher/store/_repair.py).
    repair_unservable,
    # Migration 7 (issue 16, a job's limits): the limits a command's
    # attempt ran under, as JSON ({"memory_mb", "processes", "enforced"}),
    # and the streams of its log that were cut at [executor] max_log_bytes
    # ("stdout,stderr"); NULL for a task's attempt, one that never started,
    # and every attempt before.
    """
    ALTER TABLE attempts ADD COLUMN limits TEXT;
    ALTER TABLE attempts ADD COLUMN log_cut TEXT;
    """,
    # Migration 8 (issue 16, retention).  Finished jobs are removed
    # (dispatcher/store/_removal.py).  A job's sequence number is the cursor of GET /v1/jobs, and the next
    # job's is one past the greatest stored: once the newest job is
    # removed, the next would get its number again, behind a client's
    # cursor.  The greatest number removed is kept here, and new numbers
    # start past it.
    """
    CREATE TABLE removed (
        one INTEGER PRIMARY KEY CHECK (one = 1),
        top_seq INTEGER NOT NULL
    );
    INSERT INTO removed (one, top_seq) VALUES (1, 0);
    """,
    # Migration 9 (issue 17, arrays and batches as things, strict lists).
    # A batch (POST /v1/jobs/batch) is known by an id stored on each of its
    # jobs, NULL for the rest: a partial index finds a batch's members (its
    # counts, GET /v1/jobs?batch=) as jobs_array finds an array's, and costs
    # the jobs submitted one at a time nothing.  Jobs are listed by name
    # (?name=) along a partial index too: an unnamed job (a plain batch's)
    # is not in it.  Both hold the row's seq, so a page reads them in
    # submission order, either way.
    """
    ALTER TABLE jobs ADD COLUMN batch_id TEXT;
    CREATE INDEX jobs_batch ON jobs (batch_id) WHERE batch_id IS NOT NULL;
    CREATE INDEX jobs_name ON jobs (name) WHERE name IS NOT NULL;
    """,
    # Migration 10 (issue 17, events): every committed
    # change of a job's state, and every remote worker's coming and going,
    # is a row here, written in the transaction of the change
    # (dispatcher/store/_events.py).  The id is what GET /v1/events gives
    # and resumes after.  A row is kept small: what the job is (owner,
    # name, queue, labels, array, batch) is read from its row when the event is
    # read.  A worker's event has no job: its state is the change
    # (connected, left), and worker its name.  Old rows are removed by
    # retention ([events] retention), never the newest.
    """
    CREATE TABLE events (
        id INTEGER PRIMARY KEY,
        at REAL NOT NULL,
        job_id TEXT,
        state TEXT NOT NULL,
        previous TEXT,
        attempt INTEGER,
        exit_code INTEGER,
        error TEXT,
        worker TEXT
    );
    """,
    # Migration 11 (issue 17, webhooks; 9 is the batches', 10 the
    # events'): the webhook outbox and the jobs' notify column
    # (WEBHOOK_OUTBOX above; its triggers come with the first job that
    # names notify).
    webhook_outbox,
    # Migration 12 (issue 18, metrics): every job counted by queue, state
    # and owner ('' for none), kept by the writer in the transaction of
    # each change (dispatcher/store/_counts.py: StateCounts), so that
    # GET /v1/queues and the metrics read a few rows rather than count a
    # million.  Counted once here from the jobs stored.
    """
    CREATE TABLE job_counts (
        queue TEXT NOT NULL,
        state TEXT NOT NULL,
        owner TEXT NOT NULL,
        jobs INTEGER NOT NULL,
        PRIMARY KEY (queue, state, owner)
    ) WITHOUT ROWID;
    INSERT INTO job_counts (queue, state, owner, jobs)
        SELECT queue, state, COALESCE(owner, ''), COUNT(*) FROM jobs
        GROUP BY queue, state, COALESCE(owner, '');
    """,
    # Migration 13 (issue 16, the batch path's speed): the events of a
    # plain submission's jobs (a batch of commands or tasks, all new and
    # queued) are one row, not one a job: their ids as a JSON array in
    # job_ids, jobs of them, numbered from the row's id
    # (dispatcher/store/_events.py).  A row a job cost a batch a sixth of
    # its rate.
    """
    ALTER TABLE events ADD COLUMN jobs INTEGER;
    ALTER TABLE events ADD COLUMN job_ids TEXT;
    """,
    # Migration 14 (issue 16, the batch path's speed): a batch's members
    # are found from the range of sequence numbers they were given (a
    # batch's jobs are numbered in its one write), kept in batches, rather
    # than along jobs_batch, the partial index of migration 9, which cost
    # every job of a batch an index entry (about 8 % of a batch's rate).
    # A member is a job in the range whose batch_id is the batch's: the
    # range bounds the read, the column says who belongs
    # (dispatcher/store/_groups.py).  The row goes when its last member is
    # removed (dispatcher/store/_removal.py).
    """
    CREATE TABLE batches (
        batch TEXT PRIMARY KEY,
        first_seq INTEGER NOT NULL,
        last_seq INTEGER NOT NULL
    ) WITHOUT ROWID;
    INSERT INTO batches (batch, first_seq, last_seq)
        SELECT batch_id, MIN(seq), MAX(seq) FROM jobs WHERE batch_id IS NOT NULL
        GROUP BY batch_id;
    DROP INDEX jobs_batch;
    """,
    # Migration 15 (issue 19, workers that move between dispatchers on one
    # database): the dispatcher a remote worker's lease was last taken up
    # by (its [dispatcher] name), NULL while the one that granted it serves
    # it.  Only that dispatcher may record the lease expired: another that
    # its worker moved away from must not end a job that runs on.
    "ALTER TABLE jobs ADD COLUMN lease_server TEXT;",
)


def migrate(conn: sqlite3.Connection, path: str) -> None:
    """
    Apply to the database on C{conn} (the file C{path}) every migration it
    has not had yet, each in its own transaction, and log each step of a
    store that had a version (one line for a new one).  Fails with
    L{StoreVersionError} if a newer dispatcher wrote it.
    """
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    if version > len(MIGRATIONS):
        raise StoreVersionError(
            f"{path} has schema version {version}, newer than the "
            f"{len(MIGRATIONS)} this dispatcher knows; run a newer dispatcher"
        )
    for number in range(version, len(MIGRATIONS)):
        conn.execute("BEGIN IMMEDIATE")
        migration = MIGRATIONS[number]
        if callable(migration):
            migration(conn)
        else:
            for statement in _statements(migration):
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {number + 1}")
        conn.execute("COMMIT")
        if version:
            # A new store is made, not migrated: only a store that held
            # data is worth a line for each step.
            log.info(
                "store {path} migrated to schema version {version}",
                path=path,
                version=number + 1,
            )
    if not version:
        log.info(
            "made a new store {path} (schema version {version})",
            path=path,
            version=len(MIGRATIONS),
        )


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]
