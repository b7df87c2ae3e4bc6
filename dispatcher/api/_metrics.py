"""
The daemon's metrics, served at C{GET /metrics} in the Prometheus text
format, written by C{prometheus_client} (L{DispatcherMetrics}).

Two kinds.  What is read at each scrape, by a collector of our own
(L{_ScrapeCollector}): jobs by queue and state from the counts the store's
writer keeps at each change (L{dispatcher.store.IJobStore.job_counts}: a
few dictionary reads, no database), the open HTTP connections, the event
stream's subscribers, the remote workers connected, and the running totals
other parts keep as plain integers (leases expired, inputs staged and
failed, their bytes), so that those parts pay an integer's addition and
import nothing of this.  And what is observed as it happens, in
L{Counter}s and L{Histogram}s of our own that write what
C{prometheus_client}'s would: jobs submitted and ended
(from the events of every commit, L{observe_events}), how long
a job waited from its submission to its first attempt (from each claim,
L{observe_claimed}), how long it ran, each store commit's time and how
many writes it held (L{observe_commit}), and the longest the reactor
thread was held (L{ReactorWatch}).

Every label's values are bounded: queues (a submission names a configured
queue), states and outcomes; never a job, an owner or a worker.  The
registry is the daemon's own, not C{prometheus_client}'s global one, so
that two daemons in one process (the tests) keep theirs apart.
"""

from __future__ import annotations

import bisect
import math
import time
from typing import Any, Callable, Iterable, Optional, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client import exposition
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.utils import floatToGoString
from prometheus_client.registry import Collector
from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall

from dispatcher.model._events import JobEvent, SameChange
from dispatcher.model._jobs import FINAL_STATES, JobState

# What a scrape is answered with: the classic text format, which every
# Prometheus server reads, as the library writes it.
CONTENT_TYPE = getattr(exposition, "CONTENT_TYPE_PLAIN_0_0_4", exposition.CONTENT_TYPE_LATEST)

# The histograms' buckets (upper bounds, in seconds or writes).
WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0)
RUN_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0,
               900.0, 3600.0, 14400.0, 86400.0)
COMMIT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                  0.25, 0.5, 1.0, 5.0)
GROUP_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000)

# The reactor watch: how often its timer is due, and the length of the
# windows whose longest hold it keeps (the gauge shows the longest of the
# window under way and the one before: the last 10 to 20 seconds).
WATCH_INTERVAL = 0.1
WATCH_WINDOW = 10.0

_STATES = tuple(JobState)
_ENDS = frozenset(FINAL_STATES)
_RUNNING = JobState.RUNNING


class _Labelled(Collector):
    """
    What L{Counter} and L{Histogram} share: a name, help and label names,
    a child of plain numbers for each label set (made by L{_child} the
    first time its values are named), and, without labels, the one child
    counted through the metric itself.
    """

    _kind = ""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        registry: Optional[CollectorRegistry] = None,
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], Any] = {}
        self._root = None if self._labelnames else self.labels()
        if registry is not None:
            registry.register(self)

    def _child(self) -> Any:
        raise NotImplementedError

    def labels(self, *values: Any) -> Any:
        """
        The child of these label values, made the first time.
        """
        key = tuple(str(v) for v in values)
        child = self._children.get(key)
        if child is None:
            if len(key) != len(self._labelnames):
                raise ValueError(f"{self._name} takes the labels {self._labelnames}")
            child = self._children[key] = self._child()
        return child

    def _unlabelled(self) -> Any:
        assert self._root is not None, f"a {self._kind} with labels is used through labels()"
        return self._root

    def collect(self) -> Iterable[Metric]:
        metric = Metric(self._name, self._documentation, self._kind)
        for key, child in list(self._children.items()):
            self._samples(metric, dict(zip(self._labelnames, key)), child)
        return [metric]

    def _samples(self, metric: Metric, labels: dict[str, str], child: Any) -> None:
        raise NotImplementedError


class Counter(_Labelled):
    """
    A counter that writes the samples C{prometheus_client}'s C{Counter} of
    the same name, help and labels writes, in its order (each label set's
    C{_total}, then its C{_created}), but keeps each label set's count in a
    plain number, without a lock: C{prometheus_client}'s C{inc} checks
    that the metric may be observed, takes a lock and looks for an
    exemplar, and a no-op job is counted twice (submitted, ended).
    Counted on the reactor thread only.

    @param name: the metric's name, without C{_total} (its samples add
        C{_total} and C{_created}).
    @param registry: the registry that collects it.
    """

    _kind = "counter"

    def _child(self) -> "_Counted":
        return _Counted()

    def inc(self, amount: float = 1) -> None:
        """
        Add C{amount} (to a counter without labels).
        """
        self._unlabelled().inc(amount)

    def _samples(self, metric: Metric, labels: dict[str, str], child: Any) -> None:
        metric.add_sample(self._name + "_total", labels, child.value)
        metric.add_sample(self._name + "_created", labels, child.created)


