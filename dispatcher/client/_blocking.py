"""
The blocking client, for scripts and notebooks: each method returns when
the dispatcher has answered (httpx, a connection pool per client).
"""

from __future__ import annotations

import time
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Union

import httpx

from dispatcher.client import _calls as calls
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

DEFAULT_TIMEOUT = 30.0
# A followed stream (events, a log) may be quiet for long: a read that
# waits longer than this ends the connection, and the stream resumes where
# it was.  The events' heartbeat ([events] heartbeat, 15 s by default)
# keeps a live one from being taken for dead.
STREAM_TIMEOUT = 60.0


def _lost(error: httpx.TransportError) -> Lost:
    # A connection that was never made carried nothing.
    sent = not isinstance(error, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout))
    return Lost(sent, f"{type(error).__name__}: {error}" if str(error) else type(error).__name__)


class Client:
    """
    A blocking client of a dispatcher's API.

    Every method sends one request (a few for the ones that follow pages,
    wait or stream) and returns the answer decoded into its wire type; a
    refusal raises the L{DispatcherError<dispatcher.client.DispatcherError>}
    of its status.  A call whose connection fails before it is sent, or
    that is answered C{503} (nothing was changed), is tried again after a
    back-off, up to C{retries} times; so is a read or a submit whose
    connection failed after it was sent (a submit carries an
    C{Idempotency-Key} made for the call, the same on each try, so the
    dispatcher makes its jobs once).

    Use it as a context manager, or call L{close}, to close its
    connections.

    @param url: the dispatcher's base URL; by default C{DISPATCHER_URL},
        else C{http://127.0.0.1:8080}.
    @param token: the bearer token; by default C{DISPATCHER_TOKEN}, else
        the content of the file C{DISPATCHER_TOKEN_FILE} names, else that
        of C{./var/admin.token} if readable.
    @param timeout: seconds to connect, and to wait for each read of an
        answer (a C{?wait=} adds its own).
    @param retries: tries after the first, as above.
    @param http: an C{httpx.Client} to send with (its transport, proxies,
        TLS settings); by default one of the client's own.
    """

    def __init__(
        self,
        url: Optional[str] = None,
        token: Optional[str] = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = RETRIES,
        http: Optional[httpx.Client] = None,
    ) -> None:
        self.url = dispatcher_url(url)
        self._token = dispatcher_token(token)
        self._timeout = timeout
        self._retries = retries
        self._own_http = http is None
        self._http = httpx.Client() if http is None else http

    def close(self) -> None:
        """
        Close the client's connections (not those of an C{http} given).
        """
        if self._own_http:
            self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Client {self.url}>"

    # Carrying out plans

    def _timeouts(self, call: calls.Call, read: Optional[float] = None) -> httpx.Timeout:
        return httpx.Timeout(self._timeout, read=(read or self._timeout) + call.waits)

    def _send(self, call: calls.Call) -> Union[Answer, Lost]:
        try:
            response = self._http.request(
                call.method,
                call.url(self.url),
                content=call.body,
                headers=calls.headers(self._token, call),
                timeout=self._timeouts(call),
            )
        except httpx.TransportError as e:
            return _lost(e)
        return Answer(response.status_code, response.headers, response.content)

    def _run(self, plan: Plan) -> Any:
        result: Any = None
        try:
            while True:
                step = plan.send(result)
                if isinstance(step, Send):
                    result = self._send(step.call)
                elif isinstance(step, Sleep):
                    time.sleep(step.seconds)
                    result = None
                elif isinstance(step, Now):
                    result = time.monotonic()
                else:
                    raise TypeError(f"not a step: {step!r}")
        except StopIteration as e:
            return e.value

    def _call(self, call: calls.Call) -> Any:
        return self._run(exchange(call, self.url, self._retries))

    # Submitting

    def submit(
        self,
        command: Optional[Sequence[str]] = None,
        task: Optional[str] = None,
        **fields: Any,
    ) -> Union[JobView, SubmittedJobs]:
        """
        Submit a job: C{command} (an argv list, never run through a shell)
        or C{task} (a name from the dispatcher's C{[tasks]}), with the
        fields of L{JobSubmission} (C{name}, C{labels}, C{queue},
        C{priority}, C{inputs}, C{depends_on}, C{timeout}...); or a whole
        L{JobSubmission} as C{command}'s place, C{submit(JobSubmission(...))}.

        @return: the job, stored; with C{array=N}, the L{SubmittedJobs}
            made.
        @raise BadRequest: a field is wrong (C{field} names it).
        @raise QuotaExceeded: over the owner's quota.
        @raise TypeError: an unknown field, or a command given as a string.
        """
        job = command if isinstance(command, JobSubmission) else calls.submission(command, task, fields)
        return self._call(calls.submit_call(job, calls.idempotency_key()))

    def submit_batch(
        self, jobs: Iterable[Union[BatchJob, JobSubmission, Mapping[str, Any]]]
    ) -> SubmittedJobs:
        """
        Submit several jobs, all or nothing (L{BatchJob}s, L{JobSubmission}s
        or mappings of their fields; C{depends_on} may give the index of an
        earlier job of the batch).

        @return: the jobs made, in order, and the batch's id.
        """
        return self._call(calls.submit_batch_call(list(jobs), calls.idempotency_key()))

    # Jobs

    def job(self, job_id: str, wait: Optional[float] = None) -> JobView:
        """
        A job; with C{wait}, answered as soon as it has ended, or after
        C{wait} seconds (at most L{MAX_CLIENT_WAIT
        <dispatcher.wire._types.MAX_CLIENT_WAIT>}) as it is then.

        @raise NotFound: no such job (or another owner's, to a submitter).
        """
        return self._call(calls.job_call(job_id, wait))

    def jobs(self, **filters: Any) -> Iterator[JobView]:
        """
        The jobs, oldest first (C{order="newest"}: newest first), every
        page followed as the iteration reaches it.  Filters (all of them
        apply): C{state} (one or several), C{label} (a mapping, or
        C{"key=value"} strings), C{owner}, C{array}, C{batch}, C{name},
        C{queue}, C{worker}, C{created_after}, C{created_before} (RFC 3339
        strings, aware datetimes or epoch seconds); C{page_size} jobs a
        request.
        """
        query = calls.job_filters(**filters)
        cursor: Optional[str] = None
        while True:
            page = self._call(calls.list_call(query, cursor))
            yield from page.jobs
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def cancel(self, job_id: str) -> JobView:
        """
        Cancel a job: it is cancelled when this returns if it had not
        started (C{state} C{cancelled}); a running one is being stopped.

        @raise Conflict: it has already finished.
        """
        return self._call(calls.cancel_call(job_id))

    def retry(self, job_id: str, dependents: bool = False) -> JobView:
        """
        Put a failed or cancelled job back in line (with C{dependents}, the
        jobs cancelled because of it too).

        @raise Conflict: it is not failed or cancelled.
        """
        return self._call(calls.retry_call(job_id, dependents))

    def delete(self, job_id: str) -> None:
        """
        Remove a finished job, its attempts, logs and working directory.

        @raise Conflict: it has not finished, or a job still needs it.
        """
        self._call(calls.delete_call(job_id))

    def wait(
        self, job_ids: Union[str, Iterable[str]], timeout: Optional[float] = None
    ) -> Union[JobView, list[JobView]]:
        """
        Wait until a job (or each of several) has a final state
        (C{succeeded}, C{failed}, C{cancelled}): a long-poll of the
        dispatcher, asked again until it ends.

        @param job_ids: one job's id, or several.
        @param timeout: seconds in all; C{None}: as long as it takes.
        @return: the job, or the jobs in the order given.
        @raise WaitTimeout: the time ran out first (it holds the jobs as
            last seen).
        """
        single = isinstance(job_ids, str)
        views = self._run(wait_plan([job_ids] if single else list(job_ids), timeout,
                                    self.url, self._retries))
        return views[0] if single else views

    # Arrays and batches

    def array(self, array_id: str, wait: Optional[float] = None) -> JobGroup:
        """
        An array as a whole: its jobs by state; with C{wait}, answered as
        soon as all have ended or after C{wait} seconds.
        """
        return self._call(calls.group_call("arrays", array_id, wait))

    def batch(self, batch_id: str, wait: Optional[float] = None) -> JobGroup:
        """
        A batch as a whole, as L{array}.
        """
        return self._call(calls.group_call("batches", batch_id, wait))

    def cancel_array(self, array_id: str) -> JobGroup:
        """
        Cancel every unfinished job of an array.
        """
        return self._call(calls.group_action_call("arrays", array_id, "cancel"))

    def retry_array(self, array_id: str) -> JobGroup:
        """
        Retry every failed or cancelled job of an array.

        @raise Conflict: none can be retried.
        """
        return self._call(calls.group_action_call("arrays", array_id, "retry"))

    def cancel_batch(self, batch_id: str) -> JobGroup:
        """
        Cancel every unfinished job of a batch.
        """
        return self._call(calls.group_action_call("batches", batch_id, "cancel"))

    def retry_batch(self, batch_id: str) -> JobGroup:
        """
        Retry every failed or cancelled job of a batch.

        @raise Conflict: none can be retried.
        """
        return self._call(calls.group_action_call("batches", batch_id, "retry"))

    # Logs

    def log(self, job_id: str, stream: str = "stdout", attempt: Optional[int] = None,
            offset: int = 0) -> bytes:
        """
        A job's log so far: C{stream} C{"stdout"} or C{"stderr"}, of its
        latest attempt or of C{attempt}, from byte C{offset} on.
        """
        return self._call(calls.log_call(job_id, stream, attempt, offset))

    def follow_log(self, job_id: str, stream: str = "stdout", attempt: Optional[int] = None,
                   offset: int = 0) -> Iterator[bytes]:
        """
        A job's log as it is written, in pieces as they come, until its
        attempt has ended and the last byte is read.  A connection that
        fails meanwhile is opened again at the byte read up to (give
        C{attempt} to be sure the same attempt is resumed: without it, the
        latest is, which a retry between the two may have changed).
        """
        follower = LogFollower(job_id, stream, attempt, offset, self.url, self._retries)
        while True:
            call = follower.call()
            try:
                with self._http.stream(
                    call.method, call.url(self.url), headers=calls.headers(self._token, call),
                    timeout=self._timeouts(call, STREAM_TIMEOUT),
                ) as response:
                    if response.status_code != 200:
                        delay = follower.refused(
                            Answer(response.status_code, response.headers, response.read()))
                    else:
                        for data in response.iter_bytes():
                            yield follower.feed(data)
                        return
            except httpx.TransportError as e:
                delay = follower.lost(_lost(e).reason)
            time.sleep(delay)

    # Events

    def events(self, after: Optional[int] = None, **filters: Any) -> Iterator[Event]:
        """
        The dispatcher's events as they happen (after event C{after}, if
        given: those since, first), for ever; a connection that ends or
        fails is opened again after the last event read, with no gap
        (C{Last-Event-ID}).  Filters (all of them apply): C{job},
        C{array}, C{batch}, C{label} (a mapping, or C{"key=value"}
        strings), C{owner}, C{state} (one or several), C{type} (C{"job"},
        C{"worker"}).  Stop by leaving the loop.

        An event of type C{reset} says that events were missed (C{after}
        is older than the dispatcher keeps): list the jobs to catch up.
        """
        follower = EventFollower(calls.event_filters(**filters), after, self.url, self._retries)
        while True:
            call = follower.call()
            try:
                with self._http.stream(
                    call.method, call.url(self.url), headers=calls.headers(self._token, call),
                    timeout=self._timeouts(call, STREAM_TIMEOUT),
                ) as response:
                    if response.status_code != 200:
                        delay = follower.refused(
                            Answer(response.status_code, response.headers, response.read()))
                    else:
                        for data in response.iter_bytes():
                            yield from follower.feed(data)
                        delay = follower.ended()
            except httpx.TransportError as e:
                delay = follower.lost(_lost(e).reason)
            time.sleep(delay)

    # The rest

    def queues(self) -> dict[str, QueueView]:
        """
        The queues by name: jobs by state, running jobs and the limit (a
        submitter's own jobs alone).
        """
        return self._call(calls.queues_call()).queues

    def workers(self) -> list[WorkerView]:
        """
        The remote workers heard from within a lease's life.
        """
        return self._call(calls.workers_call()).workers

    def me(self) -> Identity:
        """
        Who the dispatcher takes this client's credential for.
        """
        return self._call(calls.me_call())
