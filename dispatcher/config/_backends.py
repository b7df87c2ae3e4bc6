"""
C{[backend:NAME]} sections: where the jobs of the queues that name a
backend (C{[queue:NAME] backend = NAME}) run instead of on this host and
the plain remote workers.

One type exists: C{slurm}, in C{mode = pilot} (the dispatcher keeps
C{dispatcher worker} pilots running as Slurm jobs and gives them the
queue's jobs) or C{mode = direct} (each job gets a Slurm job of its own,
sized to its resources, which runs a worker for that job alone).  A key
that means something in one mode alone is refused in the other.
"""

from __future__ import annotations

import re
import shlex
from typing import Any, Callable, Mapping, Optional

import attrs

BACKEND_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_\-]{0,62}$")
# A partition, account or QOS name as Slurm takes it on a command line.
_SLURM_NAME = re.compile(r"^[A-Za-z0-9_.,:+\-]{1,200}$")

BACKEND_TYPES = ("slurm",)
BACKEND_MODES = ("pilot", "direct")
# How a direct-mode job's GPUs are asked of Slurm.
GPU_OPTIONS = ("gres", "gpus")

# The keys of one mode alone.
PILOT_KEYS = ("drain_before", "max_pilots", "slots", "cpus", "memory", "idle_timeout")
DIRECT_KEYS = ("max_jobs", "gpu_option")

# Slurm's --signal=B:TERM@N takes N up to 65535 s.
MAX_DRAIN = 65535.0


@attrs.frozen
class SlurmBackend:
    """
    C{[backend:NAME] type = slurm}: how its pilots are submitted and what
    each offers.

    @ivar name: the backend's name (the section's).
    @ivar mode: C{pilot} or C{direct}.
    @ivar url: the dispatcher's URL as the pilots reach it from their nodes.
    @ivar partition: C{sbatch --partition}; C{None}: the cluster's default.
    @ivar account: C{sbatch --account}.
    @ivar qos: C{sbatch --qos}.
    @ivar time_limit: a pilot's Slurm time limit, in seconds; in direct
        mode, that of a job without a C{timeout} (one with a timeout gets
        its timeout and a minute).
    @ivar drain_before: seconds before the time limit that a pilot is told
        to stop taking jobs (C{--signal=B:TERM@N}); it lets its running jobs
        finish for up to this less ten seconds, then stops them and gives
        them back.
    @ivar sbatch_options: more arguments for C{sbatch}, as written.
    @ivar max_pilots: the most pilots submitted or running at once.
    @ivar slots: jobs one pilot runs at once.
    @ivar cpus: CPUs a pilot asks Slurm for (C{--cpus-per-task}) and offers.
    @ivar memory_mb: memory a pilot asks for (C{--mem}), in MiB; C{None}:
        none asked, what the node has offered.
    @ivar idle_timeout: seconds a pilot with no job is kept while no job of
        the backend's queues waits.
    @ivar poll_interval: seconds between two looks at Slurm's queue (one
        C{squeue} for every pilot).
    @ivar worker_command: the command that starts a worker on a node.
    @ivar ca_file: C{--ca-file} for the pilots (on their nodes).
    @ivar pilot_dir: the pilots' C{--data-dir} on their nodes; C{None}:
        C{$TMPDIR} (or C{/tmp}) C{/dispatcher-pilot-JOBID}.
    @ivar slurm_bin: the directory of C{sbatch}, C{squeue} and C{scancel};
        C{None}: found on C{PATH}.
    @ivar max_jobs: in direct mode, the most Slurm jobs submitted and not
        yet seen ended at once (the rest wait in the dispatcher's queue).
    @ivar gpu_option: in direct mode, how a job's GPUs are asked for:
        C{gres} (C{--gres=gpu:N}) or C{gpus} (C{--gpus=N}).
    """

    name: str
    url: str
    mode: str = "pilot"
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    time_limit: float = 3600.0
    drain_before: float = 30.0
    sbatch_options: tuple[str, ...] = ()
    max_pilots: int = 4
    slots: int = 1
    cpus: Optional[float] = None
    memory_mb: Optional[int] = None
    idle_timeout: float = 120.0
    poll_interval: float = 30.0
    worker_command: tuple[str, ...] = ("dispatcher", "worker")
    ca_file: Optional[str] = None
    pilot_dir: Optional[str] = None
    slurm_bin: Optional[str] = None
    max_jobs: int = 1000
    gpu_option: str = "gres"

    @property
    def pilot_cpus(self) -> float:
        """
        The CPUs a pilot asks for: C{cpus}, or one a slot.
        """
        return self.cpus if self.cpus is not None else float(self.slots)


