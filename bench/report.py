"""
The benchmark's report: docs/benchmarks.md, written whole from a run's
results (the method from the template below, then the machine, the targets
table and the result tables), and docs/benchmarks.json beside it.

A full run of C{bench/run.py} calls L{write_docs}.  To rewrite the page
from results already taken (after a change to the method's text, say):

    .venv/bin/python -m bench.report [RESULTS_JSON]

(default: docs/benchmarks.json, which is then left as it is).
"""

from __future__ import annotations

import argparse
import json
import os
import string
import sys
from pathlib import Path
from typing import Any, Optional

if not __package__:  # run as a file: make "bench" importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import measures as M
from bench import event_measures as E
from bench.daemon import config_text
from bench.harness import LOAD_CORE, ROOT, SERVER_CORE, median
from bench.machine import MKDIR_SLOW_US
from bench.pg_measures import NOOP_ROWS, PEER_ROWS, best_peer

DOCS = ROOT / "docs" / "benchmarks.md"
DOCS_JSON = ROOT / "docs" / "benchmarks.json"


# The method


METHOD = string.Template("""\
# Benchmarks

<!-- Written whole by bench/report.py from docs/benchmarks.json: a full run
of bench/run.py replaces it.  Change the method's text in bench/report.py,
then `.venv/bin/python -m bench.report`. -->

How fast the dispatcher takes and runs jobs, measured against a stock
twisted.web server in the same run, on the same machine, and how it holds
up with many idle clients and a long queue. This page holds the method and
the latest full run; earlier runs, and the investigations behind the
method, are in the git history of this page and of `bench/`.

## Run it

From the repository root, with the project installed in `.venv` and `wrk`
on the `PATH` (`apt-get install -y wrk`), on a machine with at least two
cores and an open-file limit of at least $open_files (the run raises its
soft limit to the hard one; the daemon inherits it):

```sh
.venv/bin/python bench/run.py            # the full run, 8 to 13 minutes
.venv/bin/python bench/run.py --quick    # a smoke run of about a minute
```

Every run writes its results to `DIR/<timestamp>.json` and
`DIR/latest.json` (`--out DIR`, default `bench/results/`) and prints the
result tables. A full run also writes this page and `docs/benchmarks.json`;
the other kinds of run leave both alone. `--quick` uses smaller sizes (the
figures in brackets below) and one round, so its figures say little about
the targets. `--only NAMES` runs only the named measures (comma-separated,
of $steps) and `--rounds N` changes the number of rounds. `--profile` adds one more 50-connection
submit run with cProfile on the daemon's reactor thread and prints its top
functions (and, with `noop_remote`, one more (i) run profiled so; the whole
profiles are kept in the output directory, for `python -m pstats`). `--py-spy` samples the daemon (and in (i) the remote worker)
with py-spy (`.venv/bin/pip install py-spy`) during each measure, prints
each measure's threads' shares and top frames, and keeps the raw stacks in
`DIR/py-spy-<timestamp>/`; sampling takes time from the load core and
the daemon, so a profiled run's numbers are not the ones to quote. Nothing here is part of
the test suite.

What authentication costs, (j) alone (2 to 3 minutes):

```sh
flock /tmp/bench.lock .venv/bin/python bench/run.py --only auth [--rounds N]
```

The PostgreSQL section, (l) alone (about $pg_minutes; `pip install -e '.[bench]'`
for the peers; the server of `DISPATCHER_BENCH_DSN`, default
`postgresql://postgres@127.0.0.1:5432/test`, where each measure makes a
database of its own and drops it):

```sh
flock /tmp/bench.lock .venv/bin/python bench/run.py --only pg [--rounds N]
```

The code: `bench/run.py` runs the measures in order; `bench/harness.py`
starts and stops the processes (servers, wrk, workers, py-spy), pins them
and times their windows; `bench/measures.py` holds the measures, their
sizes and their targets; `bench/machine.py` records the machine and its
state; `bench/report.py` writes this page. `bench/daemon.py`,
`bench/baseline_server.py` and `bench/monitor.py` are the two servers and
their reactor-hold monitor; `bench/seed_store.py` builds the long queues.

## How it measures

- **Pinning.** The server under test runs alone on core $server_core
  (`taskset -c $server_core`); its children (the spawner helper and the
  jobs) inherit that core. wrk, py-spy, the store builder and the
  harness's own client threads and idle connections run on core
  $load_core, and so does (i)'s remote worker, which stands for another
  host. Everything is on 127.0.0.1; the daemon's and the monitor's ports
  are chosen together, so that they cannot be the same. Every process the
  run starts leads its own process group, and every group is stopped when
  the run ends, fails or is interrupted.
- **Baseline**: `bench/baseline_server.py`, a stock twisted.web `Site`
  with one leaf `Resource` whose `render_POST` parses the JSON body with
  `json.loads` and answers `201` with a small JSON body: what a submit does
  minus the dispatcher. No access log (the daemon runs without one too).
  Being stock twisted.web, it parses every POST's `Content-Type` with
  `email.message`: 40 % of its reactor thread in a py-spy profile.
- **Dispatcher**: `bench/daemon.py` builds the service exactly as
  `twistd dispatcher --config FILE` does (`dispatcher.app.tap.Options` and
  `makeService`), in a fresh data directory for every measure, from this
  ini file (written in one place, `bench/daemon.py`'s `write_config`):

  ```ini
$config
  ```

  `access_log = yes` in (a') only; `[workers] token_file` in (i) only;
  `authentication = off` in (j)'s rows without authentication only. The
  daemon makes an admin token on its first start
  (`DATA_DIR/var/admin.token`), and every client of the benchmark (wrk,
  the harness's threads) sends it as `Authorization: Bearer <token>` on
  every request, as a real client sends its credential; the idle
  connections of (g) ask `GET /healthz`, which needs none.
  The backlog of 4096 lets thousands of clients connect at once (Twisted's
  default of 50 would refuse them). Every other key has its default, among
  them `[dispatcher] sync_interval = 1`: run-state changes (claims, starts,
  ends) reach the disk within a second, while submissions still sync
  before they are answered. With every commit synced, as
  `sync_interval = 0` does, no-op jobs ran about a third slower (3,600 to
  3,800 against 5,330 jobs a second, submitted in batches, when the
  interval came in).
- **Rounds and ratios.** A virtual machine's speed varies from run to run
  by 10 to 30 % and over a day by up to three times (the same VM's
  baseline has taken 3,400 and 11,400 submits a second), so every figure
  that has a comparison is read as a ratio within one run: the dispatcher
  over the baseline, or a variant over the plain dispatcher, each side
  measured minutes apart. The submit and claim measures run in rounds
  ($rounds), each round taking the rows in turn, so that a slow
  spell of the machine hits all of them; each row reports its median round
  whole (the range of all rounds in brackets), and a ratio is of the two
  rows' medians.
- **The machine's state.** Before it starts, the run measures for a second
  how busy both cores already are, and warns above 10 %. It also times
  creating 1,000 directories and files where the daemons keep their data:
  for a few minutes after many files were deleted (by an earlier run's
  clean-up, say), ext4's inode allocator steps over every recently freed
  inode, directories take ten times longer or more to create, and jobs
  (each gets its own directories and log files) run at half their speed or
  less. Above $mkdir_slow µs a directory, a full run waits, up to three
  minutes, for the cost to fall; the results record the cost and the
  wait. For the same reason nothing a measure made is deleted until the
  run ends (only the copies of the large stores), and runs that make many
  jobs want a few minutes between them.
- **Memory** is the daemon's `VmRSS` and, as the peak since it started,
  `VmHWM` from `/proc/PID/status`. **Start** is the time from starting the
  daemon's process to the first `200` of `GET /healthz`, asked every 10 ms.
  **CPU** is read from `/proc`: each core's busy share, and the server
  process's user and system time over the measure's window.
- **Reactor hold**: in both servers, and only in the benchmark
  (`bench/monitor.py`), a chain of `reactor.callLater(0.005, ...)` records
  how late each call fires. A call is late only when the reactor thread
  was busy elsewhere, so the maximum lateness is an upper bound on the
  longest time one callback held the reactor: it also counts everything
  one reactor iteration handled before coming back to its timers (under
  load, dozens of requests at once), garbage collection, and any time the
  thread waited for the GIL or for its core. The monitor therefore also
  times every collection (`gc.callbacks`). The harness resets and reads it
  through a small line protocol on a second loopback port, per measure.
  The tables show the maximum, then in brackets the 99th percentile and
  the longest collection.
- **Targets** are the ones of the issue that asked for these measures
  (`bench/measures.py` holds them); the first result table says for each
  whether the run met it. The target on the reactor hold is judged on the
  monitor's maximum over every dispatcher measure, an upper bound, so
  "missed" there can mean a collection or a busy iteration rather than one
  callback.

The measures (sizes of a full run, `--quick`'s in brackets):

- **(a) Submitting.** wrk (one thread, bench/wrk_post.lua) POSTs
  `{"command":["true"]}` to `/v1/jobs` for $submit_seconds with 1 and
  with 50 connections, against the daemon with `[executor] slots = 0`, so
  the jobs stay queued and only durable submission is measured, and
  against the baseline. The Lua script counts the `201` answers apart from
  every other status; after the run the harness checks, through
  `GET /v1/queues`, that the daemon stored at least as many jobs as it
  acknowledged. Latencies are wrk's (not corrected for coordinated
  omission). At 50 connections a row (a') also runs the daemon with its
  access log on (`access_log = yes`, the default: a buffered file in the
  data dir), compared with the plain dispatcher of the same rounds.
- **(b) No-op task jobs end to end.** $noop_jobs `{"task":"noop"}` jobs
  submitted by 50 client threads, each on its own keep-alive connection,
  with `slots = threads = 8`. Time from the first submit to the last job's
  own `finished_at`; completion is noticed by asking for one `queued`, one
  `staging` and one `running` job every 100 ms, so the check stays cheap.
  A full run also does it with $noop_small jobs (b'), to show how the rate
  depends on the length of the queue. The JSON has the finish rate of each
  tenth of the jobs. (b'') submits the same jobs $batch_size a request to
  `POST /v1/jobs/batch` from $batch_concurrency client connections, as a
  client with thousands of jobs would: the rate is then that of running
  them, not of taking single requests.
- **(c) Command jobs end to end.** The same with $true_jobs `["true"]`
  jobs, `slots = 8`.
- **(d) Submit-to-start latency.** $latency_jobs `["date", "+%s.%N"]` jobs,
  one at a time with all slots free: the time the job printed minus the
  time the client had the `201` in hand (and, second, minus when it sent
  the request).
- **(e) Blocking tasks.** `threads = slots = 5`, five `block` tasks that
  each `time.sleep(1)`, submitted at once: time until all five succeeded,
  while a client asks `GET /healthz` every 5 ms and records its latency.
- **(f) Batch submission.** $batch_concurrency client threads, each on its
  own keep-alive connection, POST `{"jobs": [...]}` of $batch_size distinct
  jobs (`{"command": ["true", "<batch>-<index>"]}`) to `/v1/jobs/batch` for
  $batch_seconds against a daemon with `slots = 0`. The rate is the jobs
  of the `201` answers over the time from the first request sent to the
  last answer received. The daemon answers each job's id and state (the
  clients send no `Prefer: return=representation`). Every answer must
  carry $batch_size jobs with ids distinct from all others, and at the end
  `GET /v1/queues` must count exactly as many queued jobs as were
  acknowledged: each job its own row, as a client sees it.
- **(g) Idle connections.** $idle keep-alive connections, each of which
  sent one `GET /healthz`, read its answer and then stays idle, are opened
  from the load core 250 at a time (each chunk's answers read before the
  next chunk connects, so that the listen backlog never overflows), then
  held while (a)'s 50-connection submits run; the row is compared with the
  plain dispatcher of the same rounds, and the daemon's memory is read
  before and with them open, and at its peak. As many are also held
  through a run of (b), one of (b'') and one of (c), the (g) rows of the
  running-jobs table. The daemon closes a connection idle for 60 s
  (`[server] idle_timeout`); each of these measures ends well before that,
  and the harness checks, without blocking, that every connection is still
  open at its end. They are closed with a reset, which leaves no
  `TIME_WAIT` behind to use up the loopback's ports.
- **(h) A long queue.** `bench/seed_store.py` builds, before the measures
  and on the load core, a store of $queued queued `{"task":"noop"}` jobs:
  the store's own migrations make the schema, the first job goes through
  the API's validation and the store's own submit code, and the others are
  copies of its row with their own UUIDv7 ids, inserted with `executemany`
  and `synchronous=OFF` (set-up, not a measure: about 10 s for a million).
  Each daemon gets a fresh copy of the file, flushed to disk before it
  starts, so that no write-back of the copy falls into the measure. With
  `slots = 0` the daemon's start, memory and (a)'s 50-connection submits
  are measured in each round. Then, with `slots = threads = 8`, the jobs
  that leave `queued` (are claimed and started) in a $claims_seconds
  window after 1 s of running are counted, against the same on a short
  queue of $seeded queued no-op jobs built the same way, the rounds
  alternating the two. The short queue must outlast the window at the
  fastest claim rate seen (at 17,300 jobs a second, 200,000 did not); a
  round that runs it out stops the run. The counts are read straight from
  the database file by the harness: a WAL reader does not hold the
  daemon's writer up, and the state index makes the count cheap, where
  `GET /v1/queues` would count a million rows on the daemon's core.
- **(i) No-op task jobs through a remote worker.** The daemon is a pure
  dispatcher: `[executor] slots = 0` and `[workers] token_file`
  (`bench/daemon.py --slots 0 --workers-token-file FILE`). One real worker
  process, started as an operator starts it, `dispatcher worker --url ...
  --token-file ... --slots 8 --config FILE --name bench-worker-1` with
  `[executor] threads = 8` and the same `[tasks]` (its `--prefetch` the
  default, as many as its slots: while the jobs are short it holds up to 16
  leases, 8 of them waiting to start as running jobs end), runs on core
  $load_core: it stands for another host, so it takes nothing from the
  dispatcher's core, but shares core $load_core with the 50 client
  threads while they submit (the local executor's task threads of (b), by
  contrast, share core $server_core with the daemon). Once
  `GET /v1/workers` shows its long-poll open, the same jobs as (b) are
  submitted the same way and timed the same way, to the last job's own
  `finished_at` (the commit of its reported result). The ratio is to (b)
  of the same run. The run also records the worker's
  CPU, what `GET /v1/workers` showed right after the last submit, and how
  many jobs each lease answer carried (a report's answer that grants
  leases counts as one; from the line the worker logs as it stops), and
  the dispatcher's and the worker's CPU a job (each process's CPU over the
  window, submission included for the dispatcher, over the jobs), and from
  the dispatcher's CPU a job of (b) and (i) the ratio per dispatcher core
  (the jobs one core of the dispatcher serves a second through the worker,
  over those it serves running them itself). The
  target, from issue 19: at least $remote_to_local × (b) of the same run.
  (i') is (i) again with the worker's `--prefetch 0`, so that a run shows
  what holding leases beyond the slots gains or costs.
  The worker has no reactor-hold monitor; the column is the dispatcher's.
- **(j) What authentication costs.** (a)'s submits at $auth_connections
  connections and (b)'s no-op task jobs, each with authentication (the
  admin token sent on every request, checked on every request's head:
  the credentials file's `stat`, the token's SHA-256, the role against
  the route) and with `[api] authentication = off` (no token sent; the
  `Host` check and the route's lookup still run), in $auth_rounds rounds
  whose order alternates, so that neither side always goes first. Each
  side is its median round; the ratio is of the medians. Target: with
  authentication, at least $auth_ratio × the rate without it. On a machine
  shared with other work the rounds spread by more than the cost sought;
  `bench/head_check.py` measures the head check alone in process, in CPU
  time, which other processes disturb far less: microseconds of a core per
  request through `dispatcher.http` with no head check, with
  authentication off and with it on.
- **(k) The event stream** (`GET /v1/events`, `bench/event_measures.py`).
  The subscribers are raw sockets of the harness, on core $load_core,
  read by one thread through a selector that counts the job events in
  what arrives. (k1) (b)'s $event_jobs no-op task jobs with
  $idle_subscribers event streams open, each following a job that never
  exists (`?job=<a random id>`: clients waiting on their own jobs), in
  $event_rounds rounds alternating with the same run without them; target:
  at least $idle_subscribers_ratio × the rate without them. (k2) $delivery_jobs
  no-op task jobs (three events each: queued, running, succeeded) while 1
  and $busy_subscribers unfiltered streams are open: job events read a
  second, in all and by each stream, from the first submit to the last
  event read, and how many streams were dropped for falling behind; no
  target. (k3) $event_latency_jobs no-op task jobs submitted one at a time, each
  once the one before has succeeded, while one stream is open: the time
  from sending the submit to reading the job's `queued` event (published
  just before the submit's answer) and its `succeeded` event, p50 and p99;
  no target.
- **(l) PostgreSQL** (`bench/pg_measures.py`, `bench/pg_peers.py`,
  `bench/pg_costs.py`; docs/scaling.md reads its figures). The daemon
  with `[store] url` naming a database made for the measure (the
  dispatcher's schema made in it before the daemon starts; dropped
  after) next to the daemon on its SQLite file, in $pg_rounds rounds
  whose order alternates: (a)'s single submits at 50 connections; (f)'s
  batch submits; (b'')'s $pg_noop_jobs no-op task jobs in batches of
  $batch_size from $batch_concurrency connections, through one
  dispatcher, and through two `bench/daemon.py` processes (each
  `slots = threads = 8`, a holder name of its own) on one database, the
  clients' batches going to each in turn, the second dispatcher on core
  $load_core ("two") or both on core $server_core ("two on one core").
  Each is woken by the jobs submitted to it (and by the other's commits,
  `LISTEN/NOTIFY`) and claims whatever is
  queued (`FOR UPDATE SKIP LOCKED`), so each runs jobs and all finish,
  each once (one attempt a job, or the run stops); the run records how
  many each ran (the attempts' holders). In the same
  rounds, the same no-op jobs through pgqueuer and Procrastinate, each
  in a database of its own on the same server (`bench/pg_peers.py`'s
  docstring says how each is set up). PostgreSQL itself is not pinned:
  its backends run on either core. Target, from issue 19: no-op jobs
  through one dispatcher on PostgreSQL at least $pg_to_peer × the faster
  peer's rate of the same run. What a job cost: the dispatcher's CPU (its
  process, over the window), its round trips to PostgreSQL (every wait of
  a psycopg connection for the server, counted in the bench daemon) and
  its writer's commits; from the server, the database's transactions and
  rows inserted, updated and deleted (`pg_stat_database`, read with no
  backend of the database left, from before the daemon started to after
  it stopped, so its start, its stop and the harness's polls are in
  them), the server's WAL bytes and syncs (the whole server's: the other
  databases' commits meanwhile are recorded beside them) and the CPU of
  the database's backends (`/proc/PID/stat`, read every 0.1 s).
  `pg_stat_statements` would count statements, but it must be preloaded
  at the server's start, and the run does not restart a shared server.

""")


