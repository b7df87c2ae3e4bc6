"""
What a workload cost PostgreSQL, read from the server itself: for the
PostgreSQL section of the benchmark (L{bench.pg_measures}) and its peer
baselines (L{bench.pg_peers}), each of which runs in a database of its own.

  - L{database_stats}: the run database's transactions and rows written
    (C{pg_stat_database}), and the server's WAL (C{pg_current_wal_lsn},
    C{pg_stat_wal}: the whole server's, so they count other databases'
    work too, and the other databases' commits are read beside them to
    say how much).  A backend adds its figures to C{pg_stat_database}
    when it ends (and at most once a second while it works), so the
    figures are read with no backend of the database left
    (L{wait_no_backends}): before a workload's processes connect and
    after they are gone.
  - L{BackendCpu}: the CPU the database's backends (the server processes
    serving its connections, found in C{pg_stat_activity}) spent, read
    from C{/proc/PID/stat} every L{SAMPLE_S} seconds while the workload
    runs, and the server's own WAL writer, checkpointer and background
    writer (the whole server's); and, at each reading, what each of the
    database's busy backends waited for (C{pg_stat_activity}: the write
    lock, the WAL's sync, the client...).

C{pg_stat_statements} would count the statements each database ran, but
it needs C{shared_preload_libraries}, which a server reads only at start:
the benchmark does not restart a shared server, so the dispatcher's round
trips are counted in the dispatcher instead (L{bench.daemon}).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Optional

# How often the backends' CPU is read while a workload runs: a backend
# that ends between two readings loses what it spent since the last.
SAMPLE_S = 0.1
# The server's processes that work for every database at once.
SERVER_PROCESSES = ("walwriter", "checkpointer", "background writer")


def admin_connection(url: str) -> Any:
    """
    An autocommit connection to the database C{url} names (not the run's
    own: reading statistics from it would add to what is measured).
    """
    import psycopg

    return psycopg.connect(url, autocommit=True)


def wait_no_backends(url: str, database: str, timeout: float = 30.0) -> None:
    """
    Until no backend serves C{database}: each has added its figures to
    C{pg_stat_database} as it ended.
    """
    deadline = time.monotonic() + timeout
    with admin_connection(url) as conn:
        while time.monotonic() < deadline:
            (left,) = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (database,)
            ).fetchone()
            if not left:
                return
            time.sleep(0.05)
    raise RuntimeError(f"backends of {database} still there after {timeout:g}s")


def database_stats(url: str, database: str) -> dict[str, Any]:
    """
    C{database}'s counters so far, the server's WAL position and WAL
    counters, and the other databases' commits (for how much of the WAL
    is theirs; the one C{url} names, where the harness reads from, left
    out).
    """
    with admin_connection(url) as conn:
        row = conn.execute(
            "SELECT xact_commit, xact_rollback, tup_inserted, tup_updated, tup_deleted,"
            " tup_returned, tup_fetched, blks_read, blks_hit"
            " FROM pg_stat_database WHERE datname = %s", (database,)).fetchone()
        if row is None:
            raise RuntimeError(f"no statistics for the database {database}")
        names = ("xact_commit", "xact_rollback", "tup_inserted", "tup_updated",
                 "tup_deleted", "tup_returned", "tup_fetched", "blks_read", "blks_hit")
        stats: dict[str, Any] = dict(zip(names, (int(v) for v in row)))
        stats["other_databases"] = {name: int(n) for name, n in conn.execute(
            "SELECT datname, xact_commit FROM pg_stat_database"
            " WHERE datname IS NOT NULL AND datname <> %s AND datname <> current_database()",
            (database,))}
        (lsn,) = conn.execute(
            "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()
        stats["wal_lsn_bytes"] = int(lsn)
        wal = conn.execute(
            "SELECT wal_records, wal_bytes, wal_write, wal_sync FROM pg_stat_wal").fetchone()
        for name, value in zip(("wal_records", "wal_bytes", "wal_write", "wal_sync"), wal):
            stats[name] = int(value)
    return stats


def process_cpu(pid: int) -> Optional[float]:
    """
    CPU seconds (user and system) process C{pid} spent so far, or
    C{None} if it is gone.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class BackendCpu:
    """
    The CPU spent by C{database}'s backends, and by the server's WAL
    writer, checkpointer and background writer, between C{__enter__} and
    C{__exit__} (a thread reads it every L{SAMPLE_S} s).  A backend
    already there at the start counts from then; one that connects later
    counts from its start (its connection's set-up included); one that
    ends counts until its last reading.
    """

    def __init__(self, url: str, database: str) -> None:
        self.url = url
        self.database = database
        self._first: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._server0: dict[int, float] = {}
        self._server1: dict[int, float] = {}
        self._stop = threading.Event()
        self.samples = 0
        # What the database's busy backends were doing at each reading
        # (C{pg_stat_activity}'s wait event, or "running"), counted.
        self.waits: dict[str, int] = {}

    def _backends(self, conn: Any) -> list[int]:
        self.samples += 1
        pids = []
        for pid, state, kind, event in conn.execute(
                "SELECT pid, state, wait_event_type, wait_event FROM pg_stat_activity"
                " WHERE datname = %s", (self.database,)):
            pids.append(pid)
            if state != "idle":
                what = f"{kind}:{event}" if kind else "running"
                self.waits[what] = self.waits.get(what, 0) + 1
        return pids

    def _servers(self, conn: Any) -> dict[int, float]:
        out = {}
        for (pid,) in conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE backend_type = ANY(%s)",
                (list(SERVER_PROCESSES),)):
            cpu = process_cpu(pid)
            if cpu is not None:
                out[pid] = cpu
        return out

    def _read(self, conn: Any, first: bool) -> None:
        for pid in self._backends(conn):
            cpu = process_cpu(pid)
            if cpu is None:
                continue
            if pid not in self._first:
                self._first[pid] = cpu if first else 0.0
            self._last[pid] = cpu

    def __enter__(self) -> "BackendCpu":
        self._conn = admin_connection(self.url)
        self._t0 = time.monotonic()
        self._server0 = self._servers(self._conn)
        self._read(self._conn, first=True)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self._read(self._conn, first=False)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(10)
        try:
            self._read(self._conn, first=False)
            self._server1 = self._servers(self._conn)
        finally:
            self._conn.close()
        self.wall_s = time.monotonic() - self._t0

    @property
    def figures(self) -> dict[str, Any]:
        """
        The backends' CPU seconds, how many backends, and the server
        processes' CPU seconds over the window.
        """
        backends = sum(self._last[pid] - self._first[pid] for pid in self._last)
        server = sum(self._server1[pid] - self._server0[pid]
                     for pid in self._server1 if pid in self._server0)
        return {"backends": len(self._last), "backends_cpu_s": round(backends, 3),
                "server_processes_cpu_s": round(server, 3),
                "wall_s": round(self.wall_s, 3), "samples": self.samples,
                "busy_backend_waits": dict(sorted(self.waits.items(),
                                                  key=lambda x: -x[1]))}


