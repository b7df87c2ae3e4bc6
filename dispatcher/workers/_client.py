"""
The worker's client of the worker protocol (docs/worker-protocol.md): one
method per endpoint, the request and the answer each a wire type of
L{dispatcher.wire._types}, every failure one of the L{DispatcherError}s.

A worker may be given several dispatchers (on one PostgreSQL database):
it talks to one at a time, and moves to the next when the one it talks to
does not answer (L{DispatcherClient.urls}).
"""

from __future__ import annotations

from typing import Any, Optional, TypeVar

import msgspec
from hyperlink import DecodedURL
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.logger import Logger
from twisted.python.failure import Failure

from dispatcher.wire._json import encode
from dispatcher.wire._types import (
    Error,
    HeartbeatAnswer,
    HeartbeatItem,
    HeartbeatRequest,
    LeaseAnswer,
    LeaseHeld,
    LeaseRequest,
    LogWritten,
    ResultItem,
    ResultsAnswer,
    ResultsRequest,
    WorkerOffer,
)

# Seconds the dispatcher may hold a lease request open (the protocol's
# default), and how much longer the worker waits for its answer before it
# takes the connection for dead.
POLL_WAIT_SECONDS = 30.0
POLL_MARGIN_SECONDS = 15.0

# Seconds any other request may take.
REQUEST_TIMEOUT_SECONDS = 30.0

Answer = TypeVar("Answer")

log = Logger()


class DispatcherError(Exception):
    """
    A request to the dispatcher did not get a usable answer.
    """


class DispatcherUnavailable(DispatcherError):
    """
    The dispatcher could not be reached, timed out, answered with a server
    error (it may be restarting), or answered with a body the protocol does
    not allow: try again later.
    """


class DispatcherRefused(DispatcherError):
    """
    The dispatcher refused the request itself (a 4xx other than the
    protocol's per-lease answers): a wrong token, workers disabled, or a
    request this worker should not have made.

    @ivar status: the HTTP status.
    @ivar code: the error's C{code}, or C{None}.
    @ivar field: the field the error names, or C{None}.
    """

    def __init__(
        self, status: int, code: Optional[str], message: str, field: Optional[str] = None
    ) -> None:
        super().__init__(f"{status} {code or ''}: {message}".replace(" :", ":"))
        self.status = status
        self.code = code
        self.field = field


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


# The decoders of every answer the worker reads, built once.
_answers: dict[type, msgspec.json.Decoder] = {
    kind: msgspec.json.Decoder(kind)
    for kind in (LeaseAnswer, HeartbeatAnswer, ResultsAnswer, LogWritten, Error)
}


