"""
The HTTP endpoints remote workers call (docs/worker-protocol.md); who may
call them is the head check's (L{dispatcher.api._auth}), under which names
is decided here.

They are handlers of L{DispatcherAPI}, which routes to them; what they
decide is the L{WorkerHub}'s, which answers with model values
(L{LeaseVerdict}s); these handlers turn them into the protocol's wire
types and choose the HTTP status.

What is theirs: a worker credential acts only under its own worker names
(C{403} otherwise, before anything changes), a log chunk is written only
for a credential that may act as the lease's holder, and the lease tokens
on the wire are sealed and opened here (L{LeaseTokens}): the hub and the
store see only the fencing counters inside.
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable, Mapping, Optional

from msgspec import UNSET
from twisted.internet.threads import deferToThreadPool

from twisted.logger import Logger

from dispatcher._deferreds import shielded
from dispatcher._throttle import Throttle
from dispatcher.model._jobs import (
    LOG_STREAMS,
    JobState,
    Offer,
    Outcome,
    Resources,
    log_cut_marker,
)
from dispatcher.model._limits import MAX_RESULT_BYTES
from dispatcher.model._principals import Principal, Role
from dispatcher.model._values import UnservableValue, storable
from dispatcher.model._workers import LeaseEnd, LeaseVerdict, TooManyWorkerNames
from dispatcher.wire._forms import REFUSALS, lease_grant, lease_status, limits_of
from dispatcher.wire._json import encode
from dispatcher.wire._submission import ApiError, decode, invalid
from dispatcher.wire._tokens import LeaseTokens
from dispatcher.wire._types import (
    LEASE_TOKEN,
    MAX_NAME,
    MAX_OFFSET,
    HeartbeatAnswer,
    HeartbeatRequest,
    LeaseAnswer,
    LeaseRequest,
    LogWritten,
    ResultsAnswer,
    ResultsRequest,
    WorkerOffer,
)

log = Logger()

STREAMS = LOG_STREAMS

# The principal of a request no authentication named (a handler called
# without the API's head check): as the [workers] token_file token's, any
# worker name.
SHARED_WORKERS = Principal("workers-token-file", Role.WORKER)

_LEASE_TOKEN = re.compile(LEASE_TOKEN)


def principal_of(request: Any) -> Principal:
    """
    Who sent C{request}: the principal the API's authentication set on
    it, or else the shared workers' token's.
    """
    found = getattr(request, "principal", None)
    return SHARED_WORKERS if found is None else found


def _may_act_as(principal: Principal, name: str) -> None:
    """
    Refuse (403, nothing changed) a worker request under a worker name its
    credential may not use.
    """
    if not principal.may_act_as(name):
        raise ApiError(
            403,
            "forbidden",
            f"worker.name: credential {principal.name} may not act as worker "
            f"{name!r}; use one of its own worker names",
            "worker.name",
        )


def _too_many_names(e: TooManyWorkerNames) -> ApiError:
    return ApiError(429, "too_many_worker_names", str(e), "worker.name")


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
        prefetch=0 if worker.prefetch is UNSET else worker.prefetch,
    )


def _max_jobs_expected(offer: Offer) -> str:
    """
    What a request for work's C{max_jobs} may be, for the worker C{offer}.
    """
    if offer.prefetch:
        return (
            f"expected an integer from 1 to {offer.capacity} (worker.slots and "
            "worker.prefetch)"
        )
    return f"expected an integer from 1 to {offer.slots} (worker.slots)"


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
    @param log_path: C{(job_id, attempt, stream) -> path} of a log file.
    @param reactor: for file writes on C{io_pool}.
    @param io_pool: the pool that writes logs.
    @param tokens: seals the leases' tokens and opens those workers send.
    @param max_jobs_per_poll: the most leases one request for work gets.
    @param max_log_bytes: the most bytes of each stream of a remote job's
        log kept here (0: no limit), whatever its worker keeps: the rest
        is dropped with a marker, and its result says the log was cut.
    """

    def __init__(
        self,
        hub: Any,
        log_path: Any,
        open_log: Any,
        reactor: Any,
        io_pool: Any,
        tokens: LeaseTokens,
        max_jobs_per_poll: int = 64,
        max_log_bytes: int = 0,
    ) -> None:
        self._hub = hub
        self._max_log_bytes = max_log_bytes
        self._log_path = log_path
        self._open_log = open_log
        self._reactor = reactor
        self._io_pool = io_pool
        self._tokens = tokens
        self._max_jobs_per_poll = max_jobs_per_poll
        # Log chunks refused to a credential that may not act as the
        # lease's holder: a warning at most once a minute.
        self._foreign_logs = Throttle(reactor)
        # Told (job_id, attempt, stream, size) after each chunk is written:
        # the API's log follows (dispatcher.api._follow) send it at once.
        self.log_written: Optional[Callable[[str, int, str, int], None]] = None

    async def lease(self, request: Any, raw: bytes) -> tuple[int, Any]:
        body = decode(raw, LeaseRequest)
        principal = principal_of(request)
        _may_act_as(principal, body.worker.name)
        offer = offer_of(body.worker)
        max_jobs = offer.slots if body.max_jobs is None else body.max_jobs
        if max_jobs > offer.capacity:
            invalid("max_jobs", _max_jobs_expected(offer))
        # A worker with more free slots asks again as soon as it has these.
        max_jobs = min(max_jobs, self._max_jobs_per_poll)
        received = self._hub.now()
        held = (
            None
            if body.held is UNSET
            else [(h.job_id, self._tokens.open(h.job_id, h.token)) for h in body.held]
        )
        try:
            poll = self._hub.poll(offer, max_jobs, float(body.wait), held, principal.name)
        except TooManyWorkerNames as e:
            raise _too_many_names(e)
        leases = await poll
        return 200, LeaseAnswer(
            [lease_grant(lease, self._tokens.seal(lease.job_id, lease.token)) for lease in leases],
            self._hub.lease_seconds,
            self._hub.heartbeat_seconds,
            self._hub.fence_after(received, [lease.job_id for lease in leases]),
        )

    async def heartbeat(self, request: Any, raw: bytes) -> tuple[int, Any]:
        body = decode(raw, HeartbeatRequest)
        principal = principal_of(request)
        _may_act_as(principal, body.worker.name)
        offer = offer_of(body.worker)
        parsed = [
            (item.job_id, self._tokens.open(item.job_id, item.token), item.running)
            for item in body.leases
        ]
        # A worker that hangs up must not cancel the writes this waits for
        # (a staged job marked running): the lease stopped staging in memory
        # already, and the store must hear it too.
        try:
            beat = self._hub.heartbeat(offer, parsed, principal.name)
        except TooManyWorkerNames as e:
            raise _too_many_names(e)
        verdicts = await shielded(beat)
        return _status(verdicts), HeartbeatAnswer(
            [lease_status(v, item.token) for v, item in zip(verdicts, body.leases)],
            self._hub.lease_seconds,
            self._hub.heartbeat_seconds,
            # Renewed at their receipt, to a full lease_seconds.
            self._hub.fence_seconds,
        )

    async def results(self, request: Any, raw: bytes) -> tuple[int, Any]:
        body = decode(raw, ResultsRequest)
        principal = principal_of(request)
        _may_act_as(principal, body.worker.name)
        offer = offer_of(body.worker)
        asking = body.max_jobs is not UNSET
        if asking and body.max_jobs > offer.capacity:
            invalid("max_jobs", _max_jobs_expected(offer))
        # (held without max_jobs is ignored: only a request for work
        # releases the leases it does not list.)
        held = (
            None
            if body.held is UNSET or not asking
            else [(h.job_id, self._tokens.open(h.job_id, h.token)) for h in body.held]
        )
        received = self._hub.now() if asking else 0.0
        parsed = []
        for i, item in enumerate(body.results):
            token = self._tokens.open(item.job_id, item.token)
            if item.state == "released":
                outcome = None
            else:
                result = item.result
                if result is not None and type(result) in (list, dict):
                    # What the decoding did not check: how deep it nests (a
                    # worker fails a job whose result nests deeper, rather
                    # than report it).
                    try:
                        storable(result, f"results[{i}].result")
                    except UnservableValue as e:
                        invalid(e.where, e.why)
                if result is not None:
                    _check_result_size(result, f"results[{i}].result")
                outcome = Outcome(
                    JobState(item.state), item.exit_code, result, item.error, item.stopped,
                    None if item.limits is UNSET else limits_of(item.limits),
                    () if item.log_cut is UNSET else tuple(dict.fromkeys(item.log_cut)),
                )
            parsed.append((item.job_id, token, outcome))
        # Not cancelled with the request: the hub records each result
        # whatever becomes of this connection (a failed commit is written
        # again, and a lease ends in memory only once its end has
        # committed), and the Deferreds it answers through are its own to
        # fire.  A worker that hung up resends: while the write is under
        # way the resend waits for the same write and is answered as this
        # would have been; once it has committed, the resend is refused as
        # reported.
        try:
            report = self._hub.report(offer, parsed, principal.name)
        except TooManyWorkerNames as e:
            raise _too_many_names(e)
        # Asked for work too: the claim for the slots these results free
        # goes to the store behind them, in the same commit, and the answer
        # is not held open (wait 0) beyond it.
        poll = (
            self._hub.poll(
                offer,
                min(body.max_jobs, self._max_jobs_per_poll),
                0.0,
                held,
                principal.name,
                after_report=True,
            )
            if asking
            else None
        )
        try:
            verdicts = await shielded(report)
        except BaseException:
            if poll is not None:
                # Unanswered: whatever its claim brings goes back unspent.
                poll.cancel()
            raise
        statuses = [lease_status(v, item.token) for v, item in zip(verdicts, body.results)]
        if poll is None:
            return _status(verdicts), ResultsAnswer(statuses)
        leases = await poll
        return 200 if leases else _status(verdicts), ResultsAnswer(
            statuses,
            [lease_grant(lease, self._tokens.seal(lease.job_id, lease.token)) for lease in leases],
            self._hub.lease_seconds,
            self._hub.heartbeat_seconds,
            self._hub.fence_after(received, [lease.job_id for lease in leases]),
        )

    async def write_log(self, request: Any, query: Mapping[str, Optional[str]]) -> tuple[int, Any]:
        job_id = _string(query.get("job_id"), "job_id")
        text = query.get("token") or ""
        if _LEASE_TOKEN.fullmatch(text) is None:
            invalid("token", "not a lease token: send the token as the lease's grant gave it")
        offset = query_integer(query.get("offset"), "offset", 0, MAX_OFFSET)
        stream = query.get("stream")
        if stream not in STREAMS:
            invalid("stream", "expected stdout or stderr")
        # The query names no worker: the token says which lease, and the
        # credential must be one that may act as its holder.
        token = self._tokens.open(job_id, text)
        # (A worker that moved here from another dispatcher on the same
        # database may send a chunk before its first heartbeat here.)
        remote = await self._hub.current_here(job_id, token)
        if remote is None:
            reason = self._hub.refusal(job_id, token)
            raise ApiError(409, "stale_lease", f"token: {REFUSALS[reason]}", "token")
        principal = principal_of(request)
        if not principal.may_act_as(remote.lease.holder):
            count = self._foreign_logs.happened()
            if count is not None:
                log.warn(
                    "{count} log chunks refused: credential {credential} may not act "
                    "as worker {holder}, which holds the lease of job {job_id}",
                    count=count,
                    credential=principal.name,
                    holder=remote.lease.holder,
                    job_id=job_id,
                )
            # Answered as a lease that is not current: the caller learns
            # nothing of whose it is.
            reason = LeaseEnd.SUPERSEDED
            raise ApiError(409, "stale_lease", f"token: {REFUSALS[reason]}", "token")
        path = self._log_path(job_id, remote.lease.attempt, stream)
        data = request.content.read()
        written = await deferToThreadPool(
            self._reactor, self._io_pool, _write_at, path, offset, data, self._open_log,
            self._max_log_bytes,
            log_cut_marker(stream, self._max_log_bytes) if self._max_log_bytes else "",
        )
        size, cut = written if written is not None else (None, False)
        if cut and stream not in remote.log_cut:
            remote.log_cut = remote.log_cut | {stream}
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
        if self.log_written is not None:
            self.log_written(job_id, remote.lease.attempt, stream, size)
        return 200, LogWritten(size)


