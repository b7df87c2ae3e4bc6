"""
The daemon's service tree: everything a running dispatcher is made of, put
together from one L{Config}, started and stopped in order.
"""

from __future__ import annotations

import fcntl
import gc
import ipaddress
import os
import socket
from typing import Any, Optional

from treq.client import HTTPClient
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from twisted.web.client import Agent, HTTPConnectionPool

from ._api import DispatcherAPI
from ._config import Config
from ._dispatcher import Dispatcher
from ._execution import DaemonThreadPool, LocalExecutor
from ._http import DispatcherSite
from ._process import ProcessSpawner, kill_group_if_ours
from ._sqlite import SQLiteJobStore
from ._staging import InputStager
from ._worker_api import WorkerEndpoints

log = Logger()

DATABASE_NAME = "dispatcher.sqlite3"


class DataDirInUse(Exception):
    """
    Another dispatcher holds the data directory.
    """


class OpenToTheNetwork(Exception):
    """
    The API would listen beyond loopback without the tokens that make that
    safe.
    """


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


class DaemonService(MultiService):
    """
    A whole dispatcher: store, executor, spawner, input stager and the HTTP
    API, started in that order (the API listens only once the store is open
    and the previous run's leftovers are settled) and stopped in reverse.

    @param reactor: the reactor; nothing else here imports one.
    @param config: the configuration.
    @param endpoint: the C{IStreamServerEndpoint} the API listens on.
    @param clock: the C{IReactorTime} of job times, waits, timeouts and
        back-offs; the reactor by default (tests give a C{Clock}).
    @param stop_reactor: whether a failed start stops the reactor (so that
        twistd exits).
    """

    def __init__(
        self,
        reactor: Any,
        config: Config,
        endpoint: Any,
        clock: Any = None,
        stop_reactor: bool = True,
    ) -> None:
        MultiService.__init__(self)
        self._reactor = reactor
        clock = clock if clock is not None else reactor
        self._stop_reactor = stop_reactor
        self.config = config
        self._endpoint = endpoint
        data_dir = config.dispatcher.data_dir
        self.io_pool = ThreadPool(1, 4, name="dispatcher-io")
        self.task_pool = DaemonThreadPool(
            0, config.executor.threads, name="dispatcher-tasks"
        )
        self.fetch_pool = ThreadPool(1, 4, name="dispatcher-fetch")
        self.http_pool = HTTPConnectionPool(reactor, persistent=True)
        client = HTTPClient(Agent(reactor, pool=self.http_pool))
        self.store = SQLiteJobStore(
            os.path.join(data_dir, DATABASE_NAME),
            reactor,
            queues={name: q.max_running for name, q in config.queues.items()},
            idempotency_ttl=config.dispatcher.idempotency_ttl,
        )
        self.spawner = ProcessSpawner(reactor)
        stager = InputStager(client, reactor, config.fetch, self.fetch_pool, reactor)
        executor = LocalExecutor(
            reactor,
            f"local@{socket.gethostname()}",
            data_dir,
            self.spawner,
            stager,
            config.tasks,
            self.task_pool,
            self.io_pool,
            kill_grace=config.executor.kill_grace,
            clock=clock,
        )
        self.dispatcher = Dispatcher(
            reactor,
            self.store,
            executor,
            config.executor.slots,
            self.io_pool,
            config.dispatcher.shutdown_grace,
            process_killer=_kill_leftover,
            clock=clock,
            tasks=frozenset(config.tasks),
            lease_seconds=config.workers.lease_seconds,
        )
        workers = None
        if config.workers.token is not None:
            workers = WorkerEndpoints(
                self.dispatcher.hub,
                config.workers.token,
                executor.log_path,
                reactor,
                self.io_pool,
            )
        api = DispatcherAPI(
            self.dispatcher,
            config.tasks,
            reactor,
            self.io_pool,
            queues=config.queues,
            max_array=config.dispatcher.max_array,
            clock=clock,
            workers=workers,
            api_token=config.api.token,
        )
        self.site = DispatcherSite(
            api, config.server.max_body_bytes, access_log=config.server.access_log
        )
        self.port: Any = None
        self._lock_fd: Optional[int] = None
        self.ready: Deferred = Deferred()
        self._starting: Optional[Deferred] = None

    def startService(self) -> None:
        Service.startService(self)
        self._starting = ensureDeferred(self._start())
        self._starting.addErrback(self._failed_to_start)

    def _check_exposure(self, host: Optional[str]) -> None:
        """
        Refuse to serve on an address other machines reach unless both
        tokens are set: open, this API runs any command for anyone.
        """
        if host is None or _is_loopback(host):
            return
        missing = []
        if self.config.api.token is None:
            missing.append("[api] token_file")
        if self.config.workers.token is None:
            missing.append("[workers] token_file")
        if missing:
            where = host or "every interface"
            raise OpenToTheNetwork(
                f"the API would listen on {where}, which other machines can reach, "
                "and it runs commands for whoever calls it: set "
                f"{' and '.join(missing)} (see etc/dispatcher.ini), or listen on "
                "127.0.0.1"
            )

    async def _start(self) -> None:
        # What the endpoint says it binds is checked before anything runs;
        # the address it did bind, once it listens.
        interface = getattr(self._endpoint, "_interface", None)
        if interface == "" or (isinstance(interface, str) and _is_ip(interface)):
            self._check_exposure(interface)
        for pool in (self.io_pool, self.task_pool, self.fetch_pool):
            pool.start()
        holder = await deferToThreadPool(
            self._reactor, self.io_pool, self._lock_data_dir
        )
        self.dispatcher.executor.holder = holder
        self.spawner.startService()
        await self.dispatcher.start()
        self.dispatcher.startService()
        self.port = await self._endpoint.listen(self.site)
        try:
            self._check_exposure(getattr(self.port.getHost(), "host", None))
        except OpenToTheNetwork:
            await self.port.stopListening()
            self.port = None
            raise
        # What start-up built lives as long as the daemon: moving it out of
        # the collector's sight keeps full collections (which hold the
        # reactor for tens of milliseconds) short.
        gc.collect()
        gc.freeze()
        log.info("dispatcher listening on {address}", address=_address(self.port))
        self.ready.callback(self.port)

    def _lock_data_dir(self) -> str:
        """
        Take the data directory for this daemon alone, and return the
        holder name its local leases carry.  Runs on the I/O pool.

        Two daemons on one data directory would each take the other's
        running jobs for lost; the lock (held until the process ends, even
        by SIGKILL) refuses the second.  The holder name is kept in the data
        directory so that a new host name (a recreated container, say) still
        recovers the jobs the last run left.
        """
        data_dir = self.config.dispatcher.data_dir
        os.makedirs(data_dir, exist_ok=True)
        fd = os.open(os.path.join(data_dir, "lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.read(fd, 100).decode("ascii", "replace").strip()
            os.close(fd)
            raise DataDirInUse(
                f"the data directory {data_dir} is in use by another dispatcher "
                f"(pid {other or 'unknown'}); stop it, or give this one another "
                "--data-dir"
            )
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        self._lock_fd = fd
        path = os.path.join(data_dir, "holder")
        try:
            with open(path, encoding="utf-8") as f:
                return f.read().strip()
        except FileNotFoundError:
            holder = f"local@{socket.gethostname()}"
            with open(path + ".new", "w", encoding="utf-8") as f:
                f.write(holder + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(path + ".new", path)
            return holder

    def _failed_to_start(self, failure: Any) -> None:
        log.failure("the dispatcher could not start", failure)
        if not self.ready.called:
            self.ready.errback(failure)
        if self._stop_reactor and self._reactor.running:
            self._reactor.stop()

    def stopService(self) -> Deferred:
        Service.stopService(self)
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
        if self._starting is not None and not self._starting.called:
            self._starting.cancel()
        if self.port is not None:
            # Accept nothing new first; running jobs get the grace period.
            await self.port.stopListening()
        if self.dispatcher.running:
            await self.dispatcher.stopService()
        else:
            await self.store.close()
        await self.spawner.stopService()
        await self.http_pool.closeCachedConnections()
        self.io_pool.stop()
        self.fetch_pool.stop()
        self.task_pool.stop_without_waiting()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        log.info("dispatcher stopped")


def _address(port: Any) -> str:
    host = port.getHost()
    return f"{getattr(host, 'host', '')}:{getattr(host, 'port', '')}"


def _kill_leftover(pid: int, start_ticks: Any, boot_id: Any) -> bool:
    import signal

    return kill_group_if_ours(pid, start_ticks, boot_id, signal.SIGKILL)
