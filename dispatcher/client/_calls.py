"""
The API's requests as values, and how their answers are read: written
once, for the blocking client and the Twisted one alike, which only send
a L{Call} and hand back what came.
"""

from __future__ import annotations

import datetime
import uuid
from typing import Any, Iterable, Mapping, Optional, Sequence, Union
from urllib.parse import quote, urlencode

import attrs
import msgspec

from dispatcher.client._errors import answer_mismatch, error_from_answer
from dispatcher.wire._types import (
    BatchJob,
    Identity,
    JobGroup,
    JobPage,
    JobSubmission,
    JobView,
    QueueList,
    SubmittedJobs,
    WorkerList,
)

# What a call's answer is read as besides a wire type: its bytes, or
# nothing (a 204).
RAW = bytes
NOTHING = None

Query = tuple[tuple[str, str], ...]


@attrs.frozen
class Call:
    """
    One request of the API and what its success is read as.

    @ivar answer: the wire type a 2xx body is decoded into, L{RAW} (the
        bytes) or L{NOTHING}.
    @ivar waits: seconds the dispatcher may hold the call before it
        answers (a C{?wait=}): added to the client's timeout.
    @ivar resend: whether it may be sent again after its connection failed
        once it was sent (a read, or a submit with its C{Idempotency-Key}):
        the dispatcher may have done it.  Any call may be sent again when
        it never left, or when the dispatcher answered C{503}, which
        promises that nothing was changed.
    """

    method: str
    path: str
    answer: Any
    query: Query = ()
    body: Optional[bytes] = None
    headers: tuple[tuple[str, str], ...] = ()
    resend: bool = False
    waits: float = 0.0

    def url(self, base: str) -> str:
        """
        The call's URL on the dispatcher at C{base}.
        """
        target = base + self.path
        return f"{target}?{urlencode(self.query)}" if self.query else target

    def with_query(self, **changes: Optional[str]) -> "Call":
        """
        The call with the query parameters C{changes} set (C{None}: left out).
        """
        query = tuple((k, v) for k, v in self.query if k not in changes)
        query += tuple((k, v) for k, v in changes.items() if v is not None)
        return attrs.evolve(self, query=query)


def headers(token: Optional[str], call: Call) -> dict[str, str]:
    """
    The headers of C{call}, its credential's among them.
    """
    out = {"Accept": "application/json"}
    if token:
        out["Authorization"] = f"Bearer {token}"
    if call.method == "POST":
        # Every POST says it, a body-less one too (the dispatcher refuses
        # one that does not: no cross-site form can send it).
        out["Content-Type"] = "application/json"
    out.update(call.headers)
    return out


_decoders: dict[Any, msgspec.json.Decoder] = {}


def decoder(kind: Any) -> msgspec.json.Decoder:
    """
    The (cached) decoder of the wire type C{kind}.
    """
    found = _decoders.get(kind)
    if found is None:
        found = _decoders[kind] = msgspec.json.Decoder(kind)
    return found


def read_answer(call: Call, status: int, headers: Mapping[str, str], body: bytes) -> Any:
    """
    What C{call}'s answer holds: its body as C{call.answer} says for a
    success; for any other status, the L{DispatcherError} it stands for is
    raised.

    @param headers: the answer's headers, by lower-case name.
    """
    if not 200 <= status < 300:
        raise error_from_answer(status, headers, body)
    if call.answer is NOTHING:
        return None
    if call.answer is RAW:
        return body
    try:
        return decoder(call.answer).decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise answer_mismatch(status, call.answer, str(e)) from None


def _segment(value: str) -> str:
    return quote(str(value), safe="")


def _seconds(wait: float) -> str:
    # Decimal digits, never an exponent (1e-05), which a query's number
    # does not take.
    return f"{float(wait):.3f}".rstrip("0").rstrip(".")


# Submitting

def _fields(submission: Union[JobSubmission, Mapping[str, Any]]) -> dict[str, Any]:
    if isinstance(submission, msgspec.Struct):
        fields = msgspec.to_builtins(submission)
    else:
        fields = dict(submission)
    # null means the default: sent only when given.
    return {k: v for k, v in fields.items() if v is not None}


