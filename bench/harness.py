"""
The benchmark's process control: the server under test (the daemon or the
stock twisted.web baseline) alone on core 0 with its reactor-hold monitor,
the load (wrk, the harness's client threads, idle connections, remote
workers, py-spy, the store builder) on core 1, every child stopped when the
run ends, and the rounds a measure is repeated in.

Nothing here knows what a measure measures (L{bench.measures}) or how it
is reported (L{bench.report}).
"""

from __future__ import annotations

import ast
import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from bench.profiles import summarize_py_spy
from bench.tasks import TASKS_SECTION

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
PYTHON = sys.executable
SERVER_CORE = 0
LOAD_CORE = 1
# A worker stands for another host: it runs on the load core, so that it
# takes nothing from the dispatcher's core (the local executor's task
# threads, by contrast, share core 0 with the daemon).
WORKER_CORE = LOAD_CORE
HOST = "127.0.0.1"
# The workers' bearer token (at least 16 characters); loopback only.
WORKER_TOKEN = "bench-worker-token-4f1c2a9e7d"


class BenchError(Exception):
    """
    A measure that could not be taken; the message says which and why.
    """


def child_environment(code: Optional[Path] = None) -> dict[str, str]:
    """
    The environment of every Python child of the run: this one's, with the
    repository (or C{code}, another version's tree) on C{PYTHONPATH} so
    that C{-m bench.daemon} and the like import.
    """
    return {**os.environ, "PYTHONPATH": str(code or ROOT)}


# Processes


class Processes:
    """
    Every child process of the run, so that all of them end with it, on
    success, failure or Ctrl-C alike.  Each child leads its own process
    group, and the whole group is signalled.
    """

    def __init__(self) -> None:
        self._children: list[subprocess.Popen] = []

    def start(self, argv: list[str], **kw: Any) -> subprocess.Popen:
        """
        Start C{argv} as the leader of a new process group.
        """
        child = subprocess.Popen(argv, start_new_session=True, **kw)
        self._children.append(child)
        return child

    def start_pinned(self, core: int, argv: list[str], **kw: Any) -> subprocess.Popen:
        """
        Start C{argv} on C{core} alone (C{taskset -c}); its children inherit
        the core.
        """
        return self.start(["taskset", "-c", str(core), *argv], **kw)

    def stop(self, child: subprocess.Popen, timeout: float = 20.0) -> Optional[int]:
        """
        End C{child} (C{SIGTERM}, then C{SIGKILL} after C{timeout}) and
        whatever it left in its process group; returns its exit code.
        """
        if child.poll() is None:
            signal_group(child, signal.SIGTERM)
            try:
                child.wait(timeout)
            except subprocess.TimeoutExpired:
                signal_group(child, signal.SIGKILL)
                child.wait(5)
        # What the child left in its group (a spawner helper, say) goes too.
        signal_group(child, signal.SIGKILL)
        if child in self._children:
            self._children.remove(child)
        return child.returncode

    def stop_all(self) -> None:
        """
        End every child still running, the last started first.
        """
        for child in list(reversed(self._children)):
            try:
                self.stop(child, timeout=10.0)
            except Exception as e:  # keep stopping the others
                print(f"bench: could not stop pid {child.pid}: {e}", file=sys.stderr)

    def communicate(self, child: subprocess.Popen, timeout: float,
                    what: str) -> tuple[bytes, bytes]:
        """
        C{child}'s output once it ended, within C{timeout} seconds (else
        a L{BenchError} saying C{what} took too long); the child is stopped
        either way.
        """
        try:
            return child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BenchError(f"{what} did not end within {timeout:g}s")
        finally:
            self.stop(child)


def signal_group(child: subprocess.Popen, number: int) -> None:
    """
    Send signal C{number} to C{child}'s process group, if it is still there.
    """
    try:
        os.killpg(child.pid, number)
    except (ProcessLookupError, PermissionError):
        pass


def check_pinned(child: subprocess.Popen, core: int, what: str) -> None:
    """
    Fail the run if C{child} may run on any other core than C{core}.
    """
    affinity = os.sched_getaffinity(child.pid)
    if affinity != {core}:
        raise BenchError(f"{what} runs on cores {affinity}, not {core}")


# CPU


