"""
The twistd plugin's options and service maker: the only code that touches
the global reactor.
"""

from __future__ import annotations

import os
from typing import Any

import attrs
from twisted.python import usage

from dispatcher.app._exposure import OpenToTheNetwork, check_exposure, planned_interface
from dispatcher.app._logging import DaemonLog
from dispatcher.app._version import version_line
from dispatcher.config._ini import Config, ConfigError, load_config


class Options(usage.Options):
    """
    C{twistd dispatcher} options.  With no C{--config}, the built-in
    defaults: listen on C{tcp:8080:interface=127.0.0.1}, data under C{./var}.
    """

    optParameters = [
        ["config", "c", None, "The ini file (see etc/dispatcher.ini)."],
        ["listen", "l", None, "A Twisted endpoint to listen on; overrides [server] listen."],
        ["data-dir", "d", None, "Where jobs and logs are kept; overrides [dispatcher] data_dir."],
    ]

    def opt_version(self) -> None:
        """
        Print the dispatcher's version (and Twisted's and Python's) and exit.
        """
        print(version_line("dispatcher"))
        raise SystemExit(0)

    def postOptions(self) -> None:
        try:
            config = self.read_config()
        except ConfigError as e:
            raise usage.UsageError(str(e))
        self.where = (
            f"{config.path}: [server] listen"
            if config.path and not self["listen"]
            else "--listen"
        )
        listen = config.server.listen
        try:
            interface = planned_interface(listen)
        except Exception as e:
            raise usage.UsageError(f"{self.where} = {listen!r}: not a Twisted endpoint ({e})")
        # Refused here, before anything starts (a daemon that will not serve
        # must not take up the last run's jobs first); the daemon checks the
        # address it did bind as well.
        try:
            check_exposure(interface, config)
        except OpenToTheNetwork as e:
            raise usage.UsageError(f"{self.where} = {listen!r}: {e}")
        self.config = config
        # twistd makes its log observer once these options are parsed: it
        # makes ours ([log] format and level), unless told otherwise.
        self.daemon_log = DaemonLog(config.log)
        self.daemon_log.install(getattr(self, "parent", None))

    def read_config(self) -> Config:
        """
        The configuration: the C{--config} file (the built-in defaults
        without one), with C{--listen} and C{--data-dir} over it.  Read at
        start and again at each reload (SIGHUP).

        @raise ConfigError: the file does not load.
        """
        config = load_config(self["config"]) if self["config"] else Config()
        if self["listen"]:
            config = attrs.evolve(
                config, server=attrs.evolve(config.server, listen=self["listen"])
            )
        if self["data-dir"]:
            config = attrs.evolve(
                config,
                dispatcher=attrs.evolve(config.dispatcher, data_dir=self["data-dir"]),
            )
        return config


def makeService(options: Options) -> Any:
    """
    Build the daemon's service from parsed options.
    """
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString

    from dispatcher.app._daemon import DaemonService
    from dispatcher.app._exit import ExitStatus
    from dispatcher.app._files import UMASK
    from dispatcher.app._heap import HeapFreezer
    from dispatcher.app._signals import Signals

    # Whatever the daemon makes without a mode of its own (a file SQLite or
    # a library makes) is its own alone.  (twistd's --umask, applied
    # later, overrides it.)
    os.umask(UMASK)
    config = options.config
    try:
        endpoint = serverFromString(reactor, config.server.listen)
    except Exception as e:
        raise usage.UsageError(
            f"{options.where} = {config.server.listen!r}: not a Twisted endpoint ({e})"
        )
    # A start that fails stops the reactor and makes twistd (or twist)
    # exit 1 rather than 0, so that a supervisor or a script sees it.
    exit_status = ExitStatus()
    options.daemon_log.reactor = reactor
    service = DaemonService(
        reactor,
        config,
        endpoint,
        on_failed_start=exit_status.fail,
        daemon_log=options.daemon_log,
        read_config=options.read_config if options["config"] else None,
    )
    # SIGHUP reloads; a second SIGINT or SIGTERM cuts the stop short.
    Signals(reactor, service.reload, service.end_grace).install()
    if config.dispatcher.gc_freeze:
        # Only here: the process is the dispatcher alone.
        HeapFreezer(reactor).setServiceParent(service)
    return service
