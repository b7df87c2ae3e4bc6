"""
A parser of Server-Sent Events (C{text/event-stream}), as the HTML
standard's "Parsing an event stream" and "Interpreting an event stream"
say, fed the bytes of a response as they come.

Why our own: the stream is a few rules (lines ended by CR, LF or CRLF,
C{field: value}, a blank line dispatches) and both clients need it, on
bytes that arrive in pieces that may split a line, a CRLF or a UTF-8
sequence anywhere.  The libraries that parse it are bound to one HTTP
client (httpx-sse to httpx, sseclient to requests) or to asyncio; this one
takes bytes from either.  tests/test_client_sse.py checks it against the
standard's examples and every split of them.
"""

from __future__ import annotations

import codecs
from typing import Optional

import attrs


@attrs.frozen
class ServerSentEvent:
    """
    One event as the standard dispatches it.

    @ivar type: its C{event} field, or C{"message"}.
    @ivar data: its C{data} lines, joined by LF.
    @ivar last_event_id: the last C{id} field seen on the stream, this
        event's or an earlier one's (C{""}: none yet).
    """

    type: str
    data: str
    last_event_id: str


class EventStreamParser:
    """
    Turns the bytes of one event stream into L{ServerSentEvent}s.

    @ivar retry: the reconnection time the stream last set, in
        milliseconds (its C{retry} field), or C{None}.
    """

    def __init__(self, last_event_id: str = "") -> None:
        self._decode = codecs.getincrementaldecoder("utf-8")("replace").decode
        self._text = ""
        self._started = False
        # A CR ended the last piece: an LF starting the next one belongs
        # to it.
        self._after_cr = False
        self._data: list[str] = []
        self._type = ""
        self._id = last_event_id
        self.retry: Optional[int] = None

    @property
    def last_event_id(self) -> str:
        """
        The stream's last event ID buffer: its last C{id} field (or what
        it was created with).
        """
        return self._id

    def feed(self, data: bytes) -> list[ServerSentEvent]:
        """
        The events that C{data}, the next bytes of the stream, completes.
        """
        text = self._decode(data)
        if not self._started and text:
            self._started = True
            if text.startswith("\ufeff"):
                text = text[1:]
        if text and self._after_cr:
            self._after_cr = False
            if text.startswith("\n"):
                text = text[1:]
        events: list[ServerSentEvent] = []
        self._text += text
        start = 0
        buffer = self._text
        size = len(buffer)
        while True:
            cr = buffer.find("\r", start)
            lf = buffer.find("\n", start)
            if cr < 0 and lf < 0:
                break
            if cr < 0 or (0 <= lf < cr):
                end, after = lf, lf + 1
            elif cr + 1 < size:
                end, after = cr, cr + 2 if buffer[cr + 1] == "\n" else cr + 1
            else:
                # A CR that ends the piece: the line ends here, and an LF
                # that starts the next piece is skipped.
                end, after = cr, cr + 1
                self._after_cr = True
            self._line(buffer[start:end], events)
            start = after
        self._text = buffer[start:]
        return events

    def _line(self, line: str, events: list[ServerSentEvent]) -> None:
        if not line:
            self._dispatch(events)
            return
        if line.startswith(":"):
            return
        field, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if field == "event":
            self._type = value
        elif field == "data":
            self._data.append(value)
        elif field == "id":
            if "\x00" not in value:
                self._id = value
        elif field == "retry":
            if value.isascii() and value.isdigit():
                self.retry = int(value)

    def _dispatch(self, events: list[ServerSentEvent]) -> None:
        data, kind = self._data, self._type
        self._data, self._type = [], ""
        if not data:
            return
        events.append(ServerSentEvent(kind or "message", "\n".join(data), self._id))
