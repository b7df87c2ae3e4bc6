"""
The benchmark's PostgreSQL section counts what it says it counts: its
daemon is configured for the database it names, the counters of a window
are what the window added, and what a workload wrote is read back from
a real PostgreSQL exactly.
"""

from __future__ import annotations

import psycopg

from bench.daemon import config_text
from bench.harness import counter_deltas
from bench.pg_costs import BackendCpu, database_stats, per_job, wait_no_backends
from dispatcher.config._ini import parse_config
from tests.postgres import ADMIN_URL, drop_database, make_database


def test_bench_daemon_is_configured_for_the_database_it_names() -> None:
    """
    The bench daemon's ini file names the PostgreSQL store it is given,
    and no store at all without one (its SQLite file).
    """
    url = "postgresql://postgres@127.0.0.1:5432/dispatcher_bench_x"
    on_pg = parse_config(config_text(port=1, data_dir="/tmp/x", slots=8, threads=8,
                                     store_url=url))
    on_sqlite = parse_config(config_text(port=1, data_dir="/tmp/x", slots=8, threads=8))
    assert on_pg.store.url == url
    assert on_sqlite.store.url is None


def test_counter_deltas_are_what_the_window_added() -> None:
    """
    Only the daemon's known counters, present in both readings, are
    given, as the second reading minus the first.
    """
    before = {"store_commits": 10, "pg_round_trips": 100, "max_ms": 3.0}
    after = {"store_commits": 35, "pg_round_trips": 180, "pg_group_us": 5, "max_ms": 9.0}
    assert counter_deltas(before, after) == {"store_commits": 25, "pg_round_trips": 80}


def test_per_job_other_databases_made_and_dropped_meanwhile() -> None:
    """
    Another database's commits count from zero if it was made during the
    window, and a database dropped during it adds nothing (its counters
    are gone, not negative).
    """
    base = {"xact_commit": 10, "xact_rollback": 0, "tup_inserted": 0, "tup_updated": 0,
            "tup_deleted": 0, "tup_returned": 0, "tup_fetched": 0, "blks_read": 0,
            "blks_hit": 0, "wal_lsn_bytes": 1000, "wal_records": 0, "wal_bytes": 0,
            "wal_write": 0, "wal_sync": 0}
    before = {**base, "other_databases": {"kept": 5, "dropped": 900}}
    after = {**base, "xact_commit": 30, "tup_inserted": 40, "wal_lsn_bytes": 5000,
             "other_databases": {"kept": 7, "made": 3}}
    found = per_job(before, after, 20)
    assert found["other_databases_commits"] == 5
    assert found["per_job"]["transactions"] == 1.0
    assert found["per_job"]["rows_inserted"] == 2.0
    assert found["per_job"]["wal_bytes"] == 200.0


def test_rows_and_transactions_written_are_read_back_exactly() -> None:
    """
    What a workload wrote in a database of its own (4 transactions: 5
    rows inserted, 2 updated, 1 deleted, and a wait), read with no backend
    of it left, is exactly that, with one more transaction for the
    connection's start (a backend reads its catalogs in one); its backend
    is seen while it works.
    """
    url = make_database()
    name = psycopg.conninfo.conninfo_to_dict(url)["dbname"]
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE t (x BIGINT)")
        wait_no_backends(ADMIN_URL, name)
        before = database_stats(ADMIN_URL, name)
        with BackendCpu(ADMIN_URL, name) as backends:
            with psycopg.connect(url) as conn:
                conn.execute("INSERT INTO t SELECT generate_series(1, 5)")
                conn.commit()
                conn.execute("UPDATE t SET x = -x WHERE x <= 2")
                conn.commit()
                conn.execute("DELETE FROM t WHERE x = 5")
                conn.commit()
                # Seen by the sampler before the connection ends.
                conn.execute("SELECT pg_sleep(0.3)")
                conn.commit()
        wait_no_backends(ADMIN_URL, name)
        found = per_job(before, database_stats(ADMIN_URL, name), 1, backends.figures)
    finally:
        drop_database(url)
    assert found["transactions"] == 4 + 1
    assert (found["rows_inserted"], found["rows_updated"], found["rows_deleted"]) == (5, 2, 1)
    assert found["cpu"]["backends"] == 1
