"""
Which addresses a job's inputs may be fetched from.

A job names its inputs' URLs, and whoever may submit a job would otherwise
make this host fetch from wherever this host can reach: its own loopback
services (the dispatcher's API among them), the cloud's metadata service
and its credentials, the private network behind it.  So the addresses in
L{REFUSED_NETWORKS} and L{METADATA_ADDRESSES} are refused unless C{[fetch]
allow} names them.

The policy judges the addresses a connection is about to be made to, after
name resolution (L{dispatcher.execution._http_client}), so every spelling
of an address (C{2130706433}, C{0177.0.0.1}, C{[::ffff:127.0.0.1]}), a
name that resolves to a refused address (C{localhost}, DNS rebinding) and
every redirect hop meet the same check.  An IPv6 address that carries an
IPv4 one (IPv4-mapped, IPv4-compatible, SIIT, NAT64 and 6to4 forms) is
judged as that IPv4 address alone: an IPv6 allow entry holding the form
does not let it through.
"""

from __future__ import annotations

import ipaddress
from typing import Iterable, Optional, Sequence, Union

import attrs

Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


def _table(rows: Iterable[tuple[str, str]]) -> tuple[tuple[Network, str], ...]:
    return tuple((ipaddress.ip_network(net), what) for net, what in rows)


