"""
The HTTP/1.1 server of the API: a connection protocol, a request and a
factory, lean where twisted.web is general.

Why not twisted.web: its server spends about 80 microseconds of a core on a
small POST (a bare twisted.web site answered 12,300 a second on one core
here), which is most of what a durable submission may cost if the daemon is
to keep up with a stock twisted.web echo server.  Most of that goes to what
the API never uses: resource traversal, sessions, form decoding, a header
object that normalises every name, a line-at-a-time parser.  This server
reads a request's head in one piece, hands the API an object with the part
of twisted.web's request interface it uses (C{method}, C{uri}, C{path},
C{postpath}, C{args}, C{content}, C{getHeader}, C{setHeader},
C{setResponseCode}, C{write}, C{finish}, C{notifyFinish},
C{registerProducer}, C{loseConnection}; and C{when_lost}, a lighter
C{notifyFinish}), and writes the answer's head in one
piece.

What it does of HTTP/1.1 (RFC 9112): persistent connections (HTTP/1.0 ones
with C{Connection: keep-alive}), pipelined requests answered in order,
bodies by C{Content-Length} or C{Transfer-Encoding: chunked},
C{Expect: 100-continue}, HEAD, chunked answers when an answer's length is
not known up front.  It refuses, with a JSON error and a closed connection:
a malformed or oversized head (400, 431), a body over C{max_body_bytes}
(413, declared or chunked), ambiguous framing (both C{Content-Length} and
C{Transfer-Encoding}, or two different lengths: 400, the ingredients of
request smuggling), a transfer coding other than chunked (501) and versions
other than 1.0 and 1.1 (505).  Idle connections close after
C{idle_timeout} seconds.
"""

from __future__ import annotations

import io
import re
import time
from email.utils import formatdate
from typing import Any, Callable, Optional
from urllib.parse import unquote_to_bytes

from twisted.internet import error, tcp
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES, parse_qs
from zope.interface import implementer

from dispatcher.wire._json import encode

log = Logger()

# The most bytes of a request line and headers, and the most header lines.
MAX_HEAD_BYTES = 16384
MAX_HEADERS = 100
# Bytes of the next pipelined requests read ahead while one is answered;
# past this the connection stops being read until the answer is out.
MAX_READ_AHEAD = 65536
# Seconds a closing connection may take to send what it still holds.
ABORT_TIMEOUT = 15.0

# A method and a field name are tokens (RFC 9110, section 5.6.2).
_TOKEN_CHARS = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_TOKEN = re.compile(_TOKEN_CHARS)
_HEADER_LINES = re.compile(rb"(?:" + _TOKEN_CHARS + rb":[^\r\n\x00]*\r\n)*")
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")

_STATUS_LINES: dict[tuple[bytes, int], bytes] = {}


def send(transport: Any, data: bytes) -> None:
    """
    Write C{data} to C{transport}: straight to the socket when the
    transport is a plain TCP connection with nothing queued before it, else
    (TLS, another kind of transport, or bytes still waiting) through
    C{transport.write}.

    C{twisted.internet.abstract.FileDescriptor.write} only queues: the
    connection is registered for writing, the next reactor iteration sends,
    and the connection is registered off again.  For an answer that fits
    the socket's buffer, as nearly all do, that was two C{epoll_ctl} calls
    and a pass through the reactor's dispatch for nothing, a twentieth of a
    single submission's time.  What the socket does not take at once goes
    through C{transport.write}, after what was sent: the order holds.

    This reads C{tcp.Server}'s private attributes (C{dataBuffer}, C{offset},
    C{_tempDataLen}, C{_writeDisconnected}, C{_aborting}: what an aborted
    connection is sent must stay unsent); the Twisted range in
    C{pyproject.toml} is closed above, and C{tests/test_http.py} fails when
    they change shape.
    """
    if (
        type(transport) is not tcp.Server
        or transport.TLS
        or not transport.connected
        or transport.disconnecting
        or transport._aborting
        or transport._writeDisconnected
        or transport._tempDataLen
        or len(transport.dataBuffer) > transport.offset
    ):
        transport.write(data)
        return
    try:
        sent = transport.socket.send(data)
    except (BlockingIOError, InterruptedError):
        sent = 0
    except OSError:
        # The connection is gone: the transport finds out for itself, as
        # it would have when it sent this.
        transport.write(data)
        return
    if sent < len(data):
        transport.write(data[sent:])


