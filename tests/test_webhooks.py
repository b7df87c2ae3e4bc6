"""
Tests for webhooks (L{dispatcher.core._webhooks}): the delivery service's
logic with a C{Clock}, a C{StubTreq} receiver and an outbox held in
memory (the store's own outbox is the store contract's:
C{tests/store_contract.py}); the signature against the receiver's check
that docs/webhooks.md gives; the submission's checks, and the promises
users rely on against a real C{twistd} and a real local receiver
(C{tests/test_webhooks_daemon.py}).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import pathlib
import re
from typing import Any, Optional

import attrs
import pytest
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from dispatcher.core._webhooks import (
    CLAIM_MARGIN,
    MAX_ANSWER_BYTES,
    DeliveryRules,
    WebhookDeliveries,
    _read_some,
    notify_url_refusal,
    retry_wait,
    sign,
)
from dispatcher.execution._fetch_policy import FetchPolicy
from dispatcher.model._deliveries import Delivery
from dispatcher.model._jobs import JobState
from dispatcher.store._results import CommitFailed

SECRET = b"webhook-secret-0123456789abcdef"
URL = "https://hooks.example/job?token=private"
# The clock the tests start at: a delivery's time is on it.
START = 1_000_000.0


def delivery(id: int = 1, state: JobState = JobState.SUCCEEDED, tries: int = 0,
             at: float = START, url: str = URL) -> Delivery:
    return Delivery(
        id, f"job-{id}", url, at, state, JobState.RUNNING, "alice", "default", "n",
        None, None, 1, 0, None, tries,
    )


@attrs.define
class Outbox:
    """
    The store's two outbox methods over a list, answered at once: due
    rows in order of due then id, records applied as the store applies
    them.
    """

    rows: dict[int, tuple[float, Delivery]] = attrs.field(factory=dict)
    writes: list[tuple[list[int], list[tuple[int, float]]]] = attrs.field(factory=list)
    reads: int = 0
    holds: list[float] = attrs.field(factory=list)
    # Whether a record fails, as one on a full disk does.
    failing: bool = False

    def add(self, item: Delivery, due: float = 0.0) -> None:
        self.rows[item.id] = (due, item)

    def due_deliveries(self, now: float, limit: int, hold: float = 0.0,
                       exclude=()) -> Deferred:
        # (A store of its own: the hold claims nothing; tests/
        # test_postgres_store.py has a shared database's claims.)
        self.reads += 1
        self.holds.append(hold)
        due = sorted((d, i) for i, (d, _) in self.rows.items()
                     if d <= now and i not in exclude)
        return succeed([self.rows[i][1] for _, i in due[:limit]])

    def record_deliveries(self, done, later) -> Deferred:
        if self.failing:
            return fail(CommitFailed("database or disk is full"))
        self.writes.append((list(done), list(later)))
        for i in done:
            self.rows.pop(i, None)
        for i, due in later:
            if i in self.rows:
                self.rows[i] = (due, attrs.evolve(self.rows[i][1],
                                                  tries=self.rows[i][1].tries + 1))
        return succeed(None)


class Receiver(Resource):
    """
    Answers posts in turn with C{(code, body, headers)}; the last answer
    repeats; C{None} leaves the post hanging.  Keeps every post it got.
    """

    isLeaf = True

    def __init__(self, *answers: Optional[tuple[int, bytes, dict]]) -> None:
        super().__init__()
        self.answers = list(answers)
        self.posts: list[dict[str, Any]] = []
        self.hanging: list[Any] = []

    def render_POST(self, request):
        answer = self.answers[min(len(self.posts), len(self.answers) - 1)]
        self.posts.append({
            "path": request.uri.decode(),
            "headers": {k.decode().lower(): v[0].decode()
                        for k, v in request.requestHeaders.getAllRawHeaders()},
            "body": request.content.read(),
        })
        if answer is None:
            self.hanging.append(request)
            return NOT_DONE_YET
        code, body, headers = answer
        if headers.get("stall"):
            # The status and a first part of the body, and then nothing.
            request.setResponseCode(code)
            request.write(body)
            self.hanging.append(request)
            return NOT_DONE_YET
        request.setResponseCode(code)
        for name, value in headers.items():
            request.setHeader(name, value)
        return body


class Pool:
    """The connection pool's one call the service makes."""

    closed = False

    def closeCachedConnections(self) -> Deferred:
        self.closed = True
        return succeed(None)


