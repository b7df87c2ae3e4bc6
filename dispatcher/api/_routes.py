"""
The API's routes, declared once: method, path, handler, who may call it,
what it takes and what it answers with which status.  The table drives the
routing and the authentication of L{DispatcherAPI} and the paths of the
OpenAPI document (L{dispatcher.api._openapi}).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional
from urllib.parse import unquote_to_bytes

import attrs
import msgspec

from dispatcher.model._jobs import JobState
from dispatcher.model._limits import MAX_DEPENDENCY_LINKS, MAX_LIST_EXAMINED, MAX_RESULT_BYTES
from dispatcher.model._principals import ALLOWED, Access
from dispatcher.wire._types import (
    DEFAULT_LIST_LIMIT,
    MAX_CURSOR,
    MAX_EVENT_ID,
    MAX_IDEMPOTENCY_KEY,
    MAX_CLIENT_WAIT,
    MAX_LABEL_FILTERS,
    MAX_LIST_LIMIT,
    MAX_NAME,
    MAX_STATE_FILTERS,
    NO_NUL,
    ZONED_TIME,
    MAX_NESTING,
    MAX_OFFSET,
    MAX_ATTEMPT_NUMBER,
    LEASE_TOKEN,
    Batch,
    CredentialCreated,
    CredentialList,
    CredentialRequest,
    DroppedEventData,
    Error,
    Health,
    HeartbeatAnswer,
    HeartbeatRequest,
    Identity,
    JobEventData,
    JobGroup,
    JobPage,
    JobSubmission,
    JobSummary,
    JobView,
    LeaseAnswer,
    LeaseRequest,
    LogWritten,
    PrincipalName,
    QueueList,
    ResetEventData,
    ResultsAnswer,
    ResultsRequest,
    RetryRequest,
    LoginRequest,
    SessionView,
    WorkerEventData,
    WorkerList,
)

# Who may call a route (the roles of each: dispatcher.model._principals).
OPEN = Access.OPEN
IDENTIFIED = Access.IDENTIFIED
READ = Access.READ
SUBMIT = Access.SUBMIT
WORK = Access.WORK
ADMINISTER = Access.ADMINISTER
METRICS = Access.METRICS

# A request body of raw bytes rather than JSON.
OCTETS = "application/octet-stream"


@attrs.frozen
class Response:
    """
    One status a route answers: what it means and its body (a wire type,
    a JSON Schema, or C{None} for the L{Error} body), with headers.
    """

    description: str
    body: Any = Error
    content_type: str = "application/json"
    headers: Mapping[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class Route:
    """
    One operation of the API.

    @ivar handler: the name of the L{DispatcherAPI} method that serves it;
        it is called with the request and the path's parameters in order.
    @ivar request: the body's wire type, L{OCTETS}, or C{None} (no body).
    @ivar writes: whether it stores something (a full disk refuses it with
        C{507}).
    """

    method: str
    path: str
    operation_id: str
    handler: str
    summary: str
    auth: str
    responses: Mapping[int, Response]
    request: Any = None
    request_required: bool = True
    parameters: tuple[Mapping[str, Any], ...] = ()
    writes: bool = False

    @property
    def json_post(self) -> bool:
        """
        Whether it is a POST that must say C{Content-Type: application/json},
        with a body or without (all but the worker's log upload, of
        L{OCTETS} under a worker's bearer token, which no form can send).
        """
        return self.method == "POST" and self.request is not OCTETS

    @property
    def query(self) -> dict[str, bool]:
        """
        The query parameters it takes, each with whether it may be given
        more than once (an array, C{explode}: C{label=a&label=b}).  Any
        other is refused, on every route, and so is one of the others
        given twice (L{QUERY_RULES}).
        """
        return {
            p["name"]: bool(p.get("explode")) for p in self.parameters if p["in"] == "query"
        }

    @property
    def segments(self) -> tuple[str, ...]:
        """
        The path's segments; C{{name}} ones are parameters.
        """
        return tuple(self.path.strip("/").split("/"))

    def statuses(self) -> dict[int, Response]:
        """
        Every status the route can answer: its own, and those its body,
        its authentication and the server add.
        """
        out = dict(self.responses)
        if self.request is not None:
            out.setdefault(400, Response("A field is wrong; it is named."))
            out.setdefault(413, Response("The body is over [server] max_body_bytes."))
        if self.json_post:
            out.setdefault(415, Response(NOT_JSON))
        if self.query:
            out.setdefault(
                400, Response(f"A query parameter is wrong; it is named. {QUERY_RULES}")
            )
        else:
            out[400] = _also(out.get(400), NO_QUERY)
        if self.auth is OPEN:
            out.setdefault(413, Response(ANONYMOUS_BODY))
        else:
            out[401] = _unauthorized(UNAUTHORIZED)
            roles = ", ".join(sorted(r.value for r in ALLOWED[self.auth]))
            out[403] = _also(out.get(403), FORBIDDEN.format(roles=roles))
        out[400] = _also(out.get(400), INVALID_HOST)
        out[403] = _also(out.get(403), FORBIDDEN_ORIGIN)
        out.setdefault(503, Response(SHUTTING_DOWN))
        if self.writes:
            out.setdefault(507, Response(INSUFFICIENT_STORAGE))
        out[500] = Response("The dispatcher failed to answer; see its log.")
        return dict(sorted(out.items()))


# The answers every route may give while the daemon stops (or when a
# connection is over a limit), and every route that stores something while
# its disk is full.
SHUTTING_DOWN = (
    "shutting_down: the dispatcher is stopping (SIGTERM; it answers this until "
    "its running jobs are handled, then stops listening); nothing was changed. "
    "Or too_many_connections, before the request is read: the connection was "
    "over [server] max_connections or max_connections_per_address; it is "
    "closed, and Retry-After says when to try again. Or store_unavailable, on "
    "a route that needs the store: the dispatcher cannot reach its PostgreSQL "
    "database; nothing was done; Retry-After says when to try again (or ask "
    "another dispatcher of the same database)."
)
INSUFFICIENT_STORAGE = (
    "insufficient_storage: the dispatcher's disk is full (or failed the write); "
    "nothing was stored. Try again once it has room."
)

# The largest body a request without a credential may carry (the open
# routes read none): a stranger's body is not held past it
# (dispatcher.api._auth, on the request's head).
MAX_ANONYMOUS_BODY_BYTES = 1024
ANONYMOUS_BODY = (
    f"body_too_large: a request without a credential may carry a body of at most "
    f"{MAX_ANONYMOUS_BODY_BYTES} bytes."
)

# The refusals of every route that needs a credential (dispatcher.api._auth),
# answered on the request's head, before its body is read.
UNAUTHORIZED = (
    "unauthorized: no credential came (Authorization: Bearer <token>, or a "
    "UNIX socket's account), or one this dispatcher does not know (revoked, "
    "mistyped). Without a valid credential every path but the open ones is "
    "answered this, an unknown one too."
)
FORBIDDEN = "forbidden: the caller's role may not call this; it needs one of: {roles}."

# The refusals of every route against DNS rebinding and cross-site
# requests (dispatcher.api._hosts), and of every POST but the log upload.
INVALID_HOST = (
    "invalid_host: the Host header is not a name this dispatcher answers to "
    "(the loopback names, the address it listens on, [server] allowed_hosts)."
)
FORBIDDEN_ORIGIN = (
    "forbidden_origin: the Origin header (a browser's page) is not the Host "
    "asked for, nor one of [server] allowed_hosts, or it is null."
)
# The worker protocol's refusals of a worker name (docs/worker-protocol.md).
WORKER_NAME_FORBIDDEN = (
    "forbidden: the credential may not act under worker.name; nothing was changed."
)
TOO_MANY_WORKER_NAMES = (
    "too_many_worker_names: worker.name is new, and its credential (or the "
    "dispatcher in all) has as many worker names connected as it may keep "
    "([workers] max_names_per_credential, max_names); nothing was changed."
)
# A submission or a retry over its owner's quota (dispatcher.api._quotas).
_RETRY_AFTER = {
    "Retry-After": {
        "schema": {"type": "integer", "minimum": 1},
        "description": "Seconds to wait before trying again.",
    }
}
QUOTA_EXCEEDED = Response(
    "The owner's quota ([quota], [quota:role=ROLE], [quota:owner=NAME]); nothing "
    "was stored, a batch or an array refused whole. too_many_jobs: the jobs would "
    "give the owner more unfinished (pending, queued, staging, running) jobs than "
    "max_jobs, each job of the request counted. too_many_submissions: the owner "
    "submits faster than its rate (jobs a second, a burst at once), counted by "
    "this daemon in memory. The field is jobs (a batch), array, body (one job) or "
    "id (a retry).",
    headers=_RETRY_AFTER,
)
RETRY_QUOTA_EXCEEDED = Response(
    "too_many_jobs: the jobs coming back would give the job's owner more "
    "unfinished jobs than its quota's max_jobs; nothing changed (field id).",
    headers=_RETRY_AFTER,
)
# A log follow over [api] max_log_followers (dispatcher.api._follow).
FOLLOWERS_FULL = (
    "the dispatcher serves [api] max_log_followers follows already, or the "
    "credential a quarter of them; Retry-After says when to try again (or read "
    "without follow, with offset)."
)
NOT_JSON = (
    "unsupported_media_type: the request (with a body or without) does not "
    "say Content-Type: application/json."
)


def _also(response: Optional[Response], refusal: str) -> Response:
    """
    C{response} (an L{Error} answer, or none) saying C{refusal} too.
    """
    if response is None:
        return Response(refusal)
    return attrs.evolve(response, description=f"{response.description} Or {refusal}")


# What OpenAPI cannot say of query parameters (it has no way to forbid
# others or a repeat): said in the 400 of every route that takes them, and
# of every route that takes none.
QUERY_RULES = (
    "A parameter not listed for the operation is refused (400 invalid_query), "
    "and so is one given twice, unless it is an array (label, given at most "
    f"{MAX_LABEL_FILTERS} times; state, at most {MAX_STATE_FILTERS})."
)
NO_QUERY = (
    "invalid_query: the operation takes no query parameter; one was given (it is "
    "named)."
)
# A wait past what the dispatcher keeps (dispatcher.core._waits).
TOO_MANY_WAITS = (
    "too_many_waits: as many requests wait (wait=) as the dispatcher keeps at once "
    "([api] max_waits); nothing was waited for. Ask without wait, or again after "
    "Retry-After. Or shutting_down: the dispatcher stops, and a request that "
    "waited is answered so at once (ask again once it is back)."
)
# The rules of a submission the schema describes but cannot express.
_SUBMISSION_400 = (
    "A field is wrong; it is named{where}. Besides what the schema states, "
    "refused: args or kwargs nested more than {nesting} deep; two inputs to one "
    "path, or an input's path that is a directory of another's (inputs[i].path); "
    "arrays whose members would store more than [dispatcher] max_stored_bytes "
    "(array{batch_total}); depends_on that makes the request's jobs depend on more "
    "than {links} jobs in all, an array counting as its members "
    "(depends_on[i], the entry that went past); notify while the dispatcher has no "
    "[webhooks] secret_file (notify), or whose URL names no host or port, or "
    "gives an address the fetch policy refuses (notify.url)"
)


def digits_at_most(high: int) -> str:
    """
    A pattern of the decimal numbers from 0 to C{high} (leading zeros
    allowed), for a query parameter that is an integer in a string: the
    check (L{dispatcher.api._workers.query_integer}) and the schema then
    read one constant.
    """
    top = str(high)
    size = len(top)
    choices = [f"[0-9]{{1,{size - 1}}}"] if size > 1 else []
    for i, digit in enumerate(top):
        if digit != "0":
            rest = f"[0-9]{{{size - i - 1}}}" if i < size - 1 else ""
            choices.append(f"{top[:i]}[0-{int(digit) - 1}]{rest}")
    choices.append(top)
    return f"^0*(?:{'|'.join(choices)})$"


def _unauthorized(description: str) -> Response:
    return Response(
        description, headers={"WWW-Authenticate": {"schema": {"const": 'Bearer realm="dispatcher"'}}}
    )


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


# Schemas of answers that are one of two wire types.
SUBMITTED_JOBS = {
    "type": "object",
    "required": ["jobs"],
    "description": "The jobs, in order: each one's id and state, or each whole "
    "with Prefer: return=representation.",
    "properties": {
        "jobs": {"type": "array", "items": {"anyOf": [_ref("JobSummary"), _ref("JobView")]}},
        "batch_id": {
            "type": "string",
            "description": "POST /v1/jobs/batch only: the batch's id, which each of its "
            "jobs shows as batch_id (GET /v1/batches/{id}); a replay answers the "
            "original's.",
        },
    },
}
_JOB_OR_JOBS = {"oneOf": [_ref("JobView"), _ref("SubmittedJobs")]}

JOB_ID = {
    "name": "id",
    "in": "path",
    "required": True,
    "schema": {"type": "string"},
    "description": "The job's id (a UUIDv7).",
}
# The label= filter of the job list and of the events stream: key=value
# (or key alone), repeated to AND.
LABEL_FILTER = {
    "name": "label",
    "in": "query",
    "description": "key=value (or key: has the label); repeat to AND, "
    f"at most {MAX_LABEL_FILTERS} times.",
    "schema": {"type": "array", "maxItems": MAX_LABEL_FILTERS,
               "items": {"type": "string", "pattern": "^[^=]"}},
    "style": "form",
    "explode": True,
}
PREFER = {
    "name": "Prefer",
    "in": "header",
    "required": False,
    "schema": {"type": "string"},
    "description": "return=representation (RFC 7240): answer every job a request "
    "makes whole, as GET /v1/jobs/{id} shows it, rather than its id, state and "
    "place in its array. A request that makes one job gets it whole anyway.",
}
IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "minLength": 1, "maxLength": MAX_IDEMPOTENCY_KEY,
               "pattern": "^[ -~]*$"},
    "description": "The same key with a JSON-equal body answers 200 with the "
    "original jobs instead of making more; with another body, 409. Kept for "
    "[dispatcher] idempotency_ttl seconds.",
}
_NO_SUCH_JOB = Response(
    "No such job; or another's, to a submitter, which sees its own jobs alone."
)
WAIT = {
    "name": "wait",
    "in": "query",
    "required": False,
    "description": "Seconds to wait (a number, more than 0, at most "
    f"{MAX_CLIENT_WAIT:g}): the answer comes as soon as it is final (every member, "
    "for a group: succeeded, failed or cancelled), or when the time runs out, as it "
    "is then. Without it, at once.",
    "schema": {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_CLIENT_WAIT},
}
_WAITED = Response(f"{SHUTTING_DOWN} Or {TOO_MANY_WAITS}", headers={
    "Retry-After": {"schema": {"type": "integer", "minimum": 1},
                    "description": "Seconds to wait before trying again."},
})


def _group_id(kind: str) -> dict[str, Any]:
    return {
        "name": "id",
        "in": "path",
        "required": True,
        "schema": {"type": "string"},
        "description": f"The {kind}'s id (a UUIDv7; array_id or batch_id of its jobs).",
    }


def _no_such_group(kind: str) -> Response:
    return Response(
        f"No such {kind} (its jobs were all removed, or never were); or another's, "
        "to a submitter, which sees its own jobs alone."
    )


def _group_routes(kind: str, plural: str, name: str) -> tuple[Route, ...]:
    """
    The routes of an array or a batch: read it (waiting, if asked), cancel
    or retry every member it may.
    """
    path = f"/v1/{plural}/{{id}}"
    return (
        Route(
            "GET", path, f"get{name}", f"get_{kind}",
            f"A{'n' if kind == 'array' else ''} {kind}: its members' counts by state, "
            "and whether all are final; with wait, once they are.", READ,
            {200: Response(f"The {kind}.", JobGroup), 404: _no_such_group(kind),
             503: _WAITED},
            parameters=(_group_id(kind), WAIT),
        ),
        Route(
            "POST", f"{path}/cancel", f"cancel{name}", f"cancel_{kind}",
            f"Cancel every unfinished member of the {kind}, in one write: each as a "
            "job's cancel does (a running one's process is killed with its process "
            "group).", SUBMIT,
            {
                200: Response("Every member is cancelled.", JobGroup),
                202: Response("Some ran: they are being stopped.", JobGroup),
                404: _no_such_group(kind),
                409: Response(f"conflict: every member of the {kind} has finished."),
            },
            parameters=(_group_id(kind),),
            writes=True,
        ),
        Route(
            "POST", f"{path}/retry", f"retry{name}", f"retry_{kind}",
            f"Put every failed or cancelled member of the {kind} back in line, in one "
            "write: each as a job's retry does, with a fresh budget of attempts (a "
            "member waiting for another that comes back is pending).", SUBMIT,
            {
                200: Response("The members, queued (or pending).", JobGroup),
                404: _no_such_group(kind),
                409: Response(
                    f"conflict: no member of the {kind} failed or was cancelled; or a "
                    "member depends on a job outside it that must be retried first."
                ),
                429: Response(
                    "too_many_jobs: the members coming back, every one counted, would "
                    "give the owner more unfinished jobs than its quota's max_jobs; "
                    "nothing changed (field id).",
                    headers=_RETRY_AFTER,
                ),
            },
            parameters=(_group_id(kind),),
            writes=True,
        ),
    )


# The filters of GET /v1/jobs beyond state, label and owner (issue 17).
_TIME_QUERY = {
    "anyOf": [
        {"type": "string", "pattern": ZONED_TIME},
        {"type": "string", "pattern": r"^[0-9]{1,12}(?:\.[0-9]{1,6})?$"},
    ],
}
_FILTER_TEXT = {"type": "string", "minLength": 1, "maxLength": MAX_NAME, "pattern": NO_NUL}
LIST_FILTERS: tuple[Mapping[str, Any], ...] = (
    {"name": "array", "in": "query",
     "description": "Only the members of this array (its id).",
     "schema": _FILTER_TEXT},
    {"name": "batch", "in": "query",
     "description": "Only the jobs of this batch (its id).",
     "schema": _FILTER_TEXT},
    {"name": "name", "in": "query", "description": "Only the jobs of this name, exactly.",
     "schema": {**_FILTER_TEXT, "minLength": 0}},
    {"name": "queue", "in": "query", "description": "Only the jobs of this queue.",
     "schema": _FILTER_TEXT},
    {"name": "worker", "in": "query",
     "description": "Only the jobs whose latest attempt this holder (a worker's name, "
     "or this dispatcher's own executor) holds or held.",
     "schema": _FILTER_TEXT},
    {"name": "created_after", "in": "query",
     "description": "Only the jobs submitted after this time: RFC 3339 with its zone, "
     "or seconds since 1970.", "schema": _TIME_QUERY},
    {"name": "created_before", "in": "query",
     "description": "Only the jobs submitted before this time (as created_after).",
     "schema": _TIME_QUERY},
    {"name": "order", "in": "query",
     "description": "oldest: in submission order; newest: the newest first. A cursor "
     "goes on in the order of the page that gave it.",
     "schema": {"enum": ["oldest", "newest"], "default": "oldest"}},
)
_REPLAY = "A replay of an earlier request with the same Idempotency-Key."
_CONFLICT_KEY = Response("The Idempotency-Key was used with another body.")


# GET /v1/events: its answer, and the id it resumes after.
_EVENT_STREAM = {
    "type": "object",
    "description": "Server-Sent Events (text/event-stream): this schema is each "
    "event's, as OpenAPI 3.1 reads one: an id: line (durable and increasing), an "
    "event: line (job, worker, dropped, reset) and a data: line of one JSON object "
    "(JobEventData, WorkerEventData, DroppedEventData, ResetEventData), then a "
    "blank line. A ': keep-alive' comment comes every [events] heartbeat seconds "
    "while nothing else is sent. A subscriber more than [events] buffer events "
    "behind gets a last dropped event and the stream ends: resume with after = "
    "its id. A reset event (no id) comes first when after is older than the "
    "events kept ([events] retention) or newer than any: re-list to catch up; "
    "the stream goes on from the oldest kept.",
    "required": ["event", "data"],
    "properties": {
        "id": {"type": "string", "pattern": "^[0-9]+$"},
        "event": {"enum": ["job", "worker", "dropped", "reset"]},
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": {"anyOf": [
                _ref("JobEventData"), _ref("WorkerEventData"), _ref("DroppedEventData"),
                _ref("ResetEventData"),
            ]},
        },
    },
}
_EVENT_ID = {"type": "string", "pattern": digits_at_most(MAX_EVENT_ID)}


def _repeatable(name: str, values: list[str], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "description": description,
        "schema": {"type": "array", "maxItems": len(values), "items": {"enum": values}},
        "style": "form",
        "explode": True,
    }


ROUTES: tuple[Route, ...] = (
    Route(
        "GET", "/healthz", "health", "health", "Whether the daemon serves.", OPEN,
        {200: Response("It does.", Health)},
    ),
    Route(
        "GET", "/v1/openapi.json", "openapi", "openapi", "This document.", OPEN,
        {200: Response("The OpenAPI document.", {"type": "object"})},
    ),
    Route(
        "GET", "/metrics", "getMetrics", "read_metrics",
        "The daemon's metrics in the Prometheus text format (version 0.0.4): jobs by "
        "queue and state, submissions, ends, waits and run times, store commits, the "
        "reactor's longest hold, connections, subscribers, workers, leases expired, "
        "staging. For the roles metrics, reader and admin.", METRICS,
        {200: Response("The metrics.", {"type": "string"}, "text/plain")},
    ),
    Route(
        "POST", "/v1/jobs", "submitJob", "submit",
        "Submit a job (or, with array, several); answered once durably stored.", SUBMIT,
        {
            200: Response(_REPLAY, _JOB_OR_JOBS),
            201: Response(
                "The job (queued, or pending while it waits), or {\"jobs\": [...]} "
                "for an array.",
                _JOB_OR_JOBS,
                headers={"Location": {"schema": {"type": "string"}, "description": "/v1/jobs/{id}"}},
            ),
            400: Response(_SUBMISSION_400.format(
                where="", nesting=MAX_NESTING, batch_total="", links=MAX_DEPENDENCY_LINKS
            ) + "."),
            409: _CONFLICT_KEY,
            429: QUOTA_EXCEEDED,
        },
        request=JobSubmission,
        parameters=(IDEMPOTENCY_KEY, PREFER),
        writes=True,
    ),
    Route(
        "GET", "/v1/jobs", "listJobs", "list_jobs",
        "List jobs in submission order (or the newest first), a page at a time (a "
        "submitter's own alone), with filters that all must match. A page examines "
        f"at most {MAX_LIST_EXAMINED} jobs: with filters it may hold fewer than limit, "
        "even none, and a next_cursor still; follow it until it is null.", READ,
        {200: Response("A page of jobs.", JobPage)},
        parameters=(
            {
                "name": "state",
                "in": "query",
                "description": "Repeat for any of several states, at most "
                f"{MAX_STATE_FILTERS} times.",
                "schema": {"type": "array", "maxItems": MAX_STATE_FILTERS,
                           "items": {"enum": [s.value for s in JobState]}},
                "style": "form",
                "explode": True,
            },
            LABEL_FILTER,
            {
                "name": "owner",
                "in": "query",
                "description": "Only the jobs this principal submitted. A submitter "
                "sees its own jobs alone: another name lists nothing.",
                "schema": msgspec.json.schema(PrincipalName),
            },
            {
                "name": "limit",
                "in": "query",
                "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIST_LIMIT,
                           "default": DEFAULT_LIST_LIMIT},
            },
            {
                "name": "cursor",
                "in": "query",
                "description": "next_cursor of the previous page (decimal digits, "
                f"at most {MAX_CURSOR}).",
                "schema": {"type": "string", "pattern": digits_at_most(MAX_CURSOR)},
            },
            *LIST_FILTERS,
        ),
    ),
    Route(
        "POST", "/v1/jobs/batch", "submitBatch", "submit_batch",
        "Submit several jobs, all or nothing.", SUBMIT,
        {
            200: Response(_REPLAY, _ref("SubmittedJobs")),
            201: Response("The jobs.", _ref("SubmittedJobs")),
            400: Response(
                _SUBMISSION_400.format(
                    where=", as jobs[i].field", nesting=MAX_NESTING,
                    batch_total=", or jobs for the batch's total", links=MAX_DEPENDENCY_LINKS,
                )
                + "; jobs making more than [dispatcher] max_array jobs in all, a job "
                "with array counting as that many (jobs)."
            ),
            409: _CONFLICT_KEY,
            429: QUOTA_EXCEEDED,
        },
        request=Batch,
        parameters=(IDEMPOTENCY_KEY, PREFER),
        writes=True,
    ),
    Route(
        "GET", "/v1/queues", "listQueues", "list_queues",
        "Per queue: jobs by state, and running jobs against the limit (a "
        "submitter's own jobs alone).", READ,
        {200: Response("The queues.", QueueList)},
    ),
    Route(
        "GET", "/v1/jobs/{id}", "getJob", "get_job",
        "One job; with wait, once it is final.", READ,
        {200: Response("The job.", JobView), 404: _NO_SUCH_JOB, 503: _WAITED},
        parameters=(JOB_ID, WAIT),
    ),
    Route(
        "POST", "/v1/jobs/{id}/cancel", "cancelJob", "cancel",
        "Cancel a job; a running process is killed with its process group.", SUBMIT,
        {
            200: Response("Cancelled.", JobView),
            202: Response("Running: it is being stopped.", JobView),
            404: _NO_SUCH_JOB,
            409: Response("The job has already finished."),
        },
        parameters=(JOB_ID,),
        writes=True,
    ),
    Route(
        "POST", "/v1/jobs/{id}/retry", "retryJob", "retry",
        "Put a failed or cancelled job back in line with a fresh budget of "
        "attempts; its attempts stay in its history.", SUBMIT,
        {
            200: Response("The job, queued (or pending).", JobView),
            404: _NO_SUCH_JOB,
            409: Response("The job is not failed or cancelled, or a job it depends "
                          "on must be retried first."),
            429: RETRY_QUOTA_EXCEEDED,
        },
        request=RetryRequest,
        request_required=False,
        parameters=(JOB_ID,),
        writes=True,
    ),
    Route(
        "DELETE", "/v1/jobs/{id}", "deleteJob", "delete_job",
        "Remove a finished job now, with its attempts, logs and working "
        "directory, as retention does once [retention] finished_days have passed "
        "(docs/security.md); idempotency keys that made it are forgotten.", SUBMIT,
        {
            204: Response("Removed: its id names no job from now on.", None),
            404: _NO_SUCH_JOB,
            409: Response(
                "conflict: the job has not finished (the message names its state: "
                "cancel it first, or wait for it to end), or a job that depends on it "
                "has not succeeded and still needs its outcome (delete that one first)."
            ),
        },
        parameters=(JOB_ID,),
        writes=True,
    ),
    Route(
        "GET", "/v1/jobs/{id}/log", "readJobLog", "read_log",
        "The output of one attempt of the job (by default its latest); works while "
        "it runs, and with follow=true streams it as it is written.", READ,
        {
            200: Response(
                "The text so far, from offset; with follow=true (Transfer-Encoding: "
                "chunked) the text as it is written, the answer ending once the "
                "attempt has ended and its last byte is sent. A follow that ends "
                "without the last chunk (the connection closed: the daemon stopped, "
                "the job was removed) did not reach the attempt's end: ask again with "
                "offset = the bytes received.",
                {"type": "string"}, "text/plain",
            ),
            404: Response(
                "No such job (or another's, to a submitter); or (field attempt) the "
                "job has no such attempt."
            ),
            503: Response(f"too_many_followers: {FOLLOWERS_FULL} Or {SHUTTING_DOWN}",
                          headers=_RETRY_AFTER),
        },
        parameters=(
            JOB_ID,
            {"name": "stream", "in": "query",
             "schema": {"enum": ["stdout", "stderr"], "default": "stdout"}},
            {"name": "offset", "in": "query",
             "description": "Skip this many bytes: the size already read, to go on "
             "where an earlier answer (or a cut follow) stopped. Past the end: "
             "nothing (a follow waits for the file to reach it).",
             "schema": {"type": "integer", "minimum": 0, "maximum": MAX_OFFSET,
                        "default": 0}},
            {"name": "attempt", "in": "query",
             "description": "The attempt's number (attempts[].number; they grow "
             "across retries); default the latest. A follow of a job that has no "
             "attempt yet waits for its first.",
             "schema": {"type": "integer", "minimum": 1, "maximum": MAX_ATTEMPT_NUMBER}},
            {"name": "follow", "in": "query",
             "description": "true: keep the answer open and send the bytes as they "
             "are written, until the attempt has ended.",
             "schema": {"type": "boolean", "default": False}},
        ),
    ),
    Route(
        "GET", "/v1/workers", "listWorkers", "list_workers",
        "The workers heard from within a lease's life, or waiting for work (to a "
        "submitter, the jobs they hold of its own alone).", READ,
        {200: Response("The workers.", WorkerList)},
    ),
    Route(
        "POST", "/v1/leases", "lease", "lease",
        "Ask for work (a long-poll): answered as soon as a job is leased, or with "
        "no leases when the wait ends.", WORK,
        {
            200: Response("The leases granted (maybe none).", LeaseAnswer),
            400: Response("A field is wrong; it is named (max_jobs: more than "
                          "worker.slots and worker.prefetch)."),
            403: Response(WORKER_NAME_FORBIDDEN),
            429: Response(TOO_MANY_WORKER_NAMES),
        },
        request=LeaseRequest,
    ),
    Route(
        "POST", "/v1/leases/heartbeat", "heartbeat", "heartbeat",
        "Renew leases, and hear which ones ended (a cancel, an expiry).", WORK,
        {
            200: Response("One answer per lease.", HeartbeatAnswer),
            403: Response(WORKER_NAME_FORBIDDEN),
            409: Response("Every lease was refused.", HeartbeatAnswer),
            429: Response(TOO_MANY_WORKER_NAMES),
        },
        request=HeartbeatRequest,
    ),
    Route(
        "POST", "/v1/leases/results", "reportResults", "report_results",
        "Report how attempts ended; answered once the accepted ones are stored. With "
        "max_jobs, ask for work too: the answer grants leases for the slots the "
        "results free, claimed in the same commit, without waiting.", WORK,
        {
            200: Response("One answer per result, and the leases granted (with "
                          "max_jobs; maybe none).", ResultsAnswer),
            400: Response(
                "A field is wrong; it is named. Besides what the schema states, "
                f"refused: a result nested more than {MAX_NESTING} deep, or over "
                f"{MAX_RESULT_BYTES} bytes of JSON (results[i].result); max_jobs "
                "more than worker.slots and worker.prefetch. Nothing of the report was "
                "recorded, and no lease granted."
            ),
            403: Response(WORKER_NAME_FORBIDDEN),
            409: Response("Every result was refused, and no lease granted.", ResultsAnswer),
            429: Response(TOO_MANY_WORKER_NAMES),
        },
        request=ResultsRequest,
    ),
    Route(
        "POST", "/v1/leases/log", "writeJobLog", "write_log",
        "Write a chunk of an attempt's log at an offset; a resent chunk is written over.",
        WORK,
        {
            200: Response("Written.", LogWritten),
            400: Response("A query parameter is wrong, or (offset_past_end) the offset "
                          "is past the end of the stream; the message says where to "
                          f"send from. {QUERY_RULES}"),
            409: Response("stale_lease: the token is not the job's current lease, "
                          "or the credential may not act as the worker that holds it."),
        },
        request=OCTETS,
        parameters=(
            {"name": "job_id", "in": "query", "required": True,
             "schema": {"type": "string", "minLength": 1, "maxLength": MAX_NAME}},
            {"name": "token", "in": "query", "required": True,
             "description": "The lease's token, as its grant gave it.",
             "schema": {"type": "string", "pattern": LEASE_TOKEN}},
            {"name": "stream", "in": "query", "required": True,
             "schema": {"enum": ["stdout", "stderr"]}},
            {"name": "offset", "in": "query", "required": True,
             "description": "Where the chunk goes in the stream; at most its current size.",
             "schema": {"type": "integer", "minimum": 0, "maximum": MAX_OFFSET}},
        ),
        writes=True,
    ),
    Route(
        "GET", "/v1/events", "streamEvents", "stream_events",
        "Follow job state changes and workers' comings and goings as they are "
        "committed (Server-Sent Events); resume after an id without a gap (a "
        "submitter sees its own jobs' events alone, and no worker events).", READ,
        {
            200: Response("The stream: it stays open.", _EVENT_STREAM, "text/event-stream"),
            503: Response(
                "too_many_subscribers: as many streams are open as [events] "
                "max_subscribers allows; Retry-After says when to try again. Or "
                + SHUTTING_DOWN,
                headers=_RETRY_AFTER,
            ),
        },
        parameters=(
            {"name": "Last-Event-ID", "in": "header", "required": False,
             "description": "Resume after this event id (what an EventSource sends "
             "when it reconnects); takes precedence over after.",
             "schema": _EVENT_ID},
            {"name": "after", "in": "query",
             "description": "Resume after this event id: every event kept after it "
             "comes first, then the live ones. Without it, live events alone.",
             "schema": _EVENT_ID},
            {"name": "job", "in": "query", "description": "One job's events alone.",
             "schema": {"type": "string", "minLength": 1, "maxLength": MAX_NAME}},
            {"name": "array", "in": "query", "description": "One array's members' alone.",
             "schema": {"type": "string", "minLength": 1, "maxLength": MAX_NAME}},
            {"name": "batch", "in": "query", "description": "One batch's members' alone.",
             "schema": {"type": "string", "minLength": 1, "maxLength": MAX_NAME}},
            LABEL_FILTER,
            {"name": "owner", "in": "query",
             "description": "Only the jobs this principal submitted (a submitter's "
             "own alone: another name gives nothing).",
             "schema": msgspec.json.schema(PrincipalName)},
            _repeatable("state", [s.value for s in JobState],
                        "Only changes to these states (any of them)."),
            _repeatable("type", ["job", "worker"], "Only these types of event."),
        ),
    ),
    Route(
        "GET", "/v1/me", "whoAmI", "who_am_i",
        "Who the caller is to this dispatcher: its name (the owner of the jobs it "
        "submits) and role.", IDENTIFIED,
        {200: Response("The caller.", Identity)},
    ),
    Route(
        "GET", "/v1/credentials", "listCredentials", "list_credentials",
        "The named credentials (never their tokens).", ADMINISTER,
        {200: Response("The credentials.", CredentialList)},
    ),
    Route(
        "POST", "/v1/credentials", "createCredential", "create_credential",
        "Make a credential; its token is in this answer alone.", ADMINISTER,
        {
            201: Response("The credential, with its token.", CredentialCreated),
            409: Response("conflict: a credential of this name exists."),
        },
        request=CredentialRequest,
        writes=True,
    ),
    Route(
        "DELETE", "/v1/credentials/{name}", "revokeCredential", "revoke_credential",
        "Revoke a credential: its token is refused from the next request on.",
        ADMINISTER,
        {
            204: Response("Revoked.", None),
            404: Response("No credential of this name (the token files' cannot be "
                          "revoked here: remove the file from the configuration)."),
        },
        parameters=(
            {"name": "name", "in": "path", "required": True, "schema": {"type": "string"},
             "description": "The credential's name."},
        ),
        writes=True,
    ),
    # Arrays and batches as things (issue 17).
    *_group_routes("array", "arrays", "Array"),
    *_group_routes("batch", "batches", "Batch"),
)


# The dashboard (dispatcher.api._dashboard): its pages and its sessions.
# Routed and authenticated as the API's routes are, but not part of the
# API's document: they answer a browser, not a client.
DASHBOARD_ROUTES: tuple[Route, ...] = (
    Route(
        "GET", "/ui", "dashboard", "dashboard_page",
        "The dashboard's page (its login, when no session cookie comes).", OPEN,
        {200: Response("The page.", {"type": "string"}, "text/html")},
    ),
    Route(
        "GET", "/ui/{file}", "dashboardFile", "dashboard_file",
        "One of the dashboard's scripts and style sheets.", OPEN,
        {200: Response("The file.", {"type": "string"}, "text/javascript"),
         404: Response("No such file.")},
        parameters=({"name": "file", "in": "path", "required": True,
                     "schema": {"type": "string"}},),
    ),
    Route(
        "POST", "/ui/session", "login", "log_in",
        "Log in with a token: answered with the session cookie and its CSRF token.",
        OPEN,
        {200: Response("Logged in.", SessionView),
         401: Response("unauthorized: the token is not one this dispatcher knows."),
         503: Response("too_many_sessions: as many sessions are open as the "
                       "dispatcher keeps; try again later.")},
        request=LoginRequest,
    ),
    Route(
        "GET", "/ui/session", "session", "session",
        "Who the caller is, and its session's CSRF token.", IDENTIFIED,
        {200: Response("The caller.", SessionView)},
    ),
    Route(
        "DELETE", "/ui/session", "logout", "log_out",
        "End the session and clear its cookie.", IDENTIFIED,
        {204: Response("Logged out.", None)},
    ),
)

def path_segments(path: bytes) -> list[str]:
    """
    The segments of a request's path (its target without the query), as
    the L{Router} matches them: each percent-decoded, then read as UTF-8,
    one trailing empty segment dropped.

    The head check (L{dispatcher.api._auth.Gate}) and the routing of the
    handlers both read a path through this alone: a path that the check
    read as unknown (and let through, to its 404) while the routing decoded
    it into a route would skip the route's check (C{POST /v1/%63redentials}
    by a submitter made an admin credential).
    """
    if b"%" in path:
        segments = [unquote_to_bytes(s).decode("utf-8", "replace") for s in path[1:].split(b"/")]
    else:
        # The same segments (a "/" is never part of a UTF-8 sequence),
        # without a call per segment: this runs on every request's head.
        segments = path[1:].decode("utf-8", "replace").split("/")
    if len(segments) > 1 and segments[-1] == "":
        segments.pop()
    return segments


class Router:
    """
    Finds the L{Route} of a request's method and path segments
    (L{path_segments}).
    """

    def __init__(self, routes: tuple[Route, ...] = ROUTES) -> None:
        self._static: dict[tuple[str, ...], dict[str, Route]] = {}
        self._templates: list[tuple[tuple[str, ...], dict[str, Route]]] = []
        for route in routes:
            segments = route.segments
            if any(s.startswith("{") for s in segments):
                for template, methods in self._templates:
                    if template == segments:
                        methods[route.method] = route
                        break
                else:
                    self._templates.append((segments, {route.method: route}))
            else:
                self._static.setdefault(segments, {})[route.method] = route

    def match(self, segments: list[str]) -> Optional[tuple[dict[str, Route], tuple[str, ...]]]:
        """
        The routes of a path, by method, and the path's parameters; C{None}
        if no route has this path.
        """
        methods = self._static.get(tuple(segments))
        if methods is not None:
            return methods, ()
        for template, methods in self._templates:
            if len(template) == len(segments) and all(
                t.startswith("{") or t == s for t, s in zip(template, segments)
            ):
                return methods, tuple(s for t, s in zip(template, segments) if t.startswith("{"))
        return None


def types_of(routes: tuple[Route, ...] = ROUTES) -> list[Any]:
    """
    The wire types the routes take and answer, for the document's
    components.
    """
    # (The events' data travel inside text/event-stream: named here so
    # that a client finds their schemas.)
    found: list[Any] = [
        JobSummary, JobView, Error, JobEventData, WorkerEventData, DroppedEventData,
        ResetEventData,
    ]
    for route in routes:
        if isinstance(route.request, type):
            found.append(route.request)
        for response in route.responses.values():
            if isinstance(response.body, type):
                found.append(response.body)
    return list(dict.fromkeys(found))
