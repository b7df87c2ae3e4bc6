"""
The PostgreSQL store's schema: its migrations, one a version, kept apart
from SQLite's (L{dispatcher.store._schema}) since the two engines number
their histories apart.  Version 1 is what SQLite's schema is at its
migration 12, in PostgreSQL's types (version 2 its migration 13, version
3 its 14, version 4 its 15): the same tables, columns and indexes, so that the store's
operations and reads run on both (L{dispatcher.store._dialect}).  What differs:

  - C{BIGINT} for every integer (SQLite's are all 64-bit), C{DOUBLE
    PRECISION} for every time; a flag (C{cancel_requested}) stays an
    C{INTEGER} 0 or 1, and JSON stays text, so that a row reads back the
    same in both.
  - Lease tokens come from a sequence (C{lease_tokens}): several
    dispatchers on one database take tokens that never meet.  A
    dispatcher takes a block of L{TOKEN_BLOCK} at a time.
  - The webhook outbox's triggers are made here, not by the first job
    that names notify: a PostgreSQL trigger whose C{WHEN} is false costs
    a row change no call of its function, and a trigger made at run time
    would take a lock on the jobs table that every dispatcher waits on.
  - No C{commits} table: the mark file it serves is SQLite's check that
    its file lost no commit (L{dispatcher.store._mark}); PostgreSQL's
    own write-ahead log and C{synchronous_commit} answer for that.

The version is the one row of C{schema_version}.  Migrations run when a
store opens, each in its own transaction, under a session advisory lock
(L{MIGRATION_LOCK}): two dispatchers opening the same database at once
take turns, and the second finds nothing left to do.

This module holds text only; the store runs it
(L{dispatcher.store._postgres}).
"""

from __future__ import annotations

from typing import Sequence

# The key of the advisory lock that migrations run under (any constant
# that no other program on the database uses: "dispatc" in ASCII).
MIGRATION_LOCK = 0x64697370617463

# The key of the advisory lock each group of writes holds until it
# commits (see dispatcher.store._postgres: why one at a time).
WRITE_LOCK = MIGRATION_LOCK + 1

# How many lease tokens a dispatcher takes from the sequence at once: one
# call of nextval for that many claims.  Tokens only need to differ; a
# block left unused by a stopped dispatcher is a gap, harmless.
TOKEN_BLOCK = 64

VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS schema_version (
    one INTEGER PRIMARY KEY CHECK (one = 1),
    version INTEGER NOT NULL
)
"""

# The webhook outbox's rows, written by the triggers on the jobs table
# (the same rows SQLite's triggers write: dispatcher/store/_schema.py).
_DELIVERY_FUNCTIONS = """
CREATE FUNCTION jobs_notify_made() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO deliveries (job_id, url, at, state, previous, owner, queue, name,
                            array_id, batch_id, attempt, exit_code, error)
    VALUES (NEW.id, substr(NEW.notify, strpos(NEW.notify, ' ') + 1),
            extract(epoch from clock_timestamp()), NEW.state,
            CASE WHEN TG_OP = 'UPDATE' THEN OLD.state END,
            NEW.owner, NEW.queue, NEW.name, NEW.array_id, NEW.batch_id,
            NULLIF(NEW.attempt_count, 0), NEW.exit_code, NEW.error);
    RETURN NULL;
END
$$;
CREATE FUNCTION jobs_notify_removed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM deliveries WHERE job_id = OLD.id;
    RETURN NULL;
END
$$;
"""

_NAMES_STATE = (
    "NEW.notify IS NOT NULL AND strpos(substr(NEW.notify, 1, strpos(NEW.notify, ' ')),"
    " ',' || NEW.state || ',') > 0"
)

_DELIVERY_TRIGGERS = f"""
CREATE TRIGGER jobs_notify_made AFTER INSERT ON jobs
    FOR EACH ROW WHEN ({_NAMES_STATE}) EXECUTE FUNCTION jobs_notify_made();
CREATE TRIGGER jobs_notify_changed AFTER UPDATE OF state ON jobs
    FOR EACH ROW WHEN (NEW.state IS DISTINCT FROM OLD.state AND {_NAMES_STATE})
    EXECUTE FUNCTION jobs_notify_made();
CREATE TRIGGER jobs_notify_removed AFTER DELETE ON jobs
    FOR EACH ROW WHEN (OLD.notify IS NOT NULL) EXECUTE FUNCTION jobs_notify_removed();
