"""
The benchmark's measures, (a) to (i), each a function that starts its own
server(s) through L{bench.harness}, takes its figures and checks what the
dispatcher answered; the targets they are held to; and the sizes of a full
and a quick run (L{settings}).

docs/benchmarks.md (written by L{bench.report}) describes each measure's
method in words; keep the two in step.
"""

from __future__ import annotations

import contextlib
import datetime
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from bench.harness import (
    WORKER_CORE,
    WORKER_TOKEN,
    BenchError,
    Client,
    IdleConnections,
    RemoteWorkers,
    Run,
    Server,
    Window,
    in_threads,
    percentile,
    poll,
    wrk,
)
from bench.profiles import top_frames

TERMINAL = ("succeeded", "failed", "cancelled")
# The measures a run can be limited to (C{--only}), in the order it runs them.
STEPS = ("submit", "batch", "noop", "noop_batch", "noop_small", "noop_idle", "noop_batch_idle",
         "noop_remote", "noop_remote_noprefetch", "commands", "commands_idle", "latency",
         "blocking", "claims", "auth", "events", "pg")

# The targets, set by the issue that asked for the measures; the report
# judges each run against them (L{bench.report.targets}).
SUBMIT_TO_BASELINE = 1.0  # (a) single submits at 50 connections, × the stock server
BATCH_JOBS_PER_S = 100_000  # (f)
NOOP_JOBS_PER_S = 5_000  # (b), (b''), and both with idle connections (g)
COMMAND_JOBS_PER_S = 500  # (c), and with idle connections (g)
# (i) no-op task jobs through one remote worker on the other core, at
# least this many times (b)'s rate of the same run (issue 19: the remote
# path costs a round trip, not a second dispatcher core).
REMOTE_TO_LOCAL = 0.8
START_P50_MS = 2  # (d)
START_P99_MS = 20  # (d)
BLOCKING_S = 1.1  # (e) five blocking 1 s tasks, all done
IDLE_SUBMIT_RATIO = 0.8  # (g) submits with idle connections open, × without
IDLE_RSS_MB = 300  # (g) the daemon's peak RSS with them
QUEUED_RSS_MB = 500  # (h) the daemon's peak RSS with a million jobs queued
QUEUED_SUBMIT_RATIO = 0.5  # (h) submits with them, × an empty store
QUEUED_CLAIM_RATIO = 0.5  # (h) claims with them, × a short queue
QUEUED_READY_S = 5  # (h) from starting the daemon to its first answer
AUTH_RATIO = 0.95  # (j) submits and no-op jobs with authentication, × without
# (l) no-op task jobs submitted in batches through one dispatcher on
# PostgreSQL, at least this many times the faster of pgqueuer and
# Procrastinate running the same jobs on the same server (issue 19).
PG_NOOP_TO_PEER = 2.0
REACTOR_HOLD_MS = 50  # every measure: no callback holds the reactor longer


def settings(quick: bool, rounds: Optional[int] = None) -> dict[str, Any]:
    """
    The sizes of a run: a full one, or a C{quick} smoke run whose figures
    say little about the targets; C{rounds} overrides the submit and claim
    measures' number of rounds.
    """
    return {
        "quick": quick,
        "submit_seconds": 3 if quick else 10,
        "submit_rounds": rounds or (1 if quick else 3),
        "connections": [1, 50],
        "batch_seconds": 3 if quick else 10,
        "batch_size": 1000,
        "batch_concurrency": 4,
        "noop_jobs": 2_000 if quick else 20_000,
        "noop_jobs_small": 0 if quick else 2_000,
        "remote_workers": 1,
        "remote_worker_slots": 8,
        "true_jobs": 300 if quick else 2_000,
        "latency_jobs": 50 if quick else 300,
        "idle_connections": 2_000 if quick else 10_000,
        "queued_jobs": 100_000 if quick else 1_000_000,
        # The short queue (h) compares the long one with: enough that the
        # 11 s of a claims round (1 s warm-up, 10 s window) cannot run it
        # out at this machine's claim rates (17,300 jobs/s ran 200,000 out).
        "seeded_jobs": 50_000 if quick else 400_000,
        "claims_seconds": 2 if quick else 10,
        "claims_rounds": rounds or (1 if quick else 3),
        "auth_rounds": rounds or (1 if quick else 3),
        # (k) the event stream (bench/event_measures.py).
        "event_jobs": 2_000 if quick else 20_000,
        "event_rounds": rounds or (1 if quick else 3),
        "idle_subscribers": 2_000 if quick else 10_000,
        "busy_subscribers": 100 if quick else 1_000,
        "delivery_jobs": 500 if quick else 5_000,
        "event_latency_jobs": 50 if quick else 300,
        # (l) the PostgreSQL section (bench/pg_measures.py).
        "pg_server": pg_server(),
        "pg_rounds": rounds or (1 if quick else 3),
        "pg_submit_seconds": 3 if quick else 10,
        "pg_batch_seconds": 3 if quick else 10,
        "pg_noop_jobs": 2_000 if quick else 20_000,
    }


