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

Its text lines are twisted.logger's classic ones (C{textFileLogObserver}),
made by L{text_observer} for less: a submission of one job writes one
line, and the stock formatter took a good part of a no-op job's CPU.
"""

from __future__ import annotations

import signal
import sys
from typing import Any, MutableMapping, Optional

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEventAsClassicLogText,
    formatTime,
    jsonFileLogObserver,
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
            inner = text_observer(out)
        return FilteringLogObserver(inner, [self._predicate])


def text_observer(out: Any) -> ILogObserver:
    """
    An observer that writes to C{out} the lines C{textFileLogObserver(out)}
    writes (C{formatEventAsClassicLogText}, times as C{formatTime} gives
    them), for a third of the CPU: the time's text is made once a second
    (it shows whole seconds), and a plain message (named fields, no call
    in its format, no traceback) is formatted by C{str.format_map}, which
    gives what twisted.logger's formatter gives for those; every other
    event goes through twisted.logger's own formatter.  (A no-op job's two
    job lines took 119, 139 and 114 us of CPU with the stock observer, 39,
    45 and 32 with this one: C{bench/job_lines.py text|daemon none}, three
    alternating runs.  The benchmark's daemon, which logs each no-op job's
    submission too: 920 against 828 us of CPU a no-op job, medians of 6
    alternating rounds of bench/cpu_ab.py on a shared machine.)
    tests/test_daemon_log.py checks that the two write the same.
    """
    second: list[Any] = [None, "-"]

    def time_text(when: Optional[float]) -> str:
        if when is None:
            return formatTime(when)
        whole = int(when // 1)
        if whole != second[0]:
            second[0], second[1] = whole, formatTime(float(whole))
        return second[1]

    def line(event: Any) -> Optional[str]:
        text = event.get("log_format")
        if (
            type(text) is not str
            or "()" in text
            or "log_failure" in event
            or "log_flattened" in event
        ):
            return formatEventAsClassicLogText(event, formatTime=time_text)
        try:
            text = text.format_map(event)
        except Exception:
            # twisted.logger's formatter says what was wrong with it.
            return formatEventAsClassicLogText(event, formatTime=time_text)
        if not text:
            return None
        system = event.get("log_system")
        if system is None:
            level = event.get("log_level")
            system = f"{event.get('log_namespace', '-')}#{'-' if level is None else level.name}"
        else:
            try:
                system = str(system)
            except Exception:
                system = "UNFORMATTABLE"
        whole = f"{time_text(event.get('log_time'))} [{system}] {text}"
        return whole.replace("\n", "\n\t") + "\n"

    return FileLogObserver(out, line)


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
