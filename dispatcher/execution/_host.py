"""
What this host offers: its CPUs, memory and GPUs, as the local executor and
a remote worker report them when they are not told.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any, Callable, Iterable, Mapping, Optional

from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from twisted.web.client import HTTPConnectionPool

from dispatcher.execution._accounts import AccountRefused, JobAccounts, job_accounts
from dispatcher.execution._executor import LocalExecutor
from dispatcher.execution._fetch_policy import FetchPolicy
from dispatcher.execution._http_client import input_http_client
from dispatcher.model._jobs import Resources
from dispatcher.execution._process import ProcessSpawner
from dispatcher.execution._staging import InputStager
from dispatcher._threads import TaskThreads

log = Logger()


def detect_cpus(affinity: Callable[[int], Iterable[int]] = os.sched_getaffinity) -> int:
    """
    The CPUs this process may run on (its affinity mask, which a container
    or C{taskset} may have narrowed), not the CPUs the machine has.
    """
    return len(list(affinity(0)))


def parse_meminfo(text: str) -> int:
    """
    C{MemTotal} of a C{/proc/meminfo} text, in MiB.

    @raise ValueError: the text has no readable C{MemTotal} line.
    """
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key.strip() != "MemTotal":
            continue
        fields = rest.split()
        if len(fields) == 2 and fields[1] == "kB" and fields[0].isdigit():
            return int(fields[0]) // 1024
        raise ValueError(f"cannot read the MemTotal line {line.strip()!r}")
    raise ValueError("no MemTotal line")


def detect_memory_mb(path: str = "/proc/meminfo") -> int:
    """
    The host's memory in MiB, from C{/proc/meminfo}.

    @raise ValueError: the file cannot be read or has no C{MemTotal}; the
        message says to give C{--memory}.
    """
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return parse_meminfo(f.read())
    except (OSError, ValueError) as e:
        raise ValueError(
            f"cannot detect the memory from {path} ({e}); give --memory in MiB"
        )


def count_gpus(listing: str) -> int:
    """
    The GPUs in the output of C{nvidia-smi -L}: one C{GPU N: ...} line
    each (the indented C{MIG ...} lines under a GPU are parts of it).
    """
    return sum(1 for line in listing.splitlines() if line.startswith("GPU "))


def detect_gpus(
    which: Callable[[str], Optional[str]] = shutil.which,
    run: Callable[..., Any] = subprocess.run,
) -> int:
    """
    The host's NVIDIA GPUs: 0 without C{nvidia-smi}, else the count of
    C{nvidia-smi -L}.  An C{nvidia-smi} that fails (no driver loaded, say)
    counts as none, with a warning.
    """
    program = which("nvidia-smi")
    if program is None:
        return 0
    try:
        done = run(
            [program, "-L"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.SubprocessError) as e:
        log.warn("nvidia-smi -L failed ({error}); offering no GPUs", error=e)
        return 0
    if done.returncode != 0:
        log.warn(
            "nvidia-smi -L exited with {code}; offering no GPUs: {stderr}",
            code=done.returncode,
            stderr=(done.stderr or "").strip(),
        )
        return 0
    return count_gpus(done.stdout)


def detect_resources() -> Resources:
    """
    This host's CPUs, memory (0 where it cannot be read) and GPUs.
    """
    try:
        memory = detect_memory_mb()
    except ValueError:
        memory = 0
    return Resources(float(detect_cpus()), memory, detect_gpus())


class JobHost:
    """
    What runs jobs on this host, shared by the daemon and the remote
    worker: the I/O, task and fetch thread pools, the HTTP connection pool
    and policed client inputs are fetched through, the spawner helper, the input stager and
    the L{LocalExecutor} that joins them.

    @param reactor: the reactor.
    @param holder: the executor's holder name (the daemon may set
        C{executor.holder} again once it has read the data directory).
    @param data_dir: where jobs run and their logs go.
    @param config: the L{Config} (C{[executor]}, C{[fetch]}, C{[tasks]}).
    @param clock: the C{IReactorTime} of timeouts and kill grace periods.
    @param stager_clock: the C{IReactorTime} of fetch timeouts and retries.
    @param prefix: the start of the thread pools' names.
    @param environment: variables every command job gets under its own
        C{env} (L{LocalExecutor}).
    @ivar stager: the L{InputStager} (its totals are the daemon's metrics').

    @ivar accounts_refused: why command jobs cannot run as the
        configuration says (L{job_accounts}), or C{None}; the daemon and
        the worker refuse to start with it.
    """

    def __init__(
        self,
        reactor: Any,
        holder: str,
        data_dir: str,
        config: Any,
        clock: Any,
        stager_clock: Any,
        prefix: str,
        environment: Mapping[str, str] = {},
    ) -> None:
        self.io_pool = ThreadPool(1, 4, name=f"{prefix}-io")
        self.task_pool = TaskThreads(reactor, config.executor.threads, name=f"{prefix}-tasks")
        self.fetch_pool = ThreadPool(1, 4, name=f"{prefix}-fetch")
        self.http_pool = HTTPConnectionPool(reactor, persistent=True)
        # Inputs come only from addresses [fetch] allow and the policy let
        # through, on every redirect too.
        self.http = input_http_client(
            reactor, self.http_pool, FetchPolicy(config.fetch.allow)
        )
        self.spawner = ProcessSpawner(
            reactor,
            max_processes=config.executor.max_processes,
            max_log_bytes=config.executor.max_log_bytes,
            cgroups=config.executor.cgroups,
        )
        self.stager = stager = InputStager(
            self.http, stager_clock, config.fetch, self.fetch_pool, reactor
        )
        self.accounts_refused: Optional[str] = None
        try:
            accounts = job_accounts(config)
        except AccountRefused as e:
            self.accounts_refused = str(e)
            # Never used: the daemon and the worker do not start.
            accounts = JobAccounts(note=None)
        self.executor = LocalExecutor(
            reactor,
            holder,
            data_dir,
            self.spawner,
            stager,
            config.tasks,
            self.task_pool,
            self.io_pool,
            kill_grace=config.executor.kill_grace,
            clock=clock,
            accounts=accounts,
            environment=environment,
        )

    def start_pools(self) -> None:
        for pool in (self.io_pool, self.task_pool, self.fetch_pool):
            pool.start()

    def start_spawner(self) -> None:
        self.spawner.startService()

    async def stop(self) -> None:
        """
        Stop the spawner helper, close connections and let the pools go (a
        task thread that never returns does not hold the exit up).
        """
        await self.spawner.stopService()
        await self.http_pool.closeCachedConnections()
        self.io_pool.stop()
        self.fetch_pool.stop()
        self.task_pool.stop_without_waiting()
