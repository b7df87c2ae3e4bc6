"""
The baseline: a minimal stock twisted.web server that does what a submit
does minus the dispatcher (parse the JSON body, answer 201 with a small
JSON body), so the dispatcher's numbers can be read against it.

    python -m bench.baseline_server PORT [--monitor-port N] [--log FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

if not __package__:  # run as a file: make "bench" importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.logger import globalLogBeginner, textFileLogObserver
from twisted.web.resource import Resource
from twisted.web.server import Site


class Jobs(Resource):
    """
    Accepts any POST with a JSON body: 201 and a small JSON answer.
    """

    isLeaf = True

    def __init__(self) -> None:
        Resource.__init__(self)
        self._count = 0

    def render_POST(self, request):
        json.loads(request.content.read())
        self._count += 1
        request.setResponseCode(201)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"id": self._count, "state": "queued"}).encode("utf-8")


class QuietSite(Site):
    """
    A stock site without its access log: the daemon runs the benchmark
    with C{access_log = no}, so the baseline does not log either.
    """

    def log(self, request):
        pass


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("port", type=int)
    parser.add_argument("--monitor-port", type=int, default=None)
    parser.add_argument("--log", default=os.devnull)
    args = parser.parse_args(argv)

    from twisted.internet import reactor

    log_file = open(args.log, "a", encoding="utf-8")
    globalLogBeginner.beginLoggingTo(
        [textFileLogObserver(log_file)], redirectStandardIO=False
    )
    if args.monitor_port is not None:
        from bench.monitor import install_monitor

        install_monitor(reactor, args.monitor_port)
    reactor.listenTCP(args.port, QuietSite(Jobs()), interface="127.0.0.1")
    reactor.run()


if __name__ == "__main__":
    main()