class DispatcherClient:
    """
    The worker's side of the HTTP protocol: one method per endpoint, each
    firing with the endpoint's answer as its wire type, every failure one
    of the L{DispatcherError}s.

    With several base URLs (dispatchers sharing one database), every
    request goes to the current one; a request to it that finds it
    unavailable (L{DispatcherUnavailable}: refused or broken connections,
    no answer in time, a server error such as C{503 store_unavailable})
    makes the next one current, in turn, for the requests after it.  The
    failure is the caller's as before (it retries after its back-off), and
    the leases the worker holds go on: the dispatcher it moves to takes
    them up from the shared store.

    @param http: a C{treq.client.HTTPClient} (or C{treq.testing.StubTreq}).
    @param url: the dispatcher's base URL, such as C{http://host:8080}.
    @param token: the bearer token of C{[workers] token_file}.
    @param clock: the C{IReactorTime} that times requests out.
    @param other_urls: the base URLs of other dispatchers on the same
        database, tried in turn after C{url}.
    @ivar moves: how many times the worker moved to another dispatcher.
    """

    def __init__(
        self, http: Any, url: str, token: str, clock: Any, other_urls: tuple[str, ...] = ()
    ) -> None:
        self._http = http
        self._bases = [DecodedURL.from_text(u) for u in (url, *other_urls)]
        self._current = 0
        self._token = token
        self._clock = clock
        self.moves = 0

    @property
    def urls(self) -> list[str]:
        """
        Every base URL, the current one first.
        """
        n = len(self._bases)
        return [self._bases[(self._current + i) % n].to_text() for i in range(n)]

    def _unavailable(self, used: int, why: DispatcherUnavailable) -> None:
        """
        A request to the base URL C{used} found its dispatcher unavailable:
        move to the next one, unless another request moved already.
        """
        if len(self._bases) < 2 or used != self._current:
            return
        self._current = (used + 1) % len(self._bases)
        self.moves += 1
        log.warn(
            "the dispatcher at {left} is unavailable ({why}); moving to {url} "
            "(running jobs go on)",
            left=self._bases[used].to_text(),
            why=str(why),
            url=self._bases[self._current].to_text(),
        )

    def url(self, *segments: str) -> DecodedURL:
        """
        The URL of an endpoint under the current base URL (which may have
        a path of its own, behind a proxy).
        """
        base = self._bases[self._current]
        if base.path and base.path[-1] == "":
            base = base.replace(path=base.path[:-1])
        return base.child(*segments)

    def lease(
        self,
        worker: WorkerOffer,
        max_jobs: int,
        wait: float,
        held: Optional[list[LeaseHeld]] = None,
    ) -> Deferred:
        """
        Ask for up to C{max_jobs} leases, letting the dispatcher hold the
        request up to C{wait} seconds, listing the leases the worker holds
        (C{held}; C{None} sends no list).  Fires with the L{LeaseAnswer}.
        """
        body = LeaseRequest(worker, max_jobs, wait, msgspec.UNSET if held is None else held)
        return self._exchange(
            self.url("v1", "leases"), body, LeaseAnswer, wait + POLL_MARGIN_SECONDS, ()
        )

    def heartbeat(
        self,
        worker: WorkerOffer,
        items: list[HeartbeatItem],
        timeout: float = REQUEST_TIMEOUT_SECONDS,
    ) -> Deferred:
        """
        Renew leases; fires with the L{HeartbeatAnswer}, whose C{leases} say
        for each item whether it is still current, or fails with
        L{DispatcherUnavailable} after C{timeout} seconds without one.
        """
        return self._per_lease(
            "heartbeat", HeartbeatRequest(worker, items), HeartbeatAnswer, timeout
        )

    def report(
        self,
        worker: WorkerOffer,
        results: list[ResultItem],
        max_jobs: Optional[int] = None,
        held: Optional[list[LeaseHeld]] = None,
    ) -> Deferred:
        """
        Report how attempts ended, and with C{max_jobs} ask for up to that
        many leases in the same request, listing the leases the worker holds
        (C{held}); fires with the L{ResultsAnswer}, whose C{results} say for
        each item whether it was recorded, and whose C{leases} are those
        granted.
        """
        body = ResultsRequest(
            worker,
            results,
            msgspec.UNSET if max_jobs is None else max_jobs,
            msgspec.UNSET if max_jobs is None or held is None else held,
        )
        return self._per_lease("results", body, ResultsAnswer)

    def append_log(
        self, job_id: str, token: str, stream: str, offset: int, data: bytes
    ) -> Deferred:
        """
        Write C{data} at C{offset} of one stream of an attempt's log, under
        the lease's C{token} as the dispatcher gave it.  Fires
        with the stream's size afterwards; fails with L{LogOffsetMismatch}
        or L{LeaseGone}.
        """
        url = (
            self.url("v1", "leases", "log")
            .add("job_id", job_id)
            .add("token", token)
            .add("stream", stream)
            .add("offset", str(offset))
        )

        async def send() -> int:
            status, content = await self._post(url, data, "application/octet-stream")
            if status == 200:
                written: LogWritten = _read(status, content, LogWritten)
                return written.size
            error = _error_of(content)
            if status == 400 and error is not None:
                if error.size is not msgspec.UNSET:
                    raise LogOffsetMismatch(error.size)
                if error.field == "offset" and offset > 0:
                    # Refused for its offset, without saying what it has:
                    # from the start is always a place to write.
                    raise LogOffsetMismatch(0)
            raise _error_for(status, error)

        return self._timed(send(), REQUEST_TIMEOUT_SECONDS)

    def _per_lease(
        self,
        endpoint: str,
        body: Any,
        answer: type[Answer],
        timeout: float = REQUEST_TIMEOUT_SECONDS,
    ) -> Deferred:
        """
        POST C{body} to an endpoint that answers lease by lease, where a
        409 (every lease refused) is an answer too.
        """
        return self._exchange(
            self.url("v1", "leases", endpoint), body, answer, timeout, (409,)
        )

    def _exchange(
        self,
        url: DecodedURL,
        body: Any,
        answer: type[Answer],
        timeout: float,
        also_ok: tuple[int, ...],
    ) -> Deferred:
        """
        POST C{body} as JSON and fire with the answer as C{answer}: a 200
        must be one; a status of C{also_ok} is one if it reads as one (a
        409 whose every lease was refused), and an error otherwise.
        """

        async def send() -> Answer:
            status, content = await self._post(url, encode(body), "application/json")
            if status == 200:
                return _read(status, content, answer)
            if status in also_ok:
                try:
                    return _answers[answer].decode(content)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    pass
            raise _error_for(status, _error_of(content))

        return self._timed(send(), timeout)

    def _timed(self, coroutine: Any, timeout: float) -> Deferred:
        # (Every request's URL was made from the current base when it was
        # asked for, just before this.)
        used = self._current
        d = Deferred.fromCoroutine(coroutine)
        d.addTimeout(timeout, self._clock)

        def timed_out(failure: Failure) -> None:
            failure.trap(DeferredTimeout)
            raise DispatcherUnavailable(f"no answer within {timeout:g} s")

        def unavailable(failure: Failure) -> Failure:
            if failure.check(DispatcherUnavailable):
                self._unavailable(used, failure.value)
            return failure

        return d.addErrback(timed_out).addErrback(unavailable)

    async def _post(self, url: DecodedURL, data: bytes, content_type: str) -> tuple[int, bytes]:
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
        return response.code, content


