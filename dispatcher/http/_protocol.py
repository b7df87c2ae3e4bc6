"""
The HTTP/1.1 server of the API: a connection protocol, a request and a
factory, lean where twisted.web is general.

Why not twisted.web: its server spends about 80 microseconds of a core on a
small POST (a bare twisted.web site answered 12,300 a second on one core
here), which is most of what a durable submission may cost if the daemon is
to keep up with a stock twisted.web echo server.  Most of that goes to what
the API never uses: resource traversal, sessions, form decoding, a header
object that normalises every name, a line-at-a-time parser.

The framing is llhttp's (through C{httptools}: the parser of Node.js and
uvicorn, maintained and fuzzed there), not ours: a hand-written parser here
let a bare LF in a chunked trailer hide a pipelined request, and took what
RFC 9112 forbids.  This module feeds it bytes and turns its callbacks into a
L{Request}, an object with the part of twisted.web's request interface the
API uses (C{method}, C{uri}, C{path}, C{postpath}, C{args}, C{content},
C{getHeader}, C{setHeader}, C{setResponseCode}, C{write}, C{finish},
C{notifyFinish}, C{registerProducer}, C{loseConnection}; and C{when_lost},
a lighter C{notifyFinish}), and writes the answer's head in one piece.
docs/http-parser.md has the measurement (microseconds per request, this
against the hand-written parser it replaced).

What it does of HTTP/1.1 (RFC 9112): persistent connections (HTTP/1.0 ones
with C{Connection: keep-alive}), pipelined requests answered in order, one
at a time, bodies by C{Content-Length} or C{Transfer-Encoding: chunked},
C{Expect: 100-continue}, HEAD, chunked answers when an answer's length is
not known up front.  It refuses, with a JSON error and a closed connection,
and before the API sees anything: whatever llhttp refuses (malformed
request lines, targets with control bytes or spaces, methods it does not
know, lowercase ones included, bare CR or LF line ends, malformed chunk
sizes and extensions, both C{Content-Length} and C{Transfer-Encoding}, two
lengths: 400); an HTTP/1.1 request without one C{Host} (400); a head over
C{MAX_HEAD_BYTES}, empty lines before it included, or with more than
C{MAX_HEADERS} fields (431); a body over C{max_body_bytes} (or over the
lower limit a head check set for that request), or in more than
C{max_body_bytes / MIN_CHUNK_BYTES} chunks, and never fewer than
C{MAX_CHUNKS} (413); a transfer coding other than chunked (501);
versions other than 1.0 and 1.1 (505); a head not whole within
C{head_timeout} seconds of its first byte, a body not whole within
C{body_timeout} seconds of its head, however the bytes trickle in (408).
A connection over C{max_connections}, or over C{max_connections_per_address}
from its address, is answered 503 before anything is read.  Idle
connections close after C{idle_timeout} seconds, and one whose client
takes none of what is sent to it for that long is cut off.
"""

from __future__ import annotations

import io
import ipaddress
import os
import re
import socket
import struct
import sys
import time
from collections import deque
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, Callable, Optional, Union
from urllib.parse import unquote_to_bytes

from httptools import (
    HttpParserError,
    HttpParserInvalidMethodError,
    HttpParserUpgrade,
    HttpRequestParser,
)
from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IProtocolNegotiationFactory,
    IPushProducer,
    IReactorTime,
    ISSLTransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES, parse_qs
from zope.interface import implementer

from dispatcher._throttle import Throttle
from dispatcher.http import _writethrough
from dispatcher.http._trim import HeapTrimmer
from dispatcher.wire._json import encode
from dispatcher.wire._submission import ApiError

log = Logger()

# The most bytes of a request line and headers (with any empty lines before
# them), and the most header lines.
MAX_HEAD_BYTES = 16384
MAX_HEADERS = 100
# The most chunks of a chunked request body: a body of max_body_bytes in
# chunks of MIN_CHUNK_BYTES or more on average, and never fewer than
# MAX_CHUNKS (a 1 MiB body in 64-byte chunks).  Each chunk costs a few
# Python calls; a million one-byte chunks would cost seconds of a core.
MAX_CHUNKS = 16384
MIN_CHUNK_BYTES = 64
# What a chunked body may carry on the wire beyond its data, per chunk
# (its size line, extensions and CRLFs), bounded so that extensions and
# trailers cannot grow without end.
CHUNK_FRAMING_BYTES = 64
# The most bytes given to llhttp at once: it cannot stop between requests,
# so this bounds how many requests one call makes, and how far past
# MAX_HEAD_BYTES a head that starts inside a piece may go unnoticed.
FEED_BYTES = 4096
# Bytes of the next pipelined requests read ahead while one is answered;
# past this the connection stops being read until the answer is out.
MAX_READ_AHEAD = 65536
# Seconds a closing connection may take to send what it still holds.
ABORT_TIMEOUT = 15.0
# TLS connections refused over a connection limit whose 503 is still going
# out, past which another is cut off at once, without one.  A refused
# connection on plain TCP closes within the reactor's next turn, but behind
# TLS its answer waits for a handshake the client may never make; this
# bounds the descriptors they hold (dispatcher.app._limits keeps room for
# them).
MAX_REFUSING = 64
# The seconds a client refused over a connection limit is told to wait.
RETRY_AFTER = 1

_STATUS_LINES: dict[tuple[bytes, int], bytes] = {}

def _bodiless(code: int) -> bool:
    """
    Whether an answer with this status has no body (RFC 9110, 6.4.1).
    """
    return code in (204, 304) or 100 <= code < 200


