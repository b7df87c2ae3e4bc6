"""
Tests for the fetch policy (L{dispatcher.execution._fetch_policy}) and the
client that enforces it (L{dispatcher.execution._http_client}): inputs are
not fetched from loopback, private, link-local, reserved or metadata
addresses however they are spelled, resolved or redirected to, unless
C{[fetch] allow} names them; credentials in an input URL are refused and
never shown.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IHostnameResolver, IHostResolution
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.threadpool import ThreadPool
from twisted.web.client import HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.static import Data
from twisted.web.util import Redirect
from zope.interface import implementer
from zope.interface.verify import verifyObject

from dispatcher.config._ini import ConfigError, FetchConfig, network_list, parse_config
from dispatcher.execution._fetch_policy import (
    METADATA_ADDRESSES,
    REFUSED_NETWORKS,
    FetchPolicy,
)
from dispatcher.execution._http_client import (
    AddressRefused,
    _PolicedEndpoint,
    input_http_client,
)
from dispatcher.execution._staging import InputStager, StagingError, redact_url
from dispatcher.model._jobs import InputSpec

from .conftest import TEST_TASKS
from .test_staging import Tracked, leftovers

ROOT = Path(__file__).resolve().parent.parent
BODY = b"the input\n"


def policy(allow: str = "") -> FetchPolicy:
    return FetchPolicy(network_list(allow))


def address(text: str) -> Any:
    return ipaddress.ip_address(text)


# --- The policy, address by address ------------------------------------


@pytest.mark.parametrize(
    "text, network",
    [
        ("127.0.0.1", "127.0.0.0/8"),
        ("127.255.0.9", "127.0.0.0/8"),
        ("::1", "::1/128"),
        ("0.0.0.0", "0.0.0.0/8"),
        ("::", "::/128"),
        ("10.20.30.40", "10.0.0.0/8"),
        ("172.31.255.1", "172.16.0.0/12"),
        ("192.168.1.1", "192.168.0.0/16"),
        ("100.64.0.1", "100.64.0.0/10"),
        ("169.254.1.1", "169.254.0.0/16"),
        ("fe80::1", "fe80::/10"),
        ("fd12:3456::1", "fc00::/7"),
        ("fec0::1", "fec0::/10"),
        ("224.0.0.251", "224.0.0.0/4"),
        ("ff02::1", "ff00::/8"),
        ("240.0.0.1", "240.0.0.0/4"),
        ("255.255.255.255", "240.0.0.0/4"),
        ("192.0.2.7", "192.0.2.0/24"),
        ("198.18.0.1", "198.18.0.0/15"),
        ("2001:db8::1", "2001:db8::/32"),
        ("2001::1", "2001::/23"),
        ("64:ff9b:1::1", "64:ff9b:1::/48"),
        ("4000::1", "4000::/2"),
        # IPv6 forms that carry a refused IPv4 address.
        ("::ffff:127.0.0.1", "127.0.0.0/8"),
        ("::127.0.0.1", "127.0.0.0/8"),
        ("::ffff:0:127.0.0.1", "127.0.0.0/8"),
        ("64:ff9b::10.0.0.1", "10.0.0.0/8"),
        ("2002:a9fe:a9fe::", "169.254.169.254/32"),
        ("::ffff:192.168.0.1", "192.168.0.0/16"),
    ],
)
def test_refused_addresses(text, network):
    """
    Each loopback, unspecified, private, shared, link-local, multicast,
    reserved or documentation address, and each IPv6 form carrying one,
    is refused by default, naming the network that holds it.
    """
    refusal = policy().refusal(address(text))
    assert refusal is not None
    assert str(refusal.network) == network


@pytest.mark.parametrize(
    "text", ["93.184.215.14", "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8",
             "64:ff9b::808:808", "2002:808:808::1"]
)
def test_public_addresses_pass(text):
    """
    Public addresses, and IPv6 forms that carry a public IPv4 address,
    are fetched from.
    """
    assert policy().refusal(address(text)) is None


@pytest.mark.parametrize(
    "text",
    ["169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200",
     "168.63.129.16", "::ffff:169.254.169.254"],
)
def test_metadata_addresses(text):
    """
    A cloud metadata address is refused by default and inside an allowed
    network, and let through only by an allow entry naming it alone.
    """
    assert policy().refusal(address(text)).metadata
    wide = "169.254.0.0/16, 100.64.0.0/10, fc00::/7, 168.63.0.0/16"
    refusal = policy(wide).refusal(address(text))
    assert refusal is not None and refusal.metadata
    alone = policy(refusal.allow_entry())
    assert alone.refusal(address(text)) is None


def test_allow_lets_named_networks_through():
    """
    An address in a network of C{[fetch] allow} is fetched from, in its
    IPv4-mapped form too; one outside it stays refused.
    """
    allowed = policy("10.1.0.0/16, fd00:1::/64, 127.0.0.1")
    for text in ["10.1.2.3", "::ffff:10.1.2.3", "fd00:1::5", "127.0.0.1"]:
        assert allowed.refusal(address(text)) is None, text
    for text in ["10.2.0.1", "fd00:2::5", "127.0.0.2", "::1"]:
        assert allowed.refusal(address(text)) is not None, text


@pytest.mark.parametrize(
    "allow, text",
    [
        ("::/0", "::ffff:127.0.0.1"),
        ("::/0", "::127.0.0.1"),
        ("::/0", "::ffff:0:127.0.0.1"),
        ("::/0", "64:ff9b::127.0.0.1"),
        ("::/0", "2002:7f00:1::"),
        ("2002::/16", "2002:7f00:1::1"),
        ("2002::/16", "2002:a00:1::"),
        ("64:ff9b::/96", "64:ff9b::127.0.0.1"),
        ("64:ff9b::/96", "64:ff9b::192.168.1.1"),
        ("::ffff:0:0/96", "::ffff:127.0.0.1"),
        ("::ffff:0:0/96", "::ffff:10.0.0.1"),
        ("::ffff:127.0.0.1/128", "::ffff:127.0.0.1"),
        ("::ffff:0:0/96", "::ffff:169.254.169.254"),
        ("::/0", "::ffff:169.254.169.254"),
    ],
)
def test_ipv6_allow_does_not_open_carried_ipv4(allow, text):
    """
    An IPv6 allow entry that holds an IPv4-carrying form (C{::/0},
    C{2002::/16}, C{64:ff9b::/96}, C{::ffff:0:0/96}) does not let through
    the refused IPv4 address the form carries, loopback included: the
    carried address meets the IPv4 rules alone, and the refusal names it.
    """
    refusal = policy(allow).refusal(address(text))
    assert refusal is not None
    carried = refusal.judged
    assert carried.version == 4 and carried != refusal.address
    assert refusal.describe().startswith(f"{address(text)} carries {carried}, which")
    assert refusal.allow_entry() == f"{carried}/32"


def test_ipv6_allow_still_opens_ipv6_and_ipv4_entries_open_carried():
    """
    A broad IPv6 allow entry still opens the plain IPv6 addresses it holds;
    a carried IPv4 address is let through by an IPv4 entry holding it, and
    a public one passes as before.
    """
    broad = policy("::/0")
    for text in ["::1", "fd00:1::5", "fe80::1", "2001:db8::1", "::ffff:8.8.8.8"]:
        assert broad.refusal(address(text)) is None, text
    both = policy("::/0, 127.0.0.0/8")
    for text in ["::ffff:127.0.0.1", "64:ff9b::127.0.0.1", "2002:7f00:1::"]:
        assert both.refusal(address(text)) is None, text
    assert both.refusal(address("::ffff:10.0.0.1")) is not None


def test_allow_config():
    """
    C{[fetch] allow} reads networks in CIDR form separated by commas or
    spaces (an address alone is that address), and nothing by default.
    """
    config = parse_config("[fetch]\nallow = 127.0.0.0/8, 10.1.0.0/16 fd00::/8,10.9.9.9\n")
    assert [str(n) for n in config.fetch.allow] == [
        "127.0.0.0/8", "10.1.0.0/16", "fd00::/8", "10.9.9.9/32"]
    assert parse_config("").fetch.allow == ()
    assert parse_config("[fetch]\nallow =\n").fetch.allow == ()


@pytest.mark.parametrize(
    "value, says",
    [
        ("localhost", "'localhost' is not a network in CIDR form"),
        ("10.0.0.0/33", "'10.0.0.0/33' is not a network in CIDR form"),
        ("127.0.0.0/8; 10.0.0.0/8", "is not a network in CIDR form"),
        ("10.1.2.3/16", "write the network as 10.1.0.0/16, or the address alone as 10.1.2.3/32"),
    ],
)
def test_allow_config_errors(value, says):
    """
    A bad C{[fetch] allow} is one line naming the file, section, key and
    value, and what is allowed.
    """
    with pytest.raises(ConfigError) as info:
        parse_config(f"[fetch]\nallow = {value}\n", "site.ini")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"site.ini: [fetch] allow = {value!r}: ")
    assert says in message


def test_docs_list_every_refused_network():
    """
    docs/security.md, the README and etc/dispatcher.ini say what is refused:
    the page lists every network and metadata address of the policy's
    tables, and the other two name the key.
    """
    page = (ROOT / "docs" / "security.md").read_text()
    for network, _ in REFUSED_NETWORKS:
        assert f"`{network}`" in page, network
    for metadata, _ in METADATA_ADDRESSES:
        assert f"`{metadata}`" in page, metadata
    assert "`[fetch] allow`" in (ROOT / "README.md").read_text()
    assert "# allow =" in (ROOT / "etc" / "dispatcher.ini").read_text()


@pytest.mark.parametrize(
    "url, shown",
    [
        ("http://alice:s3cret@files.example/x", "http://***@files.example/x"),
        ("https://tok@files.example:8443/x?a=b", "https://***@files.example:8443/x?a=b"),
        ("http://a:b@c@files.example/x", "http://***@files.example/x"),
        ("http://files.example/x@y", "http://files.example/x@y"),
        ("http://files.example/x", "http://files.example/x"),
    ],
)
def test_redact_url(url, shown):
    """
    The credentials of a URL are shown as C{***}, and nothing else of it
    changes.
    """
    assert redact_url(url) == shown


# --- The client, against real servers ------------------------------------


@implementer(IHostResolution)
class _Resolution:
    def __init__(self, name: str) -> None:
        self.name = name

    def cancel(self) -> None:
        pass


@implementer(IHostnameResolver)
class TableResolver:
    """
    A resolver whose answers the test sets: each name resolves to the
    addresses listed for it, in order; others to nothing.
    """

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.asked: list[str] = []

    def resolveHostName(self, receiver, hostName, portNumber=0, addressTypes=None,
                        transportSemantics="TCP"):
        self.asked.append(hostName)
        resolution = _Resolution(hostName)
        receiver.resolutionBegan(resolution)
        for text in self.table.get(hostName, []):
            kind = IPv6Address if ":" in text else IPv4Address
            receiver.addressResolved(kind("TCP", text, portNumber))
        receiver.resolutionComplete()
        return resolution


@pytest.fixture
def threads():
    pool = ThreadPool(1, 4, name="test-fetch-policy")
    pool.start()
    yield pool
    pool.stop()


class Served:
    """
    A real HTTP server on one loopback address, counting connections.
    """

    def __init__(self, port: Any, factory: Tracked, resource: Resource) -> None:
        self.port = port
        self.factory = factory
        self.resource = resource
        self.connections = 0
        original = factory.buildProtocol

        def build(addr):
            self.connections += 1
            return original(addr)

        factory.buildProtocol = build

    @property
    def number(self) -> int:
        return self.port.getHost().port

    async def close(self) -> None:
        await self.port.stopListening()
        await self.factory.close_all()


def _files(redirect_to: str | None = None) -> Resource:
    root = Resource()
    root.putChild(b"file", Data(BODY, "text/plain"))
    if redirect_to is not None:
        root.putChild(b"moved", Redirect(redirect_to.encode()))
    return root


async def serve(description: str, resource: Resource) -> Served:
    factory = Tracked(Site(resource))
    port = await serverFromString(reactor, description).listen(factory)
    return Served(port, factory, resource)


@pytest_twisted.async_yield_fixture
async def servers():
    started: list[Served] = []

    async def start(description: str = "tcp:0:interface=127.0.0.1",
                    resource: Resource | None = None) -> Served:
        served = await serve(description, resource if resource is not None else _files())
        started.append(served)
        return served

    yield start
    for served in started:
        await served.close()


@pytest_twisted.async_yield_fixture
async def pools():
    made: list[HTTPConnectionPool] = []

    def make() -> HTTPConnectionPool:
        pool = HTTPConnectionPool(reactor, persistent=False)
        made.append(pool)
        return pool

    yield make
    for pool in made:
        await pool.closeCachedConnections()


@pytest.fixture
def stager(pools, threads):
    """
    An InputStager fetching through the policed client, with
    C{[fetch] allow} and a resolver the test gives.
    """

    def make(allow: str = "", resolver: Any = None) -> InputStager:
        config = FetchConfig(allow=network_list(allow), retries=0, timeout=10.0)
        client = input_http_client(reactor, pools(), FetchPolicy(config.allow), resolver)
        return InputStager(client, reactor, config, threads, reactor)

    return make


async def fetch(stager: InputStager, url: str, workdir: Path) -> None:
    await stager.stage_inputs([InputSpec(url, "in/file")], str(workdir))


async def refused(stager: InputStager, url: str, workdir: Path) -> StagingError:
    with pytest.raises(StagingError) as info:
        await fetch(stager, url, workdir)
    assert leftovers(workdir) == []
    return info.value


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.parametrize(
    "host, allow",
    [
        ("127.0.0.1", "127.0.0.0/8"),
        ("2130706433", "127.0.0.0/8"),
        ("0177.0.0.1", "127.0.0.0/8"),
        ("0x7f.1", "127.0.0.0/8"),
        ("127.1", "127.0.0.1/32"),
        ("[::ffff:127.0.0.1]", "127.0.0.1/32"),
        ("localhost", "127.0.0.0/8"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_loopback_spellings_refused(tmp_path, servers, stager, host, allow):
    """
    Every spelling of a loopback address (and C{localhost}, through the
    host's own resolver) is refused on the address it resolves to, before
    any connection, with an error that names the address and the key that
    allows it; with the key set the same URL is fetched.
    """
    served = await servers()
    url = f"http://{host}:{served.number}/file"
    error = await refused(stager(), url, tmp_path / "w")
    # [::ffff:127.0.0.1] is named as itself, "carrying 127.0.0.1".
    assert re.search(r"127\.0\.0\.1(, which)? is in 127\.0\.0\.0/8 \(loopback\)", error.reason)
    assert "[fetch] allow" in error.reason and "add 127.0.0.1/32" in error.reason
    assert str(error).startswith(f"input 0 ({url} -> in/file): ")
    assert served.connections == 0
    await fetch(stager(allow), url, tmp_path / "ok")
    assert (tmp_path / "ok/in/file").read_bytes() == BODY
    assert served.connections == 1


@pytest.mark.parametrize("allow", ["::/0", "::ffff:0:0/96"])
@pytest_twisted.ensureDeferred
async def test_broad_ipv6_allow_keeps_mapped_loopback_refused(tmp_path, servers, stager, allow):
    """
    With an IPv6 network that holds the IPv4-mapped forms allowed, a URL to
    C{[::ffff:127.0.0.1]} is still refused before any connection, as
    carrying 127.0.0.1; allowing 127.0.0.1 itself lets it through.
    """
    served = await servers()
    url = f"http://[::ffff:127.0.0.1]:{served.number}/file"
    error = await refused(stager(allow), url, tmp_path / "w")
    assert "carries 127.0.0.1, which is in 127.0.0.0/8 (loopback)" in error.reason
    assert served.connections == 0
    await fetch(stager(f"{allow}, 127.0.0.1"), url, tmp_path / "ok")
    assert (tmp_path / "ok/in/file").read_bytes() == BODY


@pytest.mark.parametrize("host", ["0", "0.0.0.0"])
@pytest_twisted.ensureDeferred
async def test_unspecified_address_refused(tmp_path, servers, stager, host):
    """
    0.0.0.0, which Linux connects to this host, is refused.
    """
    served = await servers()
    error = await refused(stager(), f"http://{host}:{served.number}/file", tmp_path / "w")
    assert "0.0.0.0 is in 0.0.0.0/8 (unspecified" in error.reason
    assert served.connections == 0


@pytest.mark.skipif(not _ipv6_loopback(), reason="this host has no IPv6 loopback (::1)")
@pytest.mark.parametrize("host, reason", [
    ("[::1]", "::1 is in ::1/128 (loopback)"),
    ("[::]", ":: is in ::/128 (unspecified"),
])
@pytest_twisted.ensureDeferred
async def test_ipv6_loopback_refused(tmp_path, servers, stager, host, reason):
    """
    The IPv6 loopback and unspecified addresses are refused; allowed, the
    IPv6 URL is fetched.
    """
    served = await servers(r"tcp6:0:interface=\:\:1")
    url = f"http://{host}:{served.number}/file"
    error = await refused(stager(), url, tmp_path / "w")
    assert reason in error.reason
    assert served.connections == 0
    await fetch(stager("::/127"), url, tmp_path / "ok")
    assert (tmp_path / "ok/in/file").read_bytes() == BODY


@pytest_twisted.ensureDeferred
async def test_metadata_service_refused(tmp_path, stager):
    """
    169.254.169.254 is refused at once, even with link-local allowed, with
    an error saying to name it alone.
    """
    for allow in ("", "169.254.0.0/16"):
        error = await refused(
            stager(allow), "http://169.254.169.254/latest/meta-data/", tmp_path / "w")
        assert "169.254.169.254 is the cloud metadata service" in error.reason
        assert "names it alone: add 169.254.169.254/32" in error.reason


@pytest.mark.parametrize("target", ["127.0.0.1", "2130706433", "localhost"])
@pytest_twisted.ensureDeferred
async def test_redirect_to_refused_address(tmp_path, servers, stager, target):
    """
    A redirect from an allowed server to a refused address is refused
    there, and the refused server is never connected to; allowed, the same
    redirect is followed.
    """
    secret = await servers("tcp:0:interface=127.0.0.1")
    to = f"http://{target}:{secret.number}/file"
    allowed = await servers("tcp:0:interface=127.0.0.2", _files(redirect_to=to))
    url = f"http://127.0.0.2:{allowed.number}/moved"
    error = await refused(stager("127.0.0.2/32"), url, tmp_path / "w")
    assert error.reason.startswith("redirected to a refused address: ")
    assert "127.0.0.1 is in 127.0.0.0/8 (loopback)" in error.reason
    assert allowed.connections == 1 and secret.connections == 0
    await fetch(stager("127.0.0.0/8"), url, tmp_path / "ok")
    assert (tmp_path / "ok/in/file").read_bytes() == BODY
    assert secret.connections == 1


@pytest.mark.parametrize("name", ["files.example", "localhost.", "rebound.example"])
@pytest_twisted.ensureDeferred
async def test_name_resolving_to_loopback_refused(tmp_path, servers, stager, name):
    """
    A DNS name that resolves to a loopback address is refused, naming the
    host and the address, without a connection.
    """
    served = await servers()
    resolver = TableResolver({name: ["127.0.0.1"]})
    error = await refused(
        stager(resolver=resolver), f"http://{name}:{served.number}/file", tmp_path / "w")
    assert error.reason.startswith(
        f"the host {name} resolves only to refused addresses: "
        "127.0.0.1 is in 127.0.0.0/8 (loopback); ")
    assert resolver.asked == [name]
    assert served.connections == 0


@pytest_twisted.ensureDeferred
async def test_name_with_refused_and_allowed_addresses(tmp_path, servers, stager):
    """
    A name resolving to a refused address and an allowed one connects
    only to the allowed one, even when the refused one comes first and
    answers.
    """
    allowed = await servers("tcp:0:interface=127.0.0.2")
    try:
        secret = await servers(f"tcp:{allowed.number}:interface=127.0.0.1")
    except Exception as e:  # the port is taken on 127.0.0.1
        pytest.skip(f"cannot listen on 127.0.0.1:{allowed.number}: {e}")
    resolver = TableResolver({"both.example": ["127.0.0.1", "127.0.0.2"]})
    url = f"http://both.example:{allowed.number}/file"
    await fetch(stager("127.0.0.2/32", resolver), url, tmp_path / "ok")
    assert (tmp_path / "ok/in/file").read_bytes() == BODY
    assert allowed.connections == 1 and secret.connections == 0


@pytest_twisted.ensureDeferred
async def test_credentials_never_shown(tmp_path, servers, stager):
    """
    A URL with credentials is refused without a request, and neither the
    error nor any log line shows them; nor does a redirect to one.
    """
    served = await servers()
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        url = f"http://alice:s3cret@127.0.0.1:{served.number}/file"
        error = await refused(stager("127.0.0.0/8"), url, tmp_path / "w")
        assert str(error) == (
            f"input 0 (http://***@127.0.0.1:{served.number}/file -> in/file): the URL"
            " holds credentials (user:password@, shown as ***), which are never"
            " sent; fetch from a URL without them")
        assert served.connections == 0

        moved = await servers(
            "tcp:0:interface=127.0.0.2",
            _files(redirect_to=f"http://bob:hunter2@127.0.0.1:{served.number}/file"))
        error = await refused(
            stager("127.0.0.0/8"), f"http://127.0.0.2:{moved.number}/moved", tmp_path / "w")
        assert error.reason == (
            "redirected to a URL that holds credentials (user:password@), which are"
            " never sent")
        assert served.connections == 0
    finally:
        globalLogPublisher.removeObserver(events.append)
    from twisted.logger import formatEvent

    logged = " ".join(formatEvent(e) + repr(e) for e in events)
    assert f"staging input 0 from http://127.0.0.2:{moved.number}/moved" in logged
    assert "s3cret" not in logged and "hunter2" not in logged


def test_connected_peer_is_checked():
    """
    Should a connection reach a refused address although the resolver let
    only an allowed one through, it is aborted and refused.
    """
    memory = MemoryReactorClock()
    endpoint = _PolicedEndpoint(
        memory, TableResolver({"x.example": ["127.0.0.2"]}), policy("127.0.0.2/32"),
        "x.example", 80)
    d = endpoint.connect(Factory.forProtocol(Protocol))
    memory.advance(0)
    [(host, port, factory, _, _)] = memory.tcpClients
    assert (host, port) == ("127.0.0.2", 80)
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 80))
    factory.buildProtocol(None).makeConnection(transport)
    failures: list = []
    d.addErrback(failures.append)
    [failure] = failures
    assert failure.check(AddressRefused)
    assert "127.0.0.1 is in 127.0.0.0/8 (loopback)" in str(failure.value)
    assert transport.disconnecting


def test_resolver_double_is_a_resolver():
    """
    The test's resolver provides the interface the client's takes.
    """
    assert verifyObject(IHostnameResolver, TableResolver({}))


# --- The daemon and a worker ---------------------------------------------


@pytest_twisted.ensureDeferred
async def test_daemon_refuses_its_own_api(make_daemon):
    """
    A job whose input is the daemon's own API fails before it runs, with
    the refused address and how to allow it in its error and its attempt's.
    """
    daemon = await make_daemon()
    job = await daemon.submit({
        "command": ["touch", "ran"],
        "inputs": [{"url": f"{daemon.url}/v1/credentials", "path": "creds.json"}]})
    done = await daemon.wait(job["id"])
    assert done["state"] == "failed"
    assert done["error"].startswith(
        f"staging failed: input 0 ({daemon.url}/v1/credentials -> creds.json): "
        "127.0.0.1 is in 127.0.0.0/8 (loopback); ")
    assert "[fetch] allow" in done["error"]
    assert done["attempts"][0]["error"] == done["error"]
    workdir = daemon.service.dispatcher.executor.workdir(job["id"])
    assert not os.path.exists(os.path.join(workdir, "ran"))


@pytest_twisted.ensureDeferred
async def test_submission_with_credentials_refused(make_daemon):
    """
    A submission whose input URL holds credentials is a 400 naming the
    field, and nothing is stored.
    """
    daemon = await make_daemon()
    code, error = await daemon.json("POST", "/v1/jobs", {
        "command": ["true"],
        "inputs": [{"url": "https://files.example/a", "path": "a"},
                   {"url": "https://alice:s3cret@files.example/b", "path": "b"}]})
    assert code == 400, error
    assert error["error"]["code"] == "invalid_field"
    assert error["error"]["field"] == "inputs[1].url"
    assert "without credentials" in error["error"]["message"]
    code, listed = await daemon.json("GET", "/v1/jobs")
    assert listed["jobs"] == []
    code, job = await daemon.json("POST", "/v1/jobs", {
        "command": ["true"], "inputs": [{"url": "https://files.example/a@b?c=d@e", "path": "a"}]})
    assert code == 201, job


@pytest.fixture
def worker_processes():
    started: list = []
    yield started
    for worker in started:
        worker.kill()


@pytest_twisted.ensureDeferred
async def test_worker_applies_its_own_policy(make_daemon, tmp_path, token_file,
                                             worker_processes, servers):
    """
    A remote worker refuses an input on loopback by its own configuration
    (the dispatcher's allows it), and the job fails with the refusal.
    """
    from .test_worker import WorkerProcess

    served = await servers()
    daemon = await make_daemon(
        f"[executor]\nslots = 0\n\n[workers]\ntoken_file = {token_file}\n"
        "lease_seconds = 6\n\n[fetch]\nallow = 127.0.0.0/8\n")
    worker = WorkerProcess(tmp_path, daemon.url, token_file, name="node-p", ini=TEST_TASKS)
    worker_processes.append(worker.start())
    job = await daemon.submit({
        "command": ["touch", "ran"],
        "inputs": [{"url": f"http://127.0.0.1:{served.number}/file", "path": "f"}]})
    done = await daemon.wait(job["id"], timeout=30)
    assert done["state"] == "failed", (done, worker.output())
    assert "127.0.0.1 is in 127.0.0.0/8 (loopback)" in done["error"], done
    assert done["worker"] == "node-p"
    assert served.connections == 0
    await worker.stop_async()