class _Counted:
    """
    One label set's count of a L{Counter}.
    """

    __slots__ = ("value", "created")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1) -> None:
        """
        Add C{amount}, which may not be negative (a counter only grows).
        """
        if amount < 0:
            raise ValueError("a counter is only added to, by amounts of 0 or more")
        self.value += amount


class Histogram(_Labelled):
    """
    A histogram that writes the samples C{prometheus_client}'s C{Histogram}
    of the same name, help, labels and buckets writes, in its order (each
    label set's buckets, C{_count}, C{_sum}, C{_created}), but keeps its
    counts in plain numbers, without a lock: C{prometheus_client}'s
    C{observe} takes a lock for the sum and for the bucket, and a no-op
    job is observed twice, each of its commits twice more, about 3 us
    each (0.65 here, timeit of one labelled observe, the same run).  Observed
    on the reactor thread only.

    @param name: the metric's name (its samples add C{_bucket}, ...).
    @param buckets: the upper bounds, ascending (C{+Inf} is added).
    @param registry: the registry that collects it.
    """

    _kind = "histogram"

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        buckets: Sequence[float] = (),
        registry: Optional[CollectorRegistry] = None,
    ) -> None:
        self._bounds = tuple(float(b) for b in buckets) + (math.inf,)
        self._le = tuple(floatToGoString(b) for b in self._bounds)
        super().__init__(name, documentation, labelnames, registry)

    def _child(self) -> "_Observed":
        return _Observed(self._bounds)

    def observe(self, amount: float) -> None:
        """
        Observe C{amount} (of a histogram without labels).
        """
        self._unlabelled().observe(amount)

    def _samples(self, metric: Metric, labels: dict[str, str], child: Any) -> None:
        name = self._name
        counted = 0.0
        for le, count in zip(self._le, list(child.counts)):
            counted += count
            metric.add_sample(name + "_bucket", {**labels, "le": le}, counted)
        metric.add_sample(name + "_count", labels, counted)
        if self._bounds[0] >= 0:
            metric.add_sample(name + "_sum", labels, child.total)
        metric.add_sample(name + "_created", labels, child.created)


class _Observed:
    """
    One label set's counts of a L{Histogram}.
    """

    __slots__ = ("_bounds", "counts", "total", "created")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.counts = [0] * len(bounds)
        self.total = 0.0
        self.created = time.time()

    def observe(self, amount: float) -> None:
        """
        Count C{amount} in the first bucket whose bound it does not pass
        (none, for a NaN, as C{prometheus_client} does).
        """
        self.total += amount
        if amount <= math.inf:
            self.counts[bisect.bisect_left(self._bounds, amount)] += 1


class ReactorWatch(Service):
    """
    How long the reactor thread is held: a timer due every C{interval}
    seconds notes how late it fires (the time the thread spent on
    something else past its due time), and the longest lateness of each
    C{window} is kept.

    @param clock: the C{IReactorTime} the timer runs on.
    @ivar holds: every lateness seen, a L{Histogram} if one is given.
    """

    def __init__(
        self,
        clock: Any,
        interval: float = WATCH_INTERVAL,
        window: float = WATCH_WINDOW,
        holds: Optional[Histogram] = None,
    ) -> None:
        self._clock = clock
        self.interval = interval
        self.window = window
        self.holds = holds
        self._call: Optional[IDelayedCall] = None
        self._due = 0.0
        self._window_ends = 0.0
        self._current = 0.0
        self._previous = 0.0

    def startService(self) -> None:
        Service.startService(self)
        now = self._clock.seconds()
        self._window_ends = now + self.window
        self._arm(now)

    def stopService(self) -> None:
        Service.stopService(self)
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _arm(self, now: float) -> None:
        self._due = now + self.interval
        self._call = self._clock.callLater(self.interval, self._tick)

    def _tick(self) -> None:
        now = self._clock.seconds()
        late = max(0.0, now - self._due)
        while now >= self._window_ends:
            self._previous, self._current = self._current, 0.0
            self._window_ends += self.window
        if late > self._current:
            self._current = late
        if self.holds is not None:
            self.holds.observe(late)
        self._arm(now)

    @property
    def longest(self) -> float:
        """
        The longest hold of the window under way and of the one before.
        """
        return max(self._current, self._previous)


