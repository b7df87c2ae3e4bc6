"""
The HTTP clients of a host: treq over an L{Agent} whose new connections are
not logged.  A remote worker talks to its dispatcher with
L{quiet_http_client}; inputs are fetched with L{input_http_client}, whose
every connection, redirects included, goes only to addresses the
L{FetchPolicy} allows: the names are resolved through a resolver that
drops the refused addresses, so nothing connects to one, and the address
connected to is checked once more.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from treq.client import HTTPClient
from twisted.internet.defer import fail
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IHostnameResolver,
    IReactorPluggableNameResolver,
    IResolutionReceiver,
    IStreamClientEndpoint,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.error import SchemeNotSupported
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from dispatcher.execution._fetch_policy import FetchPolicy, Refusal, parse_address

log = Logger()


@implementer(IStreamClientEndpoint)
class _QuietEndpoint:
    """
    An endpoint that connects as the one it wraps, with the factory's
    C{noisy} turned off: every C{Factory} logs "Starting factory" and
    "Stopping factory" around each connection it makes, two lines per
    connection that say nothing a reader needs (a worker that retries
    every few seconds would log little else).
    """

    def __init__(self, endpoint: Any) -> None:
        self._endpoint = endpoint

    def connect(self, protocolFactory: Any) -> Any:
        """
        Connect C{protocolFactory}, which logs nothing of it.
        """
        protocolFactory.noisy = False
        return self._endpoint.connect(protocolFactory)


@implementer(IAgentEndpointFactory)
class QuietEndpointFactory:
    """
    The endpoints an L{Agent} connects through, as its own default makes
    them (TCP for C{http}, TLS over TCP checked as a browser would for
    C{https}), with connections that are not logged.

    @param reactor: the reactor to connect with.
    @param tls_policy: the C{IPolicyForHTTPS} of C{https} connections.
    """

    def __init__(self, reactor: Any, tls_policy: Any = None) -> None:
        self._reactor = reactor
        self._tls_policy = (
            tls_policy if tls_policy is not None else BrowserLikePolicyForHTTPS()
        )

    def endpointForURI(self, uri: Any) -> Any:
        """
        The endpoint of C{uri}'s host and port.

        @raise SchemeNotSupported: the scheme is neither C{http} nor C{https}.
        @raise ValueError: the host is not ASCII (IDNA-encoded).
        """
        try:
            host = uri.host.decode("ascii")
        except UnicodeDecodeError:
            raise ValueError(f"the host {uri.host!r} is not ASCII")
        endpoint: Any = self._tcp_endpoint(host, uri.port)
        if uri.scheme == b"https":
            endpoint = wrapClientTLS(
                self._tls_policy.creatorForNetloc(uri.host, uri.port), endpoint
            )
        elif uri.scheme != b"http":
            raise SchemeNotSupported(f"unsupported scheme: {uri.scheme!r}")
        return _QuietEndpoint(endpoint)

    def _tcp_endpoint(self, host: str, port: int) -> Any:
        return HostnameEndpoint(self._reactor, host, port)


def quiet_http_client(
    reactor: Any, pool: HTTPConnectionPool, tls_policy: Any = None
) -> HTTPClient:
    """
    A treq L{HTTPClient} whose connections come from C{pool} and are not
    logged one by one.

    @param tls_policy: the C{IPolicyForHTTPS} of C{https} connections; by
        default L{BrowserLikePolicyForHTTPS} (the system's trusted CAs).
    """
    return HTTPClient(
        Agent.usingEndpointFactory(reactor, QuietEndpointFactory(reactor, tls_policy), pool)
    )


class AddressRefused(Exception):
    """
    A connection for an input was not made: every address its host has is
    one the L{FetchPolicy} refuses.

    @ivar host: the host of the URL (or of the redirect) connected for.
    @ivar port: its port.
    @ivar refusals: a L{Refusal} for each address, in the resolver's order.
    """

    def __init__(self, host: str, port: int, refusals: Sequence[Refusal]) -> None:
        super().__init__(host, port, tuple(refusals))
        self.host = host
        self.port = port
        self.refusals = tuple(refusals)

    def __str__(self) -> str:
        first = self.refusals[0]
        if len(self.refusals) == 1 and _same_address(self.host, first.address):
            what = first.describe()
        else:
            what = f"the host {self.host} resolves only to refused addresses: " + (
                "; ".join(r.describe() for r in self.refusals)
            )
        entries = " and ".join(dict.fromkeys(r.allow_entry() for r in self.refusals))
        if any(r.metadata for r in self.refusals):
            # An allowed network does not open a metadata service.
            how = f"names it alone: add {entries}"
        else:
            how = f"holds it: add {entries} or a network holding it"
        return (
            f"{what}; inputs are not fetched from there unless [fetch] allow,"
            f" in the configuration of the host that fetches, {how}"
        )


class CredentialsInURL(Exception):
    """
    A URL to fetch an input from holds credentials (C{user:password@}):
    they would never be sent, and are shown to nobody.
    """

    def __str__(self) -> str:
        return (
            "the URL holds credentials (user:password@, shown as ***), which are"
            " never sent; fetch from a URL without them"
        )


def _same_address(host: str, address: Any) -> bool:
    # Whether the host is written as the address (::ffff:127.0.0.1 is
    # ::ffff:7f00:1), not a name that resolved to it.
    try:
        return parse_address(host.strip("[]")) == address
    except ValueError:
        return False


def _shown_host(host: str) -> str:
    # An Agent takes a URL's user:password@ for part of its host (it never
    # sends it); a redirect may hold one, and it is nobody's to read.
    return "***@" + host.rpartition("@")[2] if "@" in host else host


@implementer(IResolutionReceiver)
class _PolicedReceiver:
    """
    Passes on the addresses the policy allows and keeps a L{Refusal} for
    each of the others.
    """

    def __init__(
        self,
        receiver: Any,
        policy: FetchPolicy,
        host: str,
        refused: list[Refusal],
        passed: list[Any],
        purpose: str = "input",
    ) -> None:
        self._purpose = purpose
        self._receiver = receiver
        self._policy = policy
        self._host = host
        self._refused = refused
        self._passed = passed

    def resolutionBegan(self, resolutionInProgress: Any) -> None:
        self._receiver.resolutionBegan(resolutionInProgress)

    def addressResolved(self, address: Any) -> None:
        try:
            refusal = self._policy.refusal(parse_address(address.host))
        except ValueError:
            # Not an IP address: nothing a TCP connection could be made to.
            return
        if refusal is not None:
            log.info(
                "not connecting to {address} for the {purpose} host {host}: {what}",
                address=address.host,
                purpose=self._purpose,
                host=self._host,
                what=refusal.what,
            )
            self._refused.append(refusal)
            return
        self._passed.append(address)
        self._receiver.addressResolved(address)

    def resolutionComplete(self) -> None:
        self._receiver.resolutionComplete()


@implementer(IHostnameResolver)
class _PolicedResolver:
    """
    A resolver that gives only the addresses the policy allows.
    """

    def __init__(
        self, resolver: Any, policy: FetchPolicy, refused: list, passed: list,
        purpose: str = "input",
    ) -> None:
        self._purpose = purpose
        self._resolver = resolver
        self._policy = policy
        self._refused = refused
        self._passed = passed

    def resolveHostName(
        self,
        resolutionReceiver: Any,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Any = None,
        transportSemantics: str = "TCP",
    ) -> Any:
        receiver = _PolicedReceiver(
            resolutionReceiver, self._policy, _shown_host(hostName), self._refused, self._passed,
            self._purpose,
        )
        return self._resolver.resolveHostName(
            receiver, hostName, portNumber, addressTypes, transportSemantics
        )


@implementer(IReactorPluggableNameResolver)
class _ResolvingReactor:
    """
    The reactor, resolving names with another resolver: what a
    L{HostnameEndpoint} takes its resolver from.
    """

    def __init__(self, reactor: Any, resolver: Any) -> None:
        self._reactor = reactor
        self.nameResolver = resolver

    def installNameResolver(self, resolver: Any) -> Any:
        raise NotImplementedError("this reactor's resolver is fixed")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


@implementer(IStreamClientEndpoint)
class _PolicedEndpoint:
    """
    A L{HostnameEndpoint} that connects only to the addresses of its host
    that the policy allows, and fails with L{AddressRefused} when there is
    none.
    """

    def __init__(
        self, reactor: Any, resolver: Any, policy: FetchPolicy, host: str, port: int,
        purpose: str = "input",
    ) -> None:
        self._purpose = purpose
        self._reactor = reactor
        self._resolver = resolver
        self._policy = policy
        self._host = host
        self._port = port

    def connect(self, protocolFactory: Any) -> Any:
        """
        Resolve the host, drop the refused addresses and connect to one of
        the rest, as L{HostnameEndpoint} does.
        """
        if "@" in self._host:
            # An Agent takes user:password@ for part of the host; only a
            # redirect brings one here (the stager refuses such URLs).
            return fail(CredentialsInURL())
        refused: list[Refusal] = []
        passed: list[Any] = []
        resolver = _PolicedResolver(
            self._resolver, self._policy, refused, passed, self._purpose
        )
        endpoint = HostnameEndpoint(
            _ResolvingReactor(self._reactor, resolver), self._host, self._port
        )
        shown = _shown_host(self._host)

        def refuse(failure: Failure) -> Failure:
            if refused and not passed:
                return Failure(AddressRefused(shown, self._port, refused))
            return failure

        def check_peer(protocol: Any) -> Any:
            # The resolver let only allowed addresses through; this is the
            # address the connection actually went to.
            peer = protocol.transport.getPeer()
            refusal = self._policy.refusal(parse_address(peer.host))
            if refusal is not None:
                protocol.transport.abortConnection()
                raise AddressRefused(shown, self._port, [refusal])
            return protocol

        return endpoint.connect(protocolFactory).addCallbacks(check_peer, refuse)


@implementer(IAgentEndpointFactory)
class PolicedEndpointFactory(QuietEndpointFactory):
    """
    The endpoints inputs are fetched through: as L{QuietEndpointFactory}'s,
    connecting only to addresses the L{FetchPolicy} allows.

    @param reactor: the reactor to connect with.
    @param policy: the L{FetchPolicy}.
    @param resolver: the C{IHostnameResolver} names are resolved with; the
        reactor's by default.
    @param purpose: what the connections are for, as a log line of a
        refused address says it (C{"input"}, C{"webhook"}).
    """

    def __init__(
        self, reactor: Any, policy: FetchPolicy, resolver: Optional[Any] = None,
        purpose: str = "input",
    ) -> None:
        super().__init__(reactor)
        self._purpose = purpose
        self._policy = policy
        self._resolver = resolver if resolver is not None else reactor.nameResolver

    def _tcp_endpoint(self, host: str, port: int) -> Any:
        return _PolicedEndpoint(
            self._reactor, self._resolver, self._policy, host, port, self._purpose
        )


def input_http_client(
    reactor: Any,
    pool: HTTPConnectionPool,
    policy: FetchPolicy,
    resolver: Optional[Any] = None,
    purpose: str = "input",
) -> HTTPClient:
    """
    The treq L{HTTPClient} inputs are fetched with: its connections come
    from C{pool}, are not logged one by one, and go only to addresses
    C{policy} allows, on every redirect too (C{https} checked against the
    system's trusted CAs).

    @param resolver: the C{IHostnameResolver} names are resolved with; the
        reactor's by default.
    @param purpose: what the connections are for, as the log says
        (webhooks are posted through such a client too).
    """
    factory = PolicedEndpointFactory(reactor, policy, resolver, purpose)
    return HTTPClient(Agent.usingEndpointFactory(reactor, factory, pool))
