"""
What a one-job worker (the process each direct-mode Slurm job runs) costs
from its exec to its exit: a dispatcher on loopback with N `true` jobs
queued, and N one-job workers run one after another, each taking one job,
reporting it and exiting.  For each: its wall time and its CPU (user and
system, its children included: the spawner helper and the job), medians
printed.  Slurm is not involved: what is measured is the worker alone.

    .venv/bin/python bench/one_job_start.py [--jobs N] [--worker-command CMD]

C{--worker-command} is the command up to its options (default: this
checkout's C{dispatcher worker}), so that another checkout's worker, or a
lighter entry point, can be set beside it against the same dispatcher.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

if not __package__:  # run as a file: make "tests" importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.test_twistd import BIN, Twistd  # noqa: E402

TOKEN = "one-job-start-token-0123456789"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--worker-command", action="append",
                        help="repeatable: each is measured in turn, in alternating rounds")
    args = parser.parse_args()
    commands = args.worker_command or [f"{os.path.join(BIN, 'dispatcher')} worker"]
    directory = tempfile.mkdtemp(prefix="dispatcher-one-job-")
    token_file = os.path.join(directory, "worker.token")
    with open(token_file, "w") as f:
        f.write(TOKEN + "\n")
    os.chmod(token_file, 0o600)
    worker_ini = os.path.join(directory, "worker.ini")
    with open(worker_ini, "w") as f:
        f.write("[executor]\nrun_as = root\n[log]\nlevel = warn\n" if os.geteuid() == 0
                else "[log]\nlevel = warn\n")
    daemon = Twistd(directory, f"[executor]\nslots = 0\n\n[log]\njob_lines = 0\n\n"
                               f"[workers]\ntoken_file = {token_file}\n")
    daemon.start()
    found: dict[str, dict[str, list[float]]] = {c: {"wall": [], "cpu": []} for c in commands}
    try:
        code, _ = daemon.request("POST", "/v1/jobs", {
            "command": ["true"], "array": args.jobs * len(commands)})
        assert code == 201
        for i in range(args.jobs):
            for n, command in enumerate(commands):
                argv = shlex.split(command) + [
                    "--url", daemon.url, "--token-file", token_file, "--name", f"w-{n}-{i}",
                    "--one-job", "--slots", "1", "--cpus", "1", "--memory", "1000",
                    "--gpus", "0", "--grace", "0", "--keep-days", "0",
                    "--data-dir", os.path.join(directory, f"w-{n}-{i}"),
                    "--config", worker_ini, "--log-level", "warn"]
                began = time.monotonic()
                process = subprocess.Popen(argv)
                _, status, usage = os.wait4(process.pid, 0)
                wall = time.monotonic() - began
                process.returncode = os.waitstatus_to_exitcode(status)
                assert process.returncode == 0, (command, process.returncode)
                found[command]["wall"].append(wall)
                found[command]["cpu"].append(usage.ru_utime + usage.ru_stime)
        code, queues = daemon.request("GET", "/v1/queues")
        counts = queues["queues"]["default"]["counts"]
        assert counts["succeeded"] == args.jobs * len(commands), counts
    finally:
        daemon.stop()
        shutil.rmtree(directory, ignore_errors=True)
    print(json.dumps({
        command: {
            "wall_median_s": round(statistics.median(v["wall"]), 3),
            "cpu_median_s": round(statistics.median(v["cpu"]), 3),
            "runs": len(v["wall"]),
        } for command, v in found.items()
    }, indent=1))


if __name__ == "__main__":
    main()
