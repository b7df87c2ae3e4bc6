"""
The ini file, read once into one frozen value.

Every key has a default, so the daemon runs with no file at all; every key
of a file is checked, and a wrong one is an error that names the file, the
section, the key, the value and what is allowed.
"""

from __future__ import annotations

import configparser
import grp
import importlib
import importlib.util
import ipaddress
import math
import os
import pwd
import re
import sys
import urllib.parse
from typing import Any, Callable, Mapping, Optional

import attrs

from dispatcher.config._backends import BACKEND_NAME, SlurmBackend, parse_backend


class ConfigError(Exception):
    """
    A configuration that the daemon cannot run with; the message is one
    line that says where and what is wrong.
    """


# The listen backlog the daemon asks for when the endpoint names none:
# Twisted's default of 50 refuses connections when hundreds of clients
# connect at once (they retry a second later).  Linux caps it at
# net.core.somaxconn (4096 since 5.4).
DEFAULT_BACKLOG = 4096
_BACKLOG_TYPES = ("tcp", "tcp6", "unix", "ssl")
_BACKLOG_ARGUMENT = re.compile(r"(?<!\\):backlog=")


_MODE_ARGUMENT = re.compile(r"(?<!\\):mode=")


def with_default_backlog(description: str) -> str:
    """
    A server endpoint description with C{backlog=}L{DEFAULT_BACKLOG} added
    when it is of a type that takes a backlog and gives none, and, for a
    UNIX socket, C{mode=600} when it gives no mode: Twisted's default,
    0666, lets every local account connect.
    """
    kind = description.split(":", 1)[0].strip().lower()
    if kind == "unix" and not _MODE_ARGUMENT.search(description):
        description = f"{description}:mode=600"
    if kind not in _BACKLOG_TYPES or _BACKLOG_ARGUMENT.search(description):
        return description
    return f"{description}:backlog={DEFAULT_BACKLOG}"


@attrs.frozen
class ServerConfig:
    """
    C{[server]}: where and how the HTTP API listens, and whether it writes
    an access log (C{DATA_DIR/access.log}); how long a connection may idle,
    and a request's head and body take.  C{listen} gets the default
    backlog whenever it is set without one, from the file or C{--listen}.
    """

    listen: str = attrs.field(
        default="tcp:8080:interface=127.0.0.1", converter=with_default_backlog
    )
    # The group a UNIX socket listener is given (its mode, from the
    # endpoint's mode=, then lets that group connect), as a gid.
    socket_group: Optional[int] = None
    max_body_bytes: int = 1048576
    access_log: bool = True
    idle_timeout: float = 60.0
    head_timeout: float = 30.0
    body_timeout: float = 60.0
    # The Host names the API answers to besides the loopback names and the
    # address it listens on ("*": any); None: those alone.
    allowed_hosts: Optional[tuple[str, ...]] = None
    # The most client connections open at once, in all and from one
    # address; None ("auto"): derived at start from the open-file limit
    # (dispatcher.app._limits).  0 per address ("none"): no such limit.
    max_connections: Optional[int] = None
    max_connections_per_address: Optional[int] = None


@attrs.frozen
class DispatcherConfig:
    """
    C{[dispatcher]}: where the data lives, how long a stop waits, how
    soon a change of a job's run state reaches the disk, whether
    C{twistd dispatcher} freezes its heap out of the collector's sight, and
    how much one request may make.
    """

    data_dir: str = "var"
    shutdown_grace: float = 30.0
    idempotency_ttl: float = 86400.0
    max_array: int = 10000
    # The most bytes the members of the arrays of one request may store in
    # all, each counted as its spec's JSON (a plain job's request body
    # bounds it): an array stores its spec once a member.
    max_stored_bytes: int = 16 * 1024 * 1024
    sync_interval: float = 1.0
    gc_freeze: bool = False
    # This dispatcher's name: its local jobs' holder is local@NAME.  None:
    # the data directory's (see DaemonService), made at the first start.
    name: Optional[str] = None


@attrs.frozen
class StoreConfig:
    """
    C{[store]}: where jobs are stored.  No C{url} (the default): the
    embedded SQLite file in the data directory.  A C{postgresql://} URL
    (libpq's form): that PostgreSQL database
    (L{dispatcher.store._postgres}).  Several dispatchers on one database
    wake each other with C{LISTEN/NOTIFY} (C{notify}, on by default) and
    read each other's events every C{poll_interval} seconds whatever they
    heard (L{dispatcher.store._pg_events}); both are PostgreSQL's alone.
    """

    url: Optional[str] = None
    # With a PostgreSQL url: seconds a local job's lease lives unless its
    # dispatcher renews it (every sixth of it); one that cannot renew for
    # half of it kills its local jobs (see dispatcher.core._lease_keeper).
    lease_seconds: float = 30.0
    poll_interval: float = 1.0
    notify: bool = True


# A dispatcher's name ([dispatcher] name): what a holder name and a log
# line can carry without quoting.
DISPATCHER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,99}")


def _dispatcher_name(text: str) -> Optional[str]:
    name = text.strip()
    if not name:
        return None
    if not DISPATCHER_NAME.fullmatch(name):
        raise ValueError(
            "expected a name of 1 to 100 letters, digits, '.', '_', ':' or '-', "
            "starting with a letter or a digit, unique among the dispatchers of "
            "one database"
        )
    return name


