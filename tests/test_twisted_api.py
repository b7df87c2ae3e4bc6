"""
What the package relies on Twisted to do, through its public API, checked
here so that a Twisted release that changes it fails in this file first
(pyproject.toml leaves the Twisted range open above).
"""

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientFactory, Protocol, ServerFactory
from twisted.internet.endpoints import serverFromString
from twisted.logger import globalLogPublisher
from twisted.web.client import Agent, HTTPConnectionPool, URI
from twisted.web.error import SchemeNotSupported
from twisted.web.resource import Resource
from twisted.web.server import Site
from treq.client import HTTPClient
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface.verify import verifyObject

from dispatcher.app._exposure import planned_interface
from dispatcher.execution._http_client import QuietEndpointFactory, quiet_http_client


@pytest.mark.parametrize("description, interface", [
    ("tcp:8080", ""),
    ("tcp:0:interface=127.0.0.1", "127.0.0.1"),
    ("tcp:0:interface=0.0.0.0:backlog=4096", "0.0.0.0"),
    ("tcp6:0:interface=\\:\\:1", "::1"),
    ("tcp6:0", "::"),
    ("tcp:0:interface=localhost", None),
    ("unix:/tmp/dispatcher-test.sock", None),
])
def test_the_planned_interface_is_read_from_a_dry_run(description, interface):
    """An endpoint description's interface is found by letting the endpoint
    listen on a MemoryReactor, without binding anything; what cannot be told
    before binding is None."""
    assert planned_interface(description) == interface


@pytest.mark.parametrize("description", ["no-such-kind:1", "tcp:http", "tcp:1:bogus=1"])
def test_a_description_that_does_not_parse_raises(description):
    """A description Twisted cannot parse raises from the dry run, so that
    the options can say so before anything starts."""
    with pytest.raises(Exception):
        planned_interface(description)


class Hello(Resource):
    isLeaf = True

    def render_GET(self, request):
        return b"hello"


@pytest.fixture
def site_url():
    """A real local HTTP server, on an ephemeral port."""
    port = pytest_twisted.blockon(
        serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(Site(Hello())))
    yield f"http://127.0.0.1:{port.getHost().port}/"
    pytest_twisted.blockon(port.stopListening())


async def _factory_lines(make_client, url):
    """The "Starting/Stopping factory" lines logged while a client fetches
    url twice and closes its connections."""
    lines = []

    def observe(event):
        if "factory" in (event.get("log_format") or "").lower():
            lines.append(event["log_format"])

    pool = HTTPConnectionPool(reactor, persistent=True)
    client = make_client(reactor, pool)
    globalLogPublisher.addObserver(observe)
    try:
        for _ in range(2):
            response = await client.get(url)
            assert await response.content() == b"hello"
        await pool.closeCachedConnections()
    finally:
        globalLogPublisher.removeObserver(observe)
    return lines


@pytest_twisted.ensureDeferred
async def test_client_connections_are_not_logged(site_url):
    """The host's HTTP client fetches through connections that log nothing
    as they open and close; a stock Agent logs a line for each (what the
    quiet client is for)."""
    assert await _factory_lines(quiet_http_client, site_url) == []
    stock = await _factory_lines(
        lambda reactor, pool: HTTPClient(Agent(reactor, pool=pool)), site_url)
    assert "Starting factory {factory!r}" in stock


class FirstBytes(Protocol):
    """Keeps the first bytes a client sends."""

    def dataReceived(self, data):
        self.factory.first.callback(data)
        self.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_quiet_endpoints_take_http_and_https_only():
    """The quiet endpoint factory makes endpoints for http and https URLs,
    the https ones speaking TLS (a ClientHello first), and refuses other
    schemes, as the stock Agent does."""
    factory = QuietEndpointFactory(reactor)
    verifyObject(IAgentEndpointFactory, factory)
    server = ServerFactory.forProtocol(FirstBytes)
    server.first = Deferred()
    port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(server)
    try:
        url = f"https://127.0.0.1:{port.getHost().port}/".encode()
        endpoint = factory.endpointForURI(URI.fromBytes(url))
        verifyObject(IStreamClientEndpoint, endpoint)
        client = await endpoint.connect(ClientFactory.forProtocol(Protocol))
        # Plain TCP would send nothing until asked to: give up after 10 s.
        first = await server.first.addTimeout(10, reactor)
        # A TLS record of type handshake (22), version 3.x.
        assert first[:2] == b"\x16\x03"
        client.transport.abortConnection()
    finally:
        await port.stopListening()
    verifyObject(IStreamClientEndpoint,
                 factory.endpointForURI(URI.fromBytes(b"http://example.org/")))
    with pytest.raises(SchemeNotSupported):
        factory.endpointForURI(URI.fromBytes(b"ftp://example.org/"))
