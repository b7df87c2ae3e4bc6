"""
The JSON HTTP API, version 1, as one twisted.web resource.

The route table (L{dispatcher.api._routes}) says which handler serves a
method and path, and who may call it; handlers read bodies into wire types
(L{dispatcher.wire}) and answer wire types.  The resource turns their
answers and their L{ApiError}s into JSON responses, and cancels them when
the client goes.

Every job has an owner, the principal that submitted it.  A principal
that does not see every job (a submitter) sees, cancels, retries and reads
the logs of its own jobs alone: another's job is answered as a missing one
is (C{404 not_found}, the same words), so that its existence does not
show, and its lists and queue counts hold its own jobs only.
"""

from __future__ import annotations

import datetime
import errno
import math
import os
import re
from inspect import iscoroutine
from typing import Any, Awaitable, Callable, Mapping, Optional

import attrs
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from dispatcher._throttle import Throttle
from dispatcher.wire._json import decode as decode_json, encode
from dispatcher.wire._forms import group_view, job_summary, job_view, worker_view
from dispatcher.wire._types import (
    DEFAULT_LIST_LIMIT,
    MAX_CLIENT_WAIT,
    MAX_CURSOR,
    MAX_IDEMPOTENCY_KEY,
    MAX_LABEL_FILTERS,
    MAX_LIST_LIMIT,
    MAX_NAME,
    MAX_OFFSET,
    MAX_STATE_FILTERS,
    ZONED_TIME,
    MAX_ATTEMPT_NUMBER,
    Batch,
    CredentialCreated,
    CredentialList,
    CredentialRequest,
    CredentialView,
    Health,
    Identity,
    JobPage,
    JobSubmission,
    LoginRequest,
    QueueList,
    SessionView,
    RetryRequest,
    WorkerList,
)
from dispatcher.model._groups import GroupKind, NothingToChange, TooManyWaits, UnknownGroup
from dispatcher.model._jobs import format_time
from dispatcher.model._jobs import InvalidTransition, JobState, PlainJobs, StoreClosed, UnknownJob
from dispatcher.model._principals import PRINCIPAL_NAME_RULE, valid_name
from dispatcher.api._events import EventStreamAnswer, EventStreams, parse_event_query
from dispatcher.api._metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE, DispatcherMetrics
from dispatcher.api._openapi import openapi_document
from dispatcher.api._hosts import HostPolicy
from dispatcher.api._routes import DASHBOARD_ROUTES, ROUTES, Route, Router, path_segments
from dispatcher.api._dashboard import (
    INDEX,
    PAGE_HEADERS,
    SESSION_HEADERS,
    Sessions,
    TooManySessions,
    clear_cookie,
    is_tls,
    load_files,
    set_cookie,
)
from dispatcher.config._ini import QueueConfig, QuotaConfig, Quotas
from dispatcher.store._stored import request_digest
from dispatcher.store._results import (
    DependencyNotRetried,
    HasDependents,
    IdempotencyConflict,
    IdempotencyKey,
    NotFinished,
    StorageFull,
    StoreUnreachable,
    Submitted,
    SubmittedIds,
    TooManyDependencies,
    TooManyUnfinished,
    UnknownDependency,
)
from dispatcher.wire._submission import (
    ApiError,
    Submission,
    check_batch_size,
    check_stored_bytes,
    decode,
    decode_batch,
    parse_submission,
    plain_jobs,
)
from dispatcher.api._workers import WorkerEndpoints, query_integer
from dispatcher.api._follow import LogFollowers, file_size, read_region
from dispatcher.api._auth import (
    ANONYMOUS,
    ANONYMOUS_BODY_TOO_LARGE,
    MAX_ANONYMOUS_BODY_BYTES,
    Gate,
)
from dispatcher.api._quotas import QuotaExceeded, SubmissionRates, too_many_unfinished
from dispatcher.model._principals import Principal, Role
from dispatcher.store._credentials import CredentialExists, CredentialFile

log = Logger()

# The errno values of a disk that takes no more (a log chunk a worker sent).
NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})

# The quotas of a daemon made without any: no principal is limited.
NO_QUOTAS = Quotas(default=QuotaConfig())

# Jobs of a batch checked in one go on the reactor thread (plain ones, see
# plain_jobs, take a third of the time or less).
BATCH_SLICE = 250
PLAIN_SLICE = 2500


class Answer:
    """
    What a handler answers: a status, a JSON-able body (or bytes with their
    content type), and headers.
    """

    def __init__(
        self,
        status: int,
        body: Any,
        headers: Optional[Mapping[str, str]] = None,
        content_type: str = "application/json",
    ) -> None:
        self.status = status
        self.body = body
        self.headers = dict(headers or {})
        self.content_type = content_type


class FileAnswer(Answer):
    """
    A 200 answer whose body is a file's bytes from C{offset} to the size the
    file had when the answer began (a log may grow meanwhile).
    """

    def __init__(self, path: Optional[str], offset: int, size: int) -> None:
        Answer.__init__(self, 200, b"", content_type="text/plain; charset=utf-8")
        self.path = path
        self.offset = offset
        self.size = size


class FollowAnswer(Answer):
    """
    A 200 answer that follows a log as it is written (L{LogFollowers}):
    C{stream} of C{job}'s attempt C{attempt} (C{None}: the latest, or the
    first once it starts) from C{offset}.
    """

    def __init__(self, job: Any, attempt: Optional[int], stream: str, offset: int) -> None:
        Answer.__init__(self, 200, b"", content_type="text/plain; charset=utf-8")
        self.job = job
        self.attempt = attempt
        self.stream = stream
        self.offset = offset


@implementer(IPushProducer)
class _FileProducer:
    """
    Sends a file region to a request, one chunk read on the I/O pool at a
    time, pausing while the connection's buffer is full.
    """

    chunk = 65536

    def __init__(self, request: Any, answer: FileAnswer, reactor: Any, pool: Any) -> None:
        self._request = request
        self._path = answer.path
        self._offset = answer.offset
        self._end = answer.offset + answer.size
        self._reactor = reactor
        self._pool = pool
        self._reading = False
        self._paused = False
        self._stopped = False

    def start(self) -> None:
        self._request.registerProducer(self, True)
        self._read_next()

    def _read_next(self) -> None:
        if self._reading or self._paused or self._stopped:
            return
        if self._offset >= self._end:
            self._stopped = True
            self._request.unregisterProducer()
            self._request.finish()
            return
        self._reading = True
        size = min(self.chunk, self._end - self._offset)
        d = deferToThreadPool(
            self._reactor, self._pool, read_region, self._path, self._offset, size
        )
        d.addCallbacks(self._read, self._failed)

    def _read(self, data: bytes) -> None:
        self._reading = False
        if self._stopped:
            return
        if not data:
            # The file shrank: end the body short; the client sees it.
            self._abort()
            return
        self._offset += len(data)
        # Writing may pause us (the buffer is full); the next read waits
        # for resumeProducing then.
        self._request.write(data)
        self._read_next()

    def _failed(self, failure: Failure) -> None:
        self._reading = False
        log.failure("reading {path} failed", failure, path=self._path)
        self._abort()

    def _abort(self) -> None:
        self._stopped = True
        self._request.unregisterProducer()
        self._request.loseConnection()

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._read_next()

    def stopProducing(self) -> None:
        self._stopped = True


