"""
The soak (issue 16): a real C{twistd -n dispatcher} runs a steady stream
of jobs that each write output, with retention at a short age, for half
an hour; the disk its data directory uses (the database, its write-ahead
log and the jobs' directories) and the daemon's resident memory are
sampled as it goes, printed as a table, and must stay flat.

    .venv/bin/python bench/soak.py                  # 30 minutes
    .venv/bin/python bench/soak.py --minutes 5      # a shorter run
    .venv/bin/python bench/soak.py --rate 20 --finished-days 0.0007 --every 30

The jobs: shell commands that write about 22 KB to stdout and a line to
stderr; one in ten fails; every 25th is an array of four; every 20th
depends on the job before it (cancelled when that one failed).  They are
submitted at C{--rate} a second from one client thread, and the daemon runs
them on its 8 slots.  Retention removes finished jobs C{--finished-days}
after they end (0.0007 days, about a minute, by default): the data
directory then holds about a minute of jobs, whatever the run's length;
the event log (C{[events] retention}) is held to the same age (a minute
at least), where it would keep a day by default.

Flat means: after the warm-up (three times the age plus two id windows of
65.5 s, at most half the run), the mean of the last third of the samples
is within C{--disk-slack} (15 %) of the first third's for the disk, and
within C{--rss-slack} (10 %) for the memory, or within C{--floor} (4 MiB)
of it.  It exits 0 if both hold and 1 if either grows (or the run failed).
It is not part of the test suite, and takes no lock: it is meant to run
beside other work (its figures are of disk and memory, not of time).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

if not __package__:  # run as a file: make "bench" importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.harness import BenchError, Client, Processes, free_ports

BIN = Path(sys.executable).parent
MIB = 1024 * 1024
# The deepest id window a job's directory is under (65.536 s): an emptied
# window's directory goes a window after it ended.
WINDOW = 65.536

CONFIG = """\
[server]
# The access log grows with every request and is not the store's: an
# operator rotates it (logrotate); the soak measures what retention bounds.
access_log = no

[retention]
finished_days = {finished_days}

