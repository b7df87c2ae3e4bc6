"""
Two checkouts' daemons, in alternating rounds, doing the same jobs: the
CPU each spends a job, and its rate.  The way to say what a change costs
a job on a machine where other work comes and goes: the rate follows the
machine's load, the CPU a job takes much less.

    .venv/bin/python bench/cpu_ab.py BEFORE AFTER [--kind batch|noop|commands]
                                     [--rounds N] [--jobs N] [--fresh-fs IMAGE]

BEFORE and AFTER are checkouts, each set up with the README's command (its
own C{.venv}), as for bench/compare.py.  Each round starts a fresh daemon
of each (C{python -m bench.daemon}, the benchmark's configuration, core 0,
a session of its own) and sends it the jobs from this process (core 1):

  - C{batch}: C{--jobs} jobs in batches of 1,000 plain commands, from 4
    connections, into a daemon with no slots (they stay queued): what a
    batched job costs to take and store;
  - C{noop}: C{--jobs} no-op task jobs, one a request, from 8
    connections, into a daemon of 8 slots and 8 threads, each waited for
    to succeed: measure (b) of docs/benchmarks.md;
  - C{commands}: the same with C{true} command jobs (as root: run as
    nobody, each in cgroups of its own): measure (e).

The CPU is that of the daemon's whole session (every live process of it,
with the children each has reaped: the spawner helper and its jobs), from
C{/proc}, between the first and the last job of the timed part (200 jobs
go first, untimed).  Prints each run, each checkout's medians, and the
ratios AFTER over BEFORE (of CPU a job: BEFORE over AFTER, so that above
1 is better for both).

C{--fresh-fs IMAGE} (root only): each daemon's data directory, and so its
store and its jobs' directories, goes on an ext4 made anew in the file
IMAGE, as in bench/compare.py (which says why: on this machine's root
ext4, files are slow to make for a while after many were deleted, and the
command jobs' CPU a job grew every round, on both sides, from 3.3 to 7.6
ms without it).  The default for C{commands} as root is
C{/var/tmp/cpu-ab.img}; C{--fresh-fs none} keeps the data in C{/var/tmp}.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

if not __package__:  # run as a file: make "bench" importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.compare import FreshFilesystem

TICKS = os.sysconf("SC_CLK_TCK")
WARM_UP = 200
BATCH = 1000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_stats(session: int):
    """
    The fields of C{/proc/PID/stat} after the command's name (the state
    first) of every process of C{session} (zombies included).
    """
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session:
            yield fields


def session_ticks(session: int) -> int:
    """
    The CPU ticks of every live process of C{session}, with their reaped
    children's.
    """
    return sum(sum(int(x) for x in fields[11:15]) for fields in session_stats(session))


def session_alive(session: int) -> bool:
    """
    Whether any process of C{session} is left.
    """
    return any(fields[0] != "Z" for fields in session_stats(session))


class Daemon:
    """
    One checkout's benchmark daemon, on core 0, in a session of its own.
    """

    def __init__(self, checkout: str, slots: int, under: str = "/var/tmp") -> None:
        self.data = tempfile.mkdtemp(prefix="cpu-ab-", dir=under)
        self.port = _free_port()
        self.process = subprocess.Popen(
            ["taskset", "-c", "0", os.path.join(checkout, ".venv/bin/python"),
             "-m", "bench.daemon", "--port", str(self.port),
             "--monitor-port", str(_free_port()), "--data-dir", self.data,
             "--slots", str(slots), "--threads", str(max(slots, 1))],
            cwd=checkout, env=dict(os.environ, PYTHONPATH=checkout),
            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        token_file = os.path.join(self.data, "var", "admin.token")
        deadline = time.monotonic() + 60
        while True:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the daemon of {checkout} did not answer in 60 s")
            try:
                with open(token_file) as f:
                    token = f.read().strip()
                if token and self.call("GET", "/v1/queues", token=token)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        self.headers = {"Authorization": f"Bearer {token}",
                        "Content-Type": "application/json"}

    def call(self, method: str, path: str, body: bytes = b"",
             token: str = "") -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            headers = {"Authorization": f"Bearer {token}"} if token else self.headers
            conn.request(method, path, body, headers)
            answer = conn.getresponse()
            return answer.status, answer.read()
        finally:
            conn.close()

    def ended(self) -> int:
        """
        How many jobs succeeded or failed.
        """
        status, body = self.call("GET", "/v1/queues")
        assert status == 200, body
        return sum(q["counts"]["succeeded"] + q["counts"]["failed"]
                   for q in json.loads(body)["queues"].values())

    def ticks(self) -> int:
        return session_ticks(self.process.pid)

    def stop(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        self.process.wait()
        # The spawner helper and its jobs go after the daemon: wait for
        # them, so that the next round's file system can be made.
        deadline = time.monotonic() + 30
        while session_alive(self.process.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        shutil.rmtree(self.data, ignore_errors=True)


def post(daemon: Daemon, body: bytes, path: str, times: int) -> None:
    """
    Post C{body} to C{path} C{times} times on one connection.
    """
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=60)
    try:
        for _ in range(times):
            conn.request("POST", path, body, daemon.headers)
            answer = conn.getresponse()
            text = answer.read()
            if answer.status not in (201, 202):
                raise RuntimeError(f"POST {path}: {answer.status} {text[:200]!r}")
    finally:
        conn.close()


def at_once(connections: int, each: Callable[[], None]) -> None:
    threads = [threading.Thread(target=each) for _ in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def wait_ended(daemon: Daemon, total: int, first: int, began: float) -> None:
    """
    Wait until C{total} jobs have ended (C{first} of them before
    C{began}).  Each look is a C{GET /v1/queues}, which counts every
    queue's jobs in the daemon: looked every 10 ms, it was some 8 % of the
    daemon's CPU in a command round (py-spy), and a change to the counts
    would have shown as one to the jobs.  So the next look is put at a
    quarter of the time the jobs left would take at the rate so far (10 ms
    at the least), which keeps the end's error as small with a tenth of
    the looks.
    """
    while True:
        ended = daemon.ended()
        if ended >= total:
            return
        rate = (ended - first) / max(time.perf_counter() - began, 1e-3)
        time.sleep(min(0.2, max(0.01, (total - ended) / max(rate, 1.0) / 4)))


def run(checkout: str, kind: str, jobs: int,
        filesystem: Optional[FreshFilesystem] = None) -> tuple[float, float]:
    """
    One round of C{checkout}: (jobs a second, CPU µs a job), its data on
    C{filesystem} made anew if given.
    """
    under = str(filesystem.renew()) if filesystem is not None else "/var/tmp"
    if kind == "batch":
        daemon = Daemon(checkout, slots=0, under=under)
        connections = 4
        body = json.dumps(
            {"jobs": [{"command": ["true", f"n-{i}"]} for i in range(BATCH)]}).encode()
        path, per_request = "/v1/jobs/batch", BATCH
    else:
        daemon = Daemon(checkout, slots=8, under=under)
        connections = 8
        body = json.dumps(
            {"task": "noop"} if kind == "noop" else {"command": ["true"]}).encode()
        path, per_request = "/v1/jobs", 1
    try:
        post(daemon, body, path, max(1, WARM_UP // per_request))
        if kind != "batch":
            while daemon.ended() < WARM_UP:
                time.sleep(0.05)
        requests = max(1, jobs // per_request // connections)
        timed = requests * connections * per_request
        began, ticks = time.perf_counter(), daemon.ticks()
        at_once(connections, lambda: post(daemon, body, path, requests))
        if kind != "batch":
            wait_ended(daemon, WARM_UP + timed, WARM_UP, began)
        seconds = time.perf_counter() - began
        cpu = (daemon.ticks() - ticks) / TICKS
        return timed / seconds, cpu / timed * 1e6
    finally:
        daemon.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--kind", choices=("batch", "noop", "commands"), default="noop")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--jobs", type=int, default=None,
                        help="jobs a run (default: 300,000 batched, 3,000 noop, 1,600 commands)")
    parser.add_argument("--fresh-fs", default=None, metavar="IMAGE",
                        help="each daemon's data on an ext4 made anew in IMAGE (root only; "
                        "default for commands as root: /var/tmp/cpu-ab.img; 'none': off)")
    parser.add_argument("--mkfs-options", default="-O ^has_journal")
    args = parser.parse_args()
    image = args.fresh_fs
    if image is None and args.kind == "commands" and os.geteuid() == 0:
        image = "/var/tmp/cpu-ab.img"
    if image == "none":
        image = None
    if image is not None and os.geteuid() != 0:
        parser.error("--fresh-fs mounts a file system: run as root")
    filesystem = (FreshFilesystem(Path(image), args.mkfs_options)
                  if image is not None else None)
    jobs = args.jobs or {"batch": 300_000, "noop": 3000, "commands": 1600}[args.kind]
    os.sched_setaffinity(0, {1})
    runs: dict[str, list[tuple[float, float]]] = {args.before: [], args.after: []}
    try:
        for number in range(args.rounds):
            order = (args.before, args.after) if number % 2 == 0 else (args.after, args.before)
            for checkout in order:
                rate, cpu = run(checkout, args.kind, jobs, filesystem)
                runs[checkout].append((rate, cpu))
                print(f"round {number + 1} {checkout}: {rate:,.0f} jobs/s, "
                      f"{cpu:,.2f} µs of CPU a job", flush=True)
    finally:
        if filesystem is not None:
            filesystem.close()
            os.unlink(image)
    medians: dict[str, Any] = {}
    for checkout, found in runs.items():
        medians[checkout] = (statistics.median(r for r, _ in found),
                             statistics.median(c for _, c in found))
        print(f"{checkout}: medians {medians[checkout][0]:,.0f} jobs/s, "
              f"{medians[checkout][1]:,.2f} µs a job")
    (rate_b, cpu_b), (rate_a, cpu_a) = medians[args.before], medians[args.after]
    print(f"{args.kind}, after / before: jobs/s {rate_a / rate_b:.3f}; "
          f"CPU a job (before / after) {cpu_b / cpu_a:.3f}")


if __name__ == "__main__":
    main()