def pg_server() -> str:
    """
    The PostgreSQL server of (l) as the results may show it: the URL of
    the database it connects to (L{bench.pg_measures.bench_url}) without
    its password.
    """
    from bench.pg_measures import bench_url
    from dispatcher.store._postgres import describe_url

    return describe_url(bench_url())


# Asking the dispatcher


def queue_counts(client: Client) -> dict[str, int]:
    """
    Jobs by state over every queue, as a client sees them (C{GET /v1/queues}).
    """
    answer = client.get_ok("/v1/queues")
    totals: dict[str, int] = {}
    for queue in answer["queues"].values():
        for state, n in queue["counts"].items():
            totals[state] = totals.get(state, 0) + n
    return totals


def jobs_in_state(client: Client, state: str) -> Iterator[dict[str, Any]]:
    """
    Every job in C{state}, a thousand a page.
    """
    cursor = None
    while True:
        path = f"/v1/jobs?state={state}&limit=1000"
        if cursor is not None:
            path += f"&cursor={cursor}"
        page = client.get_ok(path)
        yield from page["jobs"]
        cursor = page["next_cursor"]
        if cursor is None:
            return


def parse_time(text: str) -> float:
    """
    An ISO 8601 time of the API in seconds since the epoch.
    """
    return datetime.datetime.fromisoformat(text).timestamp()


def left_queued(database: Path) -> dict[str, int]:
    """
    Jobs of a seeded store (all queued at first) by every state but
    C{queued}, read straight from the file: a WAL reader never holds the
    daemon's writer up, and the state index makes it cheap even beside a
    million queued jobs, unlike C{GET /v1/queues}, which counts them all.
    """
    conn = sqlite3.connect(str(database), timeout=30)
    try:
        return dict(conn.execute(
            "SELECT state, COUNT(*) FROM jobs WHERE state IN"
            " ('pending', 'staging', 'running', 'succeeded', 'failed', 'cancelled')"
            " GROUP BY state").fetchall())
    finally:
        conn.close()


def submit_concurrently(client: Client, bodies: Callable[[int], Any], count: int,
                        concurrency: int, deadline: float, batch: int = 0) -> dict[str, Any]:
    """
    POST C{count} jobs from C{concurrency} threads, each on its own
    keep-alive connection, one a request or, with C{batch}, that many a
    request to C{/v1/jobs/batch}; returns the ids and how the answers went.
    """
    lock = threading.Lock()
    ids: list[Optional[str]] = [None] * count
    statuses: dict[int, int] = {}

    def send(index: int) -> None:
        end = min(count, index + (batch or 1))
        if batch:
            status, answer = client.json(
                "POST", "/v1/jobs/batch", {"jobs": [bodies(i) for i in range(index, end)]})
            jobs = answer["jobs"] if status == 201 else []
        else:
            status, job = client.json("POST", "/v1/jobs", bodies(index))
            jobs = [job] if status == 201 else []
        with lock:
            statuses[status] = statuses.get(status, 0) + 1
        for i, job in zip(range(index, end), jobs):
            ids[i] = job["id"]

    try:
        in_threads(client, concurrency, iter(range(0, count, batch or 1)), send,
                   deadline, grace=5)
    except BenchError as e:
        raise BenchError(f"submitting failed: {e}; {statuses}")
    if None in ids:
        raise BenchError(f"submitting did not finish in time: {statuses}")
    return {"ids": ids, "statuses": {str(k): v for k, v in sorted(statuses.items())}}


