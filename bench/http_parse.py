"""
In-process cost of the HTTP framing: microseconds of one core per
keep-alive POST and its 201 answer, for dispatcher.http's protocol (llhttp
through httptools) and, in the same run, for the hand-written parser it
replaced (read from git at C{--against}) and for stock twisted.web.

    python bench/http_parse.py [--requests N] [--rounds R] [--against REV]

Each protocol gets one connection over a transport that drops what is
written, and the same request, fed as one read, answered at once by a
handler that reads the body and writes a small JSON 201 with its length
(what a submission's answer looks like).  The figure is the best of
C{--rounds} rounds of C{--requests} requests, in CPU time
(C{time.process_time}): the least disturbed by the other processes of the
machine.  docs/http-parser.md holds the method and the last figures.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

if not __package__:  # run as a file: make the sources importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock

# The last commit with the hand-written parser.
HAND_WRITTEN = "b461398"

BODY = b'{"command": ["true"], "queue": "default", "name": "bench"}'
REQUEST = (
    b"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: bench\r\n"
    b"Accept: */*\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
    % (len(BODY), BODY)
)
ANSWER = b'{"id":"0190b7a6-8f3e-7c2a-9d1e-5b4f3a2c1d0e","state":"queued"}'


class NullTransport:
    """
    A connection's transport that takes what is written and drops it.
    """

    disconnecting = False
    connected = True
    TLS = False

    def __init__(self) -> None:
        self.written = 0
        self.producer: Any = None

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def writeSequence(self, data: list) -> None:
        for part in data:
            self.written += len(part)

    def getPeer(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 40000)

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 8080)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass

    def loseConnection(self) -> None:
        self.disconnecting = True

    def abortConnection(self) -> None:
        self.disconnecting = True

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass


def answer(request: Any) -> None:
    """
    What the API does for a submission, less the job: read the body, answer
    201 with a small JSON body and its length.
    """
    request.content.read()
    request.setResponseCode(201)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"content-length", b"%d" % len(ANSWER))
    request.write(ANSWER)
    request.finish()


def dispatcher_channel(module: Any) -> Callable[[bytes], None]:
    """
    A connection of C{module}'s HTTPFactory; returns its C{dataReceived}.
    """
    factory = module.HTTPFactory(answer, 1048576, Clock(), idle_timeout=60.0)
    channel = factory.buildProtocol(None)
    transport = NullTransport()
    channel.makeConnection(transport)
    return lambda data: (channel.dataReceived(data), _check(transport))


def twisted_web_channel() -> Callable[[bytes], None]:
    """
    A connection of a stock twisted.web Site with one leaf resource doing
    what L{answer} does; returns its C{dataReceived}.
    """
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    class Jobs(Resource):
        isLeaf = True

        def render_POST(self, request: Any) -> bytes:
            request.content.read()
            request.setResponseCode(201)
            request.setHeader(b"content-type", b"application/json")
            return ANSWER

    site = Site(Jobs())
    site.logFile = open(os.devnull, "w")  # twisted.web logs every request
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = NullTransport()
    channel.makeConnection(transport)
    return lambda data: (channel.dataReceived(data), _check(transport))


def _check(transport: NullTransport) -> None:
    if transport.disconnecting:
        raise RuntimeError("the server closed the connection: the request was refused")


def hand_written(rev: str) -> Any:
    """
    The HTTP module as it was at C{rev}, imported under its own name.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    source = subprocess.run(
        ["git", "-C", root, "show", f"{rev}:dispatcher/http/_protocol.py"],
        check=True, capture_output=True,
    ).stdout
    path = os.path.join(tempfile.mkdtemp(), "hand_written_http.py")
    with open(path, "wb") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location("hand_written_http", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure(feed: Callable[[bytes], None], requests: int, rounds: int) -> float:
    """
    Microseconds of CPU per request: the best of C{rounds}.
    """
    for _ in range(1000):  # warm up
        feed(REQUEST)
    best = float("inf")
    for _ in range(rounds):
        gc.collect()
        started = time.process_time()
        for _ in range(requests):
            feed(REQUEST)
        best = min(best, (time.process_time() - started) / requests * 1e6)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=50000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--against", default=HAND_WRITTEN,
                        help="the git revision of the hand-written parser")
    parser.add_argument("--no-twisted-web", action="store_true")
    options = parser.parse_args()

    from dispatcher.http import _protocol

    contenders = [
        ("llhttp (httptools), dispatcher.http", lambda: dispatcher_channel(_protocol)),
        (f"hand-written parser ({options.against})",
         lambda: dispatcher_channel(hand_written(options.against))),
    ]
    if not options.no_twisted_web:
        contenders.append(("stock twisted.web Site", twisted_web_channel))
    for name, make in contenders:
        figure = measure(make(), options.requests, options.rounds)
        print(f"{figure:6.1f} us/request  {name}", flush=True)


if __name__ == "__main__":
    main()