def process_cpu_seconds(pid: int) -> tuple[float, float]:
    """
    The user and system CPU seconds process C{pid} (all its threads) has
    used so far (C{utime} and C{stime} of /proc/PID/stat).
    """
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def core_ticks() -> dict[str, tuple[int, int]]:
    """
    Busy and total ticks so far of the server's and the load's core, by
    their /proc/stat names (C{cpu0}, C{cpu1}).
    """
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            name, *fields = line.split()
            if name in (f"cpu{SERVER_CORE}", f"cpu{LOAD_CORE}"):
                ticks = [int(x) for x in fields]
                idle = ticks[3] + ticks[4]
                out[name] = (sum(ticks[:8]) - idle, sum(ticks[:8]))
    return out


def busy_pct(before: dict[str, tuple[int, int]],
             after: dict[str, tuple[int, int]]) -> dict[str, float]:
    """
    How busy each core of L{core_ticks} was between C{before} and
    C{after}, in percent.
    """
    out = {}
    for name, (busy, total) in after.items():
        b0, t0 = before[name]
        out[name] = round(100 * (busy - b0) / max(1, total - t0), 1)
    return out


class CpuUse:
    """
    How busy each core, the server process (all its threads) and this
    harness were between L{start} and L{stop}, in percent of one core.
    """

    def __init__(self, server_pid: int) -> None:
        self._pid = server_pid

    def start(self) -> "CpuUse":
        """
        Begin the window.
        """
        self._t0 = time.monotonic()
        self._cores0 = core_ticks()
        self._split0 = process_cpu_seconds(self._pid)
        self._self0 = time.process_time()
        return self

    def stop(self) -> dict[str, float]:
        """
        The figures from L{start} until now (the window goes on: a second
        call gives the longer window).
        """
        wall = time.monotonic() - self._t0
        out = {}
        for name, pct in busy_pct(self._cores0, core_ticks()).items():
            role = "server_core" if name == f"cpu{SERVER_CORE}" else "load_core"
            out[f"{role}_busy_pct"] = pct
        user, system = process_cpu_seconds(self._pid)
        out["server_process_pct"] = round(
            100 * (user + system - sum(self._split0)) / wall, 1)
        out["server_cpu_s"] = round(user + system - sum(self._split0), 3)
        out["server_user_pct"] = round(100 * (user - self._split0[0]) / wall, 1)
        out["server_system_pct"] = round(100 * (system - self._split0[1]) / wall, 1)
        out["harness_pct"] = round(100 * (time.process_time() - self._self0) / wall, 1)
        return out


# A small HTTP client (one keep-alive connection a thread)