def wait_all_finished(client: Client, deadline: float, interval: float) -> int:
    """
    Poll until no job is queued, staging or running; returns how many
    polls that took.  The states are asked in the order a job goes through
    them, so a job cannot slip past all three questions.  Each question
    fetches one job: polling stays cheap.
    """
    for polls in poll(deadline, interval, "the jobs did not finish"):
        if not any(client.get_ok(f"/v1/jobs?state={state}&limit=1")["jobs"]
                   for state in ("queued", "staging", "running")):
            return polls
    raise AssertionError("unreachable")


def wait_job(client: Client, job_id: str, deadline: float, interval: float) -> dict:
    """
    Poll job C{job_id} until it ended; returns it.
    """
    for _ in poll(deadline, interval, f"job {job_id} did not finish"):
        job = client.get_ok(f"/v1/jobs/{job_id}")
        if job["state"] in TERMINAL:
            return job
    raise AssertionError("unreachable")


# The measures


def measure_submit(run: Run, kind: str, connections: int, seconds: float,
                   profile: bool = False, round_: int = 0,
                   variant: Optional[str] = None, idle: int = 0,
                   store: Optional[Path] = None, store_jobs: int = 0,
                   access_log: bool = False, authentication: bool = True,
                   store_url: Optional[str] = None) -> dict[str, Any]:
    """
    (a) Durable single-job submits a second: wrk POSTs C{{"command":
    ["true"]}} to C{/v1/jobs} on C{connections} connections for
    C{seconds}, against the daemon (C{kind} C{"daemon"}) with no slots, so
    the jobs stay queued and only submission is measured, or the stock
    twisted.web baseline (C{"baseline"}).  Every request carries the
    daemon's admin token, as a real client's carries its credential.  The
    daemon must have stored at least as many jobs as it acknowledged.

    Variants: with the default access log on (a'); with C{idle} idle
    keep-alive connections open meanwhile (g); on a copy of a prepared
    C{store} of C{store_jobs} queued jobs (h); without C{authentication}
    (C{[api] authentication = off}, no token sent) (j); on the
    PostgreSQL database C{store_url} (l).  With C{profile}, cProfile runs
    on the daemon's reactor thread.

    Targets: at 50 connections, L{SUBMIT_TO_BASELINE} × the baseline's
    rate; with idle connections, L{IDLE_SUBMIT_RATIO} × the rate without
    them and a peak RSS under L{IDLE_RSS_MB} MB; with a million queued,
    L{QUEUED_SUBMIT_RATIO} × an empty store's rate, a peak RSS under
    L{QUEUED_RSS_MB} MB and serving within L{QUEUED_READY_S} s of start.
    """
    variant = variant or kind
    name = f"submit-{variant}-{connections}c-{round_}" + ("-profile" if profile else "")
    with Server(run.processes, kind, run.tmp / name, slots=0, store=store,
                access_log=access_log, authentication=authentication,
                store_url=store_url) as server, \
            IdleConnections(server.port, idle) as idlers:
        result: dict[str, Any] = {}
        if kind == "daemon":
            result["ready_s"] = round(server.ready_s, 3)
            result["memory_at_start"] = server.memory()
        if idle:
            result["idle"] = idlers.opened(server)
        with Window(run, server, name, cprofile=profile) as window:
            result.update(wrk(run.processes, server.port, connections, seconds,
                              token=server.token))
        result.update(window.figures)
        if idle:
            result["idle"]["still_open_after"] = idlers.still_open()
        if profile:
            stats_path = run.tmp / name / "profile.pstats"
            server.monitor(f"profile_stop {stats_path}")
            result["profile_top"] = top_frames(stats_path)
        if kind == "daemon":
            result["memory"] = server.memory()
            queued = queue_counts(server.client)["queued"]
            result["jobs_stored"] = queued - store_jobs
            if result["jobs_stored"] < result["created_201"]:
                raise BenchError(f"{name}: {result['created_201']} jobs acknowledged "
                                 f"but only {result['jobs_stored']} stored")
    if store is not None:
        server.remove_database()
    return result


