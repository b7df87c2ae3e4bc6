"""
What this host offers: its CPUs, memory and GPUs, as the local executor and
a remote worker report them when they are not told.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Optional

from ._model import Resources


def detect_cpus() -> int:
    """
    The CPUs this process may run on (its affinity, not the machine's).
    """
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def detect_memory_mb(meminfo: str = "/proc/meminfo") -> int:
    """
    The host's memory in MiB, from C{/proc/meminfo}; 0 where it cannot be
    read.
    """
    try:
        with open(meminfo, encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def detect_gpus(nvidia_smi: Optional[str] = None) -> int:
    """
    The NVIDIA GPUs C{nvidia-smi -L} lists; 0 where it is not installed or
    fails.
    """
    program = nvidia_smi or shutil.which("nvidia-smi")
    if program is None:
        return 0
    try:
        listed = subprocess.run(
            [program, "-L"], capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in listed.stdout.splitlines() if line.startswith("GPU "))


def detect_resources() -> Resources:
    """
    This host's CPUs, memory and GPUs.
    """
    return Resources(float(detect_cpus()), detect_memory_mb(), detect_gpus())
