"""
The chaos suite (issue 14): a real C{twistd -n dispatcher} with local
slots and two real C{dispatcher worker} processes, under a steady load of
jobs, through one fault per scenario; then every job is brought to a final
state (or the deadline passes) and the ledger the jobs kept is checked
against what the dispatcher recorded.

    .venv/bin/python bench/chaos.py                 # every scenario, 6 to 10 minutes
    .venv/bin/python bench/chaos.py --quick         # shorter leases and faults, about 3 minutes
    .venv/bin/python bench/chaos.py --only daemon-stop,disk-full
    .venv/bin/python -m bench.chaos --report        # rewrite the page from its JSON

It needs root (the disk-full scenario mounts a tmpfs), C{flock} and C{sh}.
A full run of every scenario rewrites docs/reliability.md and
docs/reliability.json; every run writes C{bench/results/chaos-latest.json}
(C{--out}).  It exits 0 only when every scenario it ran passed.  It is not
part of the test suite; tests/test_chaos_ledger.py checks its pure pieces.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import errno
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import string
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

import attrs

if not __package__:  # run as a file: make "bench" importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import chaos_ledger as L
from bench.chaos_proxy import BLACKHOLE, DELAY, PASS, RESET, Proxy
from bench.machine import cpu_model

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DOCS = ROOT / "docs" / "reliability.md"
DOCS_JSON = ROOT / "docs" / "reliability.json"
TOKEN = "chaos-worker-token-0123456789"
DATABASE = "dispatcher.sqlite3"
WORKERS = ("w0", "w1")
LOCAL_SLOTS = 2
WORKER_SLOTS = 2
# Long jobs submitted just before each fault, so that it finds some running.
BURST = 3

_T0 = time.monotonic()


def say(message: str) -> None:
    """One line of progress, stamped with the seconds since the run began."""
    print(f"[{time.monotonic() - _T0:7.1f}s] {message}", flush=True)


@attrs.frozen
class Timing:
    """
    How long each part of a scenario lasts, and the load.

    @ivar lease: the dispatcher's C{[workers] lease_seconds}.
    @ivar warmup: seconds of load before the fault.
    @ivar fault: how long a fault lasts (longer than a lease).
    @ivar post: seconds of load after the fault.
    @ivar drain: the deadline, after the load stops, for every job to end.
    @ivar rate: jobs submitted a second.
    @ivar short: the range of a short job's seconds.
    @ivar long: a long job's seconds (longer than the fault).
    @ivar long_share: the share of long jobs.
    @ivar kills: how many times a kill scenario kills.
    """

    lease: float
    warmup: float
    fault: float
    post: float
    drain: float
    rate: float
    short: tuple[float, float]
    long: float
    long_share: float
    kills: int


FULL = Timing(lease=6, warmup=8, fault=12, post=8, drain=60, rate=2.0,
              short=(0.2, 1.5), long=14, long_share=0.1, kills=3)
QUICK = Timing(lease=2, warmup=2, fault=4, post=2, drain=30, rate=3.0,
               short=(0.1, 1.0), long=5, long_share=0.1, kills=1)


# Processes


def free_port() -> int:
    """A port free on loopback now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pid_alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


@attrs.frozen
class StartFailure(Exception):
    """
    The daemon did not come to serve: it exited (C{exit_code}) or neither
    listened nor exited within the time allowed (C{exit_code} C{None}).
    """

    exit_code: Optional[int]
    output: str
    seconds: float


