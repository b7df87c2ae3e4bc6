"""
The dispatcher under benchmark: the real service, built as
C{twistd dispatcher --config FILE} builds it, plus a bench-only
reactor-hold monitor (see L{bench.monitor}) on its own loopback port.

    python -m bench.daemon --port N --monitor-port N --data-dir DIR
                           [--slots N] [--threads N] [--backlog N]
                           [--access-log] [--workers-token-file FILE]
                           [--authentication required|off]
                           [--store-url postgresql://...]

It listens with a backlog of 4096 (Twisted's default is 50), so that
thousands of clients may connect at once.  With C{--workers-token-file} it
takes remote workers (C{[workers] token_file}); with C{--slots 0} as well it
is a pure dispatcher that runs nothing itself.  Clients need a credential
(the admin token the daemon makes in C{DATA_DIR/var/admin.token}), as
they do by default, unless C{--authentication off}.  Its ini file is
written in one place, L{write_config} from L{CONFIG}: a key the
benchmark's daemon should have goes there.

With C{--store-url} its jobs live in that PostgreSQL database (C{[store]
url}), and every exchange with the server that a psycopg connection of
the daemon waits for (a statement, a commit, a fetch of a cursor: a
round trip) is counted, bench-only, by wrapping C{psycopg.Connection.wait}
in this process (L{count_round_trips}); the monitor reports the total as
C{pg_round_trips}, and the store's commits as C{store_commits}.  The
PostgreSQL writer's groups are timed the same way (L{time_groups}): the
microseconds its groups took from their C{BEGIN} to their commit's answer
(C{pg_group_us}), and of that their first round trip, which waits for the
write lock that every dispatcher's groups take in turn (C{pg_begin_us}).

Its log (C{DATA_DIR/daemon.log}) is written by the observer the daemon's
text log uses under twistd (L{dispatcher.app._logging.text_observer}),
at every level.

This is the only place of the benchmark that touches the global reactor.
"""

from __future__ import annotations

import argparse
import os
import sys

if not __package__:  # run as a file: make "bench" importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.logger import globalLogBeginner

from bench.tasks import TASKS_SECTION
from dispatcher.app._logging import text_observer

# The daemon's whole configuration in the benchmark: every key the
# benchmark sets is here, and nowhere else (L{write_config} writes it; the
# method in docs/benchmarks.md shows it).
CONFIG = """\
[server]
listen = tcp:{port}:interface=127.0.0.1:backlog={backlog}
access_log = {access_log}
# Every client of the benchmark comes from 127.0.0.1, the 10,000 idle
# connections (g) too: more than the derived quarter of the connections.
max_connections_per_address = 65536

[api]
authentication = {authentication}

[dispatcher]
data_dir = {data_dir}
shutdown_grace = 2
gc_freeze = yes

[executor]
slots = {slots}
threads = {threads}

""" + TASKS_SECTION + "{workers}{store}"

WORKERS = """
[workers]
token_file = {token_file}
"""

STORE = """
[store]
url = {url}
"""


def config_text(port, data_dir, slots, threads, backlog=4096, access_log=False,
                workers_token_file=None, authentication=True, store_url=None) -> str:
    """
    The ini file the daemon is started from: L{CONFIG} filled in.

    @param access_log: whether the daemon writes its access log (it does
        by default; the benchmark turns it off but in (a')).
    @param workers_token_file: with a path, the daemon takes remote
        workers that send the token in that file.
    @param authentication: whether clients need a credential (they do by
        default; the benchmark turns it off in (j) alone, to measure its
        cost).
    @param store_url: with a PostgreSQL URL, the daemon's store (the
        benchmark's PostgreSQL section, L{bench.pg_measures}).
    """
    return CONFIG.format(
        port=port,
        data_dir=data_dir,
        slots=slots,
        threads=threads,
        backlog=backlog,
        access_log="yes" if access_log else "no",
        authentication="required" if authentication else "off",
        workers=(WORKERS.format(token_file=workers_token_file)
                 if workers_token_file else ""),
        store=STORE.format(url=store_url) if store_url else "",
    )