"""

# Each entry is one schema version; a database at version N has had the
# first N applied.  Never edit an entry that has shipped: add another.
MIGRATIONS: Sequence[str] = (
    # Version 1: SQLite's schema at its migration 12.
    """
    CREATE TABLE jobs (
        seq BIGINT PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        state TEXT NOT NULL,
        name TEXT,
        labels TEXT NOT NULL,
        spec TEXT NOT NULL,
        priority BIGINT NOT NULL DEFAULT 0,
        created_at DOUBLE PRECISION NOT NULL,
        started_at DOUBLE PRECISION,
        finished_at DOUBLE PRECISION,
        exit_code BIGINT,
        result TEXT,
        error TEXT,
        wait_reason TEXT,
        attempt_count BIGINT NOT NULL DEFAULT 0,
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        lease_token BIGINT,
        lease_holder TEXT,
        lease_expires DOUBLE PRECISION,
        queue TEXT NOT NULL DEFAULT 'default',
        max_attempts BIGINT NOT NULL DEFAULT 1,
        attempts_spent BIGINT NOT NULL DEFAULT 0,
        retry_delay DOUBLE PRECISION NOT NULL DEFAULT 1.0,
        timeout DOUBLE PRECISION,
        not_before DOUBLE PRECISION,
        waiting_on BIGINT NOT NULL DEFAULT 0,
        array_id TEXT,
        array_index BIGINT,
        cancelled_by TEXT,
        owner TEXT,
        batch_id TEXT,
        notify TEXT
    );
    CREATE INDEX jobs_queued ON jobs (queue, priority DESC, seq) WHERE state = 'queued';
    CREATE INDEX jobs_state ON jobs (state, seq);
    CREATE INDEX jobs_due ON jobs (not_before) WHERE state = 'pending' AND waiting_on = 0;
    CREATE INDEX jobs_array ON jobs (array_id) WHERE array_id IS NOT NULL;
    CREATE INDEX jobs_cancelled_by ON jobs (cancelled_by) WHERE cancelled_by IS NOT NULL;
    CREATE INDEX jobs_owner ON jobs (owner, seq) WHERE owner IS NOT NULL;
    CREATE INDEX jobs_batch ON jobs (batch_id) WHERE batch_id IS NOT NULL;
    CREATE INDEX jobs_name ON jobs (name) WHERE name IS NOT NULL;
    CREATE TABLE job_labels (
        key TEXT NOT NULL,
        value TEXT NOT NULL,
        seq BIGINT NOT NULL,
        PRIMARY KEY (key, value, seq)
    );
    CREATE TABLE attempts (
        job_id TEXT NOT NULL,
        number BIGINT NOT NULL,
        token BIGINT NOT NULL UNIQUE,
        holder TEXT NOT NULL,
        started_at DOUBLE PRECISION NOT NULL,
        finished_at DOUBLE PRECISION,
        exit_code BIGINT,
        error TEXT,
        pid BIGINT,
        start_ticks BIGINT,
        boot_id TEXT,
        limits TEXT,
        log_cut TEXT,
        PRIMARY KEY (job_id, number)
    );
    CREATE SEQUENCE lease_tokens INCREMENT BY 64;
    CREATE TABLE dependencies (
        depends_on TEXT NOT NULL,
        job_id TEXT NOT NULL,
        PRIMARY KEY (depends_on, job_id)
    );
    CREATE INDEX dependencies_job ON dependencies (job_id);
    CREATE TABLE idempotency (
        owner TEXT NOT NULL,
        key TEXT NOT NULL,
        digest TEXT NOT NULL,
        job_ids TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (owner, key)
    );
    CREATE INDEX idempotency_age ON idempotency (created_at);
    CREATE TABLE removed (
        one INTEGER PRIMARY KEY CHECK (one = 1),
        top_seq BIGINT NOT NULL
    );
    INSERT INTO removed (one, top_seq) VALUES (1, 0);
    CREATE TABLE events (
        id BIGINT PRIMARY KEY,
        at DOUBLE PRECISION NOT NULL,
        job_id TEXT,
        state TEXT NOT NULL,
        previous TEXT,
        attempt BIGINT,
        exit_code BIGINT,
        error TEXT,
        worker TEXT
    );
    CREATE TABLE deliveries (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        job_id TEXT NOT NULL,
        url TEXT NOT NULL,
        at DOUBLE PRECISION NOT NULL,
        state TEXT NOT NULL,
        previous TEXT,
        owner TEXT,
        queue TEXT NOT NULL,
        name TEXT,
        array_id TEXT,
        batch_id TEXT,
        attempt BIGINT,
        exit_code BIGINT,
        error TEXT,
        tries BIGINT NOT NULL DEFAULT 0,
        due DOUBLE PRECISION NOT NULL DEFAULT 0
    );
    CREATE INDEX deliveries_due ON deliveries (due, id);
    CREATE INDEX deliveries_job ON deliveries (job_id);
    CREATE TABLE job_counts (
        queue TEXT NOT NULL,
        state TEXT NOT NULL,
        owner TEXT NOT NULL,
        jobs BIGINT NOT NULL,
        PRIMARY KEY (queue, state, owner)
    );
    """
    + _DELIVERY_FUNCTIONS
    + _DELIVERY_TRIGGERS,
    # Version 2: SQLite's migration 13, a plain batch's events as one row
    # (their ids a JSON array in job_ids, jobs of them, numbered from the
    # row's id: dispatcher/store/_events.py).
    """
    ALTER TABLE events ADD COLUMN jobs BIGINT;
    ALTER TABLE events ADD COLUMN job_ids TEXT;
    """,
    # Version 3: SQLite's migration 14, a batch's members found from the
    # range of sequence numbers they were given, not along jobs_batch.
    """
    CREATE TABLE batches (
        batch TEXT PRIMARY KEY,
        first_seq BIGINT NOT NULL,
        last_seq BIGINT NOT NULL
    );
    INSERT INTO batches (batch, first_seq, last_seq)
        SELECT batch_id, MIN(seq), MAX(seq) FROM jobs WHERE batch_id IS NOT NULL
        GROUP BY batch_id;
    DROP INDEX jobs_batch;
    """,
    # Version 4: SQLite's migration 15, the dispatcher that last took up a
    # remote worker's lease (a worker that moved to it from another).
    "ALTER TABLE jobs ADD COLUMN lease_server TEXT;",
)

assert f"INCREMENT BY {TOKEN_BLOCK};" in MIGRATIONS[0]