def _wants_full_jobs(request: Any) -> bool:
    """
    Whether a batch submission asked for the whole jobs in its answer
    (C{Prefer: return=representation}, RFC 7240) rather than their ids and
    states; a request that makes one job gets it whole anyway.
    """
    prefer = request.getHeader(b"prefer")
    if prefer is None:
        return False
    for preference in prefer.split(b","):
        name, _, value = preference.partition(b";")[0].partition(b"=")
        if name.strip().lower() == b"return" and value.strip(b' "').lower() == b"representation":
            return True
    return False


def _queued_summaries(ids: list[str], batch_id: Optional[str] = None) -> bytes:
    """
    C{{"jobs": [{"id": ..., "state": "queued"}, ...]}} for these ids (with
    the batch's C{batch_id}, and each job's, if given), as JSON: written
    with one join (ids need no escaping), where a dict for each job and
    their encoding were a tenth of a plain batch's time on the reactor
    thread.
    """
    head, tail = '{"jobs":[', "]}"
    each = '","state":"queued"}'
    if batch_id is not None:
        head = f'{{"batch_id":"{batch_id}","jobs":['
        each = f'","state":"queued","batch_id":"{batch_id}"}}'
    if not ids:
        return (head + tail).encode("ascii")
    return (head + '{"id":"' + (each + ',{"id":"').join(ids) + each + tail).encode("ascii")


def _check_json(request: Any) -> None:
    """
    Refuse (415) a POST that is not declared C{application/json}, with a
    body or without: a cross-site form can send only C{text/plain},
    C{multipart/form-data} and C{application/x-www-form-urlencoded}
    without the browser asking first (a CORS preflight, which the API does
    not answer), so no form can act.
    """
    ctype = request.getHeader(b"content-type")
    if ctype is not None and ctype[:16].lower() == b"application/json" and (
        len(ctype) == 16 or ctype[16:17] in b"; \t"
    ):
        return
    raise ApiError(
        415,
        "unsupported_media_type",
        "send the request with Content-Type: application/json (a request "
        "without a body too)",
        "Content-Type",
    )


def _json_body(request: Any) -> bytes:
    """
    The bytes of a request's JSON body, its C{Content-Type} checked by
    L{DispatcherAPI.render} (L{_check_json}).
    """
    return request.content.read()


def _own_only(principal: Principal) -> Optional[str]:
    """
    The owner whose jobs alone C{principal} may see and change: its own
    name, or C{None} if it sees every job.
    """
    return None if principal.sees_all else principal.name


def check_query(request: Any, route: Route) -> None:
    """
    Refuse (400 C{invalid_query}, naming it) a query parameter the route
    does not declare, and one it declares given more than once unless it
    is an array (L{Route.query}): on every route, so that a misspelt or
    misplaced parameter (C{GET /v1/jobs/{id}?wiat=10}) is never silently
    ignored.  The routes' 400s say so (L{QUERY_RULES}).
    """
    if not request.args:
        return
    allowed = route.query
    for name, values in request.args.items():
        key = name.decode("utf-8", "replace")
        repeatable = allowed.get(key)
        if repeatable is None:
            takes = (
                f"allowed: {', '.join(allowed)}" if allowed
                else "this operation takes no query parameter"
            )
            raise ApiError(
                400, "invalid_query", f"{key}: unknown query parameter; {takes}", key
            )
        if len(values) > 1 and not repeatable:
            raise ApiError(
                400, "invalid_query", f"{key}: given {len(values)} times; give it once", key
            )


def _query(request: Any, name: str) -> Optional[str]:
    """
    The one value of the query parameter C{name}, or C{None}; given twice,
    it is refused rather than one of its values silently taken.
    """
    values = request.args.get(name.encode("ascii"))
    if not values:
        return None
    if len(values) > 1:
        raise ApiError(
            400, "invalid_query", f"{name}: given {len(values)} times; give it once", name
        )
    try:
        return values[-1].decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "invalid_query", f"{name}: not UTF-8", name)


def parse_labels(request: Any) -> list[tuple[str, Optional[str]]]:
    """
    The C{label} filters of a query (C{key=value}, or C{key}: has the
    label), at most L{MAX_LABEL_FILTERS}; a 400 naming C{label} otherwise.
    """
    given = request.args.get(b"label", [])
    if len(given) > MAX_LABEL_FILTERS:
        raise ApiError(
            400,
            "invalid_query",
            f"label: given {len(given)} times; at most {MAX_LABEL_FILTERS} label "
            "filters in one query",
            "label",
        )
    labels = []
    for raw in given:
        try:
            label = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(400, "invalid_query", "label: not UTF-8", "label")
        key, sep, value = label.partition("=")
        if not key:
            raise ApiError(
                400, "invalid_query", "label: expected key=value or key", "label"
            )
        labels.append((key, value if sep else None))
    return labels


