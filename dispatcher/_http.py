"""
The HTTP server's request and site: a request body limit that holds for
declared lengths and chunked bodies alike (Twisted itself sets none), and a
buffered access log.
"""

from __future__ import annotations

import io
import json
from typing import Any, Optional

from twisted.internet.task import LoopingCall
from twisted.web.server import Request, Site


def _raw_response(status: int, reason: str, code: str, message: str) -> bytes:
    body = json.dumps(
        {"error": {"code": code, "message": message, "field": None}}
    ).encode("utf-8")
    return (
        f"HTTP/1.1 {status} {reason}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode("ascii") + body


class BoundedRequest(Request):
    """
    A request that refuses a body larger than its site's C{max_body_bytes}:
    at once when the declared length is too large, or as soon as a chunked
    body grows past it.  The answer is a 413 JSON error, after which the
    connection closes; nothing of the request reaches a resource.
    """

    _refused = False
    _received = 0

    def _limit(self) -> Optional[int]:
        site = getattr(self.channel, "site", None)
        return getattr(site, "max_body_bytes", None)

    def gotLength(self, length: Optional[int]) -> None:
        limit = self._limit()
        if limit is not None and length is not None and length > limit:
            self._refuse(limit)
        # Bodies are bounded, so memory holds them; Twisted would otherwise
        # spool large or chunked ones to a temporary file, on the reactor.
        self.content = io.BytesIO()

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        limit = self._limit()
        if limit is not None and self._received > limit:
            self._refuse(limit)
            self.content = io.BytesIO()
            return
        self.content.write(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            return
        Request.requestReceived(self, command, path, version)

    def _refuse(self, limit: int) -> None:
        self._refused = True
        transport = self.channel.transport
        transport.write(
            _raw_response(
                413,
                "Request Entity Too Large",
                "body_too_large",
                f"the request body is larger than {limit} bytes "
                "([server] max_body_bytes)",
            )
        )
        transport.loseConnection()


class DispatcherSite(Site):
    """
    The site of the API: bounded request bodies, and an access log, one
    line per request in the Combined Log Format, in the file
    C{access_log_path} (or none).

    The log is written through a 64 KiB buffer that is flushed every
    C{flush_interval} seconds and when the site stops: a line is at most
    that late, and a request costs no write of its own.  (Twisted's own
    access log writes each line as it comes, through the daemon's log.)
    """

    requestFactory = BoundedRequest
    buffer_size = 65536

    def __init__(
        self,
        resource: Any,
        max_body_bytes: int,
        access_log_path: Optional[str] = None,
        flush_interval: float = 1.0,
        **kw: Any,
    ) -> None:
        # The API takes JSON only.  Form parsing would make Twisted build an
        # email.message.EmailMessage to read every POST's Content-Type
        # header, about a quarter of a small submission's time.
        kw.setdefault("parsePOSTFormSubmission", False)
        Site.__init__(self, resource, **kw)
        self.max_body_bytes = max_body_bytes
        self.access_log_path = access_log_path
        self._flush_interval = flush_interval
        self._flusher: Optional[LoopingCall] = None

    def startFactory(self) -> None:
        Site.startFactory(self)
        if self.access_log_path is None:
            self._logFile = None
            return
        self._logFile = open(
            self.access_log_path, "a", buffering=self.buffer_size, encoding="utf-8",
            newline="\n",
        )
        self._flusher = LoopingCall(self._logFile.flush)
        self._flusher.clock = self.reactor
        self._flusher.start(self._flush_interval, now=False)

    def stopFactory(self) -> None:
        if self._flusher is not None and self._flusher.running:
            self._flusher.stop()
        self._flusher = None
        # Closes (and so flushes) the log file.
        Site.stopFactory(self)