def _bodiless(code: int) -> bool:
    """
    Whether an answer with this status has no body (RFC 9110, 6.4.1).
    """
    return code in (204, 304) or 100 <= code < 200


def _status_line(version: bytes, code: int) -> bytes:
    line = _STATUS_LINES.get((version, code))
    if line is None:
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
    """

    def __init__(self, status: int, code: str, message: str) -> None:
        Exception.__init__(self, message)
        self.status = status
        self.code = code
        self.message = message


def _error_body(code: str, message: str) -> bytes:
    return encode({"error": {"code": code, "message": message, "field": None}})


class Request:
    """
    One request and its answer.  Its attributes and methods are those of
    C{twisted.web.server.Request} that the API uses, with their meanings.
    """

    finished = False
    _disconnected = False
    code = 200
    _started = False
    _chunked = False
    _sent = 0
    _args: Optional[dict] = None
    _finish_waiters: Optional[list] = None
    _lost_callbacks: Optional[list] = None

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
            self._args = parse_qs(self._query, 1)
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
                self.channel.persistent = False
        if not self.channel.persistent:
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
        send(self.channel.transport, head + data if head else data)

    def finish(self) -> None:
        if self.finished or self._disconnected:
            return
        if not self._started:
            if b"content-length" not in self.responseHeaders and not _bodiless(self.code):
                self.responseHeaders[b"content-length"] = b"0"
            send(self.channel.transport, self._head())
        elif self._chunked and self.method != b"HEAD":
            send(self.channel.transport, b"0\r\n\r\n")
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
        writes it.
        """
        referrer = _quote(self.requestHeaders.get(b"referer", b"-"))
        agent = _quote(self.requestHeaders.get(b"user-agent", b"-"))
        return (
            f'"{client}" - - {stamp} "{_quote(self.method)} {_quote(self.uri)} '
            f'{self.clientproto.decode("ascii")}" {self.code} '
            f'{self._sent if self._started else "-"} "{referrer}" "{agent}"\n'
        )


def _quote(value: bytes) -> str:
    return value.decode("ascii", "backslashreplace").replace('"', '\\"')


# What the parser waits for.
_HEAD, _BODY, _CHUNK_SIZE_LINE, _CHUNK_DATA, _TRAILERS, _ANSWERING, _CLOSED = range(7)


