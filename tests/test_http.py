"""
The API's HTTP/1.1 server (dispatcher.http._protocol, llhttp through
httptools): framing, persistence, pipelining, refusals, head, body and idle
deadlines, read-ahead, and the write-through to the socket
(dispatcher.http._writethrough), against a StringTransport and a Clock, and
over a real socket.  The conformance tests at the end each failed on the
hand-written parser this server had before (issue 13).
"""

import json
import re

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, serverFromString
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from dispatcher.http._protocol import (
    ABORT_TIMEOUT,
    MAX_CHUNKS,
    MAX_HEAD_BYTES,
    MAX_READ_AHEAD,
    HTTPFactory,
    Request,
)


class Recorder:
    """
    A handler that keeps each request and answers it at once with what it
    saw, or leaves it pending when C{hold} is set.
    """

    def __init__(self, hold=False):
        self.requests = []
        self.hold = hold

    def __call__(self, request):
        self.requests.append(request)
        if not self.hold:
            answer(request)


def answer(request, status=200):
    body = json.dumps({
        "method": request.method.decode(),
        "uri": request.uri.decode(),
        "postpath": [s.decode() for s in request.postpath],
        "body": request.content.read().decode(),
    }).encode()
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"content-length", b"%d" % len(body))
    request.write(body)
    request.finish()


def connect(handler, max_body=1000, clock=None, idle_timeout=60.0, log=None, **timeouts):
    clock = clock or Clock()
    factory = HTTPFactory(handler, max_body, clock, access_log_path=log,
                          idle_timeout=idle_timeout, **timeouts)
    factory.startFactory()
    channel = factory.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport, clock


def responses(raw):
    """
    Split what the server wrote into (status, headers, body) answers, by
    their Content-Length (or chunked framing).
    """
    out = []
    while raw:
        head, _, raw = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b": ")
            headers[name.lower()] = value
        if status == 100:
            out.append((100, headers, b""))
            continue
        if headers.get(b"transfer-encoding") == b"chunked":
            body = b""
            while True:
                size, _, raw = raw.partition(b"\r\n")
                size = int(size, 16)
                body += raw[:size]
                raw = raw[size + 2:]
                if not size:
                    break
        elif b"content-length" in headers:
            n = int(headers[b"content-length"])
            body, raw = raw[:n], raw[n:]
        else:
            body, raw = raw, b""
        out.append((status, headers, body))
    return out


def post(path, body, extra=b"", version=b"HTTP/1.1"):
    return (b"POST %s %s\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n%s\r\n%s" % (path, version, len(body), extra, body))


def chunked(body, size=3):
    return b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size])
                    for i in range(0, len(body), size)) + b"0\r\n\r\n"


def test_persistent_connection_and_request_parts():
    """Requests follow each other on one HTTP/1.1 connection; path, query,
    percent-escapes and body reach the handler; the answer carries Date and
    the handler's headers."""
    handler = Recorder()
    channel, transport, _ = connect(handler)
    channel.dataReceived(post(b"/v1/jobs", b'{"a":1}'))
    channel.dataReceived(b"GET /v1/jobs/a%2Fb?state=queued&label=x&label=y HTTP/1.1\r\n"
                         b"Host: x\r\n\r\n")
    (s1, h1, b1), (s2, h2, b2) = responses(transport.value())
    assert s1 == s2 == 200
    assert b"date" in h1 and h1[b"content-type"] == b"application/json"
    assert json.loads(b1)["body"] == '{"a":1}'
    assert json.loads(b2)["postpath"] == ["v1", "jobs", "a/b"]
    request = handler.requests[1]
    assert request.path == b"/v1/jobs/a%2Fb"
    assert request.args == {b"state": [b"queued"], b"label": [b"x", b"y"]}
    assert request.getHeader(b"Host") == b"x"
    assert request.getHeader(b"missing") is None
    assert not transport.disconnecting


