"""
The benchmark's PostgreSQL section, (l) of docs/benchmarks.md
(C{bench/run.py --only pg}): the dispatcher on PostgreSQL next to the
same dispatcher on SQLite, one dispatcher and two on one database, and
the same no-op workload through pgqueuer and Procrastinate
(L{bench.pg_peers}) as peer baselines, all in one run, in alternating
rounds; and what each job cost, on both sides of the wire
(docs/scaling.md reads them).

Every PostgreSQL measure makes a database of its own on the server of
L{bench_url} (C{DISPATCHER_BENCH_DSN}, default the test server's C{test}
database, which only serves to connect from), gives it the dispatcher's
schema, and drops it at the end.

The measures:

  - (l-a) single submits: wrk on 50 connections, as (a), SQLite and
    PostgreSQL (L{bench.measures.measure_submit}).
  - (l-f) batch submits of 1,000, 4 connections, as (f)
    (L{bench.measures.measure_batch}).
  - (l-b'') no-op task jobs submitted in batches of 1,000 from 4
    connections, as (b'') (L{measure_noop}): on SQLite; on PostgreSQL
    with one dispatcher; with two dispatchers on one database, the
    second on the load's core ("two") or both on the server's core
    ("two, one core"), the clients' batches going to each in turn.  Each
    is woken by the jobs submitted to it and by the other's commits
    (C{LISTEN/NOTIFY}), and takes whatever is queued (C{SKIP LOCKED}):
    each runs its share, and the jobs of both finish.  Each has a holder
    name of its own.
  - the peers: pgqueuer and Procrastinate, the same jobs the same way
    (L{bench.pg_peers.measure_peer}).
  - the server's primitives, before the section and after it
    (L{bench.pg_costs.server_primitives}): a round trip, a commit that
    waits for the disk and one that does not.

What a job cost (L{bench.pg_costs}): the dispatcher's CPU (its process,
all threads, C{/proc/PID/stat}) and its round trips to PostgreSQL and
commits of its writer (counted in the daemon: L{bench.daemon}); the
database's transactions and rows written (C{pg_stat_database}), the
server's WAL (the whole server's) and the database's backends' CPU.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Any, Callable, Iterator, Optional

from bench.harness import (
    LOAD_CORE,
    SERVER_CORE,
    BenchError,
    Client,
    Run,
    Server,
    Window,
    in_rounds,
    in_threads,
    step,
)
from bench.measures import (
    jobs_in_state,
    measure_batch,
    measure_submit,
    parse_time,
    wait_all_finished,
)
from bench.pg_costs import BackendCpu, admin_connection, database_stats, per_job, \
    server_primitives, wait_no_backends
from bench import pg_peers

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"

# The rows of the section, by name: (what, engine, dispatchers' cores).
NOOP_ROWS = {
    "pg_noop_sqlite": ("SQLite, one dispatcher", None, (SERVER_CORE,)),
    "pg_noop_postgresql": ("PostgreSQL, one dispatcher", "pg", (SERVER_CORE,)),
    "pg_noop_postgresql_two": ("PostgreSQL, two dispatchers, one a core", "pg",
                               (SERVER_CORE, LOAD_CORE)),
    "pg_noop_postgresql_two_one_core": ("PostgreSQL, two dispatchers on one core", "pg",
                                        (SERVER_CORE, SERVER_CORE)),
}
PEER_ROWS = {f"pg_noop_{peer}": peer for peer in pg_peers.PEERS}


def bench_url() -> str:
    """
    The server the section runs on (C{DISPATCHER_BENCH_DSN}).
    """
    return os.environ.get("DISPATCHER_BENCH_DSN", DEFAULT_URL)


@contextlib.contextmanager
def run_database(url: str) -> Iterator[tuple[str, str]]:
    """
    A database of its own on the server at C{url}, with the dispatcher's
    schema (made here, so that its making is not counted in what the
    measure costs), dropped at the end: its name and URL.
    """
    from dispatcher.store._postgres import connect, migrate

    name = pg_peers.make_database(url, "dispatcher_bench")
    try:
        database_url = pg_peers.with_database(url, name)
        raw = connect(database_url, application="bench-migrate")
        try:
            migrate(raw, name)
        finally:
            raw.close()
        yield name, database_url
    finally:
        pg_peers.drop_database(url, name)


def costs(admin_url: str, database: str, take: Callable[[], dict[str, Any]],
          jobs: Callable[[dict[str, Any]], int]) -> dict[str, Any]:
    """
    C{take()}'s result, with what its C{jobs(result)} jobs cost
    PostgreSQL under C{"postgresql"} (L{bench.pg_costs.per_job}), counted
    from before its daemon(s) connected to after their last backend
    ended: their start and stop, and the harness's reads through the
    API, are in it (a few hundred transactions and rows against tens of
    thousands of jobs).
    """
    wait_no_backends(admin_url, database)
    before = database_stats(admin_url, database)
    with BackendCpu(admin_url, database) as backends:
        result = take()
    wait_no_backends(admin_url, database)
    result["postgresql"] = per_job(before, database_stats(admin_url, database),
                                   jobs(result), backends.figures)
    return result


def dispatcher_per_job(result: dict[str, Any], jobs: int) -> dict[str, Any]:
    """
    The dispatcher's side of a job's cost in C{result}: its process's CPU
    (all its threads, over the measured window), its writer's commits
    and, on PostgreSQL, its round trips to the server.
    """
    cpu = result["cpu"]["server_cpu_s"]
    counters = result.get("counters", {})
    out = {"dispatcher_cpu_us": round(1e6 * cpu / jobs, 1)}
    if "store_commits" in counters:
        out["writer_commits"] = round(counters["store_commits"] / jobs, 4)
    if "pg_round_trips" in counters:
        out["round_trips"] = round(counters["pg_round_trips"] / jobs, 3)
    if counters.get("store_commits") and "pg_group_us" in counters:
        # A group's time from BEGIN to its commit's answer, and of it the
        # first round trip (which waits for the write lock).
        out["group_ms"] = round(counters["pg_group_us"] / counters["store_commits"] / 1e3, 3)
        out["group_begin_ms"] = round(
            counters["pg_begin_us"] / counters["store_commits"] / 1e3, 3)
        wall = result.get("elapsed_s") or result.get("duration_s")
        if wall:
            # How much of the measured time each writer was in a group.
            out["writer_busy_pct"] = round(
                100 * counters["pg_group_us"] / 1e6 / wall / result.get("dispatchers", 1), 1)
    return out


def with_per_job(result: dict[str, Any], jobs: int) -> dict[str, Any]:
    """
    C{result} with L{dispatcher_per_job} under C{"per_job"}, and the
    server's side (if measured) merged in.
    """
    mine = dispatcher_per_job(result, jobs)
    if "postgresql" in result:
        mine.update(result["postgresql"]["per_job"])
    result["per_job"] = mine
    return result


class Spread:
    """
    The clients of several dispatchers, as one for L{in_threads}: closing
    it closes the calling thread's connection to each.
    """

    def __init__(self, clients: list[Client]) -> None:
        self.clients = clients

    def close(self) -> None:
        for client in self.clients:
            client.close()


def measure_noop(run: Run, name: str, count: int, batch: int, concurrency: int,
                 store_url: Optional[str], cores: tuple[int, ...],
                 timeout: float = 300.0, slots: int = 8) -> dict[str, Any]:
    """
    (l-b'') C{count} no-op task jobs, C{batch} a request from
    C{concurrency} client threads, through one dispatcher or several
    (one on each of C{cores}, each with C{slots = threads}, 8 unless
    given, on the
    store C{store_url} or each on its own SQLite file), from the first
    submit until the last job's own C{finished_at}.  With several, the
    batches go to each dispatcher in turn, and each dispatcher has a
    holder name of its own; every job must have succeeded, with one
    attempt (none ran twice), and how many each dispatcher ran is read
    from the attempts' holders.
    """
    if store_url is None and len(cores) > 1:
        raise BenchError("several dispatchers need one PostgreSQL store")
    body = {"task": "noop"}
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(Server(
            run.processes, "daemon", run.tmp / f"{name}-{i + 1}", slots=slots,
            threads=slots,
            store_url=store_url, holder=f"local@bench-{i + 1}", core=core))
            for i, core in enumerate(cores)]
        clients = [server.client for server in servers]
        lock = threading.Lock()
        statuses: dict[int, int] = {}
        sent_to = [0] * len(servers)
        deadline = time.monotonic() + timeout

        def send(index: int) -> None:
            which = (index // batch) % len(servers)
            size = min(batch, count - index)
            status, answer = clients[which].json(
                "POST", "/v1/jobs/batch", {"jobs": [body] * size})
            with lock:
                statuses[status] = statuses.get(status, 0) + 1
                if status == 201:
                    sent_to[which] += size
            if status != 201:
                raise BenchError(f"batch answered {status}: {str(answer)[:300]}")

        # The windows end when the last job has, before the listing below.
        with contextlib.ExitStack() as measured:
            windows = [measured.enter_context(Window(run, server, f"{name}-{i + 1}"))
                       for i, server in enumerate(servers)]
            first_submit = time.time()
            in_threads(Spread(clients), concurrency, iter(range(0, count, batch)), send,
                       deadline, grace=30)
            all_submitted = time.time()
            polls = wait_all_finished(clients[0], deadline, 0.1)
        windows_figures = [w.figures for w in windows]
        succeeded = [parse_time(job["finished_at"])
                     for job in jobs_in_state(clients[0], "succeeded")]
        failed = sum(1 for _ in jobs_in_state(clients[0], "failed"))
        memory = [server.memory() for server in servers]
    if len(succeeded) != count:
        raise BenchError(f"{name}: {len(succeeded)} of {count} succeeded ({failed} failed)")
    ran_by = ran_by_holder(store_url) if store_url is not None else {}
    if ran_by and sum(ran_by.values()) != count:
        # One attempt a job: none was run twice, by one dispatcher or two.
        raise BenchError(f"{name}: {sum(ran_by.values())} attempts for {count} jobs: {ran_by}")
    elapsed = max(succeeded) - first_submit
    cpu_s = sum(f["cpu"]["server_cpu_s"] for f in windows_figures)
    counters: dict[str, int] = {}
    for f in windows_figures:
        for key, value in f.get("counters", {}).items():
            counters[key] = counters.get(key, 0) + value
    return {
        "jobs": count,
        "dispatchers": len(servers),
        "cores": list(cores),
        "slots": slots,
        "threads": slots,
        "batch": batch,
        "client_concurrency": concurrency,
        "submit_statuses": {str(k): v for k, v in sorted(statuses.items())},
        "submitted_to": sent_to,
        "ran_by": ran_by,
        "submit_s": round(all_submitted - first_submit, 3),
        "elapsed_s": round(elapsed, 3),
        "jobs_per_s": round(count / elapsed, 1),
        "completion_polls": polls,
        "memory": memory,
        "cpu": {"server_cpu_s": round(cpu_s, 3),
                "server_process_pct": [f["cpu"]["server_process_pct"]
                                       for f in windows_figures],
                "server_core_busy_pct": windows_figures[0]["cpu"]["server_core_busy_pct"],
                "load_core_busy_pct": windows_figures[0]["cpu"]["load_core_busy_pct"]},
        "counters": counters,
        "reactor_hold": max((f["reactor_hold"] for f in windows_figures),
                            key=lambda h: h["max_ms"]),
    }


def ran_by_holder(store_url: str) -> dict[str, int]:
    """
    How many attempts each holder ran, from the store's own table.
    """
    with admin_connection(store_url) as conn:
        return {holder: int(n) for holder, n in conn.execute(
            "SELECT holder, count(*) FROM attempts GROUP BY holder ORDER BY holder")}


def take_pg_measures(run: Run, settings: dict[str, Any], measures: dict[str, Any]) -> None:
    """
    The section's measures, each kind in C{settings["pg_rounds"]}
    alternating rounds (the rows in turn, every second round reversed),
    into C{measures}; each row keeps its median round.
    """
    for module in pg_peers.PEERS:
        try:
            __import__(module)
        except ImportError:
            raise BenchError(f"{module} is not installed: .venv/bin/pip install -e '.[bench]'")
    url = bench_url()
    rounds = settings["pg_rounds"]
    c = max(settings["connections"])
    # What a group is made of on this server (a round trip, a commit
    # waiting for the disk), before the section and after it.
    primitives = measures["pg_server_primitives"] = {}
    step(primitives, "before", lambda: server_primitives(url))

    def on(engine: Optional[str], take: Callable[[Optional[str]], dict[str, Any]],
           jobs: Callable[[dict[str, Any]], int]) -> dict[str, Any]:
        if engine is None:
            result = take(None)
        else:
            with run_database(url) as (name, database_url):
                result = costs(url, name, lambda: take(database_url), jobs)
        return with_per_job(result, jobs(result))

    rows = []
    for engine, label in ((None, "sqlite"), ("pg", "postgresql")):
        rows.append((f"pg_submit_{label}_{c}c", lambda n, engine=engine, label=label: on(
            engine, lambda store_url: measure_submit(
                run, "daemon", c, settings["pg_submit_seconds"], round_=n,
                variant=f"pg-{label}", store_url=store_url),
            lambda r: r["created_201"])))
    in_rounds(measures, rounds, rows, "requests_per_s", alternate=True)

    rows = []
    for engine, label in ((None, "sqlite"), ("pg", "postgresql")):
        rows.append((f"pg_batch_{label}", lambda n, engine=engine, label=label: on(
            engine, lambda store_url: measure_batch(
                run, settings["pg_batch_seconds"], settings["batch_size"],
                settings["batch_concurrency"], store_url=store_url,
                name=f"pg-batch-{label}-{n}"),
            lambda r: r["jobs_acknowledged"])))
    in_rounds(measures, rounds, rows, "jobs_per_s", alternate=True)

    count = settings["pg_noop_jobs"]
    rows = []
    for key, (_, engine, cores) in NOOP_ROWS.items():
        rows.append((key, lambda n, key=key, engine=engine, cores=cores: on(
            engine, lambda store_url: measure_noop(
                run, f"{key}-{n}".replace("_", "-"), count, settings["batch_size"],
                settings["batch_concurrency"], store_url, cores),
            lambda r: r["jobs"])))
    for key, peer in PEER_ROWS.items():
        rows.append((key, lambda n, peer=peer: peer_round(peer, url, count)))
    in_rounds(measures, rounds, rows, "jobs_per_s", alternate=True)
    step(primitives, "after", lambda: server_primitives(url))


def peer_round(peer: str, url: str, count: int) -> dict[str, Any]:
    """
    One run of a peer baseline (L{bench.pg_peers.measure_peer}), its
    costs a job in the form of the dispatcher's.
    """
    try:
        result = pg_peers.measure_peer(peer, url, count)
    except RuntimeError as e:
        raise BenchError(str(e))
    result["per_job"] = dict(result["postgresql"]["per_job"])
    return result


def best_peer(measures: dict[str, Any]) -> Optional[tuple[str, float]]:
    """
    The faster peer of the run (by its median round) and its rate.
    """
    found = [(peer, measures[key]["jobs_per_s"]) for key, peer in PEER_ROWS.items()
             if key in measures]
    return max(found, key=lambda x: x[1]) if found else None


def main(argv: Optional[list[str]] = None) -> int:
    """
    (l-b'') alone, with the dispatcher's slots as a parameter (the jobs a
    claim can take, so the jobs in the writer's groups): C{--engines}
    each in C{--rounds} alternating rounds, printed and written to
    C{bench/results/pg-noop-STAMP.json}.  docs/scaling.md uses it.
    """
    import argparse
    import datetime
    import json
    import sys
    import tempfile
    import shutil
    from pathlib import Path

    from bench.harness import BENCH, Processes

    parser = argparse.ArgumentParser(description=main.__doc__.strip().splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", default="pg_noop_sqlite,pg_noop_postgresql",
                        help=f"of {', '.join(NOOP_ROWS)}")
    args = parser.parse_args(argv)
    os.sched_setaffinity(0, {LOAD_CORE})
    url = bench_url()
    tmp = Path(tempfile.mkdtemp(prefix="dispatcher-bench-pg-"))
    run = Run(Processes(), tmp)
    measures: dict[str, Any] = {}
    rows = []
    for key in args.rows.split(","):
        _, engine, cores = NOOP_ROWS[key]

        def take(n: int, key: str = key, engine: Optional[str] = engine,
                 cores: tuple[int, ...] = cores) -> dict[str, Any]:
            def noop(store_url: Optional[str]) -> dict[str, Any]:
                return measure_noop(run, f"{key}-{n}".replace("_", "-"), args.jobs, 1000, 4,
                                    store_url, cores, slots=args.slots)
            if engine is None:
                return with_per_job(noop(None), args.jobs)
            with run_database(url) as (name, database_url):
                return with_per_job(costs(url, name, lambda: noop(database_url),
                                          lambda r: r["jobs"]), args.jobs)

        rows.append((f"{key}_{args.slots}_slots", take))
    try:
        in_rounds(measures, args.rounds, rows, "jobs_per_s", alternate=True)
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    finally:
        run.processes.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    for name, x in measures.items():
        if name == "rounds":
            continue
        print(f"{name}: {x['jobs_per_s']:,.0f} jobs/s (rounds "
              f"{', '.join(f'{v:,.0f}' for v in x['rounds_jobs_per_s'])}); per job "
              f"{json.dumps(x['per_job'])}")
    out = BENCH / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"pg-noop-{datetime.datetime.now():%Y%m%dT%H%M%S}.json"
    path.write_text(json.dumps({"jobs": args.jobs, "slots": args.slots,
                                "measures": measures}, indent=2) + "\n", encoding="utf-8")
    print(f"bench: wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
