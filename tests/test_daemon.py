"""
How the daemon is put together: the twistd options' checks before anything
starts, services that run while it serves, and freezing the heap out of the
garbage collector's sight only when twistd's configuration asks.
"""

import gc

import attrs
import pytest
import pytest_twisted
from twisted.application.service import Service
from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage

from dispatcher.app import tap
from dispatcher.app._daemon import DaemonService
from dispatcher.app._heap import HeapFreezer
from dispatcher.config._ini import parse_config

from .conftest import TEST_TASKS


@pytest.fixture
def unfrozen():
    """Each test starts and ends with nothing frozen."""
    assert gc.get_freeze_count() == 0
    yield
    gc.unfreeze()


def frozen(obj):
    """Whether obj is in the collector's permanent generation (out of every
    generation a collection walks)."""
    return gc.is_tracked(obj) and not any(o is obj for o in gc.get_objects())


def test_connections_are_frozen_once_per_growth(unfrozen):
    """Starting freezes once; each growth of the connections by the
    threshold freezes them once more; less growth, or growth back after some
    closed, freezes nothing more; stopping unfreezes and leaves no call."""
    reactor = MemoryReactorClock()
    freezer = HeapFreezer(reactor, interval=1.0, threshold=100)
    freezer.startService()
    try:
        assert freezer.freezes == 1
        reactor.readers.update(object() for _ in range(50))
        reactor.advance(1.0)
        assert freezer.freezes == 1
        connection = [object()]
        assert not frozen(connection)
        reactor.readers.update(object() for _ in range(500))
        reactor.advance(1.0)
        assert freezer.freezes == 2
        assert frozen(connection)
        reactor.advance(1.0)
        assert freezer.freezes == 2
        # Half of them close: growth counts from there.
        for reader in list(reactor.readers)[:300]:
            reactor.readers.discard(reader)
        reactor.advance(1.0)
        reactor.readers.update(object() for _ in range(90))
        reactor.advance(1.0)
        assert freezer.freezes == 2
        reactor.readers.update(object() for _ in range(20))
        reactor.advance(1.0)
        assert freezer.freezes == 3
    finally:
        freezer.stopService()
    assert gc.get_freeze_count() == 0 and not frozen(connection)
    assert not reactor.getDelayedCalls()


def _config(tmp_path, ini=""):
    config = parse_config(TEST_TASKS + "[executor]\nslots = 0\n" + ini, "t.ini")
    return attrs.evolve(
        config, dispatcher=attrs.evolve(config.dispatcher, data_dir=str(tmp_path / "d")))


class Recorder(Service):
    """A child service that notes whether the API listened at its start and
    stop."""

    def __init__(self, daemon):
        self.daemon = daemon
        self.seen = []

    def startService(self):
        Service.startService(self)
        self.seen.append(("start", self.daemon.port is not None))

    def stopService(self):
        Service.stopService(self)
        self.seen.append(("stop", self.daemon.port.connected))


@pytest_twisted.ensureDeferred
async def test_an_embedded_daemon_leaves_the_heap_alone(tmp_path, unfrozen):
    """A DaemonService built by another process freezes nothing; services
    added to it start once it listens and stop before it closes."""
    daemon = DaemonService(
        reactor, _config(tmp_path), serverFromString(reactor, "tcp:0:interface=127.0.0.1"),
        stop_reactor=False)
    child = Recorder(daemon)
    child.setServiceParent(daemon)
    daemon.startService()
    assert child.seen == []
    await daemon.ready
    assert gc.get_freeze_count() == 0
    assert child.seen == [("start", True)]
    await daemon.stopService()
    assert child.seen == [("start", True), ("stop", True)]


def _tap_service(tmp_path, ini="", listen="tcp:0:interface=127.0.0.1"):
    """twistd's service from a config file; listen=None keeps the file's."""
    tmp_path.mkdir(exist_ok=True)
    path = tmp_path / "t.ini"
    path.write_text(TEST_TASKS + ini)
    args = ["--config", str(path), "--data-dir", str(tmp_path / "d")]
    if listen is not None:
        args += ["--listen", listen]
    options = tap.Options()
    options.parseOptions(args)
    return tap.makeService(options)


@pytest_twisted.ensureDeferred
async def test_twistd_freezes_the_heap_only_when_configured(tmp_path, unfrozen):
    """twistd's service freezes the heap once it serves with
    [dispatcher] gc_freeze = yes, and hands it back when it stops; by default
    it freezes nothing."""
    plain = _tap_service(tmp_path / "plain")
    assert [s for s in plain if isinstance(s, HeapFreezer)] == []
    service = _tap_service(tmp_path / "frozen", "[dispatcher]\ngc_freeze = yes\n")
    [freezer] = [s for s in service if isinstance(s, HeapFreezer)]
    service._stop_reactor = False
    service.startService()
    await service.ready
    assert freezer.freezes == 1 and gc.get_freeze_count() > 0
    await service.stopService()
    assert gc.get_freeze_count() == 0


@pytest.mark.parametrize("listen, refused", [
    ("tcp:0", "every interface"),
    ("tcp:0:interface=0.0.0.0", "0.0.0.0"),
    ("tcp6:0:interface=\\:\\:", "::"),
    ("tcp:0:interface=127.0.0.1", None),
    ("tcp6:0:interface=\\:\\:1", None),
])
def test_twistd_refuses_to_listen_beyond_loopback_before_starting(
        tmp_path, listen, refused):
    """twistd's options refuse an endpoint that other machines reach while
    authentication is off, naming where it was set, the address and the key
    to change, before any part of the daemon starts; with authentication
    required (the default) every address is taken."""
    assert isinstance(_tap_service(tmp_path, f"[server]\nlisten = {listen}\n", listen=None),
                      DaemonService)
    ini = f"[server]\nlisten = {listen}\n[api]\nauthentication = off\n"
    if refused is None:
        assert isinstance(_tap_service(tmp_path, ini, listen=None), DaemonService)
        return
    with pytest.raises(usage.UsageError) as e:
        _tap_service(tmp_path, ini, listen=None)
    message = str(e.value)
    # The description as given, with the backlog it got.
    given = repr(listen)[:-1]
    assert message.startswith(f"{tmp_path / 't.ini'}: [server] listen = {given}")
    assert f"would listen on {refused}," in message
    assert "authentication = off" in message
    with pytest.raises(usage.UsageError) as e:
        _tap_service(tmp_path, "[api]\nauthentication = off\n", listen=listen)
    assert str(e.value).startswith(f"--listen = {given}")
    assert not (tmp_path / "d").exists()


def test_twistd_options_refuse_a_bad_endpoint(tmp_path):
    """A listen description Twisted cannot parse is a usage error of the
    options, naming where it was set, before any service is made."""
    options = tap.Options()
    with pytest.raises(usage.UsageError) as e:
        options.parseOptions(["--listen", "tcp:http", "--data-dir", str(tmp_path / "d")])
    assert str(e.value).startswith("--listen = 'tcp:http:backlog=4096': not a Twisted endpoint (")