@attrs.define
class Unit:
    service: WebhookDeliveries
    outbox: Outbox
    receiver: Receiver
    stub: StubTreq
    clock: Clock
    pool: Pool

    def run(self, seconds: float = 0.0) -> None:
        """Let C{seconds} pass, and every post made meanwhile be answered."""
        self.stub.flush()
        if seconds:
            self.clock.advance(seconds)
        self.stub.flush()


def unit(receiver: Receiver, *items: Delivery, draw: float = 0.5, **rules: Any) -> Unit:
    clock = Clock()
    clock.advance(START)
    outbox = Outbox()
    for item in items:
        outbox.add(item)
    stub = StubTreq(receiver)
    pool = Pool()
    rules.setdefault("retry_delay", 10.0)
    service = WebhookDeliveries(outbox, stub, pool, clock, SECRET, DeliveryRules(**rules),
                                draw=lambda: draw)
    return Unit(service, outbox, receiver, stub, clock, pool)


@pytest.fixture
def logged():
    """The log events of the test."""
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def lines(events: list[dict], text: str) -> list[dict]:
    return [e for e in events if text in e.get("log_format", "")]


def ok(body: bytes = b"") -> tuple[int, bytes, dict]:
    return (200, body, {})


def status(code: int, body: bytes = b"nope", **headers: str) -> tuple[int, bytes, dict]:
    return (code, body, headers)


def verify(secret: bytes, header: str, body: bytes, now: float, tolerance: float = 300):
    """The receiver's check of docs/webhooks.md, run as the page gives it."""
    source = pathlib.Path(__file__).parent.parent / "docs" / "webhooks.md"
    blocks = re.findall(r"```python\n(.*?)```", source.read_text(), re.S)
    namespace: dict[str, Any] = {}
    exec(blocks[0], namespace)
    return namespace["verify"](secret, header, body, now=now, tolerance=tolerance)


# --- The signature -------------------------------------------------------


def test_the_signature_is_an_hmac_of_the_time_and_the_body():
    """The signature header holds the time and the hex HMAC-SHA256 of
    "<time>.<body>" keyed with the secret."""
    body = b'{"id":1}'
    expected = hmac.new(SECRET, b"1700000000." + body, hashlib.sha256).hexdigest()
    assert sign(SECRET, 1700000000, body) == f"t=1700000000,v1={expected}"


def test_the_documented_check_takes_a_signature_and_refuses_the_rest():
    """The receiver's check of docs/webhooks.md takes a fresh signature and
    refuses another body, another secret, an old time (a replay) and a
    header that is not one."""
    body = b'{"id":1,"state":"succeeded"}'
    header = sign(SECRET, 1700000000, body)
    assert verify(SECRET, header, body, now=1700000010)
    assert not verify(SECRET, header, body + b" ", now=1700000010)
    assert not verify(b"another-secret-0123456789", header, body, now=1700000010)
    assert not verify(SECRET, header, body, now=1700000000 + 301)
    assert not verify(SECRET, "v1=00", body, now=1700000010)
    assert not verify(SECRET, "t=x,v1=00", body, now=1700000010)


# --- Deliveries ----------------------------------------------------------


