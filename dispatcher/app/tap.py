"""
The twistd plugin's options and service maker: the only code that touches
the global reactor.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.python import usage

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

    def postOptions(self) -> None:
        try:
            config = load_config(self["config"]) if self["config"] else Config()
        except ConfigError as e:
            raise usage.UsageError(str(e))
        if self["listen"]:
            config = attrs.evolve(
                config, server=attrs.evolve(config.server, listen=self["listen"])
            )
        if self["data-dir"]:
            config = attrs.evolve(
                config,
                dispatcher=attrs.evolve(config.dispatcher, data_dir=self["data-dir"]),
            )
        self.config = config


def makeService(options: Options) -> Any:
    """
    Build the daemon's service from parsed options.
    """
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString

    from dispatcher.app._daemon import (
        DaemonService,
        OpenToTheNetwork,
        check_exposure,
        planned_interface,
    )
    from dispatcher.app._heap import HeapFreezer

    config = options.config
    where = (
        f"{config.path}: [server] listen"
        if config.path and not options["listen"]
        else "--listen"
    )
    try:
        endpoint = serverFromString(reactor, config.server.listen)
    except Exception as e:
        raise usage.UsageError(
            f"{where} = {config.server.listen!r}: not a Twisted endpoint ({e})"
        )
    # Refused before anything starts (no job of the last run is taken up
    # by a daemon that then will not serve); the daemon checks the address
    # it did bind as well.
    try:
        check_exposure(planned_interface(config.server.listen), config)
    except OpenToTheNetwork as e:
        raise usage.UsageError(f"{where} = {config.server.listen!r}: {e}")
    service = DaemonService(reactor, config, endpoint)
    if config.dispatcher.gc_freeze:
        # Only here: the process is the dispatcher alone.
        HeapFreezer(reactor).setServiceParent(service)
    return service