# The longest [store] poll_interval: a lost notification (or a lost
# listening connection) leaves a job waiting at most this long.
MAX_POLL_INTERVAL = 60.0


def _poll_interval(text: str) -> float:
    expected = f"expected a number of seconds above 0 and at most {MAX_POLL_INTERVAL:g}"
    try:
        value = float(text)
    except ValueError:
        raise ValueError(expected)
    if not 0 < value <= MAX_POLL_INTERVAL:
        raise ValueError(expected)
    return value


# The schemes of a PostgreSQL URL, as libpq reads them.
POSTGRESQL_SCHEMES = ("postgresql", "postgres")


def _store_url(text: str) -> Optional[str]:
    url = text.strip()
    if not url:
        return None
    expected = (
        "expected a PostgreSQL URL, postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE"
        " (or nothing: the SQLite file in the data directory)"
    )
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # a port that is not a number raises
    except ValueError:
        raise ValueError(expected)
    if parts.scheme not in POSTGRESQL_SCHEMES or not parts.path.strip("/") and not parts.query:
        raise ValueError(expected)
    if importlib.util.find_spec("psycopg") is None:
        raise ValueError(
            "the PostgreSQL store needs psycopg: pip install 'dispatcher[postgresql]'"
        )
    return url


def _without_password(text: str) -> str:
    # A URL's password is not written into an error message or a log.
    return re.sub(r"(://[^:/@\s]*:)[^@/\s]*@", r"\1***@", text)


# [executor] max_log_bytes by default: 64 MiB of each stream of a job.
DEFAULT_MAX_LOG_BYTES = 64 << 20
# [executor] max_processes by default: a job's processes and threads.
DEFAULT_MAX_PROCESSES = 4096


@attrs.frozen
class RunAs:
    """
    A local account command jobs run as: a user, a group, and the
    supplementary groups the user is in (as C{initgroups} would give them),
    looked up when the configuration is read.
    """

    user: str
    uid: int
    group: str
    gid: int
    groups: tuple[int, ...]

    def __str__(self) -> str:
        return f"{self.user}:{self.group}"


# The account a daemon running as root runs command jobs as when
# [executor] run_as does not name one (as HTCondor falls back to nobody).
DEFAULT_RUN_AS = "nobody"


def run_as(text: str) -> RunAs:
    """
    C{USER[:GROUP]} (names, or numbers of this host's accounts) as a
    L{RunAs}; without a group, the user's own.  Root, as the user or the
    group, must be written out as C{root}: a number or another name of uid
    or gid 0 is refused, so that jobs never run as root by a slip.

    @raise ValueError: no such user or group, or root not written out.
    """
    user_text, _, group_text = text.strip().partition(":")
    user_text, group_text = user_text.strip(), group_text.strip()
    if not user_text:
        raise ValueError("expected USER or USER:GROUP, an account of this host")
    try:
        entry = (
            pwd.getpwuid(int(user_text)) if user_text.isdigit() else pwd.getpwnam(user_text)
        )
    except (KeyError, OverflowError):
        raise ValueError(f"no user {user_text} on this host; expected USER or USER:GROUP")
    if entry.pw_uid == 0 and user_text != "root":
        raise ValueError(
            f"{user_text} is uid 0, root: to run jobs as root, write run_as = root"
        )
    if group_text:
        try:
            group = (
                grp.getgrgid(int(group_text))
                if group_text.isdigit()
                else grp.getgrnam(group_text)
            )
        except (KeyError, OverflowError):
            raise ValueError(f"no group {group_text} on this host")
        if group.gr_gid == 0 and group_text != "root":
            raise ValueError(
                f"{group_text} is gid 0, root's group: write USER:root to mean it"
            )
    else:
        try:
            group = grp.getgrgid(entry.pw_gid)
        except KeyError:
            raise ValueError(
                f"the group of {entry.pw_name} (gid {entry.pw_gid}) is not in this "
                "host's group database; give USER:GROUP"
            )
        if group.gr_gid == 0 and entry.pw_uid != 0:
            raise ValueError(
                f"the group of {entry.pw_name} is root's (gid 0): write "
                f"{entry.pw_name}:root to mean it, or name another group"
            )
    groups = tuple(os.getgrouplist(entry.pw_name, group.gr_gid))
    return RunAs(entry.pw_name, entry.pw_uid, group.gr_name, group.gr_gid, groups)


def _optional_run_as(text: str) -> Optional[RunAs]:
    return run_as(text) if text.strip() else None


@attrs.frozen
class ExecutorConfig:
    """
    C{[executor]}: what runs on this host at once; as whom command jobs
    run (C{None}: see L{dispatcher.execution._accounts}); and what bounds a
    command job: its processes (and threads) and the bytes of each stream
    of its log kept (0: no limit), and whether jobs go in cgroups of their
    own (C{auto}: where the host allows, C{off}: never).
    """

    slots: int = 8
    threads: int = 8
    kill_grace: float = 5.0
    run_as: Optional[RunAs] = None
    max_processes: int = DEFAULT_MAX_PROCESSES
    max_log_bytes: int = DEFAULT_MAX_LOG_BYTES
    cgroups: str = "auto"