def _read(status: int, content: bytes, answer: type[Answer]) -> Answer:
    """
    C{content} as the wire type C{answer}; a body the protocol does not
    allow there is the dispatcher's fault, as a server error is.
    """
    try:
        return _answers[answer].decode(content)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise DispatcherUnavailable(
            f"the dispatcher answered {status} with a body that is not a "
            f"{answer.__name__}: {e}"
        ) from e


def _error_of(content: bytes) -> Optional[Any]:
    """
    The L{ErrorDetail} of an error answer, or C{None} if C{content} is not
    one (a proxy's page, say).
    """
    try:
        return _answers[Error].decode(content).error
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def _error_for(status: int, error: Optional[Any]) -> DispatcherError:
    if status >= 500 or error is None and status not in (401, 403):
        return DispatcherUnavailable(
            f"the dispatcher answered {status}"
            + (
                f" ({error.code}: {error.message})"
                if error is not None
                else " without an error body"
            )
        )
    message = error.message if error is not None else None
    if status == 409:
        return LeaseGone(message or "the lease is no longer current")
    return DispatcherRefused(
        status,
        error.code if error else None,
        message or "no message",
        error.field if error else None,
    )


# What a worker that does not trust the dispatcher's certificate is told to
# do about it.
_UNTRUSTED_HINT = (
    "give the CA that signed it (or the self-signed certificate) with "
    "--ca-file, or install it in the system's trusted CAs"
)


def _describe_reason(reason: Failure) -> str:
    """
    One reason a request failed, in words; a TLS certificate the worker does
    not trust says so and what to do, where OpenSSL says only C{certificate
    verify failed}.
    """
    if reason.check(VerificationError):
        return (
            f"the dispatcher's TLS certificate was not trusted: it does not name "
            f"the URL's host ({reason.getErrorMessage()})"
        )
    if reason.check(SSL.Error) and "certificate verify failed" in str(reason.value):
        return (
            f"the dispatcher's TLS certificate was not trusted (certificate "
            f"verify failed); {_UNTRUSTED_HINT}"
        )
    return reason.getErrorMessage()


def _describe(e: Exception) -> str:
    reasons = getattr(e, "reasons", None)
    if reasons:
        return "; ".join(_describe_reason(r) for r in reasons)
    return str(e) or type(e).__name__
