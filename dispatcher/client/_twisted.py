"""
The Twisted client: the blocking client's methods, each returning a
Deferred (treq, through an injected reactor and an C{HTTPClient} with its
own connection pool).

Streams take a callable rather than returning an iterator, as
C{treq.collect} does: C{follow_log(job_id, received)} calls C{received}
with each piece of the log as it comes, C{events(received)} with each
L{Event}; each returns a Deferred that fires when the stream has ended (a
log, once its attempt has ended; events never: cancel the Deferred to stop,
and it fails with C{CancelledError} as a cancelled Deferred does).  If
C{received} returns a Deferred, nothing more is delivered, and the
connection is not read, until it fires: a slow consumer slows the stream
rather than filling memory.  If C{received} raises, the stream stops and
its Deferred fails with that error.  C{jobs()} is an asynchronous
iterator (C{async for job in client.jobs(): ...} in a coroutine driven by
C{Deferred.fromCoroutine}): each page is one request, and nothing is held
open between pages, so leaving the loop early costs nothing.
"""

from __future__ import annotations

from collections import deque
from typing import Any, AsyncIterator, Callable, Iterable, Mapping, Optional, Sequence, Union

from treq.client import HTTPClient
from twisted.internet.defer import Deferred, TimeoutError as DeferredTimeout, succeed
from twisted.internet.error import ConnectError, ConnectionDone, ConnectionLost
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IResponse
from twisted.web._newclient import (
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)

from dispatcher.client import _calls as calls
from dispatcher.client._blocking import DEFAULT_TIMEOUT, STREAM_TIMEOUT
from dispatcher.client._plans import RETRIES, Answer, Lost, Now, Plan, Send, Sleep, exchange, wait_plan
from dispatcher.client._settings import dispatcher_token, dispatcher_url
from dispatcher.client._streams import Event, EventFollower, LogFollower
from dispatcher.wire._types import (
    BatchJob,
    Identity,
    JobGroup,
    JobSubmission,
    JobView,
    QueueView,
    SubmittedJobs,
    WorkerView,
)

# Failures that mean no answer came (the connection failed or timed out).
_LOST = (
    ConnectError,
    ConnectionDone,
    ConnectionLost,
    DeferredTimeout,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)


def _lost(error: BaseException) -> Lost:
    # A connection that was never made carried nothing.
    reason = f"{type(error).__name__}: {error}"
    if isinstance(error, (ResponseFailed, ResponseNeverReceived)) and error.reasons:
        reason = "; ".join(r.getErrorMessage() for r in error.reasons)
    return Lost(not isinstance(error, ConnectError), reason)


def _headers(response: IResponse) -> dict[str, str]:
    return {
        name.decode("latin-1").lower(): values[-1].decode("latin-1")
        for name, values in response.headers.getAllRawHeaders()
    }


class _Body(Protocol):
    """
    Delivers a response's body to C{received} in order, as it comes; while
    a Deferred C{received} returned has not fired, the connection is not
    read.  C{finished} fires when the body has ended and all of it was
    delivered.
    """

    def __init__(self, received: Callable[[bytes], Any], finished: Deferred,
                 reactor: Any, idle: Optional[float]) -> None:
        self._received = received
        self._finished = finished
        self._reactor = reactor
        self._idle = idle
        self._timer: Any = None
        self._pending: deque[bytes] = deque()
        self._busy = False
        self._ended: Optional[Failure] = None

    def connectionMade(self) -> None:
        self._arm()

    def _arm(self) -> None:
        # A stream quiet for longer than idle is taken for dead: the
        # connection is dropped, and the stream's owner resumes it.
        if self._idle is None or self._ended is not None:
            return
        if self._timer is not None and self._timer.active():
            self._timer.reset(self._idle)
        else:
            self._timer = self._reactor.callLater(self._idle, self.stop)

    def _disarm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def stop(self) -> None:
        """
        Drop the connection (a cancel, or a stream gone quiet).
        """
        self._disarm()
        if self._ended is None and self.transport is not None:
            self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self._finished.called:
            return
        self._arm()
        self._pending.append(data)
        self._drain()

    def _drain(self) -> None:
        while self._pending and not self._busy and not self._finished.called:
            data = self._pending.popleft()
            try:
                result = self._received(data)
            except Exception:
                self._fail(Failure())
                return
            if isinstance(result, Deferred):
                self._busy = True
                if self._ended is None:
                    self.transport.pauseProducing()
                result.addCallbacks(self._delivered, self._fail)
        if not self._pending and not self._busy and self._ended is not None:
            self._end()

    def _delivered(self, _: Any) -> None:
        self._busy = False
        if self._ended is None and not self._finished.called:
            self.transport.resumeProducing()
        self._drain()

    def _fail(self, failure: Failure) -> None:
        self._busy = False
        self.stop()
        if not self._finished.called:
            self._finished.errback(failure)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self._disarm()
        self._ended = reason
        self._drain()

    def _end(self) -> None:
        if self._finished.called:
            return
        assert self._ended is not None
        if self._ended.check(ResponseDone, PotentialDataLoss):
            self._finished.callback(None)
        else:
            self._finished.errback(self._ended)


