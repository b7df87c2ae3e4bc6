"""
The C{dispatcher} command: C{dispatcher worker ...} runs a remote worker in
the foreground, logging text to stderr, as C{twistd -n dispatcher-worker}
does with its own log options.
"""

from __future__ import annotations

import sys
from typing import Any, Optional, Sequence

from twisted.internet.defer import Deferred
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

    # The options are checked before any reactor or log starts, so that a
    # mistake is one clear line.
    options = Options()
    try:
        options.parseOptions(rest)
    except usage.UsageError as e:
        sys.stderr.write(
            f"dispatcher worker: {e}\nRun 'dispatcher worker --help' for the options.\n"
        )
        raise SystemExit(2)
    run_worker(options)


def run_worker(options: Any) -> None:
    """
    Run the worker that C{options} (parsed L{dispatcher.app.worker_tap.Options})
    describe until the reactor stops (SIGTERM or SIGINT), then exit.

    What C{twist} does with a plugin, with public Twisted alone: log text at
    level info and above to stderr, start the service, and stop it (waiting
    for its Deferred) before the reactor shuts down.
    """
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    from twisted.internet.task import react

    from dispatcher.app.worker_tap import makeService

    globalLogBeginner.beginLoggingTo(
        [
            FilteringLogObserver(
                textFileLogObserver(sys.stderr),
                [LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)],
            )
        ]
    )

    def start(reactor: Any) -> Deferred:
        service = makeService(options, reactor)
        service.startService()
        reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
        # Never fires: the worker runs until a signal stops the reactor.
        return Deferred()

    react(start)
