"""
What a client raises: the dispatcher's refusals, typed by status, from its
JSON error body (L{dispatcher.wire._types.Error}); a dispatcher that could
not be reached; a wait that ran out of time.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import msgspec

from dispatcher.wire._types import Error, JobView


class DispatcherError(Exception):
    """
    The dispatcher refused a request, or answered what no dispatcher
    answers.

    @ivar status: the HTTP status (C{None}: no answer came, see
        L{Unreachable}).
    @ivar code: the stable code of the error body (C{invalid_field},
        C{not_found}, C{shutting_down}...).
    @ivar message: what was wrong, for a person.
    @ivar field: the field, query parameter or header at fault, or C{None}.
    @ivar retry_after: seconds to wait before trying again, when the
        answer said (a C{429}'s body, a C{Retry-After} header), or C{None}.
    """

    def __init__(
        self,
        status: Optional[int],
        code: str,
        message: str,
        field: Optional[str] = None,
        retry_after: Optional[float] = None,
    ) -> None:
        super().__init__(status, code, message, field)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.retry_after = retry_after

    def __str__(self) -> str:
        where = f" ({self.field})" if self.field else ""
        status = "" if self.status is None else f"{self.status} "
        return f"{status}{self.code}{where}: {self.message}"


class BadRequest(DispatcherError):
    """
    C{400}: a field, a query parameter or a header is wrong; C{field}
    names it.  Nothing was changed.
    """


class Unauthorized(DispatcherError):
    """
    C{401}: no credential was sent, or one the dispatcher does not know
    (see L{dispatcher.client.Client} for where the token is read from).
    """


class Forbidden(DispatcherError):
    """
    C{403}: the credential's role may not do this.
    """


class NotFound(DispatcherError):
    """
    C{404}: no such job, array or batch (or another owner's, to a
    submitter).
    """


class Conflict(DispatcherError):
    """
    C{409}: the job is not in a state that allows it (cancel a finished
    job, retry one that has not failed, delete one that runs), or an
    C{Idempotency-Key} was reused with another body.
    """


class QuotaExceeded(DispatcherError):
    """
    C{429}: over the owner's quota; C{retry_after} says when to try again.
    """


class Unavailable(DispatcherError):
    """
    C{503} (the dispatcher is stopping, or has too many connections) or
    C{507} (its disk is full): nothing was changed; try again later.
    """


class Unreachable(DispatcherError):
    """
    No answer came: the connection was refused, reset or timed out, after
    as many tries as the client makes.
    """

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(None, "unreachable", f"{url}: {reason}")
        self.url = url


class WaitTimeout(TimeoutError):
    """
    L{wait<dispatcher.client.Client.wait>} ran out of time before every job
    had ended.

    @ivar jobs: the jobs as last seen (a job not looked at yet is left out),
        in the order asked.
    """

    def __init__(self, message: str, jobs: Sequence[JobView]) -> None:
        super().__init__(message)
        self.jobs = list(jobs)


_BY_STATUS: dict[int, type[DispatcherError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    429: QuotaExceeded,
    503: Unavailable,
    507: Unavailable,
}

_error_body = msgspec.json.Decoder(Error)


def _seconds(value: Optional[str]) -> Optional[float]:
    if value is None or not value.strip().isdigit():
        return None
    return float(value.strip())


def error_from_answer(
    status: int, headers: Mapping[str, str], body: bytes
) -> DispatcherError:
    """
    The error an answer of status C{status} (not a success) stands for:
    the subclass of its status, with the code, message and field of its
    JSON error body; an answer that has no such body (a proxy's page, say)
    is a L{DispatcherError} of code C{unexpected_answer} quoting its start.

    @param headers: the answer's headers, by lower-case name.
    """
    kind = _BY_STATUS.get(status, DispatcherError)
    retry_after = _seconds(headers.get("retry-after"))
    try:
        detail = _error_body.decode(body).error
    except (msgspec.DecodeError, msgspec.ValidationError):
        text = body[:200].decode("utf-8", "replace")
        return kind(status, "unexpected_answer", f"HTTP {status}: {text!r}", None, retry_after)
    if detail.retry_after is not msgspec.UNSET:
        retry_after = float(detail.retry_after)
    return kind(status, detail.code, detail.message, detail.field, retry_after)


def answer_mismatch(status: int, what: Any, reason: str) -> DispatcherError:
    """
    A success whose body is not the shape the API documents for it (a
    dispatcher of another version, or not a dispatcher).
    """
    name = getattr(what, "__name__", str(what))
    return DispatcherError(status, "unexpected_answer", f"expected a {name}: {reason}")
