"""
The C{dispatcher} command: C{dispatcher worker ...} runs a remote worker in
the foreground, logging to stderr, as C{twist dispatcher-worker ...} does.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from twisted.python import usage

USAGE = """\
Usage: dispatcher worker --url URL --token-file FILE --slots N [options]

Commands:
  worker   Pull jobs from a dispatcher over HTTP and run them on this host.
           'dispatcher worker --help' lists its options.

The dispatcher itself runs with 'twistd -n dispatcher' (or 'twist dispatcher').
"""


def main(argv: Optional[Sequence[str]] = None) -> None:
    """
    The console script's entry point.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        sys.stdout.write(USAGE)
        raise SystemExit(0 if args else 2)
    command, rest = args[0], args[1:]
    if command != "worker":
        sys.stderr.write(f"dispatcher: unknown command {command!r}\n\n{USAGE}")
        raise SystemExit(2)
    from dispatcher.app.worker_tap import Options

    # The options are checked here first, so that a mistake is one clear
    # line rather than the error above the whole of twist's usage.
    options = Options()
    try:
        options.parseOptions(rest)
    except usage.UsageError as e:
        sys.stderr.write(
            f"dispatcher worker: {e}\nRun 'dispatcher worker --help' for the options.\n"
        )
        raise SystemExit(2)
    from twisted.application.twist._twist import Twist

    Twist.main(
        ["dispatcher", "--log-file", "+", "--log-format", "text", "dispatcher-worker", *rest]
    )