def _status_line(version: bytes, code: int) -> bytes:
    """
    An answer's status line, with the status's reason phrase.
    """
    line = _STATUS_LINES.get((version, code))
    if line is None:
        # The standard library knows more reason phrases than twisted.web
        # (431, for one).
        try:
            reason = HTTPStatus(code).phrase.encode("ascii")
        except ValueError:
            reason = RESPONSES.get(code, b"Unknown Status")
        line = b"%s %d %s\r\n" % (version, code, reason)
        _STATUS_LINES[(version, code)] = line
    return line


_CANONICAL: dict[bytes, bytes] = {}


def _canonical(name: bytes) -> bytes:
    """
    A header name as it is usually written (C{Content-Type}).
    """
    canonical = _CANONICAL.get(name)
    if canonical is None:
        canonical = b"-".join(part.capitalize() for part in name.split(b"-"))
        if len(_CANONICAL) < 1000:
            _CANONICAL[name] = canonical
    return canonical


class _Clock:
    """
    The C{Date} header's value and the access log's time stamp, formatted
    once a second rather than once a request.
    """

    def __init__(self, seconds: Callable[[], float]) -> None:
        self._seconds = seconds
        self._second = -1
        self._date = b""
        self._stamp = ""

    def _update(self) -> None:
        now = int(self._seconds())
        if now != self._second:
            self._second = now
            self._date = formatdate(now, usegmt=True).encode("ascii")
            self._stamp = time.strftime("[%d/%b/%Y:%H:%M:%S +0000]", time.gmtime(now))

    def date(self) -> bytes:
        self._update()
        return self._date

    def stamp(self) -> str:
        self._update()
        return self._stamp


class BadRequest(Exception):
    """
    A request this server refuses before the API sees it.

    @ivar body: the answer's JSON body, when not the plain error of
        C{code} and C{message} (a head check's L{ApiError}, with its field).
    @ivar headers: header lines the answer carries besides its framing.
    """

    def __init__(
        self, status: int, code: str, message: str, body: Optional[bytes] = None,
        headers: bytes = b"",
    ) -> None:
        Exception.__init__(self, message)
        self.status = status
        self.code = code
        self.message = message
        self.body = body
        self.headers = headers


def _refusal_of(error: ApiError) -> BadRequest:
    """
    The L{BadRequest} answering a head check's refusal.
    """
    extra = getattr(error, "headers", {})
    return BadRequest(
        error.status,
        error.code,
        error.message,
        encode(error.to_json()),
        b"".join(_canonical(name) + b": " + value + b"\r\n" for name, value in extra.items()),
    )


def _error_body(code: str, message: str) -> bytes:
    return encode({"error": {"code": code, "message": message, "field": None}})


