"""
Freezing a daemon's long-lived objects out of the garbage collector's
sight (C{gc.freeze}), which only a process that is the dispatcher alone
may do: C{twistd dispatcher} with C{[dispatcher] gc_freeze = yes}.
"""

from __future__ import annotations

import gc
from typing import Any

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

log = Logger()


class HeapFreezer(Service):
    """
    Keeps full garbage collections short in a long-running daemon.

    A full collection walks every tracked object and holds the reactor
    meanwhile: tens of milliseconds with what start-up built (a store of a
    million queued jobs), about 6 microseconds for each open connection, so
    that 10,000 idle keep-alive clients held the reactor for 60 ms or more
    several times a second.  Started (once the daemon serves), it collects
    and freezes everything alive; then, whenever the number of open
    connections (the reactor's readers) has grown by C{threshold} since the
    last freeze, it collects the young garbage and freezes again.  Checks
    are frequent and cheap, so that a full collection never finds more than
    about C{threshold} unfrozen connections, even while thousands arrive.

    Nothing is lost by freezing a connection: a closed connection's objects
    hold no reference cycle, so they are freed when it closes, frozen or
    not.  Garbage in reference cycles that waits in the oldest generation
    at a freeze is kept until the service stops; that is bounded by what
    one full collection would have found, once per growth of C{threshold}
    connections.

    C{gc.freeze} acts on the whole process, whoever allocated the objects:
    an embedding process must not get this unless it asks.  Stopping hands
    the heap back to the collector (C{gc.unfreeze}).

    @param reactor: an C{IReactorFDSet} and C{IReactorTime}.
    @param interval: seconds between checks.
    @param threshold: new connections that make a freeze worth it.
    @ivar freezes: how many times it froze, the start included.
    """

    def __init__(self, reactor: Any, interval: float = 0.25, threshold: int = 1000) -> None:
        self._reactor = reactor
        self._threshold = threshold
        self._loop = LoopingCall(self.check)
        self._loop.clock = reactor
        self._interval = interval
        self._frozen_at = 0
        self.freezes = 0

    def _open(self) -> int:
        return len(self._reactor.getReaders())

    def startService(self) -> None:
        Service.startService(self)
        self._freeze(full=True)
        self._loop.start(self._interval, now=False)

    def stopService(self) -> None:
        Service.stopService(self)
        if self._loop.running:
            self._loop.stop()
        gc.unfreeze()

    def _freeze(self, full: bool) -> None:
        if full:
            gc.collect()
        else:
            gc.collect(1)
        gc.freeze()
        self._frozen_at = self._open()
        self.freezes += 1

    def check(self) -> None:
        """
        Freeze if the connections have grown enough.
        """
        now = self._open()
        if now < self._frozen_at:
            # Frozen connections that closed were freed; count growth from
            # here.
            self._frozen_at = now
        elif now - self._frozen_at >= self._threshold:
            self._freeze(full=False)
            log.debug(
                "{connections} connections open: frozen out of the collector's sight",
                connections=now,
            )
