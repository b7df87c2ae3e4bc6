"""
The machine a run measures on, and its state before the run: what it is
(CPU, kernel, versions), which sources of the dispatcher it runs, how busy
its two cores already are, how fast its file system makes directories, and
the open-file limit the idle connections need.  Other work on the machine,
or a file system still busy forgetting deleted files, skews every number,
so the run records all of it with its results.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness import LOAD_CORE, ROOT, SERVER_CORE, busy_pct, core_ticks

# Creating a directory slower than this (µs) means the file system is still
# busy with many recently deleted files.
MKDIR_SLOW_US = 100
# How long a full run waits at most for the file system to settle, and how
# often it looks again.
SETTLE_S = 180
SETTLE_EVERY_S = 20


def cpu_model() -> str:
    """
    The CPU's model name as the kernel gives it, or C{unknown}.
    """
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def machine() -> dict[str, Any]:
    """
    What the run runs on: CPU, cores, memory, kernel, Python, Twisted, wrk,
    the data directory's file system, and the date.
    """
    import twisted

    cpu = cpu_model()
    ram_kib = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                ram_kib = int(line.split()[1])
    wrk_version = subprocess.run(["wrk", "--version"], capture_output=True, text=True)
    tmp_fs = subprocess.run(["df", "--output=fstype", tempfile.gettempdir()],
                            capture_output=True, text=True).stdout.split()[-1:]
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(ram_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "twisted": twisted.__version__,
        "wrk": (wrk_version.stdout + wrk_version.stderr).split("Copyright")[0].strip(),
        "data_dir_filesystem": tmp_fs[0] if tmp_fs else "unknown",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def code_version() -> dict[str, Any]:
    """
    Which dispatcher the run measured: a digest of its sources (the run
    may not be made from a commit) and when the newest of them changed.
    """
    digest = hashlib.sha256()
    newest = 0.0
    for path in sorted((ROOT / "dispatcher").rglob("*.py")):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
        newest = max(newest, path.stat().st_mtime)
    return {
        "dispatcher_sha256": digest.hexdigest()[:16],
        "newest_source_change": datetime.datetime.fromtimestamp(
            newest, datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def directory_cost(probe: Path, count: int = 1000) -> dict[str, float]:
    """
    How long creating an empty directory, then a file in it, takes where
    the daemons keep their data, in microseconds: each job gets its own
    directory and log files, and ext4 takes up to a hundred times longer
    for both for minutes after many inodes were freed (by an earlier run's
    clean-up, say).  The probe's files stay until the run ends.
    """
    probe.mkdir()
    t0 = time.perf_counter()
    for i in range(count):
        (probe / str(i)).mkdir()
    t1 = time.perf_counter()
    for i in range(count):
        (probe / str(i) / "log").touch()
    t2 = time.perf_counter()
    return {"mkdir_us": round((t1 - t0) / count * 1e6, 1),
            "create_us": round((t2 - t1) / count * 1e6, 1)}


def settled_directory_cost(tmp: Path, wait: bool) -> tuple[dict[str, float], int]:
    """
    L{directory_cost} under C{tmp} and, with C{wait}, once it is below
    L{MKDIR_SLOW_US} or after L{SETTLE_S} seconds of waiting for it to
    fall; returns the cost and the seconds waited.
    """
    waited = 0
    cost = directory_cost(tmp / "probe-0")
    while wait and cost["mkdir_us"] > MKDIR_SLOW_US and waited < SETTLE_S:
        if not waited:
            print(f"bench: creating a directory takes {cost['mkdir_us']:.0f} µs here "
                  "(tens on an idle ext4): many files were deleted recently (an earlier "
                  "run's clean-up?); waiting up to 3 minutes for that to pass",
                  file=sys.stderr, flush=True)
        time.sleep(SETTLE_EVERY_S)
        waited += SETTLE_EVERY_S
        cost = directory_cost(tmp / f"probe-{waited}")
    if cost["mkdir_us"] > MKDIR_SLOW_US:
        print(f"bench: warning: creating a directory takes {cost['mkdir_us']:.0f} µs here; "
              "job directories will be slow to make, and the jobs with them",
              file=sys.stderr)
    return cost, waited


def background_load(seconds: float = 1.0) -> dict[str, float]:
    """
    How busy the two cores are before anything of the run starts: other
    work on the machine skews every number, so the run records it (and
    warns above 10 %).
    """
    before = core_ticks()
    time.sleep(seconds)
    out = busy_pct(before, core_ticks())
    with open("/proc/loadavg") as f:
        out["loadavg_1min"] = float(f.read().split()[0])
    if max(out[f"cpu{SERVER_CORE}"], out[f"cpu{LOAD_CORE}"]) > 10:
        print(f"bench: warning: the machine is busy before the run starts "
              f"({out}); the numbers will be low and noisy", file=sys.stderr)
    return out


def raise_open_file_limit(needed: int) -> dict[str, int]:
    """
    Raise this process's soft limit of open files towards its hard limit;
    the daemon inherits it.  Returns the limits as they are now.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, needed)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        soft = wanted
    return {"soft": soft, "hard": hard}
