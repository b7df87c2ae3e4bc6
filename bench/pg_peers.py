"""
The peer baselines of the PostgreSQL benchmark: the same no-op workload as
(b'') of docs/benchmarks.md, through pgqueuer and through Procrastinate, on
the same PostgreSQL the dispatcher's PostgreSQL store runs on.

    .venv/bin/pip install -e '.[bench]'     # pgqueuer and procrastinate
    .venv/bin/python bench/pg_peers.py [--jobs N] [--rounds N] [--only pgqueuer,procrastinate]
                                       [--dsn postgresql://postgres@127.0.0.1:5432/test]

Each round and peer gets a database of its own (made from a connection to
the one C{--dsn} names, dropped after), with the peer's own schema
installed by the peer's own code.  A worker process, pinned to core 0 as
the dispatcher is in the benchmark, runs the peer's worker with a no-op
async task; this process, pinned to core 1 as the benchmark's clients are,
enqueues C{--jobs} jobs C{BATCH} at a time from C{CLIENTS} connections at
once (the peers' own batch calls: pgqueuer's C{Queries.enqueue} of lists,
Procrastinate's C{batch_defer_async}).  The rate is the jobs over the time
from the first enqueue to the worker's last job done, as (b'') times the
dispatcher's.

The peers run as their documents recommend for throughput, said here so
the comparison can be checked: pgqueuer's C{QueueManager.run} with
C{batch_size} L{PGQUEUER_BATCH} (jobs taken a query) and its default
concurrency (every job an asyncio task); Procrastinate's worker with
C{concurrency} L{PROCRASTINATE_CONCURRENCY} (as the dispatcher's 8 slots)
and LISTEN/NOTIFY on (its default).  Both with the PostgreSQL driver they
default to (pgqueuer: asyncpg; Procrastinate: psycopg 3).

Each run also says what a job cost (L{bench.pg_costs}): the worker
process's CPU from its start of work to its last job, and the server's
side, its transactions, rows written, WAL and backend CPU, as the
dispatcher's are read in the benchmark's PostgreSQL section.

Prints one line per run and the median of each peer, and writes the JSON to
C{bench/results/pg-peers-STAMP.json}; L{measure_peers} gives the same for
another script of the benchmark to report next to its own figures
(bench/run.py's C{--only pg} runs them through L{measure_peer}, in its
own rounds).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlsplit, urlunsplit

if not __package__:  # run as a file: make "bench" importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.pg_costs import BackendCpu, database_stats, per_job, wait_no_backends

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"
PEERS = ("pgqueuer", "procrastinate")
# As (b''): jobs a batch and client connections enqueueing at once.
BATCH = 1000
CLIENTS = 4
# Jobs a run: as (b) and (b'') of a full run.
JOBS = 20_000
# pgqueuer's jobs taken a dequeue query (its default is 10; more is faster
# for no-op jobs, and what its own benchmark tool uses for throughput).
PGQUEUER_BATCH = 100
# Procrastinate's jobs run at once by one worker: the dispatcher's slots.
PROCRASTINATE_CONCURRENCY = 8
# How long a run may take before it is called failed.
RUN_TIMEOUT = 600.0
# The cores of the benchmark (bench/harness.py): the server's and the load's.
SERVER_CORE, LOAD_CORE = 0, 1


def with_database(dsn: str, name: str) -> str:
    """
    C{dsn} naming the database C{name} instead of its own.
    """
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + name))


def make_database(dsn: str, prefix: str) -> str:
    """
    Make a database of its own for one run (C{prefix} and random hex);
    return its name.
    """
    import psycopg

    name = f"{prefix}_{secrets.token_hex(4)}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name


def drop_database(dsn: str, name: str) -> None:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# The worker side: run in a process of its own (python bench/pg_peers.py
# --worker PEER DSN JOBS), printing one JSON line when the last job is done.


async def _pgqueuer_worker(dsn: str, jobs: int) -> dict[str, Any]:
    import asyncpg
    from pgqueuer import PgQueuer
    from pgqueuer.db import AsyncpgDriver

    conn = await asyncpg.connect(dsn)
    pgq = PgQueuer(AsyncpgDriver(conn))
    done = {"count": 0, "last": 0.0}

    @pgq.entrypoint("noop")
    async def noop(job: Any) -> None:
        done["count"] += 1
        if done["count"] >= jobs:
            done["last"] = time.time()
            done["cpu"] = time.process_time()
            pgq.shutdown.set()

    print(json.dumps({"ready": True}), flush=True)
    cpu0 = time.process_time()
    await pgq.run(batch_size=PGQUEUER_BATCH)
    return {"done": done["count"], "last_done": done["last"],
            "cpu_s": done.get("cpu", cpu0) - cpu0}


async def _procrastinate_worker(dsn: str, jobs: int) -> dict[str, Any]:
    import procrastinate

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=dsn))
    done = {"count": 0, "last": 0.0}
    finished = asyncio.Event()

    @app.task(name="noop")
    async def noop() -> None:
        done["count"] += 1
        if done["count"] >= jobs:
            done["last"] = time.time()
            done["cpu"] = time.process_time()
            finished.set()

    async with app.open_async():
        cpu0 = time.process_time()
        worker = asyncio.create_task(app.run_worker_async(
            concurrency=PROCRASTINATE_CONCURRENCY, wait=True, install_signal_handlers=False))
        print(json.dumps({"ready": True}), flush=True)
        await finished.wait()
        worker.cancel()
        try:
            await worker
        except (asyncio.CancelledError, Exception):
            pass
    return {"done": done["count"], "last_done": done["last"],
            "cpu_s": done.get("cpu", cpu0) - cpu0}


def _quiet() -> None:
    # Procrastinate warns of an App made in a __main__ module (its CLI
    # could not import it; this script does not use its CLI).
    import logging

    logging.getLogger("procrastinate").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="App is instantiated")


def run_worker(peer: str, dsn: str, jobs: int) -> None:
    _quiet()
    worker = {"pgqueuer": _pgqueuer_worker, "procrastinate": _procrastinate_worker}[peer]
    result = asyncio.run(worker(dsn, jobs))
    print(json.dumps(result), flush=True)


# The load side.


async def _install(peer: str, dsn: str) -> None:
    if peer == "pgqueuer":
        import asyncpg
        from pgqueuer.db import AsyncpgDriver
        from pgqueuer.queries import Queries

        conn = await asyncpg.connect(dsn)
        try:
            await Queries(AsyncpgDriver(conn)).install()
        finally:
            await conn.close()
    else:
        import procrastinate

        app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=dsn))
        async with app.open_async():
            await app.schema_manager.apply_schema_async()


async def _enqueue(peer: str, dsn: str, jobs: int) -> float:
    """
    Enqueue C{jobs} no-op jobs, C{BATCH} a call, from C{CLIENTS}
    connections at once; return when the first was sent.
    """
    batches = [min(BATCH, jobs - start) for start in range(0, jobs, BATCH)]
    queue: asyncio.Queue[int] = asyncio.Queue()
    for size in batches:
        queue.put_nowait(size)
    if peer == "pgqueuer":
        import asyncpg
        from pgqueuer.db import AsyncpgDriver
        from pgqueuer.queries import Queries

        conns = [await asyncpg.connect(dsn) for _ in range(CLIENTS)]

        async def client(conn: Any) -> None:
            queries = Queries(AsyncpgDriver(conn))
            while not queue.empty():
                size = queue.get_nowait()
                await queries.enqueue(["noop"] * size, [None] * size, [0] * size)

        started = time.time()
        await asyncio.gather(*(client(conn) for conn in conns))
        for conn in conns:
            await conn.close()
        return started
    import procrastinate

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(
        conninfo=dsn, min_size=CLIENTS, max_size=CLIENTS))

    @app.task(name="noop")
    async def noop() -> None:
        pass

    async with app.open_async():
        async def client() -> None:
            while not queue.empty():
                size = queue.get_nowait()
                await noop.batch_defer_async(*([{}] * size))

        started = time.time()
        await asyncio.gather(*(client() for _ in range(CLIENTS)))
    return started


def measure_peer(peer: str, dsn: str, jobs: int) -> dict[str, Any]:
    """
    One run of C{peer}: a database of its own, its schema, its worker on
    core 0, C{jobs} jobs enqueued from core 1; the rate, the CPU the
    worker process spent a job, and what a job cost the server
    (L{bench.pg_costs.per_job}, from the schema's install to the last
    connection's end).
    """
    name = make_database(dsn, f"bench_{peer}")
    run_dsn = with_database(dsn, name)
    try:
        asyncio.run(_install(peer, run_dsn))
        wait_no_backends(dsn, name)
        before = database_stats(dsn, name)
        with BackendCpu(dsn, name) as backends:
            worker = subprocess.Popen(
                ["taskset", "-c", str(SERVER_CORE), sys.executable, __file__,
                 "--worker", peer, run_dsn, str(jobs)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                ready = worker.stdout.readline()  # type: ignore[union-attr]
                if not ready:
                    raise RuntimeError(
                        f"{peer} worker did not start: {worker.stderr.read()[-2000:]}")
                started = asyncio.run(_enqueue(peer, run_dsn, jobs))
                out, err = worker.communicate(timeout=RUN_TIMEOUT)
            finally:
                if worker.poll() is None:
                    worker.kill()
                    worker.wait()
        wait_no_backends(dsn, name)
        costs = per_job(before, database_stats(dsn, name), jobs, backends.figures)
        lines = [line for line in out.splitlines() if line.startswith("{")]
        if worker.returncode != 0 or not lines:
            raise RuntimeError(f"{peer} worker failed ({worker.returncode}): {err[-2000:]}")
        result = json.loads(lines[-1])
        if result["done"] < jobs:
            raise RuntimeError(f"{peer}: {result['done']} of {jobs} jobs done")
        elapsed = result["last_done"] - started
        costs["per_job"]["worker_cpu_us"] = round(1e6 * result["cpu_s"] / jobs, 1)
        return {"peer": peer, "jobs": jobs, "elapsed_s": round(elapsed, 3),
                "jobs_per_s": round(jobs / elapsed, 1), "worker_cpu_s": round(result["cpu_s"], 3),
                "postgresql": costs}
    finally:
        drop_database(dsn, name)


def measure_peers(dsn: str, jobs: int, rounds: int, peers: tuple[str, ...] = PEERS,
                  report: Optional[Any] = None) -> dict[str, Any]:
    """
    C{rounds} runs of every peer, alternating; each peer's runs and median
    rate.  C{report} is called with each run's result as it ends.
    """
    runs: dict[str, list[dict[str, Any]]] = {peer: [] for peer in peers}
    for round_ in range(rounds):
        order = peers if round_ % 2 == 0 else tuple(reversed(peers))
        for peer in order:
            result = measure_peer(peer, dsn, jobs)
            runs[peer].append(result)
            if report is not None:
                report(round_, result)
    return {
        peer: {
            "runs": results,
            "median_jobs_per_s": round(statistics.median(r["jobs_per_s"] for r in results), 1),
            "settings": ({"batch_size": PGQUEUER_BATCH, "driver": "asyncpg"} if peer == "pgqueuer"
                         else {"concurrency": PROCRASTINATE_CONCURRENCY, "driver": "psycopg 3"}),
        }
        for peer, results in runs.items()
    }


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        run_worker(argv[1], argv[2], int(argv[3]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--dsn", default=os.environ.get("DISPATCHER_BENCH_DSN", DEFAULT_DSN))
    parser.add_argument("--jobs", type=int, default=JOBS)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default=",".join(PEERS))
    args = parser.parse_args(argv)
    peers = tuple(p for p in args.only.split(",") if p)
    unknown = set(peers) - set(PEERS)
    if unknown:
        parser.error(f"--only: unknown peers {', '.join(sorted(unknown))} (known: {', '.join(PEERS)})")
    for module in peers:
        try:
            __import__(module)
        except ImportError:
            print(f"bench: {module} is not installed: .venv/bin/pip install -e '.[bench]'",
                  file=sys.stderr)
            return 2
    os.sched_setaffinity(0, {LOAD_CORE})
    _quiet()

    def report(round_: int, result: dict[str, Any]) -> None:
        print(f"round {round_ + 1} {result['peer']}: {result['jobs_per_s']:,.0f} jobs/s "
              f"({result['jobs']:,} jobs in {result['elapsed_s']} s)", flush=True)

    results = measure_peers(args.dsn, args.jobs, args.rounds, peers, report)
    for peer, found in results.items():
        print(f"{peer}: median {found['median_jobs_per_s']:,.0f} jobs/s over {args.rounds} runs")
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
    path = RESULTS / f"pg-peers-{stamp}.json"
    path.write_text(json.dumps({"jobs": args.jobs, "batch": BATCH, "clients": CLIENTS,
                                "peers": results}, indent=2) + "\n", encoding="utf-8")
    print(f"bench: wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