def read_body(response: IResponse, received: Callable[[bytes], Any], reactor: Any,
              idle: Optional[float] = None) -> Deferred:
    """
    Deliver C{response}'s body to C{received} as it comes (L{_Body}); the
    Deferred fires when all of it was delivered, and cancelling it drops
    the connection.

    @param idle: seconds without a byte after which the connection is
        dropped (the Deferred then fails), or C{None}.
    """
    body = _Body(received, Deferred(lambda d: body.stop()), reactor, idle)
    finished = body._finished
    response.deliverBody(body)
    return finished


def _in_order(received: Callable[[Any], Any], items: Iterable[Any]) -> Any:
    """
    Call C{received} with each of C{items}, each after the Deferred the one
    before returned (if it did) has fired; a Deferred of the last, or
    C{None} if none was needed.
    """
    waiting: Optional[Deferred] = None
    for item in items:
        if waiting is None:
            result = received(item)
            if isinstance(result, Deferred):
                waiting = result
        else:
            waiting.addCallback(lambda _, item=item: received(item))
    return waiting


class TwistedClient:
    """
    A client of a dispatcher's API for Twisted programs: the methods of
    L{Client<dispatcher.client.Client>}, each returning a Deferred of what
    the blocking one returns (and failing with the same errors); the
    streams as the module's docstring says.  Its tries and back-offs are
    the blocking client's, timed by C{reactor}.

    Call L{close} when done, to close its connections.

    @param url: as for L{Client<dispatcher.client.Client>}.
    @param token: as for L{Client<dispatcher.client.Client>}.
    @param reactor: the reactor (C{IReactorTCP}, C{IReactorTime}) to
        connect and time with.
    @param timeout: seconds for an answer to come whole (a C{?wait=} adds
        its own).
    @param retries: tries after the first, as for the blocking client.
    @param http: a C{treq.client.HTTPClient} to send with; by default one
        of the client's own, on its own C{HTTPConnectionPool}.
    """

    def __init__(
        self,
        url: Optional[str] = None,
        token: Optional[str] = None,
        *,
        reactor: Any,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = RETRIES,
        http: Optional[HTTPClient] = None,
    ) -> None:
        self.url = dispatcher_url(url)
        self._token = dispatcher_token(token)
        self._reactor = reactor
        self._timeout = timeout
        self._retries = retries
        self._pool: Optional[HTTPConnectionPool] = None
        if http is None:
            self._pool = HTTPConnectionPool(reactor)
            http = HTTPClient(Agent(reactor, pool=self._pool))
        self._http = http

    def close(self) -> Deferred:
        """
        Close the client's connections (not those of an C{http} given);
        the Deferred fires once they are closed.
        """
        if self._pool is None:
            return succeed(None)
        return self._pool.closeCachedConnections()

    def __repr__(self) -> str:
        return f"<TwistedClient {self.url}>"

    # Carrying out plans

    def _request(self, call: calls.Call) -> Deferred:
        return self._http.request(
            call.method, call.url(self.url), data=call.body,
            headers=calls.headers(self._token, call),
        )

    async def _exchange_once(self, call: calls.Call) -> Answer:
        response = await self._request(call)
        body: list[bytes] = []
        await read_body(response, body.append, self._reactor)
        return Answer(response.code, _headers(response), b"".join(body))

    def _send(self, call: calls.Call) -> Deferred:
        d = Deferred.fromCoroutine(self._exchange_once(call))
        d.addTimeout(self._timeout + call.waits, self._reactor)

        def lost(failure: Failure) -> Any:
            if failure.check(*_LOST):
                return _lost(failure.value)
            return failure

        return d.addErrback(lost)

    async def _run(self, plan: Plan) -> Any:
        result: Any = None
        while True:
            try:
                step = plan.send(result)
            except StopIteration as e:
                return e.value
            if isinstance(step, Send):
                result = await self._send(step.call)
            elif isinstance(step, Sleep):
                result = await deferLater(self._reactor, step.seconds)
            elif isinstance(step, Now):
                result = self._reactor.seconds()
            else:
                raise TypeError(f"not a step: {step!r}")

    def _call(self, call: calls.Call) -> Deferred:
        return Deferred.fromCoroutine(self._run(exchange(call, self.url, self._retries)))

    # Submitting

    def submit(self, command: Optional[Sequence[str]] = None, task: Optional[str] = None,
               **fields: Any) -> "Deferred[Union[JobView, SubmittedJobs]]":
        """
        As L{Client.submit<dispatcher.client.Client.submit>}; an unknown
        field raises C{TypeError} at once.
        """
        job = command if isinstance(command, JobSubmission) else calls.submission(command, task, fields)
        return self._call(calls.submit_call(job, calls.idempotency_key()))

    def submit_batch(
        self, jobs: Iterable[Union[BatchJob, JobSubmission, Mapping[str, Any]]]
    ) -> "Deferred[SubmittedJobs]":
        """
        As L{Client.submit_batch<dispatcher.client.Client.submit_batch>}.
        """
        return self._call(calls.submit_batch_call(list(jobs), calls.idempotency_key()))

    # Jobs

    def job(self, job_id: str, wait: Optional[float] = None) -> "Deferred[JobView]":
        """
        As L{Client.job<dispatcher.client.Client.job>}.
        """
        return self._call(calls.job_call(job_id, wait))

    async def jobs(self, **filters: Any) -> AsyncIterator[JobView]:
        """
        As L{Client.jobs<dispatcher.client.Client.jobs>}, as an asynchronous
        iterator.
        """
        query = calls.job_filters(**filters)
        cursor: Optional[str] = None
        while True:
            page = await self._call(calls.list_call(query, cursor))
            for job in page.jobs:
                yield job
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def cancel(self, job_id: str) -> "Deferred[JobView]":
        """
        As L{Client.cancel<dispatcher.client.Client.cancel>}.
        """
        return self._call(calls.cancel_call(job_id))

    def retry(self, job_id: str, dependents: bool = False) -> "Deferred[JobView]":
        """
        As L{Client.retry<dispatcher.client.Client.retry>}.
        """
        return self._call(calls.retry_call(job_id, dependents))

    def delete(self, job_id: str) -> "Deferred[None]":
        """
        As L{Client.delete<dispatcher.client.Client.delete>}.
        """
        return self._call(calls.delete_call(job_id))

    def wait(self, job_ids: Union[str, Iterable[str]],
             timeout: Optional[float] = None) -> "Deferred[Union[JobView, list[JobView]]]":
        """
        As L{Client.wait<dispatcher.client.Client.wait>}.
        """
        single = isinstance(job_ids, str)
        plan = wait_plan([job_ids] if single else list(job_ids), timeout, self.url, self._retries)
        d = Deferred.fromCoroutine(self._run(plan))
        return d.addCallback(lambda views: views[0] if single else views)

    # Arrays and batches

    def array(self, array_id: str, wait: Optional[float] = None) -> "Deferred[JobGroup]":
        """
        As L{Client.array<dispatcher.client.Client.array>}.
        """
        return self._call(calls.group_call("arrays", array_id, wait))

    def batch(self, batch_id: str, wait: Optional[float] = None) -> "Deferred[JobGroup]":
        """
        As L{Client.batch<dispatcher.client.Client.batch>}.
        """
        return self._call(calls.group_call("batches", batch_id, wait))

    def cancel_array(self, array_id: str) -> "Deferred[JobGroup]":
        """
        As L{Client.cancel_array<dispatcher.client.Client.cancel_array>}.
        """
        return self._call(calls.group_action_call("arrays", array_id, "cancel"))

    def retry_array(self, array_id: str) -> "Deferred[JobGroup]":
        """
        As L{Client.retry_array<dispatcher.client.Client.retry_array>}.
        """
        return self._call(calls.group_action_call("arrays", array_id, "retry"))

    def cancel_batch(self, batch_id: str) -> "Deferred[JobGroup]":
        """
        As L{Client.cancel_batch<dispatcher.client.Client.cancel_batch>}.
        """
        return self._call(calls.group_action_call("batches", batch_id, "cancel"))

    def retry_batch(self, batch_id: str) -> "Deferred[JobGroup]":
        """
        As L{Client.retry_batch<dispatcher.client.Client.retry_batch>}.
        """
        return self._call(calls.group_action_call("batches", batch_id, "retry"))

    # Logs

    def log(self, job_id: str, stream: str = "stdout", attempt: Optional[int] = None,
            offset: int = 0) -> "Deferred[bytes]":
        """
        As L{Client.log<dispatcher.client.Client.log>}.
        """
        return self._call(calls.log_call(job_id, stream, attempt, offset))

    def follow_log(self, job_id: str, received: Callable[[bytes], Any], stream: str = "stdout",
                   attempt: Optional[int] = None, offset: int = 0) -> "Deferred[None]":
        """
        Call C{received} with each piece of a job's log as it is written;
        the Deferred fires once its attempt has ended and the last byte
        was delivered.  A connection that fails meanwhile is opened again
        at the byte read up to.  (The stream's rules: the module's
        docstring.)
        """
        follower = LogFollower(job_id, stream, attempt, offset, self.url, self._retries)
        return Deferred.fromCoroutine(
            self._follow(follower, lambda data: received(follower.feed(data)), log=True)
        )

    # Events

    def events(self, received: Callable[[Event], Any], after: Optional[int] = None,
               **filters: Any) -> "Deferred[None]":
        """
        Call C{received} with each of the dispatcher's events as it
        happens, as L{Client.events<dispatcher.client.Client.events>}
        gives them (resumed after a disconnect with no gap); until the
        Deferred is cancelled.  (The stream's rules: the module's
        docstring.)
        """
        follower = EventFollower(calls.event_filters(**filters), after, self.url, self._retries)
        return Deferred.fromCoroutine(
            self._follow(follower, lambda data: _in_order(received, follower.feed(data)), log=False)
        )

    async def _follow(self, follower: Union[LogFollower, EventFollower],
                      deliver: Callable[[bytes], Any], log: bool) -> None:
        while True:
            call = follower.call()
            try:
                response = await self._request(call).addTimeout(self._timeout, self._reactor)
                if response.code != 200:
                    body: list[bytes] = []
                    await read_body(response, body.append, self._reactor, self._timeout)
                    delay = follower.refused(Answer(response.code, _headers(response),
                                                    b"".join(body)))
                else:
                    await read_body(response, deliver, self._reactor, STREAM_TIMEOUT)
                    if log:
                        return
                    assert isinstance(follower, EventFollower)
                    delay = follower.ended()
            except _LOST as e:
                delay = follower.lost(_lost(e).reason)
            await deferLater(self._reactor, delay)

    # The rest

    def queues(self) -> "Deferred[dict[str, QueueView]]":
        """
        As L{Client.queues<dispatcher.client.Client.queues>}.
        """
        return self._call(calls.queues_call()).addCallback(lambda answer: answer.queues)

    def workers(self) -> "Deferred[list[WorkerView]]":
        """
        As L{Client.workers<dispatcher.client.Client.workers>}.
        """
        return self._call(calls.workers_call()).addCallback(lambda answer: answer.workers)

    def me(self) -> "Deferred[Identity]":
        """
        As L{Client.me<dispatcher.client.Client.me>}.
        """
        return self._call(calls.me_call())