def per_job(before: dict[str, Any], after: dict[str, Any], jobs: int,
            cpu: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """
    What C{jobs} jobs cost the server, from L{database_stats} before and
    after and L{BackendCpu.figures}: a job's transactions, rows written
    (inserted, updated, deleted), WAL bytes and WAL syncs, and backend
    CPU.  The WAL figures are the whole server's; C{other_databases_commits}
    says how many commits other databases made meanwhile.
    """
    d = {k: after[k] - before[k] for k in before if k != "other_databases"}
    # Databases made or dropped meanwhile (other tests') count from zero
    # or until their last reading.
    others = sum(n - before["other_databases"].get(name, 0)
                 for name, n in after["other_databases"].items())
    out: dict[str, Any] = {
        "jobs": jobs,
        "transactions": d["xact_commit"] + d["xact_rollback"],
        "rows_inserted": d["tup_inserted"],
        "rows_updated": d["tup_updated"],
        "rows_deleted": d["tup_deleted"],
        "wal_bytes": d["wal_lsn_bytes"],
        "wal_syncs": d["wal_sync"],
        "other_databases_commits": others,
    }
    written = d["tup_inserted"] + d["tup_updated"] + d["tup_deleted"]
    out["per_job"] = {
        "transactions": round(out["transactions"] / jobs, 3),
        "rows_written": round(written / jobs, 3),
        "rows_inserted": round(d["tup_inserted"] / jobs, 3),
        "rows_updated": round(d["tup_updated"] / jobs, 3),
        "rows_deleted": round(d["tup_deleted"] / jobs, 3),
        "wal_bytes": round(d["wal_lsn_bytes"] / jobs, 1),
        "wal_syncs": round(d["wal_sync"] / jobs, 4),
    }
    if cpu is not None:
        out["cpu"] = cpu
        out["per_job"]["backend_cpu_us"] = round(1e6 * cpu["backends_cpu_s"] / jobs, 1)
        out["per_job"]["server_processes_cpu_us"] = round(
            1e6 * cpu["server_processes_cpu_s"] / jobs, 1)
    return out


def server_primitives(url: str, round_trips: int = 2000, commits: int = 300) -> dict[str, Any]:
    """
    The server's costs a dispatcher's group is made of, measured from
    this process in a database of its own (made and dropped here): a
    round trip (C{SELECT 1}, median and 99th percentile of
    C{round_trips}), an uncontended C{pg_advisory_xact_lock} in its
    transaction, and a one-row commit with C{synchronous_commit} on (the
    WAL flushed to disk before the answer, as every commit of the
    dispatcher) and off (not waiting for the flush): their difference is
    what waiting for the disk costs a commit.
    """
    from bench.pg_peers import drop_database, make_database, with_database

    def timed(conn: Any, statement: str, count: int) -> list[float]:
        times = []
        for _ in range(count):
            t0 = time.perf_counter()
            conn.execute(statement)
            times.append(time.perf_counter() - t0)
        return sorted(times)

    def figures(times: list[float]) -> dict[str, float]:
        return {"p50_us": round(1e6 * times[len(times) // 2], 1),
                "p99_us": round(1e6 * times[int(0.99 * (len(times) - 1))], 1)}

    name = make_database(url, "dispatcher_bench_primitives")
    try:
        with admin_connection(with_database(url, name)) as conn:
            conn.execute("CREATE TABLE one (x BIGINT)")
            out = {"round_trip": figures(timed(conn, "SELECT 1", round_trips))}
            lock = []
            for _ in range(commits):
                t0 = time.perf_counter()
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(42)")
                lock.append(time.perf_counter() - t0)
            out["advisory_lock_transaction"] = figures(sorted(lock))
            for setting in ("on", "off"):
                conn.execute(f"SET synchronous_commit = {setting}")
                out[f"commit_synchronous_{setting}"] = figures(
                    timed(conn, "INSERT INTO one VALUES (1)", commits))
        return out
    finally:
        drop_database(url, name)
