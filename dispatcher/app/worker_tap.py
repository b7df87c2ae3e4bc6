"""
The C{dispatcher-worker} twistd plugin's options and service maker: the
only worker code that touches the global reactor.
"""

from __future__ import annotations

import ipaddress
import os
import re
from typing import Any, Callable, Mapping, Optional

import attrs
from hyperlink import DecodedURL
from twisted.python import usage

from dispatcher.app._files import UMASK, UnsafeSecret, check_secret
from dispatcher.app._logging import DaemonLog
from dispatcher.config._ini import LOG_LEVELS, Config, ConfigError, load_config, read_token
from dispatcher.execution._accounts import AccountRefused, job_accounts
from dispatcher.execution._host import detect_cpus, detect_gpus, detect_memory_mb
from dispatcher.wire._types import MAX_SLOTS
from dispatcher.workers._agent import WorkerDescription
from dispatcher.workers._service import WorkerSettings, default_name

DEFAULT_DATA_DIR = "dispatcher-worker-data"


def read_token_file(path: str) -> str:
    """
    The bearer token in the file at C{path}, read as the dispatcher reads
    its own copy.

    @raise usage.UsageError: the file cannot be read or holds no token, or
        another user than this process's owns it, or group or others may
        read or write it.
    """
    try:
        token = read_token(path)
        check_secret(path, "--token-file")
    except (ValueError, UnsafeSecret) as e:
        raise usage.UsageError(f"--token-file {path}: {e}")
    return token


def _number(
    option: str, text: str, parse: Callable[[str], Any], minimum: float, what: str
) -> Any:
    try:
        value = parse(text)
    except ValueError:
        value = None
    if value is None or value != value or value < minimum or value == float("inf"):
        raise usage.UsageError(f"--{option}: expected {what}, not {text!r}")
    return value


def _keep_days(text: str) -> Optional[float]:
    """
    C{--keep-days}: a number of days of at least 0, or C{none} (for ever).
    """
    if text.strip().lower() == "none":
        return None
    return _number(
        "keep-days",
        text,
        float,
        0,
        "a number of days of at least 0 (fractions allowed: 0.5 is 12 hours; 0 removes "
        "a job's directory as soon as its result is accepted), or none to keep them",
    )


def _url(text: str) -> str:
    try:
        url = DecodedURL.from_text(text)
    except Exception:
        url = None
    if url is None or url.scheme not in ("http", "https") or not url.host:
        raise usage.UsageError(
            f"--url: expected the dispatcher's http:// or https:// URL, such as "
            f"https://dispatch.example:8443, not {text!r}"
        )
    if url.query or url.fragment:
        raise usage.UsageError(f"--url: expected a URL without a query or fragment, not {text!r}")
    return text


def _is_loopback(host: str) -> bool:
    """
    Whether C{host} names this machine without a network in between: a
    loopback address (C{127.0.0.0/8}, C{::1}) or C{localhost}.  Other
    names are not resolved: what a name resolves to can change.
    """
    if host.lower() in ("localhost", "localhost.") or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _check_transport(url: str, insecure: bool) -> None:
    """
    Refuse a plain C{http://} URL to another host unless C{insecure}: the
    worker token would cross the network in clear, and whoever is on the
    path could hand the worker any command to run.
    """
    parsed = DecodedURL.from_text(url)
    if parsed.scheme == "http" and not insecure and not _is_loopback(parsed.host):
        raise usage.UsageError(
            f"--url {url}: http:// to a host that is not this one sends the worker "
            f"token in clear and lets anyone on the path give this worker commands; "
            f"use the dispatcher's https:// URL (see docs/workers.md), or pass "
            f"--insecure on a network you trust"
        )


_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)


def read_ca_file(path: str) -> tuple[bytes, ...]:
    """
    The PEM certificates in the file at C{path}, each checked to parse.

    @raise usage.UsageError: the file cannot be read or holds no
        certificate that parses.
    """
    from twisted.internet.ssl import Certificate

    try:
        with open(path, "rb") as f:
            content = f.read()
    except OSError as e:
        raise usage.UsageError(f"--ca-file {path}: cannot read it ({e.strerror})")
    blocks = _PEM_CERTIFICATE.findall(content)
    if not blocks:
        raise usage.UsageError(
            f"--ca-file {path}: expected one or more PEM certificates "
            f"(-----BEGIN CERTIFICATE-----), found none"
        )
    for block in blocks:
        try:
            Certificate.loadPEM(block)
        except Exception as e:
            raise usage.UsageError(f"--ca-file {path}: a certificate does not parse ({e})")
    return tuple(blocks)


