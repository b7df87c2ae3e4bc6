"""
The exit status of a C{twistd} or C{twist} process whose service failed to
start.

Twisted has no public way for a service to choose the status its process
exits with (twisted/twisted#11335, #4762 are open): after the reactor
stops, C{twistd} removes its pid file, stops its log observer and returns
from C{main}, and C{twist} returns from C{Twist.main}; both then exit 0.
A C{SystemExit} raised in a system event trigger is caught by the reactor,
and one raised in an C{atexit} handler is ignored by Python.  So the
status is set here, and an C{atexit} handler registered when the service
is made (before the reactor runs, so that it runs after the handlers
registered later, C{atexit} being last in, first out) flushes the standard
streams and ends the process with C{os._exit} once twistd or twist has
finished its own clean-up.  Handlers registered before it (the standard
library's C{logging.shutdown}, which it calls itself) are the only ones it
skips.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
from typing import Callable


class ExitStatus:
    """
    The status the process exits with once C{twistd} or C{twist} returns:
    0 (Python's own exit, untouched) until L{fail} sets another.

    @param register: registers the exit handler (C{atexit.register}).
    @param exit: ends the process with a status (C{os._exit}).
    """

    def __init__(
        self,
        register: Callable[[Callable[[], None]], object] = atexit.register,
        exit: Callable[[int], object] = os._exit,
    ) -> None:
        self.status = 0
        self._exit = exit
        register(self._at_exit)

    def fail(self, status: int = 1) -> None:
        """
        Make the process exit with C{status} (not 0) when it ends.
        """
        self.status = status

    def _at_exit(self) -> None:
        if not self.status:
            return
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                # A closed or broken stream has nothing left to lose.
                pass
        self._exit(self.status)