class DispatcherAPI(Resource):
    """
    The whole API.

    @param dispatcher: the L{Dispatcher} it fronts.
    @param tasks: the configured tasks, by name.
    @param reactor: for file reads on C{io_pool}.
    @param io_pool: the pool that reads logs.
    @param queues: the configured queues, by name.
    @param max_array: the most jobs one request may make.
    @param max_stored_bytes: the most the arrays' members of one request
        may store (C{None}: no limit).
    @param quotas: each principal's quota (L{dispatcher.api._quotas});
        C{None}: none.
    @param clock: the time C{delay} counts from.
    @param workers: the L{WorkerEndpoints}, or C{None} (no remote workers).
    @param credentials: the named credentials and the token files' (see
        L{dispatcher.api._auth}); none at all when C{None}.
    @param authentication_required: C{False} lets every caller in as an
        admin (C{[api] authentication = off}, loopback only).
    @param max_body_bytes: C{[server] max_body_bytes}, for the document.
    @param allowed_hosts: C{[server] allowed_hosts} (see L{HostPolicy});
        the address the daemon listens on is added by L{listening_on}.
    @param events: the L{EventStreams} of C{GET /v1/events}; by default,
        streams of the dispatcher's events with the default bounds.
    @param max_log_followers: C{[api] max_log_followers}: the most log
        follows at once (L{LogFollowers}).
    @param notify_refusal: why a webhook may not be sent to a URL (a
        submission's C{notify.url}), or C{None} when it may; C{None} when
        the dispatcher sends no webhooks (it has no secret to sign them
        with), and a submission with C{notify} is then refused.
    @param sessions: the dashboard's sessions (L{dispatcher.api._dashboard});
        by default, new ones on C{clock} with the default bounds.
    @ivar stopping: whether the daemon is stopping: every new request is
        then answered C{503 shutting_down} (see L{stop_serving}).
    """

    isLeaf = True

    def __init__(
        self,
        dispatcher: Any,
        tasks: Mapping[str, Any],
        reactor: Any,
        io_pool: Any,
        queues: Optional[Mapping[str, Any]] = None,
        max_array: int = 10000,
        clock: Any = None,
        workers: Optional[WorkerEndpoints] = None,
        credentials: Optional[CredentialFile] = None,
        authentication_required: bool = True,
        max_body_bytes: Optional[int] = None,
        allowed_hosts: Optional[tuple[str, ...]] = None,
        max_stored_bytes: Optional[int] = None,
        quotas: Optional[Quotas] = None,
        events: Optional[EventStreams] = None,
        max_log_followers: int = 4096,
        notify_refusal: Optional[Callable[[str], Optional[str]]] = None,
        sessions: Optional[Sessions] = None,
        metrics: Optional[DispatcherMetrics] = None,
    ) -> None:
        Resource.__init__(self)
        self._notify_refusal = notify_refusal
        if events is None:
            events = EventStreams(
                dispatcher.events, dispatcher.store, clock if clock is not None else reactor
            )
        self.events = events
        events.start_following()
        self._hosts = HostPolicy(allowed_hosts)
        self._workers = workers
        self._dispatcher = dispatcher
        self._tasks = tasks
        self._queues = queues if queues is not None else {"default": QueueConfig("default")}
        if metrics is None:
            # The reactor watch times the reactor itself, whatever clock the
            # jobs' times run on.
            metrics = DispatcherMetrics.of_dispatcher(dispatcher, sorted(self._queues), reactor)
        self.metrics = metrics
        metrics.add_gauge(
            "dispatcher_event_subscribers",
            "Clients following the event stream (GET /v1/events).",
            lambda: len(self.events.streams),
        )
        self._max_array = max_array
        self._max_stored_bytes = max_stored_bytes
        self._max_body_bytes = max_body_bytes
        self._clock = clock if clock is not None else reactor
        self._rates = SubmissionRates(
            quotas if quotas is not None else NO_QUOTAS, self._clock
        )
        self._reactor = reactor
        self._io_pool = io_pool
        self.stopping = False
        # 507s for a full disk that the store did not log (a log chunk
        # that could not be written), logged at most once a minute.
        self._disk_trouble = Throttle(reactor)
        # The API's routes and the dashboard's, routed and checked alike.
        self._router = Router(ROUTES + DASHBOARD_ROUTES)
        self.sessions = sessions if sessions is not None else Sessions(self._clock)
        self._dashboard_files = load_files()
        self._credentials = credentials
        # Log follows: their files read on the I/O pool, their ends told
        # by the job events; a worker's chunks reach them as written.
        self._followers = LogFollowers(
            lambda f, *args: deferToThreadPool(reactor, io_pool, f, *args),
            self._clock,
            lambda callback: dispatcher.events.subscribe(callback),
            dispatcher.get,
            dispatcher.executor.log_path,
            max_log_followers,
        )
        if workers is not None:
            workers.log_written = self._followers.written
        self._gate = Gate(
            credentials if credentials is not None else CredentialFile(None),
            self._hosts,
            self._router,
            reactor,
            required=authentication_required,
            own_uid=os.getuid(),
            sessions=self.sessions,
        )
        self._openapi = encode(
            openapi_document(
                max_array=max_array,
                max_body_bytes=max_body_bytes,
                max_stored_bytes=max_stored_bytes,
                tasks=tasks,
                queues=self._queues,
            )
        )

    def reconfigure(
        self,
        max_array: int,
        max_stored_bytes: Optional[int],
        quotas: Quotas,
        queues: Optional[Mapping[str, Any]] = None,
    ) -> None:
        """
        Take new limits from now on (a reload of the configuration): the
        most jobs a request may make, the most its stored specs may hold,
        each principal's quota (the owners' buckets start full) and, if
        given, the queues a job may name, with their defaults; the served
        OpenAPI document says the new limits.
        """
        self._max_array = max_array
        self._max_stored_bytes = max_stored_bytes
        self._rates = SubmissionRates(quotas, self._clock)
        if queues is not None:
            self._queues = queues
            self.metrics.queues = tuple(sorted(queues))
        self._openapi = encode(
            openapi_document(
                max_array=max_array,
                max_body_bytes=self._max_body_bytes,
                max_stored_bytes=max_stored_bytes,
                tasks=self._tasks,
                queues=self._queues,
            )
        )

    def listening_on(self, host: Optional[str], port: Optional[int]) -> None:
        """
        Answer requests to the address the daemon did bind (see
        L{HostPolicy.listening_on}).
        """
        self._hosts.listening_on(host, port)

    def stop_serving(self) -> None:
        """
        Answer every request from now on C{503 shutting_down}, and close
        its connection after the answer: the daemon is stopping, and keeps
        listening (so that clients hear why, rather than have their
        connections refused) until its running jobs are handled.  A
        request that waits (C{?wait=}) is answered so now: no wait holds
        the stop.  Log follows and event streams end
        now (L{LogFollowers.stop}, L{EventStreams.stop}).
        """
        self.stopping = True
        self._dispatcher.waits.stop()
        self._followers.stop()
        # Event streams end now: their clients resume after the restart
        # (Last-Event-ID), and meanwhile hear 503.
        self.events.stop()

    def check_head(self, channel: Any, method: bytes, uri: bytes, headers: Any) -> Any:
        """
        The HTTP server's head check (L{HTTPFactory}'s C{head_check}): the
        request's L{Principal}, or the L{ApiError} refusing it (a Host or
        Origin not allowed, no valid credential, a role that may not).  A
        caller without a credential (of an open route) may send a body of
        C{MAX_ANONYMOUS_BODY_BYTES} at most: none of those routes reads one,
        and a stranger must not make the daemon hold megabytes.
        """
        verdict = self._verdict(channel, method, uri, headers)
        if verdict is ANONYMOUS:
            channel.limit_body(MAX_ANONYMOUS_BODY_BYTES, ANONYMOUS_BODY_TOO_LARGE)
        return verdict

    def _verdict(self, channel: Any, method: bytes, uri: bytes, headers: Any) -> Any:
        try:
            return self._gate.check(
                method, uri.partition(b"?")[0], headers, channel.peer_uid(), channel.client,
                # Which session cookie counts; read only when one may.
                secure=b"cookie" in headers and is_tls(channel),
            )
        except ApiError as e:
            return e

    def render(self, request: Any) -> Any:
        if request.principal is None:
            # No head check ran (a server without one): the same checks,
            # before anything else, the unknown paths' 404 included, so that
            # a page that rebinds a name to this host learns nothing.
            verdict = self._verdict(request.channel, request.method, request.uri,
                                    request.requestHeaders)
            if isinstance(verdict, ApiError):
                self._write_error(request, verdict)
                return NOT_DONE_YET
            request.principal = verdict
        if self.stopping:
            request.persistent = False
            self._write_error(
                request,
                ApiError(
                    503,
                    "shutting_down",
                    "the dispatcher is stopping; try again once it is back",
                ),
            )
            return NOT_DONE_YET
        # As the head check read it (L{path_segments}), so that both
        # find one route.
        segments = path_segments(request.path)
        method = request.method.decode("ascii", "replace").upper()
        try:
            route, allowed, args = self._route(segments, method)
            if route.json_post and route.method == method:
                _check_json(request)
        except ApiError as e:
            self._write_error(request, e)
            return NOT_DONE_YET
        if route.method != method and not (method == "HEAD" and route.method == "GET"):
            request.setHeader(b"allow", ", ".join(allowed).encode("ascii"))
            self._write_error(
                request,
                ApiError(
                    405,
                    "method_not_allowed",
                    f"{method} is not allowed here; allowed: {', '.join(allowed)}",
                ),
            )
            return NOT_DONE_YET
        try:
            check_query(request, route)
        except ApiError as e:
            self._write_error(request, e)
            return NOT_DONE_YET
        if route.handler not in WITHOUT_STORE:
            # A dispatcher that lost its database says so at once, rather
            # than let each request wait for a connection to fail.
            trouble = self._dispatcher.store_trouble
            if trouble is not None:
                self._write_error(request, store_unavailable(trouble))
                return NOT_DONE_YET
        try:
            result = getattr(self, route.handler)(request, *args)
        except Exception:
            d = fail()
        else:
            # The submit handlers chain Deferreds rather than await them: a
            # coroutine's start and resumption were a tenth of a single
            # submit's time on the reactor thread.
            d = Deferred.fromCoroutine(result) if iscoroutine(result) else result
        # A client that goes away cancels what its request still waits for.
        request.when_lost(d.cancel)
        # A failure while writing the answer (an answer that cannot be
        # encoded, say) is answered as any other: nothing is sent before
        # the body is encoded.
        d.addCallback(self._write_answer, request).addErrback(self._write_failure, request)
        return NOT_DONE_YET

    def _route(self, segments: list[str], method: str) -> tuple[Route, list[str], tuple]:
        """
        The route of a request (another method's at its path when it has
        none of its own, for the 405), the methods its path allows, and
        the path's parameters.
        """
        found = self._router.match(segments)
        if found is None:
            raise ApiError(404, "not_found", f"no such resource: /{'/'.join(segments)}")
        routes, args = found
        if method == "HEAD" and "GET" in routes:
            method = "GET"
        route = routes.get(method) or next(iter(routes.values()))
        return route, sorted(routes), args

    # Writing answers

    def _write_answer(self, answer: Answer, request: Any) -> None:
        if request.finished or request._disconnected:
            return
        if isinstance(answer, EventStreamAnswer):
            answer.start(request)
            return
        if isinstance(answer, FollowAnswer):
            if request.method == b"HEAD":
                request.setHeader(b"content-type", answer.content_type.encode("ascii"))
                request.finish()
                return
            self._followers.follow(
                request, answer.job, answer.attempt, answer.stream, answer.offset,
                request.principal.name,
            )
            return
        if isinstance(answer, FileAnswer):
            request.setHeader(b"content-type", answer.content_type.encode("ascii"))
            request.setHeader(b"content-length", str(answer.size).encode("ascii"))
            if request.method == b"HEAD" or answer.size == 0:
                request.finish()
                return
            _FileProducer(request, answer, self._reactor, self._io_pool).start()
            return
        if answer.status == 204:
            request.setResponseCode(204)
            for name, value in answer.headers.items():
                request.setHeader(name.encode("ascii"), value.encode("utf-8"))
            request.finish()
            return
        # Encoded first: if it fails, nothing of this answer is set.
        body = answer.body if isinstance(answer.body, bytes) else encode(answer.body)
        request.setResponseCode(answer.status)
        for name, value in answer.headers.items():
            request.setHeader(name.encode("ascii"), value.encode("utf-8"))
        request.setHeader(b"content-type", answer.content_type.encode("ascii"))
        request.setHeader(b"content-length", str(len(body)).encode("ascii"))
        if request.method != b"HEAD":
            request.write(body)
        request.finish()

    def _write_error(self, request: Any, error: ApiError) -> None:
        # A refusal's own headers (WWW-Authenticate, Retry-After).
        for name, value in getattr(error, "headers", {}).items():
            request.setHeader(name, value)
        self._write_answer(Answer(error.status, error.to_json()), request)

    def _write_failure(self, failure: Failure, request: Any) -> None:
        if failure.check(CancelledError):
            return
        if failure.check(ApiError):
            self._write_error(request, failure.value)
            return
        if failure.check(StoreClosed):
            self._write_error(
                request,
                ApiError(503, "shutting_down", "the dispatcher is stopping; try again"),
            )
            return
        if failure.check(TooManyWaits):
            error = ApiError(503, "too_many_waits", str(failure.value), "wait")
            error.headers = {b"retry-after": b"1"}
            self._write_error(request, error)
            return
        if failure.check(StoreUnreachable):
            self._write_error(
                request,
                store_unavailable(
                    f"the database cannot be reached: {failure.getErrorMessage()}"
                ),
            )
            return
        if failure.check(StorageFull):
            # The store logs it, once a minute with how many failed.
            self._write_error(request, _insufficient_storage(failure.getErrorMessage()))
            return
        if failure.check(OSError) and failure.value.errno in NO_SPACE:
            count = self._disk_trouble.happened()
            if count is not None:
                log.error(
                    "writing to the dispatcher's disk failed ({error}): {count} "
                    "requests answered 507 since the last line (logged at most "
                    "once a minute)",
                    error=failure.getErrorMessage(),
                    count=count,
                )
            self._write_error(request, _insufficient_storage(failure.getErrorMessage()))
            return
        log.failure("request {method} {uri} failed", failure,
                    method=request.method, uri=request.uri)
        self._write_error(
            request,
            ApiError(500, "internal_error", "the dispatcher failed to answer; see its log"),
        )

    # Handlers

    # The dashboard (dispatcher.api._dashboard)

    async def dashboard_page(self, request: Any) -> Answer:
        """
        The dashboard's page (C{GET /ui/}).
        """
        return self._dashboard_file_answer(INDEX)

    async def dashboard_file(self, request: Any, name: str) -> Answer:
        """
        One of the dashboard's files, by its name alone (no path on disk
        comes from the request).
        """
        return self._dashboard_file_answer(name)

    def _dashboard_file_answer(self, name: str) -> Answer:
        found = self._dashboard_files.get(name)
        if found is None:
            raise ApiError(404, "not_found", f"no such file of the dashboard: {name}", "file")
        return Answer(200, found.body, PAGE_HEADERS, found.content_type)

    def _session_view(self, principal: Principal, session: Any) -> SessionView:
        return SessionView(
            principal.name,
            principal.role,
            None if session is None else session.csrf,
            None if session is None else format_time(self.sessions.expires_at(session)),
            self._gate.required,
        )

    async def log_in(self, request: Any) -> Answer:
        """
        Open a dashboard session with a token: its cookie and CSRF token.
        """
        body = decode(_json_body(request), LoginRequest)
        token = body.token.encode("utf-8")
        principal = self._gate.credentials.authenticate(token)
        if principal is None:
            error = ApiError(
                401, "unauthorized",
                "token: not a token this dispatcher knows (revoked, mistyped, or "
                "of another dispatcher)",
                "token",
            )
            self._gate.audit.refused(error, request.method, request.path, "no credential",
                                     request.channel.client)
            raise error
        secure = is_tls(request.channel)
        # A login replaces the session the browser had: an id that another
        # page set for it (a fixation) does not survive it.
        old = self._gate.session_of(request.requestHeaders, secure)
        if old is not None:
            self.sessions.end(old.id)
        try:
            session = self.sessions.open(token, principal)
        except TooManySessions:
            error = ApiError(
                503, "too_many_sessions",
                f"the dispatcher keeps {len(self.sessions)} dashboard sessions, as "
                "many as it may; try again once one has ended",
            )
            error.headers = {b"retry-after": b"60"}
            raise error
        log.info(
            "{principal} logged in to the dashboard from {client}",
            principal=principal.name, client=request.channel.client,
        )
        headers = dict(SESSION_HEADERS)
        headers["Set-Cookie"] = set_cookie(session, secure, self.sessions.lifetime)
        return Answer(200, self._session_view(principal, session), headers)

    async def session(self, request: Any) -> Answer:
        """
        Who the caller is, with its session's CSRF token when the cookie
        authenticated it.
        """
        found = self._gate.session_of(request.requestHeaders, is_tls(request.channel))
        if request.getHeader(b"authorization") is not None:
            # A bearer token is who the caller is, whatever cookie comes.
            found = None
        return Answer(200, self._session_view(request.principal, found), SESSION_HEADERS)

    async def log_out(self, request: Any) -> Answer:
        """
        End the cookie's session, and clear the cookie.
        """
        secure = is_tls(request.channel)
        found = self._gate.session_of(request.requestHeaders, secure)
        if found is not None and request.getHeader(b"authorization") is None:
            self.sessions.end(found.id)
            log.info(
                "{principal} logged out of the dashboard from {client}",
                principal=request.principal.name, client=request.channel.client,
            )
        headers = dict(SESSION_HEADERS)
        headers["Set-Cookie"] = clear_cookie(secure)
        return Answer(204, None, headers)

    async def who_am_i(self, request: Any) -> Answer:
        principal = request.principal
        names = principal.worker_names
        return Answer(
            200, Identity(principal.name, principal.role, None if names is None else sorted(names))
        )

    def _credential_file(self) -> CredentialFile:
        if self._credentials is None:
            raise ApiError(
                409, "conflict", "this dispatcher keeps no credentials file", None
            )
        return self._credentials

    async def list_credentials(self, request: Any) -> Answer:
        credentials = await deferToThreadPool(
            self._reactor, self._io_pool, self._credential_file().credentials
        )
        return Answer(200, CredentialList([_credential_view(c) for c in credentials]))

    async def create_credential(self, request: Any) -> Answer:
        body = decode(_json_body(request), CredentialRequest)
        if body.worker_names is not None and body.role is not Role.WORKER:
            raise ApiError(
                400, "invalid_field",
                "worker_names: only a worker credential lists worker names",
                "worker_names",
            )
        credentials = self._credential_file()
        try:
            token, made = await deferToThreadPool(
                self._reactor, self._io_pool, credentials.create,
                body.name, body.role, body.worker_names,
            )
        except CredentialExists as e:
            raise ApiError(409, "conflict", f"name: {e}", "name")
        log.info(
            "{principal} made the credential {name} ({role})",
            principal=request.principal.name, name=body.name, role=body.role.value,
        )
        view = _credential_view(made)
        return Answer(
            201,
            CredentialCreated(view.name, view.role, view.worker_names, view.created_at, token),
            headers={"Location": f"/v1/credentials/{body.name}"},
        )

    async def revoke_credential(self, request: Any, name: str) -> Answer:
        revoked = await deferToThreadPool(
            self._reactor, self._io_pool, self._credential_file().revoke, name
        )
        if not revoked:
            raise ApiError(404, "not_found", f"no credential named {name!r}", "name")
        log.info(
            "{principal} revoked the credential {name}",
            principal=request.principal.name, name=name,
        )
        return Answer(204, b"")

    async def health(self, request: Any) -> Answer:
        return Answer(200, Health("ok"))

    async def read_metrics(self, request: Any) -> Answer:
        # Written on the reactor thread: every value is in memory (the
        # jobs' counts too), a scrape takes about a millisecond.
        return Answer(200, self.metrics.render(), content_type=METRICS_CONTENT_TYPE)

    async def openapi(self, request: Any) -> Answer:
        return Answer(200, self._openapi)

    def _idempotency(self, request: Any, body: bytes) -> Optional[IdempotencyKey]:
        """
        The request's C{Idempotency-Key}, with the hash of its path and its
        body's JSON value (so that a JSON-equal body is the same request).
        """
        raw = request.getHeader(b"idempotency-key")
        if raw is None:
            return None
        try:
            key = raw.decode("ascii")
        except UnicodeDecodeError:
            key = ""
        if not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY or not key.isprintable():
            raise ApiError(
                400,
                "invalid_header",
                f"Idempotency-Key: expected 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII "
                "characters",
                "Idempotency-Key",
            )
        return IdempotencyKey(
            key, request_digest(request.path.decode("utf-8", "replace"), decode_json(body))
        )

    def _store(
        self,
        request: Any,
        body: bytes,
        submissions: list[Submission] | PlainJobs,
        single: bool,
        full: bool,
        jobs: int,
        field: str,
        batch_id: Optional[str] = None,
    ) -> Deferred:
        """
        Store a request's C{jobs} jobs, within its principal's quota: its
        rate first (here), then its unfinished jobs (the store's count); a
        refusal of either is a 429 naming C{field}, and a request that
        stores nothing gives back what it took of the rate.  A batch's
        answer says its C{batch_id} (a replay's, the original's).

        A request past the rate that carries an C{Idempotency-Key} still
        goes to the store, allowed no new job: a replay of a request that
        was stored (its client lost the answer) is answered with its jobs,
        since it stores nothing; a 429 saying nothing was stored would
        have its client submit again under a new key, and make the jobs
        twice.  Anything else is the rate's 429.
        """
        key = self._idempotency(request, body)
        principal = request.principal
        limits = self._rates.limits(principal)
        max_unfinished = limits.max_jobs
        over_rate: Optional[QuotaExceeded] = None
        if not limits.unlimited:
            try:
                self._rates.take(principal, limits, jobs, field)
            except QuotaExceeded as e:
                if key is None:
                    raise
                # The store answers a replay before it counts, and with
                # no more unfinished jobs allowed refuses anything new.
                over_rate, max_unfinished = e, 0

        def answer(submitted: Submitted | SubmittedIds) -> Answer:
            if isinstance(submitted, Submitted) and submitted.replayed and over_rate is None:
                self._rates.give_back(principal, limits, jobs)
            if isinstance(submitted, SubmittedIds):
                _audit_submit(request, submitted.ids, False)
                return Answer(201, _queued_summaries(submitted.ids, batch_id))
            _audit_submit(request, [job.id for job in submitted.jobs], submitted.replayed)
            status = 200 if submitted.replayed else 201
            if single:
                (job,) = submitted.jobs
                return Answer(status, job_view(job), {"Location": f"/v1/jobs/{job.id}"})
            answer: dict[str, Any] = {}
            if batch_id is not None and submitted.jobs:
                # A replay's jobs carry the batch id the original request
                # was given, not the one made for this one.
                answer["batch_id"] = submitted.jobs[0].spec.batch_id
            if full:
                answer["jobs"] = [job_view(job) for job in submitted.jobs]
                return Answer(status, answer, {"Preference-Applied": "return=representation"})
            # Showing every job whole was most of a large batch's time, on
            # the reactor thread, and the client has the specs it sent.
            answer["jobs"] = [job_summary(job) for job in submitted.jobs]
            return Answer(status, answer)

        def refused(failure: Failure) -> Failure:
            if over_rate is not None:
                # It took nothing of the rate; not a replay, the rate
                # refuses it.
                if failure.check(TooManyUnfinished):
                    raise over_rate
            elif not failure.check(CancelledError):
                # Nothing was stored.  (A request its client left is
                # stored all the same: what it took is kept.)
                self._rates.give_back(principal, limits, jobs)
            if failure.check(TooManyUnfinished):
                raise too_many_unfinished(failure.value, field)
            if failure.check(IdempotencyConflict):
                raise ApiError(
                    409, "idempotency_conflict", str(failure.value), "Idempotency-Key"
                )
            if failure.check(UnknownDependency, TooManyDependencies):
                e = failure.value
                entry = f"depends_on[{e.position}]"
                if not single:
                    entry = f"jobs[{e.job_index}].{entry}"
                code = "unknown_dependency" if isinstance(e, UnknownDependency) else "invalid_field"
                raise ApiError(400, code, f"{entry}: {e}", entry)
            return failure

        # The key is the owner's own: the store looks it up among the
        # owner's keys.
        if isinstance(submissions, PlainJobs):
            d = self._dispatcher.submit_plain(
                submissions, key, principal.name, max_unfinished
            )
        else:
            d = self._dispatcher.submit(
                submissions,
                key,
                explain=single or full,
                owner=principal.name,
                sees_all=principal.sees_all,
                max_unfinished=max_unfinished,
            )
        return d.addCallbacks(answer, refused)

    def _submission(self, body: Any, prefix: str = "", index: Optional[int] = None) -> Submission:
        submission = parse_submission(
            body,
            self._tasks,
            self._queues,
            self._clock.seconds(),
            self._max_array,
            prefix,
            index,
            self._max_stored_bytes,
        )
        if submission.spec.notify is not None:
            self._check_notify(submission.spec.notify.url, f"{prefix}notify")
        return submission

    def _check_notify(self, url: str, field: str) -> None:
        """
        Refuse a job's webhook that this dispatcher cannot send: it has no
        secret to sign it with, or the URL gives an address the fetch
        policy refuses (a name is resolved, and its addresses checked,
        when it is posted to).
        """
        if self._notify_refusal is None:
            raise ApiError(
                400,
                "invalid_field",
                f"{field}: this dispatcher sends no webhooks: it has no secret to sign "
                "them with; its operator sets [webhooks] secret_file (docs/webhooks.md)",
                field,
            )
        refusal = self._notify_refusal(url)
        if refusal is not None:
            raise ApiError(400, "invalid_field", f"{field}.url: {refusal}", f"{field}.url")

    def submit(self, request: Any) -> Deferred:
        raw = _json_body(request)
        submission = self._submission(decode(raw, JobSubmission))
        return self._store(
            request,
            raw,
            [submission],
            submission.array is None,
            full=_wants_full_jobs(request),
            jobs=submission.array or 1,
            field="body" if submission.array is None else "array",
        )

    async def submit_batch(self, request: Any) -> Answer:
        raw = _json_body(request)
        full = _wants_full_jobs(request)
        # Decoded as plain jobs first (four fields a job), and as a full
        # Batch only if one is not; a Prefer: return=representation needs
        # every job whole, which only the full path makes.
        batch = decode(raw, Batch) if full else decode_batch(raw)
        jobs = batch.jobs
        check_batch_size(len(jobs), self._max_array)
        # Every job of the batch (an array's members too) carries its id.
        batch_id = self._dispatcher.ids.new()
        if not isinstance(batch, Batch):
            plain = await self._plain_jobs(jobs)
            if plain is not None:
                return await self._store(
                    request, raw, attrs.evolve(plain, batch_id=batch_id), single=False,
                    full=False, jobs=len(plain.work), field="jobs", batch_id=batch_id,
                )
            # A plain job that a check refused: the full path names it.
            jobs = decode(raw, Batch).jobs
        submissions = []
        for i, item in enumerate(jobs):
            if i and not i % BATCH_SLICE:
                # A large batch is checked a slice at a time, letting other
                # requests and timers run in between: checking 10,000 jobs
                # at once would hold the reactor for a tenth of a second.
                await deferLater(self._reactor, 0)
            submission = self._submission(item, f"jobs[{i}].", i)
            submissions.append(
                attrs.evolve(submission, spec=attrs.evolve(submission.spec, batch_id=batch_id))
            )
        total = sum(s.array or 1 for s in submissions)
        if total > self._max_array:
            raise ApiError(
                400,
                "invalid_field",
                f"jobs: the batch makes {total} jobs, more than {self._max_array} "
                "([dispatcher] max_array)",
                "jobs",
            )
        if self._max_stored_bytes is not None:
            check_stored_bytes(submissions, self._max_stored_bytes)
        return await self._store(
            request, raw, submissions, single=False, full=full, jobs=total, field="jobs",
            batch_id=batch_id,
        )

    async def _plain_jobs(self, jobs: list[Any]) -> Optional[PlainJobs]:
        """
        The batch as L{PlainJobs} if every job in it is plain, else C{None}.
        """
        slices = []
        for start in range(0, len(jobs), PLAIN_SLICE):
            if start:
                # As in submit_batch: other requests and timers get a turn.
                await deferLater(self._reactor, 0)
            plain = plain_jobs(
                jobs[start:start + PLAIN_SLICE], self._tasks, self._queues["default"]
            )
            if plain is None:
                return None
            slices.append(plain)
        if len(slices) == 1:
            return slices[0]
        return attrs.evolve(
            slices[0], work=[job for plain in slices for job in plain.work]
        )

    async def retry(self, request: Any, job_id: str) -> Answer:
        dependents = False
        if request.content.read(1):
            request.content.seek(0)
            dependents = decode(_json_body(request), RetryRequest).dependents
        limits = self._rates.limits(request.principal)
        try:
            job = await _transition(
                job_id,
                self._dispatcher.retry(
                    job_id, dependents, _own_only(request.principal), limits.max_jobs
                ),
                "{state}; only a failed or cancelled job can be retried",
            )
        except DependencyNotRetried as e:
            raise ApiError(409, "conflict", str(e), "id")
        except TooManyUnfinished as e:
            raise too_many_unfinished(e, "id")
        log.info("{principal} retried {job_id}", principal=request.principal.name,
                 job_id=job_id)
        return Answer(200, job_view(job))

    async def list_workers(self, request: Any) -> Answer:
        hub = self._dispatcher.hub
        described = hub.describe()
        mine = _own_only(request.principal)
        if mine is not None:
            # The ids of another's jobs would show that they exist: a
            # worker shows such a principal the jobs it holds of its own.
            held = [job_id for worker in described for job_id in worker.running]
            own = await self._dispatcher.store.owned(held, mine) if held else frozenset()
            described = [
                attrs.evolve(w, running=tuple(j for j in w.running if j in own))
                for w in described
            ]
        workers = [worker_view(w) for w in described]
        return Answer(200, WorkerList(workers, hub.lease_seconds, hub.heartbeat_seconds))

    async def lease(self, request: Any) -> Answer:
        assert self._workers is not None
        return Answer(*await self._workers.lease(request, _json_body(request)))

    async def heartbeat(self, request: Any) -> Answer:
        assert self._workers is not None
        return Answer(*await self._workers.heartbeat(request, _json_body(request)))

    async def report_results(self, request: Any) -> Answer:
        assert self._workers is not None
        return Answer(*await self._workers.results(request, _json_body(request)))

    async def write_log(self, request: Any) -> Answer:
        assert self._workers is not None
        query = {
            name: _query(request, name) for name in ("job_id", "token", "stream", "offset")
        }
        return Answer(*await self._workers.write_log(request, query))

    async def list_queues(self, request: Any) -> Answer:
        owner = _own_only(request.principal)
        return Answer(200, QueueList(await self._dispatcher.queues(owner)))

    async def _job(self, request: Any, job_id: str) -> Any:
        """
        The job C{job_id}, if the request's principal may see it; a 404
        for another owner's job, as for a missing one.
        """
        try:
            job = await self._dispatcher.get(job_id)
        except UnknownJob:
            raise _no_such_job(job_id)
        if not request.principal.owns(job.owner):
            raise _no_such_job(job_id)
        return job

    async def get_job(self, request: Any, job_id: str) -> Answer:
        wait = _wait(request)
        job = await self._job(request, job_id)
        if wait is not None and not job.state.final:
            try:
                job = await self._dispatcher.wait_for_job(job_id, wait)
            except UnknownJob:
                # Removed while waited for (DELETE, retention).
                raise _no_such_job(job_id)
        return Answer(200, job_view(job))

    async def list_jobs(self, request: Any) -> Answer:
        states = []
        for raw in request.args.get(b"state", []):
            text = raw.decode("utf-8", "replace")
            try:
                states.append(JobState(text))
            except ValueError:
                allowed = ", ".join(s.value for s in JobState)
                raise ApiError(
                    400, "invalid_query", f"state: {text!r} is not one of {allowed}", "state"
                )
        if len(states) > MAX_STATE_FILTERS:
            raise ApiError(
                400, "invalid_query",
                f"state: given {len(states)} times; at most {MAX_STATE_FILTERS}", "state",
            )
        labels = parse_labels(request)
        limit = DEFAULT_LIST_LIMIT
        text = _query(request, "limit")
        if text is not None:
            limit = query_integer(text, "limit", 1, MAX_LIST_LIMIT)
        cursor = None
        text = _query(request, "cursor")
        if text is not None:
            cursor = query_integer(
                text, "cursor", 0, MAX_CURSOR, "not a cursor this server gave out"
            )
        owner = _query(request, "owner")
        if owner is not None and not valid_name(owner):
            raise ApiError(
                400, "invalid_query", f"owner: expected a principal's name: {PRINCIPAL_NAME_RULE}",
                "owner",
            )
        filters = {
            name: _bounded_query(request, name, 0 if name == "name" else 1)
            for name in ("array", "batch", "name", "queue", "worker")
        }
        order = _query_or(request, "order", "oldest")
        if order not in ("oldest", "newest"):
            raise ApiError(
                400, "invalid_query", "order: expected oldest or newest", "order"
            )
        mine = _own_only(request.principal)
        if mine is not None:
            if owner is not None and owner != mine:
                # Another's jobs: none it may see.
                return Answer(200, JobPage([], None))
            owner = mine
        jobs, next_cursor = await self._dispatcher.list_jobs(
            states=states, labels=labels, limit=limit, cursor=cursor, owner=owner,
            created_after=_query_time(request, "created_after"),
            created_before=_query_time(request, "created_before"),
            newest=order == "newest", **filters,
        )
        return Answer(
            200,
            JobPage(
                [job_view(job) for job in jobs],
                None if next_cursor is None else str(next_cursor),
            ),
        )

    # Arrays and batches

    async def _group(self, request: Any, kind: GroupKind, group_id: str) -> Any:
        """
        The group C{group_id}, if the request's principal may see it; a 404
        for another owner's group, as for a missing one.
        """
        try:
            group = await self._dispatcher.group(kind, group_id)
        except UnknownGroup as e:
            raise _no_such_group(e)
        if not request.principal.owns(group.owner):
            raise _no_such_group(UnknownGroup(kind, group_id))
        return group

    async def _get_group(self, request: Any, kind: GroupKind, group_id: str) -> Answer:
        wait = _wait(request)
        group = await self._group(request, kind, group_id)
        if wait is not None and not group.final:
            try:
                group = await self._dispatcher.wait_for_group(kind, group_id, wait)
            except UnknownGroup as e:
                raise _no_such_group(e)
        return Answer(200, group_view(group))

    async def _cancel_group(self, request: Any, kind: GroupKind, group_id: str) -> Answer:
        try:
            group, done = await self._dispatcher.cancel_group(
                kind, group_id, _own_only(request.principal)
            )
        except UnknownGroup as e:
            raise _no_such_group(e)
        except NothingToChange as e:
            raise ApiError(409, "conflict", str(e), "id")
        log.info("{principal} cancelled {kind} {group_id}", principal=request.principal.name,
                 kind=kind.value, group_id=group_id)
        return Answer(200 if done else 202, group_view(group))

    async def _retry_group(self, request: Any, kind: GroupKind, group_id: str) -> Answer:
        limits = self._rates.limits(request.principal)
        try:
            group = await self._dispatcher.retry_group(
                kind, group_id, _own_only(request.principal), limits.max_jobs
            )
        except UnknownGroup as e:
            raise _no_such_group(e)
        except (NothingToChange, DependencyNotRetried) as e:
            raise ApiError(409, "conflict", str(e), "id")
        except TooManyUnfinished as e:
            raise too_many_unfinished(e, "id")
        log.info("{principal} retried {kind} {group_id}", principal=request.principal.name,
                 kind=kind.value, group_id=group_id)
        return Answer(200, group_view(group))

    def get_array(self, request: Any, array_id: str) -> Awaitable[Answer]:
        return self._get_group(request, GroupKind.ARRAY, array_id)

    def cancel_array(self, request: Any, array_id: str) -> Awaitable[Answer]:
        return self._cancel_group(request, GroupKind.ARRAY, array_id)

    def retry_array(self, request: Any, array_id: str) -> Awaitable[Answer]:
        return self._retry_group(request, GroupKind.ARRAY, array_id)

    def get_batch(self, request: Any, batch_id: str) -> Awaitable[Answer]:
        return self._get_group(request, GroupKind.BATCH, batch_id)

    def cancel_batch(self, request: Any, batch_id: str) -> Awaitable[Answer]:
        return self._cancel_group(request, GroupKind.BATCH, batch_id)

    def retry_batch(self, request: Any, batch_id: str) -> Awaitable[Answer]:
        return self._retry_group(request, GroupKind.BATCH, batch_id)

    async def cancel(self, request: Any, job_id: str) -> Answer:
        job, done = await _transition(
            job_id,
            self._dispatcher.cancel(job_id, _own_only(request.principal)),
            "already {state}; only a job that has not finished can be cancelled",
        )
        log.info("{principal} cancelled {job_id}", principal=request.principal.name,
                 job_id=job_id)
        return Answer(200 if done else 202, job_view(job))

    async def delete_job(self, request: Any, job_id: str) -> Answer:
        try:
            await self._dispatcher.remove(job_id, _own_only(request.principal))
        except UnknownJob:
            raise _no_such_job(job_id)
        except (NotFinished, HasDependents) as e:
            raise ApiError(409, "conflict", str(e), "id")
        log.info("{principal} deleted {job_id}", principal=request.principal.name,
                 job_id=job_id)
        return Answer(204, b"")

    async def stream_events(self, request: Any) -> EventStreamAnswer:
        filter, after = parse_event_query(request)
        self.events.check_room()
        return EventStreamAnswer(self.events, filter, after)

    async def read_log(self, request: Any, job_id: str) -> Answer:
        stream = _query_or(request, "stream", "stdout")
        if stream not in ("stdout", "stderr"):
            raise ApiError(
                400, "invalid_query", "stream: expected stdout or stderr", "stream"
            )
        offset = query_integer(
            _query_or(request, "offset", "0"), "offset", 0, MAX_OFFSET,
            f"expected a byte offset from 0 to {MAX_OFFSET}",
        )
        number = _query(request, "attempt")
        attempt = None if number is None else query_integer(
            number, "attempt", 1, MAX_ATTEMPT_NUMBER,
            f"expected an attempt's number from 1 to {MAX_ATTEMPT_NUMBER}",
        )
        follow = _query_or(request, "follow", "false")
        if follow not in ("true", "false"):
            raise ApiError(400, "invalid_query", "follow: expected true or false", "follow")
        if follow == "true":
            # Refused before the job is read: a bound that costs nothing.
            self._followers.check_room(request.principal.name)
        job = await self._job(request, job_id)
        if attempt is not None and not any(a.number == attempt for a in job.attempts):
            numbers = ", ".join(str(a.number) for a in job.attempts) or "none yet"
            raise ApiError(
                404, "not_found",
                f"attempt: job {job_id} has no attempt {attempt} (its attempts: {numbers})",
                "attempt",
            )
        if follow == "true":
            return FollowAnswer(job, attempt, stream, offset)
        if attempt is None and job.attempts:
            attempt = job.attempts[-1].number
        size = 0
        path = None
        if attempt is not None:
            path = self._followers.log_path(job.id, attempt, stream)
            size = await deferToThreadPool(
                self._reactor, self._io_pool, file_size, path
            )
        return FileAnswer(path, offset, max(0, size - offset))


