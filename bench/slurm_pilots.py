"""
The Slurm backend's figures against a real one-node Slurm on this host
(tests/slurm.py starts it; root and Debian's slurm-wlm and munge needed):

- the baseline: N `true` jobs submitted by a plain loop of `sbatch`, from
  the first submission until Slurm shows none pending or running;
- the same N `true` jobs through the dispatcher's pilots (warm: the pilots
  already run), submitted as one array, until all succeeded;
- the same N `true` jobs through direct mode (a Slurm job each, the N
  submitted as one array, so one sbatch of a Slurm job array), until all
  succeeded;
- submit→start latency: single jobs one after another, from the
  submission to the job's own first command (`date`), through a plain
  `sbatch`, through a warm pilot and through direct mode (its sbatch, the
  Slurm job's start and its one-job worker's start included); and the
  cold start (no pilot yet: the first job's started_at less its
  created_at, a pilot's sbatch, its start in Slurm and its worker's start
  included).

    flock /tmp/bench.lock .venv/bin/python bench/slurm_pilots.py [--jobs N] [--pilots P]
        [--modes pilot,direct]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time

if not __package__:  # run as a file: make "tests" and "bench" importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.slurm import start_cluster, unavailable  # noqa: E402
from tests.test_twistd import BIN, Twistd  # noqa: E402

LIVE = ("PENDING", "RUNNING", "COMPLETING", "CONFIGURING")


# Seconds between two looks at whether a run of jobs is over (a squeue, or
# a GET of the dispatcher's counts): each look is work for slurmctld or the
# dispatcher while the jobs run, so not every 20 ms; the end is found
# within this, a fraction of a percent of a run of a hundred jobs.
RUN_LOOK = 0.1


def wait_until(condition, timeout, what, interval=0.02):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(interval)


def sbatch_loop(cluster, count):
    """Seconds for C{count} `true` jobs by a loop of sbatch, to the last end."""
    began = time.monotonic()
    for _ in range(count):
        cluster.run("sbatch", "--parsable", "--output=/dev/null", "--job-name=baseline",
                    "--wrap", "true")
    wait_until(lambda: not [j for j in cluster.jobs() if j[1] in LIVE], 3600,
               "the sbatch loop's jobs", RUN_LOOK)
    return time.monotonic() - began


def sbatch_latency(cluster, directory, count):
    """Seconds from sbatch to the job's first command, one job at a time."""
    found = []
    for i in range(count):
        mark = os.path.join(directory, f"started-{i}")
        began = time.time()
        cluster.run("sbatch", "--parsable", "--output=/dev/null", "--job-name=latency",
                    "--wrap", f"date +%s.%N > {mark}")
        wait_until(lambda: os.path.exists(mark) and open(mark).read().strip(), 120,
                   "a job to start")
        found.append(float(open(mark).read()) - began)
        wait_until(lambda: not [j for j in cluster.jobs() if j[1] in LIVE], 120,
                   "the job to end", RUN_LOOK)
    return found


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pilot_dispatcher(directory, pilots, slots):
    port = free_port()
    os.makedirs(directory, exist_ok=True)
    worker_ini = os.path.join(directory, "worker.ini")
    with open(worker_ini, "w") as f:
        f.write("[executor]\nrun_as = root\n[log]\nlevel = warn\n")
    ini = f"""
[executor]
slots = 0

[log]
job_lines = 0

[queue:hpc]
backend = slurm

[backend:slurm]
type = slurm
url = http://127.0.0.1:{port}
time_limit = 3600
max_pilots = {pilots}
slots = {slots}
# One CPU asked of Slurm a pilot whatever its slots: `true` jobs use none,
# and the test node has two.
cpus = 1
idle_timeout = 600
poll_interval = 5
worker_command = {os.path.join(BIN, 'dispatcher')} worker --config {worker_ini}
pilot_dir = {directory}/pilots
"""
    daemon = Twistd(directory, ini, listen=f"tcp:{port}:interface=127.0.0.1")
    daemon.start()
    return daemon


def direct_dispatcher(directory):
    port = free_port()
    os.makedirs(directory, exist_ok=True)
    worker_ini = os.path.join(directory, "worker.ini")
    with open(worker_ini, "w") as f:
        f.write("[executor]\nrun_as = root\n[log]\nlevel = warn\n")
    ini = f"""
[executor]
slots = 0

[log]
job_lines = 0

[queue:hpc]
backend = slurm

[backend:slurm]
type = slurm
mode = direct
url = http://127.0.0.1:{port}
time_limit = 3600
max_jobs = 1000
poll_interval = 5
worker_command = {os.path.join(BIN, 'dispatcher')} worker --config {worker_ini} --log-level warn
pilot_dir = {directory}/nodes
"""
    daemon = Twistd(directory, ini, listen=f"tcp:{port}:interface=127.0.0.1")
    daemon.start()
    return daemon


def succeeded(daemon):
    return daemon.request("GET", "/v1/queues")[1]["queues"]["hpc"]["counts"]["succeeded"]


