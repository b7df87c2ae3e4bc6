"""
What this host offers: its CPUs, memory and GPUs, as the local executor and
a remote worker report them when they are not told.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any, Callable, Iterable, Optional

from twisted.logger import Logger

from ._model import Resources

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
