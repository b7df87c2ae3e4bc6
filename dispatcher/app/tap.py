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

    from dispatcher.app._daemon import DaemonService

    config = options.config
    try:
        endpoint = serverFromString(reactor, config.server.listen)
    except Exception as e:
        where = f"{config.path}: [server] listen" if config.path else "--listen"
        raise usage.UsageError(
            f"{where} = {config.server.listen!r}: not a Twisted endpoint ({e})"
        )
    return DaemonService(reactor, config, endpoint)
