"""
The ini file, read once into one frozen value.

Every key has a default, so the daemon runs with no file at all; every key
of a file is checked, and a wrong one is an error that names the file, the
section, the key, the value and what is allowed.
"""

from __future__ import annotations

import configparser
import importlib
import ipaddress
import re
from typing import Any, Callable, Mapping, Optional

import attrs


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
    soon a change of a job's run state reaches the disk, and whether
    C{twistd dispatcher} freezes its heap out of the collector's sight.
    """

    data_dir: str = "var"
    shutdown_grace: float = 30.0
    idempotency_ttl: float = 86400.0
    max_array: int = 10000
    sync_interval: float = 1.0
    gc_freeze: bool = False


# [executor] max_log_bytes by default: 64 MiB of each stream of a job.
DEFAULT_MAX_LOG_BYTES = 64 << 20
# [executor] max_processes by default: a job's processes and threads.
DEFAULT_MAX_PROCESSES = 4096


@attrs.frozen
class ExecutorConfig:
    """
    C{[executor]}: what runs on this host at once, and what bounds a
    command job: its processes (and threads) and the bytes of each stream
    of its log kept (0: no limit); whether jobs go in cgroups of their own
    (C{auto}: where the host allows, C{off}: never).
    """

    slots: int = 8
    threads: int = 8
    kill_grace: float = 5.0
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
    tasks: Mapping[str, TaskRef] = attrs.field(factory=dict)
    queues: Mapping[str, QueueConfig] = attrs.field(
        factory=lambda: {"default": QueueConfig("default")}
    )


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
    import grp

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


def read_token(path: str) -> str:
    """
    The bearer token in the file at C{path} (surrounding white space
    stripped); C{ValueError} saying why it cannot serve as one.
    """
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as e:
        raise ValueError(f"cannot read the token file: {e.strerror}")
    except UnicodeDecodeError:
        raise ValueError("the token file is not UTF-8 text")
    if len(token) < 16:
        raise ValueError("the token file must hold a token of at least 16 characters")
    if any(c.isspace() for c in token):
        raise ValueError("the token must not contain white space")
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
            "sync_interval": _seconds(0),
            "gc_freeze": _boolean,
        },
    ),
    "executor": (
        ExecutorConfig,
        {
            "slots": _integer(0),
            "threads": _integer(1),
            "kill_grace": _seconds(0),
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
    "api": (ApiConfig, {"token_file": _token_file, "authentication": _authentication}),
    "retention": (RetentionConfig, {"finished_days": _days, "finished_count": _count}),
}

_QUEUE_KEYS: Mapping[str, Callable[[str], Any]] = {
    "max_running": _integer(0),
    "priority": _any_integer,
    "timeout": _optional_seconds,
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
        return ConfigError(f"{path}: [{section}] {key} = {value!r}: {allowed}")

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
    for section in parser.sections():
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
            for name, target in parser.items(section):
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
            known = ", ".join(f"[{s}]" for s in (*_SECTIONS, "tasks", "queue:NAME"))
            raise ConfigError(f"{path}: [{section}]: unknown section; known: {known}")
        kind, keys = _SECTIONS[section]
        fields = parse_keys(section, keys)
        if fields.get("token_file"):
            try:
                fields["token"] = read_token(fields["token_file"])
            except ValueError as e:
                raise fail(section, "token_file", fields["token_file"], str(e))
        values[section] = kind(**fields)
        if section == "workers":
            _check_fence_margin(values[section], parser, fail)
    return Config(tasks=tasks, queues=queues, **values)


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