@attrs.frozen
class FetchConfig:
    """
    C{[fetch]}: the limits on fetching a job's inputs, and the networks
    (C{allow}) inputs may be fetched from although the fetch policy
    (L{dispatcher.execution._fetch_policy}) refuses them by default.
    """

    timeout: float = 300.0
    retries: int = 3
    retry_delay: float = 1.0
    max_bytes: int = 1073741824
    allow: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()


@attrs.frozen
class WorkersConfig:
    """
    C{[workers]}: remote workers.  Without a token file the worker
    endpoints are closed.
    """

    token_file: Optional[str] = None
    token: Optional[str] = attrs.field(default=None, repr=False)
    lease_seconds: float = 30.0
    # Seconds by which a worker that hears nothing stops its job before the
    # dispatcher's lease runs out (docs/worker-protocol.md, "Self-fencing");
    # None: the dispatcher's default for the lease_seconds.
    fence_margin: Optional[float] = None
    # Seconds more than its lease a job's last attempt waits for its silent
    # worker's result before it is recorded lost; 0: none; None: the
    # dispatcher's default (a minute, or two leases if longer).
    last_attempt_grace: Optional[float] = None
    # The most leases one request for work is granted, whatever the worker
    # asks for.
    max_jobs_per_poll: int = 64
    # The most worker names one credential, and all of them together, may
    # have connected at once; a new name beyond is refused (429).
    max_names_per_credential: int = 256
    max_names: int = 4096


@attrs.frozen
class ApiConfig:
    """
    C{[api]}: who may call.  Credentials are named tokens in the data
    directory (C{dispatcher token}); a token file adds one admin token.
    C{authentication = off} lets every caller in, as an admin (loopback
    only).
    """

    token_file: Optional[str] = None
    token: Optional[str] = attrs.field(default=None, repr=False)
    authentication: bool = True
    # How many requests may wait (?wait=SECONDS) at once; more are answered
    # 503 too_many_waits.  Each holds a connection and a little memory.
    max_waits: int = 1000
    # The most log follows (GET /v1/jobs/{id}/log?follow=true) open at
    # once; a credential may hold a quarter of them.
    max_log_followers: int = 4096


@attrs.frozen
class WebhooksConfig:
    """
    C{[webhooks]}: the secret a job's webhook deliveries are signed with
    (read from C{secret_file}; without one, a job may not name
    C{notify}), and how they are sent: at most C{concurrency} at once,
    each given C{timeout} seconds; one that fails is tried again after
    C{retry_delay} seconds, doubled at each failure up to C{max_delay}
    (each wait drawn between half and one and a half times that), and
    given up after C{max_attempts} tries or C{max_age} seconds after its
    change; the outbox is read every C{poll_interval} seconds.
    """

    secret_file: Optional[str] = None
    secret: Optional[str] = attrs.field(default=None, repr=False)
    concurrency: int = 8
    timeout: float = 10.0
    retry_delay: float = 10.0
    max_delay: float = 3600.0
    max_attempts: int = 12
    max_age: float = 86400.0
    poll_interval: float = 1.0


@attrs.frozen
class RetentionConfig:
    """
    C{[retention]}: how long finished jobs (with their attempts, logs and
    working directories) are kept: C{finished_days} after they finished
    (fractions allowed; C{None}: for ever), and at most C{finished_count}
    of them (C{None}: no bound).
    """

    finished_days: Optional[float] = 7.0
    finished_count: Optional[int] = None


# [events] max_subscribers by default.  The benchmark holds 10,000 idle
# subscribers, as a fleet of clients each following its own jobs would; a
# quarter more leaves room for their reconnects (a stream that ends is
# resumed on a new connection before the old one is seen gone).  An idle
# subscriber costs about 5 KiB of memory (its connection and its place in
# the fan-out), so 12,500 of them some 60 MiB; an event costs a dictionary
# look-up per filter kind, not one per subscriber.
DEFAULT_MAX_SUBSCRIBERS = 12_500
# [events] buffer by default: the events a subscriber whose connection
# does not take them may be behind by before it is dropped.  Each is a
# reference to the frame every subscriber shares (8 bytes a subscriber),
# so a stalled subscriber holds at most 32 KiB of its own, and a burst of
# 4,096 events (a batch's queued events, under load a few hundred
# milliseconds of changes) passes a reader that keeps up.
DEFAULT_EVENT_BUFFER = 4096


@attrs.frozen
class EventsConfig:
    """
    C{[events]}: how long the events of C{GET /v1/events} are kept (the
    longest a client may be away and resume without a gap), how often an
    idle stream gets a keep-alive comment, how far a subscriber may fall
    behind before it is dropped, and how many may subscribe at once.
    """

    retention: float = 86400.0
    heartbeat: float = 15.0
    buffer: int = DEFAULT_EVENT_BUFFER
    max_subscribers: int = DEFAULT_MAX_SUBSCRIBERS


# The most lines a second the daemon's log gives jobs' lives, by default
# ([log] job_lines; see dispatcher.core._joblog for why they are bounded).
DEFAULT_JOB_LINES = 200

