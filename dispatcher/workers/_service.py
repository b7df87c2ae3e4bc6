"""
The whole worker process as a service: its settings, and the thread pools,
spawner helper, input stager, executor and agent it is made of.
"""

from __future__ import annotations

import fcntl
import os
import socket
from typing import Any, Mapping, Optional

import attrs
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.ssl import Certificate, trustRootFromCertificates
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.web.client import BrowserLikePolicyForHTTPS, HTTPConnectionPool

from dispatcher.config._ini import Config
from dispatcher.execution._host import JobHost
from dispatcher.execution._job_dirs import JobDirectories
from dispatcher.execution._http_client import quiet_http_client
from dispatcher.execution._spawner import deadline_clock
from dispatcher.workers._agent import RemoteWorker, WorkerDescription
from dispatcher.workers._client import DispatcherClient
from dispatcher.workers._logs import read_chunks_blocking
from dispatcher.workers._sweep import JobDirectorySweeper

log = Logger()


def dispatcher_tls_policy(
    ca_certificates: Optional[tuple[bytes, ...]],
) -> BrowserLikePolicyForHTTPS:
    """
    How a worker checks an C{https} dispatcher: as a browser does (the
    certificate must chain to a trusted CA and name the URL's host), trusting
    the system's CAs, or only C{ca_certificates} (PEM) when given.
    """
    if ca_certificates is None:
        return BrowserLikePolicyForHTTPS()
    return BrowserLikePolicyForHTTPS(
        trustRoot=trustRootFromCertificates(
            [Certificate.loadPEM(pem) for pem in ca_certificates]
        )
    )


def default_name() -> str:
    """
    A worker name unique on this host: the host name and the process id.
    """
    return f"{socket.gethostname()}-{os.getpid()}"


@attrs.frozen
class WorkerSettings:
    """
    Everything a worker process is made from, as its options give it.

    @ivar url: the dispatcher's base URL.
    @ivar other_urls: the base URLs of other dispatchers on the same
        database, moved to in turn when the current one does not answer.
    @ivar token: the bearer token.
    @ivar description: what the worker offers.
    @ivar data_dir: where job working directories and logs live.
    @ivar config: the L{Config} its C{[tasks]}, C{[fetch]} and
        C{[executor]} (C{threads}, C{kill_grace}) come from.
    @ivar grace: seconds a stop waits for running jobs.
    @ivar ca_certificates: the PEM certificates an C{https} dispatcher's
        certificate is checked against instead of the system's trusted
        CAs, or C{None} for those.
    @ivar keep_seconds: how long a job's directory is kept once the
        dispatcher accepted its result (0: removed at once); C{None}: for
        ever.
    @ivar log_level: the least level its log writes (C{--log-level}): the
        lines of each job's lease, end and result are at debug.
    @ivar one_job: take one job and stop once it is delivered
        (C{--one-job}); C{stop_reason}: the error of the job a stop ends.
    @ivar job_environment: variables each command job gets under its own
        C{env} (C{--slurm-environment}: the C{SLURM_*} variables of the
        worker's own environment).
    """

    url: str
    token: str = attrs.field(repr=False)
    description: WorkerDescription
    data_dir: str
    other_urls: tuple[str, ...] = ()
    config: Config = Config()
    grace: float = 30.0
    ca_certificates: Optional[tuple[bytes, ...]] = None
    keep_seconds: Optional[float] = 7 * 86400.0
    log_level: str = "info"
    one_job: bool = False
    stop_reason: Optional[str] = None
    job_environment: Mapping[str, str] = attrs.field(factory=dict)


class DataDirInUse(Exception):
    """
    Another worker process uses this worker's data directory.
    """


def lock_data_dir(data_dir: str) -> int:
    """
    Take the lock of a worker's data directory (C{data_dir/lock}, held
    until the process ends, even by SIGKILL) and write this process's id
    in it; its descriptor.  Blocking, for start-up.

    A worker removes the job directories it finds there that none of its
    leases holds (the ones an earlier run left): a second worker on the
    same directory would have its running jobs' directories taken for
    those.

    @raise DataDirInUse: another process holds it.
    """
    fd = os.open(
        os.path.join(data_dir, "lock"),
        os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
        0o600,
    )
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = os.read(fd, 100).decode("ascii", "replace").strip()
        os.close(fd)
        raise DataDirInUse(
            f"the data directory {data_dir} is in use by another worker "
            f"(pid {other or 'unknown'}); stop it, or give this one another --data-dir"
        )
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode("ascii"))
    return fd