def method(steps: tuple[str, ...]) -> str:
    """
    The page's method part, with the sizes of a full and a quick run, the
    cores and the daemon's ini file as the code has them.
    """
    full, quick = M.settings(False), M.settings(True)

    def both(key: str, unit: str = "") -> str:
        # A full run's size, and a quick run's in brackets.
        return f"{full[key]:,}{unit} ({quick[key]:,}{unit})"

    config = config_text(port="PORT", data_dir="DATA_DIR/var", slots="SLOTS",
                         threads="THREADS").rstrip("\n")
    return METHOD.substitute(
        open_files=f"{full['idle_connections'] + 1000:,}",
        steps=", ".join(f"`{step}`" for step in steps),
        server_core=SERVER_CORE,
        load_core=LOAD_CORE,
        remote_to_local=M.REMOTE_TO_LOCAL,
        config="\n".join(f"  {line}" if line else "" for line in config.splitlines()),
        mkdir_slow=MKDIR_SLOW_US,
        rounds=f"{full['submit_rounds']} in a full run, {quick['submit_rounds']} with "
               "`--quick`",
        submit_seconds=both("submit_seconds", " s"),
        noop_jobs=both("noop_jobs"),
        noop_small=f"{full['noop_jobs_small']:,}",
        batch_size=f"{full['batch_size']:,}",
        batch_concurrency=full["batch_concurrency"],
        batch_seconds=both("batch_seconds", " s"),
        true_jobs=both("true_jobs"),
        latency_jobs=both("latency_jobs"),
        idle=both("idle_connections"),
        queued=both("queued_jobs"),
        seeded=both("seeded_jobs"),
        claims_seconds=both("claims_seconds", " s"),
        auth_connections=max(full["connections"]),
        auth_rounds=f"{full['auth_rounds']} ({quick['auth_rounds']})",
        auth_ratio=f"{M.AUTH_RATIO:.2f}",
        event_jobs=both("event_jobs"),
        idle_subscribers=both("idle_subscribers"),
        event_rounds=f"{full['event_rounds']} ({quick['event_rounds']})",
        idle_subscribers_ratio=f"{E.IDLE_SUBSCRIBERS_RATIO:.1f}",
        delivery_jobs=both("delivery_jobs"),
        busy_subscribers=both("busy_subscribers"),
        event_latency_jobs=both("event_latency_jobs"),
        pg_rounds=f"{full['pg_rounds']} ({quick['pg_rounds']})",
        pg_noop_jobs=both("pg_noop_jobs"),
        pg_to_peer=f"{M.PG_NOOP_TO_PEER:.0f}",
        pg_minutes="13 minutes, most of them Procrastinate's rounds",
    )


