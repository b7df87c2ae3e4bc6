"""
The HTTP endpoints remote workers call (docs/worker-protocol.md), and the
bearer-token checks of the whole API.

They are handlers of L{DispatcherAPI}, which routes to them; what they
decide is the L{WorkerHub}'s, which answers with model values
(L{LeaseVerdict}s); these handlers turn them into the protocol's wire
types and choose the HTTP status.
"""

from __future__ import annotations

import hmac
import os
from typing import Any, Mapping, Optional

from msgspec import UNSET
from twisted.internet.threads import deferToThreadPool

from dispatcher._deferreds import shielded
from dispatcher.model._jobs import JobState, Offer, Outcome, Resources
from dispatcher.model._workers import LeaseVerdict
from dispatcher.wire._forms import REFUSALS, lease_grant, lease_status
from dispatcher.wire._submission import ApiError, decode, invalid
from dispatcher.wire._types import (
    MAX_NAME,
    HeartbeatAnswer,
    HeartbeatRequest,
    LeaseAnswer,
    LeaseRequest,
    LogWritten,
    ResultsAnswer,
    ResultsRequest,
    WorkerOffer,
)

STREAMS = ("stdout", "stderr")


def check_token(request: Any, token: Optional[str], what: str) -> None:
    """
    Refuse (401) a request whose C{Authorization: Bearer} token is not
    C{token}; compared in constant time.
    """
    assert token is not None
    raw = request.getHeader(b"authorization") or b""
    scheme, _, given = raw.partition(b" ")
    if scheme.lower() != b"bearer" or not hmac.compare_digest(
        given.strip(), token.encode("utf-8")
    ):
        request.setHeader(b"www-authenticate", b'Bearer realm="dispatcher"')
        raise ApiError(
            401,
            "unauthorized",
            f"send the {what} token as 'Authorization: Bearer <token>'",
            "Authorization",
        )