def query_integer(
    text: Optional[str], name: str, low: int, high: int, words: Optional[str] = None
) -> int:
    """
    The integer a query parameter's C{text} gives: ASCII digits, from
    C{low} to C{high} (a larger one would overflow what it is used as: a
    400, not a 500).

    @raise ApiError: a 400 C{invalid_query} naming it, saying C{words} (by
        default, the range).
    """
    text = text or ""
    # (int() takes "+1", " 1", "1_0" and other scripts' digits, and refuses
    # more than 4,300 digits with a ValueError of its own.)
    if (
        not (text.isascii() and text.isdigit())
        or len(text.lstrip("0")) > len(str(high))
        or not low <= int(text) <= high
    ):
        raise ApiError(
            400, "invalid_query",
            f"{name}: {words or f'expected an integer from {low} to {high}'}", name,
        )
    return int(text)


def _write_at(
    path: str,
    offset: int,
    data: bytes,
    open_log: Callable[[str], int],
    limit: int = 0,
    marker: str = "",
) -> Optional[tuple[int, bool]]:
    """
    Write C{data} at C{offset} of the log file at C{path}, opened (made if
    need be) by C{open_log}, keeping at most C{limit} bytes of the stream
    (0: no limit): what would go past it is dropped, and C{marker} written
    once at the limit, on a line of its own.

    @return: C{(size, cut)}: the stream's size afterwards (counting what
        was dropped, which is what the worker sends from next), and whether
        anything was dropped; or C{None} if C{offset} is past the end.
    """
    fd = open_log(path)
    try:
        size = os.fstat(fd).st_size
        end = offset + len(data)
        if limit and size >= limit and offset >= limit:
            # Cut already: all of this goes past the limit.
            return end, bool(data)
        if offset > size:
            return None
        if limit and end > limit:
            kept = data[: limit - offset]
            if kept:
                os.pwrite(fd, kept, offset)
            # On a line of its own, as the spawner helper writes it.
            line = marker.encode("utf-8")
            if os.pread(fd, 1, limit - 1) != b"\n":
                line = b"\n" + line
            os.pwrite(fd, line, limit)
            return end, True
        if data:
            os.pwrite(fd, data, offset)
        return max(size, end), False
    finally:
        os.close(fd)


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def _check_result_size(value: Any, field: str) -> None:
    """
    Refuse (400, naming C{field}) a task's result a worker reports that is
    over L{MAX_RESULT_BYTES} as JSON: a worker of this version fails such a
    job itself (its executor checks the same limit), so only another
    worker sends one, and nothing of its report is recorded.
    """
    if not isinstance(value, (str, list, dict)):
        # A number, a boolean: a few bytes.
        return
    try:
        size = len(encode(value))
    except ValueError:
        # Not JSON at all: refused before this as not storable (and by
        # the body's decoding), not a question of size.
        return
    if size > MAX_RESULT_BYTES:
        invalid(
            field,
            f"the result is {size} bytes of JSON, more than the {MAX_RESULT_BYTES} "
            "a task's result may be; nothing of this report was recorded",
        )