def write_config(args) -> str:
    """
    Write the daemon's ini file into its data directory, from the command
    line's C{args}; returns its path.  The one place the benchmark's daemon
    configuration is written.
    """
    os.makedirs(args.data_dir, exist_ok=True)
    config_path = os.path.join(args.data_dir, "bench.ini")
    with open(config_path, "w", encoding="utf-8") as f:
        f.write(config_text(
            port=args.port,
            data_dir=os.path.join(args.data_dir, "var"),
            slots=args.slots,
            threads=args.threads,
            backlog=args.backlog,
            access_log=args.access_log,
            workers_token_file=args.workers_token_file,
            authentication=args.authentication == "required",
            store_url=args.store_url,
        ))
    return config_path


def count_round_trips():
    """
    Count every wait of a psycopg connection of this process for the
    server from now on (each statement, commit, rollback and fetch of a
    server-side cursor waits once: a round trip; a pipelined
    C{executemany} waits once for its whole pipeline); returns a function
    that reads the count.  Bench-only: the dispatcher does not count its
    round trips, and the cost here (one Python call a round trip) is small
    beside the round trip itself.
    """
    import threading

    import psycopg

    lock = threading.Lock()
    seen = [0]
    wait = psycopg.Connection.wait

    def counted(self, *args, **kwargs):
        # The writer's thread and the readers' count into one total.
        with lock:
            seen[0] += 1
        return wait(self, *args, **kwargs)

    psycopg.Connection.wait = counted
    return lambda: seen[0]


def time_groups():
    """
    Time the PostgreSQL writer's groups (C{PostgresGroupWriter._commit}:
    from the group's start to its commit's answer) and their first round
    trip (C{_begin}: the transaction and the write lock), in total
    microseconds; returns the counters' readers by name (none if the
    writer has no such methods).  Bench-only, as L{count_round_trips}.
    """
    import time

    from dispatcher.store import _postgres

    writer = getattr(_postgres, "PostgresGroupWriter", None)
    totals = {"pg_group_us": 0, "pg_begin_us": 0}
    for name, key in (("_commit", "pg_group_us"), ("_begin", "pg_begin_us")):
        method = getattr(writer, name, None)
        if method is None:
            return {}

        def timed(self, *args, _method=method, _key=key, **kwargs):
            # One writer thread: no lock needed.
            began = time.perf_counter()
            try:
                return _method(self, *args, **kwargs)
            finally:
                totals[_key] += int(1e6 * (time.perf_counter() - began))

        setattr(writer, name, timed)
    return {key: (lambda key=key: totals[key]) for key in totals}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--monitor-port", type=int, required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--backlog", type=int, default=4096)
    parser.add_argument("--access-log", action="store_true",
                        help="write the access log, as the daemon does by default")
    parser.add_argument("--workers-token-file", default=None,
                        help="take remote workers that send the token in this file")
    parser.add_argument("--authentication", choices=("required", "off"), default="required",
                        help="[api] authentication: whether clients need a credential")
    parser.add_argument("--store-url", default=None,
                        help="[store] url: keep the jobs in this PostgreSQL database")
    args = parser.parse_args(argv)

    config_path = write_config(args)
    log_file = open(os.path.join(args.data_dir, "daemon.log"), "a", encoding="utf-8")
    globalLogBeginner.beginLoggingTo(
        [text_observer(log_file)], redirectStandardIO=False
    )

    from twisted.internet import reactor

    from bench.monitor import install_monitor
    from dispatcher.app.tap import Options, makeService

    # What twistd does with the plugin: parse the options, make the
    # service, start it, and stop it before the reactor shuts down.
    options = Options()
    options.parseOptions(["--config", config_path])
    service = makeService(options)
    monitor = install_monitor(reactor, args.monitor_port)
    # The store's commits so far, in every snapshot: how many jobs a commit
    # holds is what the writer thread's cost per job turns on.
    monitor.counters["store_commits"] = lambda: service.store.batches
    monitor.counters["store_durable_commits"] = lambda: service.store.durable_batches
    if args.store_url:
        monitor.counters["pg_round_trips"] = count_round_trips()
        monitor.counters.update(time_groups())
    service.privilegedStartService()
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()


if __name__ == "__main__":
    main()