def test_a_delivery_is_posted_once_signed_and_then_gone():
    """A due delivery is posted at once: its event as JSON, with its id and
    a signature of the body at the clock's time; a 2xx answer removes it
    from the outbox."""
    receiver = Receiver(ok(b"thanks"))
    u = unit(receiver, delivery(7))
    u.service.startService()
    u.run()
    (post,) = receiver.posts
    event = json.loads(post["body"])
    assert event == {
        "id": 7, "at": "1970-01-12T13:46:40.000000Z", "job_id": "job-7",
        "state": "succeeded", "previous": "running", "owner": "alice",
        "queue": "default", "name": "n", "array_id": None, "batch_id": None,
        "attempt": 1, "exit_code": 0, "error": None,
    }
    headers = post["headers"]
    assert headers["content-type"] == "application/json"
    assert headers["dispatcher-event-id"] == "7"
    assert headers["dispatcher-signature"] == sign(SECRET, int(START), post["body"])
    assert verify(SECRET, headers["dispatcher-signature"], post["body"], now=START)
    assert post["path"] == "/job?token=private"
    assert u.outbox.rows == {}
    assert u.outbox.writes == [([7], [])]
    # Each read asks for what it gets to be its own for a try's timeout
    # and a margin (on a database shared with other dispatchers).
    assert set(u.outbox.holds) == {u.service._rules.timeout + CLAIM_MARGIN}
    u.run(60)
    assert len(receiver.posts) == 1
    assert u.service.delivered == 1
    u.service.stopService()
    assert u.pool.closed


def test_a_failed_try_is_tried_again_after_the_back_off(logged):
    """A 500 puts the delivery off by retry_delay (the jitter drawn at its
    middle); nothing is posted before then, and a 200 then delivers it.
    The log line says why and when, without the URL's query."""
    receiver = Receiver(status(500, b"down for maintenance"), ok())
    u = unit(receiver, delivery(1))
    u.service.startService()
    u.run()
    assert len(receiver.posts) == 1
    assert u.outbox.writes == [([], [(1, START + 10.0)])]
    (line,) = lines(logged, "failed ({problem})")
    assert line["problem"] == "answered 500: down for maintenance"
    assert line["url"] == "https://hooks.example/job"
    u.run(9.5)
    assert len(receiver.posts) == 1
    u.run(0.5)
    assert len(receiver.posts) == 2
    assert receiver.posts[1]["headers"]["dispatcher-event-id"] == "1"
    # Signed again at the time of the new try.
    assert receiver.posts[1]["headers"]["dispatcher-signature"].startswith(
        f"t={int(START + 10)},")
    assert u.outbox.rows == {}
    u.service.stopService()


def test_the_back_off_doubles_with_jitter_up_to_its_cap():
    """Each failed try doubles the wait, up to max_delay, times a factor
    drawn between 0.5 and 1.5."""
    rules = DeliveryRules(retry_delay=10.0, max_delay=100.0)
    assert [retry_wait(rules, n, lambda: 0.5) for n in (1, 2, 3, 4, 5)] == [
        10.0, 20.0, 40.0, 80.0, 100.0]
    assert retry_wait(rules, 2, lambda: 0.0) == 10.0
    assert retry_wait(rules, 2, lambda: 0.999) == pytest.approx(29.98)


def test_a_delivery_is_given_up_after_max_attempts(logged):
    """After max_attempts failed tries the delivery is removed, with one
    log line saying so, and never posted again."""
    receiver = Receiver(status(503))
    u = unit(receiver, delivery(3), max_attempts=3)
    u.service.startService()
    u.run()
    u.run(10.0)
    u.run(20.0)
    assert len(receiver.posts) == 3
    assert u.outbox.rows == {}
    (line,) = lines(logged, "gave up the webhook")
    assert line["why"] == "3 tries, [webhooks] max_attempts"
    assert line["event_id"] == 3
    u.run(3600.0)
    assert len(receiver.posts) == 3
    assert u.service.given_up == 1
    u.service.stopService()


