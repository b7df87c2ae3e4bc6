"""
Giving the memory of request bodies back to the system once they are gone.

A body is read in pieces of up to 64 KiB, below glibc malloc's mmap
threshold, so its pieces come from the heap; freed, they stay in the
process for its next allocations, and the heap's top is rarely free, so
nothing is returned.  1,500 connections holding almost all of a 1 MiB body
left the daemon 1.5 GB larger after they closed (bench/body_flood.py).
C{malloc_trim(0)} gives the free pages of every arena back (with
C{madvise}); it costs about 60 ms of the calling thread per GB returned
(measured here: 88 ms for 1.4 GB), a millisecond for the 16 MiB that
trigger it.
"""

from __future__ import annotations

import ctypes
from typing import Any, Callable, Optional

# Bytes of large bodies freed since the last trim that make a trim worth
# its cost; and how long after the first of them it comes, so that a burst
# of bodies (and the requests that hold them until answered) is one trim.
TRIM_AFTER_BYTES = 16 * 1024 * 1024
TRIM_DELAY = 1.0


def _malloc_trim() -> Optional[Callable[[int], int]]:
    """
    glibc's C{malloc_trim}, or C{None} where the C library has none (musl,
    macOS): there freed memory goes back as that allocator does it.
    """
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


class HeapTrimmer:
    """
    Counts the bytes of large request bodies let go of, and trims the heap
    L{TRIM_DELAY} seconds after they reach L{TRIM_AFTER_BYTES}.

    @param clock: the C{IReactorTime} the delay is kept on.
    @param trim: C{malloc_trim}, or C{None} for nothing to call.
    @ivar trims: how many times it trimmed.
    """

    trims = 0

    def __init__(self, clock: Any, trim: Optional[Callable[[int], int]] = _malloc_trim()) -> None:
        self._clock = clock
        self._trim = trim
        self._freed = 0
        self._call: Any = None

    def released(self, size: int) -> None:
        """
        A body of C{size} bytes is done with, or soon will be.
        """
        if self._trim is None:
            return
        self._freed += size
        if self._freed >= TRIM_AFTER_BYTES and self._call is None:
            self._call = self._clock.callLater(TRIM_DELAY, self._run)

    def _run(self) -> None:
        self._call = None
        self._freed = 0
        self.trims += 1
        self._trim(0)  # type: ignore[misc]

    def stop(self) -> None:
        """
        Drop a trim that is due: the server stops.
        """
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
