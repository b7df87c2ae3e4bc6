"""
Bounded requests (issue 16): connection limits in all and per address, the
head, body and send deadlines under a slow drip, the body a caller without a
credential may send, and body memory given back once connections close.
Logic against a StringTransport and a Clock; the promises against a real
server on loopback and a real twistd.
"""

import json
import os
import resource
import socket
import subprocess
import sys
import time

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import ISSLTransport
from zope.interface import directlyProvides

from dispatcher.api._auth import MAX_ANONYMOUS_BODY_BYTES
from dispatcher.config._ini import ConfigError, parse_config
from dispatcher.http._protocol import HTTPFactory
from dispatcher.http._trim import TRIM_AFTER_BYTES, TRIM_DELAY, HeapTrimmer
from dispatcher.wire._submission import ApiError
from tests.conftest import sleep, until
from tests.test_http import Recorder, answer, responses
from tests.test_twistd import Twistd


def open_channel(factory, peer=None):
    """A channel of C{factory} on a StringTransport from C{peer}."""
    channel = factory.buildProtocol(None)
    transport = StringTransport(peerAddress=peer or IPv4Address("TCP", "10.0.0.1", 5000))
    channel.makeConnection(transport)
    return channel, transport


def close(channel):
    channel.connectionLost(Failure(ConnectionDone()))


def test_the_head_check_may_lower_a_requests_body_limit():
    """A head check that limits the body of the request it checks has a
    longer Content-Length refused at once with its refusal (before a byte
    of the body), and a chunked body refused as soon as it passes the
    limit, with no more kept; the next connection's requests have the
    factory's limit."""
    refusal = ApiError(413, "body_too_large", "strangers send 16 bytes at most", "Authorization")

    def check(channel, method, target, headers):
        if b"authorization" not in headers:
            channel.limit_body(16, refusal)
        return "someone"

    factory = HTTPFactory(Recorder(), 1000, Clock(), head_check=check)
    channel, transport = open_channel(factory)
    channel.dataReceived(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 17\r\n\r\n")
    ((status, _, body),) = responses(transport.value())
    assert status == 413 and json.loads(body) == refusal.to_json()
    assert transport.disconnecting

    channel, transport = open_channel(factory)
    channel.dataReceived(b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"a\r\n0123456789\r\n")
    assert transport.value() == b"" and channel._body_size == 10
    channel.dataReceived(b"a\r\n0123456789\r\n")
    ((status, _, body),) = responses(transport.value())
    assert status == 413 and b"16 bytes" in body
    assert sum(map(len, channel._body)) == 10

    channel, transport = open_channel(factory)
    body = b"x" * 900
    channel.dataReceived(b"POST /a HTTP/1.1\r\nHost: x\r\nAuthorization: t\r\n"
                         b"Content-Length: 900\r\n\r\n" + body)
    ((status, _, answered),) = responses(transport.value())
    assert status == 200 and json.loads(answered)["body"] == body.decode()


async def test_a_stranger_cannot_make_the_daemon_hold_a_body(daemon):
    """A request without a credential to an open route (/healthz) that
    announces a 1 MiB body is answered 413 from its head, before any of the
    body is sent, naming the limit and the credential; a chunked one is
    refused once it passes MAX_ANONYMOUS_BODY_BYTES; with a token, the same
    body goes to the route (405: /healthz takes no POST)."""
    port = daemon.service.port.getHost().port
    head = (b"POST /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1048576\r\n\r\n")
    received = await head_answer(port, head)
    assert received.startswith(b"HTTP/1.1 413 "), received
    assert f"at most {MAX_ANONYMOUS_BODY_BYTES} bytes".encode() in received
    chunked = (b"POST /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n" + (b"200\r\n" + b" " * 512 + b"\r\n") * 3)
    received = await head_answer(port, chunked)
    assert received.startswith(b"HTTP/1.1 413 "), received
    response, content = await daemon.request("POST", "/healthz", raw=b" " * 100_000)
    assert response.code == 405


class _HeadReader(Protocol):
    """Sends its bytes and keeps what comes back until an answer's head is
    in (the request's body may never be finished)."""

    def __init__(self, data):
        self.data = data
        self.received = b""
        self.done = Deferred()

    def connectionMade(self):
        self.transport.write(self.data)

    def dataReceived(self, data):
        self.received += data
        if b"\r\n\r\n" in self.received and not self.done.called:
            self.done.callback(self.received)
            self.transport.abortConnection()

    def connectionLost(self, reason):
        if not self.done.called:
            self.done.callback(self.received)


async def head_answer(port, data, timeout=5.0):
    """What the server at C{port} answers to C{data} (up to the end of the
    answer's head), or what it sent before it closed or C{timeout} passed."""
    reader = _HeadReader(data)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    await endpoint.connect(Factory.forProtocol(lambda: reader))
    guard = reactor.callLater(timeout, reader.transport.abortConnection)
    try:
        return await reader.done
    finally:
        if guard.active():
            guard.cancel()


def test_body_memory_is_given_back_when_connections_close(tmp_path):
    """100 connections holding almost all of a 1 MiB body with the admin
    token grow the daemon by about 100 MiB while they wait, and it gives
    nearly all of it back once they close; 50 such bodies without a
    credential on /healthz are each answered 413 from their head and hold
    nothing (bench/body_flood.py measures 1,500)."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bench.body_flood import flood

    daemon = Twistd(str(tmp_path), "[executor]\nslots = 0\n[server]\n"
                    "body_timeout = 120\nidle_timeout = 120\n")
    try:
        daemon.start()
        held = flood(daemon.url, daemon.process.pid, 100, "token", daemon.token)
        assert held["held_mib"] > 80, held
        assert held["kept_after_close_mib"] < held["held_mib"] / 5, held
        strangers = flood(daemon.url, daemon.process.pid, 50, "open", None)
        assert strangers["answered_before_the_body"] == {"413": 50}, strangers
        assert strangers["held_mib"] < 10, strangers
    finally:
        daemon.stop()