def test_a_delivery_is_given_up_past_max_age(logged):
    """A failed try of a delivery older than max_age gives it up, whatever
    tries it has left."""
    receiver = Receiver(status(500))
    u = unit(receiver, delivery(4, at=START - 100.0), max_age=100.0)
    u.service.startService()
    u.run()
    assert u.outbox.rows == {}
    (line,) = lines(logged, "gave up the webhook")
    assert line["why"] == "older than [webhooks] max_age"
    u.service.stopService()


def test_410_stops_at_once(logged):
    """A 410 (Gone) gives the delivery up at the first try."""
    receiver = Receiver(status(410, b"no such hook"), ok())
    u = unit(receiver, delivery(5), max_attempts=5)
    u.service.startService()
    u.run()
    u.run(3600)
    assert len(receiver.posts) == 1
    assert u.outbox.rows == {}
    (line,) = lines(logged, "gave up the webhook")
    assert "410" in line["problem"] and line["why"] == "not tried again"
    u.service.stopService()


def test_redirects_are_not_followed(logged):
    """A 3xx answer is a failed try: its Location is not posted to."""
    receiver = Receiver(status(302, Location="https://elsewhere.example/"), ok())
    u = unit(receiver, delivery(6))
    u.service.startService()
    u.run()
    assert [p["path"] for p in receiver.posts] == ["/job?token=private"]
    assert u.outbox.writes == [([], [(6, START + 10.0)])]
    (line,) = lines(logged, "failed ({problem})")
    assert "redirects are not followed" in line["problem"]
    u.service.stopService()


def test_a_try_without_an_answer_times_out_and_is_tried_again():
    """A receiver that does not answer within the timeout fails the try,
    which is tried again after the back-off."""
    receiver = Receiver(None, ok())
    u = unit(receiver, delivery(8), timeout=5.0)
    u.service.startService()
    u.run()
    assert len(receiver.posts) == 1 and u.outbox.writes == []
    u.run(5.0)
    assert u.outbox.writes == [([], [(8, START + 5.0 + 10.0)])]
    u.run(10.0)
    assert len(receiver.posts) == 2
    assert u.outbox.rows == {}
    u.service.stopService()


def test_a_2xx_whose_body_never_ends_is_delivered():
    """A receiver that answers 200 and then stalls in its body has the
    delivery all the same when the try's time runs out: it is not posted
    again."""
    receiver = Receiver((200, b"ok so far", {"stall": "yes"}))
    u = unit(receiver, delivery(10), timeout=5.0)
    u.service.startService()
    u.run()
    assert u.outbox.writes == []
    u.run(5.0)
    assert u.outbox.writes == [([10], [])]
    u.run(60.0)
    assert len(receiver.posts) == 1
    u.service.stopService()


def test_no_more_than_concurrency_posts_at_once():
    """With receivers that hold every post, no more than concurrency are
    under way; each freed slot takes the next due delivery."""
    receiver = Receiver(None)
    u = unit(receiver, *[delivery(i) for i in range(1, 6)], concurrency=2, timeout=60)
    u.service.startService()
    u.run()
    u.run(1.0)
    assert [p["headers"]["dispatcher-event-id"] for p in receiver.posts] == ["1", "2"]
    request = receiver.hanging.pop(0)
    request.setResponseCode(200)
    request.finish()
    u.run()
    assert [p["headers"]["dispatcher-event-id"] for p in receiver.posts] == ["1", "2", "3"]
    assert len(receiver.hanging) == 2
    assert sorted(u.outbox.rows) == [2, 3, 4, 5]
    u.service.stopService()


def test_reading_an_answer_stops_at_its_bound():
    """An answer's body is read up to the bound given, and its transfer is
    then stopped: a receiver cannot make the dispatcher hold more."""
    stopped = []

    class Transport:
        def stopProducing(self):
            stopped.append(True)

    class Response:
        def deliverBody(self, protocol):
            self.protocol = protocol
            protocol.makeConnection(Transport())

    response = Response()
    d = _read_some(response, 10)
    response.protocol.dataReceived(b"x" * 6)
    assert stopped == []
    response.protocol.dataReceived(b"y" * 6)
    assert stopped == [True]
    response.protocol.dataReceived(b"z" * 6)
    response.protocol.connectionLost(None)
    assert d.result == b"xxxxxxyyyy"


