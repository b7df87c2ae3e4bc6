"""
The file descriptors the daemon may use, and the client connections they
leave room for.

One client holding 20,000 connections used to take every descriptor (the
limit there was 20,000): the daemon then could neither accept another
client nor open a file.  The connection limits (C{[server]
max_connections}, C{max_connections_per_address}) keep descriptors for the
rest; by default they are derived from the open-file limit.

At start the daemon raises its soft open-file limit to the hard one, as Go
programs, the JVM and systemd's own guidance do: the soft limit of 1024 is
there for programs that use C{select()}, which the reactor (epoll) does
not.  Its jobs still get the soft limit it started with (the spawner helper
is set back to it), since some of them may use C{select()} or walk every
descriptor up to the limit.
"""

from __future__ import annotations

import resource
from typing import Optional

import attrs

# Descriptors kept for everything that is not a client connection: the
# store (the database, its WAL and shared memory, for the writer and each
# reader thread), the access log and the daemon's log, the data
# directory's lock, the listening socket, the reactor's own (epoll, waker),
# the spawner helper's pipes, the fetch client's connections, and the
# connections refused over a limit whose 503 is still going out (at most
# dispatcher.http._protocol.MAX_REFUSING, 64).
RESERVED_DESCRIPTORS = 256
# And for each executor slot: a running task's files, an input being
# staged (its file and its connection).
DESCRIPTORS_PER_SLOT = 16
# The most connections a derived limit allows, however many descriptors
# there are: an idle connection costs about 4 KiB of the daemon's memory
# (measured), so 65,536 of them 256 MiB.
MAX_DERIVED_CONNECTIONS = 65536
# By default one address may hold at most this share of the connections:
# one runaway or hostile client leaves three quarters to the others.
ADDRESS_SHARE = 4
# An open-file limit without bound is read as this many (Linux has none:
# its hard limit is at most fs.nr_open, 1,048,576 by default).
UNBOUNDED_FILES = 1048576


@attrs.frozen
class ConnectionLimits:
    """
    The limits the HTTP server keeps (C{None}: no limit), and what they
    were derived from.

    @ivar total: the most client connections open at once.
    @ivar per_address: the most from one address.
    @ivar descriptors: the open-file limit they were derived from.
    @ivar room: the descriptors left for connections (C{descriptors} less
        the reserve).
    """

    total: int
    per_address: Optional[int]
    descriptors: int
    room: int


def open_file_limit() -> tuple[int, int]:
    """
    This process's soft and hard limits of open files, an unbounded one
    read as L{UNBOUNDED_FILES}.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return (
        UNBOUNDED_FILES if soft == resource.RLIM_INFINITY else soft,
        UNBOUNDED_FILES if hard == resource.RLIM_INFINITY else hard,
    )


def raise_open_file_limit() -> int:
    """
    Raise this process's soft open-file limit to its hard limit (always
    allowed); the soft limit it had, for the processes it starts.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return soft


def connection_limits(
    max_connections: Optional[int],
    max_connections_per_address: Optional[int],
    slots: int,
    descriptors: int,
) -> ConnectionLimits:
    """
    The connection limits of a daemon with C{descriptors} open files and
    C{slots} executor slots.

    @param max_connections: C{[server] max_connections}; C{None}: the
        descriptors left once L{RESERVED_DESCRIPTORS} and
        L{DESCRIPTORS_PER_SLOT} a slot are kept (a quarter of them at
        least), and L{MAX_DERIVED_CONNECTIONS} at most.
    @param max_connections_per_address: C{[server]
        max_connections_per_address}; C{None}: a L{ADDRESS_SHARE}th of the
        total (at least one); C{0}: no limit per address.
    """
    room = max(descriptors // 4, descriptors - RESERVED_DESCRIPTORS - DESCRIPTORS_PER_SLOT * slots)
    total = max_connections
    if total is None:
        total = min(room, MAX_DERIVED_CONNECTIONS)
    per_address = max_connections_per_address
    if per_address is None:
        per_address = max(1, total // ADDRESS_SHARE)
    elif per_address == 0:
        per_address = None
    return ConnectionLimits(total, per_address, descriptors, room)
