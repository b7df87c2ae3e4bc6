"""
The daemon's service tree: everything a running dispatcher is made of, put
together from one L{Config}, started and stopped in order.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import secrets
import socket
from typing import Any, Callable, Iterator, Optional

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred, maybeDeferred
from twisted.internet.address import UNIXAddress
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IPushProducer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger, LogLevel
from twisted.web.client import HTTPConnectionPool

from dispatcher.api._handlers import DispatcherAPI
from dispatcher.api._events import EventStreams
from dispatcher.app._exposure import OpenToTheNetwork, check_exposure
from dispatcher.app._files import (
    JOBS_DIR_NAME,
    UnsafeSecret,
    check_secret,
    closed_on_the_way,
    open_own_file,
    secure_data_dir,
)
from dispatcher.app._limits import connection_limits, open_file_limit, raise_open_file_limit
from dispatcher.app._logging import DaemonLog
from dispatcher.app._version import dispatcher_version
from dispatcher.model._principals import Principal, Role
from dispatcher.store._credentials import (
    ADMIN_TOKEN_NAME,
    CREDENTIALS_NAME,
    CredentialError,
    CredentialFile,
    make_admin_token,
)
from dispatcher.app._reload import applied, applies, changes
from dispatcher.backends._direct import DirectService
from dispatcher.backends._pilots import PilotService
from dispatcher.backends._slurm import SlurmCommands
from dispatcher.config._ini import Config, ConfigError
from dispatcher.model._routing import PilotShape, Routing
from dispatcher.core._dispatcher import Dispatcher
from dispatcher.core._joblog import JobLog
from dispatcher.core._retention import RetentionPolicy
from dispatcher.core._webhooks import DeliveryRules, WebhookDeliveries, notify_url_refusal
from dispatcher.execution._fetch_policy import FetchPolicy
from dispatcher.execution._http_client import input_http_client
from dispatcher.execution._host import JobHost
from dispatcher.http._protocol import HTTPFactory
from dispatcher.execution._process import kill_group_if_ours
from dispatcher.store._results import StoreUnusable
from dispatcher.store._sqlite import SQLiteJobStore
from dispatcher.api._workers import WorkerEndpoints
from dispatcher.wire._tokens import KEY_BYTES, LeaseTokens, new_key

log = Logger()

DATABASE_NAME = "dispatcher.sqlite3"


def _make_store(config: Config, data_dir: str, reactor: Any) -> Any:
    """
    The job store C{[store]} names: the PostgreSQL database of its C{url},
    or (none given) the SQLite file in the data directory.
    """
    queues = {name: q.max_running for name, q in config.queues.items()}
    # (Not config.store.url: "store" names a job store everywhere else.)
    section = config.store
    if section.url is not None:
        # Imported only here: psycopg is needed only by those who use it.
        from dispatcher.store._postgres import PostgresJobStore

        return PostgresJobStore(
            section.url,
            reactor,
            queues=queues,
            idempotency_ttl=config.dispatcher.idempotency_ttl,
            poll_interval=section.poll_interval,
            notify=section.notify,
        )
    return SQLiteJobStore(
        os.path.join(data_dir, DATABASE_NAME),
        reactor,
        queues=queues,
        idempotency_ttl=config.dispatcher.idempotency_ttl,
        sync_interval=config.dispatcher.sync_interval,
    )


def _shared_lease_seconds(config: Config) -> Optional[float]:
    """
    The life of a local lease on a database other dispatchers may share
    (PostgreSQL's C{[store] lease_seconds}), or C{None} on SQLite's file.
    """
    # (Not config.store.url: "store" names a job store everywhere else.)
    section = config.store
    return section.lease_seconds if section.url is not None else None


ACCESS_LOG_NAME = "access.log"
# The secret key of the lease tokens workers are given (wire._tokens).
LEASE_KEY_NAME = "lease.key"

# The longest, in seconds, that the daemon trusts its last look at the
# credentials file (CredentialFile's recheck): a change the command makes
# (dispatcher token revoke) holds within it.
CREDENTIALS_RECHECK = 1.0


class CannotStart(Exception):
    """
    The daemon cannot start for a reason its message names in one line
    (with the file or address, and what to do): no traceback is needed.
    """


class DataDirInUse(CannotStart):
    """
    Another dispatcher holds the data directory.
    """


class DataDirUnusable(CannotStart):
    """
    The data directory cannot be made, or is not a directory this process
    may write in.
    """


# The causes of a failed start that their message explains in full; any
# other exception is a defect, and its traceback is logged.
EXPLAINED = (CannotStart, OpenToTheNetwork, StoreUnusable, UnsafeSecret)


class DaemonService(MultiService):
    """
    A whole dispatcher: store, executor, spawner, input stager and the HTTP
    API, started in that order and stopped in reverse; and, with a
    C{[webhooks] secret_file}, the webhook deliveries, started once the
    API listens and stopped first.  The API's port is
    bound first, after the data directory's lock, so that a daemon that
    cannot serve takes up none of the last run's jobs; it accepts
    connections only once the store is open and the previous run's
    leftovers are settled.  A start that fails logs one line for a cause
    its message explains (L{EXPLAINED}), a traceback for any other.
    Services added to it (C{setServiceParent}) start once the API listens
    and stop first.

    Every caller needs a credential (L{dispatcher.api._auth}); on a first
    start with none it makes an admin token in C{DATA_DIR/admin.token}.
    With C{[api] authentication = off} it refuses to serve beyond loopback
    (see L{check_exposure}), on the address the port did bind; C{twistd}'s
    options check the address the endpoint names before anything starts.

    @param reactor: the reactor; nothing else here imports one.
    @param config: the configuration.
    @param endpoint: the C{IStreamServerEndpoint} the API listens on.
    @param clock: the C{IReactorTime} of job times, waits, timeouts and
        back-offs; the reactor by default (tests give a C{Clock}).
    @param stop_reactor: whether a failed start stops the reactor (so that
        twistd exits).
    @param on_failed_start: called (before the reactor stops) when the
        start fails; C{twistd}'s service sets the process's exit status
        with it (see L{dispatcher.app._exit}).
    @param daemon_log: the log's level and format as twistd set them up
        (L{DaemonLog}); one that twistd does not use by default.
    @param read_config: reads the configuration again for L{reload}, on
        the I/O pool (C{None}: there is no file to read).
    """

    def __init__(
        self,
        reactor: Any,
        config: Config,
        endpoint: Any,
        clock: Any = None,
        stop_reactor: bool = True,
        on_failed_start: Optional[Callable[[], None]] = None,
        daemon_log: Optional[DaemonLog] = None,
        read_config: Optional[Callable[[], Config]] = None,
    ) -> None:
        MultiService.__init__(self)
        self.daemon_log = daemon_log if daemon_log is not None else DaemonLog(config.log)
        self._read_config = read_config
        self._reactor = reactor
        clock = clock if clock is not None else reactor
        self._stop_reactor = stop_reactor
        self._on_failed_start = on_failed_start
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
        self.store = _make_store(config, data_dir, reactor)
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
            fence_margin=config.workers.fence_margin,
            last_attempt_grace=config.workers.last_attempt_grace,
            max_worker_names_per_credential=config.workers.max_names_per_credential,
            max_worker_names=config.workers.max_names,
            retention=RetentionPolicy.from_days(
                config.retention.finished_days, config.retention.finished_count
            ),
            events_retention=config.events.retention,
            max_waits=config.api.max_waits,
            shared_lease_seconds=_shared_lease_seconds(config),
        )
        # Each job's life in the log, from the committed events.
        self.job_log = JobLog(clock, config.log.job_lines)
        self.job_log.quiet = not self.daemon_log.keeps(LogLevel.info)
        self.dispatcher.events.follow(self.job_log.write)
        # Credentials: the data directory's named tokens, and the token
        # files' (an admin, and a worker that may use any worker name).  The
        # file is looked at once a second at most (what the command
        # changes holds within the second, what the API changes at once).
        self.credentials = CredentialFile(
            data_dir, _fixed_credentials(config), recheck=CREDENTIALS_RECHECK
        )
        self._data_dir = data_dir
        # The queues that run on a backend, and each backend's pilots.
        self.dispatcher.hub.routing = queue_routing(config)
        self.backends: dict[str, Any] = {}
        for name, backend in config.backends.items():
            commands = SlurmCommands(reactor, backend.slurm_bin)
            if backend.mode == "direct":
                self.backends[name] = DirectService(
                    backend, commands, self.dispatcher, self.credentials, reactor,
                    self.io_pool, data_dir, clock,
                )
            else:
                self.backends[name] = PilotService(
                    backend, commands, self.dispatcher, self.credentials, reactor,
                    self.io_pool, clock,
                )
        for service in self.backends.values():
            service.setServiceParent(self)
        self.webhooks = self._webhooks(reactor, config)
        # Keyed at start, before the API accepts a request.
        self.lease_tokens = LeaseTokens()
        workers = WorkerEndpoints(
            self.dispatcher.hub,
            executor.log_path,
            executor.open_log,
            reactor,
            self.io_pool,
            self.lease_tokens,
            config.workers.max_jobs_per_poll,
            config.executor.max_log_bytes,
        )
        self.api = api = DispatcherAPI(
            self.dispatcher,
            config.tasks,
            reactor,
            self.io_pool,
            queues=config.queues,
            max_array=config.dispatcher.max_array,
            max_stored_bytes=config.dispatcher.max_stored_bytes,
            quotas=config.quotas,
            clock=clock,
            workers=workers,
            credentials=self.credentials,
            authentication_required=config.api.authentication,
            max_body_bytes=config.server.max_body_bytes,
            allowed_hosts=config.server.allowed_hosts,
            events=EventStreams(
                self.dispatcher.events,
                self.store,
                clock,
                heartbeat=config.events.heartbeat,
                buffer=config.events.buffer,
                max_subscribers=config.events.max_subscribers,
            ),
            max_log_followers=config.api.max_log_followers,
            notify_refusal=None
            if self.webhooks is None
            else functools.partial(notify_url_refusal, FetchPolicy(config.fetch.allow)),
        )
        descriptors = open_file_limit()[1]
        # From the hard limit: the soft one is raised to it at start.
        self.connection_limits = limits = connection_limits(
            config.server.max_connections,
            config.server.max_connections_per_address,
            config.executor.slots,
            descriptors,
        )
        self.site = HTTPFactory(
            api.render,
            config.server.max_body_bytes,
            reactor,
            access_log_path=os.path.abspath(os.path.join(data_dir, ACCESS_LOG_NAME))
            if config.server.access_log
            else None,
            idle_timeout=config.server.idle_timeout,
            head_timeout=config.server.head_timeout,
            body_timeout=config.server.body_timeout,
            # Answers straight to the socket: a measured win, at the price
            # of reading Twisted's private API (dispatcher.http._writethrough).
            write_through=True,
            head_check=api.check_head,
            max_connections=limits.total,
            max_connections_per_address=limits.per_address,
        )
        # Its start and stop say nothing the daemon's own lines do not,
        # and name the object's address.
        self.site.noisy = False
        self._add_metrics(api.metrics)
        self.port: Any = None
        self._lock_fd: Optional[int] = None
        self.ready: Deferred = Deferred()
        self._starting: Optional[Deferred] = None

    def _add_metrics(self, metrics: Any) -> None:
        """
        What the daemon adds to the API's metrics: the open connections,
        the local executor's staging totals, and the reactor watch (a
        service of the daemon's, started once the API listens).
        """
        site = self.site
        metrics.add_gauge(
            "dispatcher_http_connections",
            "HTTP connections open to the API.",
            lambda: site.connections,
        )
        stager = self.host.stager
        metrics.add_total(
            "dispatcher_staging_bytes",
            "Bytes of job inputs staged by this host's executor.",
            lambda: stager.staged_bytes,
        )
        metrics.add_total(
            "dispatcher_staging_inputs",
            "Job inputs staged by this host's executor.",
            lambda: stager.staged_inputs,
        )
        metrics.add_total(
            "dispatcher_staging_failures",
            "Job inputs this host's executor could not stage (each failed its "
            "attempt).",
            lambda: stager.failed_inputs,
        )
        directs = [s for s in self.backends.values() if isinstance(s, DirectService)]
        if directs:
            metrics.add_gauge(
                "dispatcher_slurm_direct_jobs",
                "Jobs of direct-mode Slurm backends bound to a Slurm job of their own.",
                lambda: sum(len(s.bound) for s in directs),
            )
            metrics.add_total(
                "dispatcher_slurm_direct_submitted",
                "Jobs this run gave a Slurm job of their own, all direct-mode backends.",
                lambda: sum(s.submitted for s in directs),
            )
            metrics.add_total(
                "dispatcher_slurm_direct_sbatch",
                "sbatch calls (each a Slurm job or array) of direct-mode backends.",
                lambda: sum(s.submissions for s in directs),
            )
            metrics.add_total(
                "dispatcher_slurm_direct_lost",
                "Attempts failed because their Slurm job ended before its worker "
                "reported, all direct-mode backends.",
                lambda: sum(s.lost for s in directs),
            )
        pilots = [s for s in self.backends.values() if isinstance(s, PilotService)]
        if pilots:
            services = pilots
            metrics.add_gauge(
                "dispatcher_slurm_pilots",
                "Slurm pilots submitted and not yet seen ended, all backends.",
                lambda: sum(len(s.pilots) for s in services),
            )
            metrics.add_total(
                "dispatcher_slurm_pilots_submitted",
                "Slurm pilots submitted by this run, all backends.",
                lambda: sum(s.submitted for s in services),
            )
            metrics.add_total(
                "dispatcher_slurm_pilots_ended",
                "Slurm pilots this run saw end, all backends.",
                lambda: sum(s.ended for s in services),
            )
        metrics.watch.setServiceParent(self)

    def _webhooks(self, reactor: Any, config: Config) -> Optional[WebhookDeliveries]:
        """
        The service that sends jobs' webhooks, started and stopped with the
        daemon's other services; C{None} without a C{[webhooks]
        secret_file}, when no job may name C{notify}.  Its deliveries go
        through a client of their own, with their own connections, only
        to addresses the fetch policy allows.  It runs on the reactor's
        time, as staging does: a test clock must not stall a real post.
        """
        settings = config.webhooks
        if settings.secret is None:
            return None
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = settings.concurrency
        webhooks = WebhookDeliveries(
            self.store,
            input_http_client(
                reactor, pool, FetchPolicy(config.fetch.allow), purpose="webhook"
            ),
            pool,
            reactor,
            settings.secret.encode("utf-8"),
            DeliveryRules(
                concurrency=settings.concurrency,
                timeout=settings.timeout,
                retry_delay=settings.retry_delay,
                max_delay=settings.max_delay,
                max_attempts=settings.max_attempts,
                max_age=settings.max_age,
                poll_interval=settings.poll_interval,
            ),
        )
        webhooks.setServiceParent(self)
        return webhooks

    def startService(self) -> None:
        Service.startService(self)
        self._starting = ensureDeferred(self._start())
        self._starting.addErrback(self._failed_to_start)

    async def _start(self) -> None:
        config = self.config
        log.info(
            "dispatcher {version} starting: configuration {config_file}, data "
            "directory {data_dir}",
            version=dispatcher_version(),
            config_file=config.path or "none (the built-in defaults)",
            data_dir=self._data_dir,
        )
        if self.host.accounts_refused is not None:
            raise CannotStart(self.host.accounts_refused)
        self._raise_open_file_limit()
        self.host.start_pools()
        holder, former = await deferToThreadPool(
            self._reactor, self.io_pool, self._lock_data_dir
        )
        await deferToThreadPool(self._reactor, self.io_pool, self._secure_data_dir)
        self.lease_tokens.use_key(
            await deferToThreadPool(
                self._reactor, self.io_pool, read_lease_key, self.config.dispatcher.data_dir
            )
        )
        await deferToThreadPool(self._reactor, self.io_pool, self._first_credential)
        # The port is taken before the store opens and the last run's jobs
        # are taken up: a daemon that cannot serve (the port is taken, the
        # address is refused) must not start jobs it then has to stop.  It
        # accepts nothing until the store is ready: connections wait in the
        # listen backlog.
        try:
            self.port = await self._endpoint.listen(self.site)
        except CannotListenError as e:
            why = getattr(e.socketError, "strerror", None) or e.socketError
            raise CannotStart(
                f"cannot listen on {e.interface or '*'}:{e.port} "
                f"({self.config.server.listen!r}): {why}; stop what listens "
                "there, or give another --listen ([server] listen)"
            ) from e
        paused = IPushProducer(self.port, None)
        if paused is not None:
            paused.pauseProducing()
        try:
            # The address it did bind: what the endpoint was told is known
            # only to twistd's options (see tap.makeService), which check it
            # before anything runs.
            check_exposure(getattr(self.port.getHost(), "host", None), self.config)
        except OpenToTheNetwork:
            await self.port.stopListening()
            self.port = None
            raise
        bound = self.port.getHost()
        if self.config.server.socket_group is not None and isinstance(bound, UNIXAddress):
            # The endpoint made it with its mode; the group it lets in.
            try:
                os.chown(bound.name, -1, self.config.server.socket_group)
            except OSError as e:
                await self.port.stopListening()
                self.port = None
                raise CannotStart(
                    f"cannot give the socket {bound.name!r} the group "
                    f"{self.config.server.socket_group} ([server] socket_group): {e.strerror}"
                ) from e
        self.api.listening_on(getattr(bound, "host", None), getattr(bound, "port", None))
        self.dispatcher.executor.holder = holder
        self.dispatcher.former_holders = former
        self.host.start_spawner()
        await self.dispatcher.start()
        self.dispatcher.startService()
        if paused is not None:
            paused.resumeProducing()
        for child in list(self):
            child.startService()
        self._log_ready()
        self.ready.callback(self.port)

    def _log_ready(self) -> None:
        """
        Say, in one line, that the daemon serves, where, and with what.
        """
        config = self.config
        tasks = sorted(config.tasks)
        queues = sorted(config.queues)
        log.info(
            "dispatcher listening on {address}: {slots} slots, {threads} task threads; "
            "{task_count} tasks ({tasks}); {queue_count} queues ({queues}); "
            "credentials {credentials}",
            address=_address(self.port),
            slots=config.executor.slots,
            threads=config.executor.threads,
            task_count=len(tasks),
            tasks=", ".join(tasks) or "none",
            queue_count=len(queues),
            queues=", ".join(queues),
            credentials="required" if config.api.authentication else "NOT required",
            version=dispatcher_version(),
        )

    def _raise_open_file_limit(self) -> None:
        """
        Raise the soft open-file limit to the hard one, for connections;
        jobs keep the one the daemon started with.  Log the limits.
        """
        started_with = raise_open_file_limit()
        self.spawner.child_open_files = started_with
        limits = self.connection_limits
        log.info(
            "open files: {descriptors} (soft limit raised from {started_with}); at most "
            "{total} client connections, {per_address} from one address ([server] "
            "max_connections, max_connections_per_address)",
            descriptors=limits.descriptors, started_with=started_with, total=limits.total,
            per_address="any number" if limits.per_address is None else limits.per_address,
        )
        if limits.total > limits.room:
            log.warn(
                "[server] max_connections = {total} leaves fewer descriptors than the "
                "daemon keeps for its store, logs and jobs ({room} of {descriptors} are "
                "free for connections): at the limit, accepting a connection or opening "
                "a file may fail; raise the open-file limit (LimitNOFILE=) or lower it",
                total=limits.total, room=limits.room, descriptors=limits.descriptors,
            )

    def _first_credential(self) -> None:
        """
        On a start with no admin credential, make an admin token in
        C{DATA_DIR/admin.token}: the API needs a credential from its first
        request, loopback included.  Runs on the I/O pool.
        """
        if not self.config.api.authentication:
            log.warn(
                "[api] authentication = off: every caller that reaches the API "
                "is an admin"
            )
            return
        try:
            made = make_admin_token(self._data_dir, self.credentials)
            count = len(self.credentials.credentials())
        except CredentialError as e:
            raise CannotStart(str(e)) from e
        if made is not None:
            log.info(
                "made an admin credential; its token is in {path} (mode 0600): "
                "send it as 'Authorization: Bearer <token>', and make others with "
                "'dispatcher token create'",
                path=made,
            )
        else:
            log.info(
                "credentials required: {count} in {path}{files}",
                count=count,
                path=self.credentials.path,
                files=" and token files" if self.config.api.token or self.config.workers.token else "",
            )

    def _lock_data_dir(self) -> tuple[str, list[str]]:
        """
        Take the data directory for this daemon alone, and return the
        holder name its local leases carry (C{local@} and C{[dispatcher]
        name}, or the name kept in the data directory), with the holder
        names of earlier runs whose jobs it recovers.  Runs on the I/O
        pool.

        Two daemons on one data directory would each take the other's
        running jobs for lost; the lock (held until the process ends, even
        by SIGKILL) refuses the second.  The holder name is kept in the data
        directory so that a new host name (a recreated container, say) still
        recovers the jobs the last run left.
        """
        data_dir = self.config.dispatcher.data_dir
        try:
            os.makedirs(data_dir, 0o700, exist_ok=True)
            fd = open_own_file(os.path.join(data_dir, "lock"), os.O_RDWR | os.O_CREAT)
        except OSError as e:
            raise DataDirUnusable(_unusable(data_dir, e)) from e
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
        # The name is kept in the data directory: the SQLite store's
        # holder (local@HOST) in "holder"; on a database shared with other
        # dispatchers, a name unique to this one (HOST-<random>) in "node".
        # [dispatcher] name, if given, wins; a name kept that differs is
        # returned too, for its jobs to be recovered.
        shared = _shared_lease_seconds(self.config) is not None
        configured = self.config.dispatcher.name
        path = os.path.join(data_dir, "node" if shared else "holder")
        kept = None
        try:
            with open(path, encoding="utf-8") as f:
                kept = f.read().strip() or None
        except FileNotFoundError:
            pass
        except OSError as e:
            raise DataDirUnusable(_unusable(data_dir, e)) from e
        if shared and kept is not None:
            kept = f"local@{kept}"
        if configured is not None:
            holder = f"local@{configured}"
        elif kept is not None:
            return kept, []
        elif shared:
            holder = f"local@{socket.gethostname()}-{secrets.token_hex(4)}"
        else:
            holder = f"local@{socket.gethostname()}"
        if kept != holder:
            try:
                new = open_own_file(path + ".new", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                with open(new, "w", encoding="utf-8") as f:
                    f.write((holder[len("local@"):] if shared else holder) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(path + ".new", path)
            except OSError as e:
                raise DataDirUnusable(_unusable(data_dir, e)) from e
        return holder, [kept] if kept is not None and kept != holder else []

    def _secure_data_dir(self) -> None:
        """
        Refuse secrets that others could have read or changed, narrow the
        modes an older version (or a wider umask) left in the data
        directory, and say so; say too when jobs running as another
        account cannot reach their working directories by path.  Runs on
        the I/O pool, under the data directory's lock, before anything
        reads a secret or runs a job.
        """
        config = self.config
        for path, what in (
            (config.api.token_file, "[api] token_file"),
            (config.workers.token_file, "[workers] token_file"),
            (config.webhooks.secret_file, "[webhooks] secret_file"),
            (os.path.join(self._data_dir, CREDENTIALS_NAME), "the credentials"),
            (os.path.join(self._data_dir, ADMIN_TOKEN_NAME), "the first admin token"),
            (os.path.join(self._data_dir, LEASE_KEY_NAME), "the lease token key"),
        ):
            if path is not None:
                check_secret(path, what)
        executor = self.dispatcher.executor
        try:
            changed = secure_data_dir(
                self._data_dir, (CREDENTIALS_NAME, ADMIN_TOKEN_NAME, LEASE_KEY_NAME)
            )
            executor.make_jobs_dir()
            tightened = executor.tighten_job_dirs()
        except OSError as e:
            raise DataDirUnusable(_unusable(self._data_dir, e)) from e
        if changed or tightened:
            log.warn(
                "narrowed the modes of {count} files and directories in {data_dir} that "
                "group or others could enter or read (made by an older version or under "
                "a wider umask){names}",
                count=len(changed) + tightened,
                data_dir=self._data_dir,
                names=f": {', '.join(changed[:5])}{' ...' if len(changed) > 5 else ''}"
                if changed
                else "",
            )
        accounts = executor.accounts
        if config.executor.slots == 0:
            # It runs no job itself: who would run them is no matter.
            return
        if accounts.note is not None:
            log.info(accounts.note)
        if accounts.default is not None or accounts.by_owner:
            closed = closed_on_the_way(os.path.join(self._data_dir, JOBS_DIR_NAME))
            if closed is not None:
                log.warn(
                    "{closed} is closed to others, so jobs running as another account "
                    "cannot reach their working directories under {data_dir} by path "
                    "(their HOME); they still start in them. Put the data directory "
                    "where others may pass, or chmod o+x {closed}",
                    closed=closed,
                    data_dir=self._data_dir,
                )

    def _failed_to_start(self, failure: Any) -> None:
        if failure.check(*EXPLAINED):
            # An expected cause, told in full by its message: one line an
            # operator reads, no traceback.
            log.critical(
                "the dispatcher could not start: {reason}", reason=str(failure.value)
            )
        else:
            log.failure("the dispatcher could not start", failure)
        if not self.ready.called:
            self.ready.errback(failure)
        if self._on_failed_start is not None:
            self._on_failed_start()
        if self._stop_reactor:
            if self._reactor.running:
                self._reactor.stop()
            else:
                self._reactor.callWhenRunning(self._reactor.stop)

    def reload(self) -> Deferred:
        """
        Read the configuration file again and apply what can change while
        the daemon runs (L{dispatcher.app._reload}); log what changed, and
        what waits for a restart.  A configuration that does not load
        changes nothing, and is told in one line.  Fires when done.
        """
        return ensureDeferred(self._reload())

    async def _reload(self) -> None:
        if self._read_config is None:
            log.warn(
                "SIGHUP: nothing to reload (the daemon was started without --config)"
            )
            return
        if not self.running or not self.ready.called:
            log.warn("SIGHUP: not reloaded while the daemon starts or stops")
            return
        path = self.config.path
        try:
            new = await deferToThreadPool(self._reactor, self.io_pool, self._checked_config)
        except (ConfigError, UnsafeSecret) as e:
            log.warn(
                "configuration not reloaded, the daemon keeps the one it runs with: "
                "{error}",
                error=str(e),
            )
            return
        old = self.config
        found = changes(old, new)
        now = [key for key in found if applies(key)]
        later = [key for key in found if not applies(key)]
        if now:
            self.job_log.lines_per_second = new.log.job_lines
            self.credentials.set_fixed(_fixed_credentials(new))
            if new.queues != old.queues:
                await self.dispatcher.set_queue_limits(
                    {name: q.max_running for name, q in new.queues.items()}
                )
                routing = queue_routing(new)
                if routing != self.dispatcher.routing:
                    self.dispatcher.set_routing(routing)
            self.api.reconfigure(
                new.dispatcher.max_array, new.dispatcher.max_stored_bytes, new.quotas,
                new.queues,
            )
            self.config = applied(old, new)
        # What the reload did is written at the lower of the two levels, so
        # that a reload that raises the level still says so.
        level = new.log.level
        if LogLevel.levelWithName(level) > LogLevel.levelWithName(old.log.level):
            self.daemon_log.set_level(old.log.level)
        else:
            self.daemon_log.set_level(level)
        log.info(
            "configuration {path} reloaded: {what}",
            path=path,
            what=f"applied {', '.join(now)}" if now else "nothing to apply",
            applied=now,
        )
        if later:
            log.warn(
                "configuration {path}: {keys} changed, which only a restart applies; "
                "the daemon runs on with the values it started with",
                path=path,
                keys=", ".join(later),
                not_applied=later,
            )
        self.daemon_log.set_level(level)
        self.job_log.quiet = not self.daemon_log.keeps(LogLevel.info)

    def _checked_config(self) -> Config:
        """
        The configuration read again, its token files checked as at start.
        Runs on the I/O pool.
        """
        assert self._read_config is not None
        config = self._read_config()
        for path, what in (
            (config.api.token_file, "[api] token_file"),
            (config.workers.token_file, "[workers] token_file"),
        ):
            if path is not None:
                check_secret(path, what)
        return config

    def end_grace(self) -> None:
        """
        Stop waiting for running jobs (a second SIGTERM or SIGINT): they
        are stopped at once and go back to the queue.
        """
        self.dispatcher.end_grace()

    def stopService(self) -> Deferred:
        Service.stopService(self)
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
        if self._starting is not None and not self._starting.called:
            self._starting.cancel()
        # Take nothing new first, but say so: every new request (a health
        # check too) is answered 503 shutting_down while running jobs get
        # the grace period.  Closing the port now had clients' connections
        # refused, which reads as a dispatcher that is down, not stopping.
        self.api.stop_serving()
        await DeferredList(
            [maybeDeferred(child.stopService) for child in reversed(list(self)) if child.running],
            consumeErrors=True,
        )
        if self.dispatcher.running:
            await self.dispatcher.stopService()
        else:
            await self.store.close()
        if self.port is not None:
            # Last: the running jobs are handled and the store closed.
            await self.port.stopListening()
        await self.host.stop()
        self.job_log.stop()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        log.info("dispatcher stopped")


def queue_routing(config: Config) -> Routing:
    """
    Which queues run on which backend, as C{config}'s queues say.
    """
    return Routing(
        {name: queue.backend for name, queue in config.queues.items() if queue.backend},
        {
            name: PilotShape(name, backend.pilot_cpus, backend.memory_mb)
            for name, backend in config.backends.items()
            if backend.mode == "pilot"
        },
        frozenset(name for name, backend in config.backends.items() if backend.mode == "direct"),
    )


def _fixed_credentials(config: Config) -> list[tuple[Principal, str]]:
    """
    The credentials of the token files: an admin's and a worker's that may
    use any worker name.
    """
    fixed = []
    if config.api.token is not None:
        fixed.append((Principal("api-token-file", Role.ADMIN), config.api.token))
    if config.workers.token is not None:
        fixed.append((Principal("workers-token-file", Role.WORKER), config.workers.token))
    return fixed


def read_lease_key(data_dir: str) -> bytes:
    """
    The key of the lease tokens workers are given (L{dispatcher.wire._tokens}),
    from L{LEASE_KEY_NAME} in C{data_dir}; on the first start, a new random
    one, written there with mode 0600.  Runs on the I/O pool, under the data
    directory's lock.

    Kept in a file of its own rather than in the store: the store's schema
    and its backups stay as they are (a backup does not carry the key, so
    whoever reads one cannot forge tokens for the running dispatcher), and
    it sits beside the data directory's other secrets.  A store restored on
    another host without it gets a new key: the leases outstanding then are
    refused as stale, and their jobs run again, as after any lost lease.

    @raise UnsafeSecret: group or others may read or write it, or another
        user owns it (L{check_secret}).
    """
    path = os.path.join(data_dir, LEASE_KEY_NAME)
    try:
        with open(path, "rb") as f:
            text = f.read(1024)
            mode = os.fstat(f.fileno()).st_mode
    except FileNotFoundError:
        return _make_lease_key(data_dir, path)
    except OSError as e:
        raise DataDirUnusable(_unusable(data_dir, e)) from e
    try:
        key = bytes.fromhex(text.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        key = b""
    if len(key) < KEY_BYTES:
        raise CannotStart(
            f"{path} does not hold a lease token key ({2 * KEY_BYTES} hexadecimal "
            "digits or more); remove it and a new one is made at start (the leases "
            "workers hold now are then refused, and their jobs run again)"
        )
    if mode & 0o077:
        # Whoever read it can forge workers' lease tokens.  (The start
        # checks it first: L{DaemonService._secure_data_dir}.)
        check_secret(path, "the lease token key")
    return key


def _make_lease_key(data_dir: str, path: str) -> bytes:
    key = new_key()
    new = path + ".new"
    try:
        fd = os.open(new, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            # (A leftover .new file keeps the mode it was made with.)
            os.fchmod(fd, 0o600)
            os.write(fd, key.hex().encode("ascii") + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(new, path)
        directory = os.open(data_dir, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except OSError as e:
        raise DataDirUnusable(_unusable(data_dir, e)) from e
    log.info("made the lease token key {path}", path=path)
    return key


@contextlib.contextmanager
def hold_data_dir(data_dir: str) -> Iterator[None]:
    """
    Hold the data directory's lock, as a running daemon does, for an
    operator's command that must not run beside one (a restore).

    @raise DataDirInUse: a dispatcher holds it.
    @raise DataDirUnusable: it is not a directory this process may write in.
    """
    try:
        fd = open_own_file(os.path.join(data_dir, "lock"), os.O_RDWR | os.O_CREAT)
    except OSError as e:
        raise DataDirUnusable(_unusable(data_dir, e)) from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.read(fd, 100).decode("ascii", "replace").strip()
            raise DataDirInUse(
                f"the data directory {data_dir} is in use by a dispatcher (pid "
                f"{other or 'unknown'}); stop it first"
            )
        yield
    finally:
        os.close(fd)


def _unusable(data_dir: str, error: OSError) -> str:
    if isinstance(error, FileExistsError) and not os.path.isdir(data_dir):
        what = f"{data_dir} is not a directory"
    else:
        where = error.filename if error.filename is not None else data_dir
        what = f"{where}: {error.strerror or error}"
    return (
        f"the data directory {data_dir} cannot be used: {what}; give a "
        "--data-dir ([dispatcher] data_dir) that is a directory this user may "
        "write in"
    )


def _address(port: Any) -> str:
    host = port.getHost()
    return f"{getattr(host, 'host', '')}:{getattr(host, 'port', '')}"


def _kill_leftover(pid: int, start_ticks: Any, boot_id: Any) -> bool:
    import signal

    return kill_group_if_ours(pid, start_ticks, boot_id, signal.SIGKILL)