# The targets


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """
    The issue's targets (L{bench.measures}), each with what this run
    measured and whether it was met (C{None}: not measured in this run).
    """
    s = results["settings"]
    r = results["measures"]
    rounds = r.get("rounds", {})
    idle = f"{s['idle_connections']:,}"
    queued = f"{s['queued_jobs']:,}"
    rows: list[dict[str, Any]] = []

    def add(target: str, value: Optional[float], shown: str, met: Optional[bool]) -> None:
        rows.append({"target": target, "value": value, "measured": shown,
                     "met": None if value is None else met})

    def get(name: str, *path: str) -> Optional[float]:
        x: Any = r.get(name)
        for key in path:
            if x is None:
                return None
            x = x.get(key)
        return x

    def ratio_of(a: Optional[float], b: Optional[float]) -> Optional[float]:
        return a / b if a and b else None

    def from_rounds(names: list[str], path: tuple[str, ...]) -> list[float]:
        values = []
        for name in names:
            for x in rounds.get(name, []):
                for key in path:
                    x = x[key]
                values.append(x)
        return values

    c = max(s["connections"])
    d, b = get(f"submit_daemon_{c}c", "requests_per_s"), get(f"submit_baseline_{c}c",
                                                               "requests_per_s")
    v = ratio_of(d, b)
    add(f"single submits at {c} connections >= {M.SUBMIT_TO_BASELINE:.1f} x the stock "
        "twisted.web server", v,
        f"{v:.2f} x ({d:,.0f} against {b:,.0f}/s)" if v else "",
        v is not None and v >= M.SUBMIT_TO_BASELINE)
    v = get("batch", "jobs_per_s")
    add(f"batch submission >= {M.BATCH_JOBS_PER_S:,} jobs/s", v,
        f"{v:,.0f} jobs/s" if v else "", v is not None and v >= M.BATCH_JOBS_PER_S)
    batched = f"submitted in batches of {s['batch_size']:,}"
    for name, label, floor in (
            ("noop_tasks", "no-op task jobs", M.NOOP_JOBS_PER_S),
            ("noop_tasks_batched", f"no-op task jobs {batched}", M.NOOP_JOBS_PER_S),
            ("noop_tasks_idle", f"no-op task jobs, {idle} idle connections open",
             M.NOOP_JOBS_PER_S),
            ("noop_tasks_batched_idle",
             f"no-op task jobs {batched}, {idle} idle connections open", M.NOOP_JOBS_PER_S),
            ("true_commands", "`true` command jobs", M.COMMAND_JOBS_PER_S),
            ("true_commands_idle", f"`true` command jobs, {idle} idle connections open",
             M.COMMAND_JOBS_PER_S)):
        v = get(name, "jobs_per_s")
        add(f"{label} >= {floor:,} jobs/s", v, f"{v:,.0f} jobs/s" if v else "",
            v is not None and v >= floor)
    v, local = get("noop_tasks_remote", "jobs_per_s"), get("noop_tasks", "jobs_per_s")
    if v is not None:
        workers = r["noop_tasks_remote"]["remote"]
        label = (f"no-op task jobs through {workers['workers']} remote worker"
                 f"{'s' if workers['workers'] > 1 else ''} of {workers['worker_slots']} slots "
                 f">= {M.REMOTE_TO_LOCAL} x the local executor's")
        shown = f"{v:,.0f} jobs/s" + (f", {v / local:.2f} x the local executor's "
                                      f"({local:,.0f} jobs/s)" if local else "")
        add(label, v, shown, local is not None and v >= M.REMOTE_TO_LOCAL * local)
    v = get("start_latency", "from_201_ms", "p50")
    add(f"submit-to-start p50 <= {M.START_P50_MS} ms", v, f"{v:.1f} ms" if v else "",
        v is not None and v <= M.START_P50_MS)
    v = get("start_latency", "from_201_ms", "p99")
    add(f"submit-to-start p99 <= {M.START_P99_MS} ms", v, f"{v:.1f} ms" if v else "",
        v is not None and v <= M.START_P99_MS)
    i = get(f"submit_idle_{c}c", "requests_per_s")
    v = ratio_of(i, d)
    add(f"{idle} idle connections: submit rate >= {M.IDLE_SUBMIT_RATIO} x without them", v,
        f"{v:.2f} x ({i:,.0f} against {d:,.0f}/s)" if v else "",
        v is not None and v >= M.IDLE_SUBMIT_RATIO)
    peaks = from_rounds([f"submit_idle_{c}c"], ("memory", "vmhwm_kib"))
    v = mb(max(peaks)) if peaks else None
    add(f"{idle} idle connections: daemon RSS < {M.IDLE_RSS_MB} MB", v,
        f"peak {v:,.0f} MB" if v else "", v is not None and v < M.IDLE_RSS_MB)
    peaks = from_rounds([f"submit_queued_{c}c", "claims_queued"], ("memory", "vmhwm_kib"))
    v = mb(max(peaks)) if peaks else None
    add(f"{queued} queued: daemon RSS < {M.QUEUED_RSS_MB} MB", v,
        f"peak {v:,.0f} MB" if v else "", v is not None and v < M.QUEUED_RSS_MB)
    q = get(f"submit_queued_{c}c", "requests_per_s")
    v = ratio_of(q, d)
    add(f"{queued} queued: submit rate >= {M.QUEUED_SUBMIT_RATIO} x an empty store", v,
        f"{v:.2f} x ({q:,.0f} against {d:,.0f}/s)" if v else "",
        v is not None and v >= M.QUEUED_SUBMIT_RATIO)
    q, e = get("claims_queued", "left_queued_per_s"), get("claims_seeded", "left_queued_per_s")
    v = ratio_of(q, e)
    add(f"{queued} queued: claim/start rate >= {M.QUEUED_CLAIM_RATIO} x a store of "
        f"{s['seeded_jobs']:,}", v,
        f"{v:.2f} x ({q:,.0f} against {e:,.0f} jobs/s)" if v else "",
        v is not None and v >= M.QUEUED_CLAIM_RATIO)
    starts = from_rounds([f"submit_queued_{c}c", "claims_queued"], ("ready_s",))
    v = max(starts) if starts else None
    add(f"{queued} queued: serving within {M.QUEUED_READY_S} s of start", v,
        f"{v:.2f} s at worst" if v else "", v is not None and v <= M.QUEUED_READY_S)
    v = get("blocking_tasks", "elapsed_s")
    add(f"five blocking 1 s tasks <= {M.BLOCKING_S} s", v, f"{v:.3f} s" if v else "",
        v is not None and v <= M.BLOCKING_S)
    for label, on_name, off_name, field, unit in auth_pairs(c):
        on, off = get(on_name, field), get(off_name, field)
        # Only in runs that measured it: earlier results have no such row.
        if on is not None and off is not None:
            v = on / off
            add(f"{label} with authentication >= {M.AUTH_RATIO:.2f} x without it", v,
                f"{v:.3f} x ({on:,.0f} against {off:,.0f} {unit})", v >= M.AUTH_RATIO)
    n, i = (get("noop_tasks_subscribers_none", "jobs_per_s"),
            get("noop_tasks_subscribers_idle", "jobs_per_s"))
    v = ratio_of(i, n)
    if "idle_subscribers" in s:
        # (Runs from before the event stream have no such row.)
        add(f"{s['idle_subscribers']:,} idle event subscribers: no-op task jobs >= "
            f"{E.IDLE_SUBSCRIBERS_RATIO:.1f} x the rate without them", v,
            f"{v:.2f} x ({i:,.0f} against {n:,.0f} jobs/s)" if v else "",
            v is not None and v >= E.IDLE_SUBSCRIBERS_RATIO)
    for name in sorted(k for k in r if k.startswith("events_delivered_")):
        x = r[name]
        rows.append({
            "target": f"job events delivered to {x['subscribers']:,} subscriber"
                      f"{'s' if x['subscribers'] > 1 else ''} while no-op task jobs run",
            "value": x["events_per_s"],
            "measured": f"{x['events_per_s']:,.0f} events/s in all "
                        f"({x['events_per_s_each_median']:,.0f} each, median; "
                        f"{x['dropped']} dropped; jobs {x['jobs_per_s']:,.0f}/s)",
            "met": None, "no_target": True})
    if "events_latency" in r:
        x = r["events_latency"]
        rows.append({
            "target": "submit to its event (queued; succeeded), p50 / p99",
            "value": x["to_queued_ms"]["p50"],
            "measured": f"{x['to_queued_ms']['p50']:.1f} / {x['to_queued_ms']['p99']:.1f} ms; "
                        f"{x['to_succeeded_ms']['p50']:.1f} / "
                        f"{x['to_succeeded_ms']['p99']:.1f} ms",
            "met": None, "no_target": True})
    if "pg_noop_postgresql" in r:
        peer = best_peer(r)
        d = get("pg_noop_postgresql", "jobs_per_s")
        v = ratio_of(d, peer[1] if peer else None)
        add(f"no-op task jobs on PostgreSQL >= {M.PG_NOOP_TO_PEER:.0f} x the faster of "
            "pgqueuer and Procrastinate", v,
            f"{v:.2f} x ({d:,.0f} against {peer[0]}'s {peer[1]:,.0f} jobs/s)" if v and peer
            else "", v is not None and v >= M.PG_NOOP_TO_PEER)
    holds = all_holds(r)
    target = f"no callback holds the reactor over {M.REACTOR_HOLD_MS} ms"
    if holds:
        where, v = max(holds, key=lambda x: x[1])
        add(target, v, f"longest {v:.1f} ms ({where}; an upper bound)",
            v <= M.REACTOR_HOLD_MS)
    else:
        add(target, None, "", None)
    return rows