def measure_batch(run: Run, seconds: float, batch_size: int = 1000,
                  concurrency: int = 4, max_batches: int = 2000,
                  store_url: Optional[str] = None, name: str = "batch") -> dict[str, Any]:
    """
    (f) Batch submission: C{concurrency} clients, each on its own
    keep-alive connection, POST C{{"jobs": [...]}} of C{batch_size}
    distinct jobs (C{["true", "<batch>-<index>"]}) to C{/v1/jobs/batch}
    for C{seconds}, against a daemon with no slots.  The rate counts the
    jobs of C{201} answers over the time from the first request sent to the
    last answer received; every answer's ids must be distinct, and at the
    end the store must hold exactly as many queued jobs, counted through
    the API.  With C{store_url}, on that PostgreSQL database (l); C{name}
    is the daemon's directory under the run's.

    Target: L{BATCH_JOBS_PER_S} jobs a second.
    """
    with Server(run.processes, "daemon", run.tmp / name, slots=0,
                store_url=store_url) as server:
        client = server.client
        lock = threading.Lock()
        latencies: list[float] = []
        statuses: dict[int, int] = {}
        ids: set[str] = set()
        marks: dict[str, float] = {}

        def send(number: int) -> None:
            body = {"jobs": [{"command": ["true", f"{number}-{i}"]}
                             for i in range(batch_size)]}
            sent = time.time()
            with lock:
                marks.setdefault("first_sent", sent)
            status, answer = client.json("POST", "/v1/jobs/batch", body)
            received = time.time()
            with lock:
                statuses[status] = statuses.get(status, 0) + 1
                if status != 201:
                    raise BenchError(f"status {status}: {str(answer)[:300]}")
                latencies.append((received - sent) * 1000)
                ids.update(job["id"] for job in answer["jobs"])
                marks["last_received"] = max(marks.get("last_received", 0.0), received)

        with Window(run, server, name) as window:
            try:
                in_threads(client, concurrency, iter(range(max_batches)), send,
                           time.monotonic() + seconds, grace=60)
            except BenchError as e:
                raise BenchError(f"batch submits failed: {e}")
        acknowledged = statuses.get(201, 0) * batch_size
        if len(ids) != acknowledged:
            raise BenchError(f"batch: {acknowledged} jobs acknowledged, {len(ids)} distinct ids")
        stored = queue_counts(client)["queued"]
        if stored != acknowledged:
            raise BenchError(f"batch: {acknowledged} jobs acknowledged but {stored} stored")
        memory = server.memory()
    elapsed = marks["last_received"] - marks["first_sent"]
    return {
        "batch_size": batch_size,
        "client_concurrency": concurrency,
        "seconds": seconds,
        "requests": statuses.get(201, 0),
        "jobs_acknowledged": acknowledged,
        "jobs_stored": stored,
        "elapsed_s": round(elapsed, 3),
        "jobs_per_s": round(acknowledged / elapsed, 1),
        "request_ms": {"p50": round(percentile(latencies, 50), 1),
                       "p99": round(percentile(latencies, 99), 1),
                       "max": round(max(latencies), 1)},
        "memory": memory,
        **window.figures,
    }