class WorkerService(MultiService):
    """
    A whole worker process: thread pools, the spawner helper, the input
    stager, the executor and the L{RemoteWorker}, started in that order and
    stopped in reverse.

    @param reactor: the reactor; nothing else here imports one.
    @param settings: the L{WorkerSettings}.
    @param clock: the C{IReactorTime} of heartbeats, back-offs, timeouts and
        grace periods; the reactor by default.
    @param fence_clock: C{() -> float}, the clock the jobs' fences are
        counted on, which must be the spawner helper's
        (L{deadline_clock}, the default), since the helper kills at them.
    """

    def __init__(
        self,
        reactor: Any,
        settings: WorkerSettings,
        clock: Any = None,
        fence_clock: Any = deadline_clock,
    ) -> None:
        MultiService.__init__(self)
        clock = clock if clock is not None else reactor
        self._reactor = reactor
        self.settings = settings
        config = settings.config
        self.host = JobHost(
            reactor,
            settings.description.name,
            settings.data_dir,
            config,
            clock,
            clock,
            "worker",
            settings.job_environment,
        )
        self.io_pool = self.host.io_pool
        # The dispatcher's connections have a pool of their own: they are
        # checked with the worker's trust (--ca-file), and an Agent's pool
        # shares connections by scheme, host and port alone, so a shared
        # one could hand an input fetch's connection to the dispatcher's
        # client or the other way round.
        self.dispatcher_pool = HTTPConnectionPool(reactor, persistent=True)
        # The long-poll, a heartbeat, a log chunk and a report may all be
        # under way at once.
        self.dispatcher_pool.maxPersistentPerHost = 4
        http = quiet_http_client(
            reactor, self.dispatcher_pool, dispatcher_tls_policy(settings.ca_certificates)
        )
        self.executor = self.host.executor

        def read_chunks(pieces: list[tuple[str, int, int]]) -> Deferred:
            return deferToThreadPool(reactor, self.io_pool, read_chunks_blocking, pieces)

        # The directories of the jobs the worker let go of (and those an
        # earlier run left) go after keep_seconds, never a held one's.
        self.sweeper = JobDirectorySweeper(
            JobDirectories(self.executor.jobs_dir),
            clock,
            lambda function, *args: deferToThreadPool(reactor, self.io_pool, function, *args),
            settings.keep_seconds,
            lambda job_id: job_id in self.worker.held,
        )
        self._lock_fd: Optional[int] = None
        self.worker = RemoteWorker(
            DispatcherClient(http, settings.url, settings.token, clock, settings.other_urls),
            self.executor,
            settings.description,
            clock,
            read_chunks,
            grace=settings.grace,
            fence_clock=fence_clock,
            sweeper=self.sweeper,
            job_lines=settings.log_level == "debug",
            one_job=settings.one_job,
            stop_reason=settings.stop_reason,
        )

    def startService(self) -> None:
        if self.host.accounts_refused is not None:
            # The options refuse it first (dispatcher.app.worker_tap).
            raise RuntimeError(self.host.accounts_refused)
        tightened = self.executor.make_data_dir(self.settings.data_dir)
        if self._lock_fd is None:
            self._lock_fd = lock_data_dir(self.settings.data_dir)
        Service.startService(self)
        self.host.start_pools()
        if tightened:
            log.warn(
                "narrowed the modes of {count} directories and files in {data_dir} "
                "that group or others could enter or read (made by an older version "
                "or under a wider umask)",
                count=tightened,
                data_dir=self.settings.data_dir,
            )
        if self.executor.accounts.note is not None:
            log.info(self.executor.accounts.note)
        self.host.start_spawner()
        self.worker.startService()

    def stopService(self) -> Deferred:
        Service.stopService(self)
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
        await self.worker.stopService()
        await self.dispatcher_pool.closeCachedConnections()
        await self.host.stop()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