# The networks inputs are not fetched from unless [fetch] allow names
# them, each with what it is; the first that holds an address names why
# it was refused, so narrower networks come before those that hold them.
# docs/security.md lists this table (a test checks it does).
REFUSED_NETWORKS: tuple[tuple[Network, str], ...] = _table(
    [
        ("0.0.0.0/8", "unspecified, 'this network': 0.0.0.0 reaches this host"),
        ("10.0.0.0/8", "private, RFC 1918"),
        ("100.64.0.0/10", "shared address space, carrier-grade NAT, RFC 6598"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("172.16.0.0/12", "private, RFC 1918"),
        ("192.0.0.0/24", "IETF protocol assignments"),
        ("192.0.2.0/24", "documentation, TEST-NET-1"),
        ("192.88.99.0/24", "reserved, formerly 6to4 relay anycast"),
        ("192.168.0.0/16", "private, RFC 1918"),
        ("198.18.0.0/15", "benchmarking, RFC 2544"),
        ("198.51.100.0/24", "documentation, TEST-NET-2"),
        ("203.0.113.0/24", "documentation, TEST-NET-3"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved, broadcast included"),
        ("::/128", "unspecified: :: reaches this host"),
        ("::1/128", "loopback"),
        ("64:ff9b:1::/48", "local-use NAT64, RFC 8215"),
        ("100::/64", "discard-only, RFC 6666"),
        ("2001::/23", "IETF protocol assignments, Teredo included"),
        ("2001:db8::/32", "documentation"),
        ("3fff::/20", "documentation"),
        ("fc00::/7", "unique local, private"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "site-local, deprecated"),
        ("ff00::/8", "multicast"),
        # Everything outside the global unicast space 2000::/3 that is not
        # above, and not an IPv4-carrying form judged by its IPv4 address.
        ("::/3", "reserved: outside global unicast 2000::/3"),
        ("4000::/2", "reserved: outside global unicast 2000::/3"),
        ("8000::/1", "reserved: outside global unicast 2000::/3"),
    ]
)

# Cloud metadata services hand out the host's credentials to whoever asks.
# They stay refused inside an allowed network (allow = 169.254.0.0/16 does
# not open 169.254.169.254); an allow entry naming one alone
# (169.254.169.254/32) does.  168.63.129.16 is a public address.
METADATA_ADDRESSES: tuple[tuple[Address, str], ...] = tuple(
    (ipaddress.ip_address(a), what)
    for a, what in [
        ("169.254.169.254", "cloud metadata service (AWS, Google Cloud, Azure, OpenStack and others)"),
        ("169.254.170.2", "AWS ECS task metadata service"),
        ("fd00:ec2::254", "AWS metadata service over IPv6"),
        ("100.100.100.200", "Alibaba Cloud metadata service"),
        ("168.63.129.16", "Azure WireServer"),
    ]
)

# IPv6 forms that carry an IPv4 address, judged as that address.
_MAPPED = ipaddress.ip_network("::ffff:0:0/96")
_COMPATIBLE = ipaddress.ip_network("::/96")
_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_SIX_TO_FOUR = ipaddress.ip_network("2002::/16")


def parse_address(text: str) -> Address:
    """
    The address of C{text} as a resolver gives it (IPv6 possibly with a
    C{%scope}).

    @raise ValueError: C{text} is not an IP address.
    """
    return ipaddress.ip_address(text.partition("%")[0])


def embedded_ipv4(address: Address) -> Optional[ipaddress.IPv4Address]:
    """
    The IPv4 address an IPv6 address carries, and connects to, in its
    IPv4-mapped (C{::ffff:a.b.c.d}), IPv4-compatible (C{::a.b.c.d}), SIIT
    (C{::ffff:0:a.b.c.d}), NAT64 (C{64:ff9b::a.b.c.d}) or 6to4
    (C{2002:AABB:CCDD::}) form; C{None} for any other address.
    """
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    if address in _SIX_TO_FOUR:
        return address.sixtofour
    low = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address in _MAPPED or address in _TRANSLATED or address in _NAT64:
        return low
    # :: and ::1 are themselves, not IPv4-compatible forms.
    if address in _COMPATIBLE and int(address) > 1:
        return low
    return None


@attrs.frozen
class Refusal:
    """
    Why an address is refused: what it is, and the network (of the
    refused table) or metadata address that says so.

    @ivar address: the address refused, as it was given.
    @ivar judged: the address judged (the IPv4 one an IPv6 form carries,
        or C{address}).
    @ivar what: what the address is, in words (C{"loopback"}).
    @ivar network: the refused network, or the metadata address alone.
    @ivar metadata: whether it is a metadata service, which an allowed
        network does not open.
    """

    address: Address
    judged: Address
    what: str
    network: Network
    metadata: bool

    def describe(self) -> str:
        """
        The address and why it is refused, in words: C{"127.0.0.1 is in
        127.0.0.0/8 (loopback)"}.
        """
        if self.judged != self.address:
            subject = f"{self.address} carries {self.judged}, which"
        else:
            subject = f"{self.address}"
        if self.metadata:
            return f"{subject} is the {self.what}"
        return f"{subject} is in {self.network} ({self.what})"

    def allow_entry(self) -> str:
        """
        The narrowest C{[fetch] allow} entry that lets the address through.
        """
        return f"{self.judged}/{self.judged.max_prefixlen}"


@attrs.frozen
class FetchPolicy:
    """
    The addresses inputs may be fetched from: all but those of
    L{REFUSED_NETWORKS} and L{METADATA_ADDRESSES}, and of those the ones
    C{allow} names.

    @ivar allow: the networks of C{[fetch] allow}.  An address they hold is
        fetched from although a refused network holds it too; a metadata
        address only when an entry names it alone.
    """

    allow: Sequence[Network] = ()

    def refusal(self, address: Address) -> Optional[Refusal]:
        """
        Why inputs may not be fetched from C{address}, or C{None} when
        they may.  An IPv6 form that carries an IPv4 address is judged as
        that address alone, by the IPv4 allow entries and refusals: it is
        where a connection to it goes.
        """
        carried = embedded_ipv4(address)
        # A form that carries an IPv4 address connects to that address, so
        # it meets the IPv4 rules alone: an IPv6 allow entry that holds the
        # form (::/0, 2002::/16, 64:ff9b::/96, ::ffff:0:0/96) says nothing
        # of where the connection goes, and must not open 127.0.0.1.
        judged: Address = address if carried is None else carried
        for metadata, what in METADATA_ADDRESSES:
            if judged == metadata and not any(
                net.num_addresses == 1 and net.network_address == judged
                for net in self.allow
            ):
                network = ipaddress.ip_network(judged)
                return Refusal(address, judged, what, network, True)
        if any(judged in net for net in self.allow):
            return None
        for network, what in REFUSED_NETWORKS:
            if judged in network:
                return Refusal(address, judged, what, network, False)
        return None