def auth_pairs(connections: int) -> list[tuple[str, str, str, str, str]]:
    """
    (j)'s comparisons: what is measured, the measure with authentication
    and the one without, the field compared and its unit.
    """
    return [
        (f"single submits at {connections} connections", f"submit_auth_{connections}c",
         f"submit_noauth_{connections}c", "requests_per_s", "requests/s"),
        ("no-op task jobs end to end", "noop_tasks_auth", "noop_tasks_noauth",
         "jobs_per_s", "jobs/s"),
    ]


def all_holds(measures: dict[str, Any]) -> list[tuple[str, float]]:
    """
    The daemon's longest reactor hold in each measure and each round.
    """
    out = []
    for name, m in measures.items():
        if "baseline" in name or not isinstance(m, dict) or "reactor_hold" not in m:
            continue
        out.append((name, m["reactor_hold"]["max_ms"]))
    for name, runs in measures.get("rounds", {}).items():
        if "baseline" in name:
            continue
        for i, run in enumerate(runs):
            if "reactor_hold" in run:  # not the peers of (l)
                out.append((f"{name} round {i + 1}", run["reactor_hold"]["max_ms"]))
    return out


def ratios(results: dict[str, Any]) -> dict[str, Any]:
    """
    The run's ratios, within the run: the dispatcher's submits over the
    baseline's at each number of connections, and each variant over the
    measure it varies.
    """
    settings = results["settings"]
    measures = results["measures"]
    c_max = max(settings["connections"])
    out: dict[str, Any] = {}
    for c in settings["connections"]:
        d = measures.get(f"submit_daemon_{c}c")
        b = measures.get(f"submit_baseline_{c}c")
        if d and b:
            out[f"submit_{c}c"] = {
                "requests_per_s": round(d["requests_per_s"] / b["requests_per_s"], 3),
                "latency_p50": round(d["latency_ms"]["p50"] / b["latency_ms"]["p50"], 3),
                "latency_p99": round(d["latency_ms"]["p99"] / b["latency_ms"]["p99"], 3),
            }
    pairs = (("submit_idle_to_daemon", f"submit_idle_{c_max}c", f"submit_daemon_{c_max}c",
              "requests_per_s"),
             ("submit_logged_to_daemon", f"submit_logged_{c_max}c",
              f"submit_daemon_{c_max}c", "requests_per_s"),
             ("submit_queued_to_daemon", f"submit_queued_{c_max}c", f"submit_daemon_{c_max}c",
              "requests_per_s"),
             ("claims_queued_to_seeded", "claims_queued", "claims_seeded",
              "left_queued_per_s"),
             ("noop_idle_to_noop", "noop_tasks_idle", "noop_tasks", "jobs_per_s"),
             ("noop_remote_to_noop", "noop_tasks_remote", "noop_tasks", "jobs_per_s"),
             ("noop_remote_noprefetch_to_noop", "noop_tasks_remote_noprefetch", "noop_tasks",
              "jobs_per_s"),
             ("commands_idle_to_commands", "true_commands_idle", "true_commands",
              "jobs_per_s"),
             ("submit_auth_to_noauth", f"submit_auth_{c_max}c", f"submit_noauth_{c_max}c",
              "requests_per_s"),
             ("noop_auth_to_noauth", "noop_tasks_auth", "noop_tasks_noauth", "jobs_per_s"),
             ("pg_submit_to_sqlite", f"pg_submit_postgresql_{c_max}c",
              f"pg_submit_sqlite_{c_max}c", "requests_per_s"),
             ("pg_batch_to_sqlite", "pg_batch_postgresql", "pg_batch_sqlite", "jobs_per_s"),
             ("pg_noop_to_sqlite", "pg_noop_postgresql", "pg_noop_sqlite", "jobs_per_s"),
             ("pg_two_to_one", "pg_noop_postgresql_two", "pg_noop_postgresql", "jobs_per_s"),
             ("pg_two_one_core_to_one", "pg_noop_postgresql_two_one_core",
              "pg_noop_postgresql", "jobs_per_s"))
    for key, a, b, field in pairs:
        if a in measures and b in measures:
            out[key] = round(measures[a][field] / measures[b][field], 3)
    # Per dispatcher core: the dispatcher's CPU a job of (b) over (i)'s.
    for key, remote in (("noop_remote_per_core", "noop_tasks_remote"),
                        ("noop_remote_noprefetch_per_core", "noop_tasks_remote_noprefetch")):
        here = measures.get("noop_tasks", {}).get("cpu", {}).get("server_cpu_us_per_job")
        there = measures.get(remote, {}).get("cpu", {}).get("server_cpu_us_per_job")
        if here and there:
            out[key] = round(here / there, 3)
    peer = best_peer(measures)
    if peer is not None and "pg_noop_postgresql" in measures:
        out["pg_noop_to_best_peer"] = round(
            measures["pg_noop_postgresql"]["jobs_per_s"] / peer[1], 3)
    return out