[events]
# The event log keeps a day by default (a client may resume that far
# back): held to the jobs' age here, as a site keeping few jobs would.
retention = {events_retention:g}
"""

# A job's command: ~22 KB of base64 on stdout, a line on stderr; fails
# with the exit code given.
COMMAND = 'head -c 16384 /dev/urandom | base64; echo "job $DISPATCHER_JOB_ID" >&2; exit {code}'


def job_body(i: int, previous: Optional[str]) -> dict[str, Any]:
    """
    The submission of job number C{i}: see the module's docstring for the mix.
    """
    body: dict[str, Any] = {
        "command": ["sh", "-c", COMMAND.format(code=1 if i % 10 == 9 else 0)],
        "labels": {"soak": "yes", "n": str(i % 7)},
    }
    if i % 25 == 24:
        body["array"] = 4
    elif i % 20 == 19 and previous is not None:
        body["depends_on"] = [previous]
    return body


def disk_usage(path: Path) -> int:
    """
    The bytes C{path} and everything under it take on the disk (allocated
    blocks, as C{du} counts them); 0 if it is not there.
    """
    total = 0
    stack = [str(path)]
    while stack:
        top = stack.pop()
        try:
            info = os.lstat(top)
        except FileNotFoundError:
            continue
        total += info.st_blocks * 512
        if os.path.isdir(top) and not os.path.islink(top):
            try:
                with os.scandir(top) as entries:
                    for entry in entries:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(entry.path)
                        else:
                            try:
                                total += entry.stat(follow_symlinks=False).st_blocks * 512
                            except FileNotFoundError:
                                pass
            except FileNotFoundError:
                pass
    return total


def rss(pid: int) -> int:
    """
    The resident memory of process C{pid}, in bytes (VmRSS).
    """
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise BenchError(f"no VmRSS for pid {pid}")


class Load(threading.Thread):
    """
    Submits jobs at C{rate} a second until stopped; counts what it sent and
    what was refused.
    """

    def __init__(self, client: Client, rate: float) -> None:
        super().__init__(name="soak-load", daemon=True)
        self.client = client
        self.rate = rate
        self.submitted = 0
        self.refused = 0
        self.errors: list[str] = []
        self._halt = threading.Event()

    def run(self) -> None:
        previous: Optional[str] = None
        started = time.monotonic()
        i = 0
        while not self._halt.is_set():
            due = started + i / self.rate
            wait = due - time.monotonic()
            if wait > 0 and self._halt.wait(wait):
                break
            try:
                status, answer = self.client.json("POST", "/v1/jobs", job_body(i, previous))
            except Exception as e:  # the daemon went away: the run fails
                self.errors.append(f"submission {i}: {e}")
                self.client.close()
                if len(self.errors) > 10:
                    return
                i += 1
                continue
            if status == 201:
                jobs = answer.get("jobs", [answer])
                self.submitted += len(jobs)
                previous = jobs[-1]["id"]
            else:
                self.refused += 1
                if len(self.errors) < 10:
                    self.errors.append(f"submission {i}: {status} {answer}")
            i += 1

    def stop(self) -> None:
        self._halt.set()
        self.join(30)


class Daemon:
    """
    A C{twistd -n dispatcher} in C{workdir}, on a free loopback port.
    """

    def __init__(self, processes: Processes, workdir: Path, finished_days: float) -> None:
        self.processes = processes
        self.workdir = workdir
        self.data_dir = workdir / "data"
        self.config = workdir / "dispatcher.ini"
        self.config.write_text(CONFIG.format(
            finished_days=finished_days,
            # (Its least: a minute.)
            events_retention=max(60.0, finished_days * 86400.0)))
        (self.port,) = free_ports(1)
        self.log = workdir / "twistd.log"
        self.child: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 60.0) -> Client:
        out = open(self.log, "wb")
        self.child = self.processes.start(
            [str(BIN / "twistd"), "-n", "--pidfile", "", "dispatcher",
             "--config", str(self.config), "--data-dir", str(self.data_dir),
             "--listen", f"tcp:{self.port}:interface=127.0.0.1"],
            cwd=self.workdir, stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.child.poll() is not None:
                raise BenchError(f"twistd exited at start: {self.tail()}")
            if "dispatcher listening on" in self.log.read_text(errors="replace"):
                token = (self.data_dir / "admin.token").read_text().strip()
                return Client(self.port, token=token)
            time.sleep(0.1)
        raise BenchError(f"twistd did not listen within {timeout:g} s: {self.tail()}")

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:]

    def removed(self) -> int:
        """
        How many jobs retention has removed so far, from the daemon's log.
        """
        text = self.log.read_text(errors="replace")
        return sum(int(n) for n in re.findall(r"retention removed (\d+) finished jobs", text))


def sample(daemon: Daemon, client: Client, load: Load, started: float) -> dict[str, Any]:
    """
    One row of the table: time, jobs submitted and stored, the disk of the
    store, of the jobs' directories and of the whole data directory, and
    the daemon's memory.
    """
    data = daemon.data_dir
    database = sum(disk_usage(data / f"dispatcher.sqlite3{suffix}")
                   for suffix in ("", "-shm", ".mark"))
    wal = disk_usage(data / "dispatcher.sqlite3-wal")
    jobs = disk_usage(data / "jobs")
    counts = client.get_ok("/v1/queues")
    stored = sum(n for queue in counts["queues"].values() for n in queue["counts"].values())
    assert daemon.child is not None
    return {
        "t": time.monotonic() - started,
        "submitted": load.submitted,
        "stored": stored,
        "removed": daemon.removed(),
        "db": database,
        "wal": wal,
        "jobs": jobs,
        "total": disk_usage(data),
        "rss": rss(daemon.child.pid),
    }


HEADER = (f"{'t (s)':>7} {'submitted':>9} {'stored':>7} {'removed':>8} {'db MiB':>7} "
          f"{'wal MiB':>7} {'jobs MiB':>8} {'data MiB':>8} {'RSS MiB':>8}")


def row(s: dict[str, Any]) -> str:
    return (f"{s['t']:7.0f} {s['submitted']:9d} {s['stored']:7d} {s['removed']:8d} "
            f"{s['db'] / MIB:7.1f} {s['wal'] / MIB:7.1f} {s['jobs'] / MIB:8.1f} "
            f"{s['total'] / MIB:8.1f} {s['rss'] / MIB:8.1f}")


def judge(samples: list[dict[str, Any]], warm_up: float, disk_slack: float,
          rss_slack: float, floor: int) -> list[str]:
    """
    What grew, in words (nothing: flat).  The samples after C{warm_up}
    seconds are split in thirds; the last third's mean of the data
    directory's disk, and of the memory, must be within their slack of the
    first third's (or within C{floor} bytes of it).
    """
    steady = [s for s in samples if s["t"] >= warm_up]
    if len(steady) < 6:
        return [f"only {len(steady)} samples after the warm-up of {warm_up:.0f} s: "
                "run longer, or sample more often (--every)"]
    third = len(steady) // 3
    first, last = steady[:third], steady[-third:]
    problems = []
    for key, slack, what in (("total", disk_slack, "data directory"),
                             ("rss", rss_slack, "daemon's RSS")):
        before = statistics.mean(s[key] for s in first)
        after = statistics.mean(s[key] for s in last)
        growth = (after - before) / before if before else 0.0
        line = (f"{what}: {before / MIB:.1f} MiB in the first third after the warm-up, "
                f"{after / MIB:.1f} MiB in the last ({growth:+.1%})")
        print(line)
        if after - before > floor and growth > slack:
            problems.append(f"{line}: grows by more than {slack:.0%}")
    return problems


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0,
                        help="how long jobs are submitted (default 30)")
    parser.add_argument("--rate", type=float, default=10.0,
                        help="submissions a second (default 10)")
    parser.add_argument("--finished-days", type=float, default=0.0007,
                        help="[retention] finished_days (default 0.0007: about a minute)")
    parser.add_argument("--every", type=float, default=None,
                        help="seconds between samples (default: a sixtieth of the run, "
                             "5 to 30)")
    parser.add_argument("--disk-slack", type=float, default=0.15)
    parser.add_argument("--rss-slack", type=float, default=0.10)
    parser.add_argument("--floor", type=float, default=4.0,
                        help="MiB of growth always allowed (default 4)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the daemon's directory (its log, its data)")
    args = parser.parse_args(argv)
    run = args.minutes * 60.0
    every = args.every or min(30.0, max(5.0, run / 60.0))
    age = args.finished_days * 86400.0
    warm_up = min(3 * age + 2 * WINDOW, run / 2)
    workdir = Path(tempfile.mkdtemp(prefix="dispatcher-soak-"))
    processes = Processes()
    samples: list[dict[str, Any]] = []
    problems: list[str] = []
    try:
        daemon = Daemon(processes, workdir, args.finished_days)
        client = daemon.start()
        print(f"soak: twistd -n dispatcher on port {daemon.port}, data in {daemon.data_dir}; "
              f"{args.rate:g} jobs/s for {args.minutes:g} min, finished_days = "
              f"{args.finished_days:g} ({age:.0f} s); a sample every {every:g} s, judged "
              f"after a warm-up of {warm_up:.0f} s", flush=True)
        print(HEADER, flush=True)
        load = Load(Client(daemon.port, token=client.token), args.rate)
        started = time.monotonic()
        load.start()
        while True:
            samples.append(sample(daemon, client, load, started))
            print(row(samples[-1]), flush=True)
            if samples[-1]["t"] >= run:
                break
            if daemon.child.poll() is not None:
                raise BenchError(f"the daemon exited: {daemon.tail()}")
            time.sleep(max(0.0, started + len(samples) * every - time.monotonic()))
        load.stop()
        if load.errors:
            problems.append(f"{load.refused} submissions refused or failed; the first: "
                            f"{load.errors[0]}")
        print(f"\n{load.submitted} jobs submitted, {samples[-1]['removed']} removed by "
              f"retention, {samples[-1]['stored']} stored at the end.")
        problems += judge(samples, warm_up, args.disk_slack, args.rss_slack,
                          int(args.floor * MIB))
        if samples[-1]["removed"] == 0:
            problems.append("retention removed nothing")
    except BenchError as e:
        problems.append(str(e))
    finally:
        processes.stop_all()
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if problems:
        print("\nFAILED: " + "\n        ".join(problems))
        return 1
    print("\nflat: disk and memory held steady")
    return 0


if __name__ == "__main__":
    sys.exit(main())