class Managed:
    """A process of the rig: its main process, which may be signalled or
    killed on its own (its spawner helper notices and acts on its own)."""

    process: Optional[subprocess.Popen] = None

    def signal(self, signum: int) -> None:
        """Send a signal to its main process alone (not its spawner)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL, and reap it."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait(30)


class Daemon(Managed):
    """A C{twistd -n dispatcher} on a fixed loopback port, restartable."""

    def __init__(self, workdir: Path, port: int, data_dir: Path, ini: str) -> None:
        self.workdir = workdir
        self.port = port
        self.data_dir = data_dir
        self.url = f"http://127.0.0.1:{port}"
        self.config = workdir / "dispatcher.ini"
        self.config.write_text(ini)
        self.logpath = workdir / "daemon.log"
        self.process: Optional[subprocess.Popen] = None
        self.starts = 0

    def start(self, timeout: float = 20.0) -> float:
        """
        Start it and wait until it listens; the seconds that took.  Raises
        L{StartFailure} when it exits first or never listens.
        """
        offset = self.logpath.stat().st_size if self.logpath.exists() else 0
        args = [str(BIN / "twistd"), "-n", "--pidfile", "", "dispatcher",
                "--config", str(self.config),
                "--listen", f"tcp:{self.port}:interface=127.0.0.1",
                "--data-dir", str(self.data_dir)]
        began = time.monotonic()
        with open(self.logpath, "ab") as log:
            self.process = subprocess.Popen(
                args, cwd=str(self.workdir), stdout=log, stderr=subprocess.STDOUT,
                env=dict(os.environ, PYTHONPATH=str(ROOT)), start_new_session=True)
        self.starts += 1
        while True:
            text = self.output(offset)
            if "dispatcher listening on" in text:
                return time.monotonic() - began
            code = self.process.poll()
            if code is not None:
                raise StartFailure(code, text, time.monotonic() - began)
            if time.monotonic() - began > timeout:
                self.signal(signal.SIGKILL)
                self.process.wait(10)
                raise StartFailure(None, text, time.monotonic() - began)
            time.sleep(0.05)

    def output(self, offset: int = 0) -> str:
        """Its log from C{offset}."""
        with open(self.logpath, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")


    @property
    def serving(self) -> bool:
        return self.process is not None and self.process.poll() is None


# The chaos jobs keep their ledger in this suite's own directory, which
# nobody (a root daemon's default account for jobs) cannot reach: the
# daemon and the workers run them as root, said so.
RUN_AS = "[executor]\nrun_as = root\n"


class Worker(Managed):
    """A C{dispatcher worker} process, restartable under the same name."""

    def __init__(self, workdir: Path, name: str, url: str, token_file: Path) -> None:
        self.name = name
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.url = url
        self.token_file = token_file
        self.config = self.dir / "worker.ini"
        self.config.write_text(RUN_AS)
        self.process: Optional[subprocess.Popen] = None

    def start(self) -> None:
        args = [str(BIN / "dispatcher"), "worker", "--url", self.url,
                "--config", str(self.config),
                "--token-file", str(self.token_file), "--slots", str(WORKER_SLOTS),
                "--name", self.name, "--data-dir", str(self.dir / "data"),
                "--cpus", "2", "--memory", "1024", "--gpus", "0", "--grace", "2"]
        with open(self.dir / "worker.log", "ab") as log:
            self.process = subprocess.Popen(
                args, cwd=str(self.dir), stdout=log, stderr=subprocess.STDOUT,
                env=dict(os.environ, PYTHONPATH=str(ROOT)), start_new_session=True)



# HTTP


def http(method: str, url: str, body: Any = None, headers: Optional[dict] = None,
         timeout: float = 5.0) -> tuple[Any, Any]:
    """
    One request: (status, decoded JSON or text), or (a short word for what
    went wrong: "timeout", "refused", "reset", "error", None).
    """
    data = None if body is None else json.dumps(body).encode()
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    request = urllib.request.Request(url, data=data, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
            status = response.status
    except urllib.error.HTTPError as e:
        raw, status = e.read(), e.code
    except (TimeoutError, socket.timeout):
        return "timeout", None
    except urllib.error.URLError as e:
        reason = e.reason
        if isinstance(reason, (TimeoutError, socket.timeout)):
            return "timeout", None
        if isinstance(reason, ConnectionRefusedError):
            return "refused", None
        return "error", None
    except (ConnectionError, OSError) as e:
        if isinstance(e, ConnectionResetError):
            return "reset", None
        return "error", None
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


# The load


@attrs.define
class Submission:
    """One answer the load got: when it asked, when it heard, what."""

    sent: float
    answered: float
    outcome: Any


class Load:
    """
    Submits chaos jobs at a steady rate from a thread of its own, each
    with an Idempotency-Key it resends (after a timeout, a refused
    connection or a 5xx) until the job is acknowledged or the load stops.
    """

    def __init__(self, url: str, chaos_dir: Path, timing: Timing, scenario: str,
                 seed: int) -> None:
        self.url = url
        self.chaos_dir = chaos_dir
        self.timing = timing
        self.scenario = scenario
        self.rng = random.Random(seed)
        self.acknowledged: dict[str, float] = {}
        self.seconds: dict[str, float] = {}
        self.answers: list[Submission] = []
        self.submitted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="chaos-load")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def body(self, n: int, seconds: Optional[float] = None,
             attempts: Optional[int] = None) -> dict:
        t = self.timing
        if seconds is None:
            seconds = (t.long if self.rng.random() < t.long_share
                       else self.rng.uniform(*t.short))
        return {
            "command": ["sh", "-c", L.JOB_SCRIPT, "chaos-job", f"{seconds:.2f}"],
            "env": {"CHAOS_DIR": str(self.chaos_dir)},
            "name": f"{self.scenario}-{n}",
            "labels": {"chaos": self.scenario},
            # Half the jobs have one attempt (a success recorded failed shows
            # as such), half have three (it shows as a second success).
            "max_attempts": attempts or (1 if n % 2 == 0 else 3),
            "retry_delay": 0.5,
        }

    def _run(self) -> None:
        due = time.monotonic()
        n = 0
        while not self._stop.is_set():
            wait = due - time.monotonic()
            if wait > 0 and self._stop.wait(wait):
                break
            self._submit(n, self.body(n), str(uuid.uuid4()))
            n += 1
            self.submitted = n
            due = max(due + 1 / self.timing.rate, time.monotonic() - 1)

    def burst(self, count: int) -> list[str]:
        """
        Submit C{count} long jobs now, from the caller's thread, beside the
        steady load; their ids (those acknowledged).  Each has three
        attempts: a fault that hands one out again while it still runs
        shows as an overlap rather than as a failure.
        """
        ids = []
        for i in range(count):
            job_id = self._submit(f"burst-{i}", self.body(i, self.timing.long, 3),
                                  str(uuid.uuid4()))
            if job_id:
                ids.append(job_id)
        return ids

    def _submit(self, n: Any, body: dict, key: str) -> Optional[str]:
        while not self._stop.is_set():
            sent = time.time()
            status, answer = http("POST", self.url + "/v1/jobs", body,
                                  {"Idempotency-Key": key}, timeout=5)
            self.answers.append(Submission(sent, time.time(), status))
            if status in (200, 201) and isinstance(answer, dict):
                self.acknowledged[answer["id"]] = time.time()
                self.seconds[answer["id"]] = float(body["command"][-1])
                return answer["id"]
            if isinstance(status, int) and 400 <= status < 500 and status not in (408, 429):
                say(f"  load: job {n} refused for good: {status} {answer}")
                return None
            self._stop.wait(0.2)
        return None

    def first_ack_after(self, after: float) -> Optional[float]:
        """Seconds from C{after} to the first acknowledgement heard after it."""
        times = [a.answered for a in self.answers
                 if a.outcome in (200, 201) and a.answered >= after]
        return min(times) - after if times else None

    def outcomes(self, start: float = 0.0, end: float = float("inf")) -> dict[str, int]:
        """How many answers of each kind were heard between two times."""
        counts = collections.Counter(str(a.outcome) for a in self.answers
                                     if start <= a.answered <= end)
        return dict(sorted(counts.items()))


# The rig: one scenario's processes


class Rig:
    """
    A scenario's world under C{workdir}: the daemon (its data directory on
    a small tmpfs when asked), two workers (through the proxy when asked),
    the ledger and the load.
    """

    def __init__(self, workdir: Path, timing: Timing, scenario: str,
                 proxy: bool = False, tmpfs_mb: Optional[int] = None) -> None:
        self.workdir = workdir
        self.timing = timing
        self.scenario = scenario
        self.chaos_dir = workdir / "chaos"
        (self.chaos_dir / "locks").mkdir(parents=True)
        (self.chaos_dir / "ledger").touch()
        self.token_file = workdir / "worker.token"
        self.token_file.write_text(TOKEN + "\n")
        self.token_file.chmod(0o600)
        self.data_dir = workdir / "data"
        self.data_dir.mkdir()
        self.tmpfs = False
        if tmpfs_mb:
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={tmpfs_mb}m", "tmpfs",
                            str(self.data_dir)], check=True)
            self.tmpfs = True
        ini = (f"{RUN_AS}slots = {LOCAL_SLOTS}\nkill_grace = 1\n\n"
               f"[dispatcher]\nshutdown_grace = 2\n\n"
               f"[workers]\ntoken_file = {self.token_file}\nlease_seconds = {timing.lease:g}\n")
        self.daemon = Daemon(workdir, free_port(), self.data_dir, ini)
        self.proxy: Optional[Proxy] = None
        if proxy:
            self.proxy = Proxy(self.daemon.port)
        self.workers: dict[str, Worker] = {}
        self.load: Optional[Load] = None

    def start(self) -> None:
        seconds = self.daemon.start()
        say(f"  daemon listening on {self.daemon.url} after {seconds:.1f} s")
        url = self.daemon.url
        if self.proxy is not None:
            self.proxy.start()
            url = f"http://127.0.0.1:{self.proxy.port}"
            say(f"  proxy on {url} in front of it")
        for name in WORKERS:
            worker = Worker(self.workdir, name, url, self.token_file)
            worker.start()
            self.workers[name] = worker
        deadline = time.monotonic() + 20
        while True:
            status, answer = http("GET", self.daemon.url + "/v1/workers")
            names = {w.get("name") for w in answer.get("workers", [])} \
                if status == 200 and isinstance(answer, dict) else set()
            if set(WORKERS) <= names:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the workers did not connect: {status} {answer}")
            time.sleep(0.1)
        say(f"  workers {', '.join(WORKERS)} connected")
        self.load = Load(self.daemon.url, self.chaos_dir, self.timing, self.scenario,
                         seed=hash(self.scenario) & 0xFFFF)
        self.load.start()

    def runs(self) -> list[L.Run]:
        return L.parse_ledger((self.chaos_dir / "ledger").read_text(errors="replace"))

    def running_jobs(self) -> dict[str, str]:
        """The jobs running now, and their holders, as the daemon says."""
        status, answer = http("GET", self.daemon.url + "/v1/jobs?state=running&limit=1000")
        if status != 200 or not isinstance(answer, dict):
            return {}
        return {j["id"]: j.get("worker") for j in answer["jobs"]}

    def teardown(self) -> None:
        """
        Stop everything this scenario started: the load, the proxy, the
        daemon and the workers (by pid), any job process still alive (found
        by the scenario's directory in its environment), then the tmpfs.
        """
        if self.load is not None:
            self.load.stop()
        for worker in self.workers.values():
            worker.kill()
        self.daemon.kill()
        if self.proxy is not None and self.proxy.port is not None:
            self.proxy.stop()
        kill_jobs_of(self.chaos_dir)
        if self.tmpfs:
            for _ in range(20):
                if subprocess.run(["umount", str(self.data_dir)],
                                  capture_output=True).returncode == 0:
                    break
                time.sleep(0.25)
            else:
                subprocess.run(["umount", "-l", str(self.data_dir)], capture_output=True)


def kill_jobs_of(chaos_dir: Path) -> int:
    """SIGKILL every process whose environment names this scenario's
    directory: the jobs its processes left behind.  How many there were."""
    needle = f"CHAOS_DIR={chaos_dir}\0".encode()
    killed = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read():
                    os.kill(int(entry), signal.SIGKILL)
                    killed += 1
        except (OSError, ProcessLookupError):
            continue
    return killed


# Faults


@attrs.define
class Fault:
    """
    What a scenario's fault did.

    @ivar start: when it began (seconds since the epoch).
    @ivar end: when it was over: the process continued or restarted, the
        proxy passing again, the disk freed.
    @ivar affected: the holders it hit, when not all (recovery is timed to
        the first of their jobs to finish).
    @ivar refused: why the daemon did not serve again, if it did not.
    @ivar notes: what else was seen.
    """

    start: float
    end: float = 0.0
    affected: Optional[frozenset[str]] = None
    refused: Optional[StartFailure] = None
    notes: list[str] = attrs.field(factory=list)


def restart(rig: Rig, fault: Fault) -> bool:
    """Start the daemon again; note and keep why not."""
    try:
        seconds = rig.daemon.start()
        say(f"  daemon back after {seconds:.1f} s")
        return True
    except StartFailure as e:
        fault.refused = e
        how = "hung (neither served nor exited)" if e.exit_code is None \
            else f"exited {e.exit_code}"
        say(f"  daemon did not come back: {how} after {e.seconds:.1f} s")
        return False


def sleep_while(seconds: float) -> None:
    time.sleep(max(0.0, seconds))


def until(condition: Callable[[], Any], timeout: float) -> bool:
    """Poll condition() until it is true (True) or timeout seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def daemon_kill(rig: Rig) -> Fault:
    """kill -9 the daemon under load and start it again at once, C{kills} times."""
    fault = Fault(start=time.time())
    for i in range(rig.timing.kills):
        if i:
            sleep_while(rig.timing.fault / rig.timing.kills)
        say(f"  kill -9 daemon (pid {rig.daemon.process.pid})")
        rig.daemon.signal(signal.SIGKILL)
        rig.daemon.process.wait(10)
        fault.end = time.time()
        if not restart(rig, fault):
            break
    return fault


def busiest_worker(rig: Rig) -> str:
    """The worker running the most seconds of jobs now (the first on a tie)."""
    work: dict[str, float] = collections.defaultdict(float)
    for job_id, holder in rig.running_jobs().items():
        work[holder] += rig.load.seconds.get(job_id, 1.0)
    return max(WORKERS, key=lambda name: work[name])


def worker_kill(rig: Rig) -> Fault:
    """kill -9 the busiest worker's main process and restart it at once,
    C{kills} times."""
    fault = Fault(start=time.time())
    hit = set()
    for i in range(rig.timing.kills):
        if i:
            sleep_while(rig.timing.fault / rig.timing.kills)
        name = busiest_worker(rig)
        hit.add(name)
        worker = rig.workers[name]
        say(f"  kill -9 worker {name} (pid {worker.process.pid})")
        worker.signal(signal.SIGKILL)
        worker.process.wait(10)
        fault.end = time.time()
        worker.start()
    fault.affected = frozenset(hit)
    return fault


def daemon_stop(rig: Rig) -> Fault:
    """SIGSTOP the daemon's main process for longer than a lease."""
    say(f"  SIGSTOP daemon (pid {rig.daemon.process.pid}) for {rig.timing.fault:g} s")
    fault = Fault(start=time.time())
    rig.daemon.signal(signal.SIGSTOP)
    sleep_while(rig.timing.fault)
    rig.daemon.signal(signal.SIGCONT)
    fault.end = time.time()
    say("  SIGCONT daemon")
    return fault


def worker_stop(rig: Rig) -> Fault:
    """SIGSTOP the busiest worker's main process (its jobs and spawner run
    on) for longer than a lease."""
    name = busiest_worker(rig)
    worker = rig.workers[name]
    say(f"  SIGSTOP worker {name} (pid {worker.process.pid}) for {rig.timing.fault:g} s")
    fault = Fault(start=time.time(), affected=frozenset({name}))
    worker.signal(signal.SIGSTOP)
    sleep_while(rig.timing.fault)
    worker.signal(signal.SIGCONT)
    fault.end = time.time()
    say(f"  SIGCONT worker {name}")
    return fault


def proxy_fault(mode: str) -> Callable[[Rig], Fault]:
    def inject(rig: Rig) -> Fault:
        delay = rig.timing.lease / 2 if mode == DELAY else 0.0
        what = f"{mode} ({delay:g} s each way)" if mode == DELAY else mode
        say(f"  proxy: {what} for {rig.timing.fault:g} s")
        fault = Fault(start=time.time(), affected=frozenset(WORKERS))
        rig.proxy.set_mode(mode, delay)
        sleep_while(rig.timing.fault)
        rig.proxy.set_mode(PASS)
        fault.end = time.time()
        say("  proxy: pass")
        if mode == BLACKHOLE:
            fault.notes.append(f"the proxy dropped {rig.proxy.dropped_bytes} bytes")
        if mode == RESET:
            fault.notes.append(f"the proxy reset {rig.proxy.resets} connections")
        return fault
    inject.__doc__ = f"The proxy between the workers and the daemon: {mode}."
    return inject


def fill(directory: Path) -> Path:
    """Fill a file system with one file until it refuses another byte."""
    filler = directory / "chaos-filler"
    chunk = b"\0" * (1 << 20)
    with open(filler, "wb", buffering=0) as f:
        for size in (1 << 20, 4096, 1):
            block = chunk[:size]
            try:
                while True:
                    f.write(block)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
    return filler


def disk_full(rig: Rig) -> Fault:
    """Fill the daemon's data directory (a tmpfs) for longer than a lease,
    then free it."""
    say(f"  filling the data directory's tmpfs for {rig.timing.fault:g} s")
    log_before = rig.daemon.logpath.stat().st_size
    fault = Fault(start=time.time())
    filler = fill(rig.data_dir)
    sleep_while(rig.timing.fault)
    filler.unlink()
    fault.end = time.time()
    grown = rig.daemon.logpath.stat().st_size - log_before
    fault.notes.append(f"the daemon's log grew {grown / 1024:.0f} KiB while the disk was full")
    say("  disk freed")
    return fault


def flip(path: Path, offset: int, count: int) -> None:
    """Invert C{count} bytes of a file from C{offset}."""
    with open(path, "r+b") as f:
        f.seek(offset)
        data = f.read(count)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))
        f.flush()
        os.fsync(f.fileno())


