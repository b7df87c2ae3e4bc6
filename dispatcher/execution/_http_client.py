"""
The HTTP client a host fetches inputs with (and a remote worker talks to
its dispatcher with): treq over an L{Agent} whose new connections are not
logged.
"""

from __future__ import annotations

from typing import Any

from treq.client import HTTPClient
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.error import SchemeNotSupported
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer


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
        endpoint: Any = HostnameEndpoint(self._reactor, host, uri.port)
        if uri.scheme == b"https":
            endpoint = wrapClientTLS(
                self._tls_policy.creatorForNetloc(uri.host, uri.port), endpoint
            )
        elif uri.scheme != b"http":
            raise SchemeNotSupported(f"unsupported scheme: {uri.scheme!r}")
        return _QuietEndpoint(endpoint)


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
