"""
What each command job costs the spawner helper: `true` jobs a second
through the helper alone (no daemon), each way of running them in turn,
in alternating rounds.

    .venv/bin/python bench/spawns.py [--jobs N] [--rounds N] [--slots N]
                                     [--helper PATH] [--ways a,b,...]

The ways: C{plain} (no cgroups, the job writes its log files itself),
C{cgroups} (each job in cgroups of its own: [executor] cgroups = auto),
C{capped} (output through pipes the helper reads, [executor]
max_log_bytes), C{both} (the defaults: cgroups and a log cap).  The helper
runs on core 0, this driver on core 1, as bench/run.py places the server
and the load; C{slots} jobs run at once.  C{--helper} runs another
helper file (an older one: it is given no settings and takes them all as
C{plain}).  Each figure is a way's median round (all rounds in brackets);
on a shared machine the rounds spread, which the alternation spreads over
every way alike.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time

if not __package__:  # run as a file: make "bench" and "dispatcher" importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dispatcher.config._ini import DEFAULT_MAX_LOG_BYTES, DEFAULT_MAX_PROCESSES
from dispatcher.execution._process import _HELPER
from dispatcher.model._jobs import LOG_STREAMS, log_cut_marker

WAYS = {
    "plain": {"cgroups": "off", "max_log_bytes": 0},
    "cgroups": {"cgroups": "auto", "max_log_bytes": 0},
    "capped": {"cgroups": "off", "max_log_bytes": DEFAULT_MAX_LOG_BYTES},
    "both": {"cgroups": "auto", "max_log_bytes": DEFAULT_MAX_LOG_BYTES},
}
SERVER_CORE, LOAD_CORE = 0, 1


class Helper:
    """
    A spawner helper spoken to in JSON lines.
    """

    def __init__(self, path: str, settings: dict | None) -> None:
        argv = ["taskset", "-c", str(SERVER_CORE), sys.executable, "-I", "-S", path]
        if settings is not None:
            argv.append(json.dumps(settings))
        self.process = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={}
        )
        self._pending = b""
        self.replies: list[dict] = []
        self.description = None
        if settings is not None:
            self.description = self.next()["description"]

    def send(self, request: dict) -> None:
        self.process.stdin.write(json.dumps(request).encode() + b"\n")
        self.process.stdin.flush()

    def next(self, timeout: float = 30.0) -> dict:
        while not self.replies:
            ready, _, _ = select.select([self.process.stdout], [], [], timeout)
            if not ready:
                raise RuntimeError("the helper does not answer")
            data = os.read(self.process.stdout.fileno(), 65536)
            if not data:
                raise RuntimeError("the helper exited")
            lines = (self._pending + data).split(b"\n")
            self._pending = lines.pop()
            self.replies.extend(json.loads(line) for line in lines)
        return self.replies.pop(0)

    def own_cpu(self) -> float:
        """
        The CPU seconds the helper process itself has used so far (not
        its jobs').
        """
        with open(f"/proc/{self.process.pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self) -> float:
        """
        Stop the helper; the CPU seconds it and its jobs used.
        """
        self.process.stdin.close()
        _, _, usage = os.wait4(self.process.pid, 0)
        self.process.returncode = 0
        return usage.ru_utime + usage.ru_stime


def one_round(
    path: str, settings: dict | None, jobs: int, slots: int, directory: str
) -> tuple[float, float, float]:
    """
    Run C{jobs} C{true} jobs, C{slots} at once, through a new helper: the
    jobs a second from the first spawn to the last exit, and the CPU
    microseconds a job cost, the helper's and the job's own, and the
    helper's alone (from start to stop of the helper: other work on the
    machine disturbs these less than the rate).
    """
    helper = Helper(path, settings)
    cpu = None
    try:
        sent = ended = 0
        running = 0

        def spawn() -> None:
            nonlocal sent, running
            sent += 1
            running += 1
            work = os.path.join(directory, str(sent % 64))
            helper.send({
                "op": "spawn", "id": sent, "argv": ["true"], "env": {"PATH": "/usr/bin:/bin"},
                "cwd": work, "stdout": f"{work}/stdout", "stderr": f"{work}/stderr",
            })

        start = time.perf_counter()
        while sent < min(slots, jobs):
            spawn()
        while ended < jobs:
            reply = helper.next()
            if reply["op"] == "error":
                raise RuntimeError(reply["error"])
            if reply["op"] == "exited":
                ended += 1
                running -= 1
                if sent < jobs:
                    spawn()
        rate = jobs / (time.perf_counter() - start)
        own = helper.own_cpu()
        cpu = helper.close()
        return rate, cpu / jobs * 1e6, own / jobs * 1e6
    finally:
        if cpu is None:
            helper.close()


def settings_of(way: str) -> dict:
    """
    The helper's settings for a way, with the daemon's defaults otherwise.
    """
    return {
        **WAYS[way],
        "max_processes": DEFAULT_MAX_PROCESSES,
        "markers": {s: log_cut_marker(s, DEFAULT_MAX_LOG_BYTES) for s in LOG_STREAMS},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--helper", default=None,
                        help="another helper file, run as plain (an older one)")
    parser.add_argument("--ways", default="plain,cgroups,capped,both")
    args = parser.parse_args(argv)
    os.sched_setaffinity(0, {LOAD_CORE})
    ways = args.ways.split(",")
    runs: list[tuple[str, str, dict | None]] = [
        (way, _HELPER, settings_of(way)) for way in ways
    ]
    if args.helper:
        runs.insert(0, ("given helper", args.helper, None))
    rates: dict[str, list[float]] = {name: [] for name, _, _ in runs}
    cpus: dict[str, list[float]] = {name: [] for name, _, _ in runs}
    owns: dict[str, list[float]] = {name: [] for name, _, _ in runs}
    with tempfile.TemporaryDirectory(prefix="spawns-") as directory:
        for way in ways:
            if WAYS[way]["cgroups"] == "auto":
                helper = Helper(_HELPER, settings_of(way))
                print("the helper says:", helper.description)
                helper.close()
                break
        for number in range(args.rounds):
            for name, path, settings in runs:
                rate, cpu, own = one_round(path, settings, args.jobs, args.slots, directory)
                rates[name].append(rate)
                cpus[name].append(cpu)
                owns[name].append(own)
                print(f"round {number + 1} {name}: {rate:,.0f} jobs/s, {cpu:.0f} us of CPU "
                      f"a job, the helper's {own:.0f}", flush=True)
    first = statistics.median(rates[runs[0][0]])
    first_cpu = statistics.median(cpus[runs[0][0]])
    first_own = statistics.median(owns[runs[0][0]])
    print(f"\n{args.jobs} `true` jobs a round, {args.slots} at once, {args.rounds} rounds; "
          f"medians (range), and the ratio to {runs[0][0]}:")
    for name, _, _ in runs:
        median = statistics.median(rates[name])
        cpu = statistics.median(cpus[name])
        print(f"  {name:>13}: {median:8,.0f} jobs/s ({min(rates[name]):,.0f}-"
              f"{max(rates[name]):,.0f})  {median / first:.3f};  CPU a job {cpu:5.0f} us "
              f"({min(cpus[name]):.0f}-{max(cpus[name]):.0f}) {cpu - first_cpu:+.0f};  "
              f"the helper's {statistics.median(owns[name]):4.0f} us "
              f"{statistics.median(owns[name]) - first_own:+.0f}")


if __name__ == "__main__":
    main()