def test_connection_close_and_http10():
    """Connection: close, and HTTP/1.0 without keep-alive, close after the
    answer; HTTP/1.0 with keep-alive stays open and says so."""
    channel, transport, _ = connect(Recorder())
    channel.dataReceived(b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    ((status, headers, _),) = responses(transport.value())
    assert headers[b"connection"] == b"close" and transport.disconnecting

    channel, transport, _ = connect(Recorder())
    channel.dataReceived(b"GET /a HTTP/1.0\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.0 200 OK\r\n")
    assert transport.disconnecting

    channel, transport, _ = connect(Recorder())
    channel.dataReceived(b"GET /a HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
    ((_, headers, _),) = responses(transport.value())
    assert headers[b"connection"] == b"keep-alive"
    assert not transport.disconnecting


def test_pipelined_requests_are_answered_in_order():
    """Requests sent together are handed over one at a time: the next only
    after the answer to the one before is finished."""
    handler = Recorder(hold=True)
    channel, transport, _ = connect(handler)
    channel.dataReceived(post(b"/1", b"a") + b"GET /2 HTTP/1.1\r\nHost: x\r\n\r\n" + post(b"/3", b"c"))
    assert [r.uri for r in handler.requests] == [b"/1"]
    answer(handler.requests[0])
    assert [r.uri for r in handler.requests] == [b"/1", b"/2"]
    answer(handler.requests[1])
    answer(handler.requests[2])
    got = [json.loads(b)["uri"] for _, _, b in responses(transport.value())]
    assert got == ["/1", "/2", "/3"]


def test_chunked_request_body():
    """A chunked body (with chunk extensions and trailers) arrives whole."""
    handler = Recorder()
    channel, transport, _ = connect(handler)
    body = b'{"command": ["true"]}'
    framed = chunked(body).replace(b"\r\n", b";ext=1\r\n", 1)
    channel.dataReceived(b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                         + framed[:-2] + b"X-Trailer: 1\r\n\r\n" + post(b"/d", b"x"))
    (_, _, b1), (_, _, b2) = responses(transport.value())
    assert json.loads(b1)["body"] == body.decode()
    assert json.loads(b2)["body"] == "x"


def test_expect_100_continue():
    """A request that expects 100-continue gets it before its body, unless
    its body is refused outright."""
    handler = Recorder()
    channel, transport, _ = connect(handler, max_body=10)
    channel.dataReceived(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
    assert transport.value() == b"HTTP/1.1 100 Continue\r\n\r\n"
    channel.dataReceived(b"ok")
    assert [s for s, _, _ in responses(transport.value())] == [100, 200]
    channel, transport, _ = connect(handler, max_body=10)
    channel.dataReceived(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 20\r\nExpect: 100-continue\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 413 ")


@pytest.mark.parametrize(
    "raw, status, code",
    [
        (b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\nok",
         400, "bad_request"),
        (b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
         400, "bad_request"),
        (b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: -2\r\n\r\n", 400, "bad_request"),
        (b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 0x10\r\n\r\n", 400, "bad_request"),
        (b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501,
         "not_implemented"),
        (b"GET /a HTTP/2.0\r\n\r\n", 505, "version_not_supported"),
        (b"GET /a\r\n\r\n", 400, "bad_request"),
        (b"G(T /a HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request"),
        (b"GET a HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request"),
        (b"GET /a HTTP/1.1\r\nHost : x\r\n\r\n", 400, "bad_request"),
        (b"GET /a HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n", 400, "bad_request"),
        (b"GET /a HTTP/1.1\r\nHost: x\r\nNo-Colon\r\n\r\n", 400, "bad_request"),
        (b"GET /a HTTP/1.1\r\nHost: x\r\nX: a\rb\r\n\r\n", 400, "bad_request"),
        (b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 1001\r\n\r\n", 413, "body_too_large"),
        (b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(b"x" * 1001, 500),
         413, "body_too_large"),
        (b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400, "bad_request"),
        (b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokX\r\n", 400,
         "bad_request"),
        (b"GET /a HTTP/1.1\r\nHost: x\r\n" + b"X: y\r\n" * 101 + b"\r\n", 431, "head_too_large"),
        (b"GET /" + b"a" * MAX_HEAD_BYTES + b" HTTP/1.1\r\nHost: x\r\n", 431, "head_too_large"),
    ],
)
def test_refusals(raw, status, code):
    """What this server cannot read unambiguously is refused with a JSON
    error, before the handler sees anything, and the connection closes
    (so nothing after it is taken for a request)."""
    handler = Recorder()
    channel, transport, _ = connect(handler)
    channel.dataReceived(raw + b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n")
    ((got, headers, body),) = responses(transport.value())
    assert got == status
    assert json.loads(body)["error"]["code"] == code
    assert headers[b"connection"] == b"close"
    assert transport.disconnecting
    assert handler.requests == []


def test_leading_empty_lines_are_skipped_and_bare_line_feeds_refused():
    """A few empty lines before a request are skipped (RFC 9112, 2.2); a
    line ended by a bare LF is refused, as llhttp refuses it."""
    handler = Recorder()
    channel, transport, _ = connect(handler)
    channel.dataReceived(b"\r\n\r\nGET /a HTTP/1.1\r\nHost: x\r\n\r\n")
    assert [json.loads(b)["uri"] for _, _, b in responses(transport.value())] == ["/a"]
    channel, transport, _ = connect(handler)
    channel.dataReceived(b"POST /b HTTP/1.1\nHost: x\nContent-Length: 2\n\nok")
    ((status, _, _),) = responses(transport.value())
    assert status == 400 and transport.disconnecting
    assert [r.uri for r in handler.requests] == [b"/a"]


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12),
       later=st.booleans())
def test_any_split_of_the_stream_reads_the_same(cuts, later):
    """However the bytes of pipelined requests are split across reads, and
    whether each is answered at once or after more was read, the same
    requests come out with the same bodies, and the answers in order."""
    stream = (post(b"/1", b'{"x": 1}') + b"GET /2?q=1 HTTP/1.1\r\nHost: y\r\n\r\n"
              + b"POST /3 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
              + chunked(b"abcdefghij") + post(b"/4", b""))
    handler = Recorder(hold=later)
    channel, transport, _ = connect(handler)
    last = 0
    answered = 0
    for cut in sorted(set(c % len(stream) for c in cuts)) + [len(stream)]:
        channel.dataReceived(stream[last:cut])
        last = cut
        if later and len(handler.requests) > answered:
            answer(handler.requests[answered])
            answered += 1
    while later and len(handler.requests) > answered:
        answer(handler.requests[answered])
        answered += 1
    assert [json.loads(b)["uri"] for _, _, b in responses(transport.value())] == [
        "/1", "/2?q=1", "/3", "/4"]
    got = [(r.uri, r.content.getvalue()) for r in handler.requests]
    assert got == [(b"/1", b'{"x": 1}'), (b"/2?q=1", b""), (b"/3", b"abcdefghij"), (b"/4", b"")]
    assert not transport.disconnecting


def test_answers_without_a_length_are_chunked_or_close_delimited():
    """An answer written before its length is known is chunked to an
    HTTP/1.1 client, and ends with the connection to an HTTP/1.0 one; a
    HEAD answer has no body; an answer with no body says Content-Length 0."""
    def streaming(request):
        request.write(b"abc")
        request.write(b"def")
        request.finish()

    channel, transport, _ = connect(streaming)
    channel.dataReceived(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
    ((status, headers, body),) = responses(transport.value())
    assert headers[b"transfer-encoding"] == b"chunked" and body == b"abcdef"
    assert not transport.disconnecting

    channel, transport, _ = connect(streaming)
    channel.dataReceived(b"GET /a HTTP/1.0\r\n\r\n")
    assert transport.value().endswith(b"\r\n\r\nabcdef")
    assert transport.disconnecting

    channel, transport, _ = connect(Recorder())
    channel.dataReceived(b"HEAD /a HTTP/1.1\r\nHost: x\r\n\r\n")
    head = transport.value()
    assert head.endswith(b"\r\n\r\n") and b"Content-Length: " in head

    def empty(request):
        request.setResponseCode(202)
        request.finish()

    channel, transport, _ = connect(empty)
    channel.dataReceived(b"POST /a HTTP/1.1\r\nHost: x\r\n\r\n")
    ((status, headers, body),) = responses(transport.value())
    assert status == 202 and headers[b"content-length"] == b"0"


def test_idle_connections_close_after_the_timeout():
    """A connection with nothing in progress closes idle_timeout seconds
    after its last activity; one waiting for an answer does not."""
    handler = Recorder(hold=True)
    channel, transport, clock = connect(handler, idle_timeout=60)
    clock.advance(30)
    channel.dataReceived(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
    clock.advance(40)
    assert not transport.disconnecting  # the request is in progress
    clock.advance(100)
    assert not transport.disconnecting
    answer(handler.requests[0])
    clock.advance(59)
    assert not transport.disconnecting
    clock.advance(2)
    assert transport.disconnecting
    channel.connectionLost(Failure(ConnectionDone()))
    assert clock.getDelayedCalls() == []


def test_read_ahead_is_bounded():
    """While an answer is pending, the connection is read until more than
    MAX_READ_AHEAD bytes wait unparsed, then paused until answers have
    taken enough of them; every request comes through, one at a time."""
    handler = Recorder(hold=True)
    channel, transport, _ = connect(handler)
    channel.dataReceived(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
    count = MAX_READ_AHEAD // 500
    channel.dataReceived(post(b"/b", b"x" * 500) * count)
    assert transport.producerState == "paused"
    answered = 0
    while transport.producerState == "paused":
        assert len(handler.requests) == answered + 1
        answer(handler.requests[answered])
        answered += 1
    assert answered < count
    while answered < len(handler.requests):
        answer(handler.requests[answered])
        answered += 1
    assert answered == count + 1


def test_a_full_send_buffer_stops_new_requests():
    """While the transport's send buffer is full (it pauses the channel, its
    producer), no new request is taken and reading stops; an answer's own
    producer is paused with it; all goes on once the buffer drains."""
    handler = Recorder()
    channel, transport, _ = connect(handler)
    assert transport.producer is channel
    channel.pauseProducing()
    assert transport.producerState == "paused"
    channel.dataReceived(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n")
    assert handler.requests == []
    channel.resumeProducing()
    assert [r.uri for r in handler.requests] == [b"/a", b"/b"]
    assert transport.producerState == "producing"

    class Producer:
        paused = 0
        resumed = 0

        def pauseProducing(self):
            self.paused += 1

        def resumeProducing(self):
            self.resumed += 1

        def stopProducing(self):
            pass

    producer = Producer()
    streamed = Recorder(hold=True)
    channel, transport, _ = connect(streamed)
    channel.dataReceived(b"GET /log HTTP/1.1\r\nHost: x\r\n\r\n")
    streamed.requests[0].registerProducer(producer, True)
    channel.pauseProducing()
    channel.resumeProducing()
    assert (producer.paused, producer.resumed) == (1, 1)
    streamed.requests[0].unregisterProducer()
    with pytest.raises(ValueError):
        streamed.requests[0].registerProducer(producer, False)


def test_a_closing_connection_is_aborted_if_the_client_does_not_read():
    """A connection closed after its answer (or a refusal, or idling) is
    aborted ABORT_TIMEOUT seconds later if it has not gone by then."""
    channel, transport, clock = connect(Recorder())
    aborted = []
    transport.abortConnection = lambda: aborted.append(True)
    channel.dataReceived(b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert transport.disconnecting and not aborted
    clock.advance(ABORT_TIMEOUT)
    assert aborted == [True]


def test_query_strings_stay_bytes():
    """The query is read as bytes, percent-escapes and all, whatever they
    encode; a name without a value is left out, as twisted.web does; a raw
    byte above 127 in the target is refused (RFC 3986 allows none)."""
    handler = Recorder()
    channel, _, _ = connect(handler)
    channel.dataReceived(b"GET /a?label=x%C3%A9&raw=%FF&flag&e= HTTP/1.1\r\nHost: x\r\n\r\n")
    assert handler.requests[0].args == {b"label": [b"x\xc3\xa9"], b"raw": [b"\xff"],
                                        b"e": [b""]}
    channel, transport, _ = connect(handler)
    channel.dataReceived(b"GET /a?raw=\xff HTTP/1.1\r\nHost: x\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert len(handler.requests) == 1


def test_as_many_chunks_as_allowed_in_one_read():
    """A body of MAX_CHUNKS one-byte chunks arriving in one read is taken
    whole, and nothing of the read is left over."""
    handler = Recorder()
    channel, _, _ = connect(handler, max_body=100000)
    body = (bytes(range(97, 123)) * 1000)[:MAX_CHUNKS]
    channel.dataReceived(b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                         + chunked(body, 1))
    assert handler.requests[0].content.getvalue() == body
    assert not channel._held and not channel._ready


def test_chunked_http10_request_closes_after_its_answer():
    """Transfer-Encoding on HTTP/1.0 is faulty framing (RFC 9112, 6.1): the
    request is read and answered, then the connection closes."""
    handler = Recorder()
    channel, transport, _ = connect(handler)
    channel.dataReceived(b"POST /a HTTP/1.0\r\nConnection: keep-alive\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n" + chunked(b"abc"))
    assert handler.requests[0].content.getvalue() == b"abc"
    assert transport.disconnecting


def test_a_handler_that_fails_gets_a_500_or_an_abort():
    """A handler that raises before answering gets a 500 JSON error and the
    connection closes; one that raises halfway through a streamed answer
    has its connection aborted, so the half is not taken for the whole."""
    def fails(request):
        raise RuntimeError("bug")

    channel, transport, _ = connect(fails)
    channel.dataReceived(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
    ((status, headers, body),) = responses(transport.value())
    assert status == 500 and json.loads(body)["error"]["code"] == "internal_error"
    assert transport.disconnecting

    def halfway(request):
        request.write(b"abc")
        raise RuntimeError("bug")

    channel, transport, _ = connect(halfway)
    aborted = []
    transport.abortConnection = lambda: aborted.append(True)
    channel.dataReceived(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
    assert aborted == [True]
    assert not transport.value().endswith(b"0\r\n\r\n")


def test_an_access_log_that_cannot_be_written_does_not_stop_requests(tmp_path):
    """A failing access log (a full disk) is reported; requests go on."""
    handler = Recorder()
    channel, transport, _ = connect(handler, log=str(tmp_path / "access.log"))

    class Full:
        def write(self, line):
            raise OSError(28, "No space left on device")

        def flush(self):
            raise OSError(28, "No space left on device")

        def close(self):
            pass

    channel.factory.log_file = Full()
    channel.dataReceived(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n")
    assert [s for s, _, _ in responses(transport.value())] == [200, 200]
    channel.factory._flush_log()
    channel.factory.stopFactory()


def held_request():
    """A connection with one GET read and left unanswered."""
    handler = Recorder(hold=True)
    channel, transport, _ = connect(handler)
    channel.dataReceived(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
    return channel, transport, handler.requests[0]


def test_lost_connection_fails_notify_finish():
    """When the client goes before its answer, notifyFinish fails, when_lost
    callbacks run (at once if registered after), and the late answer is
    dropped."""
    channel, transport, request = held_request()
    failures = []
    lost = []
    request.notifyFinish().addErrback(failures.append)
    request.when_lost(lambda: lost.append("first"))
    channel.connectionLost(Failure(ConnectionDone()))
    assert len(failures) == 1
    assert lost == ["first"]
    request.when_lost(lambda: lost.append("late"))
    assert lost == ["first", "late"]
    answer(request)
    assert transport.value() == b""


def test_when_lost_is_not_called_once_the_answer_is_out():
    """A connection lost after the answer was finished calls no when_lost
    callback."""
    channel, _, request = held_request()
    lost = []
    request.when_lost(lambda: lost.append(1))
    answer(request)
    channel.connectionLost(Failure(ConnectionDone()))
    request.when_lost(lambda: lost.append(2))
    assert lost == []


def test_access_log_line(tmp_path):
    """Each answered request gets a Combined Log Format line."""
    path = tmp_path / "access.log"
    clock = Clock()
    clock.advance(86400 * 365)
    channel, transport, _ = connect(Recorder(), clock=clock, log=str(path))
    channel.dataReceived(b'GET /a?b=1 HTTP/1.1\r\nHost: x\r\nUser-Agent: t "q"\r\nReferer: r\r\n\r\n')
    channel.factory.stopFactory()
    (line,) = path.read_text().splitlines()
    length = len(responses(transport.value())[0][2])
    assert line == (f'"192.168.1.1" - - [01/Jan/1971:00:00:00 +0000] "GET /a?b=1 HTTP/1.1" 200 {length} '
                    '"r" "t \\x22q\\x22"')


# A line of the access log: every field but the time and the numbers is
# quoted, and no field holds a quote of its own.
ACCESS_LINE = re.compile(
    r'^"(?P<client>[^"]*)" - - \[(?P<time>[^\]]*)\] "(?P<request>[^"]*)" (?P<status>\d+) '
    r'(?P<size>\d+|-) "(?P<referrer>[^"]*)" "(?P<agent>[^"]*)"$'
)


def unescape(field):
    """A field of the access log as the bytes the client sent."""
    return re.sub(rb"\\x([0-9A-F]{2})", lambda m: bytes([int(m[1], 16)]), field.encode("ascii"))


def test_access_log_fields_cannot_be_forged():
    """A User-Agent holding a quote, a line feed and a backslash (and bytes
    that are not UTF-8) stays one field of one line: quote, backslash,
    control and non-ASCII bytes are written \\xHH, as nginx does, and
    nothing else is."""
    forged = b'x\\" 200 "-" "forged"\n"127.0.0.1" - - [x] "GET /admin HTTP/1.1" 200 1 "-" "\\'
    channel, transport, clock = connect(Recorder())
    request = Request(channel, b"GET", b'/a"b\\c', b"HTTP/1.1",
                      {b"user-agent": forged + b"\t\xff\xc3\xa9", b"referer": b"r\\"}, b"")
    line = request.log_line("127.0.0.1", "[01/Jan/1971:00:00:00 +0000]")
    assert line.endswith("\n") and "\n" not in line[:-1] and line.isascii()
    fields = ACCESS_LINE.match(line[:-1])
    assert fields is not None, line
    assert unescape(fields["agent"]) == forged + b"\t\xff\xc3\xa9"
    assert unescape(fields["referrer"]) == b"r\\"
    assert fields["request"] == 'GET /a\\x22b\\x5Cc HTTP/1.1'
    assert fields["agent"].startswith("x\\x5C\\x22 200 \\x22-\\x22")


@pytest_twisted.ensureDeferred
async def test_a_forged_user_agent_stays_in_its_field_over_a_real_socket(tmp_path):
    """Over a real connection, a User-Agent that closes its quote after a
    backslash (the bytes a client may send: llhttp refuses control bytes
    but a tab) is one escaped field of the access log's one line."""
    path = tmp_path / "access.log"
    agent = b'x\\" 200 "-" "forged\tby \\\xffclient'
    raw = await exchange_over_tcp(
        Recorder(),
        b"GET /a HTTP/1.1\r\nHost: x\r\nUser-Agent: " + agent + b"\r\nConnection: close\r\n\r\n",
        access_log_path=str(path),
    )
    assert responses(raw)[0][0] == 200
    (line,) = path.read_text(encoding="ascii").splitlines()
    fields = ACCESS_LINE.match(line)
    assert fields is not None, line
    assert (fields["request"], fields["status"]) == ("GET /a HTTP/1.1", "200")
    assert unescape(fields["agent"]) == agent


class _Exchange(Protocol):
    def __init__(self, data):
        self.data = data
        self.received = b""
        self.done = Deferred()

    def connectionMade(self):
        self.transport.write(self.data)

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.done.callback(self.received)


@pytest_twisted.ensureDeferred
async def test_over_a_real_socket():
    """Pipelined requests over TCP, answered later, come back in order; the
    server closes after the one that asks it to."""
    pending = []

    def handler(request):
        reactor.callLater(0.01 if request.uri == b"/1" else 0, answer, request)
        pending.append(request)

    raw = await exchange_over_tcp(handler, post(b"/1", b"a") + post(b"/2", b"b")
                                  + b"GET /3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert [json.loads(b)["uri"] for _, _, b in responses(raw)] == ["/1", "/2", "/3"]


async def exchange_over_tcp(handler, data, max_body=1000, **options):
    """Serve C{handler} on a real loopback port, send C{data} from a real
    client, and return all it received until the server closed."""
    factory = HTTPFactory(handler, max_body, reactor, **options)
    port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(factory)
    guard = None
    try:
        exchange = _Exchange(data)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        await endpoint.connect(_factory(exchange))
        # Every exchange here ends with the server closing; a server that
        # does not is cut off, so that the test fails rather than hangs.
        guard = reactor.callLater(10, exchange.transport.abortConnection)
        return await exchange.done
    finally:
        if guard is not None and guard.active():
            guard.cancel()
        await port.stopListening()


def _factory(protocol):
    from twisted.internet.protocol import Factory

    return Factory.forProtocol(lambda: protocol)


@pytest.mark.parametrize("write_through", [True, False])
@pytest_twisted.ensureDeferred
async def test_answers_go_straight_to_the_socket_and_stay_in_order(write_through):
    """With write_through, a small answer is sent at once, without
    registering the connection for writing; without it, through
    transport.write alone, it is queued for the reactor to send.  Either
    way, one larger than the socket takes is queued behind what was sent,
    and the answers that follow come after it, whole and in order."""
    big = bytes(range(256)) * (64 * 1024)  # 16 MiB
    seen = {}

    def handler(request):
        request.setHeader(b"content-type", b"application/octet-stream")
        if request.uri == b"/big":
            # Two writes, the second queued behind the first's remainder.
            request.write(big[:1000])
            request.write(big[1000:])
            request.finish()
            return
        answer(request)
        transport = request.channel.transport
        seen["shape"] = {name: type(getattr(transport, name, None)) for name in SHAPE}
        seen[request.uri] = (
            transport in reactor.getWriters(),
            transport._tempDataLen,
            len(transport.dataBuffer) - transport.offset,
        )

    raw = await exchange_over_tcp(handler, post(b"/1", b"a") + b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n"
                                  + b"GET /3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                                  write_through=write_through)
    (_, _, first), (_, _, body), (_, _, last) = responses(raw)
    assert json.loads(first)["uri"] == "/1"
    assert body == big
    assert json.loads(last)["uri"] == "/3"
    if write_through:
        # Sent at once: not registered for writing, nothing left queued.
        assert seen[b"/1"] == (False, 0, 0)
    else:
        # Queued by FileDescriptor.write, for the reactor to send.
        assert seen[b"/1"][0] is True and seen[b"/1"][1] > 0
    assert seen["shape"] == SHAPE


# What dispatcher.http._writethrough.send reads of a live tcp.Server, and its types.
SHAPE = {"dataBuffer": bytes, "offset": int, "_tempDataLen": int, "_tempDataBuffer": list,
         "_writeDisconnected": bool, "TLS": bool, "disconnecting": int, "connected": int,
         "_aborting": bool}


def test_write_through_falls_back_when_twisted_changes(monkeypatch):
    """A factory asked to write through uses transport.write alone when
    tcp.Server lacks what the write-through reads, rather than failing
    every answer."""
    from dispatcher.http import _writethrough

    assert HTTPFactory(Recorder(), 1024, Clock(), write_through=True).send is _writethrough.send
    monkeypatch.setitem(_writethrough.SHAPE, "_no_such_buffer", bytes)
    assert HTTPFactory(Recorder(), 1024, Clock(), write_through=True).send is _writethrough.write


def test_the_chunk_bound_grows_with_the_body_limit():
    """The most chunks a body may have is max_body_bytes / MIN_CHUNK_BYTES,
    and never below MAX_CHUNKS, so a large body limit can be used with
    chunks of ordinary size."""
    from dispatcher.http._protocol import MIN_CHUNK_BYTES

    assert HTTPFactory(Recorder(), 1024, Clock()).max_chunks == MAX_CHUNKS
    big = 64 * 1024 * 1024
    assert HTTPFactory(Recorder(), big, Clock()).max_chunks == big // MIN_CHUNK_BYTES


def test_the_tcp_transport_has_the_shape_send_reads():
    """dispatcher.http._writethrough.send reads tcp.Server's write buffer; if
    Twisted changes how FileDescriptor queues writes, this fails first."""
    import inspect

    from twisted.internet import abstract, tcp

    from dispatcher.http import _writethrough

    source = inspect.getsource(_writethrough.send)
    for name in ("dataBuffer", "offset", "_tempDataLen", "_writeDisconnected", "TLS",
                 "disconnecting", "connected", "_aborting"):
        assert f"transport.{name}" in source, name

    write = inspect.getsource(abstract.FileDescriptor.write)
    do_write = inspect.getsource(abstract.FileDescriptor.doWrite)
    for name in ("_tempDataBuffer", "_tempDataLen", "_writeDisconnected"):
        assert name in write, name
    for name in ("self.dataBuffer", "self.offset", "self._tempDataLen"):
        assert name in do_write, name
    assert issubclass(tcp.Server, abstract.FileDescriptor)
    assert "self.socket" in inspect.getsource(tcp.Connection.writeSomeData)
    assert "self._aborting = True" in inspect.getsource(tcp.Connection.abortConnection)


# Conformance: each of these was taken by the hand-written parser this
# server had before llhttp (issue 13), and each must be refused or read as
# RFC 9112 says.


async def served(raw, handler=None, **options):
    """The answers to C{raw} over a real socket, and the URIs the handler
    saw."""
    handler = handler or Recorder()
    received = await exchange_over_tcp(handler, raw, **options)
    return responses(received), [r.uri for r in handler.requests]


@pytest_twisted.ensureDeferred
async def test_a_bare_lf_in_a_chunked_trailer_does_not_hide_a_request():
    """A bare LF ending a trailer line is refused, so the requests after it
    are never taken: none is hidden from a front proxy that framed it
    otherwise."""
    raw = (b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"0\r\nX: y\n\r\n"
           b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
           b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
    answers, seen = await served(raw)
    assert [status for status, _, _ in answers] == [400]
    assert seen == []


@pytest.mark.parametrize(
    "raw",
    [
        # An HTTP/1.1 request without Host, and one with two.
        b"GET /v1/queues HTTP/1.1\r\n\r\n",
        b"GET /v1/queues HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        # Control bytes and TAB in the request target.
        b"GET /v1/jobs/a\x01b HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /v1/jobs/a\x7fb HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /v1/jobs/a\tb HTTP/1.1\r\nHost: x\r\n\r\n",
        # Whitespace around a chunk size.
        b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b" 2\r\nok\r\n0\r\n\r\n",
        b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2 \r\nok\r\n0\r\n\r\n",
        # A chunk extension with a control byte.
        b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2;a=\x01\r\nok\r\n0\r\n\r\n",
        # A lowercase method: methods are case-sensitive (RFC 9110, 9.1).
        b"post /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
    ],
    ids=["no-host", "two-hosts", "ctl-in-target", "del-in-target", "tab-in-target",
         "space-before-chunk-size", "space-after-chunk-size", "ctl-in-chunk-ext",
         "lowercase-method"],
)
@pytest_twisted.ensureDeferred
async def test_malformed_requests_are_refused(raw):
    """Each malformed request is refused with a JSON 400 and the
    connection closes; the handler never sees it, nor the request after."""
    answers, seen = await served(raw + b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n")
    ((status, headers, body),) = answers
    assert status == 400
    assert json.loads(body)["error"]["code"] == "bad_request"
    assert headers[b"connection"] == b"close"
    assert seen == []


@pytest_twisted.ensureDeferred
async def test_connection_is_a_list_of_tokens():
    """Connection is read as comma-separated tokens: "foo-close" keeps the
    connection open, "keep-alive, close" closes it."""
    raw = (b"GET /1 HTTP/1.1\r\nHost: x\r\nConnection: foo-close\r\n\r\n"
           b"GET /2 HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, close\r\n\r\n"
           b"GET /3 HTTP/1.1\r\nHost: x\r\n\r\n")
    answers, seen = await served(raw)
    assert seen == [b"/1", b"/2"]
    (_, first, _), (_, second, _) = answers
    assert b"connection" not in first
    assert second[b"connection"] == b"close"


def test_empty_lines_before_a_request_count_against_the_head_limit():
    """Empty lines before a request are part of its head: more than
    MAX_HEAD_BYTES of them are refused with a 431, read in any pieces."""
    handler = Recorder()
    channel, transport, _ = connect(handler)
    for _ in range(MAX_HEAD_BYTES // 1024 + 1):
        channel.dataReceived(b"\r\n" * 512)
    channel.dataReceived(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
    ((status, headers, body),) = responses(transport.value())
    assert status == 431 and json.loads(body)["error"]["code"] == "head_too_large"
    assert transport.disconnecting and handler.requests == []


def test_a_head_must_be_whole_within_head_timeout():
    """A head that trickles in (empty lines, then a byte of a request line
    every few seconds) gets a 408 head_timeout seconds after its first byte,
    and the connection closes."""
    handler = Recorder()
    channel, transport, clock = connect(handler, idle_timeout=60, head_timeout=30,
                                        body_timeout=60)
    clock.advance(10)
    for byte in b"\r\n\r\nGET /a HTTP/1.1\r\n":  # 21 bytes, one a second
        channel.dataReceived(bytes([byte]))
        clock.advance(1)
    clock.advance(8.5)
    assert not transport.disconnecting and transport.value() == b""
    clock.advance(0.5)  # 30 seconds after the first byte
    ((status, headers, body),) = responses(transport.value())
    assert status == 408
    assert json.loads(body)["error"]["code"] == "request_timeout"
    assert "head_timeout" in json.loads(body)["error"]["message"]
    assert transport.disconnecting and handler.requests == []


def test_a_body_must_be_whole_within_body_timeout():
    """A body that trickles in, a byte every five seconds, gets a 408
    body_timeout seconds after the end of its head; a body that comes in
    time does not."""
    handler = Recorder()
    channel, transport, clock = connect(handler, idle_timeout=60, head_timeout=30,
                                        body_timeout=20)
    channel.dataReceived(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\no")
    clock.advance(19)
    channel.dataReceived(b"k")
    assert [s for s, _, _ in responses(transport.value())] == [200]
    channel.dataReceived(b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
    for _ in range(3):
        clock.advance(5)
        assert not transport.disconnecting
        channel.dataReceived(b"x")
    clock.advance(4.5)
    assert not transport.disconnecting
    clock.advance(0.5)  # 20 seconds after the head
    (_, (status, _, body)) = responses(transport.value())
    assert status == 408 and "body_timeout" in json.loads(body)["error"]["message"]
    assert transport.disconnecting
    assert [r.uri for r in handler.requests] == [b"/a"]


def test_a_head_held_behind_an_answer_is_timed_from_the_answer():
    """The head of a pipelined request held while the one before it is
    answered is timed from that answer: the wait was the server's."""
    handler = Recorder(hold=True)
    channel, transport, clock = connect(handler, idle_timeout=60, head_timeout=30,
                                        body_timeout=60)
    channel.dataReceived(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\n")
    clock.advance(100)
    assert not transport.disconnecting
    answer(handler.requests[0])
    clock.advance(29)
    channel.dataReceived(b"Host: x\r\n\r\n")
    assert [r.uri for r in handler.requests] == [b"/a", b"/b"]
    assert not transport.disconnecting


def test_the_number_of_chunks_is_bounded():
    """A body of a million one-byte chunks is refused (413) after
    max_body_bytes / MIN_CHUNK_BYTES of them, early in the stream and for
    little CPU."""
    import time

    handler = Recorder()
    channel, transport, _ = connect(handler, max_body=2_000_000)
    channel.dataReceived(b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    stream = b"1\r\nx\r\n" * 1_000_000 + b"0\r\n\r\n"
    started = time.process_time()
    fed = 0
    while fed < len(stream) and not transport.disconnecting:
        channel.dataReceived(stream[fed:fed + 65536])
        fed += 65536
    spent = time.process_time() - started
    ((status, _, body),) = responses(transport.value())
    assert status == 413 and str(channel.factory.max_chunks) in json.loads(body)["error"]["message"]
    assert fed <= 8 * MAX_CHUNKS + 65536
    assert spent < 1.0
    assert handler.requests == []


def test_a_body_in_many_small_reads_is_buffered_linearly():
    """A 4 MiB body arriving 256 bytes a read is kept as its pieces and
    joined once: it costs well under a second of a core (copying the whole
    buffer on each read would cost tens of gigabytes of copies)."""
    import time

    handler = Recorder(hold=True)
    size = 4 * 1024 * 1024
    channel, transport, _ = connect(handler, max_body=size)
    body = bytes(range(256)) * (size // 256)
    channel.dataReceived(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)
    started = time.process_time()
    for start in range(0, size, 256):
        channel.dataReceived(body[start:start + 256])
    spent = time.process_time() - started
    assert handler.requests[0].content.getvalue() == body
    assert spent < 1.0


def test_status_lines_have_their_reason_phrases():
    """A refusal's status line carries the standard reason phrase, 431's
    included."""
    channel, transport, _ = connect(Recorder())
    channel.dataReceived(b"GET /a HTTP/1.1\r\n" + b"X: y\r\n" * 101 + b"\r\n")
    assert transport.value().startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")


def test_a_refusal_waits_for_the_answers_before_it():
    """A malformed request pipelined behind good ones is refused only once
    they are answered, in order, and nothing after it is read."""
    handler = Recorder(hold=True)
    channel, transport, _ = connect(handler)
    channel.dataReceived(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n"
                         b"GET /c\x01 HTTP/1.1\r\nHost: x\r\n\r\nGET /d HTTP/1.1\r\nHost: x\r\n\r\n")
    assert transport.value() == b""
    answer(handler.requests[0])
    answer(handler.requests[1])
    assert [s for s, _, _ in responses(transport.value())] == [200, 200, 400]
    assert [r.uri for r in handler.requests] == [b"/a", b"/b"]
    assert transport.disconnecting


def test_100_continue_for_a_pipelined_request_waits_for_the_answer_before():
    """The 100 Continue of a request read behind another is sent after that
    one's answer, not in the middle of it."""
    handler = Recorder(hold=True)
    channel, transport, _ = connect(handler)
    channel.dataReceived(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
                         b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                         b"Expect: 100-continue\r\n\r\n")
    assert transport.value() == b""
    answer(handler.requests[0])
    assert [s for s, _, _ in responses(transport.value())] == [200, 100]
    channel.dataReceived(b"ok")
    answer(handler.requests[1])
    assert [s for s, _, _ in responses(transport.value())] == [200, 100, 200]
    assert handler.requests[1].content.getvalue() == b"ok"


def test_a_request_asking_to_switch_protocols_with_a_body_is_refused():
    """llhttp would take the body of a request with Upgrade for the new
    protocol's bytes; such a request is refused.  One without a body is
    answered as any other, and the next request is read after it."""
    handler = Recorder()
    channel, transport, _ = connect(handler)
    channel.dataReceived(b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
                         b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
    assert [r.uri for r in handler.requests] == [b"/a", b"/b"]
    channel, transport, _ = connect(handler)
    channel.dataReceived(b"POST /c HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n"
                         b"Content-Length: 38\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n")
    ((status, _, _),) = responses(transport.value())
    assert status == 400
    assert [r.uri for r in handler.requests] == [b"/a", b"/b"]


def test_the_timeouts_are_read_from_the_server_section():
    """[server] head_timeout and body_timeout are read as positive seconds;
    anything else stops start-up naming the key."""
    from dispatcher.config._ini import ConfigError, parse_config

    config = parse_config("[server]\nhead_timeout = 5\nbody_timeout = 7.5\n", "t.ini")
    assert (config.server.head_timeout, config.server.body_timeout) == (5.0, 7.5)
    assert (parse_config("", "t.ini").server.head_timeout,
            parse_config("", "t.ini").server.body_timeout) == (30.0, 60.0)
    with pytest.raises(ConfigError, match="head_timeout"):
        parse_config("[server]\nhead_timeout = 0\n", "t.ini")
    with pytest.raises(ConfigError, match="body_timeout"):
        parse_config("[server]\nbody_timeout = soon\n", "t.ini")