@implementer(IPushProducer)
class HTTPChannel(Protocol):
    """
    One client connection: parses requests one after the other and hands
    each to the factory's C{handler}.

    It reads no further than C{MAX_READ_AHEAD} bytes ahead while an answer
    is pending, and takes no new request while the transport's send buffer
    is full (it is the transport's producer, and passes pauses on to an
    answer's own producer): a client that sends without reading gets
    nothing buffered for it beyond that.  A connection being closed is
    aborted if the client has not taken what was written within
    C{ABORT_TIMEOUT} seconds.
    """

    factory: "HTTPFactory"
    persistent = True
    _request: Optional[Request] = None
    _timer: Any = None
    _abort_timer: Any = None
    _producer: Any = None
    _parsing = False
    # Whether the transport's send buffer is full, and whether reading is
    # paused (for that, or for read-ahead).
    _writes_paused = False
    _reads_paused = False

    def __init__(self) -> None:
        # Unparsed input is _buffer[_pos:]: parsing moves the offset, and
        # the buffer is cut once per read, not once per request or chunk.
        self._buffer = b""
        self._pos = 0
        self._state = _HEAD
        self._last = 0.0
        self._client = "-"

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self._client = str(getattr(peer, "host", "-"))
        self.transport.registerProducer(self, True)
        timeout = self.factory.idle_timeout
        if timeout is not None:
            self._last = self.factory.reactor.seconds()
            self._timer = self.factory.reactor.callLater(timeout, self._idle_check)

    def _idle_check(self) -> None:
        """
        Close the connection if it has been idle C{idle_timeout} seconds.
        The timer is set once per timeout rather than reset per request:
        when it fires early (the connection was busy) it is set again for
        the rest.
        """
        timeout = self.factory.idle_timeout
        now = self.factory.reactor.seconds()
        if self._request is not None:
            self._last = now
        left = self._last + timeout - now
        if left > 0:
            self._timer = self.factory.reactor.callLater(left, self._idle_check)
            return
        self._timer = None
        self.close()

    def close(self) -> None:
        """
        Close once what was written is out; abort if that takes longer
        than C{ABORT_TIMEOUT} seconds (the client does not read).
        """
        self._state = _CLOSED
        self.transport.loseConnection()
        if self._abort_timer is None:
            self._abort_timer = self.factory.reactor.callLater(
                ABORT_TIMEOUT, self.transport.abortConnection
            )

    # The transport's producer

    def pauseProducing(self) -> None:
        self._writes_paused = True
        if self._producer is not None:
            self._producer.pauseProducing()
        self._update_reading()

    def resumeProducing(self) -> None:
        self._writes_paused = False
        if self._producer is not None:
            self._producer.resumeProducing()
        self._update_reading()
        if self._request is None:
            self._parse()

    def stopProducing(self) -> None:
        if self._producer is not None:
            self._producer.stopProducing()

    def _update_reading(self) -> None:
        pause = self._writes_paused or (
            self._request is not None
            and len(self._buffer) - self._pos > MAX_READ_AHEAD
        )
        if pause and not self._reads_paused:
            self._reads_paused = True
            self.transport.pauseProducing()
        elif not pause and self._reads_paused:
            self._reads_paused = False
            self.transport.resumeProducing()

    def dataReceived(self, data: bytes) -> None:
        if self._state == _CLOSED:
            return
        self._last = self.factory.reactor.seconds()
        if self._pos:
            self._buffer = self._buffer[self._pos:]
            self._pos = 0
        self._buffer = self._buffer + data if self._buffer else data
        if self._request is not None:
            self._update_reading()
            return
        self._parse()

    def _parse(self) -> None:
        if self._parsing:
            return
        self._parsing = True
        try:
            while (
                self._request is None
                and not self._writes_paused
                and self._state != _CLOSED
            ):
                if not self._step():
                    break
        except BadRequest as e:
            self._refuse(e)
        finally:
            self._parsing = False
        if self._pos and self._state != _CLOSED:
            self._buffer = self._buffer[self._pos:]
            self._pos = 0

    # The parse, one step at a time: each returns whether to go on.

    def _step(self) -> bool:
        state = self._state
        if state == _HEAD:
            return self._read_head()
        if state == _BODY:
            return self._read_body()
        if state == _CHUNK_SIZE_LINE:
            return self._read_chunk_size()
        if state == _CHUNK_DATA:
            return self._read_chunk_data()
        if state == _TRAILERS:
            return self._read_trailers()
        return False

    def _read_head(self) -> bool:
        buffer = self._buffer
        pos = self._pos
        size = len(buffer)
        # Empty lines before a request are allowed (RFC 9112, 2.2).
        while pos < size and buffer[pos] in (13, 10):
            pos += 1
        self._pos = pos
        if pos >= size:
            return False
        # The head ends at the first empty line.
        end = buffer.find(b"\n\r\n", pos)
        skip = 3
        bare = buffer.find(b"\n\n", pos, end if end >= 0 else size)
        if bare >= 0:
            end, skip = bare, 2
        if end < 0 or end - pos > MAX_HEAD_BYTES:
            if end < 0 and size - pos <= MAX_HEAD_BYTES:
                return False
            raise BadRequest(
                431,
                "head_too_large",
                f"the request line and headers exceed {MAX_HEAD_BYTES} bytes",
            )
        head = buffer[pos:end + 1]
        self._pos = end + skip
        if head.count(b"\n") != head.count(b"\r\n") or head.count(b"\r") != head.count(
            b"\n"
        ):
            # A bare LF ends lines too (RFC 9112, 2.2); a CR alone is not
            # allowed anywhere.
            head = b"\r\n".join(line[:-1] if line[-1:] == b"\r" else line
                                 for line in head.split(b"\n"))
            if head.count(b"\r") != head.count(b"\n"):
                raise BadRequest(400, "bad_request", "a CR not followed by LF")
        # The whole head checked at once: every header line a token, a
        # colon and a value with no NUL.
        first = head.find(b"\r\n")
        if _HEADER_LINES.fullmatch(head, first + 2) is None:
            raise BadRequest(400, "bad_request", "malformed header line")
        parts = head[:first].split(b" ")
        if len(parts) != 3:
            raise BadRequest(400, "bad_request", "malformed request line")
        method, uri, version = parts
        if version != b"HTTP/1.1" and version != b"HTTP/1.0":
            if not version.startswith(b"HTTP/"):
                raise BadRequest(400, "bad_request", "malformed request line")
            raise BadRequest(
                505, "version_not_supported", "only HTTP/1.1 and HTTP/1.0 are served"
            )
        if _TOKEN.fullmatch(method) is None:
            raise BadRequest(400, "bad_request", "malformed request method")
        if uri[:1] != b"/":
            uri = self._origin_form(uri)
        headers: dict[bytes, bytes] = {}
        lines = head[first + 2:-2].split(b"\r\n") if len(head) > first + 2 else ()
        if len(lines) > MAX_HEADERS:
            raise BadRequest(
                431, "head_too_large", f"more than {MAX_HEADERS} header lines"
            )
        for line in lines:
            name, _, value = line.partition(b":")
            name = name.lower()
            value = value.strip(b" \t")
            if name in headers:
                if name == b"content-length":
                    if value != headers[name]:
                        raise BadRequest(
                            400, "bad_request", "two different Content-Length headers"
                        )
                    continue
                value = headers[name] + b", " + value
            headers[name] = value
        self._start(method, uri, version, headers)
        return True

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
        raise BadRequest(400, "bad_request", "malformed request target")

    def _start(
        self, method: bytes, uri: bytes, version: bytes, headers: dict[bytes, bytes]
    ) -> None:
        self._method = method
        self._uri = uri
        self._version = version
        self._headers = headers
        connection = headers.get(b"connection", b"").lower()
        if version == b"HTTP/1.1":
            self.persistent = b"close" not in connection
        else:
            self.persistent = b"keep-alive" in connection
        limit = self.factory.max_body_bytes
        coding = headers.get(b"transfer-encoding")
        if coding is not None:
            if b"content-length" in headers:
                raise BadRequest(
                    400,
                    "bad_request",
                    "a request may not have both Content-Length and Transfer-Encoding",
                )
            if coding.lower() != b"chunked":
                raise BadRequest(
                    501,
                    "not_implemented",
                    "only the chunked transfer coding is understood",
                )
            if version == b"HTTP/1.0":
                # Faulty framing for HTTP/1.0 (RFC 9112, 6.1): read it,
                # answer, and close.
                self.persistent = False
            self._chunks: list[bytes] = []
            self._received = 0
            self._continue()
            self._state = _CHUNK_SIZE_LINE
            return
        length = headers.get(b"content-length")
        if length is None:
            self._length = 0
        else:
            if not length.isdigit() or len(length) > 18:
                raise BadRequest(400, "bad_request", "malformed Content-Length")
            self._length = int(length)
            if self._length > limit:
                raise _too_large(limit)
            if self._length:
                self._continue()
        self._state = _BODY

    def _continue(self) -> None:
        if self._version == b"HTTP/1.1" and (
            self._headers.get(b"expect", b"").lower() == b"100-continue"
        ):
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _read_body(self) -> bool:
        length = self._length
        pos = self._pos
        if len(self._buffer) - pos < length:
            return False
        body = self._buffer[pos:pos + length] if length else b""
        self._pos = pos + length
        self._dispatch(body)
        return True

    def _read_chunk_size(self) -> bool:
        buffer = self._buffer
        pos = self._pos
        end = buffer.find(b"\r\n", pos, pos + 1026)
        if end < 0:
            if len(buffer) - pos > 1024:
                raise BadRequest(400, "bad_request", "malformed chunk size line")
            return False
        line = buffer[pos:end]
        self._pos = end + 2
        size = line.partition(b";")[0].strip(b" \t")
        if _CHUNK_SIZE.fullmatch(size) is None or b"\n" in line or b"\r" in line:
            raise BadRequest(400, "bad_request", "malformed chunk size line")
        self._length = int(size, 16)
        if self._length == 0:
            self._trailers = 0
            self._state = _TRAILERS
            return True
        limit = self.factory.max_body_bytes
        if self._received + self._length > limit:
            raise _too_large(limit)
        self._state = _CHUNK_DATA
        return True

    def _read_chunk_data(self) -> bool:
        length = self._length
        buffer = self._buffer
        pos = self._pos
        if len(buffer) - pos < length + 2:
            return False
        if buffer[pos + length:pos + length + 2] != b"\r\n":
            raise BadRequest(400, "bad_request", "a chunk is not followed by CRLF")
        self._chunks.append(buffer[pos:pos + length])
        self._received += length
        self._pos = pos + length + 2
        self._state = _CHUNK_SIZE_LINE
        return True

    def _read_trailers(self) -> bool:
        # Trailer fields are read and dropped, up to the empty line.
        buffer = self._buffer
        while True:
            pos = self._pos
            end = buffer.find(b"\r\n", pos)
            if end < 0:
                if len(buffer) - pos + self._trailers > MAX_HEAD_BYTES:
                    raise BadRequest(431, "head_too_large", "trailers too large")
                return False
            self._trailers += end + 2 - pos
            if self._trailers > MAX_HEAD_BYTES:
                raise BadRequest(431, "head_too_large", "trailers too large")
            self._pos = end + 2
            if end == pos:
                break
        body = b"".join(self._chunks)
        self._chunks = []
        self._dispatch(body)
        return True

    def _dispatch(self, body: bytes) -> None:
        request = Request(
            self, self._method, self._uri, self._version, self._headers, body
        )
        self._request = request
        self._state = _ANSWERING
        try:
            self.factory.handler(request)
        except Exception:
            # The handler answers its own errors; this is a bug.
            log.failure("answering {uri} failed", uri=request.uri)
            if request._started:
                # Half an answer must not pass for a whole one.
                self._state = _CLOSED
                self.transport.abortConnection()
                return
            request.setResponseCode(500)
            body = _error_body("internal_error", "the dispatcher failed to answer")
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"content-length", b"%d" % len(body))
            self.persistent = False
            request.write(body)
            request.finish()

    def request_done(self, request: Request) -> None:
        """
        The answer to C{request} is out: log it, then read on or close.
        """
        if request is self._request:
            self._request = None
            self._last = self.factory.reactor.seconds()
            if not self.persistent:
                self.close()
            else:
                self._state = _HEAD
                if self._reads_paused:
                    self._update_reading()
                if self._pos < len(self._buffer):
                    self._parse()
        if self.factory.log_file is not None:
            self.factory.log(request, self._client)

    def _refuse(self, e: BadRequest) -> None:
        body = _error_body(e.code, e.message)
        version = getattr(self, "_version", b"HTTP/1.1")
        self.transport.write(
            _status_line(version if version == b"HTTP/1.0" else b"HTTP/1.1", e.status)
            + b"Content-Type: application/json\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n" % len(body)
            + body
        )
        self._buffer = b""
        self._pos = 0
        self.close()

    def connectionLost(self, reason: Optional[Failure] = None) -> None:
        if reason is None:
            reason = Failure(error.ConnectionDone("the connection closed"))
        self._state = _CLOSED
        self._buffer = b""
        self._pos = 0
        self._producer = None
        for timer in (self._timer, self._abort_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._timer = self._abort_timer = None
        request, self._request = self._request, None
        if request is not None and not request.finished:
            request._connection_lost(reason)


def _too_large(limit: int) -> BadRequest:
    return BadRequest(
        413,
        "body_too_large",
        f"the request body is larger than {limit} bytes ([server] max_body_bytes)",
    )


class HTTPFactory(Factory):
    """
    Makes an L{HTTPChannel} for each connection and holds what they share:
    the handler, the limits, and the access log.

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
    """

    protocol = HTTPChannel
    buffer_size = 65536

    def __init__(
        self,
        handler: Callable[[Request], Any],
        max_body_bytes: int,
        reactor: IReactorTime,
        access_log_path: Optional[str] = None,
        idle_timeout: Optional[float] = 60.0,
        flush_interval: float = 1.0,
    ) -> None:
        self.handler = handler
        self.max_body_bytes = max_body_bytes
        self.reactor = reactor
        self.idle_timeout = idle_timeout
        self.access_log_path = access_log_path
        self.clock = _Clock(reactor.seconds)
        self.log_file: Optional[Any] = None
        self._flush_interval = flush_interval
        self._flusher: Optional[LoopingCall] = None
        self._log_failed_at = float("-inf")

    def startFactory(self) -> None:
        if self.access_log_path is None:
            return
        self.log_file = open(
            self.access_log_path, "a", buffering=self.buffer_size, encoding="utf-8",
            newline="\n",
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
            # At most once a minute: a full disk fails every line.
            self._log_failed_at = now
            log.failure("writing the access log {path} failed", path=self.access_log_path)

    def stopFactory(self) -> None:
        if self._flusher is not None and self._flusher.running:
            self._flusher.stop()
        self._flusher = None
        if self.log_file is not None:
            log_file, self.log_file = self.log_file, None
            try:
                log_file.close()
            except Exception:
                self._log_failed()