def slurm_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """
    The C{SLURM_*} variables of C{environ}: what Slurm tells its job
    (C{SLURM_JOB_ID}, C{SLURM_ARRAY_TASK_ID}, C{SLURM_CPUS_PER_TASK}...).
    """
    return {key: value for key, value in environ.items() if key.startswith("SLURM_")}


class Options(usage.Options):
    """
    C{twistd dispatcher-worker} (and C{dispatcher worker}) options.

    What the host offers is detected when not given: CPUs from the process's
    affinity mask, memory from C{/proc/meminfo}, GPUs from C{nvidia-smi -L}.
    """

    synopsis = (
        "Usage: dispatcher worker (or twistd -n dispatcher-worker) --url URL [--url URL ...] --token-file FILE --slots N [--config FILE] [--name NAME] "
        "[--prefetch N] [--cpus N] [--memory MIB] [--gpus N] [--label KEY=VALUE ...] "
        "[--data-dir DIR] [--keep-days DAYS] [--grace SECONDS] [--ca-file FILE] [--insecure] "
        "[--one-job [--stop-reason TEXT]] [--slurm-environment] "
        "[--log-level LEVEL]"
    )

    def opt_version(self) -> None:
        """
        Print the dispatcher's version (and Twisted's and Python's) and exit.
        """
        from dispatcher.app._version import version_line

        print(version_line("dispatcher-worker"))
        raise SystemExit(0)

    optFlags = [
        ["insecure", None, "Allow an http:// --url to another host (the token and "
         "the jobs then travel in clear)."],
        ["one-job", None, "Take one job, and exit once its result is delivered; a stop "
         "(SIGTERM) fails the job, with --stop-reason, instead of giving it back "
         "(what a Slurm job of a direct-mode backend runs)."],
        ["slurm-environment", None, "Give each command job the SLURM_* variables of "
         "this worker's environment, under the job's own env (what a direct-mode "
         "Slurm job's worker does: that Slurm job is its one job's own)."],
    ]

    optParameters = [
        ["token-file", None, None, "A file holding the dispatcher's [workers] token (required)."],
        ["slots", None, None, "How many jobs to run at once (required)."],
        ["prefetch", None, None, "How many leases to hold beyond the slots while the "
         "jobs run for under a second, their jobs started as slots free, so that one "
         "job's end and the next one's start have no round trip between (default: "
         "as many as the slots; 0: none)."],
        ["config", "c", None, "An ini file in the daemon's format; a worker reads [tasks], "
         "[fetch] and [executor] threads, kill_grace, cgroups, max_processes and "
         "max_log_bytes from it."],
        ["name", None, None, "This worker's name, unique among the workers (default: host name and process id)."],
        ["cpus", None, None, "CPUs offered (default: those this process may run on)."],
        ["memory", None, None, "Memory offered, in MiB (default: MemTotal of /proc/meminfo)."],
        ["gpus", None, None, "GPUs offered (default: the count of nvidia-smi -L, 0 without it)."],
        ["data-dir", "d", DEFAULT_DATA_DIR, "Where job working directories and logs are kept."],
        ["keep-days", None, None, "Days a job's directory is kept after the dispatcher "
         "accepted its result (fractions allowed; 0: removed at once; none: kept for "
         "ever; default: [retention] finished_days of --config, 7 without it)."],
        ["grace", None, "30", "Seconds a stop (SIGTERM) waits for running jobs before stopping them."],
        ["ca-file", None, None, "PEM certificates to trust for an https:// --url instead of "
         "the system's CAs (a private CA, or the dispatcher's self-signed certificate)."],
        ["stop-reason", None, None, "With --one-job: the error of the job a stop ends."],
        ["log-level", None, None, "The least level logged: debug (a line for each job's "
         "lease, end and recorded result), info (its start and stop, connection losses, "
         "refusals), warn, error or critical (default: [log] level of --config, info "
         "without it)."],
    ]

    def __init__(self) -> None:
        usage.Options.__init__(self)
        self["labels"] = {}
        self["url"] = None
        self["urls"] = []

    def opt_url(self, value: str) -> None:
        """
        The dispatcher's base URL, such as https://dispatch.example:8443
        (required; http:// to another host needs --insecure).  Repeatable:
        dispatchers on one PostgreSQL database, tried in turn when the one
        in use does not answer.
        """
        url = _url(value)
        if url in self["urls"]:
            raise usage.UsageError(f"--url: {url} is given twice")
        self["urls"].append(url)
        self["url"] = self["urls"][0]

    def opt_label(self, value: str) -> None:
        """
        A label KEY=VALUE that jobs' requirements are matched against (repeatable).
        """
        key, sep, label = value.partition("=")
        if not sep or not key.strip():
            raise usage.UsageError(f"--label: expected KEY=VALUE, not {value!r}")
        key = key.strip()
        if key in self["labels"]:
            raise usage.UsageError(f"--label: {key} is given twice")
        self["labels"][key] = label.strip()

    def postOptions(self) -> None:
        for required in ("url", "token-file", "slots"):
            if not self[required]:
                raise usage.UsageError(f"--{required} is required")
        url = self["url"]
        for each in self["urls"]:
            _check_transport(each, bool(self["insecure"]))
        ca_certificates = read_ca_file(self["ca-file"]) if self["ca-file"] else None
        token = read_token_file(self["token-file"])
        slots = _number("slots", self["slots"], int, 1, "an integer of at least 1")
        prefetch = (
            _number("prefetch", self["prefetch"], int, 0, "an integer of at least 0")
            if self["prefetch"] is not None
            # A one-job worker takes its one job and no more.
            else (0 if self["one-job"] else slots)
        )
        if prefetch > MAX_SLOTS:
            raise usage.UsageError(
                f"--prefetch: expected an integer from 0 to {MAX_SLOTS}, not {prefetch}"
            )
        grace = _number("grace", self["grace"], float, 0, "a number of seconds of at least 0")
        try:
            config = load_config(self["config"]) if self["config"] else Config()
            job_accounts(config)
        except (ConfigError, AccountRefused) as e:
            raise usage.UsageError(str(e))
        level = self["log-level"] if self["log-level"] is not None else config.log.level
        if level not in LOG_LEVELS:
            raise usage.UsageError(
                f"--log-level: expected one of {', '.join(LOG_LEVELS)}, not {level!r}"
            )
        keep_days = (
            _keep_days(self["keep-days"])
            if self["keep-days"] is not None
            else config.retention.finished_days
        )
        name = self["name"] if self["name"] is not None else default_name()
        if not name.strip() or any(c.isspace() for c in name):
            raise usage.UsageError(f"--name: expected a name without white space, not {name!r}")
        cpus = (
            _number("cpus", self["cpus"], float, 0, "a number of CPUs above 0")
            if self["cpus"] is not None
            else float(detect_cpus())
        )
        if cpus <= 0:
            raise usage.UsageError(f"--cpus: expected a number of CPUs above 0, not {self['cpus']!r}")
        if self["memory"] is not None:
            memory = _number("memory", self["memory"], int, 1, "an integer number of MiB of at least 1")
        else:
            try:
                memory = detect_memory_mb()
            except ValueError as e:
                raise usage.UsageError(str(e))
        gpus = (
            _number("gpus", self["gpus"], int, 0, "an integer of at least 0")
            if self["gpus"] is not None
            else detect_gpus()
        )
        description = WorkerDescription(
            name=name,
            slots=slots,
            cpus=cpus,
            memory_mb=memory,
            gpus=gpus,
            labels=dict(self["labels"]),
            tasks=tuple(sorted(config.tasks)),
            prefetch=prefetch,
        )
        self.settings = WorkerSettings(
            url=url,
            other_urls=tuple(self["urls"][1:]),
            token=token,
            description=description,
            # Absolute: the spawner helper runs from /.
            data_dir=os.path.abspath(self["data-dir"]),
            config=config,
            grace=grace,
            ca_certificates=ca_certificates,
            keep_seconds=None if keep_days is None else keep_days * 86400.0,
            log_level=level,
            one_job=bool(self["one-job"]),
            stop_reason=self["stop-reason"],
            job_environment=slurm_environment(os.environ) if self["slurm-environment"] else {},
        )
        # Under twistd, its log observer is made once these options are
        # parsed: ours keeps the level (and [log] format) as the daemon's
        # does, unless the command line names its own.
        self.worker_log = DaemonLog(attrs.evolve(config.log, level=level))
        self.worker_log.install(getattr(self, "parent", None))


def makeService(options: Options, reactor: Optional[Any] = None) -> Any:
    """
    Build the worker's service from parsed options.
    """
    if reactor is None:
        from twisted.internet import reactor  # type: ignore[no-redef]

    from dispatcher.workers._service import WorkerService

    # Whatever the worker makes without a mode of its own is its alone.
    os.umask(UMASK)
    return WorkerService(reactor, options.settings)
