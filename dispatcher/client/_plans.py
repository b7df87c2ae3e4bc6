"""
What a client does around its requests, written once as plans that both
clients carry out: a plan is a generator that yields steps (L{Send} a call,
L{Sleep}, ask the time, L{Now}) and is sent what each step gave.  The
blocking client carries out a step by blocking, the Twisted client by
waiting on a Deferred; the tries, back-offs and long-polls are the same.
"""

from __future__ import annotations

import random
from typing import Any, Generator, Iterable, Mapping, Optional, Union

import attrs
from twisted.logger import Logger

from dispatcher.client._calls import Call, job_call, read_answer
from dispatcher.client._errors import Unreachable, WaitTimeout
from dispatcher.wire._types import MAX_CLIENT_WAIT, JobView

log = Logger()

# Tries after the first, by default: with the back-off below, a call keeps
# trying for 10 to 15 seconds, long enough for a dispatcher to restart.
RETRIES = 5
FIRST_BACKOFF = 0.5
MAX_BACKOFF = 8.0
# A dispatcher that answers a waiting GET early without the job having
# ended does not wait (one older than ?wait=): it is asked again after a
# pause that grows to this, rather than at once.
FIRST_POLL = 0.25
MAX_POLL = 2.0
# Less than this left of a wait: one last look, without waiting.
SHORTEST_WAIT = 0.01


@attrs.frozen
class Answer:
    """
    What the dispatcher answered.

    @ivar headers: by lower-case name.
    """

    status: int
    headers: Mapping[str, str]
    body: bytes


@attrs.frozen
class Lost:
    """
    No answer came.

    @ivar sent: whether the request may have reached the dispatcher (the
        connection failed after it was made), rather than never left.
    @ivar reason: what happened, for a person.
    """

    sent: bool
    reason: str


@attrs.frozen
class Send:
    """
    Send a call; the plan is sent its L{Answer} or L{Lost}.
    """

    call: Call


@attrs.frozen
class Sleep:
    """
    Wait this many seconds.
    """

    seconds: float


@attrs.frozen
class Now:
    """
    The plan is sent the time now, in seconds (a monotonic clock's).
    """


Step = Union[Send, Sleep, Now]
Plan = Generator[Step, Any, Any]


def backoff(tries: int, retry_after: Optional[float] = None) -> float:
    """
    How long to wait before try C{tries + 1}: what the dispatcher said
    (C{Retry-After}), else a doubling delay with jitter, so that clients
    turned away together do not all come back together; at most
    L{MAX_BACKOFF}.
    """
    if retry_after is not None:
        return min(retry_after, MAX_BACKOFF)
    delay = min(FIRST_BACKOFF * 2**tries, MAX_BACKOFF)
    return delay * random.uniform(0.5, 1.0)


def exchange(call: Call, url: str, retries: int = RETRIES) -> Plan:
    """
    Send C{call} to the dispatcher at C{url} and read its answer, trying
    again after a back-off, up to C{retries} times, when the connection
    failed before the call was sent (or after, for a call that may be
    sent again: L{Call.resend}) or the dispatcher answered C{503}.

    @return: (the plan's) what the answer holds (L{read_answer}).
    @raise Unreachable: no answer came at the last try.
    @raise DispatcherError: the dispatcher refused the call.
    """
    tries = 0
    while True:
        outcome = yield Send(call)
        if isinstance(outcome, Lost):
            if tries >= retries or (outcome.sent and not call.resend):
                raise Unreachable(url, outcome.reason)
            why = outcome.reason
            delay = backoff(tries)
        elif outcome.status == 503 and tries < retries:
            retry_after = outcome.headers.get("retry-after", "")
            why = "503 (unavailable)"
            delay = backoff(tries, float(retry_after) if retry_after.isdigit() else None)
        else:
            return read_answer(call, outcome.status, outcome.headers, outcome.body)
        tries += 1
        log.info(
            "{method} {path}: {why}; trying again in {delay:.2f} s (try {tries} of {retries})",
            method=call.method, path=call.path, why=why, delay=delay, tries=tries + 1,
            retries=retries + 1,
        )
        yield Sleep(delay)


def wait_plan(job_ids: Iterable[str], timeout: Optional[float], url: str,
              retries: int = RETRIES) -> Plan:
    """
    Wait until every job of C{job_ids} has a final state, asking each with
    C{?wait=} (a long-poll of up to L{MAX_CLIENT_WAIT} seconds, asked
    again until the job ends or C{timeout} seconds have passed).

    @return: (the plan's) the jobs, final, in the order given.
    @raise WaitTimeout: the time ran out first; it holds the jobs as last
        seen.
    """
    start = yield Now()
    deadline = None if timeout is None else start + timeout
    seen: list[JobView] = []
    for job_id in job_ids:
        pause = FIRST_POLL
        while True:
            now = yield Now()
            left = MAX_CLIENT_WAIT if deadline is None else min(deadline - now, MAX_CLIENT_WAIT)
            if left < SHORTEST_WAIT:
                view = yield from exchange(job_call(job_id), url, retries)
                if view.state.final:
                    break
                raise WaitTimeout(
                    f"job {job_id} is still {view.state.value} after {timeout:g} s",
                    seen + [view],
                )
            view = yield from exchange(job_call(job_id, left), url, retries)
            if view.state.final:
                break
            answered = yield Now()
            if answered - now < left - 1.0:
                # Answered early and not final: a dispatcher that does not
                # wait.
                yield Sleep(pause if deadline is None else max(0.0, min(pause, deadline - answered)))
                pause = min(pause * 2, MAX_POLL)
        seen.append(view)
    return seen
