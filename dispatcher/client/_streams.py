"""
The two streams a client follows, events and a running job's log, and how
each resumes after its connection ends: written once, as state that both
clients feed the bytes they read and ask what to send next.
"""

from __future__ import annotations

from typing import Any, Optional

import attrs
import msgspec
from twisted.logger import Logger

from dispatcher.client._calls import Call, Query, events_call, log_call
from dispatcher.client._errors import Unreachable, answer_mismatch, error_from_answer
from dispatcher.client._plans import RETRIES, Answer, backoff
from dispatcher.client._sse import EventStreamParser, ServerSentEvent
from dispatcher.wire._types import EventsDropped, EventsReset, JobEvent, WorkerEvent

log = Logger()

# The data of each event type, as the dispatcher encodes it.
EVENT_DATA: dict[str, Any] = {
    "job": JobEvent,
    "worker": WorkerEvent,
    "dropped": EventsDropped,
    "reset": EventsReset,
}


@attrs.frozen
class Event:
    """
    One event of C{GET /v1/events}.

    @ivar id: its id (durable and increasing; C{None} for a C{reset},
        which has none).
    @ivar type: C{"job"}, C{"worker"} or C{"reset"} (a C{dropped} is not
        given: the client resumes after it).
    @ivar data: a L{JobEvent}, L{WorkerEvent} or L{EventsReset}; the
        plain JSON value for a type this client does not know.
    """

    id: Optional[int]
    type: str
    data: Any


def decode_event(sse: ServerSentEvent) -> Event:
    """
    The L{Event} of a Server-Sent Event, its id its data's; a type this
    client does not know keeps its data as plain JSON (and the stream's
    id), so that the stream may gain types.
    """
    kind = EVENT_DATA.get(sse.type, Any)
    try:
        data = msgspec.json.decode(sse.data, type=kind)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise answer_mismatch(200, kind, f"event {sse.type}: {e}") from None
    if kind is Any:
        event_id = int(sse.last_event_id) if sse.last_event_id.isdigit() else None
        return Event(event_id, sse.type, data)
    return Event(getattr(data, "id", None), sse.type, data)


class EventFollower:
    """
    Where an event stream stands: the next call to make (C{?after=} the
    first time, C{Last-Event-ID} on a resume), the events its bytes hold,
    and how long to wait before resuming.
    """

    def __init__(self, query: Query, after: Optional[int], url: str,
                 retries: int = RETRIES) -> None:
        self._query = query
        self._after = after
        self._url = url
        self._retries = retries
        self._last_id: Optional[str] = None
        self._failures = 0
        self._parser = EventStreamParser()

    def call(self) -> Call:
        """
        The request that (re)opens the stream after the last event seen.
        """
        self._parser = EventStreamParser(self._last_id or "")
        if self._last_id is None:
            return events_call(self._query, after=self._after)
        return events_call(self._query, last_event_id=self._last_id)

    def feed(self, data: bytes) -> list[Event]:
        """
        The events the next bytes of the stream complete (a C{dropped}
        one is kept, to resume after it, not given).
        """
        events = []
        for sse in self._parser.feed(data):
            if sse.last_event_id:
                self._last_id = sse.last_event_id
            event = decode_event(sse)
            self._failures = 0
            if isinstance(event.data, EventsDropped):
                self._last_id = str(event.data.id)
                log.info(
                    "events: dropped ({reason}) by the dispatcher; resuming after {id}",
                    reason=event.data.reason, id=event.data.id,
                )
                continue
            events.append(event)
        return events

    def _delay(self) -> float:
        retry = self._parser.retry
        return backoff(self._failures - 1, None if retry is None else retry / 1000)

    def ended(self) -> float:
        """
        The stream ended (the dispatcher closed it): seconds to wait before
        resuming.
        """
        self._failures += 1
        if self._failures > self._retries:
            raise Unreachable(self._url, "the event stream keeps ending without an event")
        return self._delay()

    def lost(self, reason: str) -> float:
        """
        The connection failed (C{reason}): seconds to wait before resuming.

        @raise Unreachable: it failed as many times in a row as the client
            tries, with no event between.
        """
        self._failures += 1
        if self._failures > self._retries:
            raise Unreachable(self._url, reason)
        log.info("events: {reason}; resuming after {last}", reason=reason,
                 last=self._last_id or self._after)
        return self._delay()

    def refused(self, answer: Answer) -> float:
        """
        The dispatcher did not open the stream: seconds to wait for a C{503}.

        @raise DispatcherError: any other refusal.
        """
        if answer.status != 503:
            raise error_from_answer(answer.status, answer.headers, answer.body)
        return self.lost("503 (unavailable)")


class LogFollower:
    """
    Where a followed log stands: the offset read up to, the call that
    resumes from it, and how long to wait before resuming.
    """

    def __init__(self, job_id: str, stream: str, attempt: Optional[int], offset: int,
                 url: str, retries: int = RETRIES) -> None:
        self._job_id = job_id
        self._stream = stream
        self._attempt = attempt
        self.offset = offset
        self._url = url
        self._retries = retries
        self._failures = 0

    def call(self) -> Call:
        """
        The request that follows the log from the offset read up to.
        """
        return log_call(self._job_id, self._stream, self._attempt, self.offset, follow=True)

    def feed(self, data: bytes) -> bytes:
        """
        Count C{data}, the next bytes of the log.
        """
        self.offset += len(data)
        self._failures = 0
        return data

    def lost(self, reason: str) -> float:
        """
        The connection failed before the log ended: seconds to wait before
        resuming.

        @raise Unreachable: it failed as many times in a row as the client
            tries, with no byte between.
        """
        self._failures += 1
        if self._failures > self._retries:
            raise Unreachable(self._url, reason)
        log.info("log of {job_id}: {reason}; resuming at {offset}", job_id=self._job_id,
                 reason=reason, offset=self.offset)
        return backoff(self._failures - 1)

    def refused(self, answer: Answer) -> float:
        """
        The dispatcher did not serve the log: seconds to wait for a C{503}.

        @raise DispatcherError: any other refusal.
        """
        if answer.status != 503:
            raise error_from_answer(answer.status, answer.headers, answer.body)
        return self.lost("503 (unavailable)")