class Request:
    """
    One request and its answer.  Its attributes and methods are those of
    C{twisted.web.server.Request} that the API uses, with their meanings.
    """

    finished = False
    # Whether the connection stays open after the answer (the request's
    # Connection header and version; an HTTP/1.0 answer of unknown length
    # ends it).
    persistent = True
    _disconnected = False
    code = 200
    _started = False
    _chunked = False
    _sent = 0
    _args: Optional[dict] = None
    _finish_waiters: Optional[list] = None
    _lost_callbacks: Optional[list] = None
    # What the factory's head check said of the request: the API's caller.
    principal: Any = None

    def __init__(
        self,
        channel: "HTTPChannel",
        method: bytes,
        uri: bytes,
        version: bytes,
        headers: dict[bytes, bytes],
        content: bytes,
    ) -> None:
        self.channel = channel
        self.method = method
        self.uri = uri
        self.clientproto = version
        self.requestHeaders = headers
        self.content = io.BytesIO(content)
        path, _, self._query = uri.partition(b"?")
        self.path = path
        segments = path[1:].split(b"/")
        if b"%" in path:
            segments = [unquote_to_bytes(s) for s in segments]
        self.postpath = segments
        self.responseHeaders: dict[bytes, bytes] = {}

    @property
    def args(self) -> dict[bytes, list[bytes]]:
        if self._args is None:
            # (Most requests have no query: nothing to parse.)
            self._args = parse_qs(self._query, 1) if self._query else {}
        return self._args

    def getHeader(self, name: bytes) -> Optional[bytes]:
        return self.requestHeaders.get(name.lower())

    def setHeader(self, name: bytes, value: bytes) -> None:
        self.responseHeaders[name.lower()] = value

    def setResponseCode(self, code: int) -> None:
        self.code = code

    def notifyFinish(self) -> Deferred:
        """
        A Deferred that fires when the answer is out, or fails when the
        connection is lost first.
        """
        d: Deferred = Deferred()
        if self.finished:
            d.callback(None)
        elif self._disconnected:
            d.errback(Failure(error.ConnectionDone("the connection closed")))
        else:
            if self._finish_waiters is None:
                self._finish_waiters = []
            self._finish_waiters.append(d)
        return d

    def when_lost(self, callback: Callable[[], Any]) -> None:
        """
        Call C{callback()} if the connection is lost before the answer is
        out: L{notifyFinish}'s errback without a Deferred for every request.
        """
        if self.finished:
            return
        if self._disconnected:
            callback()
            return
        if self._lost_callbacks is None:
            self._lost_callbacks = []
        self._lost_callbacks.append(callback)

    def _head(self) -> bytes:
        self._started = True
        headers = self.responseHeaders
        if b"content-length" not in headers and not _bodiless(self.code):
            if self.clientproto == b"HTTP/1.1":
                self._chunked = True
                headers[b"transfer-encoding"] = b"chunked"
            else:
                # An HTTP/1.0 client reads to the close.
                self.persistent = False
        if not self.persistent:
            headers[b"connection"] = b"close"
        elif self.clientproto == b"HTTP/1.0":
            headers[b"connection"] = b"keep-alive"
        parts = [
            _status_line(self.clientproto, self.code),
            b"Date: ",
            self.channel.factory.clock.date(),
            b"\r\n",
        ]
        for name, value in headers.items():
            parts += (_canonical(name), b": ", value, b"\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    def write(self, data: bytes) -> None:
        if self.finished or self._disconnected:
            return
        head = b"" if self._started else self._head()
        if self.method == b"HEAD":
            data = b""
        elif self._chunked and data:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        self._sent += len(data)
        self.channel._send(self.channel.transport, head + data if head else data)

    def finish(self) -> None:
        if self.finished or self._disconnected:
            return
        if not self._started:
            if b"content-length" not in self.responseHeaders and not _bodiless(self.code):
                self.responseHeaders[b"content-length"] = b"0"
            self.channel._send(self.channel.transport, self._head())
        elif self._chunked and self.method != b"HEAD":
            self.channel._send(self.channel.transport, b"0\r\n\r\n")
        self.finished = True
        waiters, self._finish_waiters = self._finish_waiters, None
        self._lost_callbacks = None
        for d in waiters or ():
            d.callback(None)
        self.channel.request_done(self)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        """
        Have C{producer} (a push producer) paused while the connection's
        send buffer is full.
        """
        if not streaming:
            raise ValueError("only push (streaming) producers are supported")
        channel = self.channel
        channel._producer = producer
        if channel._writes_paused:
            producer.pauseProducing()

    def unregisterProducer(self) -> None:
        self.channel._producer = None

    def loseConnection(self) -> None:
        self.channel.close()

    def _connection_lost(self, reason: Failure) -> None:
        self._disconnected = True
        waiters, self._finish_waiters = self._finish_waiters, None
        for d in waiters or ():
            d.errback(reason)
        callbacks, self._lost_callbacks = self._lost_callbacks, None
        for callback in callbacks or ():
            callback()

    def log_line(self, client: str, stamp: str) -> str:
        """
        The request's line in the Combined Log Format, as twisted.web
        writes it, its fields escaped as nginx escapes them (L{_quote}).
        """
        referrer = _quote(self.requestHeaders.get(b"referer", b"-"))
        agent = _quote(self.requestHeaders.get(b"user-agent", b"-"))
        return (
            f'"{client}" - - {stamp} "{_quote(self.method)} {_quote(self.uri)} '
            f'{self.clientproto.decode("ascii")}" {self.code} '
            f'{self._sent if self._started else "-"} "{referrer}" "{agent}"\n'
        )



# The bytes a field of the access log shows as they are: printable ASCII
# but the quote and the backslash.  Anything else is written \xHH, as nginx
# writes its log (escape=default), so that no field can end early or forge
# a line: a User-Agent of  x" 200 "y  or one with a backslash before a quote
# could make a parser read fields the client chose.
_LOG_UNSAFE = re.compile(rb"[^\x20\x21\x23-\x5b\x5d-\x7e]")
_LOG_ESCAPES = {bytes([byte]): b"\\x%02X" % byte for byte in range(256)}


def _quote(value: bytes) -> str:
    """
    C{value} as a field of the access log: printable ASCII, with C{"},
    C{\\}, control bytes and any byte above 0x7E as C{\\xHH}.
    """
    if _LOG_UNSAFE.search(value) is not None:
        value = _LOG_UNSAFE.sub(lambda match: _LOG_ESCAPES[match[0]], value)
    return value.decode("ascii")


# Where the parse of the next request stands: no byte of it yet, its head
# being read, its body being read.
_IDLE, _HEAD, _BODY = range(3)


def _parse_error(e: HttpParserError) -> BadRequest:
    """
    The refusal for what llhttp would not parse, with its reason.
    """
    reason = str(e) or "malformed request"
    if isinstance(e, HttpParserInvalidMethodError):
        reason += " (methods are upper case: GET, POST, DELETE, ...)"
    return BadRequest(
        400, "bad_request", f"the request is not well-formed HTTP/1.1: {reason}"
    )


def _too_large(limit: int) -> BadRequest:
    return BadRequest(
        413,
        "body_too_large",
        f"the request body is larger than {limit} bytes ([server] max_body_bytes)",
    )


def _bad(message: str) -> BadRequest:
    return BadRequest(400, "bad_request", message)


def _too_many(message: str) -> BadRequest:
    return BadRequest(
        503, "too_many_connections", message, headers=b"Retry-After: %d\r\n" % RETRY_AFTER
    )


def _address_key(channel: "HTTPChannel", peer: Any) -> Any:
    """
    What the per-address limit counts C{channel}'s connection under: its
    IPv4 address; the /64 of an IPv6 one (a host is given a /64, and can
    take any address in it); on a UNIX socket, the caller's account.
    """
    host = getattr(peer, "host", None)
    if host is None:
        return ("uid", channel.peer_uid())
    if ":" not in host:
        return host
    if host.startswith("::ffff:") and "." in host:
        # An IPv4 client of a dual-stack listener.
        return host[7:]
    try:
        return ipaddress.IPv6Address(host).packed[:8]
    except ValueError:
        return host


@implementer(IPushProducer)
class HTTPChannel(Protocol):
    """
    One client connection: feeds what it reads to an llhttp parser and
    hands each request, one at a time, to the factory's C{handler}.

    llhttp cannot be paused between two requests, so a read that holds
    several pipelined requests gives several at once; they wait in
    C{_ready}, in order, and the bytes after the one that completed a
    request are held unparsed (C{_held}) until the answers are out.  The
    connection is read no further than C{MAX_READ_AHEAD} bytes held, and no
    new request is taken while the transport's send buffer is full (it is
    the transport's producer, and passes pauses on to an answer's own
    producer): a client that sends without reading gets nothing buffered
    for it beyond that.  A connection being closed is aborted if the
    client has not taken what was written within C{ABORT_TIMEOUT} seconds;
    one whose send buffer stays full for C{idle_timeout} seconds is aborted
    too (nginx's C{send_timeout}), a request in progress or not.

    One timer per connection keeps the head, body, idle and send
    deadlines: it is set once per timeout and, when it fires early, set
    again for the rest, so a request costs no timer of its own.  The head
    and body deadlines count from the head's first byte and the head's
    end, not from the last byte read (nginx's C{client_header_timeout},
    not an idle timer that each byte resets).
    """

    factory: "HTTPFactory"
    # Whether the connection may stay open after the request being read.
    _keep_alive = True
    _request: Optional[Request] = None
    _timer: Any = None
    _abort_timer: Any = None
    _producer: Any = None
    _pumping = False
    # Reading is over: the connection is closing, or a refusal waits to be
    # sent after the answers before it.
    _stopped = False
    # Whether the transport's send buffer is full, and whether reading is
    # paused (for that, or for read-ahead).
    _writes_paused = False
    _reads_paused = False
    # When the send buffer last filled.
    _paused_at = 0.0
    # A 100 Continue owed to the request being read, once those before it
    # are answered.
    _continue_due = False
    # The largest body of the request being read, and the refusal past it
    # when it is not the factory's (limit_body).
    _body_limit = 0
    _body_refusal: Optional[BadRequest] = None

    def __init__(self) -> None:
        self._parser = HttpRequestParser(self)
        # Requests parsed and not yet handed over (and a refusal after
        # them), and bytes read and not yet parsed.
        self._ready: deque[Union[Request, BadRequest]] = deque()
        self._held: deque[bytes] = deque()
        self._held_size = 0
        self._phase = _IDLE
        # Bytes of the head being read; when its phase began.
        self._head_seen = 0
        self._since = 0.0
        self._last = 0.0
        self._client = "-"
        self._version = b"HTTP/1.1"
        self._new_message()

    def _new_message(self) -> None:
        self._verdict = None
        self._url = b""
        self._headers: dict[bytes, bytes] = {}
        self._header_count = 0
        self._body: list[bytes] = []
        self._body_size = 0
        self._chunks = 0
        self._chunked = False
        self._wire = 0

    def connectionMade(self) -> None:
        factory = self.factory
        self._send = factory.send
        self._seconds = factory.reactor.seconds
        peer = self.transport.getPeer()
        self._client = str(getattr(peer, "host", "-"))
        refusal = factory._admit(self, peer)
        if refusal is not None:
            self._refuse_connection(refusal)
            return
        self.transport.registerProducer(self, True)
        self._last = self._seconds()
        step = factory._shortest_timeout
        if step is not None:
            self._timer = factory.reactor.callLater(step, self._check_time)

    # What the connection counts against: the key of its address in the
    # factory's count (None: not counted, not admitted); or, refused, that
    # it waits for its 503 to go out.
    _address: Any = None
    _admitted = False
    _refused = False

    def _refuse_connection(self, refusal: BadRequest) -> None:
        """
        Answer a connection over a limit with C{refusal} and close it.  On
        plain TCP or a UNIX socket the answer goes out and the connection
        closes within the reactor's next turn; behind TLS the answer waits
        for the client's handshake, so such connections are counted, and
        past C{MAX_REFUSING} of them one more is cut off at once.
        """
        factory = self.factory
        self._stopped = True
        if ISSLTransport.providedBy(self.transport):
            if factory._refusing >= MAX_REFUSING:
                self.transport.abortConnection()
                return
            factory._refusing += 1
            self._refused = True
        self._refuse(refusal)

    _peer_uid: Any = False

    def peer_uid(self) -> Optional[int]:
        """
        The account of the process at the other end of a UNIX socket, as
        the kernel tells it (C{SO_PEERCRED}, taken when it connected), or
        C{None} on any other transport.
        """
        if self._peer_uid is False:
            uid = None
            try:
                handle = self.transport.getHandle()
                if handle.family == socket.AF_UNIX:
                    raw = handle.getsockopt(
                        socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")
                    )
                    uid = struct.unpack("3i", raw)[1]
            except (AttributeError, OSError):
                uid = None
            self._peer_uid = uid
        return self._peer_uid

    @property
    def client(self) -> str:
        """
        The client's address, as the access log shows it.
        """
        return self._client

    # Time

    def _timeout_now(self) -> Optional[float]:
        """
        The timeout that applies now: none while an answer is pending (the
        client waits for us), else the head's, the body's, or the idle one.
        """
        if self._request is not None or self._ready or self._writes_paused:
            return None
        factory = self.factory
        if self._phase == _HEAD:
            return factory.head_timeout
        if self._phase == _BODY:
            return factory.body_timeout
        return factory.idle_timeout

    def _check_time(self) -> None:
        """
        Refuse a head or a body that has taken too long (408), or close a
        connection idle too long.
        """
        self._timer = None
        if self._stopped:
            return
        factory = self.factory
        now = self._seconds()
        timeout = self._timeout_now()
        idle = factory.idle_timeout
        if self._writes_paused and idle is not None:
            # A client that takes none of what was written for as long as
            # a connection may idle is cut off (nginx's send_timeout): one
            # that reads a byte now and then would hold the connection,
            # its buffers and a pending answer for ever.
            left = self._paused_at + idle - now
            if left <= 0:
                self._stopped = True
                self.transport.abortConnection()
                return
            self._last = now
            left = min(left, factory._shortest_timeout)
        elif timeout is None:
            # Busy, or no timeout for this phase: look again later.  The
            # clock of what is read restarts when the answer is out.
            self._last = now
            left = factory._shortest_timeout
        else:
            start = self._last if self._phase == _IDLE else self._since
            left = start + timeout - now
            if left <= 0:
                if self._phase == _IDLE:
                    self.close()
                elif self._phase == _HEAD:
                    self._fail(BadRequest(
                        408, "request_timeout",
                        f"the request head was not complete within {timeout:g} "
                        "seconds ([server] head_timeout)",
                    ))
                else:
                    self._fail(BadRequest(
                        408, "request_timeout",
                        f"the request body was not complete within {timeout:g} "
                        "seconds ([server] body_timeout)",
                    ))
                return
        self._timer = factory.reactor.callLater(left, self._check_time)

    def _watch(self) -> None:
        """
        Bring the timer forward if the phase that began is due before it.
        """
        timer = self._timer
        timeout = self._timeout_now()
        if timer is None or timeout is None:
            return
        due = self._since + timeout
        if timer.getTime() > due:
            timer.reset(max(0.0, due - self._seconds()))

    def close(self) -> None:
        """
        Close once what was written is out; abort if that takes longer
        than C{ABORT_TIMEOUT} seconds (the client does not read).
        """
        self._stopped = True
        self._ready.clear()
        self._held.clear()
        self._held_size = 0
        self.transport.loseConnection()
        if self._abort_timer is None:
            self._abort_timer = self.factory.reactor.callLater(
                ABORT_TIMEOUT, self.transport.abortConnection
            )

    # The transport's producer

    def pauseProducing(self) -> None:
        if not self._writes_paused:
            self._paused_at = self._seconds()
        self._writes_paused = True
        if self._producer is not None:
            self._producer.pauseProducing()
        self._update_reading()

    def resumeProducing(self) -> None:
        self._writes_paused = False
        if self._producer is not None:
            self._producer.resumeProducing()
        if self._request is None:
            self._restart_clock()
            self._pump()
        self._update_reading()

    def stopProducing(self) -> None:
        if self._producer is not None:
            self._producer.stopProducing()

    def _update_reading(self) -> None:
        pause = self._writes_paused or self._held_size > MAX_READ_AHEAD
        if pause and not self._reads_paused:
            self._reads_paused = True
            self.transport.pauseProducing()
        elif not pause and self._reads_paused:
            self._reads_paused = False
            self.transport.resumeProducing()

    # Reading

    def dataReceived(self, data: bytes) -> None:
        if self._stopped:
            return
        self._last = self._seconds()
        if self._request is not None or self._ready or self._writes_paused:
            self._held.append(data)
            self._held_size += len(data)
            self._update_reading()
            return
        self._feed(data)
        if self._ready:
            self._pump()
        if self._phase != _IDLE:
            self._watch()

    def _feed(self, data: bytes) -> None:
        """
        Parse C{data}, up to the end of the first piece that completes a
        request; hold the rest.

        It is fed in pieces of at most C{FEED_BYTES}, and a head no more
        than one byte past C{MAX_HEAD_BYTES}, so that a head is known to be
        too large before more of it is parsed (exactly when it starts a
        piece, as a request after an idle connection or an answer does;
        within C{FEED_BYTES} when it starts after another request in the
        same piece), and one piece makes at most a few hundred requests.
        """
        parser = self._parser
        size = len(data)
        pos = 0
        while pos < size:
            phase = self._phase
            if phase == _BODY:
                room = FEED_BYTES
            else:
                if phase == _IDLE:
                    # Empty lines before a request are part of its head.
                    self._phase = _HEAD
                    self._since = self._last
                room = min(FEED_BYTES, MAX_HEAD_BYTES + 1 - self._head_seen)
            piece = data if pos == 0 and size <= room else data[pos:pos + room]
            length = len(piece)
            if phase != _BODY:
                self._head_seen += length
            elif self._chunked:
                self._wire += length
                if self._wire > self.factory._chunked_wire_limit:
                    self._fail(BadRequest(
                        413, "body_too_large",
                        "the chunked request body's framing (chunk sizes, "
                        "extensions, trailers) is too large",
                    ))
                    return
            try:
                parser.feed_data(piece)
            except HttpParserUpgrade as e:
                # A request that asked to switch protocols, and had no body
                # (one with a body was refused): answered as any other, and
                # what follows it is parsed as the next request.
                length = e.args[0]
            except HttpParserError as e:
                refusal = self._refusal
                self._refusal = None
                self._fail(refusal if refusal is not None else _parse_error(e))
                return
            pos += length
            if self._phase == _HEAD and self._head_seen > MAX_HEAD_BYTES:
                self._fail(BadRequest(
                    431, "head_too_large",
                    f"the request line and headers exceed {MAX_HEAD_BYTES} bytes",
                ))
                return
            if self._ready:
                if pos < size:
                    self._held.appendleft(data[pos:])
                    self._held_size += size - pos
                return

    _refusal: Optional[BadRequest] = None

    def _refuse_in_callback(self, refusal: BadRequest) -> None:
        # Raised out of a parser callback, an exception stops the parser
        # and comes back from feed_data wrapped; the refusal is kept here.
        self._refusal = refusal
        raise refusal

    # llhttp's callbacks

    def on_message_begin(self) -> None:
        """
        llhttp: the first byte of a request line.
        """
        if self._phase == _IDLE:
            self._phase = _HEAD
            self._since = self._last

    def on_url(self, url: bytes) -> None:
        """
        llhttp: (a piece of) the request target.
        """
        # llhttp may give the target in pieces, split where reads were.
        self._url = self._url + url if self._url else url

    def on_header(self, name: bytes, value: bytes) -> None:
        """
        llhttp: a header field (or a trailer field, dropped).
        """
        if self._phase == _BODY:
            # A trailer field: read (within the framing bound) and dropped.
            return
        self._header_count += 1
        if self._header_count > MAX_HEADERS:
            self._refuse_in_callback(BadRequest(
                431, "head_too_large", f"more than {MAX_HEADERS} header lines"
            ))
        name = name.lower()
        # llhttp drops the whitespace before a value, not after it.
        value = value.rstrip(b" \t")
        headers = self._headers
        if name in headers:
            if name == b"host":
                self._refuse_in_callback(_bad("a request may have only one Host header"))
            value = headers[name] + b", " + value
        headers[name] = value

    def on_headers_complete(self) -> None:
        """
        llhttp: the end of the head.  The checks llhttp leaves to a
        server, and the 100 Continue.
        """
        parser = self._parser
        headers = self._headers
        version = parser.get_http_version()
        self._phase = _BODY
        self._since = self._last
        if version == "1.1":
            self._version = b"HTTP/1.1"
            if b"host" not in headers:
                self._refuse_in_callback(_bad("an HTTP/1.1 request must have a Host header"))
        elif version == "1.0":
            self._version = b"HTTP/1.0"
        elif version == "0.9":
            self._refuse_in_callback(_bad("the request line has no HTTP version"))
        else:
            self._refuse_in_callback(BadRequest(
                505, "version_not_supported", "only HTTP/1.1 and HTTP/1.0 are served"
            ))
        url = self._url
        if url[:1] != b"/":
            self._url = self._origin_form(url)
        # The head check may lower it (limit_body).
        self._body_limit = self.factory.max_body_bytes
        self._body_refusal = None
        check = self.factory.head_check
        if check is not None:
            # Before the body is read and a 100 Continue invites one: a
            # caller without a credential sends nothing more (the
            # refusal closes the connection), and a body's size says
            # nothing to a stranger (401 before 413).
            verdict = check(self, parser.get_method(), self._url, headers)
            if isinstance(verdict, ApiError):
                self._refuse_in_callback(_refusal_of(verdict))
            self._verdict = verdict
        # Connection is read as a list of tokens, by llhttp.
        self._keep_alive = parser.should_keep_alive()
        coding = headers.get(b"transfer-encoding")
        expected = False
        if coding is not None:
            # llhttp has refused codings that do not end in chunked, and
            # Content-Length with it.
            if coding.lower() != b"chunked":
                self._refuse_in_callback(BadRequest(
                    501, "not_implemented",
                    "only the chunked transfer coding is understood",
                ))
            if version == "1.0":
                # Faulty framing for HTTP/1.0 (RFC 9112, 6.1): read it,
                # answer, and close.
                self._keep_alive = False
            self._chunked = expected = True
        else:
            length = headers.get(b"content-length")
            if length is not None:
                # llhttp has checked that it is digits, and that there is
                # one.
                if len(length) > 18 or int(length) > self._body_limit:
                    self._refuse_in_callback(self._too_large())
                expected = length != b"0"
        if expected and parser.should_upgrade():
            # llhttp would take the body for the new protocol's bytes.
            self._refuse_in_callback(_bad(
                "a request that asks to switch protocols may not have a body"
            ))
        if expected and version == "1.1" and (
            headers.get(b"expect", b"").lower() == b"100-continue"
        ):
            if self._request is None and not self._ready:
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            else:
                self._continue_due = True

    def _origin_form(self, uri: bytes) -> bytes:
        """
        The path and query of an absolute-form target (RFC 9112, 3.2.2).
        """
        scheme, sep, rest = uri.partition(b"://")
        if sep and scheme.lower() in (b"http", b"https"):
            slash = rest.find(b"/")
            return rest[slash:] if slash >= 0 else b"/"
        if uri == b"*":
            return b"*"
        self._refuse_in_callback(_bad("malformed request target"))
        return uri

    def on_chunk_header(self) -> None:
        """
        llhttp: a chunk's size line; counted against the factory's
        C{max_chunks}.
        """
        self._chunks += 1
        # The last, empty chunk is announced too.
        if self._chunks > self.factory.max_chunks + 1:
            self._refuse_in_callback(BadRequest(
                413, "body_too_large",
                f"the chunked request body has more than {self.factory.max_chunks} chunks",
            ))

    def on_body(self, data: bytes) -> None:
        """
        llhttp: a piece of the body, kept as a piece: joined once, at the
        end, so that a body in many small reads costs no more than one.
        """
        self._body_size += len(data)
        if self._body_size > self._body_limit:
            # Refused before it is kept: a chunked body past its limit
            # holds no more than the limit.
            self._refuse_in_callback(self._too_large())
        self._body.append(data)

    def _too_large(self) -> BadRequest:
        """
        The refusal of a body over the request's limit.
        """
        if self._body_refusal is not None:
            return self._body_refusal
        return _too_large(self.factory.max_body_bytes)

    def limit_body(self, limit: int, refusal: ApiError) -> None:
        """
        For the head check: the body of the request whose head is being
        checked may have C{limit} bytes at most (less than the factory's
        C{max_body_bytes}); a longer one is answered with C{refusal} and
        the connection closed, as soon as its head (a C{Content-Length})
        or its bytes (chunked) say so, with no more of it kept.
        """
        if limit < self._body_limit:
            self._body_limit = limit
            self._body_refusal = _refusal_of(refusal)

    def on_message_complete(self) -> None:
        """
        llhttp: the end of the request: it waits its turn in C{_ready}.
        """
        body = self._body
        if len(body) > 1:
            # A body of more than one read: its pieces are freed now, the
            # whole of it once the request is answered.
            self.factory.heap.released(self._body_size)
        request = Request(
            self,
            self._parser.get_method(),
            self._url,
            self._version,
            self._headers,
            body[0] if len(body) == 1 else b"".join(body),
        )
        if not self._keep_alive:
            request.persistent = False
        request.principal = self._verdict
        # The body is whole: no 100 Continue is owed for it any more.
        self._continue_due = False
        self._ready.append(request)
        self._phase = _IDLE
        self._head_seen = 0
        self._new_message()

    # Answering

    def _pump(self) -> None:
        """
        Hand over the next request, or parse what is held, while nothing is
        being answered and the client takes what is written.
        """
        if self._pumping:
            return
        self._pumping = True
        try:
            while self._request is None and not self._writes_paused:
                ready = self._ready
                if ready:
                    item = ready.popleft()
                    if type(item) is BadRequest:
                        self._refuse(item)
                        return
                    self._dispatch(item)
                    continue
                if self._stopped:
                    return
                if self._continue_due:
                    self._continue_due = False
                    self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                if not self._held:
                    break
                data = self._held.popleft()
                self._held_size -= len(data)
                self._feed(data)
        finally:
            self._pumping = False
        if self._reads_paused:
            self._update_reading()

    def _dispatch(self, request: Request) -> None:
        self._request = request
        try:
            self.factory.handler(request)
        except Exception:
            # The handler answers its own errors; this is a bug.
            log.failure("answering {uri} failed", uri=request.uri)
            if request._started:
                # Half an answer must not pass for a whole one.
                self._stopped = True
                self._ready.clear()
                self.transport.abortConnection()
                return
            request.setResponseCode(500)
            body = _error_body("internal_error", "the dispatcher failed to answer")
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"content-length", b"%d" % len(body))
            request.persistent = False
            request.write(body)
            request.finish()

    def _restart_clock(self) -> None:
        # A head or body held back while answers went out is timed from
        # now: the wait was ours, not the client's.
        now = self._seconds()
        self._last = now
        if self._phase != _IDLE:
            self._since = now

    def request_done(self, request: Request) -> None:
        """
        The answer to C{request} is out: log it, then go on or close.
        """
        if request is self._request:
            self._request = None
            if not request.persistent:
                self.close()
            else:
                self._restart_clock()
                if self._ready or self._held or self._continue_due:
                    self._pump()
        if self.factory.log_file is not None:
            self.factory.log(request, self._client)

    def _fail(self, refusal: BadRequest) -> None:
        """
        Stop reading; refuse once the requests before are answered.
        """
        self._stopped = True
        self._held.clear()
        self._held_size = 0
        if self._request is None and not self._ready:
            self._refuse(refusal)
        else:
            self._ready.append(refusal)

    def _refuse(self, e: BadRequest) -> None:
        body = e.body if e.body is not None else _error_body(e.code, e.message)
        version = b"HTTP/1.0" if self._version == b"HTTP/1.0" else b"HTTP/1.1"
        self.transport.write(
            _status_line(version, e.status)
            + e.headers
            + b"Content-Type: application/json\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n" % len(body)
            + body
        )
        self.close()

    def connectionLost(self, reason: Optional[Failure] = None) -> None:
        if reason is None:
            reason = Failure(error.ConnectionDone("the connection closed"))
        self._stopped = True
        factory = self.factory
        if self._admitted:
            self._admitted = False
            factory._release(self._address)
        elif self._refused:
            self._refused = False
            factory._refusing -= 1
        self._held.clear()
        self._ready.clear()
        if self._body:
            # A body cut off: let it go now rather than with the channel,
            # which its parser holds in a cycle that only the collector
            # breaks, maybe much later.
            self._body = []
            factory.heap.released(self._body_size)
        self._producer = None
        for timer in (self._timer, self._abort_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._timer = self._abort_timer = None
        request, self._request = self._request, None
        if request is not None and not request.finished:
            request._connection_lost(reason)


@implementer(IProtocolNegotiationFactory)
class HTTPFactory(Factory):
    """
    Makes an L{HTTPChannel} for each connection and holds what they share:
    the handler, the limits, and the access log.

    Behind a TLS endpoint (C{ssl:}) it offers ALPN C{http/1.1}, the one
    protocol it speaks: Twisted's TLS server answers every client that
    offers ALPN (curl, browsers) with the protocols the wrapped factory
    names, and with none named it failed the handshake with an
    C{internal error} alert.

    The access log gets one line per request in the Combined Log Format,
    in the file C{access_log_path} (or none).  It is written through a
    64 KiB buffer that is flushed every C{flush_interval} seconds and when
    the factory stops: a line is at most that late, and a request costs no
    write of its own.

    @param handler: called with each L{Request}; answers it, now or later.
    @param max_body_bytes: the largest request body taken.
    @param reactor: for time and timers.
    @param idle_timeout: seconds a connection may idle with no request in
        progress before it is closed, or C{None} for never.
    @param head_timeout: seconds a request's head may take from its first
        byte (an empty line before it counts) to its end, or C{None} for no
        limit; then a 408 and the connection closes.
    @param body_timeout: seconds a request's body may take after its head,
        or C{None} for no limit; then a 408 and the connection closes.
    @param write_through: write answers straight to the socket when
        nothing is queued (L{dispatcher.http._writethrough}, which reads
        Twisted's private API); C{False} writes through C{transport.write}
        only.
    @param head_check: called with the channel, the method, the target and
        the headers of each request once its head is read, before its body
        is (and before a C{100 Continue}): an L{ApiError} it returns is
        answered at once and the connection closed; anything else becomes
        the request's C{principal}.  It may lower the body's limit for that
        request (L{HTTPChannel.limit_body}).
    @param max_connections: the most connections open at once, or C{None}
        for no limit.  One more is accepted, answered C{503
        too_many_connections} and closed.
    @param max_connections_per_address: the most connections open at once
        from one address, or C{None} for no limit; over it, the same.  An
        address is an IPv4 address, an IPv6 /64 (what one host is given),
        or on a UNIX socket the caller's account.

    Refused connections are logged at warning, at most one line a minute
    for each limit, with how many were refused since the last.
    """

    protocol = HTTPChannel
    buffer_size = 65536

    def acceptableProtocols(self) -> list[bytes]:
        """
        The ALPN protocols a TLS connection may settle on: HTTP/1.1 alone
        (a client offering only C{h2} is refused in the handshake).
        """
        return [b"http/1.1"]

    def __init__(
        self,
        handler: Callable[[Request], Any],
        max_body_bytes: int,
        reactor: IReactorTime,
        access_log_path: Optional[str] = None,
        idle_timeout: Optional[float] = 60.0,
        flush_interval: float = 1.0,
        head_timeout: Optional[float] = 30.0,
        body_timeout: Optional[float] = 60.0,
        write_through: bool = False,
        head_check: Optional[Callable[["HTTPChannel", bytes, bytes, dict], Any]] = None,
        max_connections: Optional[int] = None,
        max_connections_per_address: Optional[int] = None,
    ) -> None:
        self.handler = handler
        self.max_connections = max_connections
        self.max_connections_per_address = max_connections_per_address
        # Connections open and admitted, in all and by address; refused
        # ones whose 503 is still going out.
        self.connections = 0
        self._by_address: dict[Any, int] = {}
        self._refusing = 0
        self._over_total = Throttle(reactor)
        self._over_address = Throttle(reactor)
        self.head_check = head_check
        self.max_body_bytes = max_body_bytes
        self.reactor = reactor
        self.idle_timeout = idle_timeout
        self.head_timeout = head_timeout
        self.body_timeout = body_timeout
        timeouts = [t for t in (idle_timeout, head_timeout, body_timeout) if t is not None]
        # How often a connection's timer looks, at most.
        self._shortest_timeout = min(timeouts) if timeouts else None
        self.max_chunks = max(MAX_CHUNKS, max_body_bytes // MIN_CHUNK_BYTES)
        self._chunked_wire_limit = (
            max_body_bytes + self.max_chunks * CHUNK_FRAMING_BYTES + MAX_HEAD_BYTES
        )
        self.send = (
            _writethrough.send
            if write_through and _writethrough.supported()
            else _writethrough.write
        )
        self.access_log_path = access_log_path
        self.heap = HeapTrimmer(reactor)
        self.clock = _Clock(reactor.seconds)
        self.log_file: Optional[Any] = None
        self._flush_interval = flush_interval
        self._flusher: Optional[LoopingCall] = None
        self._log_failed_at = float("-inf")

    def _admit(self, channel: HTTPChannel, peer: Any) -> Optional[BadRequest]:
        """
        Count C{channel}'s connection from C{peer} in, or say why it may
        not be: the 503 it gets.
        """
        limit = self.max_connections
        if limit is not None and self.connections >= limit:
            self._refused(
                self._over_total, "[server] max_connections", channel.client,
                f"{self.connections} connections are open",
            )
            return _too_many(
                f"the dispatcher has {self.connections} connections open, the most "
                "it takes ([server] max_connections); try again later"
            )
        per_address = self.max_connections_per_address
        if per_address is not None:
            key = _address_key(channel, peer)
            count = self._by_address.get(key, 0)
            if count >= per_address:
                self._refused(
                    self._over_address, "[server] max_connections_per_address",
                    channel.client, f"{count} connections are open from its address",
                )
                return _too_many(
                    f"this address has {count} connections open, the most the "
                    "dispatcher takes from one ([server] max_connections_per_address); "
                    "close some, or try again later"
                )
            self._by_address[key] = count + 1
            channel._address = key
        self.connections += 1
        channel._admitted = True
        return None

    def _release(self, key: Any) -> None:
        """
        An admitted connection from the address of C{key} closed.
        """
        self.connections -= 1
        if key is not None:
            count = self._by_address[key] - 1
            if count:
                self._by_address[key] = count
            else:
                del self._by_address[key]

    def _refused(self, throttle: Throttle, key: str, client: str, why: str) -> None:
        count = throttle.happened()
        if count is not None:
            log.warn(
                "refused a connection from {client} with 503: {why}, the most {key} "
                "allows ({count} refused since the last line; logged at most once a "
                "minute)",
                client=client, why=why, key=key, count=count,
            )

    def startFactory(self) -> None:
        if self.access_log_path is None:
            return
        self.log_file = open(
            self.access_log_path, "a", buffering=self.buffer_size, encoding="utf-8",
            newline="\n",
            # Readable by the daemon's account alone, whatever the umask: it
            # names clients and what they asked.
            opener=lambda path, flags: os.open(path, flags | os.O_CLOEXEC, 0o600),
        )
        self._flusher = LoopingCall(self._flush_log)
        self._flusher.clock = self.reactor
        self._flusher.start(self._flush_interval, now=False)

    def log(self, request: Request, client: str) -> None:
        """
        Write C{request}'s line to the access log, if there is one.  A
        log that cannot be written (a full disk) is reported and does not
        stop the request.
        """
        if self.log_file is None:
            return
        try:
            self.log_file.write(request.log_line(client, self.clock.stamp()))
        except Exception:
            self._log_failed()

    def _flush_log(self) -> None:
        try:
            if self.log_file is not None:
                self.log_file.flush()
        except Exception:
            self._log_failed()

    def _log_failed(self) -> None:
        now = self.reactor.seconds()
        if now - self._log_failed_at >= 60:
            # At most once a minute, and one line: a full disk fails every
            # line, and a traceback says no more than its message.
            self._log_failed_at = now
            error = sys.exc_info()[1]
            log.error(
                "writing the access log {path} failed ({error}); its lines are lost "
                "until it can be written (logged at most once a minute)",
                path=self.access_log_path,
                error=str(error) or type(error).__name__,
            )

    def stopFactory(self) -> None:
        self.heap.stop()
        if self._flusher is not None and self._flusher.running:
            self._flusher.stop()
        self._flusher = None
        if self.log_file is not None:
            log_file, self.log_file = self.log_file, None
            try:
                log_file.close()
            except Exception:
                self._log_failed()
