"""
The remote worker: a process on another host that pulls jobs from a
dispatcher over HTTP with fenced leases (docs/worker-protocol.md) and runs
them with the same L{LocalExecutor} the daemon uses.

Nothing here touches the global reactor; L{dispatcher.app.worker_tap} builds the
service with it.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import socket
from typing import Any, Callable, Mapping, Optional

import attrs
import msgspec
from hyperlink import DecodedURL
from twisted.application.service import MultiService, Service
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredLock,
    ensureDeferred,
    succeed,
)
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from dispatcher.config._ini import Config
from dispatcher.execution._executor import RunningJob
from dispatcher.execution._host import JobHost
from dispatcher.model._jobs import JobState, Lease, Outcome
from dispatcher.wire._forms import lease_from_grant
from dispatcher.wire._json import encode
from dispatcher.wire._types import (
    HeartbeatItem,
    HeartbeatRequest,
    LeaseGrant,
    LeaseRequest,
    ResultItem,
    ResultsRequest,
    WorkerOffer,
)

log = Logger()

# The streams of an attempt, in the order they are shipped.
STREAMS = ("stdout", "stderr")

# The most log bytes one request carries.
LOG_CHUNK_BYTES = 256 * 1024

# What a worker assumes until the dispatcher's first answer says otherwise
# (the protocol's defaults).
DEFAULT_LEASE_SECONDS = 30.0
DEFAULT_HEARTBEAT_SECONDS = 10.0

# Seconds the dispatcher may hold a lease request open (the protocol's
# default), and how much longer the worker waits for its answer before it
# takes the connection for dead.
POLL_WAIT_SECONDS = 30.0
POLL_MARGIN_SECONDS = 15.0

# Seconds any other request may take.
REQUEST_TIMEOUT_SECONDS = 30.0


# What the worker offers

@attrs.frozen
class WorkerDescription:
    """
    What a worker tells the dispatcher about itself in every request.

    @ivar name: unique per worker process.
    @ivar slots: jobs it runs at once (at least 1).
    @ivar cpus: CPUs it offers in all.
    @ivar memory_mb: memory it offers in all, in MiB.
    @ivar gpus: GPUs it offers in all.
    @ivar labels: what a job's C{requirements} are matched against.
    @ivar tasks: the task names its configuration knows.
    @ivar instance: this process's own random id, so that the dispatcher
        can tell two processes given the same name apart.
    """

    name: str
    slots: int
    cpus: float
    memory_mb: int
    gpus: int
    labels: Mapping[str, str] = attrs.field(factory=dict)
    tasks: tuple[str, ...] = ()
    instance: str = attrs.field(factory=lambda: secrets.token_hex(8), eq=False)

    def offer(self) -> WorkerOffer:
        """
        The description as the protocol's C{"worker"} object.
        """
        return WorkerOffer(
            name=self.name,
            slots=self.slots,
            cpus=self.cpus,
            memory_mb=self.memory_mb,
            gpus=self.gpus,
            labels=dict(self.labels),
            tasks=list(self.tasks),
            instance=self.instance,
        )


def default_name() -> str:
    """
    A worker name unique on this host: the host name and the process id.
    """
    return f"{socket.gethostname()}-{os.getpid()}"


# Waiting between tries

class Backoff:
    """
    Exponential back-off with jitter: the n-th delay in a row is drawn
    uniformly between half and all of C{initial * 2**n}, capped at
    C{maximum}.  The jitter keeps many workers that lost the same
    dispatcher from coming back all at once.
    """

    def __init__(
        self,
        initial: float = 0.5,
        maximum: float = 30.0,
        rng: Optional[random.Random] = None,
    ) -> None:
        self.initial = initial
        self.maximum = maximum
        self._random = rng if rng is not None else random.Random()
        self.failures = 0

    def next_delay(self) -> float:
        """
        The delay before the next try, after one more failure.
        """
        ceiling = min(self.maximum, self.initial * 2 ** min(self.failures, 64))
        self.failures += 1
        return self._random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        """
        A try succeeded: the next failure waits the shortest delay again.
        """
        self.failures = 0


# Talking to the dispatcher

class DispatcherError(Exception):
    """
    A request to the dispatcher did not get a usable answer.
    """


class DispatcherUnavailable(DispatcherError):
    """
    The dispatcher could not be reached, timed out or answered with a
    server error (it may be restarting): try again later.
    """


class DispatcherRefused(DispatcherError):
    """
    The dispatcher refused the request itself (a 4xx other than the
    protocol's per-lease answers): a wrong token, workers disabled, or a
    request this worker should not have made.

    @ivar status: the HTTP status.
    @ivar code: the error's C{code}, or C{None}.
    """

    def __init__(self, status: int, code: Optional[str], message: str) -> None:
        super().__init__(f"{status} {code or ''}: {message}".replace(" :", ":"))
        self.status = status
        self.code = code


class LeaseGone(DispatcherError):
    """
    A write about a lease was refused because its token is no longer
    current (C{409 stale_lease}).
    """


class LogOffsetMismatch(DispatcherError):
    """
    A log chunk was sent at an offset past what the dispatcher has; it has
    C{size} bytes, and the worker resends from there.
    """

    def __init__(self, size: int) -> None:
        super().__init__(f"the dispatcher has {size} bytes of this stream")
        self.size = size


class DispatcherClient:
    """
    The worker's side of the HTTP protocol: one method per endpoint, JSON
    in and out, every failure one of the L{DispatcherError}s.

    @param http: a C{treq.client.HTTPClient} (or C{treq.testing.StubTreq}).
    @param url: the dispatcher's base URL, such as C{http://host:8080}.
    @param token: the bearer token of C{[workers] token_file}.
    @param clock: the C{IReactorTime} that times requests out.
    """

    def __init__(self, http: Any, url: str, token: str, clock: Any) -> None:
        self._http = http
        self._base = DecodedURL.from_text(url)
        self._token = token
        self._clock = clock

    def url(self, *segments: str) -> DecodedURL:
        """
        The URL of an endpoint under the base URL (which may have a path of
        its own, behind a proxy).
        """
        base = self._base
        if base.path and base.path[-1] == "":
            base = base.replace(path=base.path[:-1])
        return base.child(*segments)

    def lease(self, worker: WorkerDescription, max_jobs: int, wait: float) -> Deferred:
        """
        Ask for up to C{max_jobs} leases, letting the dispatcher hold the
        request up to C{wait} seconds.  Fires with the answer's JSON.
        """
        body = LeaseRequest(worker.offer(), max_jobs, wait)
        return self._json(
            self.url("v1", "leases"), body, wait + POLL_MARGIN_SECONDS, ()
        )

    def heartbeat(self, worker: WorkerDescription, items: list[HeartbeatItem]) -> Deferred:
        """
        Renew leases; fires with the answer's JSON, whose C{leases} say for
        each item whether it is still current.
        """
        body = HeartbeatRequest(worker.offer(), items)
        return self._json(
            self.url("v1", "leases", "heartbeat"), body, REQUEST_TIMEOUT_SECONDS, (409,)
        )

    def report(self, worker: WorkerDescription, results: list[ResultItem]) -> Deferred:
        """
        Report how attempts ended; fires with the answer's JSON, whose
        C{results} say for each item whether it was recorded.
        """
        body = ResultsRequest(worker.offer(), results)
        return self._json(
            self.url("v1", "leases", "results"), body, REQUEST_TIMEOUT_SECONDS, (409,)
        )

    def append_log(
        self, job_id: str, token: int, stream: str, offset: int, data: bytes
    ) -> Deferred:
        """
        Write C{data} at C{offset} of one stream of an attempt's log.  Fires
        with the stream's size afterwards; fails with L{LogOffsetMismatch}
        or L{LeaseGone}.
        """
        url = (
            self.url("v1", "leases", "log")
            .add("job_id", job_id)
            .add("token", str(token))
            .add("stream", stream)
            .add("offset", str(offset))
        )

        async def send() -> int:
            status, answer = await self._post(
                url, data, "application/octet-stream"
            )
            if status == 200 and isinstance(answer, dict) and isinstance(
                answer.get("size"), int
            ):
                return answer["size"]
            if status == 400:
                size = _size_of(answer)
                if size is not None:
                    raise LogOffsetMismatch(size)
                if _error_field(answer) == "offset" and offset > 0:
                    # Refused for its offset, without saying what it has:
                    # from the start is always a place to write.
                    raise LogOffsetMismatch(0)
            raise _error_for(status, answer)

        return self._timed(send(), REQUEST_TIMEOUT_SECONDS)

    def _json(
        self,
        url: DecodedURL,
        body: Any,
        timeout: float,
        also_ok: tuple[int, ...],
    ) -> Deferred:
        async def send() -> Any:
            status, answer = await self._post(url, encode(body), "application/json")
            if (status == 200 or status in also_ok) and isinstance(answer, dict) and (
                status == 200 or "error" not in answer
            ):
                return answer
            raise _error_for(status, answer)

        return self._timed(send(), timeout)

    def _timed(self, coroutine: Any, timeout: float) -> Deferred:
        d = Deferred.fromCoroutine(coroutine)
        d.addTimeout(timeout, self._clock)

        def timed_out(failure: Failure) -> None:
            failure.trap(DeferredTimeout)
            raise DispatcherUnavailable(f"no answer within {timeout:g} s")

        return d.addErrback(timed_out)

    async def _post(self, url: DecodedURL, data: bytes, content_type: str) -> tuple[int, Any]:
        headers = {
            "Authorization": [f"Bearer {self._token}"],
            "Content-Type": [content_type],
            "Accept": ["application/json"],
        }
        try:
            response = await self._http.request("POST", url, data=data, headers=headers)
            content = await response.content()
        except CancelledError:
            raise
        except Exception as e:
            reasons = getattr(e, "reasons", None)
            if reasons and all(r.check(CancelledError) for r in reasons):
                # The Agent wraps a cancel of a request in flight.
                raise CancelledError() from e
            raise DispatcherUnavailable(f"{url.to_text()}: {_describe(e)}") from e
        try:
            answer = json.loads(content)
        except ValueError:
            answer = None
        return response.code, answer


def _size_of(answer: Any) -> Optional[int]:
    # The protocol puts "size" in the error body; either level is read.
    if not isinstance(answer, dict):
        return None
    for where in (answer, answer.get("error")):
        if isinstance(where, dict) and isinstance(where.get("size"), int):
            return where["size"]
    return None


def _error_field(answer: Any) -> Optional[str]:
    error = answer.get("error") if isinstance(answer, dict) else None
    return error.get("field") if isinstance(error, dict) else None


def _error_for(status: int, answer: Any) -> DispatcherError:
    error = answer.get("error") if isinstance(answer, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    if status >= 500 or answer is None and status not in (401, 403):
        return DispatcherUnavailable(
            f"the dispatcher answered {status}"
            + (f" ({code}: {message})" if code else " without a JSON body")
        )
    if status == 409:
        return LeaseGone(message or code or "the lease is no longer current")
    return DispatcherRefused(status, code, message or "no message")


def _describe(e: Exception) -> str:
    reasons = getattr(e, "reasons", None)
    if reasons:
        return "; ".join(r.getErrorMessage() for r in reasons)
    return str(e) or type(e).__name__


# The worker

@attrs.define(eq=False)
class HeldLease:
    """
    A lease the worker holds: from the answer that granted it until its
    result is acknowledged, or until the dispatcher said it is no longer
    current and its job has stopped.

    @ivar lease: the lease.
    @ivar running: what the executor runs for it.
    @ivar tell_running: its job has started after staging, and the
        dispatcher has not yet acknowledged a heartbeat saying so.
    @ivar offsets: bytes of each stream the dispatcher has.
    @ivar given_up: streams the dispatcher refused (not sent any more).
    @ivar outcome: how the attempt ended, once it has.
    @ivar forgotten: the dispatcher no longer knows this lease: nothing more
        is sent about it.
    @ivar abandoned: stopped by the worker's own shutdown: its result is not
        reported and the lease is left to expire.
    """

    lease: Lease
    running: Optional[RunningJob] = None
    tell_running: bool = False
    offsets: dict[str, int] = attrs.field(factory=lambda: dict.fromkeys(STREAMS, 0))
    given_up: set[str] = attrs.field(factory=set)
    shipping: DeferredLock = attrs.field(factory=DeferredLock)
    outcome: Optional[Outcome] = None
    forgotten: bool = False
    abandoned: bool = False

    @property
    def job_id(self) -> str:
        return self.lease.job_id

    @property
    def ended(self) -> bool:
        return self.running is not None and self.running.done.called


def read_chunks_blocking(pieces: list[tuple[str, int, int]]) -> list[bytes]:
    """
    For each C{(path, offset, size)}, up to C{size} bytes of the file at
    C{path} from C{offset}; nothing for a file that does not exist (yet).
    Blocks: run it on a thread pool.
    """
    chunks = []
    for path, offset, size in pieces:
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                chunks.append(f.read(size))
        except FileNotFoundError:
            chunks.append(b"")
    return chunks


class RemoteWorker(Service):
    """
    Pulls jobs from a dispatcher and runs them: asks for work with a
    long-poll while it has free slots, runs each leased job on the
    executor, keeps its leases alive with heartbeats, ships its logs, and
    reports its results until they are acknowledged.

    A slot is taken from the lease's grant until its result is acknowledged
    (or its lease is gone and its job has stopped): the dispatcher counts
    the worker's leases the same way.

    @param client: a L{DispatcherClient}.
    @param executor: a L{LocalExecutor} (or an object with its C{run},
        C{stop}, C{log_path} and C{kill_grace}).
    @param description: the L{WorkerDescription} sent with every request.
    @param clock: the C{IReactorTime} of heartbeats, back-offs and the
        shutdown grace.
    @param read_chunks: C{[(path, offset, size), ...] -> Deferred[[bytes,
        ...]]}: reads pieces of log files off the reactor thread, in one
        trip (L{read_chunks_blocking}).
    @param grace: seconds a stopping worker waits for running jobs before it
        stops them.
    @param flush_seconds: seconds a stopping worker goes on trying to
        deliver results that are not yet acknowledged.
    @param rng: the random source of the back-off jitter.
    @param poll_wait: the long-poll's C{wait}, in seconds.
    """

    def __init__(
        self,
        client: DispatcherClient,
        executor: Any,
        description: WorkerDescription,
        clock: Any,
        read_chunks: Callable[[list[tuple[str, int, int]]], Deferred],
        grace: float = 30.0,
        flush_seconds: float = 10.0,
        rng: Optional[random.Random] = None,
        poll_wait: float = POLL_WAIT_SECONDS,
    ) -> None:
        self._client = client
        self._executor = executor
        self.description = description
        self._clock = clock
        self._read_chunks = read_chunks
        self._grace = grace
        self._flush_seconds = flush_seconds
        self._poll_wait = poll_wait
        self._random = rng if rng is not None else random.Random()
        self._poll_backoff = Backoff(rng=self._random)
        self._beat_backoff = Backoff(rng=self._random)
        # Results and their last output wait at most 10 s between tries: a
        # dispatcher back from an outage hears of ended jobs soon.
        self._report_backoff = Backoff(maximum=10.0, rng=self._random)
        self.lease_seconds = DEFAULT_LEASE_SECONDS
        self.heartbeat_seconds = DEFAULT_HEARTBEAT_SECONDS
        self.held: dict[str, HeldLease] = {}
        self.unreported: dict[str, HeldLease] = {}
        self._accepting = False
        self._stopped = False
        self._polling: Optional[Deferred] = None
        self._slot_waiter: Optional[Deferred] = None
        self._settled_waiters: list[Deferred] = []
        self._beat_call: Any = None
        self._beating: Optional[Deferred] = None
        self._beat_again = False
        self._reporting: Optional[Deferred] = None
        self._sleeps: set[Deferred] = set()
        self._asking: Optional[Deferred] = None

    # Starting and stopping

    def startService(self) -> None:
        Service.startService(self)
        self._accepting = True
        self._stopped = False
        log.info(
            "worker {name} asks {url} for work: {slots} slots, {cpus:g} CPUs, "
            "{memory} MiB, {gpus} GPUs, labels {labels}, tasks {tasks}",
            name=self.description.name,
            url=self._client.url().to_text(),
            slots=self.description.slots,
            cpus=self.description.cpus,
            memory=self.description.memory_mb,
            gpus=self.description.gpus,
            labels=dict(self.description.labels),
            tasks=list(self.description.tasks),
        )
        self._asking = self._guard(self._ask_for_work(), "asking for work")

    def stopService(self) -> Deferred:
        """
        Stop asking for work, give running jobs C{grace} seconds, then stop
        those still running, and go on for up to C{flush_seconds} trying to
        deliver the results of the jobs that ended.

        The jobs stopped here are reported as C{released} (unless they
        succeeded before the stop reached them): the dispatcher puts them
        back in the queue at once without spending their attempt, as the
        daemon does with its own jobs on SIGTERM.  Their logs are shipped
        first.  If the release cannot be delivered, their leases run out and
        the dispatcher queues them again (the attempt then counts).

        @return: a Deferred that fires when the worker has let go of
            everything.
        """
        Service.stopService(self)
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
        self._accepting = False
        for d in (self._polling, self._slot_waiter):
            # A lease request given up on is harmless: a lease granted on a
            # connection that is gone goes back unspent.
            if d is not None and not d.called:
                d.cancel()
        running = self._running()
        if running:
            log.info(
                "stopping: waiting up to {grace:g} s for {count} running jobs",
                grace=self._grace,
                count=len(running),
            )
            await self._within(self._grace, [h.running.done for h in running])
        still = self._running()
        if still:
            log.warn(
                "stopping {count} jobs still running after the grace period: "
                "{job_ids}; they are given back to the dispatcher's queue",
                count=len(still),
                job_ids=sorted(h.job_id for h in still),
            )
            for held in still:
                held.abandoned = True
                self._executor.stop(held.job_id)
            # Processes get SIGKILL after the executor's kill grace; a task
            # that ignores its cancel may never return, so this is bounded.
            await self._within(
                getattr(self._executor, "kill_grace", 5.0) + 1.0,
                [h.running.done for h in still],
            )
        if self._reports_pending():
            await self._within(self._flush_seconds, [self._all_settled()])
        pending = self._reports_pending()
        if pending:
            log.warn(
                "stopping before the dispatcher acknowledged the last output "
                "or the result of {count} jobs: {job_ids}",
                count=len(pending),
                job_ids=sorted(h.job_id for h in pending),
            )
        self._stopped = True
        if self._beat_call is not None and self._beat_call.active():
            self._beat_call.cancel()
        for d in [*self._sleeps, self._beating, self._reporting]:
            if d is not None and not d.called:
                d.cancel()
        if self._asking is not None:
            await self._asking
        log.info("worker {name} stopped", name=self.description.name)

    def _running(self) -> list[HeldLease]:
        return [h for h in self.held.values() if h.running is not None and not h.ended]

    def _reports_pending(self) -> list[HeldLease]:
        # Ended jobs whose last output or result the dispatcher has not
        # acknowledged yet (a job stopped by the shutdown ships its output).
        return [
            h for h in self.held.values() if h.outcome is not None and not h.forgotten
        ]

    def _all_settled(self) -> Deferred:
        async def wait() -> None:
            while self._reports_pending():
                waiter: Deferred = Deferred()
                self._settled_waiters.append(waiter)
                await waiter

        return ensureDeferred(wait())

    async def _within(self, seconds: float, ds: list[Deferred]) -> None:
        """
        Wait until all of C{ds} have fired, or C{seconds} have passed,
        whichever comes first, without changing their results.
        """
        done: Deferred = Deferred()
        remaining = [len(ds)]

        def one(result: Any) -> Any:
            remaining[0] -= 1
            if remaining[0] == 0 and not done.called:
                done.callback(None)
            return result

        for d in ds:
            d.addBoth(one)
        if not ds and not done.called:
            done.callback(None)
        call = self._clock.callLater(
            seconds, lambda: done.called or done.callback(None)
        )
        await done
        if call.active():
            call.cancel()

    def _guard(self, coroutine: Any, what: str) -> Deferred:
        def failed(failure: Failure) -> None:
            if not failure.check(CancelledError):
                log.failure("the worker failed while {what}", failure, what=what)

        return ensureDeferred(coroutine).addErrback(failed)

    def _sleep(self, seconds: float) -> Deferred:
        d = deferLater(self._clock, seconds)
        if self._stopped:
            d.cancel()
            return d
        self._sleeps.add(d)
        d.addBoth(lambda result: (self._sleeps.discard(d), result)[1])
        return d

    # Asking for work

    @property
    def free_slots(self) -> int:
        """
        Slots not taken by a lease the worker holds.
        """
        return self.description.slots - len(self.held)

    async def _ask_for_work(self) -> None:
        while self._accepting:
            free = self.free_slots
            if free <= 0:
                self._slot_waiter = Deferred()
                try:
                    await self._slot_waiter
                except CancelledError:
                    return
                finally:
                    self._slot_waiter = None
                continue
            asked_at = self._clock.seconds()
            self._polling = self._client.lease(self.description, free, self._poll_wait)
            try:
                answer = await self._polling
            except CancelledError:
                return
            except DispatcherError as e:
                if not self._accepting:
                    return
                delay = self._poll_backoff.next_delay()
                _log_error(e, "asking for work", delay)
                await self._sleep(delay)
                continue
            finally:
                self._polling = None
            if self._poll_backoff.failures:
                log.info("the dispatcher answers again")
            self._poll_backoff.reset()
            self._learn_timing(answer)
            leases = answer.get("leases") or ()
            if leases:
                log.info(
                    "{count} {jobs} leased in one answer",
                    count=len(leases),
                    jobs="job" if len(leases) == 1 else "jobs",
                )
            for item in leases:
                self._start(item)
            if not leases and self._clock.seconds() - asked_at < 1.0:
                # An empty answer should come only when the wait ends;
                # one that comes at once must not turn into a busy loop.
                await self._sleep(self._random.uniform(0.5, 1.0))

    def _learn_timing(self, answer: Mapping[str, Any]) -> None:
        lease_seconds = answer.get("lease_seconds")
        heartbeat_seconds = answer.get("heartbeat_seconds")
        if isinstance(lease_seconds, (int, float)) and lease_seconds > 0:
            self.lease_seconds = float(lease_seconds)
        if isinstance(heartbeat_seconds, (int, float)) and heartbeat_seconds > 0:
            self.heartbeat_seconds = float(heartbeat_seconds)

    # Running

    def _start(self, item: Any) -> None:
        try:
            lease = lease_from_grant(
                msgspec.convert(item, LeaseGrant, strict=True),
                self._clock.seconds() + self.lease_seconds,
            )
        except Exception:
            log.failure("cannot read a lease the dispatcher sent: {item!r}", item=item)
            return
        if lease.job_id in self.held:
            log.warn(
                "job {job_id} was leased again while this worker holds it; "
                "the new lease is ignored",
                job_id=lease.job_id,
            )
            return
        held = HeldLease(lease)
        self.held[lease.job_id] = held
        log.info(
            "job {job_id} attempt {attempt} leased (token {token})",
            job_id=lease.job_id,
            attempt=lease.attempt,
            token=lease.token,
        )

        def mark_running(lease: Lease) -> Deferred:
            # The job goes on at once; the dispatcher hears of it in a
            # heartbeat sent now, and a cancel that raced with staging
            # comes back in the answer.
            if not held.forgotten:
                held.tell_running = True
                self._beat_soon()
            return succeed(None)

        def record_process(lease: Lease, process: Any) -> Deferred:
            # Only the daemon records process identities (to kill what a
            # crash left); a worker's spawner helper kills its jobs when the
            # worker dies.
            return succeed(None)

        held.running = self._executor.run(lease, mark_running, record_process)
        held.running.done.addCallback(self._ended, held)
        self._ensure_heartbeats()

    def _ended(self, outcome: Outcome, held: HeldLease) -> None:
        log.info(
            "job {job_id} attempt {attempt} ended: {state}{error}",
            job_id=held.job_id,
            attempt=held.lease.attempt,
            state=outcome.state.value,
            error=f" ({outcome.error})" if outcome.error else "",
        )
        if held.forgotten:
            self._drop(held)
            return
        if held.abandoned and outcome.state is JobState.SUCCEEDED:
            # It finished on its own before the stop reached it: the work is
            # done, and is reported like any other (the stop was no cancel).
            held.abandoned = False
            outcome = attrs.evolve(outcome, stopped=False)
        held.outcome = outcome
        self._guard(self._finish(held), f"finishing job {held.job_id}")

    async def _finish(self, held: HeldLease) -> None:
        # The last log bytes go first: once the result is recorded the
        # lease is no longer current, and neither is its log.
        backoff = Backoff(maximum=10.0, rng=self._random)
        try:
            while not held.forgotten and not await self._ship_logs(held):
                await self._sleep(backoff.next_delay())
        except CancelledError:
            return
        if held.forgotten:
            self._drop(held)
            return
        self.unreported[held.job_id] = held
        self._report()

    def _drop(self, held: HeldLease, wake: bool = True) -> None:
        """
        Free C{held}'s slot.  With C{wake} false the lease loop is not told
        yet: the caller frees more slots and then calls L{_slots_freed}.
        """
        if self.held.get(held.job_id) is held:
            del self.held[held.job_id]
        if self.unreported.get(held.job_id) is held:
            del self.unreported[held.job_id]
        if wake:
            self._slots_freed()

    def _slots_freed(self) -> None:
        # The lease loop resumes inside this call and asks at once for
        # every slot free by then.
        if self._slot_waiter is not None and not self._slot_waiter.called:
            self._slot_waiter.callback(None)
        waiters, self._settled_waiters = self._settled_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _forget(self, held: HeldLease, reason: str, message: str = "") -> None:
        """
        The dispatcher no longer knows this lease: stop its job, send
        nothing more about it, and free its slot once the job has stopped.
        """
        if held.forgotten:
            return
        held.forgotten = True
        log.info(
            "job {job_id} attempt {attempt}: the lease is no longer current "
            "({reason}{message}); the job is stopped and its result will not "
            "be reported",
            job_id=held.job_id,
            attempt=held.lease.attempt,
            reason=reason,
            message=f": {message}" if message else "",
        )
        if not held.ended:
            self._executor.stop(held.job_id)
        elif not held.shipping.locked:
            # Otherwise _finish drops it when its shipping returns.
            self._drop(held)

    # Heartbeats

    def _live(self) -> list[HeldLease]:
        return [h for h in self.held.values() if not h.forgotten]

    def _ensure_heartbeats(self) -> None:
        if self._stopped or self._beating is not None:
            return
        if self._beat_call is None or not self._beat_call.active():
            self._beat_call = self._clock.callLater(self.heartbeat_seconds, self._beat)

    def _beat_soon(self) -> None:
        if self._stopped:
            return
        if self._beating is not None:
            self._beat_again = True
            return
        if self._beat_call is not None and self._beat_call.active():
            self._beat_call.cancel()
        self._beat()

    def _beat(self) -> None:
        self._beat_call = None
        d = self._guard(self._heartbeat(), "sending a heartbeat")
        self._beating = d
        d.addCallback(self._beaten)

    def _beaten(self, delay: Optional[float]) -> None:
        self._beating = None
        again, self._beat_again = self._beat_again, False
        if not self._stopped and self._live():
            if again:
                delay = 0
            elif delay is None:
                delay = self.heartbeat_seconds
            self._beat_call = self._clock.callLater(delay, self._beat)

    async def _heartbeat(self) -> Optional[float]:
        """
        Send one heartbeat for every live lease; return the seconds until
        the next one.
        """
        live = self._live()
        if not live:
            return None
        told = {h.job_id for h in live if h.tell_running}
        items = []
        for held in live:
            items.append(HeartbeatItem(held.job_id, held.lease.token, held.job_id in told))
            if not held.ended:
                self._guard(self._ship_logs(held), f"shipping job {held.job_id}'s log")
        try:
            answer = await self._client.heartbeat(self.description, items)
        except DispatcherError as e:
            # Never longer than a heartbeat period: a dispatcher that
            # comes back must hear from this worker before its leases
            # run out.
            delay = min(self._beat_backoff.next_delay(), self.heartbeat_seconds)
            _log_error(e, "sending a heartbeat", delay)
            return delay
        self._beat_backoff.reset()
        self._learn_timing(answer)
        for result in answer.get("leases") or ():
            held = self._matching(result)
            if held is None:
                continue
            if result.get("ok"):
                if held.job_id in told:
                    held.tell_running = False
            elif result.get("reason") == "reported" and held.outcome is not None:
                # Its result got through, but this answer came before the
                # report's own.
                held.forgotten = True
                self._drop(held)
            else:
                self._forget(
                    held,
                    str(result.get("reason") or result.get("status") or "refused"),
                    str(result.get("message") or ""),
                )
        return self.heartbeat_seconds

    def _matching(self, item: Any) -> Optional[HeldLease]:
        if not isinstance(item, dict):
            return None
        held = self.held.get(str(item.get("job_id")))
        if held is None or held.lease.token != item.get("token"):
            return None
        return held

    # Logs

    async def _read_chunk(self, path: str, offset: int) -> bytes:
        (chunk,) = await self._read_chunks([(path, offset, LOG_CHUNK_BYTES)])
        return chunk

    async def _ship_logs(self, held: HeldLease) -> bool:
        """
        Send what the attempt's log files hold beyond what the dispatcher
        has.  Return whether that got through (a lease that is gone counts:
        there is nothing more to send).
        """
        if held.shipping.locked and not held.ended:
            # One shipment at a time; the next heartbeat sends the rest.
            return True
        await held.shipping.acquire()
        try:
            streams = [s for s in STREAMS if s not in held.given_up]
            paths = {
                stream: self._executor.log_path(held.job_id, held.lease.attempt, stream)
                for stream in streams
            }
            # Every stream's next piece in one trip off the reactor thread:
            # most attempts (every task that did not fail) have no log, and
            # a trip for each stream, at every heartbeat and at every end,
            # was a worker's dearest part of a no-op job.
            firsts = await self._read_chunks(
                [(paths[stream], held.offsets[stream], LOG_CHUNK_BYTES) for stream in streams]
            )
            for stream, chunk in zip(streams, firsts):
                path = paths[stream]
                while chunk and not held.forgotten and stream not in held.given_up:
                    offset = held.offsets[stream]
                    try:
                        await self._client.append_log(
                            held.job_id, held.lease.token, stream, offset, chunk
                        )
                    except LogOffsetMismatch as e:
                        if e.size >= offset:
                            log.warn(
                                "job {job_id}: the dispatcher refused {stream} at "
                                "{offset} but has {size} bytes",
                                job_id=held.job_id, stream=stream, offset=offset,
                                size=e.size,
                            )
                            return False
                        held.offsets[stream] = e.size
                        chunk = await self._read_chunk(path, e.size)
                        continue
                    except LeaseGone as e:
                        self._forget(held, "stale_lease", str(e))
                        return True
                    except DispatcherRefused as e:
                        # Retrying what the dispatcher refuses would hold the
                        # result up for ever: the rest of this stream is lost.
                        log.error(
                            "job {job_id}: the dispatcher refused its {stream} at "
                            "{offset} ({error}); the rest of it is not sent",
                            job_id=held.job_id, stream=stream, offset=offset, error=e,
                        )
                        held.given_up.add(stream)
                        break
                    except DispatcherError as e:
                        log.info(
                            "job {job_id}: shipping its {stream} failed ({error})",
                            job_id=held.job_id,
                            stream=stream,
                            error=e,
                        )
                        return False
                    held.offsets[stream] = offset + len(chunk)
                    if len(chunk) < LOG_CHUNK_BYTES:
                        break
                    chunk = await self._read_chunk(path, held.offsets[stream])
            return True
        finally:
            held.shipping.release()

    # Results

    def _report(self) -> None:
        if self._reporting is None and self.unreported and not self._stopped:
            # (A stopping worker still reports: it is how its abandoned
            # jobs go back unspent.)
            d = self._guard(self._send_results(), "reporting results")
            self._reporting = d
            d.addBoth(self._reported)

    def _reported(self, _: Any) -> None:
        self._reporting = None

    async def _send_results(self) -> None:
        while self.unreported:
            batch = list(self.unreported.values())
            try:
                answer = await self._client.report(
                    self.description, [_result_item(h) for h in batch]
                )
            except DispatcherError as e:
                delay = self._report_backoff.next_delay()
                _log_error(e, "reporting results", delay)
                await self._sleep(delay)
                continue
            self._report_backoff.reset()
            dropped = False
            for result in answer.get("results") or ():
                held = self._matching(result)
                if held is None or self.unreported.get(held.job_id) is not held:
                    continue
                if result.get("ok"):
                    log.info(
                        "job {job_id} attempt {attempt}: result recorded",
                        job_id=held.job_id,
                        attempt=held.lease.attempt,
                    )
                else:
                    log.info(
                        "job {job_id} attempt {attempt}: result refused "
                        "({reason}); dropped",
                        job_id=held.job_id,
                        attempt=held.lease.attempt,
                        reason=result.get("reason") or result.get("status"),
                    )
                held.forgotten = True
                # Every slot of the answer is freed before the lease loop
                # hears of it: woken at the first, it would ask for one job
                # and hold the others idle until that answer came back.
                self._drop(held, wake=False)
                dropped = True
            if dropped:
                self._slots_freed()


def _result_item(held: HeldLease) -> ResultItem:
    outcome = held.outcome
    assert outcome is not None
    return ResultItem(
        held.job_id,
        held.lease.token,
        # A job the worker's own shutdown stopped goes back to the queue,
        # its attempt not spent.
        "released" if held.abandoned else outcome.state.value,
        outcome.exit_code,
        outcome.result,
        outcome.error,
        outcome.stopped,
    )


def _log_error(error: Exception, what: str, delay: float) -> None:
    if isinstance(error, DispatcherRefused):
        log.error(
            "the dispatcher refused {what}: {error}; trying again in {delay:.1f} s",
            what=what,
            error=error,
            delay=delay,
        )
    else:
        log.warn(
            "{what} failed: {error}; trying again in {delay:.1f} s",
            what=what,
            error=error,
            delay=delay,
        )


# The whole worker process

@attrs.frozen
class WorkerSettings:
    """
    Everything a worker process is made from, as its options give it.

    @ivar url: the dispatcher's base URL.
    @ivar token: the bearer token.
    @ivar description: what the worker offers.
    @ivar data_dir: where job working directories and logs live.
    @ivar config: the L{Config} its C{[tasks]}, C{[fetch]} and
        C{[executor]} (C{threads}, C{kill_grace}) come from.
    @ivar grace: seconds a stop waits for running jobs.
    """

    url: str
    token: str = attrs.field(repr=False)
    description: WorkerDescription
    data_dir: str
    config: Config = Config()
    grace: float = 30.0


class WorkerService(MultiService):
    """
    A whole worker process: thread pools, the spawner helper, the input
    stager, the executor and the L{RemoteWorker}, started in that order and
    stopped in reverse.

    @param reactor: the reactor; nothing else here imports one.
    @param settings: the L{WorkerSettings}.
    @param clock: the C{IReactorTime} of heartbeats, back-offs, timeouts and
        grace periods; the reactor by default.
    """

    def __init__(self, reactor: Any, settings: WorkerSettings, clock: Any = None) -> None:
        MultiService.__init__(self)
        clock = clock if clock is not None else reactor
        self._reactor = reactor
        self.settings = settings
        config = settings.config
        self.host = JobHost(
            reactor,
            settings.description.name,
            settings.data_dir,
            config,
            clock,
            clock,
            "worker",
        )
        self.io_pool = self.host.io_pool
        self.http_pool = self.host.http_pool
        # The long-poll, a heartbeat, a log chunk and a report may all be
        # under way at once.
        self.http_pool.maxPersistentPerHost = 4
        http = self.host.http
        self.executor = self.host.executor

        def read_chunks(pieces: list[tuple[str, int, int]]) -> Deferred:
            return deferToThreadPool(reactor, self.io_pool, read_chunks_blocking, pieces)

        self.worker = RemoteWorker(
            DispatcherClient(http, settings.url, settings.token, clock),
            self.executor,
            settings.description,
            clock,
            read_chunks,
            grace=settings.grace,
        )

    def startService(self) -> None:
        Service.startService(self)
        self.host.start_pools()
        os.makedirs(self.settings.data_dir, exist_ok=True)
        self.host.start_spawner()
        self.worker.startService()

    def stopService(self) -> Deferred:
        Service.stopService(self)
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
        await self.worker.stopService()
        await self.host.stop()