def measure_claims(run: Run, name: str, store: Path, store_jobs: int,
                   seconds: float, warmup: float = 1.0) -> dict[str, Any]:
    """
    (h) How fast queued no-op jobs leave C{queued} (are claimed and
    started) on a copy of a prepared C{store} of C{store_jobs}, with
    C{slots = threads = 8}: the jobs that left it in a window of
    C{seconds}, after C{warmup} seconds of running, read straight from the
    database file (L{left_queued}).  The window must not run the store
    out.

    Target: with a million queued, L{QUEUED_CLAIM_RATIO} × the rate with
    a short queue (the run alternates the two); serving within
    L{QUEUED_READY_S} s of start and a peak RSS under L{QUEUED_RSS_MB} MB.
    """
    with Server(run.processes, "daemon", run.tmp / name, slots=8, threads=8,
                store=store) as server:
        ready_s = server.ready_s
        at_start = server.memory()
        time.sleep(warmup)
        with Window(run, server, name) as window:
            before, t0 = left_queued(server.database), time.monotonic()
            time.sleep(seconds)
            after, t1 = left_queued(server.database), time.monotonic()
        memory = server.memory()
    server.remove_database()
    left = sum(after.values()) - sum(before.values())
    finished = after.get("succeeded", 0) - before.get("succeeded", 0)
    if after.get("failed") or after.get("cancelled"):
        raise BenchError(f"{name}: jobs failed or were cancelled: {after}")
    if sum(after.values()) >= store_jobs:
        raise BenchError(f"{name}: the {store_jobs} queued jobs ran out within the window; "
                         "seed more")
    return {
        "store_jobs": store_jobs,
        "slots": 8,
        "threads": 8,
        "ready_s": round(ready_s, 3),
        "window_s": round(t1 - t0, 3),
        "left_queued": left,
        "left_queued_per_s": round(left / (t1 - t0), 1),
        "succeeded_per_s": round(finished / (t1 - t0), 1),
        "memory_at_start": at_start,
        "memory": memory,
        **window.figures,
    }


