"""
Writing an answer straight to a TCP socket: the one place this package reads
Twisted's private API.

Why it exists: C{twisted.internet.abstract.FileDescriptor.write} only
queues.  The connection is registered for writing, the next reactor
iteration sends, and the connection is registered off again.  For an answer
that fits the socket's buffer, as nearly all do, that is two C{epoll_ctl}
calls and a pass through the reactor's dispatch for nothing: measured at a
twentieth of a single submission's time (docs/benchmarks.md, "Answers go
straight to the socket").  No public Twisted API sends now; so this reads
C{tcp.Server}'s write buffer (C{dataBuffer}, C{offset}, C{_tempDataLen},
C{_writeDisconnected}, C{_aborting}) to tell whether anything is queued.

It is used only when L{dispatcher.http.HTTPFactory} is made with
C{write_through=True} (the daemon does); otherwise answers go through
C{transport.write} alone.  C{tests/test_http.py} fails when C{tcp.Server}
changes the shape read here.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp


def send(transport: Any, data: bytes) -> None:
    """
    Write C{data} to C{transport}: straight to the socket when the
    transport is a plain TCP connection with nothing queued before it, else
    (TLS, another kind of transport, or bytes still waiting) through
    C{transport.write}.  What the socket does not take at once goes
    through C{transport.write}, after what was sent: the order holds.  What
    an aborted connection is sent must stay unsent, hence C{_aborting}.
    """
    if (
        type(transport) is not tcp.Server
        or transport.TLS
        or not transport.connected
        or transport.disconnecting
        or transport._aborting
        or transport._writeDisconnected
        or transport._tempDataLen
        or len(transport.dataBuffer) > transport.offset
    ):
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