# The log's formats ([log] format) and levels ([log] level), as
# twisted.logger names them.
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warn", "error", "critical")


@attrs.frozen
class LogConfig:
    """
    C{[log]}: how the daemon's log is written under C{twistd} (C{text}, or
    C{json}: one JSON object a line, as twisted.logger's
    C{jsonFileLogObserver} writes them and C{eventsFromJSONLogFile} reads
    them), the least level written, and how many per-job lines a second it
    may hold (C{None}: no bound).  Where it goes is twistd's to say
    (C{--logfile}, C{--nodaemon}).
    """

    format: str = "text"
    level: str = "info"
    job_lines: Optional[int] = DEFAULT_JOB_LINES


@attrs.frozen
class QueueConfig:
    """
    C{[queue:NAME]}: a queue's limit of running jobs (0: none) and the
    defaults its jobs get.
    """

    name: str
    max_running: int = 0
    priority: int = 0
    timeout: Optional[float] = None
    # [queue:NAME] backend: the [backend:NAME] its jobs run on (None: this
    # host and the plain remote workers).
    backend: Optional[str] = None


class _Inherit:
    """
    The value of a quota key a section does not give: the next section
    down decides (see L{Quotas.limits}).
    """

    def __repr__(self) -> str:
        return "INHERIT"


INHERIT: Any = _Inherit()

# The roles a [quota:role=ROLE] section may name: dispatcher.model's Role
# values (this package imports nothing of the package; a test checks that
# they agree).
ROLE_NAMES = ("admin", "submitter", "reader", "worker", "metrics")
# A principal's name, as dispatcher.model._principals has it (the same
# test checks this too): what a [quota:owner=NAME] section names.
OWNER_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.@-]{0,63}$")


@attrs.frozen
class QuotaConfig:
    """
    One quota section: C{[quota]} (the defaults of every principal but an
    admin), C{[quota:role=ROLE]} or C{[quota:owner=NAME]}.

    @ivar max_jobs: the most unfinished jobs (pending, queued, staging,
        running) an owner may have; C{None}: no limit.
    @ivar rate: jobs an owner may submit a second, on average; C{None}: no
        limit.
    @ivar burst: jobs it may submit at once after a quiet spell (the
        bucket's size); C{None}: C{rate}, rounded up.

    A key a section does not give is L{INHERIT}.
    """

    max_jobs: Any = INHERIT
    rate: Any = INHERIT
    burst: Any = INHERIT


@attrs.frozen
class QuotaLimits:
    """
    The quota of one principal, resolved (L{Quotas.limits}): C{None} is no
    limit.  C{burst} is set whenever C{rate} is.
    """

    max_jobs: Optional[int] = None
    rate: Optional[float] = None
    burst: Optional[int] = None

    @property
    def unlimited(self) -> bool:
        """
        Whether neither limit applies.
        """
        return self.max_jobs is None and self.rate is None


# What [quota] holds when the file does not say: a submitter's jobs are
# bounded; an admin's are not (only [quota:role=admin] or an owner's
# section bounds them).
DEFAULT_QUOTA = QuotaConfig(max_jobs=50_000, rate=1000.0, burst=10_000)


@attrs.frozen
class Quotas:
    """
    Every quota section: C{[quota]} (L{DEFAULT_QUOTA} where it does not
    say), and the C{[quota:role=ROLE]} and C{[quota:owner=NAME]} ones.
    """

    default: QuotaConfig = DEFAULT_QUOTA
    roles: Mapping[str, QuotaConfig] = attrs.field(factory=dict)
    owners: Mapping[str, QuotaConfig] = attrs.field(factory=dict)

    def limits(self, name: str, role: str) -> QuotaLimits:
        """
        The quota of the principal C{name} of the role C{role}: each key
        from the owner's section, else the role's, else (unless C{role} is
        admin) C{[quota]}; a key none of them gives is no limit.
        """
        sections = [self.owners.get(name), self.roles.get(role)]
        if role != "admin":
            sections.append(self.default)
        found = {}
        for key in ("max_jobs", "rate", "burst"):
            value = None
            for section in sections:
                if section is not None and getattr(section, key) is not INHERIT:
                    value = getattr(section, key)
                    break
            found[key] = value
        if found["rate"] is None:
            found["burst"] = None
        elif found["burst"] is None:
            found["burst"] = max(1, math.ceil(found["rate"]))
        return QuotaLimits(**found)


@attrs.frozen
class TaskRef:
    """
    A task name bound to the function that runs it.
    """

    name: str
    target: str
    function: Callable[..., Any] = attrs.field(eq=False, repr=False)


