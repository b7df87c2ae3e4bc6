"""
What running command jobs as another account costs the spawner helper: the
same helper starting C{true} jobs as its own account and as C{nobody} (a
root daemon's default), and, given C{--before}, a helper of before run as
its own account, in alternating rounds of one run.

    .venv/bin/python bench/spawn_as.py [--jobs N] [--rounds N] [--window N]
                                       [--before PATH]

C{--before PATH}: an older C{_spawner.py}, for instance
C{git show main:dispatcher/execution/_spawner.py > /tmp/before.py}.

Each round starts a fresh helper (with C{--pin}, on core 0 with its jobs,
this driver on core 1), sends it C{--jobs} spawn requests with C{--window} in
flight at once (the daemon's default of 8 slots), each job in its own
directory laid out as the executor lays them out, and times them to their
last exit.  It prints jobs/s (median and range of the rounds), and the
CPU time per job of the helper and of the job itself.  Run as root to measure the account change;
otherwise only the helper's own account is measured.  The machine's other
load shows in the figures: compare rows of one run only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELPER = os.path.join(ROOT, "dispatcher", "execution", "_spawner.py")
TICKS = os.sysconf("SC_CLK_TCK")


def nobody() -> dict:
    """The run_as of a spawn request for nobody (as the daemon sends it)."""
    import pwd

    entry = pwd.getpwnam("nobody")
    return dict(
        user="nobody",
        uid=entry.pw_uid,
        gid=entry.pw_gid,
        groups=os.getgrouplist("nobody", entry.pw_gid),
    )


def cpu_seconds(pid: int) -> tuple[float, float]:
    """The CPU time of process C{pid}, and of its reaped children, in
    seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # utime, stime, cutime, cstime: fields 14 to 17, counted from 1.
    own, children = fields[11:13], fields[13:15]
    return sum(int(n) for n in own) / TICKS, sum(int(n) for n in children) / TICKS


def one_round(helper: str, jobs: int, window: int, run_as: dict | None,
              directory: str, pin: bool = False) -> tuple[float, float, float]:
    """
    Start C{jobs} C{true} jobs through a fresh helper, C{window} at once;
    (jobs per second, the helper's CPU seconds per job, the jobs').
    """
    process = subprocess.Popen(
        [sys.executable, "-I", "-S", helper],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={})
    if pin:
        os.sched_setaffinity(process.pid, {0})
    jobs_dir = os.path.join(directory, "jobs")
    sent = ended = 0
    replies = process.stdout

    def send(n: int) -> None:
        job = f"{jobs_dir}/{n % 256:02x}/{n:08d}"
        request = dict(
            op="spawn", id=n, argv=["true"], env={"PATH": "/usr/bin:/bin"},
            cwd=f"{job}/work", stdout=f"{job}/attempt-1/stdout",
            stderr=f"{job}/attempt-1/stderr")
        if run_as is not None:
            request["run_as"] = run_as
        process.stdin.write(json.dumps(request).encode() + b"\n")

    started = time.perf_counter()
    cpu_before = cpu_seconds(process.pid)
    while sent < min(window, jobs):
        sent += 1
        send(sent)
    process.stdin.flush()
    while ended < jobs:
        reply = json.loads(replies.readline())
        if reply["op"] == "error":
            raise SystemExit(f"the helper refused a spawn: {reply['error']}")
        if reply["op"] == "exited":
            ended += 1
            if sent < jobs:
                sent += 1
                send(sent)
                process.stdin.flush()
    elapsed = time.perf_counter() - started
    cpu_after = cpu_seconds(process.pid)
    process.stdin.close()
    process.wait()
    return (
        jobs / elapsed,
        (cpu_after[0] - cpu_before[0]) / jobs,
        (cpu_after[1] - cpu_before[1]) / jobs,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--before", default=None,
                        help="an older _spawner.py to measure beside this one")
    parser.add_argument("--pin", action="store_true",
                        help="the helper and its jobs on core 0, this driver on core 1")
    args = parser.parse_args(argv)
    if args.pin:
        os.sched_setaffinity(0, {1})
    variants: list[tuple[str, str, dict | None]] = []
    if args.before:
        variants.append(("before, as its own account", args.before, None))
    variants.append(("now, as its own account", HELPER, None))
    if os.geteuid() == 0:
        variants.append(("now, as nobody (run_as)", HELPER, nobody()))
    results: dict[str, list[tuple[float, float, float]]] = {
        name: [] for name, _, _ in variants
    }
    for _ in range(args.rounds):
        for name, helper, run_as in variants:
            with tempfile.TemporaryDirectory(prefix="spawn-as-") as directory:
                # Passable by nobody, as a data directory is.
                os.chmod(directory, 0o711)
                results[name].append(one_round(helper, args.jobs, args.window, run_as,
                                               directory, args.pin))
    print(f"{args.jobs} `true` jobs a round, {args.window} at once, {args.rounds} rounds "
          f"(median and range of the rounds; CPU per job, medians):")
    base = None
    for name, _, _ in variants:
        rates = sorted(rate for rate, _, _ in results[name])
        helper_cpu = statistics.median(c for _, c, _ in results[name])
        jobs_cpu = statistics.median(c for _, _, c in results[name])
        median = statistics.median(rates)
        base = base or median
        print(f"  {name:28} {median:7,.0f} jobs/s ({rates[0]:,.0f}-{rates[-1]:,.0f}), "
              f"{median / base:.3f} x the first row; helper {helper_cpu * 1e6:4.0f} us, "
              f"the job {jobs_cpu * 1e6:5.0f} us of CPU")


if __name__ == "__main__":
    main()
