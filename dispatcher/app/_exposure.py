"""
Whether the API would be open to other machines without the tokens that
make that safe, told from the address it binds or, before anything
listens, from its endpoint description.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Optional


class OpenToTheNetwork(Exception):
    """
    The API would listen beyond loopback with authentication off.
    """


def check_exposure(host: Optional[str], config: Any) -> None:
    """
    Refuse to serve on an address other machines reach with C{[api]
    authentication = off}: so, this API runs any command for anyone.

    @param host: the address listened on (C{""}: every interface), or
        L{None} when not known.
    @param config: the L{dispatcher.config.Config}.
    @raise OpenToTheNetwork: C{host} is neither unknown nor loopback, and
        authentication is off.
    """
    if host is None or _is_loopback(host) or config.api.authentication:
        return
    where = host or "every interface"
    raise OpenToTheNetwork(
        f"the API would listen on {where}, which other machines can reach, "
        "with [api] authentication = off: it would run commands for whoever "
        "calls it; set authentication = required (the default), or listen on "
        "127.0.0.1"
    )


def planned_interface(description: str) -> Optional[str]:
    """
    The interface a server endpoint description would listen on, found
    before anything listens: C{""} for every interface, an IP address, or
    L{None} when it cannot be told (a host name, a UNIX socket, a
    descriptor handed over by systemd, an endpoint plugin that binds in its
    own way).

    The endpoint is built on a L{MemoryReactor} and asked to listen there;
    the reactor's record of the C{listenTCP} or C{listenSSL} call (public
    C{IReactorTCP}/C{IReactorSSL} arguments) names the interface.  An
    endpoint object keeps it only in a private attribute.

    @raise Exception: what C{serverFromString} raises for a description
        it cannot parse.
    """
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.protocol import Factory
    from twisted.internet.testing import MemoryReactor

    dry = MemoryReactor()
    # A description that does not parse raises here.
    endpoint = serverFromString(dry, description)
    try:
        listening = endpoint.listen(Factory())
    except Exception:
        return None
    listening.addErrback(lambda failure: None)
    interfaces = [interface for _port, _factory, _backlog, interface in dry.tcpServers]
    interfaces += [interface for _port, _factory, _context, _backlog, interface in dry.sslServers]
    for interface in interfaces:
        if interface == "" or _is_ip(interface):
            return interface
    return None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False
