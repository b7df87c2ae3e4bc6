"""
Log shipping: the worker sends what each attempt's log files hold beyond
what the dispatcher has, a chunk at a time at the offset the dispatcher
has reached, resending from the dispatcher's size when the two disagree.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import attrs
from twisted.internet.defer import Deferred, DeferredLock
from twisted.logger import Logger

from dispatcher.workers._client import (
    DispatcherClient,
    DispatcherError,
    DispatcherRefused,
    LeaseGone,
    LogOffsetMismatch,
)

if TYPE_CHECKING:
    from dispatcher.workers._agent import HeldLease

log = Logger()

# The streams of an attempt, in the order they are shipped.
STREAMS = ("stdout", "stderr")

# The most log bytes one request carries.
LOG_CHUNK_BYTES = 256 * 1024


@attrs.define(eq=False)
class ShippedLog:
    """
    How much of one attempt's log the dispatcher has.

    @ivar offsets: bytes of each stream the dispatcher has.
    @ivar given_up: streams the dispatcher refused (not sent any more).
    @ivar lock: held while a shipment is under way.
    """

    offsets: dict[str, int] = attrs.field(factory=lambda: dict.fromkeys(STREAMS, 0))
    given_up: set[str] = attrs.field(factory=set)
    lock: DeferredLock = attrs.field(factory=DeferredLock)


def read_chunks_blocking(pieces: list[tuple[str, int, int]]) -> list[bytes]:
    """
    For each C{(path, offset, size)}, up to C{size} bytes of the file at
    C{path} from C{offset}; nothing for a file that does not exist (yet).
    Blocks: run it on a thread pool.
    """
    chunks = []
    for path, offset, size in pieces:
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                chunks.append(f.read(size))
        except FileNotFoundError:
            chunks.append(b"")
    return chunks


class LogShipper:
    """
    Sends the logs of the attempts a worker holds.

    @param client: the L{DispatcherClient}.
    @param log_path: C{(job_id, attempt, stream) -> path} of a log file.
    @param read_chunks: C{[(path, offset, size), ...] -> Deferred[[bytes,
        ...]]}: reads pieces of log files off the reactor thread, in one
        trip (L{read_chunks_blocking}).
    @param forget: C{(held, reason, message)}: called when the dispatcher
        says a lease is no longer current.
    """

    def __init__(
        self,
        client: DispatcherClient,
        log_path: Callable[[str, int, str], str],
        read_chunks: Callable[[list[tuple[str, int, int]]], Deferred],
        forget: Callable[[HeldLease, str, str], Any],
    ) -> None:
        self._client = client
        self._log_path = log_path
        self._read_chunks = read_chunks
        self._forget = forget

    async def _read_chunk(self, path: str, offset: int) -> bytes:
        (chunk,) = await self._read_chunks([(path, offset, LOG_CHUNK_BYTES)])
        return chunk

    async def ship(self, held: HeldLease) -> bool:
        """
        Send what the attempt's log files hold beyond what the dispatcher
        has.  Return whether that got through (a lease that is gone counts:
        there is nothing more to send).
        """
        if held.shipped.lock.locked and not held.ended:
            # One shipment at a time; the next heartbeat sends the rest.
            return True
        await held.shipped.lock.acquire()
        try:
            streams, paths = self._streams(held)
            # Every stream's next piece in one trip off the reactor thread:
            # most attempts (every task that did not fail) have no log, and
            # a trip for each stream, at every heartbeat and at every end,
            # was a worker's dearest part of a no-op job.
            firsts = await self._read_chunks(
                [(paths[stream], held.shipped.offsets[stream], LOG_CHUNK_BYTES) for stream in streams]
            )
            return await self._send(held, streams, paths, firsts)
        finally:
            held.shipped.lock.release()

    async def ship_many(self, batch: list[HeldLease]) -> list[bool]:
        """
        L{ship} for each of C{batch}, their logs' next pieces read in one
        trip off the reactor thread for them all: the jobs that ended
        together (or the leases of one heartbeat) cost one trip, not one
        each, which was the largest part of a remote no-op job on its
        worker.  A lease whose shipment is under way waits for it, as with
        L{ship}.
        """
        free = [h for h in batch if not h.shipped.lock.locked]
        shipped: dict[int, bool] = {}
        for held in free:
            # Unlocked: taken at once.
            held.shipped.lock.acquire()
        try:
            plans = [self._streams(held) for held in free]
            pieces = [
                (paths[stream], held.shipped.offsets[stream], LOG_CHUNK_BYTES)
                for held, (streams, paths) in zip(free, plans)
                for stream in streams
            ]
            chunks = await self._read_chunks(pieces) if pieces else []
            at = 0
            for held, (streams, paths) in zip(free, plans):
                firsts = chunks[at : at + len(streams)]
                at += len(streams)
                if any(firsts):
                    shipped[id(held)] = await self._send(held, streams, paths, firsts)
                else:
                    shipped[id(held)] = True
        finally:
            for held in free:
                held.shipped.lock.release()
        for held in batch:
            if id(held) not in shipped:
                shipped[id(held)] = await self.ship(held)
        return [shipped[id(held)] for held in batch]

    def _streams(self, held: HeldLease) -> tuple[list[str], dict[str, str]]:
        """
        The streams of C{held}'s log still shipped, and their files.
        """
        streams = [s for s in STREAMS if s not in held.shipped.given_up]
        paths = {
            stream: self._log_path(held.job_id, held.lease.attempt, stream)
            for stream in streams
        }
        return streams, paths

    async def _send(
        self,
        held: HeldLease,
        streams: list[str],
        paths: dict[str, str],
        firsts: list[bytes],
    ) -> bool:
        """
        Send C{firsts} (each stream's next piece, read already) and what
        follows them; the caller holds C{held}'s shipping lock.
        """
        for stream, chunk in zip(streams, firsts):
            path = paths[stream]
            while chunk and not held.forgotten and stream not in held.shipped.given_up:
                offset = held.shipped.offsets[stream]
                try:
                    await self._client.append_log(
                        held.job_id, held.lease.token, stream, offset, chunk
                    )
                except LogOffsetMismatch as e:
                    if e.size >= offset:
                        log.warn(
                            "job {job_id}: the dispatcher refused {stream} at "
                            "{offset} but has {size} bytes",
                            job_id=held.job_id, stream=stream, offset=offset,
                            size=e.size,
                        )
                        return False
                    held.shipped.offsets[stream] = e.size
                    chunk = await self._read_chunk(path, e.size)
                    continue
                except LeaseGone as e:
                    self._forget(held, "stale_lease", str(e))
                    return True
                except DispatcherRefused as e:
                    # Retrying what the dispatcher refuses would hold the
                    # result up for ever: the rest of this stream is lost.
                    log.error(
                        "job {job_id}: the dispatcher refused its {stream} at "
                        "{offset} ({error}); the rest of it is not sent",
                        job_id=held.job_id, stream=stream, offset=offset, error=e,
                    )
                    held.shipped.given_up.add(stream)
                    break
                except DispatcherError as e:
                    log.info(
                        "job {job_id}: shipping its {stream} failed ({error})",
                        job_id=held.job_id,
                        stream=stream,
                        error=e,
                    )
                    return False
                held.shipped.offsets[stream] = offset + len(chunk)
                if len(chunk) < LOG_CHUNK_BYTES:
                    break
                chunk = await self._read_chunk(path, held.shipped.offsets[stream])
        return True
