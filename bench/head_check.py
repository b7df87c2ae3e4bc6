"""
In-process cost of authentication: microseconds of one core per
keep-alive C{POST /v1/jobs} through C{dispatcher.http} and the API's head
check (L{dispatcher.api._auth.Gate}), with authentication (a bearer token
sent and checked: the credentials file's C{stat}, the token, the role)
and with C{[api] authentication = off} (no token sent; the C{Host} check
and the route's lookup still run), and with no head check at all.

    python bench/head_check.py [--requests N] [--rounds R]

The measure of bench/http_parse.py (one connection over a transport that
drops what is written, the same request fed as one read and answered at
once with a 201), with a real credentials file in a directory as deep as
the benchmark daemon's.  The contenders take turns, round after round,
and each keeps its best round, in CPU time (C{time.process_time}): the
least disturbed by the other processes of the machine.  The end-to-end
figures, a daemon's submits and no-op jobs with authentication and
without, are bench/run.py's (j).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from typing import Any, Callable, Optional

if not __package__:  # run as a file: make the sources importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet.task import Clock

from bench.http_parse import BODY, NullTransport, _check, answer
from dispatcher.api._auth import Gate
from dispatcher.api._hosts import HostPolicy
from dispatcher.api._routes import Router
from dispatcher.http._protocol import HTTPFactory
from dispatcher.store._credentials import ADMIN_TOKEN_NAME, CredentialFile, make_admin_token
from dispatcher.wire._submission import ApiError


def request(token: Optional[bytes]) -> bytes:
    """
    The request: a submission, with C{Authorization: Bearer <token>}
    when given one.
    """
    auth = b"Authorization: Bearer " + token + b"\r\n" if token else b""
    return (
        b"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n" + auth
        + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
    )


def channel(gate: Optional[Gate]) -> Callable[[bytes], None]:
    """
    A connection of an L{HTTPFactory} whose head check is C{gate}'s, as
    the API makes it (or none); returns its C{dataReceived}.
    """

    def head_check(ch: Any, method: bytes, uri: bytes, headers: Any) -> Any:
        try:
            return gate.check(method, uri.partition(b"?")[0], headers, None, "-")
        except ApiError as e:
            return e

    factory = HTTPFactory(answer, 1048576, Clock(), idle_timeout=60.0,
                          head_check=head_check if gate is not None else None)
    protocol = factory.buildProtocol(None)
    transport = NullTransport()
    protocol.makeConnection(transport)
    return lambda data: (protocol.dataReceived(data), _check(transport))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=20)
    options = parser.parse_args()

    data_dir = os.path.join(tempfile.mkdtemp(prefix="dispatcher-bench-"), "submit", "var")
    os.makedirs(data_dir)
    credentials = CredentialFile(data_dir)
    make_admin_token(data_dir, credentials)
    with open(os.path.join(data_dir, ADMIN_TOKEN_NAME), "rb") as f:
        token = f.read().strip()
    hosts = HostPolicy()
    hosts.listening_on("127.0.0.1", 8080)
    contenders = {
        "no head check": (channel(None), request(None)),
        "authentication off": (channel(Gate(credentials, hosts, Router(), Clock(),
                                            required=False)), request(None)),
        "authentication on": (channel(Gate(credentials, hosts, Router(), Clock())),
                              request(token)),
    }
    best = {name: float("inf") for name in contenders}
    for feed, data in contenders.values():
        for _ in range(2000):  # warm up
            feed(data)
    for _ in range(options.rounds):
        for name, (feed, data) in contenders.items():
            gc.collect()
            started = time.process_time()
            for _ in range(options.requests):
                feed(data)
            best[name] = min(best[name], (time.process_time() - started)
                             / options.requests * 1e6)
    for name, figure in best.items():
        print(f"{figure:6.2f} us/request  {name}")
    print(f"{best['authentication on'] - best['authentication off']:6.2f} us/request  "
          "authentication on, more than off")


if __name__ == "__main__":
    main()