def _audit_submit(request: Any, ids: list[str], replayed: bool) -> None:
    """
    One info line per submission, naming its principal and its jobs (the
    first and how many, for a batch or an array): one line a request, not
    one a job, since a batch of ten thousand would cost the reactor half a
    second in lines that say nothing more.  Its fields: C{owner} (the
    principal, who owns the jobs), C{job_id} for one job, C{first_job_id}
    and C{last_job_id} for many.
    """
    if not ids:
        return
    one = len(ids) == 1
    log.info(
        "{principal} submitted {what}{replay}",
        principal=request.principal.name,
        what=ids[0] if one else f"{len(ids)} jobs ({ids[0]}...{ids[-1]})",
        replay=" (a replay: nothing new)" if replayed else "",
        job_ids=ids if one else None,
        count=len(ids),
        owner=request.principal.name,
        job_id=ids[0] if one else None,
        first_job_id=None if one else ids[0],
        last_job_id=None if one else ids[-1],
    )


def _credential_view(credential: Any) -> CredentialView:
    principal = credential.principal
    names = principal.worker_names
    return CredentialView(
        principal.name,
        principal.role,
        None if names is None else sorted(names),
        format_time(credential.created),
    )


# The routes that answer without the store (its database may be away):
# every other answers 503 store_unavailable while it is (/healthz too, so
# that a load balancer sends requests to another dispatcher).
WITHOUT_STORE = frozenset({
    "openapi", "read_metrics", "who_am_i", "list_credentials", "create_credential",
    "revoke_credential", "dashboard_page", "dashboard_file", "log_in", "session",
    "log_out", "list_workers",
})

