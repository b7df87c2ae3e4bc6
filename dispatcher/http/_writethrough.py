"""
Writing an answer straight to a TCP socket: the one place this package reads
Twisted's private API.

Why it exists: C{twisted.internet.abstract.FileDescriptor.write} only
queues.  The connection is registered for writing, the next reactor
iteration sends, and the connection is registered off again.  For an answer
that fits the socket's buffer, as nearly all do, that is two C{epoll_ctl}
calls and a pass through the reactor's dispatch for nothing: when this came
in (commit 167b2b5) the reactor thread's time per no-op job went from about
94 to about 88 microseconds (docs/http-parser.md).  No public Twisted API sends now; so this reads
C{tcp.Server}'s write buffer (C{dataBuffer}, C{offset}, C{_tempDataLen},
C{_writeDisconnected}, C{_aborting}) to tell whether anything is queued.

It is used only when L{dispatcher.http._protocol.HTTPFactory} is made with
C{write_through=True} (the daemon does) and L{supported} finds the shape it
reads; otherwise answers go through C{transport.write} alone, so a Twisted
that changed costs speed, never an answer.  C{tests/test_http.py} fails when
C{tcp.Server} changes the shape read here.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp
from twisted.logger import Logger

log = Logger()

# What L{send} reads of a C{tcp.Server} that its class declares (with the
# type there); C{_tempDataLen} is set per instance, so L{send} itself falls
# back to C{transport.write} if it is ever missing.
SHAPE = {
    "dataBuffer": bytes,
    "offset": int,
    "_writeDisconnected": bool,
    "TLS": bool,
    "disconnecting": int,
    "connected": int,
    "_aborting": bool,
}


def supported() -> bool:
    """
    Whether this Twisted's C{tcp.Server} still has the attributes L{send}
    reads, of the types it expects; if not, say so once in the log.
    """
    missing = [
        name for name, kind in SHAPE.items()
        if not isinstance(getattr(tcp.Server, name, None), kind)
    ]
    if missing:
        log.warn(
            "Twisted's tcp.Server has changed ({missing}): answers go through "
            "transport.write only",
            missing=", ".join(missing),
        )
    return not missing


def send(transport: Any, data: bytes) -> None:
    """
    Write C{data} to C{transport}: straight to the socket when the
    transport is a plain TCP connection with nothing queued before it, else
    (TLS, another kind of transport, or bytes still waiting) through
    C{transport.write}.  What the socket does not take at once goes
    through C{transport.write}, after what was sent: the order holds.  What
    an aborted connection is sent must stay unsent, hence C{_aborting}.
    """
    try:
        queued = (
            type(transport) is not tcp.Server
            or transport.TLS
            or not transport.connected
            or transport.disconnecting
            or transport._aborting
            or transport._writeDisconnected
            or transport._tempDataLen
            or len(transport.dataBuffer) > transport.offset
        )
    except AttributeError:
        queued = True
    if queued:
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


def write(transport: Any, data: bytes) -> None:
    """
    Write C{data} through C{transport.write}: the public API only.
    """
    transport.write(data)