# The result tables


def mb(kib: float) -> float:
    """
    KiB (as /proc reports them) in MB of 10^6 bytes, the targets' unit.
    """
    return kib * 1024 / 1e6


def hold(measure: dict[str, Any]) -> str:
    """
    A measure's reactor hold as the tables show it: the maximum (the 99th
    percentile; the longest collection), in ms.
    """
    h = measure["reactor_hold"]
    return f"{h['max_ms']:.1f} ({h['p99_ms']:.1f}; GC {max(h['gc_max_ms']):.1f})"


def cpu_per_job(remote: dict[str, Any], local: Optional[dict[str, Any]]) -> str:
    """
    The dispatcher's and the workers' CPU a job of (i), and the daemon's of
    (b) beside it, as the row says them ("" for a run that did not keep
    them).
    """
    cpu = remote["cpu"]
    if "server_cpu_us_per_job" not in cpu:
        return ""
    text = f"dispatcher CPU {cpu['server_cpu_us_per_job']:,.0f} µs a job"
    if local is not None and "server_cpu_us_per_job" in local.get("cpu", {}):
        here = local["cpu"]["server_cpu_us_per_job"]
        text += (f" ({here:,.0f} µs in (b): per dispatcher core "
                 f"{ratio(here, cpu['server_cpu_us_per_job'])} × (b))")
    if "workers_cpu_us_per_job" in cpu:
        text += f", worker {cpu['workers_cpu_us_per_job']:,.0f} µs"
    return text + "; "


def ratio(a: float, b: float) -> str:
    """
    C{a / b} to two decimals, or C{n/a}.
    """
    return f"{a / b:.2f}" if b else "n/a"


def pretty(text: str) -> str:
    """
    A target as the page shows it.
    """
    return text.replace(">=", "≥").replace("<=", "≤").replace(" x ", " × ")


def verdict(row: Optional[dict[str, Any]]) -> str:
    """
    Whether a target row was met, in words.
    """
    if row is not None and row.get("no_target"):
        return "no target"
    if row is None or row["met"] is None:
        return "not measured"
    return "met" if row["met"] else "**missed**"


def _waited(results: dict[str, Any]) -> str:
    """
    How long the run waited for the file system, in words, if it did.
    """
    waited = results.get("waited_for_file_system_s", 0)
    return f" (after waiting {waited} s for it to settle)" if waited else ""


def _gc_line(measure: dict[str, Any]) -> str:
    """
    How many full (generation 2) collections a measure saw and how long
    they took in all.
    """
    h = measure["reactor_hold"]
    total = h.get("gc_total_ms", [0, 0, 0])[2]
    return (f"{h['gc_collections'][2]}, {total / 1000:.2f} s in all of "
            f"{h['window_s']:.0f} s, each at most {h['gc_max_ms'][2]:.0f} ms")