class _ScrapeCollector(Collector):
    """
    What is read at each scrape (see the module's docstring).
    """

    def __init__(self, metrics: "DispatcherMetrics") -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Any]:
        m = self._metrics
        jobs = GaugeMetricFamily(
            "dispatcher_jobs",
            "Jobs stored, by queue and state (counted by the store's writer at each "
            "change).",
            labels=["queue", "state"],
        )
        counts = m.store.job_counts()
        for queue in sorted(set(m.queues) | set(counts)):
            states = counts.get(queue, {})
            for state in _STATES:
                jobs.add_metric([queue, state.value], states.get(state, 0))
        yield jobs
        for name, text, read in m.gauges:
            value = read()
            if value is not None:
                yield GaugeMetricFamily(name, text, value=value)
        for name, text, read in m.totals:
            value = read()
            if value is not None:
                yield CounterMetricFamily(name, text, value=value)


class DispatcherMetrics:
    """
    The daemon's metrics and the registry that writes them.

    @param store: the L{IJobStore} whose counts give the jobs by state.
    @param queues: the configured queues' names: each is shown, with zeros,
        before it holds a job.
    @param clock: the C{IReactorTime} of the reactor watch: the reactor
        itself, whose holds it measures.
    @ivar registry: the daemon's own C{CollectorRegistry}.
    @ivar watch: the L{ReactorWatch} (a service: the daemon starts it).
    @ivar gauges: C{(name, help, read)} of each gauge read at a scrape
        (L{add_gauge}); C{read} answers C{None} to leave it out.
    @ivar totals: the same, of each counter read at a scrape (L{add_total}).
    """

    def __init__(self, store: Any, queues: Sequence[str], clock: Any) -> None:
        self.store = store
        self.queues = tuple(queues)
        self.gauges: list[tuple[str, str, Callable[[], Optional[float]]]] = []
        self.totals: list[tuple[str, str, Callable[[], Optional[float]]]] = []
        self.registry = registry = CollectorRegistry(auto_describe=False)
        self.submitted = Counter(
            "dispatcher_jobs_submitted", "Jobs submitted, by queue.", ["queue"],
            registry=registry,
        )
        self.ended = Counter(
            "dispatcher_jobs_ended",
            "Jobs that reached a final state, by queue and outcome (succeeded, failed, "
            "cancelled).",
            ["queue", "outcome"],
            registry=registry,
        )
        self.waited = Histogram(
            "dispatcher_job_wait_seconds",
            "From a job's submission to the start (the lease) of its first attempt, by "
            "queue.",
            ["queue"],
            buckets=WAIT_BUCKETS,
            registry=registry,
        )
        self.ran = Histogram(
            "dispatcher_job_run_seconds",
            "How long an attempt ran (from running to its end), by queue; attempts "
            "that began before the daemon started are left out.",
            ["queue"],
            buckets=RUN_BUCKETS,
            registry=registry,
        )
        self.commit_seconds = Histogram(
            "dispatcher_store_commit_seconds",
            "How long each store commit (a group of writes) took on the writer thread, "
            "its sync included.",
            buckets=COMMIT_BUCKETS,
            registry=registry,
        )
        self.commit_writes = Histogram(
            "dispatcher_store_commit_writes",
            "How many writes each store commit held (the group commit's size).",
            buckets=GROUP_BUCKETS,
            registry=registry,
        )
        holds = Histogram(
            "dispatcher_reactor_lag_seconds",
            f"How late the reactor's watch timer (due every {WATCH_INTERVAL:g} s) fired: "
            "how long the reactor thread was held past it.",
            buckets=COMMIT_BUCKETS,
            registry=registry,
        )
        self.watch = ReactorWatch(clock, holds=holds)
        self.add_gauge(
            "dispatcher_reactor_longest_hold_seconds",
            f"The longest the reactor thread was held (its watch timer's lateness) in "
            f"the last {WATCH_WINDOW:g} to {2 * WATCH_WINDOW:g} seconds.",
            lambda: self.watch.longest,
        )
        registry.register(_ScrapeCollector(self))
        # Each queue's children, made once (labels() takes a lock and a
        # lookup: a tenth of what the reactor spends on a no-op job's
        # events otherwise).
        self._submitted: dict[str, Any] = {}
        self._ended: dict[tuple[str, JobState], Any] = {}
        self._ran: dict[str, Any] = {}
        self._waited: dict[str, Any] = {}
        # When each job now running began to run (bounded by the jobs
        # running: each holds a slot).
        self._running: dict[str, float] = {}

    @classmethod
    def of_dispatcher(cls, dispatcher: Any, queues: Sequence[str], clock: Any) -> "DispatcherMetrics":
        """
        The metrics of C{dispatcher} (a L{dispatcher.core.Dispatcher}): its
        store's counts and commits, its events, its claims, and its remote
        workers.  What the daemon adds (the HTTP connections, the staging
        totals) it adds with L{add_gauge} and L{add_total}.
        """
        metrics = cls(dispatcher.store, queues, clock)
        dispatcher.events.follow(metrics.observe_events)
        dispatcher.observe_claimed = metrics.observe_claimed
        observe_commits = getattr(dispatcher.store, "observe_commits", None)
        if observe_commits is not None:
            observe_commits(metrics.observe_commit)
        hub = dispatcher.hub
        metrics.add_gauge(
            "dispatcher_workers_connected",
            "Remote workers connected (heard from within a lease's life, or waiting "
            "for work).",
            lambda: len(hub.connected()),
        )
        metrics.add_total(
            "dispatcher_leases_expired",
            "Remote workers' leases that ran out without a heartbeat (each attempt is "
            "recorded lost).",
            lambda: hub.leases_expired,
        )
        return metrics

    def add_gauge(self, name: str, text: str, read: Callable[[], Optional[float]]) -> None:
        """
        Show a gauge C{name} whose value C{read} gives at each scrape.
        """
        self.gauges.append((name, text, read))

    def add_total(self, name: str, text: str, read: Callable[[], Optional[float]]) -> None:
        """
        Show a counter C{name} (its C{_total}) whose running total C{read}
        gives at each scrape.
        """
        self.totals.append((name, text, read))

    # What is observed as it happens, in the reactor thread.

    def observe_events(self, events: Sequence[Any]) -> None:
        """
        The events of one committed write (a follower of
        L{dispatcher.core.JobEvents}): count new jobs and ends, and time
        attempts from running to their end.
        """
        if type(events) is SameChange:
            # New jobs of one queue and owner (a batch's): counted at once.
            if events.spec is not None and len(events):
                self._count_submitted(events.spec.queue, len(events))
            return
        # New jobs of one queue in a row are counted at once.
        new_queue: Optional[str] = None
        new = 0
        for event in events:
            if type(event) is not JobEvent:
                continue
            spec = event.spec
            if spec is None:
                # Removed in the commit that changed it: its queue is gone.
                continue
            queue = spec.queue
            state = event.state
            previous = event.previous
            if previous is None:
                if queue != new_queue:
                    if new:
                        self._count_submitted(new_queue, new)
                    new_queue, new = queue, 0
                new += 1
            if state is _RUNNING:
                self._running[event.job_id] = event.at
            elif previous is _RUNNING:
                began = self._running.pop(event.job_id, None)
                if began is not None:
                    ran = self._ran.get(queue)
                    if ran is None:
                        ran = self._ran[queue] = self.ran.labels(queue)
                    ran.observe(max(0.0, event.at - began))
            if state in _ENDS:
                key = (queue, state)
                ended = self._ended.get(key)
                if ended is None:
                    ended = self._ended[key] = self.ended.labels(queue, state.value)
                ended.inc()
        if new:
            self._count_submitted(new_queue, new)

    def _count_submitted(self, queue: Any, jobs: int) -> None:
        child = self._submitted.get(queue)
        if child is None:
            child = self._submitted[queue] = self.submitted.labels(queue)
        child.inc(jobs)

    def observe_claimed(self, waited: Sequence[tuple[str, float]]) -> None:
        """
        A claim began the first attempts of jobs that waited so long since
        their submission (C{(queue, seconds)} each).
        """
        for queue, seconds in waited:
            child = self._waited.get(queue)
            if child is None:
                child = self._waited[queue] = self.waited.labels(queue)
            child.observe(max(0.0, seconds))

    def observe_commit(self, seconds: float, writes: int) -> None:
        """
        A store commit took C{seconds} and held C{writes} writes.
        """
        self.commit_seconds.observe(seconds)
        self.commit_writes.observe(writes)

    def render(self) -> bytes:
        """
        Every metric, in the Prometheus text format.
        """
        return generate_latest(self.registry)
