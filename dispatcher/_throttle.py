"""
Log lines about a lasting trouble (a full disk, a failing sync) at most
once an interval, each saying how often the trouble came since the last.

A full disk fails every write until it is freed: one line (with a
traceback) a request was about 10 KB/s of log at 9 requests/s, written to
the very disk that is full.
"""

from __future__ import annotations

from typing import Any, Optional

# How often a lasting trouble is logged, at most.
THROTTLE_INTERVAL = 60.0


class Throttle:
    """
    Says when a recurring trouble is worth a log line: its first time at
    once, then at most once every C{interval} seconds, with how many times
    it came meanwhile; and, once it is over, how many times it came since
    the last line.

    @param clock: the C{IReactorTime} the interval is measured on.
    @param interval: seconds between two lines, at least.
    @ivar count: how many times the trouble came since the last line.
    @ivar since: when the trouble began (C{None}: it is not on now).
    """

    def __init__(self, clock: Any, interval: float = THROTTLE_INTERVAL) -> None:
        self._clock = clock
        self.interval = interval
        self.count = 0
        self.since: Optional[float] = None
        self._logged_at: Optional[float] = None
        # Whether a line said the trouble is on and none since said it is
        # over: only then is its end worth a line of its own.
        self._announced = False

    @property
    def on(self) -> bool:
        """
        Whether the trouble came and has not been cleared since.
        """
        return self.since is not None

    def happened(self, times: int = 1) -> Optional[int]:
        """
        The trouble came C{times} times now: the number to log (this time's
        and the unlogged ones before it) if a line is due, else C{None}.
        """
        now = self._clock.seconds()
        if self.since is None:
            self.since = now
        self.count += times
        if self._logged_at is not None and now - self._logged_at < self.interval:
            return None
        self._logged_at = now
        self._announced = True
        count, self.count = self.count, 0
        return count

    def cleared(self) -> Optional[int]:
        """
        The trouble is over: how many times it came since the last line, if
        a line said it was on; else C{None}.  A trouble that comes and goes
        (a nearly full disk) gets at most one line each way an interval:
        the times it came unlogged are told with its next line.
        """
        if self.since is None:
            return None
        self.since = None
        if not self._announced:
            return None
        self._announced = False
        count, self.count = self.count, 0
        return count
