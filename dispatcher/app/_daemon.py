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

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from dispatcher.api._handlers import DispatcherAPI
from dispatcher.config._ini import Config
from dispatcher.core._dispatcher import Dispatcher
from dispatcher.execution._host import JobHost
from dispatcher.http._protocol import HTTPFactory
from dispatcher.execution._process import kill_group_if_ours
from dispatcher.store._sqlite import SQLiteJobStore
from dispatcher.api._workers import WorkerEndpoints

log = Logger()

DATABASE_NAME = "dispatcher.sqlite3"
ACCESS_LOG_NAME = "access.log"


class ConnectionFreezer:
    """
    Keeps full garbage collections short while many clients stay connected.

    Start-up freezes what it built (C{gc.freeze}), but connections come
    later: each full collection walks every open connection's objects,
    about 6 microseconds a connection, so 10,000 idle keep-alive clients
    held the reactor for 60 ms or more several times a second.  Whenever
    the number of open connections (the reactor's readers) has grown by
    C{threshold} since the last freeze, the young garbage is collected and
    everything alive is frozen too.  Checks are frequent and cheap, so that
    a full collection never finds more than about C{threshold} unfrozen
    connections, even while thousands arrive.

    Nothing is lost by freezing a connection: a closed connection's objects
    hold no reference cycle, so they are freed when it closes, frozen or
    not.  Garbage in reference cycles that waits in the oldest generation
    at a freeze is kept for good; that is bounded by what one full
    collection would have found, once per growth of C{threshold}
    connections.

    @param reactor: an C{IReactorFDSet} and C{IReactorTime}.
    @param interval: seconds between checks.
    @param threshold: new connections that make a freeze worth it.
    """

    def __init__(self, reactor: Any, interval: float = 0.25, threshold: int = 1000) -> None:
        self._reactor = reactor
        self._threshold = threshold
        self._loop = LoopingCall(self.check)
        self._loop.clock = reactor
        self._interval = interval
        self._frozen_at = 0
        self.freezes = 0

    def _open(self) -> int:
        return len(self._reactor.getReaders())

    def start(self) -> None:
        self._frozen_at = self._open()
        self._loop.start(self._interval, now=False)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def check(self) -> None:
        """
        Freeze if the connections have grown enough.
        """
        now = self._open()
        if now < self._frozen_at:
            # Frozen connections that closed were freed; count growth from
            # here.
            self._frozen_at = now
        elif now - self._frozen_at >= self._threshold:
            gc.collect(1)
            gc.freeze()
            self._frozen_at = now
            self.freezes += 1
            log.debug(
                "{connections} connections open: frozen out of the collector's sight",
                connections=now,
            )


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
        # Absolute: the spawner helper starts commands from its own
        # working directory (/), where a relative path means nothing.
        data_dir = os.path.abspath(config.dispatcher.data_dir)
        # Staging runs on the reactor's time: a test clock must not stall a
        # real fetch.
        self.host = JobHost(
            reactor,
            f"local@{socket.gethostname()}",
            data_dir,
            config,
            clock,
            reactor,
            "dispatcher",
        )
        self.io_pool = self.host.io_pool
        self.spawner = self.host.spawner
        executor = self.host.executor
        self.store = SQLiteJobStore(
            os.path.join(data_dir, DATABASE_NAME),
            reactor,
            queues={name: q.max_running for name, q in config.queues.items()},
            idempotency_ttl=config.dispatcher.idempotency_ttl,
            sync_interval=config.dispatcher.sync_interval,
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
            max_body_bytes=config.server.max_body_bytes,
        )
        self.site = HTTPFactory(
            api.render,
            config.server.max_body_bytes,
            reactor,
            access_log_path=os.path.abspath(os.path.join(data_dir, ACCESS_LOG_NAME))
            if config.server.access_log
            else None,
            idle_timeout=config.server.idle_timeout,
        )
        self.freezer = ConnectionFreezer(reactor)
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
        self.host.start_pools()
        holder = await deferToThreadPool(
            self._reactor, self.io_pool, self._lock_data_dir
        )
        self.dispatcher.executor.holder = holder
        self.host.start_spawner()
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
        self.freezer.start()
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
        self.freezer.stop()
        if self.port is not None:
            # Accept nothing new first; running jobs get the grace period.
            await self.port.stopListening()
        if self.dispatcher.running:
            await self.dispatcher.stopService()
        else:
            await self.store.close()
        await self.host.stop()
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
