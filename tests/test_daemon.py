"""
The daemon's own upkeep, without a network: freezing settled connections
out of the garbage collector's sight.
"""

import gc

from twisted.internet.testing import MemoryReactorClock

from dispatcher.app._daemon import ConnectionFreezer


def test_connections_are_frozen_once_per_growth():
    """Each growth of the connections by the threshold freezes them once;
    less growth, or growth back after some closed, freezes nothing more."""
    reactor = MemoryReactorClock()
    freezer = ConnectionFreezer(reactor, interval=1.0, threshold=100)
    freezer.start()
    try:
        reactor.readers.update(object() for _ in range(50))
        reactor.advance(1.0)
        assert freezer.freezes == 0
        before = gc.get_freeze_count()
        reactor.readers.update(object() for _ in range(500))
        reactor.advance(1.0)
        assert freezer.freezes == 1
        assert gc.get_freeze_count() > before
        reactor.advance(1.0)
        assert freezer.freezes == 1
        # Half of them close: growth counts from there.
        for reader in list(reactor.readers)[:300]:
            reactor.readers.discard(reader)
        reactor.advance(1.0)
        reactor.readers.update(object() for _ in range(90))
        reactor.advance(1.0)
        assert freezer.freezes == 1
        reactor.readers.update(object() for _ in range(20))
        reactor.advance(1.0)
        assert freezer.freezes == 2
    finally:
        freezer.stop()
        gc.unfreeze()
    assert not reactor.getDelayedCalls()
