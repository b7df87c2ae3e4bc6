"""
C{GET /v1/events}: the event streams (Server-Sent Events) of job state
changes and workers' comings and goings.

One L{EventStreams} follows the dispatcher's events (the core's
L{JobEvents} hub: every write's events, with their durable ids, as it
commits) and fans them out to the open streams.  Each stream sits in one
bucket of an index by its most selective filter (a job, a batch, an array,
an owner, worker events alone, or none), so an event costs a few
dictionary look-ups however many streams are open, and is encoded once
for all the streams that take it.

A stream that resumes (C{Last-Event-ID}, C{?after=}) reads the stored
events after its id from the store, a page at a time on the store's reader
threads, at the pace its connection takes them; then it joins the live
events.  The seam: the stream takes live events into a bounded list of its
own before each read of the store, and a read that comes back short (the
store held nothing more) is followed by that list, less what the read
already gave (by id).  Every published event is committed before it is
published, so whatever was published before a read is in that read, and
whatever is published after it is in the list: nothing is missed and
nothing is sent twice.  A list that overflows during a read is dropped
and the store read again.

A live stream writes as its connection takes it: the connection's
pause (its send buffer full) stops the writing, and the events meanwhile
wait in the stream's backlog, at most C{buffer} of them; one more, and the
stream gets a last C{dropped} event naming the last id it was sent, and
ends.  Nothing of a stream ever waits on the writer or holds the reactor.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from dispatcher.model._events import (
    EVENT_TYPES,
    WORKER,
    EventFilter,
    JobEvent,
    WorkerEvent,
)
from dispatcher.model._jobs import JobState, format_time
from dispatcher.model._principals import PRINCIPAL_NAME_RULE, valid_name
from dispatcher.wire._json import encode
from dispatcher.wire._submission import ApiError
from dispatcher.wire._types import (
    MAX_EVENT_ID,
    MAX_LABEL_FILTERS,
    DroppedEventData,
    JobEventData,
    ResetEventData,
    WorkerEventData,
)

log = Logger()

Event = Union[JobEvent, WorkerEvent]

# How many stored events one read of the store takes.
PAGE = 1000
# The most values one repeatable filter (state, type) may be given.
MAX_STATE_FILTERS = len(JobState)
# What a client is told to wait before it subscribes again when the
# streams are full.
RETRY_AFTER = 5
# The comment that keeps an idle stream open through proxies.
KEEP_ALIVE = b": keep-alive\n\n"



def frame(event: Event) -> bytes:
    """
    One event as the stream sends it: its id, its type and its data as one
    line of JSON, and a blank line.
    """
    if type(event) is WorkerEvent:
        data: Any = WorkerEventData(event.id, format_time(event.at), event.worker,
                                    event.change)
        kind = b"worker"
    else:
        spec = event.spec
        data = JobEventData(
            event.id,
            format_time(event.at),
            event.job_id,
            event.state,
            event.previous,
            event.owner,
            None if spec is None else spec.queue,
            None if spec is None else spec.name,
            None if spec is None else spec.array_id,
            None if spec is None else spec.batch_id,
            event.attempt,
            event.exit_code,
            event.error,
        )
        kind = b"job"
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (event.id, kind, encode(data))


def _dropped(last: int) -> bytes:
    return b"id: %d\nevent: dropped\ndata: %s\n\n" % (
        last, encode(DroppedEventData(last, "too_far_behind"))
    )


def _reset(oldest: int) -> bytes:
    return b"event: reset\ndata: %s\n\n" % encode(ResetEventData(oldest))


class EventStreamAnswer:
    """
    What C{GET /v1/events} answers: the stream, started on the request once
    the handler is done.
    """

    def __init__(self, streams: "EventStreams", filter: EventFilter, after: Optional[int]):
        self.streams = streams
        self.filter = filter
        self.after = after

    def start(self, request: Any) -> None:
        """
        Answer C{request} with the stream.
        """
        self.streams.start(request, self.filter, self.after)


def parse_event_query(request: Any) -> tuple[EventFilter, Optional[int]]:
    """
    The filter of a C{GET /v1/events} request (its query and its caller)
    and the id it resumes after (C{Last-Event-ID}, else C{?after=}; none:
    live events alone), or a 400 naming what is wrong.
    """
    # (Imported here: the handlers import this module.)
    # (Unknown and repeated parameters are refused before, from the
    # route's declaration: dispatcher.api._handlers.check_query.)
    from dispatcher.api._handlers import _query, parse_labels
    from dispatcher.api._workers import query_integer

    words = f"expected an event id this server gave (decimal digits, at most {MAX_EVENT_ID})"
    after = None
    text = _query(request, "after")
    if text is not None:
        after = query_integer(text, "after", 0, MAX_EVENT_ID, words)
    # An EventSource that reconnects sends the last id it saw, and the URL
    # it first opened (with its after): the header is the newer word.
    header = request.getHeader(b"last-event-id")
    if header is not None:
        # (An EventSource that saw no id sends none: an empty one is wrong.)
        after = query_integer(
            header.decode("ascii", "replace"), "Last-Event-ID", 0, MAX_EVENT_ID, words
        )
    states = None
    given = _repeated(request, "state", MAX_STATE_FILTERS)
    if given:
        try:
            states = frozenset(JobState(text) for text in given)
        except ValueError:
            allowed = ", ".join(s.value for s in JobState)
            raise ApiError(400, "invalid_query", f"state: expected any of {allowed}",
                           "state")
    types = frozenset(EVENT_TYPES)
    given = _repeated(request, "type", len(EVENT_TYPES))
    if given:
        if not set(given) <= set(EVENT_TYPES):
            raise ApiError(400, "invalid_query",
                           f"type: expected any of {', '.join(EVENT_TYPES)}", "type")
        types = frozenset(given)
    owner = _query(request, "owner")
    if owner is not None and not valid_name(owner):
        raise ApiError(400, "invalid_query",
                       f"owner: expected a principal's name: {PRINCIPAL_NAME_RULE}", "owner")
    ids = {}
    for name in ("job", "array", "batch"):
        value = _query(request, name)
        if value is not None and not 0 < len(value) <= 200:
            raise ApiError(400, "invalid_query", f"{name}: expected an id", name)
        ids[name] = value
    principal = request.principal
    sees_all = principal.sees_all
    if not sees_all:
        if owner is not None and owner != principal.name:
            # Another's jobs: none it may see (as the job list answers).
            owner = "\x00"
        else:
            owner = principal.name
    return (
        EventFilter(
            types=types,
            job_id=ids["job"],
            array_id=ids["array"],
            batch_id=ids["batch"],
            labels=tuple(parse_labels(request)),
            owner=owner,
            states=states,
            sees_all=sees_all,
        ),
        after,
    )


def _repeated(request: Any, name: str, most: int) -> list[str]:
    given = request.args.get(name.encode("ascii"), [])
    if len(given) > most:
        raise ApiError(400, "invalid_query", f"{name}: given {len(given)} times; at most "
                       f"{most}", name)
    try:
        return [value.decode("utf-8") for value in given]
    except UnicodeDecodeError:
        raise ApiError(400, "invalid_query", f"{name}: not UTF-8", name)


class EventStreams:
    """
    Every open event stream, and the fan-out of the dispatcher's events to
    them.

    @param events: the core's L{JobEvents} hub, followed from L{start_following}.
    @param store: the L{IJobStore} stored events are read from.
    @param clock: the C{IReactorTime} of the keep-alive comments.
    @param heartbeat: seconds between keep-alive comments of an idle stream.
    @param buffer: the most events a stream may be behind by.
    @param max_subscribers: the most streams open at once.
    """

    def __init__(
        self,
        events: Any,
        store: Any,
        clock: Any,
        heartbeat: float = 15.0,
        buffer: int = 4096,
        max_subscribers: int = 12_500,
    ) -> None:
        self._events = events
        self._store = store
        self._clock = clock
        self.heartbeat = heartbeat
        self.buffer = buffer
        self.max_subscribers = max_subscribers
        self.page = PAGE
        self.streams: set[EventStream] = set()
        # The index: each listening stream in one bucket.
        self._by_job: dict[str, set[EventStream]] = {}
        self._by_batch: dict[str, set[EventStream]] = {}
        self._by_array: dict[str, set[EventStream]] = {}
        self._by_owner: dict[str, set[EventStream]] = {}
        self._workers_only: set[EventStream] = set()
        self._general: set[EventStream] = set()
        self._unfollow: Optional[Callable[[], None]] = None
        self.dropped = 0

    def start_following(self) -> None:
        """
        Follow the dispatcher's events from now on.
        """
        if self._unfollow is None:
            # Every dispatcher's on the store, in id order.
            self._unfollow = self._events.follow(self._published, others=True)

    def stop(self) -> None:
        """
        End every stream (the daemon stops) and follow no more.
        """
        if self._unfollow is not None:
            self._unfollow()
            self._unfollow = None
        self.end_all()

    def end_all(self) -> None:
        """
        End every stream open now.
        """
        for stream in list(self.streams):
            stream.end()

    def check_room(self) -> None:
        """
        Refuse (503 C{too_many_subscribers}, with C{Retry-After}) a stream
        past C{max_subscribers}.
        """
        if len(self.streams) >= self.max_subscribers:
            error = ApiError(
                503, "too_many_subscribers",
                f"{len(self.streams)} event streams are open, as many as "
                "[events] max_subscribers allows; try again later",
            )
            error.headers = {b"retry-after": str(RETRY_AFTER).encode("ascii")}
            raise error

    def start(self, request: Any, filter: EventFilter, after: Optional[int]) -> "EventStream":
        """
        Answer C{request} with a stream of the events C{filter} lets
        through, after the id C{after} (C{None}: from now on).
        """
        stream = EventStream(self, request, filter, after)
        self.streams.add(stream)
        stream.start()
        return stream

    # The index

    def _bucket(self, stream: "EventStream") -> set["EventStream"]:
        f = stream.filter
        if f.job_id is not None:
            return self._by_job.setdefault(f.job_id, set())
        if f.batch_id is not None:
            return self._by_batch.setdefault(f.batch_id, set())
        if f.array_id is not None:
            return self._by_array.setdefault(f.array_id, set())
        if f.owner is not None:
            return self._by_owner.setdefault(f.owner, set())
        if f.types == frozenset((WORKER,)):
            return self._workers_only
        return self._general

    def listen(self, stream: "EventStream") -> None:
        """
        Give C{stream} the live events its filter lets through.
        """
        self._bucket(stream).add(stream)

    def forget(self, stream: "EventStream") -> None:
        """
        C{stream} has ended.
        """
        self.streams.discard(stream)
        f = stream.filter
        for key, index in ((f.job_id, self._by_job), (f.batch_id, self._by_batch),
                           (f.array_id, self._by_array), (f.owner, self._by_owner)):
            if key is not None:
                bucket = index.get(key)
                if bucket is not None:
                    bucket.discard(stream)
                    if not bucket:
                        del index[key]
                return
        self._workers_only.discard(stream)
        self._general.discard(stream)

    # The fan-out

    def _published(self, events: Sequence[Event]) -> None:
        """
        The events of one write, as it committed: to every stream that
        takes them, each encoded once, each stream written to once.
        """
        if not self.streams:
            return
        touched: list[EventStream] = []
        by_job, by_batch = self._by_job, self._by_batch
        by_array, by_owner = self._by_array, self._by_owner
        general = self._general
        for event in events:
            if type(event) is WorkerEvent:
                buckets = [self._workers_only, general]
            else:
                buckets = [general]
                found = by_job.get(event.job_id)
                if found:
                    buckets.append(found)
                if by_owner:
                    found = by_owner.get(event.owner)  # type: ignore[arg-type]
                    if found:
                        buckets.append(found)
                if by_array and event.spec is not None and event.spec.array_id is not None:
                    found = by_array.get(event.spec.array_id)
                    if found:
                        buckets.append(found)
                if by_batch and event.spec is not None and event.spec.batch_id is not None:
                    found = by_batch.get(event.spec.batch_id)
                    if found:
                        buckets.append(found)
            encoded = None
            for bucket in buckets:
                for stream in bucket:
                    if stream.filter.matches(event):
                        if encoded is None:
                            encoded = frame(event)
                        if stream.take(event.id, encoded):
                            touched.append(stream)
        for stream in touched:
            stream.flush()


@implementer(IPushProducer)
class EventStream:
    """
    One client's stream: its catching up from the store, its live events,
    its backlog while its connection is paused, its keep-alive comments.
    """

    def __init__(
        self, streams: EventStreams, request: Any, filter: EventFilter, after: Optional[int]
    ) -> None:
        self._streams = streams
        self._request = request
        self.filter = filter
        # The last id sent (or, catching up, read past).
        self.after = after if after is not None else 0
        self._resuming = after is not None
        self.live = False
        self.ended = False
        self._paused = False
        # Catching up: the live events since the last read of the store,
        # and whether more came than the buffer holds.
        self._seam: list[tuple[int, bytes]] = []
        self._overflowed = False
        # Live: the frames to write at the end of this publication, and
        # those waiting while the connection is paused.
        self._out: list[bytes] = []
        self._out_last = 0
        self._backlog: list[tuple[int, bytes]] = []
        self._clock = streams._clock
        # When bytes were last written, which the keep-alive counts from.
        self._last_write = 0.0
        self._beat: Any = None
        self._resumed: Optional[Deferred] = None

    def start(self) -> None:
        """
        Send the head, and begin: from the store if resuming, else live.
        """
        request = self._request
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"cache-control", b"no-cache")
        # Proxies that buffer answers (nginx) pass this one through as it
        # comes.
        request.setHeader(b"x-accel-buffering", b"no")
        request.registerProducer(self, True)
        request.when_lost(self.end)
        # The head goes with the first bytes: a client knows the stream is
        # open before the first event.
        self._write(b": events\n\n")
        self._arm_heartbeat()
        self._streams.listen(self)
        if not self._resuming:
            self.live = True
            return
        d = ensureDeferred(self._catch_up())
        d.addErrback(self._failed)

    async def _catch_up(self) -> None:
        first = True
        store = self._streams._store
        page_size = self._streams.page
        while not self.ended:
            self._seam = []
            self._overflowed = False
            page = await store.read_events(self.after, page_size)
            if self.ended:
                return
            if first:
                first = False
                self._check_reset(page)
            wrote = []
            for event in page.events:
                if event.id <= self.after:
                    continue
                self.after = event.id
                if self.filter.matches(event):
                    wrote.append(frame(event))
            if wrote:
                self._write(b"".join(wrote))
            if len(page.events) >= page_size or self._overflowed:
                # More to read: at the pace the connection takes it.
                if self._paused:
                    self._resumed = Deferred()
                    await self._resumed
                continue
            break
        if self.ended:
            return
        seam, self._seam = self._seam, []
        self.live = True
        for event_id, encoded in seam:
            if event_id > self.after:
                self.take(event_id, encoded)
        self.flush()

    def _check_reset(self, page: Any) -> None:
        """
        Send C{reset} if the id resumed after is older than the oldest
        kept (events were removed after it) or newer than the newest (the
        store is another, or lost what it had told), and go on from what
        is kept.
        """
        oldest, newest = page.oldest, page.newest
        if oldest is None:
            if self.after > 0:
                self._write(_reset(1))
                self.after = 0
            return
        if self.after < oldest - 1:
            self._write(_reset(oldest))
            self.after = oldest - 1
        elif self.after > newest:
            self._write(_reset(oldest))
            self.after = newest
            # Nothing in this page is after that.
            page.events.clear()

    def _failed(self, failure: Failure) -> None:
        if not self.ended:
            log.failure("an event stream failed while reading stored events", failure)
            self.end()

    # Live events

    def take(self, event_id: int, encoded: bytes) -> bool:
        """
        An event for this stream; true if it is to be written at the next
        L{flush}.
        """
        if self.ended or event_id <= self._out_last:
            return False
        if not self.live:
            if not self._overflowed:
                self._seam.append((event_id, encoded))
                if len(self._seam) > self._streams.buffer:
                    # Read again from the store, which holds them all.
                    self._overflowed = True
                    self._seam = []
            return False
        if event_id <= self.after:
            return False
        if self._paused or self._backlog:
            self._backlog.append((event_id, encoded))
            if len(self._backlog) > self._streams.buffer:
                self._drop()
            return False
        self._out.append(encoded)
        self._out_last = event_id
        return len(self._out) == 1

    def flush(self) -> None:
        """
        Write what this publication brought.
        """
        if self._out and not self.ended:
            out, self._out = self._out, []
            self.after = self._out_last
            self._write(out[0] if len(out) == 1 else b"".join(out))

    def _drop(self) -> None:
        """
        Too far behind: a last C{dropped} event, and the end.
        """
        self._streams.dropped += 1
        self._backlog = []
        request = self._request
        request.unregisterProducer()
        self._paused = False
        self._write(_dropped(self.after))
        request.persistent = False
        self.end(finish=True)

    def _write(self, data: bytes) -> None:
        self._last_write = self._clock.seconds()
        self._request.write(data)

    # The connection's pauses

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        if self._backlog:
            backlog, self._backlog = self._backlog, []
            self.after = backlog[-1][0]
            self._out_last = max(self._out_last, self.after)
            self._write(b"".join(encoded for _, encoded in backlog))
        resumed, self._resumed = self._resumed, None
        if resumed is not None:
            resumed.callback(None)

    def stopProducing(self) -> None:
        self.end()

    # Keep-alive

    def _arm_heartbeat(self) -> None:
        # Due a heartbeat after the last bytes written.
        delay = self._last_write + self._streams.heartbeat - self._clock.seconds()
        self._beat = self._clock.callLater(max(0.0, delay), self._heartbeat)

    def _heartbeat(self) -> None:
        self._beat = None
        if self.ended:
            return
        if self._clock.seconds() >= self._last_write + self._streams.heartbeat:
            if self._paused:
                # Nothing is taken: a comment would only wait in the buffer.
                self._last_write = self._clock.seconds()
            else:
                self._write(KEEP_ALIVE)
        self._arm_heartbeat()

    # The end

    def end(self, finish: bool = False) -> None:
        """
        End the stream (the client went, it was dropped, the daemon
        stops); with C{finish}, end the answer too.
        """
        if self.ended:
            return
        self.ended = True
        self._streams.forget(self)
        if self._beat is not None and self._beat.active():
            self._beat.cancel()
        self._beat = None
        resumed, self._resumed = self._resumed, None
        if resumed is not None:
            resumed.callback(None)
        request = self._request
        if finish or not request._disconnected:
            request.unregisterProducer()
            request.finish()
