"""
The daemon under a supervisor: SIGHUP reloads the configuration (what can
change safely, L{dispatcher.app._reload}), and once a stop has begun, a
second SIGINT or SIGTERM cuts the running jobs' grace period short (they
go back to the queue, their attempts not counted) and a third ends the
process at once, as SIGKILL would (the next start records the attempts
that were running as lost).

The reactor handles the first SIGINT or SIGTERM (it begins the stop); a
second reached its handler again, which raised C{ReactorNotRunning} with a
traceback and did nothing else.  SIGHUP's default action ended the
process without a word.
"""

from __future__ import annotations

import os
import signal
from typing import Any, Callable

from twisted.logger import Logger

log = Logger()

# The exit status of a process a third signal ends.
EXIT_AT_ONCE = 1


class Signals:
    """
    Installs the daemon's handlers of SIGHUP, and (once the reactor begins
    to shut down) of SIGINT and SIGTERM.

    @param reactor: the reactor: signals are handled in its thread
        (C{callFromThread}), and its shutdown arms the second signal.
    @param reload: called in the reactor's thread on SIGHUP.
    @param hurry: called in the reactor's thread on a second SIGINT or
        SIGTERM.
    @param install: C{signal.signal}, or a stand-in.
    @param exit: C{os._exit}, or a stand-in.
    """

    def __init__(
        self,
        reactor: Any,
        reload: Callable[[], Any],
        hurry: Callable[[], Any],
        install: Callable[[int, Any], Any] = signal.signal,
        exit: Callable[[int], Any] = os._exit,
    ) -> None:
        self._reactor = reactor
        self._reload = reload
        self._hurry = hurry
        self._install = install
        self._exit = exit
        self.stops = 0

    def install(self) -> None:
        """
        Handle SIGHUP from now on, and SIGINT and SIGTERM once the reactor
        begins to shut down.
        """
        self._install(signal.SIGHUP, self._hangup)
        self._reactor.addSystemEventTrigger("before", "shutdown", self._stopping)

    def _hangup(self, number: int, frame: Any) -> None:
        self._reactor.callFromThread(self._reload)

    def _stopping(self) -> None:
        self.stops = 1
        for number in (signal.SIGINT, signal.SIGTERM):
            self._install(number, self._again)

    def _again(self, number: int, frame: Any) -> None:
        self.stops += 1
        name = signal.Signals(number).name
        if self.stops == 2:
            self._reactor.callFromThread(self._cut_grace, name)
            return
        # In the handler, not the reactor's thread: a reactor that is stuck
        # must not keep the process.
        log.critical(
            "{signal} again: exiting now, without waiting for the stop to end "
            "(the jobs that were running are recorded lost at the next start)",
            signal=name,
        )
        self._exit(EXIT_AT_ONCE)

    def _cut_grace(self, name: str) -> None:
        log.warn(
            "{signal} again: not waiting for running jobs; they are stopped now and "
            "go back to the queue, their attempts not counted (once more: exit at "
            "once)",
            signal=name,
        )
        self._hurry()