def _string(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_NAME or "\x00" in value:
        invalid(field, f"expected a string of 1 to {MAX_NAME} characters")
    return value


def offer_of(worker: WorkerOffer) -> Offer:
    """
    The L{Offer} of a worker's description.
    """
    return Offer(
        worker.name,
        worker.slots,
        Resources(float(worker.cpus), worker.memory_mb, worker.gpus),
        worker.labels,
        frozenset(worker.tasks),
        worker.instance,
    )


def _status(verdicts: list[LeaseVerdict]) -> int:
    """
    The HTTP status of a heartbeat's or a report's answer: C{409} when
    every item was refused, C{200} otherwise (and for none).
    """
    if verdicts and not any(v.ok for v in verdicts):
        return 409
    return 200


class WorkerEndpoints:
    """
    The worker endpoints.

    @param hub: the dispatcher's L{WorkerHub}.
    @param token: the workers' bearer token, or C{None} (closed).
    @param log_path: C{(job_id, attempt, stream) -> path} of a log file.
    @param reactor: for file writes on C{io_pool}.
    @param io_pool: the pool that writes logs.
    """

    def __init__(
        self, hub: Any, token: Optional[str], log_path: Any, reactor: Any, io_pool: Any
    ) -> None:
        self._hub = hub
        self._token = token
        self._log_path = log_path
        self._reactor = reactor
        self._io_pool = io_pool

    def authorize(self, request: Any) -> None:
        if self._token is None:
            raise ApiError(
                403,
                "workers_disabled",
                "this dispatcher takes no remote workers; set [workers] token_file",
            )
        check_token(request, self._token, "workers'")

    async def lease(self, request: Any, raw: bytes) -> tuple[int, Any]:
        body = decode(raw, LeaseRequest)
        offer = offer_of(body.worker)
        max_jobs = offer.slots if body.max_jobs is None else body.max_jobs
        if max_jobs > offer.slots:
            invalid("max_jobs", f"expected an integer from 1 to {offer.slots} (worker.slots)")
        received = self._hub.now()
        held = None if body.held is UNSET else [(h.job_id, h.token) for h in body.held]
        leases = await self._hub.poll(offer, max_jobs, float(body.wait), held)
        return 200, LeaseAnswer(
            [lease_grant(lease) for lease in leases],
            self._hub.lease_seconds,
            self._hub.heartbeat_seconds,
            self._hub.fence_after(received, [lease.job_id for lease in leases]),
        )

    async def heartbeat(self, request: Any, raw: bytes) -> tuple[int, Any]:
        body = decode(raw, HeartbeatRequest)
        offer = offer_of(body.worker)
        parsed = [(item.job_id, item.token, item.running) for item in body.leases]
        # A worker that hangs up must not cancel the writes this waits for
        # (a staged job marked running): the lease stopped staging in memory
        # already, and the store must hear it too.
        verdicts = await shielded(self._hub.heartbeat(offer, parsed))
        return _status(verdicts), HeartbeatAnswer(
            [lease_status(v) for v in verdicts],
            self._hub.lease_seconds,
            self._hub.heartbeat_seconds,
            # Renewed at their receipt, to a full lease_seconds.
            self._hub.fence_seconds,
        )

    async def results(self, request: Any, raw: bytes) -> tuple[int, Any]:
        body = decode(raw, ResultsRequest)
        offer = offer_of(body.worker)
        parsed = []
        for item in body.results:
            if item.state == "released":
                outcome = None
            else:
                outcome = Outcome(
                    JobState(item.state), item.exit_code, item.result, item.error, item.stopped
                )
            parsed.append((item.job_id, item.token, outcome))
        # Not cancelled with the request: the hub records each result
        # whatever becomes of this connection (a failed commit is written
        # again, and a lease ends in memory only once its end has
        # committed), and the Deferreds it answers through are its own to
        # fire.  A worker that hung up resends: while the write is under
        # way the resend waits for the same write and is answered as this
        # would have been; once it has committed, the resend is refused as
        # reported.
        verdicts = await shielded(self._hub.report(offer, parsed))
        return _status(verdicts), ResultsAnswer([lease_status(v) for v in verdicts])

    async def write_log(self, request: Any, query: Mapping[str, Optional[str]]) -> tuple[int, Any]:
        job_id = _string(query.get("job_id"), "job_id")
        token = _query_integer(query.get("token"), "token")
        offset = _query_integer(query.get("offset"), "offset", low=0)
        stream = query.get("stream")
        if stream not in STREAMS:
            invalid("stream", "expected stdout or stderr")
        # The query names no worker: the token alone says whose it is.
        remote = self._hub.current(job_id, token)
        if remote is None:
            reason = self._hub.refusal(job_id, token)
            raise ApiError(409, "stale_lease", f"token: {REFUSALS[reason]}", "token")
        path = self._log_path(job_id, remote.lease.attempt, stream)
        data = request.content.read()
        size = await deferToThreadPool(
            self._reactor, self._io_pool, _write_at, path, offset, data
        )
        if size is None:
            have = await deferToThreadPool(self._reactor, self._io_pool, _size, path)
            raise ApiError(
                400,
                "offset_past_end",
                f"offset: {offset} is past the end of the stream ({have} bytes); "
                f"send from {have}",
                "offset",
                {"size": have},
            )
        return 200, LogWritten(size)


def _query_integer(text: Optional[str], name: str, low: int = 1) -> int:
    try:
        value = int(text or "")
    except ValueError:
        invalid(name, f"expected an integer of at least {low}")
    if value < low:
        invalid(name, f"expected an integer of at least {low}")
    return value


def _write_at(path: str, offset: int, data: bytes) -> Optional[int]:
    """
    Write C{data} at C{offset} of the file (made if need be); the size
    afterwards, or C{None} if C{offset} is past the end.
    """
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if offset > size:
            return None
        if data:
            os.pwrite(fd, data, offset)
        return max(size, offset + len(data))
    finally:
        os.close(fd)


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0