def measure_direct(directory, count, latency_jobs, results):
    """Direct mode's jobs/s (an array of C{count} `true` jobs) and its
    median latency from submission to the job's first command."""
    daemon = direct_dispatcher(os.path.join(directory, "direct"))
    try:
        latencies = []
        for i in range(latency_jobs):
            mark = os.path.join(directory, f"direct-started-{i}")
            began = time.time()
            code, job = daemon.request("POST", "/v1/jobs", {
                "command": ["sh", "-c", f"date +%s.%N > {mark}"], "queue": "hpc"})
            assert code == 201, job
            finished(daemon, job["id"])
            latencies.append(float(open(mark).read()) - began)
        results["direct_latency_median_s"] = round(statistics.median(latencies), 3)
        done_before = succeeded(daemon)
        began = time.monotonic()
        code, array = daemon.request("POST", "/v1/jobs", {
            "command": ["true"], "queue": "hpc", "array": count})
        assert code == 201, array
        wait_until(lambda: succeeded(daemon) >= done_before + count, 3600,
                   "the direct jobs", RUN_LOOK)
        seconds = time.monotonic() - began
        results["direct_jobs_per_s"] = round(count / seconds, 2)
        results["direct_over_sbatch"] = round(
            results["direct_jobs_per_s"] / results["sbatch_loop_jobs_per_s"], 2)
        metrics = daemon.request("GET", "/v1/queues")[1]
        assert metrics["queues"]["hpc"]["counts"]["failed"] == 0, metrics
    finally:
        if daemon.process.poll() is None:
            daemon.kill(signal.SIGTERM)


def _time(text):
    return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=datetime.timezone.utc).timestamp()


def job_latency(job):
    return _time(job["started_at"]) - _time(job["created_at"])


def finished(daemon, job_id):
    return daemon.wait(job_id, ("succeeded", "failed", "cancelled"), timeout=600)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--pilots", type=int, default=2)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--latency-jobs", type=int, default=10)
    parser.add_argument("--modes", default="pilot,direct",
                        help="the dispatcher's modes measured beside the sbatch loop")
    args = parser.parse_args()
    modes = set(args.modes.split(","))
    why = unavailable()
    if why:
        raise SystemExit(why)
    # SIGTERM (and SIGINT, which a background job ignores) end the run
    # through the cleanup below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    directory = tempfile.mkdtemp(prefix="dispatcher-slurm-bench-")
    os.chmod(directory, 0o755)
    cluster = start_cluster(os.path.join(directory, "slurm"))
    os.environ["SLURM_CONF"] = cluster.conf
    results = {"slurm_started_in_s": round(cluster.started_in, 2), "jobs": args.jobs,
               "pilots": args.pilots, "slots_per_pilot": args.slots}
    daemon = None
    try:
        seconds = sbatch_loop(cluster, args.jobs)
        results["sbatch_loop_jobs_per_s"] = round(args.jobs / seconds, 2)
        results["sbatch_latency_median_s"] = round(
            statistics.median(sbatch_latency(cluster, directory, args.latency_jobs)), 3)
        print(json.dumps(results), flush=True)
        if "direct" in modes:
            measure_direct(directory, args.jobs, args.latency_jobs, results)
            print(json.dumps(results), flush=True)
        if "pilot" in modes:
            daemon = pilot_dispatcher(os.path.join(directory, "dispatcher"), args.pilots,
                                      args.slots)
            code, cold = daemon.request("POST", "/v1/jobs", {"command": ["true"], "queue": "hpc"})
            assert code == 201, cold
            results["pilot_cold_start_s"] = round(job_latency(finished(daemon, cold["id"])), 3)
            # Warm every pilot: as many jobs as they have slots, held a moment.
            code, warm = daemon.request("POST", "/v1/jobs", {
                "command": ["sleep", "2"], "queue": "hpc", "array": args.pilots * args.slots})
            assert code == 201, warm
            wait_until(lambda: len(daemon.request("GET", "/v1/workers")[1]["workers"])
                       >= args.pilots, 300, "the pilots to connect")
            wait_until(lambda: daemon.request("GET", "/v1/queues")[1]["queues"]["hpc"]["counts"]
                       ["succeeded"] >= 1 + args.pilots * args.slots, 300, "the warm-up")
            # As for sbatch: from the submission to the job's own first command.
            latencies = []
            for i in range(args.latency_jobs):
                mark = os.path.join(directory, f"pilot-started-{i}")
                began = time.time()
                code, job = daemon.request("POST", "/v1/jobs", {
                    "command": ["sh", "-c", f"date +%s.%N > {mark}"], "queue": "hpc"})
                finished(daemon, job["id"])
                latencies.append(float(open(mark).read()) - began)
            results["pilot_latency_median_s"] = round(statistics.median(latencies), 3)
            done_before = daemon.request("GET", "/v1/queues")[1]["queues"]["hpc"]["counts"]["succeeded"]
            began = time.monotonic()
            code, array = daemon.request("POST", "/v1/jobs", {
                "command": ["true"], "queue": "hpc", "array": args.jobs})
            assert code == 201, array
            wait_until(lambda: daemon.request("GET", "/v1/queues")[1]["queues"]["hpc"]["counts"]
                       ["succeeded"] >= done_before + args.jobs, 3600, "the pilots' jobs")
            seconds = time.monotonic() - began
            results["pilot_jobs_per_s"] = round(args.jobs / seconds, 1)
            results["pilots_over_sbatch"] = round(
                results["pilot_jobs_per_s"] / results["sbatch_loop_jobs_per_s"], 1)
    finally:
        for job_id, state, _ in cluster.jobs():
            if state in LIVE:
                cluster.run("scancel", "--signal=KILL", "--full", job_id, check=False)
        wait_until(lambda: not [j for j in cluster.jobs() if j[1] in LIVE], 60,
                   "the jobs to end")
        if daemon is not None and daemon.process.poll() is None:
            daemon.kill(signal.SIGTERM)
        cluster.stop()
        shutil.rmtree(directory, ignore_errors=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
