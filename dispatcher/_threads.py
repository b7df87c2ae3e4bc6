"""
A bounded pool of threads for task functions, leaner than Twisted's.

A no-op task job spent more of the reactor's time handing its function to
C{twisted.python.threadpool.ThreadPool} and getting the result back than on
anything else the dispatcher does for it: a call goes through a team, a
coordinator, a worker and a context tracker each way, and each result wakes
the reactor with a write of its own.  Here a call is one put on a
C{queue.SimpleQueue}, and results come back in batches: the first result
that finds the reactor with none waiting wakes it, and every result that
arrives before the reactor gets to them rides along.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

_STOP = object()


class TaskThreads:
    """
    C{size} daemon threads (a task that never returns must not hold the
    process's exit up) that call functions for the reactor.

    @param reactor: where results are delivered (C{callFromThread}).
    @param size: the most calls that run at once; more wait their turn.
    @param name: the threads' name prefix.
    """

    def __init__(self, reactor: Any, size: int, name: str) -> None:
        if size < 1:
            raise ValueError("a pool needs at least one thread")
        self._reactor = reactor
        self.size = size
        self.name = name
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._done: list[tuple[Deferred, bool, Any]] = []
        self._delivering = False
        self.started = False

    def start(self) -> None:
        if self.started:
            return
        self.started = True
        for i in range(self.size):
            thread = threading.Thread(
                target=self._work, name=f"{self.name}-{i}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def defer(self, function: Callable[..., Any], *args: Any) -> Deferred:
        """
        Call C{function(*args)} on one of the threads: a Deferred of what it
        returns, or of its exception, fired on the reactor thread.
        """
        if not self.started:
            raise RuntimeError(f"the {self.name} pool is not running")
        d: Deferred = Deferred()
        self._calls.put((d, function, args))
        return d

    def _work(self) -> None:
        calls = self._calls
        while True:
            item = calls.get()
            if item is _STOP:
                return
            d, function, args = item
            try:
                outcome = (d, True, function(*args))
            except BaseException:
                outcome = (d, False, Failure())
            # An idle thread keeps nothing of its last call alive.
            del item, function, args
            with self._lock:
                self._done.append(outcome)
                del outcome
                if self._delivering:
                    continue
                self._delivering = True
            self._reactor.callFromThread(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            done, self._done = self._done, []
            self._delivering = False
        for d, ok, value in done:
            try:
                if ok:
                    d.callback(value)
                else:
                    d.errback(value)
            except Exception:
                # A Deferred fired already (by its owner, say): the other
                # results of the batch still go out.
                log.failure("delivering a {name} result failed", name=self.name)

    def _quit(self) -> list[threading.Thread]:
        """
        Stop taking calls; a call that has not started by now never will
        (its Deferred fails with C{CancelledError}); idle threads quit.
        """
        threads, self._threads = self._threads, []
        self.started = False
        dropped = []
        while True:
            try:
                item = self._calls.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                dropped.append(item[0])
        for _ in threads:
            self._calls.put(_STOP)
        for d in dropped:
            d.errback(CancelledError(f"the {self.name} pool stopped before the call began"))
        return threads

    def stop(self) -> None:
        """
        Stop, once the calls running now have returned.
        """
        for thread in self._quit():
            thread.join()

    def stop_without_waiting(self) -> None:
        """
        Stop without joining the threads: idle ones quit now, busy ones
        when their function returns, or with the process.
        """
        self._quit()
