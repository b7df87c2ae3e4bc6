"""
A TCP proxy for the chaos suite, on asyncio in a thread of its own: the
workers talk to the dispatcher through it, and the suite switches it
between passing bytes on, dropping them (a black hole: connections stay
open and everything sent into them vanishes), delaying them, and resetting
every connection (RST at once, for those open and those that arrive).
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from typing import Optional

PASS = "pass"
BLACKHOLE = "blackhole"
DELAY = "delay"
RESET = "reset"


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close a connection with an RST rather than a FIN: SO_LINGER of 0."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


class Proxy:
    """
    Forwards 127.0.0.1:C{port} to 127.0.0.1:C{target_port}, in the mode
    last set with L{set_mode}.

    @ivar port: the port it listens on (known once L{start} returns).
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port: Optional[int] = None
        self.mode = PASS
        self.delay = 0.0
        self.dropped_bytes = 0
        self.resets = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="chaos-proxy")
        self._server: Optional[asyncio.AbstractServer] = None
        self._connections: set[asyncio.StreamWriter] = set()

    def start(self) -> None:
        """Listen, on the proxy's own thread."""
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)

    def retarget(self, target_port: int) -> None:
        """Send new connections to another port (a restarted daemon's)."""
        self.target_port = target_port

    def set_mode(self, mode: str, delay: float = 0.0) -> None:
        """
        Switch mode.  Entering L{RESET} resets every open connection at
        once; leaving L{BLACKHOLE} leaves its connections open with what was
        sent into them gone, as a middlebox that ate them would.
        """
        def switch() -> None:
            self.mode, self.delay = mode, delay
            if mode == RESET:
                for writer in list(self._connections):
                    self.resets += 1
                    _reset(writer)
                self._connections.clear()
        self._loop.call_soon_threadsafe(switch)

    def stop(self) -> None:
        """Close everything and end the thread."""
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for writer in list(self._connections):
                writer.transport.abort()
        try:
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(5)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        if self.mode == RESET:
            self.resets += 1
            _reset(writer)
            return
        self._connections.add(writer)
        try:
            if self.mode == BLACKHOLE:
                # Nothing reaches the dispatcher: no connection to it either.
                while self.mode == BLACKHOLE:
                    data = await reader.read(65536)
                    if not data:
                        return
                    self.dropped_bytes += len(data)
                if self.mode == RESET:
                    return
            try:
                up_reader, up_writer = await asyncio.open_connection(
                    "127.0.0.1", self.target_port)
            except OSError:
                _reset(writer)
                return
            self._connections.add(up_writer)
            try:
                await asyncio.gather(self._pump(reader, up_writer),
                                     self._pump(up_reader, writer))
            finally:
                self._connections.discard(up_writer)
                up_writer.transport.abort()
        except (ConnectionError, OSError):
            pass
        finally:
            self._connections.discard(writer)
            writer.transport.abort()

    async def _pump(self, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        """
        Copy one direction.  A delayed chunk is queued with the time it is
        due, so delay adds latency without capping throughput, and bytes
        stay in order.
        """
        queue: asyncio.Queue = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                if data is None:
                    writer.write_eof() if writer.can_write_eof() else None
                    return
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()

        sender = asyncio.ensure_future(deliver())
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    queue.put_nowait((time.monotonic(), None))
                    break
                if self.mode == BLACKHOLE:
                    self.dropped_bytes += len(data)
                    continue
                if self.mode == RESET:
                    return
                delay = self.delay if self.mode == DELAY else 0.0
                queue.put_nowait((time.monotonic() + delay, data))
            await sender
        finally:
            if not sender.done():
                sender.cancel()
