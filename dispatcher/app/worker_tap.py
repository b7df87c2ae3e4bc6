"""
The C{dispatcher-worker} twistd plugin's options and service maker: the
only worker code that touches the global reactor.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

from hyperlink import DecodedURL
from twisted.python import usage

from dispatcher.config._ini import Config, ConfigError, load_config, read_token
from dispatcher.execution._host import detect_cpus, detect_gpus, detect_memory_mb
from dispatcher.workers._agent import WorkerDescription
from dispatcher.workers._service import WorkerSettings, default_name

DEFAULT_DATA_DIR = "dispatcher-worker-data"


def read_token_file(path: str) -> str:
    """
    The bearer token in the file at C{path}, read as the dispatcher reads
    its own copy.

    @raise usage.UsageError: the file cannot be read or holds no token.
    """
    try:
        return read_token(path)
    except ValueError as e:
        raise usage.UsageError(f"--token-file {path}: {e}")


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


def _url(text: str) -> str:
    try:
        url = DecodedURL.from_text(text)
    except Exception:
        url = None
    if url is None or url.scheme not in ("http", "https") or not url.host:
        raise usage.UsageError(
            f"--url: expected the dispatcher's http:// or https:// URL, such as "
            f"http://dispatch.example:8080, not {text!r}"
        )
    if url.query or url.fragment:
        raise usage.UsageError(f"--url: expected a URL without a query or fragment, not {text!r}")
    return text


class Options(usage.Options):
    """
    C{twistd dispatcher-worker} (and C{dispatcher worker}) options.

    What the host offers is detected when not given: CPUs from the process's
    affinity mask, memory from C{/proc/meminfo}, GPUs from C{nvidia-smi -L}.
    """

    synopsis = (
        "Usage: dispatcher worker (or twistd -n dispatcher-worker) --url URL --token-file FILE --slots N [--config FILE] [--name NAME] "
        "[--cpus N] [--memory MIB] [--gpus N] [--label KEY=VALUE ...] "
        "[--data-dir DIR] [--grace SECONDS]"
    )

    optParameters = [
        ["url", None, None, "The dispatcher's base URL, such as http://dispatch.example:8080 (required)."],
        ["token-file", None, None, "A file holding the dispatcher's [workers] token (required)."],
        ["slots", None, None, "How many jobs to run at once (required)."],
        ["config", "c", None, "An ini file in the daemon's format; a worker reads [tasks], "
         "[fetch] and [executor] threads and kill_grace from it."],
        ["name", None, None, "This worker's name, unique among the workers (default: host name and process id)."],
        ["cpus", None, None, "CPUs offered (default: those this process may run on)."],
        ["memory", None, None, "Memory offered, in MiB (default: MemTotal of /proc/meminfo)."],
        ["gpus", None, None, "GPUs offered (default: the count of nvidia-smi -L, 0 without it)."],
        ["data-dir", "d", DEFAULT_DATA_DIR, "Where job working directories and logs are kept."],
        ["grace", None, "30", "Seconds a stop (SIGTERM) waits for running jobs before stopping them."],
    ]

    def __init__(self) -> None:
        usage.Options.__init__(self)
        self["labels"] = {}

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
        url = _url(self["url"])
        token = read_token_file(self["token-file"])
        slots = _number("slots", self["slots"], int, 1, "an integer of at least 1")
        grace = _number("grace", self["grace"], float, 0, "a number of seconds of at least 0")
        try:
            config = load_config(self["config"]) if self["config"] else Config()
        except ConfigError as e:
            raise usage.UsageError(str(e))
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
        )
        self.settings = WorkerSettings(
            url=url,
            token=token,
            description=description,
            # Absolute: the spawner helper runs from /.
            data_dir=os.path.abspath(self["data-dir"]),
            config=config,
            grace=grace,
        )


def makeService(options: Options, reactor: Optional[Any] = None) -> Any:
    """
    Build the worker's service from parsed options.
    """
    if reactor is None:
        from twisted.internet import reactor  # type: ignore[no-redef]

    from dispatcher.workers._service import WorkerService

    return WorkerService(reactor, options.settings)
