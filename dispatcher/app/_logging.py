"""
The daemon's log under C{twistd}: C{[log] format} (text, or JSON lines as
twisted.logger's C{jsonFileLogObserver} writes them) and C{[log] level},
written where twistd's options say (C{--logfile}, C{--nodaemon}, stdout
for C{-}), its level changed by a reload (SIGHUP) while it runs.

twistd makes its log observer after the plugin's options are parsed and
before the service is made, from its C{--logger} option (an observer
factory, named by its dotted name, which twistd imports once the options
are all parsed): L{DaemonLog.install} names L{twistd_observer}, unless the
command line gave its own C{--logger} or C{--syslog}, which then win as
they always do.
"""

from __future__ import annotations

import signal
import sys
from typing import Any, MutableMapping, Optional

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    jsonFileLogObserver,
    textFileLogObserver,
)
from twisted.python import logfile

from dispatcher.config._ini import LogConfig

# twistd's log file when it is given none and does not stay in the
# foreground (as twistd names it).
TWISTD_LOG_FILE = "twistd.log"


class DaemonLog:
    """
    The level and format of the daemon's log, and the observer twistd
    starts it with.

    @ivar format: C{"text"} or C{"json"}.
    @ivar installed: whether twistd logs through L{observer} (C{False}: the
        command line chose its own observer, or this is not twistd, and
        C{[log]} changes nothing but the job lines' bound).
    @ivar reactor: the reactor a SIGUSR1 rotates the log file in (set by
        C{makeService}, before twistd asks for the observer).
    """

    def __init__(self, config: LogConfig) -> None:
        self.reactor: Any = None
        self.format = config.format
        self._predicate = LogLevelFilterPredicate(LogLevel.levelWithName(config.level))
        self.installed = False
        self._twistd: MutableMapping[str, Any] = {}

    @property
    def level(self) -> LogLevel:
        """
        The least level written.
        """
        return self._predicate.logLevelForNamespace("")

    def set_level(self, name: str) -> None:
        """
        Write events of level C{name} (one of L{LOG_LEVELS}) and above from
        now on.
        """
        self._predicate.defaultLogLevel = LogLevel.levelWithName(name)
        # (The predicate keeps each namespace's level, the default's too.)
        self._predicate.clearLogLevels()

    def keeps(self, level: LogLevel) -> bool:
        """
        Whether events of C{level} are written.
        """
        return not self.installed or level >= self.level

    def install(self, twistd_options: Optional[MutableMapping[str, Any]]) -> None:
        """
        Have twistd, whose parsed options (C{ServerOptions}) are
        C{twistd_options}, log through L{observer}; nothing when they are
        not twistd's (C{twist}, a test) or name their own C{--logger} or
        C{--syslog}.
        """
        if twistd_options is None or "logger" not in twistd_options:
            return
        if twistd_options.get("logger") is not None or twistd_options.get("syslog"):
            return
        global _installed
        self._twistd = twistd_options
        twistd_options["logger"] = f"{__name__}.{twistd_observer.__name__}"
        _installed = self
        self.installed = True

    def observer(self) -> ILogObserver:
        """
        The observer twistd logs through (twistd calls it once, as its
        C{--logger} factory): to the file twistd's options name, or to
        stdout with C{--nodaemon} and no C{--logfile} (or C{--logfile=-}),
        in the format and from the level of C{[log]}.
        """
        options = self._twistd
        name = options.get("logfile") or ""
        if name == "-" or (not name and options.get("nodaemon")):
            out: Any = sys.stdout
        else:
            out = logfile.LogFile.fromFullPath(name or TWISTD_LOG_FILE)
            _rotate_on_sigusr1(out, self.reactor)
        if self.format == "json":
            inner = jsonFileLogObserver(out)
        else:
            inner = textFileLogObserver(out)
        return FilteringLogObserver(inner, [self._predicate])


# The one DaemonLog twistd's --logger names (a process runs one twistd).
_installed: Optional[DaemonLog] = None


def twistd_observer() -> ILogObserver:
    """
    twistd's C{--logger} factory: the observer of the L{DaemonLog} that
    L{DaemonLog.install} named it for.
    """
    assert _installed is not None, "DaemonLog.install names this factory"
    return _installed.observer()


def _rotate_on_sigusr1(log_file: Any, reactor: Any) -> None:
    """
    Rotate the log file on SIGUSR1 in C{reactor}'s thread, as twistd does
    with its own (unless something else took the signal).
    """
    if reactor is None or signal.getsignal(signal.SIGUSR1) not in (None, signal.SIG_DFL):
        return

    def rotate(number: int, frame: Any) -> None:
        reactor.callFromThread(log_file.rotate)

    signal.signal(signal.SIGUSR1, rotate)
