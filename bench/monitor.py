"""
A bench-only reactor-hold monitor and the line protocol the harness reads
it through.

The monitor keeps a chain of C{callLater(interval, ...)} going and records
how late each call fires.  A call can only be late because the reactor was
busy with something else, so the largest lateness is the longest stretch
the reactor thread was held: by one callback, or by everything one reactor
iteration did before it came back to its timers.

It also times the garbage collector's passes (C{gc.callbacks}), which stop
every thread, so that a long hold can be told apart from a long collection.
"""

from __future__ import annotations

import cProfile
import gc
import json
import time
from typing import Any, Callable, Optional

from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineOnlyReceiver

MAX_SAMPLES = 200_000


class ReactorHoldMonitor:
    """
    Measures how late a chain of delayed calls fires.

    @param clock: an C{IReactorTime}.
    @param interval: seconds between calls.
    @param now: a monotonic clock in seconds.
    """

    def __init__(
        self,
        clock: Any,
        interval: float = 0.005,
        now: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._clock = clock
        self._interval = interval
        self._now = now
        self._call: Any = None
        self._due = 0.0
        self._gc_started = 0.0
        self._new_window()
        # Extra figures read at each snapshot, by name.
        self.counters: dict[str, Callable[[], Any]] = {}

    def start(self) -> None:
        """
        Begin the chain of calls.
        """
        self._reset_at = self._now()
        gc.callbacks.append(self._gc_phase)
        self._schedule()

    def stop(self) -> None:
        """
        End the chain of calls.
        """
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        if self._gc_phase in gc.callbacks:
            gc.callbacks.remove(self._gc_phase)

    def _gc_phase(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = self._now()
            return
        generation = info["generation"]
        took = self._now() - self._gc_started
        self._gc_count[generation] += 1
        self._gc_total[generation] += took
        self._gc_max[generation] = max(self._gc_max[generation], took)

    def _schedule(self) -> None:
        self._due = self._now() + self._interval
        self._call = self._clock.callLater(self._interval, self._tick)

    def _tick(self) -> None:
        now = self._now()
        late = max(0.0, now - self._due)
        self._ticks += 1
        if len(self._samples) < MAX_SAMPLES:
            self._samples.append(late)
        if late > self._max:
            self._max = late
            self._max_at = now - self._reset_at
        self._schedule()

    def snapshot(self, reset: bool = False) -> dict[str, Any]:
        """
        What was seen since the last reset, in milliseconds; optionally
        start a new window.
        """
        samples = sorted(self._samples)

        def percentile(p: float) -> float:
            if not samples:
                return 0.0
            return samples[min(len(samples) - 1, int(p / 100.0 * len(samples)))]

        result = {
            "window_s": round(self._now() - self._reset_at, 3),
            "ticks": self._ticks,
            "max_ms": round(self._max * 1000, 3),
            "max_at_s": round(self._max_at, 3),
            "p50_ms": round(percentile(50) * 1000, 3),
            "p99_ms": round(percentile(99) * 1000, 3),
            "over_10ms": sum(1 for s in samples if s > 0.010),
            "over_50ms": sum(1 for s in samples if s > 0.050),
            "gc_collections": list(self._gc_count),
            "gc_max_ms": [round(m * 1000, 3) for m in self._gc_max],
            "gc_total_ms": [round(t * 1000, 1) for t in self._gc_total],
        }
        for name, read in self.counters.items():
            result[name] = read()
        if reset:
            self._new_window()
        return result

    def _new_window(self) -> None:
        """
        Forget what was seen so far: a new window begins now.
        """
        self._reset_at = self._now()
        self._samples: list[float] = []
        self._max = 0.0
        self._max_at = 0.0
        self._ticks = 0
        self._gc_max = [0.0, 0.0, 0.0]
        self._gc_total = [0.0, 0.0, 0.0]
        self._gc_count = [0, 0, 0]


class MonitorControl(LineOnlyReceiver):
    """
    One command a line, one JSON answer a line:

      - C{read}: the monitor's window so far;
      - C{reset}: the same, then a new window begins;
      - C{profile_start [cpu]}: cProfile the reactor thread from now on,
        in wall-clock time, or with C{cpu} in the thread's own CPU time
        (C{time.thread_time}: a system call for every function call and
        return, so the cheapest functions look dearer than they are);
      - C{profile_stop PATH}: stop it and write its stats to PATH.
    """

    delimiter = b"\n"

    def lineReceived(self, line: bytes) -> None:
        command, _, argument = line.decode("utf-8").strip().partition(" ")
        factory = self.factory
        try:
            if command == "read":
                answer: Any = factory.monitor.snapshot()
            elif command == "reset":
                answer = factory.monitor.snapshot(reset=True)
            elif command == "profile_start":
                factory.profile = (
                    cProfile.Profile(time.thread_time) if argument == "cpu"
                    else cProfile.Profile()
                )
                factory.profile.enable()
                answer = {"profiling": True}
            elif command == "profile_stop":
                profile: Optional[cProfile.Profile] = factory.profile
                if profile is None:
                    raise ValueError("not profiling")
                profile.disable()
                profile.dump_stats(argument)
                factory.profile = None
                answer = {"profiling": False, "path": argument}
            else:
                raise ValueError(f"unknown command {command!r}")
        except Exception as e:
            answer = {"error": f"{type(e).__name__}: {e}"}
        self.sendLine(json.dumps(answer).encode("utf-8"))


class MonitorControlFactory(Factory):
    """
    Serves L{MonitorControl} for one monitor.
    """

    protocol = MonitorControl

    def __init__(self, monitor: ReactorHoldMonitor) -> None:
        self.monitor = monitor
        self.profile: Optional[cProfile.Profile] = None


def install_monitor(reactor: Any, control_port: int) -> ReactorHoldMonitor:
    """
    Start a monitor once the reactor runs, and its control protocol on
    C{127.0.0.1:control_port}.
    """
    monitor = ReactorHoldMonitor(reactor)
    reactor.callWhenRunning(monitor.start)
    reactor.listenTCP(control_port, MonitorControlFactory(monitor), interface="127.0.0.1")
    return monitor