class Client:
    """
    Blocking JSON requests to one server, one persistent connection per
    calling thread.

    @ivar token: the bearer token sent with every request, as a real
        client sends its credential; C{None} sends none.
    """

    def __init__(self, port: int, timeout: float = 30.0,
                 token: Optional[str] = None) -> None:
        self.port = port
        self._timeout = timeout
        self._local = threading.local()
        self.token = token

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = http.client.HTTPConnection(HOST, self.port, timeout=self._timeout)
            self._local.conn = conn
        return conn

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        """
        C{method path} with C{body} as JSON; the answer's status and body.
        """
        data = None if body is None else json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json"} if data is not None else {}
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        for attempt in (1, 2):
            conn = self._connection()
            try:
                conn.request(method, path, body=data, headers=headers)
                response = conn.getresponse()
                return response.status, response.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                # A kept-alive connection the server closed; a GET is safe
                # to send again, a POST is not.
                conn.close()
                self._local.conn = None
                if attempt == 2 or method != "GET":
                    raise
        raise AssertionError("unreachable")

    def json(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """
        L{request}, with the answer's body decoded from JSON.
        """
        status, data = self.request(method, path, body)
        return status, json.loads(data) if data else None

    def get_ok(self, path: str) -> Any:
        """
        C{GET path}, which must answer C{200}: its JSON body.
        """
        status, answer = self.json("GET", path)
        if status != 200:
            raise BenchError(f"GET {path}: {status} {answer}")
        return answer

    def close(self) -> None:
        """
        Close the calling thread's connection.
        """
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


def free_ports(count: int) -> list[int]:
    """
    C{count} distinct free ports: each is held until all are chosen (two
    ports chosen one after the other were once the same, and the daemon
    could not start).
    """
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            s = stack.enter_context(socket.socket())
            s.bind((HOST, 0))
            ports.append(s.getsockname()[1])
        return ports


# Servers under test


class Server:
    """
    The daemon (L{bench.daemon}) or the baseline (L{bench.baseline_server}),
    alone on core 0, with its reactor-hold monitor (L{bench.monitor}) on a
    second loopback port.

    The daemon requires a credential, as it does by default: its L{client}
    sends the admin token the daemon made, which is also L{token}, as a
    real client sends its own.  With C{authentication} false (C{[api]
    authentication = off}) it requires none, and none is sent.

    With C{store_url}, the daemon keeps its jobs in that PostgreSQL
    database (C{[store] url}) instead of its SQLite file; with C{holder},
    its local leases carry that holder name (written to its data
    directory before it starts, where it keeps its name), so that two
    daemons on one host and one database have names of their own.
    C{core} is the core it runs on (another than L{SERVER_CORE} only for
    a second dispatcher: see L{bench.pg_measures}).
    """

    def __init__(self, processes: Processes, kind: str, workdir: Path, slots: int = 8,
                 threads: int = 8, store: Optional[Path] = None,
                 access_log: bool = False, workers_token: Optional[Path] = None,
                 authentication: bool = True, code: Optional[Path] = None,
                 store_url: Optional[str] = None, holder: Optional[str] = None,
                 core: int = SERVER_CORE) -> None:
        self.processes = processes
        # Another version's tree (its dispatcher/ and bench/) to run, for a
        # same-run comparison (bench/metrics.py); None: this one.
        self.code = code
        self.kind = kind
        self.access_log = access_log
        self.workers_token = workers_token
        self.authentication = authentication
        self.token: Optional[str] = None
        self.workdir = workdir
        self.slots = slots
        self.threads = threads
        self.store = store
        self.store_url = store_url
        self.holder = holder
        self.core = core
        self.port, self.monitor_port = free_ports(2)
        self.child: Optional[subprocess.Popen] = None
        self.client = Client(self.port)
        self.ready_s: Optional[float] = None

    @property
    def database(self) -> Path:
        """
        The daemon's SQLite file (see L{bench.daemon}).
        """
        return self.workdir / "var" / "dispatcher.sqlite3"

    def __enter__(self) -> "Server":
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.store is not None:
            # A prepared store (bench/seed_store.py): a fresh copy for each
            # daemon, since the daemon changes it.
            self.database.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.store, self.database)
            # Written back now, not by the daemon's first checkpoint.
            with open(self.database, "rb+") as f:
                os.fsync(f.fileno())
        self.output = open(self.workdir / "server.out", "wb")
        if self.kind == "daemon":
            argv = ["-m", "bench.daemon", "--port", str(self.port),
                    "--monitor-port", str(self.monitor_port),
                    "--data-dir", str(self.workdir),
                    "--slots", str(self.slots), "--threads", str(self.threads)]
            if self.access_log:
                argv.append("--access-log")
            if self.workers_token is not None:
                argv += ["--workers-token-file", str(self.workers_token)]
            if not self.authentication:
                argv += ["--authentication", "off"]
            if self.store_url is not None:
                argv += ["--store-url", self.store_url]
            if self.holder is not None:
                var = self.workdir / "var"
                var.mkdir(mode=0o700, parents=True, exist_ok=True)
                (var / "holder").write_text(self.holder + "\n", encoding="utf-8")
                if self.store_url is not None:
                    # On a shared database the daemon's name is kept in
                    # "node", without the "local@" of its holder.
                    (var / "node").write_text(
                        self.holder.removeprefix("local@") + "\n", encoding="utf-8")
        else:
            argv = ["-m", "bench.baseline_server", str(self.port),
                    "--monitor-port", str(self.monitor_port),
                    "--log", str(self.workdir / "baseline.log")]
        self._started_at = time.monotonic()
        self.child = self.processes.start_pinned(
            self.core, [PYTHON, *argv], cwd=self.code or ROOT, stdout=self.output,
            stderr=subprocess.STDOUT, env=child_environment(self.code))
        self._wait_ready()
        check_pinned(self.child, self.core, f"the {self.kind}")
        if self.kind == "daemon" and self.authentication:
            # Made on the daemon's first start, before it listens.
            self.token = (self.workdir / "var" / "admin.token").read_text().strip()
            self.client.token = self.token
        return self

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.child.poll() is not None:
                raise BenchError(f"the {self.kind} exited at start: {self._tail()}")
            try:
                self.monitor("read")
                if self.kind == "baseline":
                    return
                status, _ = self.client.request("GET", "/healthz")
                if status == 200:
                    # From starting the process to its first answer: how
                    # long a restart keeps clients waiting.
                    self.ready_s = time.monotonic() - self._started_at
                    return
            except (OSError, http.client.HTTPException, ValueError):
                self.client.close()
            time.sleep(0.01)
        raise BenchError(f"the {self.kind} did not answer in {timeout:g}s: {self._tail()}")

    def _tail(self) -> str:
        self.output.flush()
        text = (self.workdir / "server.out").read_text(errors="replace")
        log = self.workdir / "daemon.log"
        if log.exists():
            text += log.read_text(errors="replace")
        return text[-2000:] or "(no output)"

    def memory(self) -> dict[str, int]:
        """
        The server process's resident memory now and at its peak, in KiB
        (C{VmRSS} and C{VmHWM} of /proc/PID/status).
        """
        out = {}
        with open(f"/proc/{self.child.pid}/status") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name in ("VmRSS", "VmHWM"):
                    out[f"{name.lower()}_kib"] = int(value.split()[0])
        return out

    def monitor(self, command: str) -> dict[str, Any]:
        """
        Send C{command} to the server's reactor-hold monitor (see
        L{bench.monitor.MonitorControl}) and return its answer.
        """
        with socket.create_connection((HOST, self.monitor_port), timeout=30) as s:
            s.sendall(command.encode("utf-8") + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        answer = json.loads(data)
        if "error" in answer:
            raise BenchError(f"monitor {command!r}: {answer['error']}")
        return answer

    def remove_database(self) -> None:
        """
        Free the disk a copy of a large store took, and nothing else: the
        jobs' directories stay until the run ends, since ext4 makes every
        directory or file created soon after many were deleted slower (its
        inode allocator skips recently freed inodes one by one), and that
        would slow the measures that follow.
        """
        for suffix in ("", "-wal", "-shm"):
            path = self.database.with_name(self.database.name + suffix)
            if path.exists():
                path.unlink()

    def __exit__(self, *exc: Any) -> None:
        self.client.close()
        if self.child is not None:
            code = self.processes.stop(self.child)
            if code not in (0, None) and exc[0] is None:
                print(f"bench: the {self.kind} exited with {code}: {self._tail()}",
                      file=sys.stderr)
        self.output.close()


# Idle connections


class IdleConnections:
    """
    Keep-alive clients that each sent one request (C{GET /healthz}), read
    its answer and then stay idle, as many browsers or SDK clients leave
    their connections.  They are opened from this process (on the load
    core) a chunk at a time, so that the server's listen backlog never
    overflows, and closed with a reset (C{SO_LINGER} 0), which leaves no
    C{TIME_WAIT} behind to use up the loopback's ports.

    The daemon closes a connection that has been idle for 60 s, so a
    measure that holds them must end sooner; L{still_open} tells.
    """

    REQUEST = f"GET /healthz HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode("ascii")

    def __init__(self, port: int, count: int, chunk: int = 250) -> None:
        self.port = port
        self.count = count
        self.chunk = chunk
        self.sockets: list[socket.socket] = []
        self.open_s: Optional[float] = None

    def __enter__(self) -> "IdleConnections":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def open(self, timeout: float = 60.0) -> None:
        """
        Open all of them, a chunk at a time, each chunk's answers read
        before the next chunk connects.
        """
        t0 = time.monotonic()
        deadline = t0 + timeout
        while len(self.sockets) < self.count:
            if time.monotonic() > deadline:
                raise BenchError(f"opened only {len(self.sockets)} of {self.count} idle "
                                 f"connections in {timeout:g}s")
            chunk = []
            for _ in range(min(self.chunk, self.count - len(self.sockets))):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                self.sockets.append(s)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.settimeout(max(1.0, deadline - time.monotonic()))
                s.connect((HOST, self.port))
                chunk.append(s)
            for s in chunk:
                s.sendall(self.REQUEST)
            for s in chunk:
                _read_one_response(s)
        self.open_s = time.monotonic() - t0

    def opened(self, server: Server) -> dict[str, Any]:
        """
        Open them (if there are any), and say how long that took and what
        the C{server}'s memory is with them open.
        """
        if not self.count:
            return {}
        self.open()
        return {"connections": self.count, "open_s": round(self.open_s, 2),
                "memory_with_idle": server.memory()}

    def still_open(self) -> int:
        """
        How many of the connections the server has not closed (nothing to
        read and no end of stream), looked at without blocking.
        """
        alive = 0
        for s in self.sockets:
            # A socket with a timeout would wait for data first.
            s.setblocking(False)
            try:
                data = s.recv(1, socket.MSG_PEEK)
            except BlockingIOError:
                alive += 1
            except OSError:
                pass
            else:
                if data:
                    alive += 1  # unexpected bytes, but still connected
        return alive

    def close(self) -> None:
        """
        Close every connection with a reset.
        """
        for s in self.sockets:
            try:
                s.close()
            except OSError:
                pass
        self.sockets = []


def _read_one_response(s: socket.socket) -> None:
    """
    Read one HTTP response with a C{Content-Length} from C{s}; it must be
    a 200.
    """
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            raise BenchError("an idle connection was closed before its answer")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    if lines[0].split()[1:2] != [b"200"]:
        raise BenchError(f"an idle connection's request was answered {lines[0]!r}")
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = s.recv(65536)
        if not chunk:
            raise BenchError("an idle connection was closed in its answer")
        body += chunk


# Remote workers

WORKER_CONFIG = "[executor]\nthreads = {threads}\n\n" + TASKS_SECTION
# The line a worker logs as it stops: how many answers granted how many
# leases ({size: answers, ...}).
LEASE_ANSWERS = re.compile(r"\(leases in an answer: answers (\{[0-9:, ]*\})\)")


class RemoteWorkers:
    """
    C{count} real worker processes, C{dispatcher worker --url ...
    --token-file ... --slots N --config FILE} as an operator starts them,
    each with C{slots} slots and as many task threads, pulling jobs from
    C{server} (which must take workers: see L{Server}'s C{workers_token}),
    pinned to L{WORKER_CORE}.  Each logs to its own file, where
    L{lease_answers} finds how many jobs each lease answer carried (in the
    line it logs as it stops).  C{prefetch}, if given, is each worker's
    C{--prefetch} (else its default, as many as its slots).
    """

    def __init__(self, processes: Processes, server: Server, token: Path, workdir: Path,
                 count: int, slots: int, prefetch: Optional[int] = None) -> None:
        self.processes = processes
        self.server = server
        self.token = token
        self.workdir = workdir
        self.count = count
        self.slots = slots
        self.prefetch = prefetch
        self.children: list[subprocess.Popen] = []
        self.names: list[str] = []
        self._outputs: list[Any] = []
        self._logs: list[str] = []
        self.ready_s: Optional[float] = None

    def __enter__(self) -> "RemoteWorkers":
        script = Path(PYTHON).with_name("dispatcher")
        command = ([str(script)] if script.exists() else
                   [PYTHON, "-c", "from dispatcher.app._cli import main; main()"])
        t0 = time.monotonic()
        for i in range(self.count):
            name = f"bench-worker-{i + 1}"
            home = self.workdir / name
            home.mkdir(parents=True, exist_ok=True)
            config = home / "worker.ini"
            config.write_text(WORKER_CONFIG.format(threads=self.slots), encoding="utf-8")
            output = open(home / "worker.log", "wb")
            self._outputs.append(output)
            self.names.append(name)
            self.children.append(self.processes.start_pinned(
                WORKER_CORE,
                [*command, "worker", "--url", f"http://{HOST}:{self.server.port}",
                 "--token-file", str(self.token), "--slots", str(self.slots),
                 "--config", str(config), "--name", name,
                 "--data-dir", str(home / "data"), "--grace", "5",
                 *(() if self.prefetch is None else ("--prefetch", str(self.prefetch)))],
                cwd=ROOT, stdout=output, stderr=subprocess.STDOUT,
                env=child_environment()))
        self._wait_connected()
        self.ready_s = time.monotonic() - t0
        for child in self.children:
            check_pinned(child, WORKER_CORE, "a worker")
        return self

    def _wait_connected(self, timeout: float = 30.0) -> None:
        """
        Until every worker has its long-poll open (C{GET /v1/workers}).
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for child in self.children:
                if child.poll() is not None:
                    raise BenchError(f"a worker exited at start: {self._tail()}")
            answer = self.server.client.get_ok("/v1/workers")
            waiting = {w["name"] for w in answer["workers"] if w["waiting_for_work"]}
            if waiting >= set(self.names):
                return
            time.sleep(0.05)
        raise BenchError(f"the workers did not connect in {timeout:g}s: {self._tail()}")

    def _tail(self) -> str:
        text = ""
        for output in self._outputs:
            output.flush()
            text += Path(output.name).read_text(errors="replace")[-1000:]
        return text or "(no output)"

    def cpu_seconds(self) -> float:
        """
        CPU time (user and system) all the workers have used so far.
        """
        return sum(sum(process_cpu_seconds(child.pid)) for child in self.children)

    def lease_answers(self) -> list[int]:
        """
        How many jobs each non-empty lease answer carried, every worker's
        in turn (from their logs; complete once they stopped).
        """
        sizes = []
        for text in self._logs:
            for m in LEASE_ANSWERS.finditer(text):
                for size, count in ast.literal_eval(m.group(1)).items():
                    sizes += [int(size)] * int(count)
        return sizes

    def __exit__(self, *exc: Any) -> None:
        for child in self.children:
            code = self.processes.stop(child)
            if code not in (0, None) and exc[0] is None:
                print(f"bench: a worker exited with {code}: {self._tail()}", file=sys.stderr)
        for output in self._outputs:
            output.close()
            self._logs.append(Path(output.name).read_text(errors="replace"))


# Profiles (py-spy)


class PySpy:
    """
    py-spy sampling process C{pid} (the server, or a remote worker;
    every thread, native frames left out) for the duration of a C{with}
    block, on the load core.  Only with C{--py-spy}: sampling costs the
    load core some time, and it reads the daemon's memory while the daemon
    runs (C{--nonblocking}), so the numbers of a profiled run are not the
    ones to quote.
    """

    def __init__(self, processes: Processes, pid: int, path: Path,
                 rate: int = 100) -> None:
        self.processes = processes
        self.pid = pid
        self.path = path
        self.rate = rate
        self.summary: Optional[dict[str, Any]] = None

    def __enter__(self) -> "PySpy":
        tool = shutil.which("py-spy") or str(Path(PYTHON).with_name("py-spy"))
        self.child = self.processes.start_pinned(
            LOAD_CORE,
            [tool, "record", "-p", str(self.pid), "--threads", "--nonblocking",
             "-r", str(self.rate), "-f", "raw", "-o", str(self.path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.3)  # py-spy attaches
        return self

    def __exit__(self, *exc: Any) -> None:
        # py-spy writes its samples when interrupted.
        signal_group(self.child, signal.SIGINT)
        try:
            self.child.wait(20)
        except subprocess.TimeoutExpired:
            pass
        self.processes.stop(self.child)
        if self.path.exists():
            self.summary = summarize_py_spy(self.path)


# A run and its measured windows


class Run:
    """
    What every measure of one run shares: its children, its temporary
    directory (each measure's daemons keep their data under it until the
    run ends) and, with C{--py-spy}, where the profiles go.
    """

    def __init__(self, processes: Processes, tmp: Path,
                 py_spy_dir: Optional[Path] = None) -> None:
        self.processes = processes
        self.tmp = tmp
        self.py_spy_dir = py_spy_dir

    def py_spy(self, pid: int, name: str) -> Optional[PySpy]:
        """
        A py-spy profile of process C{pid} under C{name}, if the run
        profiles; otherwise C{None}.
        """
        if self.py_spy_dir is None:
            return None
        return PySpy(self.processes, pid, self.py_spy_dir / f"{name}.txt")


class Window:
    """
    One measured stretch of a server's life, as a C{with} block: it resets
    the server's reactor-hold monitor, starts counting CPU (L{cpu}) and,
    when the run profiles, samples a daemon with py-spy; at its end,
    L{figures} holds the CPU use, the monitor's reading and the profile's
    summary.

    @ivar extra_spies: more L{PySpy}s (of remote workers) the block
        started; their summaries go under C{py_spy_workers}, by name.

    The daemon's counters (L{COUNTERS}: its store's commits, its round
    trips to PostgreSQL) go under C{counters}, as what the window added.
    """

    def __init__(self, run: Run, server: Server, name: str,
                 cprofile: bool = False) -> None:
        self.run = run
        self.server = server
        self.name = name
        self.cprofile = cprofile
        self.figures: dict[str, Any] = {}
        self._spies = contextlib.ExitStack()
        self._spy: Optional[PySpy] = None
        self.extra_spies: dict[str, PySpy] = {}

    def __enter__(self) -> "Window":
        self._counters0 = self.server.monitor("reset")
        if self.cprofile:
            self.server.monitor("profile_start")
        self.cpu = CpuUse(self.server.child.pid).start()
        if self.server.kind == "daemon":
            self._spy = self.run.py_spy(self.server.child.pid, self.name)
            if self._spy is not None:
                self._spies.enter_context(self._spy)
        return self

    def spy_on(self, pid: int, name: str) -> None:
        """
        Also profile process C{pid} (a remote worker) for the rest of the
        window, if the run profiles.
        """
        spy = self.run.py_spy(pid, f"{self.name}-{name}")
        if spy is not None:
            self.extra_spies[name] = self._spies.enter_context(spy)

    def __exit__(self, *exc: Any) -> None:
        self._spies.close()
        if exc[0] is not None:
            return
        self.figures["cpu"] = self.cpu.stop()
        self.figures["reactor_hold"] = self.server.monitor("read")
        counters = counter_deltas(self._counters0, self.figures["reactor_hold"])
        if counters:
            self.figures["counters"] = counters
        if self._spy is not None and self._spy.summary:
            self.figures["py_spy"] = self._spy.summary
        workers = {name: spy.summary for name, spy in self.extra_spies.items()
                   if spy.summary}
        if workers:
            self.figures["py_spy_workers"] = workers


# The daemon's counters its monitor reports (bench/daemon.py), each a
# running total since it started.
COUNTERS = ("store_commits", "store_durable_commits", "pg_round_trips", "pg_group_us",
            "pg_begin_us")


def counter_deltas(before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
    """
    What each of L{COUNTERS} that both monitor readings carry added
    between them.
    """
    return {name: after[name] - before[name] for name in COUNTERS
            if isinstance(after.get(name), int) and isinstance(before.get(name), int)}


# Rounds and statistics


def step(measures: dict[str, Any], name: str, take: Callable[[], dict[str, Any]]) -> None:
    """
    Take one measure, saying so on stderr, and keep it under C{name}.
    """
    t0 = time.monotonic()
    print(f"bench: {name} ...", file=sys.stderr, flush=True)
    measures[name] = take()
    print(f"bench: {name} done in {time.monotonic() - t0:.1f}s", file=sys.stderr, flush=True)


def in_rounds(measures: dict[str, Any], count: int,
              rows: list[tuple[str, Callable[[int], dict[str, Any]]]],
              field: str, alternate: bool = False) -> None:
    """
    Take each of C{rows} C{count} times, the rows in turn in each round,
    so that a slow spell of the machine hits all of them; each row keeps
    its median round by C{field} (L{median_round}), and every round goes
    under C{measures["rounds"]}.  With C{alternate}, every second round
    takes the rows in the reverse order, so that no row always comes
    first (after a pause) or last (after the others' jobs).
    """
    runs: dict[str, list[dict[str, Any]]] = {}
    for n in range(count):
        for name, take in (rows[::-1] if alternate and n % 2 else rows):
            step(measures, f"{name} round {n + 1}", lambda: take(n))
            runs.setdefault(name, []).append(measures.pop(f"{name} round {n + 1}"))
    for name, taken in runs.items():
        measures[name] = median_round(taken, field)
    measures.setdefault("rounds", {}).update(runs)


def median_round(runs: list[dict[str, Any]], field: str) -> dict[str, Any]:
    """
    The round of C{runs} whose C{field} is the median (the upper one of an
    even count), with every round's C{field} in C{rounds_<field>}.  Rows
    take their median round whole, so that its figures belong together.
    """
    ordered = sorted(runs, key=lambda x: x[field])
    median = dict(ordered[len(ordered) // 2])
    median[f"rounds_{field}"] = [x[field] for x in runs]
    return median


def median(values: list[float]) -> float:
    """
    The median, or NaN for no values.
    """
    return statistics.median(values) if values else float("nan")


def percentile(values: list[float], p: float) -> float:
    """
    The C{p}th percentile of C{values}, interpolated between ranks (NaN
    for no values).
    """
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = p / 100.0 * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def poll(deadline: float, interval: float, what: str) -> Iterator[int]:
    """
    Count polls every C{interval} seconds until the caller stops asking,
    or fail with a L{BenchError} saying C{what} did not happen by
    C{deadline} (a C{time.monotonic} value).
    """
    polls = 0
    while time.monotonic() < deadline:
        polls += 1
        yield polls
        time.sleep(interval)
    raise BenchError(f"{what} in time")


# The load and the set-up


def wrk(processes: Processes, port: int, connections: int, seconds: float,
        token: Optional[str] = None) -> dict[str, Any]:
    """
    wrk on the load core, one thread and C{connections} connections,
    POSTing C{{"command":["true"]}} to C{/v1/jobs} for C{seconds}, with
    C{Authorization: Bearer <token>} when given a C{token}; its Lua script
    (bench/wrk_post.lua) counts the C{201} answers apart from every other
    status.  Latencies are wrk's, not corrected for coordinated omission.
    """
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency",
            "--timeout", "10s", "-s", str(BENCH / "wrk_post.lua"),
            f"http://{HOST}:{port}/v1/jobs"]
    child = processes.start_pinned(
        LOAD_CORE, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "BENCH_BODY": '{"command":["true"]}', "BENCH_TOKEN": token or ""})
    out, err = processes.communicate(child, seconds + 30, "wrk")
    text = out.decode("utf-8", "replace")
    match = re.search(r"^BENCH_JSON (.*)$", text, re.M)
    if child.returncode != 0 or not match:
        raise BenchError(f"wrk failed ({child.returncode}): {text}{err.decode()}")
    raw = json.loads(match.group(1))
    duration = raw["duration_us"] / 1e6
    return {
        "connections": connections,
        "duration_s": round(duration, 3),
        "requests": raw["requests"],
        "requests_per_s": round(raw["requests"] / duration, 1),
        "created_201": raw["created_201"],
        "other_status": raw["other_status"],
        "non_2xx_3xx": raw["non_2xx_3xx"],
        "socket_errors": {k: raw[k] for k in
                          ("connect_errors", "read_errors", "write_errors", "timeouts")},
        "latency_ms": {p: round(raw[f"latency_{p}_us"] / 1000, 3)
                       for p in ("p50", "p90", "p99", "max", "mean")},
    }


def seed_store(processes: Processes, path: Path, count: int) -> dict[str, Any]:
    """
    Set-up, not a measure: a store of C{count} queued no-op task jobs
    (bench/seed_store.py), built on the load core.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    child = processes.start_pinned(
        LOAD_CORE, [PYTHON, "-m", "bench.seed_store", str(path), str(count)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_environment())
    out, err = processes.communicate(child, 300, f"seeding {count} jobs")
    if child.returncode != 0:
        raise BenchError(f"seeding {count} jobs failed: {err.decode(errors='replace')[-2000:]}")
    return json.loads(out)


def in_threads(client: Client, concurrency: int, items: Iterator[Any],
               send: Callable[[Any], None], until: float, grace: float) -> None:
    """
    C{send(item)} for each of C{items}, from C{concurrency} threads, each
    on its own keep-alive connection of C{client}, until the items run out
    or C{until} (a C{time.monotonic} value) passes.  A thread whose
    C{send} raises stops; the first error fails the whole, and so does a
    thread still running C{grace} seconds after C{until}.
    """
    lock = threading.Lock()
    errors: list[str] = []

    def work() -> None:
        try:
            while time.monotonic() < until:
                with lock:
                    item = next(items, None)
                if item is None:
                    return
                send(item)
        except Exception as e:
            errors.append(f"{type(e).__name__}: {e}")
        finally:
            client.close()

    threads = [threading.Thread(target=work, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, until - time.monotonic()) + grace)
    if errors:
        raise BenchError(f"{errors[0]} ({len(errors)} of {concurrency} threads failed)")
    if any(t.is_alive() for t in threads):
        raise BenchError(f"{concurrency} threads did not end in time")