def _slurm_name(text: str) -> Optional[str]:
    text = text.strip()
    if not text:
        return None
    if not _SLURM_NAME.match(text):
        raise ValueError("expected a Slurm name: letters, digits and _ . , : + -")
    return text


def _positive_int(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise ValueError(f"expected an integer of at least {minimum}")
        return value

    return parse


def _seconds(minimum: float, maximum: float = float("inf")) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not (minimum <= value <= maximum) or value == float("inf"):
            bound = f"of at least {minimum:g}" + (
                f" and at most {maximum:g}" if maximum != float("inf") else ""
            )
            raise ValueError(f"expected a number of seconds {bound}")
        return value

    return parse


def _cpus(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (0 < value < float("inf")) or value != int(value):
        raise ValueError("expected a whole number of CPUs above 0")
    return value


def _words(text: str) -> tuple[str, ...]:
    try:
        words = tuple(shlex.split(text))
    except ValueError as e:
        raise ValueError(f"expected shell words ({e})")
    for word in words:
        if "\n" in word or "\0" in word:
            raise ValueError("a word may hold no newline")
    return words


def _sbatch_options(text: str) -> tuple[str, ...]:
    words = _words(text)
    if words and not words[0].startswith("-"):
        raise ValueError("expected sbatch options, starting with '-'")
    return words


def _command(text: str) -> tuple[str, ...]:
    words = _words(text)
    if not words:
        raise ValueError("expected a command")
    return words


def _url(text: str) -> str:
    text = text.strip()
    if not re.match(r"^https?://[^\s/]+(/\S*)?$", text):
        raise ValueError("expected the dispatcher's http:// or https:// URL as the nodes reach it")
    return text.rstrip("/")


def _path(text: str) -> Optional[str]:
    text = text.strip()
    if not text:
        return None
    if "\n" in text or "\0" in text:
        raise ValueError("expected a path")
    return text


def _memory(text: str) -> Optional[int]:
    if text.strip().lower() in ("", "none"):
        return None
    return _positive_int(1)(text)


def _choice(allowed: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text.strip() not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}")
        return text.strip()

    return parse


_SLURM_KEYS: Mapping[str, Callable[[str], Any]] = {
    "type": _choice(BACKEND_TYPES),
    "mode": _choice(BACKEND_MODES),
    "url": _url,
    "partition": _slurm_name,
    "account": _slurm_name,
    "qos": _slurm_name,
    "time_limit": _seconds(60),
    "drain_before": _seconds(0, MAX_DRAIN),
    "sbatch_options": _sbatch_options,
    "max_pilots": _positive_int(0),
    "slots": _positive_int(1),
    "cpus": _cpus,
    "memory": _memory,
    "idle_timeout": _seconds(0),
    "poll_interval": _seconds(1),
    "worker_command": _command,
    "ca_file": _path,
    "pilot_dir": _path,
    "slurm_bin": _path,
    "max_jobs": _positive_int(1),
    "gpu_option": _choice(GPU_OPTIONS),
}

_FIELDS = {"memory": "memory_mb"}


def parse_backend(
    name: str,
    items: list[tuple[str, str]],
    fail: Callable[[str, str, str], Exception],
    missing: Callable[[str, str], Exception],
) -> SlurmBackend:
    """
    The backend of the section C{[backend:NAME]} whose keys are C{items}.

    @param fail: C{(key, value, what is allowed)} to the error to raise.
    @param missing: C{(key, what it is)} to the error of a key that must be
        given.
    """
    fields: dict[str, Any] = {}
    raw: dict[str, str] = {}
    for key, text in items:
        if key not in _SLURM_KEYS:
            raise fail(key, text, f"unknown key; known: {', '.join(_SLURM_KEYS)}")
        try:
            fields[key] = _SLURM_KEYS[key](text)
        except ValueError as e:
            raise fail(key, text, str(e))
        raw[key] = text
    if "type" not in fields:
        raise missing("type", "the backend's type: slurm")
    del fields["type"]
    mode = fields.get("mode", "pilot")
    for key in PILOT_KEYS if mode == "direct" else DIRECT_KEYS:
        if key in raw:
            raise fail(
                key, raw[key],
                "only for mode = pilot (in direct mode each Slurm job is sized to "
                "its job's resources)" if mode == "direct" else "only for mode = direct",
            )
    if "url" not in fields:
        raise missing("url", "the dispatcher's URL as the pilots reach it from their nodes")
    backend = SlurmBackend(name, **{_FIELDS.get(k, k): v for k, v in fields.items()})
    if backend.drain_before >= backend.time_limit:
        raise fail(
            "drain_before", raw.get("drain_before", f"{backend.drain_before:g}"),
            f"expected fewer seconds than time_limit ({backend.time_limit:g})",
        )
    return backend