# Seconds a client is told to wait before it asks again while the store's
# database is away.
STORE_RETRY_AFTER = 5


def store_unavailable(why: str) -> ApiError:
    """
    The answer to a request that needs the store while its database cannot
    be reached: C{503 store_unavailable}, with C{Retry-After}.
    """
    error = ApiError(
        503,
        "store_unavailable",
        f"this dispatcher cannot reach its store ({why}); nothing was done; try "
        f"again in {STORE_RETRY_AFTER} s, or at another dispatcher of the same database",
        None,
        {"retry_after": STORE_RETRY_AFTER},
    )
    error.headers = {b"retry-after": str(STORE_RETRY_AFTER).encode("ascii")}
    return error


def _insufficient_storage(error: str) -> ApiError:
    return ApiError(
        507,
        "insufficient_storage",
        f"the dispatcher's disk took no more ({error}); nothing was stored; "
        "try again once it has room",
    )


def _no_such_job(job_id: str) -> ApiError:
    return ApiError(404, "not_found", f"no job has the id {job_id!r}", "id")


def _no_such_group(error: UnknownGroup) -> ApiError:
    return ApiError(404, "not_found", str(error), "id")


# A number as a query string may write it (wait=2, wait=0.5, wait=1e-3).
_NUMBER = re.compile(r"^(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?$")
# Seconds since 1970 as a time filter may give them.
_EPOCH = re.compile(r"^[0-9]{1,12}(?:\.[0-9]{1,6})?$")
_ZONED = re.compile(ZONED_TIME)
# The latest time ZONED_TIME allows: the end of 9998.
_LAST_TIME = datetime.datetime(9999, 1, 1, tzinfo=datetime.timezone.utc).timestamp()