@attrs.frozen
class Config:
    """
    The whole configuration of a daemon.
    """

    path: Optional[str] = None
    server: ServerConfig = ServerConfig()
    dispatcher: DispatcherConfig = DispatcherConfig()
    executor: ExecutorConfig = ExecutorConfig()
    fetch: FetchConfig = FetchConfig()
    workers: WorkersConfig = WorkersConfig()
    api: ApiConfig = ApiConfig()
    retention: RetentionConfig = RetentionConfig()
    webhooks: WebhooksConfig = WebhooksConfig()
    events: EventsConfig = EventsConfig()
    log: LogConfig = LogConfig()
    store: StoreConfig = StoreConfig()
    tasks: Mapping[str, TaskRef] = attrs.field(factory=dict)
    queues: Mapping[str, QueueConfig] = attrs.field(
        factory=lambda: {"default": QueueConfig("default")}
    )
    quotas: Quotas = Quotas()
    # [backend:NAME] sections, by name (dispatcher.config._backends).
    backends: Mapping[str, SlurmBackend] = attrs.field(factory=dict)
    # [run_as]: the account each owner's (credential's) command jobs run as,
    # where the dispatcher runs as root; an owner not here gets [executor]
    # run_as.
    run_as_by_owner: Mapping[str, RunAs] = attrs.field(factory=dict)
    # [tasks] path: the directories task modules are imported from, besides
    # the interpreter's own path (added to the end of sys.path at start).
    task_path: tuple[str, ...] = ()


def task_directories(text: str, base: str) -> tuple[str, ...]:
    """
    C{[tasks] path}: directories separated by C{:} (as C{PYTHONPATH}
    separates them), each relative to C{base} (the directory of the
    configuration file) unless absolute.  C{ValueError} names one that is
    not a directory.
    """
    found = []
    for entry in (e.strip() for e in text.split(":")):
        if not entry:
            continue
        directory = os.path.normpath(os.path.join(base, os.path.expanduser(entry)))
        if not os.path.isdir(directory):
            raise ValueError(
                f"{directory} is not a directory; expected directories of task "
                "modules separated by ':', relative to the configuration file's "
                "directory unless absolute"
            )
        found.append(directory)
    if not found:
        raise ValueError("expected one or more directories separated by ':'")
    return tuple(dict.fromkeys(found))


def _integer(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"expected an integer of at least {minimum}")
        if value < minimum:
            raise ValueError(f"expected an integer of at least {minimum}")
        return value

    return parse


def _seconds(minimum: float, above: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        bound = "above" if above else "of at least"
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"expected a number of seconds {bound} {minimum:g}")
        if value != value or value in (float("inf"),) or value < minimum or (
            above and value == minimum
        ):
            raise ValueError(f"expected a number of seconds {bound} {minimum:g}")
        return value

    return parse


def _any_integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError("expected an integer")


def _optional_seconds(text: str) -> Optional[float]:
    if not text.strip() or text.strip().lower() == "none":
        return None
    return _seconds(0, above=True)(text)


def _optional_seconds_from_zero(text: str) -> Optional[float]:
    if not text.strip() or text.strip().lower() == "none":
        return None
    return _seconds(0)(text)


def _connections(text: str) -> Optional[int]:
    if text.strip().lower() in ("", "auto"):
        return None
    try:
        return _integer(1)(text)
    except ValueError:
        raise ValueError("expected auto or an integer of at least 1")


def _connections_per_address(text: str) -> Optional[int]:
    value = text.strip().lower()
    if value == "none":
        return 0
    try:
        return _connections(text)
    except ValueError:
        raise ValueError("expected auto, none or an integer of at least 1")


def _days(text: str) -> Optional[float]:
    if text.strip().lower() in ("", "none"):
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise ValueError(
            "expected a number of days above 0 (fractions allowed: 0.5 is 12 hours), "
            "or none to keep finished jobs for ever"
        )
    return value


def _count(text: str) -> Optional[int]:
    if text.strip().lower() in ("", "none"):
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError("expected an integer of at least 1, or none for no bound")
    return value


def _boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "yes", "true", "on"):
        return True
    if lowered in ("0", "no", "false", "off"):
        return False
    raise ValueError("expected one of yes, no, true, false, on, off, 1, 0")


def _endpoint(text: str) -> str:
    # Checked for shape here; the endpoint parser itself runs in makeService,
    # where a bad description is reported with the same words.
    if not text.strip():
        raise ValueError("expected a Twisted endpoint description such as tcp:8080")
    return text.strip()


def _group(text: str) -> Optional[int]:
    name = text.strip()
    if not name:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        if name.isdigit():
            return int(name)
        raise ValueError("expected the name (or number) of a group of this host")


def _process_limit(text: str) -> int:
    # A job is started from inside its cgroups by the spawner helper, which
    # counts there for that moment: a limit needs room for both.
    allowed = "expected 0 (no limit) or an integer of at least 2"
    try:
        value = int(text)
    except ValueError:
        raise ValueError(allowed)
    if value != 0 and value < 2:
        raise ValueError(allowed)
    return value


def _cgroups(text: str) -> str:
    value = text.strip().lower()
    if value not in ("auto", "off"):
        raise ValueError("expected auto (cgroups where the host allows them) or off")
    return value


def _authentication(text: str) -> bool:
    value = text.strip().lower()
    if value == "required":
        return True
    if value == "off":
        return False
    raise ValueError("expected required or off")


def _token_file(text: str) -> Optional[str]:
    # Empty: no token file (the endpoints it guards stay as they are).
    return text.strip() or None


