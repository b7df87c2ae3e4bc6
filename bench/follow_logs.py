"""
What following logs costs the daemon: a real C{twistd -n dispatcher} runs
N command jobs (1,000 by default), and N clients follow their logs
(C{GET /v1/jobs/ID/log?follow=true}).

    python bench/follow_logs.py [--jobs N] [--seconds S]

Three windows of S seconds each (10 by default), the daemon's CPU (all its
threads: the reactor and the I/O pool that looks at the files) measured
in each from /proc:

  1. the jobs run and write nothing, nobody follows (the baseline);
  2. every job followed, the jobs still quiet: what the shared timer's
     looks at the files cost (every POLL_INTERVAL, one trip to the I/O
     pool stats every waiting follower's file);
  3. every job writes a line a second (its time of writing), followed:
     what delivering costs, and how late each line arrives (p50, p99).

It prints one table.  Take the bench lock (C{flock /tmp/bench.lock}); run as
root it runs the jobs as root (C{run_as = root}).  Not part of the test
suite.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

if not __package__:  # run as a file: make "bench" importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.harness import percentile, process_cpu_seconds

BIN = os.path.dirname(sys.executable)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = """\
[server]
listen = tcp:0:interface=127.0.0.1
access_log = no
max_connections_per_address = none
[dispatcher]
data_dir = {data_dir}
shutdown_grace = 1
[executor]
slots = {slots}
{run_as}
[api]
max_log_followers = {followers}
"""

# Each job waits for the go file, then writes its time once a second:
# bash builtins alone (a read that times out on a FIFO nobody writes is
# the sleep), so 1,000 jobs fork nothing and leave the cores to the
# daemon (with date and sleep, 2,000 forks a second took both cores and
# the lines came seconds late).
JOB = (
    "exec 3<>{fifo}; "
    "until [ -e {go} ]; do read -t 0.2 -u 3; done; "
    "while :; do echo $EPOCHREALTIME; read -t 1 -u 3; done"
)


class Followers:
    """N follows on raw sockets, read in one thread: each line's delay
    from the time it carries to its arrival."""

    def __init__(self, port: int, token: str, ids: list[str]) -> None:
        self.selector = selectors.DefaultSelector()
        self.delays: list[float] = []
        self.recording = False
        self.stopped = False
        self.open = 0
        for job_id in ids:
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(
                f"GET /v1/jobs/{job_id}/log?follow=true HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Authorization: Bearer {token}\r\n\r\n".encode())
            sock.setblocking(False)
            self.selector.register(sock, selectors.EVENT_READ, [b""])
            self.open += 1
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped:
            for key, _ in self.selector.select(0.2):
                try:
                    data = key.fileobj.recv(65536)
                except BlockingIOError:
                    continue
                now = time.time()
                if not data:
                    self.selector.unregister(key.fileobj)
                    self.open -= 1
                    continue
                if self.recording:
                    # Chunk framing aside, the lines are the jobs' times.
                    for text in re.findall(rb"^(\d{10}\.\d+)\r?$", data, re.M):
                        self.delays.append(now - float(text))

    def close(self) -> None:
        self.stopped = True
        self.thread.join()
        for key in list(self.selector.get_map().values()):
            key.fileobj.close()


def request(url: str, token: str, method: str, path: str, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method=method, headers={
        "Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def cpu(pid: int) -> float:
    user, system = process_cpu_seconds(pid)
    return user + system


def window(pid: int, seconds: float) -> float:
    """Percent of a core the daemon used over the next C{seconds}."""
    start, t0 = cpu(pid), time.monotonic()
    time.sleep(seconds)
    return 100.0 * (cpu(pid) - start) / (time.monotonic() - t0)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args(argv)
    work = tempfile.mkdtemp(prefix="follow-bench-")
    go = os.path.join(work, "go")
    fifo = os.path.join(work, "never")
    os.mkfifo(fifo)
    os.chmod(work, 0o755)
    config = os.path.join(work, "dispatcher.ini")
    with open(config, "w") as f:
        f.write(CONFIG.format(
            data_dir=os.path.join(work, "data"), slots=args.jobs,
            followers=max(4096, 4 * args.jobs),
            run_as="run_as = root" if os.geteuid() == 0 else ""))
    log = open(os.path.join(work, "out.log"), "wb")
    daemon = subprocess.Popen(
        [os.path.join(BIN, "twistd"), "-n", "--pidfile", "", "dispatcher", "--config", config],
        cwd=work, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env=dict(os.environ, PYTHONPATH=ROOT))
    followers = None
    try:
        deadline = time.monotonic() + 30
        while True:
            text = open(os.path.join(work, "out.log")).read()
            found = re.findall(r"dispatcher listening on [\d.]+:(\d+)", text)
            if found:
                break
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the daemon did not start:\n{text}")
            time.sleep(0.1)
        port = int(found[-1])
        url = f"http://127.0.0.1:{port}"
        token = open(os.path.join(work, "data", "admin.token")).read().strip()
        command = ["bash", "-c", JOB.format(go=go, fifo=fifo)]
        ids = []
        for start in range(0, args.jobs, 1000):
            batch = request(url, token, "POST", "/v1/jobs/batch", {
                "jobs": [{"command": command}] * min(1000, args.jobs - start)})
            ids += [job["id"] for job in batch["jobs"]]
        deadline = time.monotonic() + 120
        while True:
            counts = request(url, token, "GET", "/v1/queues")["queues"]["default"]["counts"]
            if counts["running"] == args.jobs:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"the jobs did not all start: {counts}")
            time.sleep(0.5)
        time.sleep(2)
        rows = [("jobs running, quiet, no follower", window(daemon.pid, args.seconds), "")]
        followers = Followers(port, token, ids)
        time.sleep(2)
        rows.append((f"{args.jobs} followers, jobs quiet",
                     window(daemon.pid, args.seconds), ""))
        open(go, "w").close()
        time.sleep(3)
        followers.recording = True
        busy = window(daemon.pid, args.seconds)
        followers.recording = False
        delays = sorted(followers.delays)
        rows.append((
            f"{args.jobs} followers, each job a line a second", busy,
            f"{len(delays)} lines; delay p50 {1000 * percentile(delays, 50):.0f} ms, "
            f"p99 {1000 * percentile(delays, 99):.0f} ms",
        ))
        assert followers.open == args.jobs, f"{followers.open} follows open"
        print(f"{'window':<46} {'daemon CPU':>11}  delivery")
        for name, share, note in rows:
            print(f"{name:<46} {share:>9.1f} %  {note}")
    finally:
        if followers is not None:
            followers.close()
        daemon.terminate()
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            daemon.kill()
        log.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