def _wait(request: Any) -> Optional[float]:
    """
    The seconds of C{?wait=}, or C{None}: a number more than 0 and at most
    L{MAX_CLIENT_WAIT}.
    """
    text = _query(request, "wait")
    if text is None:
        return None
    seconds = float(text) if _NUMBER.match(text) else math.nan
    if not 0 < seconds <= MAX_CLIENT_WAIT:
        raise ApiError(
            400, "invalid_query",
            f"wait: expected seconds, a number more than 0 and at most {MAX_CLIENT_WAIT:g}",
            "wait",
        )
    return seconds


def _bounded_query(request: Any, name: str, shortest: int) -> Optional[str]:
    """
    The query parameter C{name}, of C{shortest} to L{MAX_NAME} characters
    without NUL, or C{None}.
    """
    text = _query(request, name)
    if text is not None and (not shortest <= len(text) <= MAX_NAME or "\x00" in text):
        raise ApiError(
            400, "invalid_query",
            f"{name}: expected {shortest} to {MAX_NAME} characters, no NUL", name,
        )
    return text


def _query_or(request: Any, name: str, default: str) -> str:
    """
    The one value of the query parameter C{name}, or C{default} when it is
    not given: given empty (C{?stream=}) it is that empty value, which the
    caller refuses as the value it is, not taken for the default.
    """
    value = _query(request, name)
    return default if value is None else value