def damage_database(rig: Rig) -> Fault:
    """Stop the daemon (SIGTERM), invert 64 bytes in the middle of its
    database, and start it again."""
    fault = Fault(start=time.time())
    say("  SIGTERM daemon")
    rig.daemon.signal(signal.SIGTERM)
    rig.daemon.process.wait(30)
    database = rig.data_dir / DATABASE
    data = database.read_bytes()
    page_size = struct.unpack(">H", data[16:18])[0]
    page_size = 65536 if page_size == 1 else page_size
    pages = len(data) // page_size
    page = rows_page(data, page_size)
    # The last bytes of a table's leaf page are the content of its first
    # cell: damage to a row, not to free space no reader ever looks at.
    offset = (page + 1) * page_size - 64
    flip(database, offset, 64)
    note = (f"inverted 64 bytes at offset {offset} (page {page + 1} of {pages}, "
            f"a leaf of rows) of {DATABASE}")
    wal = rig.data_dir / (DATABASE + "-wal")
    if wal.exists() and wal.stat().st_size:
        note += f"; a WAL of {wal.stat().st_size} bytes was left beside it"
    fault.notes.append(note)
    say(f"  {note}")
    fault.end = time.time()
    restart(rig, fault)
    return fault


def rows_page(data: bytes, page_size: int) -> int:
    """The index (from 0) of the table leaf page holding rows nearest the
    middle of the database file C{data}: a page whose damage hits data."""
    pages = len(data) // page_size
    leaves = []
    for page in range(1, pages):
        header = data[page * page_size:page * page_size + 8]
        cells = struct.unpack(">H", header[3:5])[0]
        content = struct.unpack(">H", header[5:7])[0] or 65536
        # 0x0D: a leaf of a table b-tree; its cells fill the page's end.
        if header[0] == 0x0D and cells and page_size - content >= 64:
            leaves.append(page)
    if not leaves:
        return max(1, pages // 2)
    return min(leaves, key=lambda page: abs(page - pages // 2))


def wal_frames(data: bytes) -> tuple[int, int]:
    """A WAL's page size and how many frames follow its header with the
    header's salt (the frames of its current generation)."""
    page_size = struct.unpack(">I", data[8:12])[0]
    salt = data[16:24]
    frames = 0
    while True:
        at = 32 + frames * (24 + page_size)
        if at + 24 + page_size > len(data) or data[at + 8:at + 16] != salt:
            return page_size, frames
        frames += 1


def damage_wal(rig: Rig) -> Fault:
    """kill -9 the daemon, invert 8 bytes of one WAL frame's page (frame
    10, or the middle one of fewer), and start it again."""
    fault = Fault(start=time.time())
    say(f"  kill -9 daemon (pid {rig.daemon.process.pid})")
    rig.daemon.signal(signal.SIGKILL)
    rig.daemon.process.wait(10)
    wal = rig.data_dir / (DATABASE + "-wal")
    data = wal.read_bytes() if wal.exists() else b""
    if len(data) < 32:
        fault.notes.append("no WAL was left to damage")
    else:
        page_size, frames = wal_frames(data)
        frame = 10 if frames >= 20 else max(1, frames // 2)
        offset = 32 + (frame - 1) * (24 + page_size) + 24 + page_size // 2
        flip(wal, offset, 8)
        note = f"inverted 8 bytes of WAL frame {frame} of {frames} (offset {offset})"
        fault.notes.append(note)
        say(f"  {note}")
    fault.end = time.time()
    restart(rig, fault)
    return fault


@attrs.frozen
class Scenario:
    """
    One fault and how to set the world up for it.

    @ivar damage: the right outcome is that the daemon refuses to start,
        naming the damage.
    """

    name: str
    inject: Callable[[Rig], Fault]
    what: str
    proxy: bool = False
    tmpfs_mb: Optional[int] = None
    damage: bool = False


SCENARIOS = [
    Scenario("daemon-kill", daemon_kill,
             "kill -9 of the daemon under load, restarted at once (3 times; 1 with --quick)"),
    Scenario("worker-kill", worker_kill,
             "kill -9 of the busiest worker's main process, restarted at once "
             "(3 times; 1 with --quick)"),
    Scenario("daemon-stop", daemon_stop, "SIGSTOP of the daemon for 2 leases, then SIGCONT"),
    Scenario("worker-stop", worker_stop,
             "SIGSTOP of the busiest worker's main process for 2 leases, then SIGCONT"),
    Scenario("proxy-blackhole", proxy_fault(BLACKHOLE),
             "the workers' proxy drops every byte both ways for 2 leases", proxy=True),
    Scenario("proxy-delay", proxy_fault(DELAY),
             "the workers' proxy delays every byte half a lease each way for 2 leases",
             proxy=True),
    Scenario("proxy-reset", proxy_fault(RESET),
             "the workers' proxy resets every connection, open or new, for 2 leases",
             proxy=True),
    Scenario("disk-full", disk_full,
             "the daemon's data directory (a 32 MiB tmpfs) full for 2 leases, then freed",
             tmpfs_mb=32),
    Scenario("damage-db", damage_database,
             "SIGTERM, 64 bytes inverted mid-database, restart", damage=True),
    Scenario("damage-wal", damage_wal,
             "kill -9, 8 bytes inverted in WAL frame 10, restart", damage=True),
]
BY_NAME = {s.name: s for s in SCENARIOS}

# How a table's count that broke a promise reads in words.
BROKEN = {
    "lost": "lost", "duplicated": "jobs ran to success twice or more",
    "overlaps": "runs started while another run of their job was alive",
    "succeeded_recorded_failed": "jobs recorded failed after a run exited 0",
    "stuck": "jobs not final by the deadline",
    "phantom": "jobs recorded succeeded with no run that exited 0",
}

# What a refusal to start must say for the damage to count as detected.
NAMES_DAMAGE = re.compile(
    r"corrupt|damage|malformed|integrity|quick_check|lost|high.water|not a database",
    re.IGNORECASE)


# Collecting and judging


def collect(url: str, acknowledged: set[str], scenario: str) -> dict[str, Any]:
    """
    Every job of the scenario the daemon lists, and each acknowledged one
    it does not list asked for alone: a dict, L{L.ABSENT} or
    L{L.UNREADABLE}.
    """
    jobs: dict[str, Any] = {}
    cursor = None
    while True:
        query = f"/v1/jobs?limit=1000&label=chaos={scenario}"
        if cursor:
            query += f"&cursor={cursor}"
        status, answer = http("GET", url + query, timeout=30)
        if status != 200 or not isinstance(answer, dict):
            break
        for job in answer["jobs"]:
            jobs[job["id"]] = job
        cursor = answer.get("next_cursor")
        if not cursor:
            break
    for job_id in acknowledged - set(jobs):
        status, answer = http("GET", f"{url}/v1/jobs/{job_id}", timeout=10)
        if status == 200 and isinstance(answer, dict):
            jobs[job_id] = answer
        elif status == 404:
            jobs[job_id] = L.ABSENT
        else:
            jobs[job_id] = L.UNREADABLE
    return jobs


def recovered(rig: Rig, fault: Fault) -> bool:
    """A job recorded succeeded has finished after the fault (on the
    holders it hit)."""
    status, answer = http(
        "GET", f"{rig.daemon.url}/v1/jobs?state=succeeded&limit=1000&label=chaos={rig.scenario}")
    return (status == 200 and isinstance(answer, dict)
            and L.first_finish_after(answer["jobs"], fault.end, fault.affected) is not None)


def drain(rig: Rig) -> dict[str, Any]:
    """Wait until every job is final or the drain deadline passes; the jobs."""
    deadline = time.monotonic() + rig.timing.drain
    acked = set(rig.load.acknowledged)
    last = None
    while True:
        jobs = collect(rig.daemon.url, acked, rig.scenario)
        # An acknowledged job the daemon cannot show (404, 5xx) will not
        # come back by waiting: it is counted lost without delaying the rest.
        open_ = [j for j, v in jobs.items()
                 if isinstance(v, dict) and v["state"] not in L.FINAL_STATES]
        if not open_:
            say(f"  all {len(jobs)} jobs final")
            return jobs
        if time.monotonic() > deadline:
            say(f"  drain deadline: {len(open_)} of {len(jobs)} jobs not final")
            return jobs
        if len(open_) != last:
            say(f"  waiting for {len(open_)} jobs to end")
            last = len(open_)
        time.sleep(0.5)


def settle_runs(rig: Rig, timeout: float) -> None:
    """Wait (up to C{timeout}) until no run in the ledger is still alive, so
    an orphan that ends after its job was recorded is counted."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [r for r in rig.runs() if r.ended is None and pid_alive(r.pid)]
        if not alive:
            return
        time.sleep(0.25)


def git(*args: str) -> str:
    result = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    return result.stdout.strip()


def machine() -> dict[str, Any]:
    """What the run ran on, and which commit."""
    return {
        "cpu": cpu_model(), "cores": os.cpu_count(), "kernel": platform.release(),
        "python": platform.python_version(), "host": platform.node(),
    }


def run_scenario(scenario: Scenario, timing: Timing, base: Path) -> dict[str, Any]:
    """Run one scenario from a fresh directory; its row of the results."""
    say(f"{scenario.name}: {scenario.what}")
    workdir = base / scenario.name
    row: dict[str, Any] = {"scenario": scenario.name, "what": scenario.what, "notes": []}
    rig = None
    began = time.monotonic()
    try:
        rig = Rig(workdir, timing, scenario.name, proxy=scenario.proxy,
                  tmpfs_mb=scenario.tmpfs_mb)
        rig.start()
        sleep_while(timing.warmup)
        # Long jobs running when the fault strikes: what a stall, a
        # partition or a kill can make run twice at once.
        burst = rig.load.burst(BURST)
        running = until(lambda: set(burst) <= set(rig.running_jobs()), 5)
        say(f"  {len(rig.load.acknowledged)} jobs acknowledged, {len(burst)} long ones "
            f"{'running' if running else 'submitted (not all running yet)'}; fault")
        fault = scenario.inject(rig)
        row["notes"] += fault.notes
        if fault.refused is not None:
            row.update(refused(scenario, rig, fault))
            return row
        sleep_while(timing.post)
        # The load goes on until a job has finished after the fault (on the
        # holders it hit), for up to three leases more: a holder that came
        # back needs new work to show it.
        if not until(lambda: recovered(rig, fault), 3 * timing.lease):
            say("  no job has finished after the fault yet")
        rig.load.stop()
        say(f"  load stopped: {len(rig.load.acknowledged)} acknowledged "
            f"({rig.load.submitted} steady, {len(burst)} long ones before the fault)")
        jobs = drain(rig)
        settle_runs(rig, timing.long + 2)
        counts = L.tally(rig.load.acknowledged, jobs, rig.runs())
        row.update(attrs.asdict(counts))
        row["details"] = details(counts, jobs, rig.runs(), fault.start)
        row["recovery_submit"] = rig.load.first_ack_after(fault.end)
        row["recovery_finish"] = L.first_finish_after(jobs.values(), fault.end,
                                                      fault.affected)
        row["answers"] = rig.load.outcomes()
        row["answers_during_fault"] = rig.load.outcomes(fault.start, fault.end)
        row["notes"].append("submit answers during the fault: "
                            + describe(row["answers_during_fault"]))
        failures = [f"{getattr(counts, name)} {BROKEN[name]}" for name in counts.failures()]
        if counts.acknowledged == 0:
            failures.append("no job acknowledged")
        if row["recovery_finish"] is None:
            failures.append("no job finished after the fault"
                            + (" on " + ", ".join(sorted(fault.affected))
                               if fault.affected else ""))
        if scenario.damage:
            failures.insert(0, "damage not detected: the daemon started on it")
        if scenario.tmpfs_mb:
            wrong = {k: n for k, n in row["answers_during_fault"].items()
                     if k.isdigit() and int(k) >= 500 and k not in ("503", "507")}
            if wrong:
                failures.append("submissions answered " + describe(wrong)
                                + " while the disk was full (507 expected)")
        row["verdict"] = "FAIL" if failures else "PASS"
        row["failures"] = failures
    except Exception as e:
        row["verdict"] = "ERROR"
        row["failures"] = [f"the harness failed: {e!r}"]
        traceback.print_exc()
    finally:
        if rig is not None:
            rig.teardown()
        row["seconds"] = round(time.monotonic() - began, 1)
    say(f"  {row['verdict']}" + (": " + "; ".join(row["failures"]) if row["failures"] else ""))
    return row


def refused(scenario: Scenario, rig: Rig, fault: Fault) -> dict[str, Any]:
    """The row of a scenario whose daemon would not serve again."""
    e = fault.refused
    lines = [line for line in e.output.splitlines() if line.strip()]
    last = lines[-1] if lines else "(no output)"
    rig.load.stop()
    result: dict[str, Any] = {"acknowledged": len(rig.load.acknowledged),
                              "exit_code": e.exit_code, "refusal": last[-400:]}
    if e.exit_code is None:
        how = f"hung for {e.seconds:.0f} s, neither serving nor exiting"
    else:
        how = f"exited {e.exit_code} after {e.seconds:.1f} s"
    result["notes"] = [*fault.notes, f"the daemon {how}: {last[-400:]}"]
    if scenario.damage and e.exit_code is not None and NAMES_DAMAGE.search(e.output):
        result["verdict"] = "DETECTED"
        result["failures"] = []
        if e.exit_code == 0:
            result["notes"].append("it refused, but with exit status 0")
    else:
        result["verdict"] = "FAIL"
        result["failures"] = [f"the daemon did not serve again ({how})"]
    return result


def details(counts: L.Tally, jobs: dict[str, Any], runs: list[L.Run],
            origin: float) -> dict[str, Any]:
    """
    For each job given as an example of a broken promise: its attempts as
    the dispatcher recorded them and its runs as the ledger has them,
    times in seconds from the fault's start.
    """
    def at(t: Optional[float]) -> Optional[float]:
        return None if t is None else round(t - origin, 2)

    found: dict[str, Any] = {}
    for job_id in sorted({j for ids in counts.examples.values() for j in ids}):
        job = jobs.get(job_id)
        found[job_id] = {
            "state": job.get("state") if isinstance(job, dict) else job,
            "attempts": [
                {"number": a.get("number"), "holder": a.get("holder"),
                 "started": at(L.timestamp(a.get("started_at"))),
                 "finished": at(L.timestamp(a.get("finished_at"))),
                 "exit_code": a.get("exit_code"), "error": a.get("error")}
                for a in (job.get("attempts", []) if isinstance(job, dict) else [])],
            "runs": [{"attempt": r.attempt, "pid": r.pid, "started": at(r.started),
                      "ended": at(r.ended), "held": r.held}
                     for r in runs if r.job == job_id],
        }
    return found


def describe(counts: dict[str, int]) -> str:
    return ", ".join(f"{n}×{k}" for k, n in counts.items()) or "none"


# The page


METHOD = string.Template("""\
# Reliability

<!-- Written whole by bench/chaos.py from docs/reliability.json: a full run
replaces it.  Change the method's text in bench/chaos.py, then
`.venv/bin/python -m bench.chaos --report`. -->

What the dispatcher does to its jobs when its processes are killed or
frozen, the network between it and its workers misbehaves, its disk fills
or its files are damaged: the chaos suite of issue 14, and the table of its
latest full run.

## Run it

From the repository root, as root (one scenario mounts a tmpfs), with the
project installed in `.venv`:

```sh
.venv/bin/python bench/chaos.py                    # every scenario, 6 to 10 minutes
.venv/bin/python bench/chaos.py --quick            # shorter leases and faults, about 3 minutes
.venv/bin/python bench/chaos.py --only worker-stop,disk-full
```

It prints its progress and the table, writes `bench/results/chaos-latest.json`,
and exits 0 only if every scenario it ran passed. A full run of every
scenario also rewrites this page and `docs/reliability.json`. It is not part of
the test suite; `tests/test_chaos_ledger.py` checks the ledger's reading on
made-up ledgers.

## Method

Each scenario starts from nothing in a directory of its own: a real
`twistd -n dispatcher` with $local_slots local slots and `lease_seconds = $lease`
($quick_lease with `--quick`), and two real `dispatcher worker` processes
with $worker_slots slots each (through a TCP proxy on asyncio, in the script,
in the proxy scenarios). A load thread submits $rate jobs a second
(`--quick`: $quick_rate), each with an `Idempotency-Key` it resends after a
timeout, a refused connection or a 5xx until the job is acknowledged. Jobs
alternate between 1 and 3 `max_attempts` (a success recorded failed shows
as such with one, as a second success with three); most sleep a fraction
of a second to $short_max s, one in ten sleeps $long s ($quick_long s),
longer than a fault. The load runs $warmup s; then $burst more long jobs,
with 3 attempts each, are submitted and the fault waits (up to 5 s) until
they run, so that it finds long jobs running; the fault lasts $fault s, two
leases, where it has a length, and strikes the worker running the most
seconds of jobs where it strikes one. The load goes on $post s after the
fault (`--quick`: $quick_warmup, $quick_fault and $quick_post s), and
longer, up to three leases, until a job has finished after the fault on
the holders it hit; then the suite waits up to $drain s for every job to
reach a final state, and for the runs still alive to end.

Every job is the same shell script: it appends a `start` line (job id,
`DISPATCHER_ATTEMPT`, pid, time) to a ledger under `flock`, holds an
exclusive `flock` on a lock file of its own job while it runs (its process
group holds it until the last of it dies) and notes in its `start` line if
another run of the same job held it, sleeps, and appends an `end` line as
the last thing it does, so a run with an `end` exited 0.

The columns:

| Column | Meaning |
| --- | --- |
| acked | Jobs acknowledged (201, or 200 for a resent key). |
| lost | Acknowledged jobs the daemon no longer has (404), cannot read (5xx), or did not bring to a final state by the deadline. |
| dup. successes | Jobs that ran to success (wrote their `end`) more than once. |
| overlaps | Runs that started while another run of the same job was alive (the lock was held, or the intervals overlap). |
| succeeded→failed | Jobs recorded `failed` although one of their runs exited 0. |
| stuck | Jobs (acknowledged or listed) not final by the deadline. |
| failed (unrun) | Jobs recorded `failed`, for any reason (a job whose only attempt was killed fails honestly), and in brackets those none of whose runs ever started. Information, not a verdict. |
| recovery: submit | From the end of the fault to the first acknowledgement after it. |
| recovery: finish | From the end of the fault to the first job recorded `succeeded` that finished after it (on the holders the fault hit, where it hit some). |

A scenario passes when lost, dup. successes, overlaps, succeeded→failed
and stuck are all 0, no job was recorded `succeeded` without a run that
exited 0, and a job finished after the fault. The storage scenarios'
right outcome is that the daemon refuses to start, with a non-zero exit
and a line naming the damage: that is **DETECTED**; a daemon that starts on
a damaged database fails the scenario whatever it then loses. **ERROR** is
a failure of the suite itself; a scenario that did not run is not in the
table. For a few of the jobs behind each count that is not 0,
`docs/reliability.json` holds their attempts as the dispatcher recorded
them and their runs as the ledger has them (`details`, times in seconds
from the start of the fault).

The scenarios:

$scenarios

## The latest run

$when, commit `$commit`$dirty, on $machine; $mode run, $duration.

$table

$notes
""")


def page(results: dict[str, Any]) -> str:
    """docs/reliability.md for a run's results."""
    full, quick = FULL, QUICK
    m = results["machine"]
    notes = []
    for row in results["scenarios"]:
        lines = list(row.get("failures", [])) + list(row.get("notes", []))
        notes.append(f"- **{row['scenario']}** ({row['verdict']}): "
                     + ("; ".join(lines) if lines else "nothing to note") + ".")
    return METHOD.substitute(
        local_slots=LOCAL_SLOTS, worker_slots=WORKER_SLOTS, lease=f"{full.lease:g}",
        quick_lease=f"{quick.lease:g}", rate=f"{full.rate:g}", quick_rate=f"{quick.rate:g}",
        short_max=f"{full.short[1]:g}", long=f"{full.long:g}", quick_long=f"{quick.long:g}",
        warmup=f"{full.warmup:g}", fault=f"{full.fault:g}", post=f"{full.post:g}",
        quick_warmup=f"{quick.warmup:g}", quick_fault=f"{quick.fault:g}",
        quick_post=f"{quick.post:g}", drain=f"{full.drain:g}", burst=BURST,
        scenarios="\n".join(f"- `{s.name}`: {s.what}." for s in SCENARIOS),
        when=results["date"], commit=results["commit"][:12],
        dirty=" (with uncommitted changes)" if results.get("dirty") else "",
        machine=f"{m['cpu']}, {m['cores']} cores, Linux {m['kernel']}, Python {m['python']}",
        mode="a quick" if results["quick"] else "a full",
        duration=f"{results['seconds'] / 60:.1f} minutes",
        table=L.table(results["scenarios"], markdown=True),
        notes="\n".join(notes),
    )


def write_docs(results: dict[str, Any]) -> None:
    DOCS_JSON.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    DOCS.write_text(page(results))


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="shorter leases, faults and loads")
    parser.add_argument("--only", default="",
                        help="comma-separated scenarios: " + ", ".join(BY_NAME))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"),
                        help="where chaos-latest.json goes")
    parser.add_argument("--keep", action="store_true",
                        help="keep the scenarios' directories (logs, ledgers, data)")
    parser.add_argument("--report", action="store_true",
                        help="only rewrite docs/reliability.md from docs/reliability.json")
    args = parser.parse_args(argv)
    if args.report:
        DOCS.write_text(page(json.loads(DOCS_JSON.read_text())))
        return 0
    names = [n for n in args.only.split(",") if n] or list(BY_NAME)
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        parser.error(f"unknown scenario {', '.join(unknown)}; "
                     f"choose from {', '.join(BY_NAME)}")
    if os.geteuid() != 0 and "disk-full" in names:
        parser.error("the disk-full scenario mounts a tmpfs: run as root, "
                     "or leave it out with --only")
    for tool in ("flock", "sh", "mount"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is needed")
    timing = QUICK if args.quick else FULL
    base = Path(tempfile.mkdtemp(prefix="chaos-"))
    say(f"chaos suite: {len(names)} scenarios, {'quick' if args.quick else 'full'}, in {base}")
    began = time.monotonic()
    rows = []
    try:
        for name in names:
            rows.append(run_scenario(BY_NAME[name], timing, base))
    except KeyboardInterrupt:
        say("interrupted: the scenarios not run are not in the table")
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "machine": machine(), "quick": args.quick, "timing": attrs.asdict(timing),
        "seconds": round(time.monotonic() - began, 1), "scenarios": rows,
    }
    print()
    print(L.table(rows))
    print()
    for row in rows:
        for line in row.get("failures", []) + row.get("notes", []):
            print(f"{row['scenario']}: {line}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "chaos-latest.json").write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    passed = all(r["verdict"] in ("PASS", "DETECTED") for r in rows) \
        and len(rows) == len(names)
    if not args.quick and not args.only and len(rows) == len(SCENARIOS):
        write_docs(results)
        say(f"wrote {DOCS.relative_to(ROOT)} and {DOCS_JSON.relative_to(ROOT)}")
    say(f"{'every scenario passed' if passed else 'NOT every scenario passed'} "
        f"({sum(r['verdict'] in ('PASS', 'DETECTED') for r in rows)} of {len(names)})")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