def submission(command: Optional[Sequence[str]], task: Optional[str], fields: dict[str, Any]) -> JobSubmission:
    """
    The L{JobSubmission} of C{submit}'s arguments; an unknown field is a
    C{TypeError} here rather than a C{400} later.
    """
    if isinstance(command, (str, bytes)):
        raise TypeError(
            "command is an argv list (['sh', '-c', 'echo hi']), never run through a shell"
        )
    return JobSubmission(command=None if command is None else list(command), task=task, **fields)


def idempotency_key() -> str:
    """
    A fresh C{Idempotency-Key}, made for one submit call and sent with
    each of its tries.
    """
    return uuid.uuid4().hex


def submit_call(job: Union[JobSubmission, Mapping[str, Any]], key: str) -> Call:
    """
    C{POST /v1/jobs}: a job (a L{JobView}), or an array (L{SubmittedJobs}).
    """
    fields = _fields(job)
    return Call(
        "POST",
        "/v1/jobs",
        SubmittedJobs if fields.get("array") is not None else JobView,
        body=msgspec.json.encode(fields),
        headers=(("Idempotency-Key", key),),
        resend=True,
    )


def submit_batch_call(jobs: Iterable[Union[BatchJob, JobSubmission, Mapping[str, Any]]], key: str) -> Call:
    """
    C{POST /v1/jobs/batch}: several jobs, all or nothing.
    """
    return Call(
        "POST",
        "/v1/jobs/batch",
        SubmittedJobs,
        body=msgspec.json.encode({"jobs": [_fields(job) for job in jobs]}),
        headers=(("Idempotency-Key", key),),
        resend=True,
    )


# Jobs

def job_call(job_id: str, wait: Optional[float] = None) -> Call:
    """
    C{GET /v1/jobs/{id}}, waiting up to C{wait} seconds for it to end.
    """
    if wait is None:
        return Call("GET", f"/v1/jobs/{_segment(job_id)}", JobView, resend=True)
    return Call("GET", f"/v1/jobs/{_segment(job_id)}", JobView,
                query=(("wait", _seconds(wait)),), resend=True, waits=float(wait))


def _time(value: Union[str, float, int, datetime.datetime]) -> str:
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            raise ValueError(f"{value!r}: give a time with its zone (tzinfo)")
        return value.isoformat()
    if isinstance(value, float):
        # Decimal digits, never an exponent (1.79e+09).
        return f"{value:.6f}".rstrip("0").rstrip(".")
    if isinstance(value, int):
        return str(value)
    return value


def _many(value: Union[None, str, Iterable[str]]) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return list(value)


def job_filters(
    *,
    state: Union[None, str, Iterable[str]] = None,
    label: Union[None, str, Mapping[str, str], Iterable[str]] = None,
    owner: Optional[str] = None,
    array: Optional[str] = None,
    batch: Optional[str] = None,
    name: Optional[str] = None,
    queue: Optional[str] = None,
    worker: Optional[str] = None,
    created_after: Union[None, str, float, datetime.datetime] = None,
    created_before: Union[None, str, float, datetime.datetime] = None,
    order: Optional[str] = None,
    page_size: Optional[int] = None,
) -> Query:
    """
    The query of C{GET /v1/jobs}: C{state} one or several (any of them);
    C{label} a mapping, or C{"key=value"}/C{"key"} strings (all of them);
    times as RFC 3339 strings, aware datetimes or epoch seconds; C{order}
    C{"oldest"} or C{"newest"}; C{page_size} the jobs a page (C{limit}).
    """
    query: list[tuple[str, str]] = [("state", str(getattr(s, "value", s))) for s in _many(state)]
    if isinstance(label, Mapping):
        query += [("label", f"{k}={v}") for k, v in label.items()]
    else:
        query += [("label", item) for item in _many(label)]
    for key, value in (("owner", owner), ("array", array), ("batch", batch), ("name", name),
                       ("queue", queue), ("worker", worker), ("order", order)):
        if value is not None:
            query.append((key, value))
    if created_after is not None:
        query.append(("created_after", _time(created_after)))
    if created_before is not None:
        query.append(("created_before", _time(created_before)))
    if page_size is not None:
        query.append(("limit", str(page_size)))
    return tuple(query)


def list_call(query: Query, cursor: Optional[str] = None) -> Call:
    """
    C{GET /v1/jobs}: one page.
    """
    call = Call("GET", "/v1/jobs", JobPage, query=query, resend=True)
    return call.with_query(cursor=cursor) if cursor is not None else call