def _query_time(request: Any, name: str) -> Optional[float]:
    """
    The time of the query parameter C{name} (RFC 3339 with its zone, or
    seconds since 1970), as seconds, or C{None}.
    """
    text = _query(request, name)
    if text is None:
        return None
    if _EPOCH.match(text):
        seconds = float(text)
        if seconds < _LAST_TIME:
            return seconds
    elif _ZONED.match(text):
        try:
            return datetime.datetime.fromisoformat(
                text.replace("z", "Z").replace("t", "T").replace(" ", "T")
            ).timestamp()
        except ValueError:
            pass
    raise ApiError(
        400, "invalid_query",
        f"{name}: expected an RFC 3339 time with its zone, such as 2026-11-25T13:00:00Z, "
        "or seconds since 1970 (to 9998)",
        name,
    )


async def _transition(job_id: str, change: Awaitable[Any], refusal: str) -> Any:
    """
    What C{change}, a transition of job C{job_id}, gives: a 404 if there is
    no such job, a 409 if the job's state does not allow it, saying
    C{refusal} with the job's C{{state}}.
    """
    try:
        return await change
    except UnknownJob:
        raise _no_such_job(job_id)
    except InvalidTransition as e:
        raise ApiError(
            409, "conflict", f"job {job_id} is {refusal.format(state=e.source.value)}", "id"
        )