def read_token(path: str, what: str = "token") -> str:
    """
    The bearer token (or, as C{what} says, another secret) in the file at
    C{path} (surrounding white space stripped); C{ValueError} saying why
    it cannot serve as one.
    """
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as e:
        raise ValueError(f"cannot read the {what} file: {e.strerror}")
    except UnicodeDecodeError:
        raise ValueError(f"the {what} file is not UTF-8 text")
    if len(token) < 16:
        raise ValueError(f"the {what} file must hold a {what} of at least 16 characters")
    if any(c.isspace() for c in token):
        raise ValueError(f"the {what} must not contain white space")
    return token


# One entry of [server] allowed_hosts: a DNS name or IPv4 address, or an
# IPv6 address in brackets, with an optional port.
_HOST_ENTRY = re.compile(
    r"^(?:[a-z0-9](?:[a-z0-9\-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9\-]{0,61}[a-z0-9])?)*"
    r"|\[[0-9a-f:.]+\])(?::([0-9]{1,5}))?$"
)


def host_list(text: str) -> Optional[tuple[str, ...]]:
    """
    C{[server] allowed_hosts}: host names, each with or without a port,
    separated by commas or white space, lower-cased; or C{*} alone (any
    Host); empty: C{None} (none besides the defaults).  C{ValueError}
    names the first entry that is not one.
    """
    entries = [e for e in re.split(r"[,\s]+", text.strip().lower()) if e]
    if not entries:
        return None
    if entries == ["*"]:
        return ("*",)
    for entry in entries:
        match = _HOST_ENTRY.match(entry)
        port = match.group(1) if match else None
        if match is None or (port is not None and not 1 <= int(port) <= 65535):
            raise ValueError(
                f"{entry!r} is not a host name, IPv4 address or [IPv6] address with an "
                "optional :port from 1 to 65535 (or * alone, for any Host); separate "
                "them with commas or spaces"
            )
    return tuple(dict.fromkeys(entries))


def network_list(text: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """
    C{[fetch] allow}: networks in CIDR form (C{10.1.0.0/16}, C{fd00::/8};
    an address alone is that one address), separated by commas or white
    space; empty: none.  C{ValueError} names the first entry that is not
    one, and says what it may have meant.
    """
    networks = []
    for entry in (e for e in re.split(r"[,\s]+", text.strip()) if e):
        try:
            networks.append(ipaddress.ip_network(entry, strict=True))
        except ValueError:
            try:
                # Host bits set (10.1.2.3/16): say which network holds it.
                meant = ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(
                    f"{entry!r} is not a network in CIDR form; expected networks "
                    "such as 127.0.0.0/8, 10.1.0.0/16 or fd00::/8 (an address "
                    "alone is that address), separated by commas"
                )
            alone = ipaddress.ip_interface(entry).ip
            raise ValueError(
                f"{entry!r} has bits set beyond its /{meant.prefixlen} prefix; "
                f"write the network as {meant}, or the address alone as "
                f"{alone}/{alone.max_prefixlen}"
            )
    return tuple(dict.fromkeys(networks))


def _choice(allowed: tuple[str, ...]) -> Callable[[str], str]:
    def one_of(text: str) -> str:
        value = text.strip().lower()
        if value not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}")
        return value

    return one_of


def _job_lines(text: str) -> Optional[int]:
    if text.strip().lower() == "none":
        return None
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(
            "expected a number of lines a second, 0 or more (0: no line for any "
            "job), or none (every job's lines, at about 50 microseconds each)"
        )
    return value


def _directory(text: str) -> str:
    if not text.strip():
        raise ValueError("expected a directory path")
    return text.strip()


_SECTIONS: Mapping[str, tuple[type, Mapping[str, Callable[[str], Any]]]] = {
    "server": (
        ServerConfig,
        {
            "listen": _endpoint,
            "max_body_bytes": _integer(1024),
            "access_log": _boolean,
            "idle_timeout": _seconds(0, above=True),
            "head_timeout": _seconds(0, above=True),
            "body_timeout": _seconds(0, above=True),
            "allowed_hosts": host_list,
            "socket_group": _group,
            "max_connections": _connections,
            "max_connections_per_address": _connections_per_address,
        },
    ),
    "dispatcher": (
        DispatcherConfig,
        {
            "data_dir": _directory,
            "shutdown_grace": _seconds(0),
            "idempotency_ttl": _seconds(0, above=True),
            "max_array": _integer(1),
            "max_stored_bytes": _integer(1024),
            "sync_interval": _seconds(0),
            "gc_freeze": _boolean,
            "name": _dispatcher_name,
        },
    ),
    "executor": (
        ExecutorConfig,
        {
            "slots": _integer(0),
            "threads": _integer(1),
            "kill_grace": _seconds(0),
            "run_as": _optional_run_as,
            "max_processes": _process_limit,
            "max_log_bytes": _integer(0),
            "cgroups": _cgroups,
        },
    ),
    "fetch": (
        FetchConfig,
        {
            "timeout": _seconds(0, above=True),
            "retries": _integer(0),
            "retry_delay": _seconds(0),
            "max_bytes": _integer(1),
            "allow": network_list,
        },
    ),
    "workers": (
        WorkersConfig,
        {
            "token_file": _token_file,
            "lease_seconds": _seconds(1),
            "fence_margin": _optional_seconds,
            "last_attempt_grace": _optional_seconds_from_zero,
            "max_jobs_per_poll": _integer(1),
            "max_names_per_credential": _integer(1),
            "max_names": _integer(1),
        },
    ),
    "api": (
        ApiConfig,
        {
            "token_file": _token_file,
            "authentication": _authentication,
            "max_waits": _integer(1),
            "max_log_followers": _integer(1),
        },
    ),
    "retention": (RetentionConfig, {"finished_days": _days, "finished_count": _count}),
    "store": (
        StoreConfig,
        {
            "url": _store_url,
            "lease_seconds": _seconds(1),
            "poll_interval": _poll_interval,
            "notify": _boolean,
        },
    ),
    "webhooks": (
        WebhooksConfig,
        {
            "secret_file": _token_file,
            "concurrency": _integer(1),
            "timeout": _seconds(0, above=True),
            "retry_delay": _seconds(0, above=True),
            "max_delay": _seconds(0, above=True),
            "max_attempts": _integer(1),
            "max_age": _seconds(0, above=True),
            "poll_interval": _seconds(0, above=True),
        },
    ),
    "log": (
        LogConfig,
        {
            "format": _choice(LOG_FORMATS),
            "level": _choice(LOG_LEVELS),
            "job_lines": _job_lines,
        },
    ),
    "events": (
        EventsConfig,
        {
            "retention": _seconds(60),
            "heartbeat": _seconds(0.1),
            "buffer": _integer(16),
            "max_subscribers": _integer(0),
        },
    ),
}

