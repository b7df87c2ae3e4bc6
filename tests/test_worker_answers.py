"""
The worker hub decides in model values (a L{LeaseVerdict} per lease, a
L{ConnectedWorker} per worker); the wire forms turn them into the answers
docs/worker-protocol.md promises, byte for byte, and the API alone picks
the HTTP status.
"""

import json
import typing

from dispatcher.api._workers import _status
from dispatcher.model._jobs import Offer, Resources
from dispatcher.model._workers import ConnectedWorker, LeaseEnd, LeaseVerdict
from dispatcher.wire._forms import REFUSALS, lease_status, worker_view
from dispatcher.wire._json import encode
from dispatcher.wire._types import LeaseStatus

# 2026-11-30T00:53:20.123456Z on the dispatcher's clock.
# The token of lease 7 as a worker sent it (the verdict holds its counter).
SENT = "7.AAAAAAAAAAAAAAAAAAAAAA"
WHEN = 1796000000.123456


def wire(value):
    """The JSON a worker reads for C{value}."""
    return json.loads(encode(value))


def test_each_refusal_reads_as_the_protocol_says():
    """A refused item carries ok false, status 409, its reason and the
    message workers log, word for word as before the hub stopped writing
    them."""
    messages = {
        LeaseEnd.CANCELLED: "the job was cancelled; stop it",
        LeaseEnd.EXPIRED: "the lease expired without a heartbeat; the job went back to "
        "the queue, or failed if it had no attempt left; stop it",
        LeaseEnd.REPORTED: "its result is already recorded",
        LeaseEnd.SUPERSEDED: "this lease is no longer the job's current one; stop it",
    }
    for reason, message in messages.items():
        assert wire(lease_status(LeaseVerdict("j", 7, reason), SENT)) == {
            "job_id": "j", "token": SENT, "ok": False, "status": 409,
            "reason": reason.value, "message": message,
        }


def test_an_accepted_item_says_only_ok_and_a_renewal_its_expiry():
    """An accepted report is C{ok} and nothing more; an accepted heartbeat
    adds the new expiry as an RFC 3339 time with microseconds; each echoes
    the token as the worker sent it."""
    assert wire(lease_status(LeaseVerdict("j", 7), SENT)) == {
        "job_id": "j", "token": SENT, "ok": True}
    assert wire(lease_status(LeaseVerdict("j", 7, None, WHEN), SENT)) == {
        "job_id": "j", "token": SENT, "ok": True, "expires_at": "2026-11-30T00:53:20.123456Z",
    }


def test_the_model_and_the_wire_know_the_same_reasons():
    """Every reason a lease can end for has a message and is one the wire
    type (and so the OpenAPI document) declares, and no other."""
    declared = typing.get_args(typing.get_args(typing.get_type_hints(LeaseStatus)["reason"])[0])
    assert set(declared) == {end.value for end in LeaseEnd}
    assert set(REFUSALS) == set(LeaseEnd)


def test_the_whole_answer_is_409_only_when_every_item_is_refused():
    """A heartbeat's or report's status is 409 when no item was accepted,
    and 200 when one was, or when there were none."""
    refused = LeaseVerdict("a", 1, LeaseEnd.EXPIRED)
    assert _status([refused, LeaseVerdict("b", 2, LeaseEnd.SUPERSEDED)]) == 409
    assert _status([refused, LeaseVerdict("b", 2)]) == 200
    assert _status([]) == 200


def test_a_connected_worker_shows_what_it_offers_and_has_free():
    """A worker is shown with its offer, its free slots and resources
    (below nothing when it now offers less than it holds), the jobs it
    holds, its last contact as a wire time, and its prefetch."""
    offer = Offer("w", 3, Resources(2.5, 900, 1), {"site": "a"}, frozenset({"b", "a"}), "i",
                  prefetch=2)
    shown = ConnectedWorker(offer, 1, Resources(-0.5, 100, 0), ("j1", "j2"), True, WHEN, True)
    assert wire(worker_view(shown)) == {
        "name": "w", "slots": 3,
        "resources": {"cpus": 2.5, "memory_mb": 900, "gpus": 1},
        "labels": {"site": "a"}, "tasks": ["a", "b"],
        "free": {"slots": 1, "cpus": -0.5, "memory_mb": 100, "gpus": 0},
        "running": ["j1", "j2"], "waiting_for_work": True,
        "last_contact": "2026-11-30T00:53:20.123456Z", "name_shared": True,
        "prefetch": 2,
    }
    # A worker known only from a resumed lease offers nothing yet.
    resumed = ConnectedWorker(Offer("r", 0), 0, Resources(), (), False, WHEN, False)
    assert wire(worker_view(resumed))["tasks"] == []
