"""
Small Deferred helpers shared by the parts of the daemon.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.internet.defer import Deferred


def shielded(
    d: Deferred, canceller: Optional[Callable[[Deferred], None]] = None
) -> Deferred:
    """
    A Deferred with C{d}'s result, unless it has already fired (cancelled,
    or timed out) by then; cancelling it does not reach C{d} (only
    C{canceller}, when given).

    A client that goes away cancels its request's work, yet a write the
    store has taken commits all the same and its follow-ups must run; a
    task past its timeout ends its attempt while its thread runs on.
    """
    shield: Deferred = Deferred(canceller)

    def deliver(result: Any) -> None:
        if not shield.called:
            shield.callback(result)

    d.addBoth(deliver)
    return shield