def measure_end_to_end(run: Run, name: str, body: Any, count: int,
                       slots: int, threads: int, concurrency: int = 50,
                       timeout: float = 180.0, idle: int = 0,
                       workers: int = 0, batch: int = 0,
                       authentication: bool = True,
                       code: Optional[Path] = None,
                       prefetch: Optional[int] = None,
                       profile: bool = False) -> dict[str, Any]:
    """
    (b, c) C{count} jobs C{body} from the first submit until the last one
    has succeeded, submitted from C{concurrency} client threads, each on
    its own keep-alive connection, one a request or, with C{batch}, that
    many a request (b'').  The end is the last job's own C{finished_at},
    not the moment a poll noticed it.  With C{idle}, that many idle
    keep-alive connections are opened first and held throughout (g).  With
    C{workers}, the daemon is a pure dispatcher (C{slots = 0}) and that
    many L{RemoteWorkers} of C{slots} slots and task threads each run the
    jobs (i), each with C{--prefetch} C{prefetch} if given (its default,
    as many as its slots, otherwise).  The clients send the daemon's admin token, unless
    C{authentication} is off (j).  With C{code}, the daemon is that tree's
    version (bench/metrics.py runs main's against this one).  With
    C{profile}, the daemon's reactor thread is cProfiled over the window
    (C{profile_top}).

    Targets: no-op task jobs, L{NOOP_JOBS_PER_S} a second, one a request
    or in batches, with or without idle connections; C{true} command jobs,
    L{COMMAND_JOBS_PER_S} a second.  The remote workers' figure (i) has no
    target: it is read against (b) of the same run.
    """
    token: Optional[Path] = None
    if workers:
        token = run.tmp / name / "worker.token"
        token.parent.mkdir(parents=True, exist_ok=True)
        token.write_text(WORKER_TOKEN + "\n", encoding="utf-8")
        token.chmod(0o600)
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(Server(
            run.processes, "daemon", run.tmp / name, slots=0 if workers else slots,
            threads=threads, workers_token=token, authentication=authentication,
            code=code))
        idlers = stack.enter_context(IdleConnections(server.port, idle))
        remote: Optional[RemoteWorkers] = None
        if workers:
            assert token is not None
            remote = stack.enter_context(RemoteWorkers(
                run.processes, server, token, run.tmp / name, workers, slots, prefetch))
        client = server.client
        idle_info = idlers.opened(server)
        with Window(run, server, name, cprofile=profile) as window:
            deadline = time.monotonic() + timeout
            worker_cpu0 = remote.cpu_seconds() if remote else 0.0
            if remote is not None:
                for child, worker in zip(remote.children, remote.names):
                    window.spy_on(child.pid, worker)
            first_submit = time.time()
            t0 = time.monotonic()
            submitted = submit_concurrently(client, lambda i: body, count, concurrency,
                                            deadline, batch)
            all_submitted = time.time()
            submit_cpu = window.cpu.stop()
            seen_workers = None
            if remote is not None:
                # What the dispatcher sees of its workers while they work.
                status, seen_workers = client.json("GET", "/v1/workers")
            polls = wait_all_finished(client, deadline, 0.1)
            seen_done = time.time()
        figures = window.figures
        if profile:
            stats_path = run.tmp / name / "profile.pstats"
            server.monitor(f"profile_stop {stats_path}")
            figures["profile_top"] = top_frames(stats_path)
        # The dispatcher's CPU a job costs, submission included: the whole
        # window's, over the jobs.
        figures["cpu"]["server_cpu_us_per_job"] = round(
            1e6 * figures["cpu"]["server_cpu_s"] / count, 1)
        if remote is not None:
            worker_cpu = remote.cpu_seconds() - worker_cpu0
            figures["cpu"]["workers_process_pct"] = round(
                100 * worker_cpu / (time.monotonic() - t0), 1)
            figures["cpu"]["workers_cpu_us_per_job"] = round(1e6 * worker_cpu / count, 1)
        if idle:
            idle_info["still_open_after"] = idlers.still_open()
        memory = server.memory()
        succeeded = [parse_time(job["finished_at"])
                     for job in jobs_in_state(client, "succeeded")]
        failed = sum(1 for _ in jobs_in_state(client, "failed"))
        cancelled = sum(1 for _ in jobs_in_state(client, "cancelled"))
    if len(succeeded) != count:
        raise BenchError(f"{name}: {len(succeeded)} of {count} succeeded "
                         f"({failed} failed, {cancelled} cancelled)")
    elapsed = max(succeeded) - first_submit
    ordered = sorted(succeeded)
    tenth = max(1, count // 10)
    edges = [first_submit] + [ordered[min(count - 1, (i + 1) * tenth - 1)] for i in range(10)]
    result = {
        "jobs": count,
        "slots": slots,
        "threads": threads,
        "client_concurrency": concurrency,
        "batch": batch,
        "submit_statuses": submitted["statuses"],
        "submit_s": round(all_submitted - first_submit, 3),
        "submits_per_s": round(count / (all_submitted - first_submit), 1),
        "elapsed_s": round(elapsed, 3),
        "jobs_per_s": round(count / elapsed, 1),
        "finish_rate_by_tenth_per_s": [
            round(tenth / (b - a), 1) if b > a else None for a, b in zip(edges, edges[1:])],
        "seen_done_s": round(seen_done - first_submit, 3),
        "completion_polls": polls,
        "failed": failed,
        "cpu_while_submitting": submit_cpu,
        "memory": memory,
        **figures,
    }
    if idle:
        result["idle"] = idle_info
    if remote is not None:
        result["slots"] = 0
        answers = remote.lease_answers()
        sizes: dict[str, int] = {}
        for n in sorted(answers):
            sizes[str(n)] = sizes.get(str(n), 0) + 1
        result["remote"] = {
            "workers": workers,
            "worker_slots": slots,
            "worker_threads": slots,
            "worker_prefetch": slots if prefetch is None else prefetch,
            "worker_core": WORKER_CORE,
            "workers_ready_s": round(remote.ready_s or 0.0, 3),
            "lease_answers": len(answers),
            "jobs_leased": sum(answers),
            "jobs_per_lease_answer": round(sum(answers) / len(answers), 2) if answers else None,
            "lease_answer_sizes": sizes,
            "seen_after_submitting": (seen_workers or {}).get("workers"),
        }
    return result


def measure_start_latency(run: Run, count: int, timeout: float = 120.0) -> dict[str, Any]:
    """
    (d) Submit-to-start with free slots (C{slots = 8}): C{count}
    C{["date", "+%s.%N"]} jobs one at a time, each printing the time it
    ran; the latency is that time minus when the client had the C{201} in
    hand (and, second, minus when it sent the request).

    Targets: p50 within L{START_P50_MS} ms, p99 within L{START_P99_MS} ms.
    """
    with Server(run.processes, "daemon", run.tmp / "start-latency", slots=8) as server:
        client = server.client
        server.monitor("reset")
        deadline = time.monotonic() + timeout
        from_201, from_send = [], []
        for _ in range(count):
            sent = time.time()
            status, job = client.json("POST", "/v1/jobs", {"command": ["date", "+%s.%N"]})
            received = time.time()
            if status != 201:
                raise BenchError(f"submit answered {status}: {job}")
            job = wait_job(client, job["id"], deadline, 0.005)
            if job["state"] != "succeeded":
                raise BenchError(f"job {job['id']} ended {job['state']}: {job['error']}")
            status, log = client.request("GET", f"/v1/jobs/{job['id']}/log")
            started = float(log.decode().strip())
            from_201.append((started - received) * 1000)
            from_send.append((started - sent) * 1000)
        hold = server.monitor("read")
    return {
        "jobs": count,
        "from_201_ms": {"p50": round(percentile(from_201, 50), 3),
                        "p99": round(percentile(from_201, 99), 3),
                        "min": round(min(from_201), 3), "max": round(max(from_201), 3)},
        "from_send_ms": {"p50": round(percentile(from_send, 50), 3),
                         "p99": round(percentile(from_send, 99), 3)},
        "reactor_hold": hold,
    }


def measure_blocking_tasks(run: Run, seconds: float = 1.0,
                           timeout: float = 60.0) -> dict[str, Any]:
    """
    (e) Five C{block} tasks that each hold a task thread for C{seconds},
    on five threads and five slots, submitted at once: how long until all
    five succeeded, while a client asks C{GET /healthz} every 5 ms and
    records its latency (every answer must be a C{200}).

    Target: all five done within L{BLOCKING_S} s.
    """
    with Server(run.processes, "daemon", run.tmp / "blocking", slots=5, threads=5) as server:
        client = server.client
        health = Client(server.port)
        stop = threading.Event()
        health_ms: list[float] = []
        health_errors: list[str] = []

        def probe() -> None:
            try:
                while not stop.is_set():
                    t0 = time.perf_counter()
                    status, _ = health.request("GET", "/healthz")
                    health_ms.append((time.perf_counter() - t0) * 1000)
                    if status != 200:
                        health_errors.append(f"status {status}")
                    time.sleep(0.005)
            except Exception as e:
                health_errors.append(f"{type(e).__name__}: {e}")
            finally:
                health.close()

        server.monitor("reset")
        prober = threading.Thread(target=probe, daemon=True)
        prober.start()
        time.sleep(0.2)
        deadline = time.monotonic() + timeout
        first_submit = time.time()
        submitted = submit_concurrently(
            client, lambda i: {"task": "block", "args": [seconds]}, 5, 5, deadline)
        all_submitted = time.time()
        jobs = [wait_job(client, job_id, deadline, 0.02) for job_id in submitted["ids"]]
        seen_done = time.time()
        stop.set()
        prober.join(35)
        hold = server.monitor("read")
    if health_errors:
        raise BenchError(f"/healthz failed during the blocking tasks: {health_errors[0]}")
    states = [job["state"] for job in jobs]
    if states != ["succeeded"] * 5:
        raise BenchError(f"the blocking tasks ended {states}")
    elapsed = max(parse_time(job["finished_at"]) for job in jobs) - first_submit
    return {
        "tasks": 5,
        "task_seconds": seconds,
        "slots": 5,
        "threads": 5,
        "submit_s": round(all_submitted - first_submit, 3),
        "elapsed_s": round(elapsed, 3),
        "seen_done_s": round(seen_done - first_submit, 3),
        "healthz": {"requests": len(health_ms),
                    "max_ms": round(max(health_ms), 3),
                    "p50_ms": round(percentile(health_ms, 50), 3),
                    "p99_ms": round(percentile(health_ms, 99), 3)},
        "reactor_hold": hold,
    }