def markdown(results: dict[str, Any]) -> str:
    """
    The results of a run as markdown: the run and the machine, the
    targets table, then the result tables.
    """
    m = results["machine"]
    s = results["settings"]
    r = results["measures"]
    goals = {row["target"]: row for row in results["targets"]}

    def goal(prefix: str) -> str:
        row = next((g for t, g in goals.items() if t.startswith(prefix)), None)
        if row is None:
            return ""
        shown = row["target"].split(prefix, 1)[1].strip() or row["target"]
        if prefix.endswith(">="):
            shown = ">= " + shown
        return f"{pretty(shown)}: {verdict(row)}"

    idle = f"{s['idle_connections']:,}"
    queued = f"{s['queued_jobs']:,}"
    c_max = max(s["connections"])
    lines = [
        f"Run of {m['date']}{' (--quick)' if s['quick'] else ''}: {m['cpu']}, "
        f"{m['cores']} cores, {m['ram_gib']} GiB RAM, Linux {m['kernel']}, "
        f"Python {m['python']}, Twisted {m['twisted']}, {m['wrk']}; data dir on "
        f"{m['data_dir_filesystem']}; open files {results['open_files']['soft']:,}. "
        f"Sources of `dispatcher/`: sha256 {results['code']['dispatcher_sha256']}, newest "
        f"change {results['code']['newest_source_change']}"
        f"{' (and they changed during the run)' if 'code_changed_during_run' in results else ''}. "
        f"Server on core {SERVER_CORE}, load on core {LOAD_CORE}. Before the run, core "
        f"{SERVER_CORE} was {results['background_busy_pct'][f'cpu{SERVER_CORE}']:.0f} % and "
        f"core {LOAD_CORE} {results['background_busy_pct'][f'cpu{LOAD_CORE}']:.0f} % busy "
        f"with other work, and creating a directory in the data dir's file system took "
        f"{results['directory_cost']['mkdir_us']:.0f} µs, a file "
        f"{results['directory_cost']['create_us']:.0f} µs"
        f"{_waited(results)}. The whole run took "
        f"{results['total_seconds'] / 60:.1f} min.",
        "",
        "### Against the targets",
        "",
        "| Target | Measured | |",
        "| --- | --- | --- |",
    ]
    for row in results["targets"]:
        lines.append(f"| {pretty(row['target'])} | {pretty(row['measured']) or '–'} | "
                     f"{verdict(row)} |")

    lines += [
        "",
        "### Submitting (a, g, h)",
        "",
        f"`POST /v1/jobs` with `{{\"command\":[\"true\"]}}`, wrk for "
        f"{s['submit_seconds']:g} s a round, {s['submit_rounds']} round(s), each round "
        "taking the rows in turn; each row is its median round (the range of all rounds in "
        "brackets). The daemon has `slots = 0`, so every job stays queued; each round "
        "starts a fresh daemon. Ratio: to the baseline, and for the (a'), (g) and (h) rows "
        "to the plain dispatcher, of the same run.",
        "",
        "| Connections | | Requests/s | p50 ms | p99 ms | 201s | Other status | "
        "Server CPU % | Daemon RSS MB (peak) | Reactor hold ms: max (p99; longest GC) |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def submit_row(c: int, label: str, x: dict[str, Any]) -> str:
        spread = ""
        if len(x["rounds_requests_per_s"]) > 1:
            spread = (f" ({min(x['rounds_requests_per_s']):,.0f}–"
                      f"{max(x['rounds_requests_per_s']):,.0f})")
        memory = f"{mb(x['memory']['vmhwm_kib']):,.0f}" if "memory" in x else ""
        return (f"| {c} | {label} | {x['requests_per_s']:,.0f}{spread} | "
                f"{x['latency_ms']['p50']:.2f} | {x['latency_ms']['p99']:.2f} | "
                f"{x['created_201']:,} | "
                f"{x['other_status'] + sum(x['socket_errors'].values())} | "
                f"{x['cpu']['server_process_pct']:.0f} | {memory} | {hold(x)} |")

    def ratio_row(c: int, label: str, a: dict[str, Any], b: dict[str, Any]) -> str:
        return (f"| {c} | **{label}** | **{ratio(a['requests_per_s'], b['requests_per_s'])}** "
                f"| {ratio(a['latency_ms']['p50'], b['latency_ms']['p50'])} | "
                f"{ratio(a['latency_ms']['p99'], b['latency_ms']['p99'])} | | | | | |")

    for c in s["connections"]:
        d, b = r.get(f"submit_daemon_{c}c"), r.get(f"submit_baseline_{c}c")
        if d is None or b is None:
            continue
        lines.append(submit_row(c, "dispatcher", d))
        lines.append(submit_row(c, "baseline", b))
        lines.append(ratio_row(c, "ratio", d, b))
        for variant, label in (("logged", "(a') dispatcher with its access log"),
                               ("idle", f"(g) dispatcher, {idle} idle connections open"),
                               ("queued", f"(h) dispatcher, {queued} jobs queued")):
            x = r.get(f"submit_{variant}_{c}c")
            if x is not None:
                lines.append(submit_row(c, label, x))
                lines.append(ratio_row(c, f"{label.split(' ', 1)[0]} ratio to the dispatcher",
                                       x, d))

    base_submit = r.get(f"submit_baseline_{c_max}c", {}).get("requests_per_s")
    lines += [
        "",
        "### Running jobs (b to e)",
        "",
        "| Measure | Result | Target | Detail | Reactor hold ms: max (p99; longest GC) |",
        "| --- | ---: | --- | --- | ---: |",
    ]

    def against(x: dict[str, Any], name: str, label: str) -> str:
        # "; N × (label)" when this run has the measure C{name} to compare with.
        if name not in r:
            return ""
        return f"; {ratio(x['jobs_per_s'], r[name]['jobs_per_s'])} × {label}"

    def idle_row(name: str, like: str, base: str, what: str) -> None:
        # A (g) row: the measure C{base} again with idle connections open.
        if name not in r:
            return
        x = r[name]
        lines.append(
            f"| (g) the same as {like} with {x['idle']['connections']:,} idle connections "
            f"open | **{x['jobs_per_s']:,.0f} jobs/s** | {goal(what)} | "
            f"{x['elapsed_s']:.1f} s; submitting took {x['submit_s']:.1f} s"
            f"{against(x, base, like)}; "
            f"{x['idle']['still_open_after']:,} still open at the end | {hold(x)} |")

    if "noop_tasks" in r:
        x = r["noop_tasks"]
        vs = (f"; {ratio(x['jobs_per_s'], base_submit)} × the baseline's {c_max}-connection "
              "requests/s") if base_submit else ""
        lines.append(
            f"| (b) {x['jobs']:,} no-op task jobs end to end, slots = threads = "
            f"{x['slots']}, {x['client_concurrency']} client connections | "
            f"**{x['jobs_per_s']:,.0f} jobs/s** | {goal('no-op task jobs >=')} | "
            f"{x['elapsed_s']:.1f} s; submitting alone took {x['submit_s']:.1f} s "
            f"({x['submits_per_s']:,.0f}/s, dispatcher process "
            f"{x['cpu_while_submitting']['server_process_pct']:.0f} % of a core){vs} | "
            f"{hold(x)} |")
    batched = f"no-op task jobs submitted in batches of {s['batch_size']:,}"
    if "noop_tasks_batched" in r:
        x = r["noop_tasks_batched"]
        lines.append(
            f"| (b'') the same as (b), submitted {x['batch']:,} jobs a request "
            f"(`POST /v1/jobs/batch`) from {x['client_concurrency']} client connections | "
            f"**{x['jobs_per_s']:,.0f} jobs/s** | {goal(f'{batched} >=')} | "
            f"{x['elapsed_s']:.1f} s; submitting took {x['submit_s']:.1f} s "
            f"({x['submits_per_s']:,.0f} jobs/s){against(x, 'noop_tasks', '(b)')}; "
            f"dispatcher process {x['cpu']['server_process_pct']:.0f} % of a core | "
            f"{hold(x)} |")
    if "noop_tasks_small" in r:
        x = r["noop_tasks_small"]
        lines.append(
            f"| (b') the same with {x['jobs']:,} jobs | **{x['jobs_per_s']:,.0f} jobs/s** | | "
            f"{x['elapsed_s']:.1f} s; submitting took {x['submit_s']:.1f} s | {hold(x)} |")
    for key, what in (("noop_tasks_remote", "(i) the same as (b)"),
                      ("noop_tasks_remote_noprefetch", "(i') the same as (i), `--prefetch 0`")):
        if key not in r:
            continue
        x = r[key]
        w = x["remote"]
        local = r["noop_tasks"]["jobs_per_s"] if "noop_tasks" in r else None
        vs = (f"≥ {M.REMOTE_TO_LOCAL} × (b): "
              f"{'met' if x['jobs_per_s'] >= M.REMOTE_TO_LOCAL * local else '**missed**'}, "
              f"{ratio(x['jobs_per_s'], local)} × (b) of this run"
              if local and key == "noop_tasks_remote" else
              f"{ratio(x['jobs_per_s'], local)} × (b) of this run" if local else "")
        sizes = ", ".join(f"{n}: {k:,}" for n, k in sorted(
            w["lease_answer_sizes"].items(), key=lambda kv: int(kv[0])))
        lines.append(
            f"| {what} through {w['workers']} remote worker"
            f"{'s' if w['workers'] > 1 else ''} (`dispatcher worker --slots "
            f"{w['worker_slots']}`, {w['worker_threads']} task threads, "
            # A run from before prefetch records none, and had none.
            f"{'prefetch %d, ' % w['worker_prefetch'] if 'worker_prefetch' in w else ''}on core "
            f"{w['worker_core']}), the dispatcher with `slots = 0` | "
            f"**{x['jobs_per_s']:,.0f} jobs/s** | {vs} | "
            f"{x['elapsed_s']:.1f} s; submitting took {x['submit_s']:.1f} s "
            f"({x['submits_per_s']:,.0f}/s); {w['lease_answers']:,} lease answers, "
            f"{w['jobs_per_lease_answer']} jobs each on average (jobs: answers {sizes}); "
            f"{cpu_per_job(x, r.get('noop_tasks'))}"
            f"dispatcher process {x['cpu']['server_process_pct']:.0f} % of a core, "
            f"worker{'s' if w['workers'] > 1 else ''} "
            f"{x['cpu']['workers_process_pct']:.0f} %, core {LOAD_CORE} "
            f"{x['cpu']['load_core_busy_pct']:.0f} % busy | {hold(x)} |")
    idle_row("noop_tasks_idle", "(b)", "noop_tasks",
             f"no-op task jobs, {idle} idle connections open >=")
    idle_row("noop_tasks_batched_idle", "(b'')", "noop_tasks_batched",
             f"{batched}, {idle} idle connections open >=")
    if "true_commands" in r:
        x = r["true_commands"]
        lines.append(
            f"| (c) {x['jobs']:,} `true` command jobs end to end, slots = {x['slots']}, "
            f"{x['client_concurrency']} client connections | "
            f"**{x['jobs_per_s']:,.0f} jobs/s** | {goal('`true` command jobs >=')} | "
            f"{x['elapsed_s']:.1f} s; submitting took {x['submit_s']:.1f} s; core "
            f"{SERVER_CORE} {x['cpu']['server_core_busy_pct']:.0f} % busy, the dispatcher "
            f"process {x['cpu']['server_process_pct']:.0f} % | {hold(x)} |")
    idle_row("true_commands_idle", "(c)", "true_commands",
             f"`true` command jobs, {idle} idle connections open >=")
    if "start_latency" in r:
        x = r["start_latency"]
        p50, p99 = (f"submit-to-start p50 <= {M.START_P50_MS} ms",
                    f"submit-to-start p99 <= {M.START_P99_MS} ms")
        lines.append(
            f"| (d) submit-to-start with free slots, {x['jobs']} `date` jobs one at a time | "
            f"**p50 {x['from_201_ms']['p50']:.1f} ms, p99 {x['from_201_ms']['p99']:.1f} ms** "
            f"| p50 ≤ {M.START_P50_MS} ms: {verdict(goals.get(p50))}; p99 ≤ "
            f"{M.START_P99_MS} ms: {verdict(goals.get(p99))} | "
            f"the job's own clock minus the client's receipt of the 201 "
            f"(from sending the request: p50 {x['from_send_ms']['p50']:.1f}, "
            f"p99 {x['from_send_ms']['p99']:.1f} ms) | {hold(x)} |")
    if "blocking_tasks" in r:
        x = r["blocking_tasks"]
        lines.append(
            f"| (e) five `block` tasks of {x['task_seconds']:g} s, threads = slots = 5 | "
            f"**{x['elapsed_s']:.3f} s** | {goal('five blocking 1 s tasks')} | "
            f"`/healthz` meanwhile: {x['healthz']['requests']} "
            f"answers, max {x['healthz']['max_ms']:.1f} ms, p99 "
            f"{x['healthz']['p99_ms']:.1f} ms | {hold(x)} |")

    lines += [
        "",
        "### At scale (f to h)",
        "",
        "| Measure | Result | Target | Detail | Reactor hold ms: max (p99; longest GC) |",
        "| --- | ---: | --- | --- | ---: |",
    ]
    lines += _scale_rows(results, goal)
    lines += _auth_rows(results, goal)
    lines += pg_rows(results, goal)
    return "\n".join(lines) + "\n"


def _auth_rows(results: dict[str, Any], goal: Any) -> list[str]:
    """
    The authentication table (j), if the run measured it: each side's
    median round (the range of its rounds), and the ratio.
    """
    r = results["measures"]
    c = max(results["settings"]["connections"])
    pairs = [(label, r[on_name], r[off_name], field, unit)
             for label, on_name, off_name, field, unit in auth_pairs(c)
             if on_name in r and off_name in r]
    if not pairs:
        return []
    lines = [
        "",
        "### Authentication (j)",
        "",
        "| Measure | With authentication | Without | Ratio | Target | "
        "Reactor hold ms with: max (p99; longest GC) |",
        "| --- | ---: | ---: | ---: | --- | ---: |",
    ]

    def shown(x: dict[str, Any], field: str, unit: str) -> str:
        values = x.get(f"rounds_{field}", [])
        spread = (f" ({min(values):,.0f}–{max(values):,.0f})" if len(values) > 1 else "")
        return f"{x[field]:,.0f} {unit}{spread}"

    for label, on, off, field, unit in pairs:
        target = goal(f"{label} with authentication >=")
        lines.append(
            f"| (j) {label} | {shown(on, field, unit)} | {shown(off, field, unit)} | "
            f"**{ratio(on[field], off[field])}** | {target} | {hold(on)} |")
    return lines


def _scale_rows(results: dict[str, Any], goal: Any) -> list[str]:
    """
    The rows of the at-scale table: (f) batch submission, (g) idle
    connections during submits, (h) a long queue's start, memory, submits
    and claims.
    """
    s = results["settings"]
    r = results["measures"]
    goals = {row["target"]: row for row in results["targets"]}
    idle = f"{s['idle_connections']:,}"
    queued = f"{s['queued_jobs']:,}"
    c_max = max(s["connections"])
    rounds = r.get("rounds", {})
    lines = []
    if "batch" in r:
        f_ = r["batch"]
        lines.append(
            f"| (f) batch submission: `POST /v1/jobs/batch`, {f_['batch_size']:,} distinct "
            f"`true` jobs a request, {f_['client_concurrency']} client connections, "
            f"{f_['seconds']:g} s | **{f_['jobs_per_s']:,.0f} jobs/s** | "
            f"{goal('batch submission')} | {f_['requests']:,} requests in "
            f"{f_['elapsed_s']:.1f} s, each p50 {f_['request_ms']['p50']:.0f} ms, p99 "
            f"{f_['request_ms']['p99']:.0f} ms; {f_['jobs_stored']:,} jobs stored (counted "
            f"through `GET /v1/queues`), as many as acknowledged; dispatcher process "
            f"{f_['cpu']['server_process_pct']:.0f} % of a core | {hold(f_)} |")
    i, d = r.get(f"submit_idle_{c_max}c"), r.get(f"submit_daemon_{c_max}c")
    if i is not None and d is not None:
        runs = rounds.get(f"submit_idle_{c_max}c", [])
        peak = max(mb(x["memory"]["vmhwm_kib"]) for x in runs)
        before = median([mb(x["memory_at_start"]["vmrss_kib"]) for x in runs])
        held = median([mb(x["idle"]["memory_with_idle"]["vmrss_kib"]) for x in runs])
        opened = median([x["idle"]["open_s"] for x in runs])
        still = min(x["idle"]["still_open_after"] for x in runs)
        rate = f"{idle} idle connections: submit rate >= {M.IDLE_SUBMIT_RATIO} x without them"
        rss = f"{idle} idle connections: daemon RSS < {M.IDLE_RSS_MB} MB"
        lines.append(
            f"| (g) {idle} idle keep-alive connections (each sent one `GET /healthz`) held "
            f"during {c_max}-connection submits | **{ratio(i['requests_per_s'], d['requests_per_s'])} "
            f"× the submit rate without them; RSS peak {peak:,.0f} MB** | "
            f"rate ≥ {M.IDLE_SUBMIT_RATIO} ×: {verdict(goals.get(rate))}; "
            f"RSS < {M.IDLE_RSS_MB} MB: {verdict(goals.get(rss))} | "
            f"{i['requests_per_s']:,.0f} against {d['requests_per_s']:,.0f} submits/s "
            f"(medians); RSS {before:,.0f} MB before opening them, {held:,.0f} MB with them "
            f"open (opened in {opened:.1f} s from the load core), at least {still:,} of "
            f"{idle} still open after the submits; full collections "
            f"{_gc_line(i)} in the median round (without them: {_gc_line(d)}) | {hold(i)} |")
    q = r.get(f"submit_queued_{c_max}c")
    if q is not None and d is not None:
        runs = rounds.get(f"submit_queued_{c_max}c", [])
        empty = rounds.get(f"submit_daemon_{c_max}c", [])
        peak = max(mb(x["memory"]["vmhwm_kib"]) for x in runs)
        ready = f"{queued} queued: serving within {M.QUEUED_READY_S} s of start"
        rss = f"{queued} queued: daemon RSS < {M.QUEUED_RSS_MB} MB"
        rate = f"{queued} queued: submit rate >= {M.QUEUED_SUBMIT_RATIO} x an empty store"
        lines.append(
            f"| (h) {queued} jobs queued (no-op tasks), `slots = 0`: start, memory and "
            f"{c_max}-connection submits | **serving after "
            f"{median([x['ready_s'] for x in runs]):.2f} s; RSS peak {peak:,.0f} MB; "
            f"{ratio(q['requests_per_s'], d['requests_per_s'])} × the submit rate of an empty "
            f"store** | serving ≤ {M.QUEUED_READY_S} s: {verdict(goals.get(ready))}; "
            f"RSS < {M.QUEUED_RSS_MB} MB: {verdict(goals.get(rss))}; "
            f"rate ≥ {M.QUEUED_SUBMIT_RATIO} ×: {verdict(goals.get(rate))} | "
            f"from starting the process to the first `200` of `GET /healthz` (median of "
            f"{len(runs)}; an empty store: {median([x['ready_s'] for x in empty]):.2f} s); "
            f"RSS once serving {median([mb(x['memory_at_start']['vmrss_kib']) for x in runs]):,.0f} MB "
            f"(an empty store: {median([mb(x['memory_at_start']['vmrss_kib']) for x in empty]):,.0f} MB); "
            f"{q['requests_per_s']:,.0f} against {d['requests_per_s']:,.0f} submits/s "
            f"(medians); the store was built in {results['seeds']['queued']['seconds']:.0f} s "
            f"({results['seeds']['queued']['bytes'] / 1e6:,.0f} MB) | {hold(q)} |")
    cq, cs = r.get("claims_queued"), r.get("claims_seeded")
    if cq is not None and cs is not None:
        runs_q = rounds.get("claims_queued", [cq])
        runs_s = rounds.get("claims_seeded", [cs])

        def spread(x: dict[str, Any]) -> str:
            values = x.get("rounds_left_queued_per_s", [])
            return (f" ({min(values):,.0f}–{max(values):,.0f})" if len(values) > 1 else "")

        lines.append(
            f"| (h) jobs leaving `queued` (claimed and started) with {queued} queued, "
            f"slots = threads = 8, no-op tasks, {cq['window_s']:.0f} s window after 1 s of "
            f"running, {len(runs_q)} round(s) alternating with {cs['store_jobs']:,} queued | "
            f"**{cq['left_queued_per_s']:,.0f} jobs/s{spread(cq)}, "
            f"{ratio(cq['left_queued_per_s'], cs['left_queued_per_s'])} × with "
            f"{cs['store_jobs']:,} queued** | "
            f"{goal(f'{queued} queued: claim/start rate >=')} | "
            f"{cs['left_queued_per_s']:,.0f} jobs/s{spread(cs)} with {cs['store_jobs']:,} "
            f"queued (medians); serving after at most "
            f"{max(x['ready_s'] for x in runs_q):.2f} s (against "
            f"{max(x['ready_s'] for x in runs_s):.2f} s), RSS peak "
            f"{max(mb(x['memory']['vmhwm_kib']) for x in runs_q):,.0f} MB (against "
            f"{max(mb(x['memory']['vmhwm_kib']) for x in runs_s):,.0f} MB); dispatcher "
            f"process {cq['cpu']['server_process_pct']:.0f} % of a core (against "
            f"{cs['cpu']['server_process_pct']:.0f} %) | {hold(cq)} |")
    return lines


def pg_rows(results: dict[str, Any], goal: Any) -> list[str]:
    """
    (l)'s tables, if the run measured it: the rates on each engine and
    of the peers (median round, the range of the rounds), their ratios,
    and what a job cost on each side (of the median round).
    """
    r = results["measures"]
    c = max(results["settings"]["connections"])
    if not any(key.startswith("pg_") for key in r):
        return []

    def spread(x: dict[str, Any], field: str) -> str:
        values = x.get(f"rounds_{field}", [])
        return f" ({min(values):,.0f}–{max(values):,.0f})" if len(values) > 1 else ""

    def rate(name: str, field: str) -> str:
        x = r.get(name)
        return f"{x[field]:,.0f}{spread(x, field)}" if x else "–"

    def ratio_to(a: str, b: str, field: str) -> str:
        return ratio(r[a][field], r[b][field]) if a in r and b in r else "–"

    lines = [
        "",
        "### PostgreSQL (l)",
        "",
        f"Each figure is the median of {results['settings']['pg_rounds']} alternating "
        "round(s) (the range of the rounds in brackets).",
        "",
        "| Measure | SQLite | PostgreSQL | PostgreSQL / SQLite |",
        "| --- | ---: | ---: | ---: |",
        f"| (a) single submits/s, {c} connections | {rate(f'pg_submit_sqlite_{c}c', 'requests_per_s')} "
        f"| {rate(f'pg_submit_postgresql_{c}c', 'requests_per_s')} | "
        f"**{ratio_to(f'pg_submit_postgresql_{c}c', f'pg_submit_sqlite_{c}c', 'requests_per_s')}** |",
        f"| (f) batch submission, jobs/s | {rate('pg_batch_sqlite', 'jobs_per_s')} | "
        f"{rate('pg_batch_postgresql', 'jobs_per_s')} | "
        f"**{ratio_to('pg_batch_postgresql', 'pg_batch_sqlite', 'jobs_per_s')}** |",
        f"| (b'') no-op task jobs/s, one dispatcher | {rate('pg_noop_sqlite', 'jobs_per_s')} | "
        f"{rate('pg_noop_postgresql', 'jobs_per_s')} | "
        f"**{ratio_to('pg_noop_postgresql', 'pg_noop_sqlite', 'jobs_per_s')}** |",
        "",
        "| No-op task jobs, batches of 1,000 | Jobs/s | × one dispatcher on PostgreSQL | "
        "Jobs each ran (submitted to each) |",
        "| --- | ---: | ---: | --- |",
    ]
    for key, (label, engine, cores) in NOOP_ROWS.items():
        if key not in r or engine is None:
            continue
        x = r[key]
        ran = ", ".join(f"{n:,}" for n in x.get("ran_by", {}).values())
        lines.append(f"| {label} (cores {', '.join(map(str, cores))}) | "
                     f"{rate(key, 'jobs_per_s')} | "
                     f"{ratio_to(key, 'pg_noop_postgresql', 'jobs_per_s')} | "
                     f"{ran} ({', '.join(f'{n:,}' for n in x['submitted_to'])}) |")
    for key, peer in PEER_ROWS.items():
        if key in r:
            lines.append(f"| {peer} | {rate(key, 'jobs_per_s')} | "
                         f"{ratio_to(key, 'pg_noop_postgresql', 'jobs_per_s')} | one worker |")
    primitives = r.get("pg_server_primitives", {})
    if primitives:
        lines += ["", "The server's primitives, from the harness (p50 / p99 µs), "
                  + "; ".join(
                      f"{when} the section: round trip {x['round_trip']['p50_us']:.0f} / "
                      f"{x['round_trip']['p99_us']:.0f}, one-row commit waiting for the disk "
                      f"{x['commit_synchronous_on']['p50_us']:.0f} / "
                      f"{x['commit_synchronous_on']['p99_us']:.0f}, not waiting "
                      f"{x['commit_synchronous_off']['p50_us']:.0f} / "
                      f"{x['commit_synchronous_off']['p99_us']:.0f}"
                      for when, x in primitives.items()) + "."]
    target = goal(f"no-op task jobs on PostgreSQL >= {M.PG_NOOP_TO_PEER:.0f} x")
    if target:
        lines += ["", f"Target, one dispatcher on PostgreSQL ≥ {M.PG_NOOP_TO_PEER:.0f} × the "
                  f"faster peer: {target}."]
    lines += [
        "",
        "What a job cost (the median round of each; a submit is a job; the WAL is the "
        "whole server's, with other databases' commits meanwhile in the last column):",
        "",
        "| Measure | Dispatcher (worker) CPU µs | Round trips | Writer commits | "
        "Group ms (of it waiting for BEGIN and the lock) | "
        "Transactions | Rows written (ins/upd/del) | WAL bytes | WAL syncs | "
        "Backend CPU µs | Other databases' commits |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    names = [(f"pg_submit_{e}_{c}c", f"(a) single submits, {e}") for e in ("sqlite", "postgresql")]
    names += [(f"pg_batch_{e}", f"(f) batch submits, {e}") for e in ("sqlite", "postgresql")]
    names += [(key, f"(b'') {label}") for key, (label, _, _) in NOOP_ROWS.items()]
    names += [(key, f"(b'') {peer}") for key, peer in PEER_ROWS.items()]

    def cell(d: dict[str, Any], key: str, form: str) -> str:
        return format(d[key], form) if key in d else "–"

    for key, label in names:
        if key not in r:
            continue
        j = r[key].get("per_job", {})
        cpu = j.get("dispatcher_cpu_us", j.get("worker_cpu_us"))
        rows = (f"{j['rows_written']:.2f} ({j['rows_inserted']:.2f}/{j['rows_updated']:.2f}/"
                f"{j['rows_deleted']:.2f})" if "rows_written" in j else "–")
        other = r[key].get("postgresql", {}).get("other_databases_commits")
        lines.append(
            f"| {label} | {cpu:,.0f} | {cell(j, 'round_trips', '.2f')} | "
            f"{cell(j, 'writer_commits', '.3f')} | "
            + (f"{j['group_ms']:.2f} ({j['group_begin_ms']:.2f}) | " if "group_ms" in j
               else "– | ")
            + f"{cell(j, 'transactions', '.3f')} | {rows} | "
            f"{cell(j, 'wal_bytes', ',.0f')} | {cell(j, 'wal_syncs', '.3f')} | "
            f"{cell(j, 'backend_cpu_us', ',.0f')} | {'–' if other is None else f'{other:,}'} |")
    return lines


# The page


def page(results: dict[str, Any], steps: tuple[str, ...]) -> str:
    """
    docs/benchmarks.md, whole: the method, then the results of C{results}.
    """
    return (method(steps) + "## Results\n\n"
            "The latest full run, as `bench/run.py` wrote it (its JSON is "
            "`docs/benchmarks.json`).\n\n" + markdown(results))


def write_docs(results: dict[str, Any], steps: tuple[str, ...],
               text: Optional[str] = None) -> None:
    """
    Write docs/benchmarks.md from C{results} and, with C{text} (the
    results as JSON), docs/benchmarks.json.
    """
    DOCS.write_text(page(results, steps), encoding="utf-8")
    if text is not None:
        DOCS_JSON.write_text(text, encoding="utf-8")


def main(argv: Optional[list[str]] = None) -> int:
    """
    Rewrite docs/benchmarks.md from a results file.
    """
    parser = argparse.ArgumentParser(
        description="Rewrite docs/benchmarks.md from a full run's results.")
    parser.add_argument("results", nargs="?", default=str(DOCS_JSON),
                        help="a results JSON of bench/run.py (default: docs/benchmarks.json)")
    args = parser.parse_args(argv)
    source = Path(args.results)
    text = source.read_text(encoding="utf-8")
    results = json.loads(text)
    same = source.resolve() == DOCS_JSON.resolve()
    write_docs(results, M.STEPS, None if same else text)
    print(f"bench: wrote {DOCS.relative_to(ROOT)}"
          + ("" if same else f" and {DOCS_JSON.relative_to(ROOT)}"), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