def _optional(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse_or_none(text: str) -> Any:
        if text.strip().lower() == "none":
            return None
        try:
            return parse(text)
        except ValueError as e:
            raise ValueError(f"{e}, or none (no limit)")

    return parse_or_none


def _optional_name(text: str) -> Optional[str]:
    text = text.strip()
    if not text or text.lower() == "none":
        return None
    if not BACKEND_NAME.match(text):
        raise ValueError("expected the name of a [backend:NAME] section, or none")
    return text


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (0 < value < float("inf")):
        raise ValueError("expected a number of jobs a second above 0 (fractions allowed)")
    return value


_QUOTA_KEYS: Mapping[str, Callable[[str], Any]] = {
    "max_jobs": _optional(_integer(1)),
    "rate": _optional(_rate),
    "burst": _integer(1),
}

_QUEUE_KEYS: Mapping[str, Callable[[str], Any]] = {
    "max_running": _integer(0),
    "priority": _any_integer,
    "timeout": _optional_seconds,
    "backend": _optional_name,
}
QUEUE_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,100}$")

_TASK_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,100}$")
_TASK_TARGET = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def resolve_task(target: str) -> Callable[..., Any]:
    """
    Import C{package.module:function} and return the function.
    """
    module_name, _, attribute = target.partition(":")
    module = importlib.import_module(module_name)
    value: Any = module
    for part in attribute.split("."):
        value = getattr(value, part)
    if not callable(value):
        raise TypeError(f"{target} is not callable")
    return value