def cancel_call(job_id: str) -> Call:
    """
    C{POST /v1/jobs/{id}/cancel}.
    """
    return Call("POST", f"/v1/jobs/{_segment(job_id)}/cancel", JobView)


def retry_call(job_id: str, dependents: bool = False) -> Call:
    """
    C{POST /v1/jobs/{id}/retry}.
    """
    body = msgspec.json.encode({"dependents": True}) if dependents else None
    return Call("POST", f"/v1/jobs/{_segment(job_id)}/retry", JobView, body=body)


def delete_call(job_id: str) -> Call:
    """
    C{DELETE /v1/jobs/{id}}.
    """
    return Call("DELETE", f"/v1/jobs/{_segment(job_id)}", NOTHING)


# Arrays and batches

def group_call(kind: str, group_id: str, wait: Optional[float] = None) -> Call:
    """
    C{GET /v1/arrays/{id}} or C{/v1/batches/{id}} (C{kind}: C{arrays} or
    C{batches}).
    """
    if wait is None:
        return Call("GET", f"/v1/{kind}/{_segment(group_id)}", JobGroup, resend=True)
    return Call("GET", f"/v1/{kind}/{_segment(group_id)}", JobGroup,
                query=(("wait", _seconds(wait)),), resend=True, waits=float(wait))


def group_action_call(kind: str, group_id: str, action: str) -> Call:
    """
    C{POST /v1/arrays/{id}/cancel} and the like.
    """
    return Call("POST", f"/v1/{kind}/{_segment(group_id)}/{action}", JobGroup)


# Logs

def log_call(
    job_id: str,
    stream: str = "stdout",
    attempt: Optional[int] = None,
    offset: int = 0,
    follow: bool = False,
) -> Call:
    """
    C{GET /v1/jobs/{id}/log}: an attempt's log (the latest by default)
    from C{offset}, and what is written after it with C{follow}.
    """
    query = [("stream", stream)]
    if offset:
        query.append(("offset", str(offset)))
    if attempt is not None:
        query.append(("attempt", str(attempt)))
    if follow:
        query.append(("follow", "true"))
    return Call("GET", f"/v1/jobs/{_segment(job_id)}/log", RAW, query=tuple(query), resend=True)


# Events

def event_filters(
    *,
    job: Optional[str] = None,
    array: Optional[str] = None,
    batch: Optional[str] = None,
    label: Union[None, str, Mapping[str, str], Iterable[str]] = None,
    owner: Optional[str] = None,
    state: Union[None, str, Iterable[str]] = None,
    type: Union[None, str, Iterable[str]] = None,
) -> Query:
    """
    The query of C{GET /v1/events}: C{label} and C{state} as for
    L{job_filters}; C{type} C{"job"}, C{"worker"} or both.
    """
    query: list[tuple[str, str]] = []
    for key, value in (("job", job), ("array", array), ("batch", batch), ("owner", owner)):
        if value is not None:
            query.append((key, value))
    if isinstance(label, Mapping):
        query += [("label", f"{k}={v}") for k, v in label.items()]
    else:
        query += [("label", item) for item in _many(label)]
    query += [("state", str(getattr(s, "value", s))) for s in _many(state)]
    query += [("type", t) for t in _many(type)]
    return tuple(query)


def events_call(query: Query, after: Optional[int] = None, last_event_id: Optional[str] = None) -> Call:
    """
    C{GET /v1/events}: from after C{after} (a query parameter, the first
    time) or after C{last_event_id} (the header, on a resume).
    """
    call = Call("GET", "/v1/events", RAW, query=query, resend=True)
    if after is not None:
        call = call.with_query(after=str(after))
    headers: tuple[tuple[str, str], ...] = (("Accept", "text/event-stream"),)
    if last_event_id is not None:
        headers += (("Last-Event-ID", last_event_id),)
    return attrs.evolve(call, headers=headers)


# The rest

def queues_call() -> Call:
    """
    C{GET /v1/queues}.
    """
    return Call("GET", "/v1/queues", QueueList, resend=True)


def workers_call() -> Call:
    """
    C{GET /v1/workers}.
    """
    return Call("GET", "/v1/workers", WorkerList, resend=True)


def me_call() -> Call:
    """
    C{GET /v1/me}.
    """
    return Call("GET", "/v1/me", Identity, resend=True)
