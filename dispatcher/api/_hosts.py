"""
Which C{Host} and C{Origin} headers the API answers, against DNS
rebinding and cross-site requests (issue 15).

A page on C{attacker.example} whose name is made to resolve to this host
reaches the API with C{Host: attacker.example}; a form on another site
posts with that site's C{Origin}.  Neither can put a name the dispatcher
answers to in those headers, so the API refuses a request whose C{Host}
is not one of them (C{400 invalid_host}) and one whose C{Origin} is not
(C{403 forbidden_origin}); clients that are not browsers send no
C{Origin}.  The names: the loopback names at any port, the address the
daemon listens on (any IP address with any port when it listens on every
interface: a rebinding page can only send a name), and C{[server]
allowed_hosts}.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Optional

from dispatcher.wire._submission import ApiError

# Always answered to, at any port: only the user's own browser, at a page
# of this host, sends them (and then the Origin check applies).
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


def _split(hostport: bytes) -> tuple[bytes, Optional[bytes]]:
    """
    A lower-cased C{host[:port]} as its host (an IPv6 address keeps its
    brackets) and its port, or C{None} without one.
    """
    hostport = hostport.lower()
    if hostport.startswith(b"["):
        host, bracket, rest = hostport.partition(b"]")
        if not bracket:
            return hostport, None
        return host + b"]", rest[1:] if rest.startswith(b":") else None
    host, colon, port = hostport.rpartition(b":")
    if not colon:
        return hostport, None
    return host, port


def _is_ip(host: bytes) -> bool:
    try:
        ipaddress.ip_address(host.strip(b"[]").decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return False
    return True


class HostPolicy:
    """
    The C{Host} and C{Origin} headers the API answers.

    Its per-request cost is a set lookup for the usual C{Host} (the names
    at the port the daemon listens on) and a dictionary lookup for the
    absent C{Origin} of a client that is not a browser.

    @param allowed_hosts: C{[server] allowed_hosts}: names with or without
        a port (any port), or C{("*",)} for any C{Host}; C{None}: none
        besides the loopback names and the listen address.
    """

    def __init__(self, allowed_hosts: Optional[tuple[str, ...]] = None) -> None:
        configured = tuple(allowed_hosts or ())
        self._any_host = configured == ("*",)
        self._any_ip = False
        # Names at any port.
        self._names: set[bytes] = {n.encode("ascii") for n in LOOPBACK_NAMES}
        # host:port exactly, and every name of _names alone: what a Host
        # header usually is, so that it is found in one lookup.
        self._exact: set[bytes] = set(self._names)
        for entry in configured:
            if entry == "*":
                continue
            raw = entry.encode("ascii")
            host, port = _split(raw)
            if port is None:
                self._names.add(host)
            self._exact.add(raw)

    def listening_on(self, host: Optional[str], port: Optional[int]) -> None:
        """
        Answer to the address the daemon did bind: C{host} (C{""}, C{"0.0.0.0"}
        or C{"::"}: every interface, so any IP address at any port) and
        C{port}; C{None} for a listener without one (a UNIX socket).
        """
        if port is None:
            return
        if host is None:
            return
        if host in ("", "0.0.0.0", "::"):
            self._any_ip = True
        else:
            name = f"[{host}]" if ":" in host else host
            self._exact.add(f"{name}:{port}".encode("ascii"))
        for name in self._names:
            self._exact.add(name + b":%d" % port)

    @property
    def any_host(self) -> bool:
        """
        Whether every C{Host} is answered (C{allowed_hosts = *}).
        """
        return self._any_host

    def _allows(self, hostport: bytes, any_ip: bool) -> bool:
        if hostport in self._exact:
            return True
        host, port = _split(hostport)
        if port is not None and not (port.isdigit() and 0 < len(port) <= 5):
            return False
        if host in self._names or hostport.lower() in self._exact:
            return True
        return any_ip and _is_ip(host)

    def check(self, request: Any) -> None:
        """
        Refuse a request whose C{Host} is not answered (C{400 invalid_host})
        or whose C{Origin} is not allowed (C{403 forbidden_origin}).  A
        request without C{Host} (HTTP/1.0; HTTP/1.1 requires it) comes from
        no browser and passes.
        """
        self.check_headers(request.requestHeaders)

    def check_headers(self, headers: Any) -> None:
        """
        L{check} on a request's headers (lowercase names to values).
        """
        host = headers.get(b"host")
        if host is not None and not self._any_host and not self._allows(host, self._any_ip):
            text = host.decode("ascii", "replace")
            raise ApiError(
                400,
                "invalid_host",
                f"Host: {text!r} is not a name this dispatcher answers to; if it is "
                "one of its names, add it to [server] allowed_hosts",
                "Host",
            )
        origin = headers.get(b"origin")
        if origin is not None:
            self._check_origin(origin, host)

    def _check_origin(self, origin: bytes, host: Optional[bytes]) -> None:
        scheme, sep, hostport = origin.partition(b"://")
        if sep and scheme.lower() in (b"http", b"https") and hostport and (
            (host is not None and hostport.lower() == host.lower())
            or self._allows(hostport, False)
        ):
            return
        text = origin.decode("ascii", "replace")
        raise ApiError(
            403,
            "forbidden_origin",
            f"Origin: {text!r} is not allowed: a page of another site may not "
            "call this API; its host must be one of [server] allowed_hosts",
            "Origin",
        )