def parse_config(text: str, path: str = "<string>") -> Config:
    """
    Read the text of an ini file into a L{Config}, or raise L{ConfigError}.
    """
    parser = configparser.ConfigParser(
        interpolation=None, strict=True, empty_lines_in_values=False
    )
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    try:
        parser.read_string(text, source=path)
    except configparser.Error as e:
        raise ConfigError(f"{path}: {' '.join(str(e).split())}")

    def fail(section: str, key: str, value: str, allowed: str) -> ConfigError:
        return ConfigError(
            f"{path}: [{section}] {key} = {_without_password(value)!r}: {allowed}"
        )

    def parse_keys(
        section: str, keys: Mapping[str, Callable[[str], Any]]
    ) -> dict[str, Any]:
        fields = {}
        for key, raw in parser.items(section):
            if key not in keys:
                raise fail(section, key, raw, f"unknown key; known: {', '.join(keys)}")
            try:
                fields[key] = keys[key](raw)
            except ValueError as e:
                raise fail(section, key, raw, str(e))
        return fields

    values: dict[str, Any] = {"path": path}
    tasks: dict[str, TaskRef] = {}
    queues: dict[str, QueueConfig] = {"default": QueueConfig("default")}
    quota_default = DEFAULT_QUOTA
    quota_roles: dict[str, QuotaConfig] = {}
    quota_owners: dict[str, QuotaConfig] = {}
    by_owner: dict[str, RunAs] = {}
    backends: dict[str, SlurmBackend] = {}
    for section in parser.sections():
        if section.startswith("backend:"):
            name = section[len("backend:"):]
            if not BACKEND_NAME.match(name):
                raise ConfigError(
                    f"{path}: [{section}]: a backend name may hold letters, digits, "
                    "'_' and '-' (at most 63, not starting with '-')"
                )

            def backend_fail(key: str, value: str, allowed: str, section: str = section) -> ConfigError:
                return fail(section, key, value, allowed)

            def backend_missing(key: str, what: str, section: str = section) -> ConfigError:
                return ConfigError(f"{path}: [{section}] {key}: missing; expected {what}")

            backends[name] = parse_backend(
                name, parser.items(section), backend_fail, backend_missing
            )
            continue
        if section == "quota":
            quota_default = attrs.evolve(DEFAULT_QUOTA, **parse_keys(section, _QUOTA_KEYS))
            continue
        if section.startswith("quota:"):
            kind, _, name = section[len("quota:"):].partition("=")
            if kind == "role" and name in ROLE_NAMES:
                quota_roles[name] = QuotaConfig(**parse_keys(section, _QUOTA_KEYS))
            elif kind == "owner" and OWNER_NAME.match(name):
                quota_owners[name] = QuotaConfig(**parse_keys(section, _QUOTA_KEYS))
            else:
                raise ConfigError(
                    f"{path}: [{section}]: expected [quota:role=ROLE] (ROLE one of "
                    f"{', '.join(ROLE_NAMES)}) or [quota:owner=NAME] (NAME a "
                    "credential's name: letters, digits, _ . @ -, not starting with "
                    ". @ or -)"
                )
            continue
        if section == "run_as":
            for owner, account in parser.items(section):
                if not OWNER_NAME.match(owner):
                    raise fail(
                        section,
                        owner,
                        account,
                        "an owner is a credential's name: letters, digits, _ . @ -, "
                        "not starting with . @ or -",
                    )
                try:
                    by_owner[owner] = run_as(account)
                except ValueError as e:
                    raise fail(section, owner, account, str(e))
            continue
        if section.startswith("queue:"):
            name = section[len("queue:"):]
            if not QUEUE_NAME.match(name):
                raise ConfigError(
                    f"{path}: [{section}]: a queue name may hold letters, digits, "
                    "'_', '.' and '-'"
                )
            queues[name] = QueueConfig(name, **parse_keys(section, _QUEUE_KEYS))
            continue
        if section == "tasks":
            entries = dict(parser.items(section))
            if "path" in entries:
                raw = entries.pop("path")
                try:
                    task_path = task_directories(raw, os.path.dirname(os.path.abspath(path)))
                except ValueError as e:
                    raise fail(section, "path", raw, str(e))
                # Before the tasks are loaded, and after everything else
                # on sys.path: a file there named as a module the daemon
                # uses (json.py, twisted/) cannot take its place.
                for directory in task_path:
                    if directory not in sys.path:
                        sys.path.append(directory)
                values["task_path"] = task_path
            for name, target in entries.items():
                if not _TASK_NAME.match(name):
                    raise fail(
                        section,
                        name,
                        target,
                        "a task name may hold letters, digits, '_', '.' and '-'",
                    )
                if not _TASK_TARGET.match(target):
                    raise fail(
                        section, name, target, "expected package.module:function"
                    )
                try:
                    function = resolve_task(target)
                except Exception as e:
                    raise fail(
                        section,
                        name,
                        target,
                        f"cannot load it ({type(e).__name__}: {e})",
                    )
                tasks[name] = TaskRef(name, target, function)
            continue
        if section not in _SECTIONS:
            known = ", ".join(
                f"[{s}]" for s in (
                    *_SECTIONS, "tasks", "queue:NAME", "backend:NAME", "quota",
                    "quota:role=ROLE", "quota:owner=NAME", "run_as",
                )
            )
            raise ConfigError(f"{path}: [{section}]: unknown section; known: {known}")
        kind, keys = _SECTIONS[section]
        fields = parse_keys(section, keys)
        if fields.get("token_file"):
            try:
                fields["token"] = read_token(fields["token_file"])
            except ValueError as e:
                raise fail(section, "token_file", fields["token_file"], str(e))
        if fields.get("secret_file"):
            try:
                fields["secret"] = read_token(fields["secret_file"], "secret")
            except ValueError as e:
                raise fail(section, "secret_file", fields["secret_file"], str(e))
        values[section] = kind(**fields)
        if section == "workers":
            _check_fence_margin(values[section], parser, fail)
    for queue in queues.values():
        if queue.backend is not None and queue.backend not in backends:
            raise fail(
                f"queue:{queue.name}", "backend", queue.backend,
                "no [backend:" + queue.backend + "] section names it; known: "
                + (", ".join(sorted(backends)) or "none"),
            )
    quotas = Quotas(quota_default, quota_roles, quota_owners)
    return Config(
        tasks=tasks, queues=queues, quotas=quotas, run_as_by_owner=by_owner,
        backends=backends, **values
    )


def _check_fence_margin(
    workers: WorkersConfig, parser: Any, fail: Callable[..., ConfigError]
) -> None:
    """
    A margin must leave a worker's deadline after its next heartbeat (a
    third of the lease), or a worker that misses nothing still stops its
    jobs: below two thirds of C{lease_seconds}.
    """
    margin = workers.fence_margin
    if margin is None:
        return
    limit = workers.lease_seconds * 2.0 / 3.0
    if margin >= limit:
        raise fail(
            "workers",
            "fence_margin",
            parser.get("workers", "fence_margin"),
            f"expected a number of seconds above 0 and below {limit:g} (two "
            f"thirds of lease_seconds = {workers.lease_seconds:g}, so that a "
            f"worker's deadline comes after its next heartbeat)",
        )


def load_config(path: str) -> Config:
    """
    Read the ini file at C{path} into a L{Config}, or raise L{ConfigError}.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the configuration: {e.strerror}")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text: {e}")
    return parse_config(text, path)