def test_a_failed_try_shows_a_little_of_its_answer(logged):
    """The log line of a failed try shows 200 characters of a large answer
    at most, of the MAX_ANSWER_BYTES read."""
    receiver = Receiver(status(500, b"x" * (MAX_ANSWER_BYTES * 64)))
    u = unit(receiver, delivery(9))
    u.service.startService()
    u.run()
    (line,) = lines(logged, "failed ({problem})")
    assert line["problem"] == "answered 500: " + "x" * 200
    u.service.stopService()


def test_a_stop_cancels_tries_under_way_and_records_the_rest():
    """A stop cancels the posts under way, records nothing of them (they
    are sent again after the next start), writes what became of the
    others, and closes the connections."""
    receiver = Receiver(ok(), None)
    u = unit(receiver, delivery(1), delivery(2), timeout=60)
    u.service.startService()
    u.run()
    assert len(receiver.posts) == 2
    d = u.service.stopService()
    u.run()
    assert d.called
    assert u.outbox.writes == [([1], [])]
    assert list(u.outbox.rows) == [2]
    assert u.pool.closed


def test_a_failed_record_holds_its_deliveries_until_written():
    """A record that fails is written again at the next poll; meanwhile its
    delivery is not posted again."""
    receiver = Receiver(ok())
    u = unit(receiver, delivery(1), poll_interval=1.0)
    u.outbox.failing = True
    u.service.startService()
    u.run()
    u.run(1.0)
    u.run(1.0)
    assert len(receiver.posts) == 1
    assert list(u.outbox.rows) == [1]
    u.outbox.failing = False
    u.run(1.0)
    assert u.outbox.rows == {}
    assert len(receiver.posts) == 1
    u.service.stopService()


# --- The submission's check ----------------------------------------------


@pytest.mark.parametrize("url, refused", [
    ("https://hooks.example/x", None),
    ("http://localhost:8080/x", None),  # a name: checked when posted to
    ("http://127.0.0.1:9/x", "127.0.0.1 is in 127.0.0.0/8 (loopback)"),
    ("http://[::1]/x", "::1 is in ::1/128 (loopback)"),
    ("http://169.254.169.254/latest", "169.254.169.254 is the cloud metadata service"),
    ("http://10.1.2.3/x", "10.1.2.3 is in 10.0.0.0/8 (private, RFC 1918)"),
    ("http:///x", "the URL has no host"),
    ("http://2130706433/x", "127.0.0.1 is in 127.0.0.0/8 (loopback)"),
    ("http://0x7f.1/x", "127.0.0.1 is in 127.0.0.0/8 (loopback)"),
    ("http://a b/x", "'a b' is neither an IP address nor a host name"),
    ("http://\x01/x", r"'\x01' is neither an IP address nor a host name"),
    ("http://hooks.example:0/x", "the URL's port must be from 1 to 65535"),
    ("http://bücher.example/x", None),
])
def test_a_url_giving_a_refused_address_is_refused(url, refused):
    """A URL whose host is an address the fetch policy refuses, in any form
    the resolver reads, is refused, saying what it is and what lets it
    through; so is one whose host or port cannot be connected to; a name
    passes."""
    said = notify_url_refusal(FetchPolicy(), url)
    if refused is None:
        assert said is None
    else:
        assert said is not None and said.startswith(refused), said
        assert ("[fetch] allow" in said) == (" is " in refused and "neither" not in refused)


def test_an_allowed_network_lets_a_url_through():
    """[fetch] allow lets a webhook go to a network the policy refuses by
    default, as it does inputs."""
    policy = FetchPolicy((ipaddress.ip_network("127.0.0.0/8"),))
    assert notify_url_refusal(policy, "http://127.0.0.1:9/x") is None
