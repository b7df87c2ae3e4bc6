"""
Webhooks: the delivery service that posts each job's changes of state to
the URL its C{notify} names, signed with the dispatcher's secret.

The deliveries come from the store's outbox (written in the transaction
of each change: see L{IJobStore.due_deliveries}), read on the store's
reader threads every C{poll_interval} seconds and whenever a full read
leaves more behind; what became of those tried is written back through
the store's writer, several at once.  Neither the reads nor the writes run
on the reactor thread, and no delivery waits for another's write: a slow
receiver holds one of C{concurrency} sending slots, never the writer.

A delivery is a POST of its L{JobEvent} as JSON, with the headers
C{Dispatcher-Event-Id} (the event's id: the same for every try of one
delivery, for the receiver to drop repeats) and C{Dispatcher-Signature}
(L{sign}).  A 2xx answer delivers it; a 410 (Gone) stops it at once; any
other answer, a connection that fails or a try that takes longer than
C{timeout} has it tried again after a back-off (L{retry_wait}), until
C{max_attempts} tries or C{max_age} after the change, when it is given up
with a log line.  Redirects are not followed (a 3xx is a failed try), and
no more than L{MAX_ANSWER_BYTES} of an answer's body is read.  Every
connection goes only to addresses the fetch policy allows (C{[fetch]
allow}), checked on the addresses a name resolves to and on the one
connected to (L{dispatcher.execution._http_client}); an address refused
gives the delivery up at once.  A URL that gives a refused address is
refused at submission already (L{notify_url_refusal}).

A delivery is sent at least once: one whose try was under way when the
daemon stopped (or died) is sent again after the restart.  Dispatchers
on one PostgreSQL database share the outbox: each delivery read is
claimed in the store for the one that read it (L{IJobStore.due_deliveries}
with a hold of a try's C{timeout} and L{CLAIM_MARGIN}), so that one
delivery is not tried by two at once; one whose dispatcher died is due
again once the hold has passed.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import random
import re
import socket
from typing import Any, Callable, Optional, Sequence

import attrs
import hyperlink
from twisted.application.service import Service
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    TimeoutError,
    succeed,
)
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from dispatcher._throttle import Throttle
from dispatcher.execution._fetch_policy import Address, FetchPolicy, Refusal, parse_address
from dispatcher.execution._http_client import AddressRefused
from dispatcher.model._deliveries import Delivery
from dispatcher.model._jobs import StoreClosed
from dispatcher.wire._forms import job_event
from dispatcher.wire._json import encode

log = Logger()

# The most of an answer's body read (for the log line of a failed try):
# a receiver's answer is not the dispatcher's to hold.
MAX_ANSWER_BYTES = 1024
# Seconds beyond a try's timeout that a delivery read from a database
# shared with other dispatchers stays this one's: time for its record to
# be written.
CLAIM_MARGIN = 10.0
# The headers a delivery carries.
EVENT_ID_HEADER = "Dispatcher-Event-Id"
SIGNATURE_HEADER = "Dispatcher-Signature"
USER_AGENT = "dispatcher-webhooks"


def sign(secret: bytes, stamp: int, body: bytes) -> str:
    """
    The C{Dispatcher-Signature} of a delivery's C{body} sent at C{stamp}
    (whole seconds since the epoch): C{t=<stamp>,v1=<hex>}, the hex
    HMAC-SHA256 of C{b"<stamp>." + body} keyed with C{secret}.  The
    timestamp is signed with the body, so that a receiver that refuses old
    ones cannot be sent a delivery it saw long ago again (docs/webhooks.md).
    """
    digest = hmac.new(secret, f"{stamp}.".encode("ascii") + body, hashlib.sha256)
    return f"t={stamp},v1={digest.hexdigest()}"


def _policy_words(refusals: Sequence[Refusal]) -> str:
    """
    Why the addresses of a webhook's URL are refused, and what lets them
    through.
    """
    what = "; ".join(r.describe() for r in refusals)
    entries = " and ".join(dict.fromkeys(r.allow_entry() for r in refusals))
    if any(r.metadata for r in refusals):
        how = f"names it alone: add {entries}"
    else:
        how = f"holds it: add {entries} or a network holding it"
    return (
        f"{what}; webhooks are not posted there unless [fetch] allow, in the "
        f"dispatcher's configuration, {how}"
    )


# A host name, as DNS takes it (IDNA-encoded).
_HOST_NAME = re.compile(r"^[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.?$")


def _host_address(host: str) -> Optional[Address]:
    """
    The address a URL's host is written as, or C{None} for a name: an IP
    address, or an IPv4 address in a form the resolver reads as one
    (C{2130706433}, C{0x7f.1}, C{0177.0.0.1}).
    """
    try:
        return parse_address(host)
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except (OSError, ValueError, UnicodeError):
        return None


def notify_url_refusal(policy: FetchPolicy, url: str) -> Optional[str]:
    """
    Why a webhook may not be posted to C{url} (a job's C{notify.url}, of
    the form the wire type checks), or C{None} when it may be: a URL that
    cannot be read, whose host is neither an address nor a host name, has
    no port, or gives an address C{policy} refuses (in any form the
    resolver reads as one).  A host given by name passes: its addresses
    are checked when it is posted to.
    """
    try:
        parsed = hyperlink.DecodedURL.from_text(url)
        host = parsed.host
        port = parsed.port
    except (ValueError, hyperlink.URLParseError) as e:
        return f"not a URL that can be posted to: {e}"
    if not host:
        return "the URL has no host"
    if port is None or not 0 < port < 65536:
        return "the URL's port must be from 1 to 65535"
    address = _host_address(host)
    if address is None:
        try:
            ascii_host = host.encode("idna").decode("ascii")
        except UnicodeError:
            ascii_host = ""
        if not _HOST_NAME.match(ascii_host):
            return f"{host!r} is neither an IP address nor a host name"
        return None
    refusal = policy.refusal(address)
    return None if refusal is None else _policy_words([refusal])


def _shown(url: str) -> str:
    """
    A webhook's URL as a log line shows it: without its query and
    fragment, which often carry the receiver's own token.
    """
    try:
        parsed = hyperlink.DecodedURL.from_text(url)
        return parsed.replace(query=(), fragment="").to_text()
    except (ValueError, hyperlink.URLParseError):
        return "(a URL that cannot be read)"


@attrs.frozen
class DeliveryRules:
    """
    How deliveries are sent (C{[webhooks]}): at most C{concurrency} at
    once, each try given C{timeout} seconds; a failed one tried again
    after L{retry_wait}, at most C{max_attempts} tries in all and no later
    than C{max_age} seconds after its change; the outbox read every
    C{poll_interval} seconds.
    """

    concurrency: int = 8
    timeout: float = 10.0
    retry_delay: float = 10.0
    max_delay: float = 3600.0
    max_attempts: int = 12
    max_age: float = 86400.0
    poll_interval: float = 1.0


def retry_wait(rules: DeliveryRules, tries: int, draw: Callable[[], float]) -> float:
    """
    How long a delivery waits after its C{tries}-th failed try: C{retry_delay}
    doubled for each earlier one, at most C{max_delay}, times a factor
    between 0.5 and 1.5 (C{draw} gives a number in [0, 1)), so that
    deliveries that failed together (a receiver that was down) do not come
    back together.
    """
    base = min(rules.retry_delay * 2 ** (tries - 1), rules.max_delay)
    return base * (0.5 + draw())


@attrs.frozen
class _Tried:
    """
    How one try ended: the answer's status (C{None}: no answer), and what
    went wrong, in words, if it was not delivered; C{final} when trying
    again cannot help (a 410, a refused address).
    """

    status: Optional[int]
    problem: Optional[str] = None
    final: bool = False

    @property
    def delivered(self) -> bool:
        return self.problem is None


class _BoundedBody(Protocol):
    """
    Reads at most C{limit} bytes of an answer's body, then stops the
    transfer; C{done} fires with what was read.
    """

    def __init__(self, limit: int, done: Deferred) -> None:
        self._limit = limit
        self._done = done
        self._parts: list[bytes] = []
        self._size = 0

    def dataReceived(self, data: bytes) -> None:
        if self._size >= self._limit:
            return
        self._parts.append(data[: self._limit - self._size])
        self._size += len(self._parts[-1])
        if self._size >= self._limit:
            self.transport.stopProducing()

    def connectionLost(self, reason: Any = None) -> None:
        if not self._done.called:
            self._done.callback(b"".join(self._parts))


def _read_some(response: Any, limit: int) -> Deferred:
    """
    Fire with at most C{limit} bytes of C{response}'s body; cancelling it
    stops the transfer.
    """
    holder: list[_BoundedBody] = []

    def cancel(d: Deferred) -> None:
        if holder and holder[0].transport is not None:
            holder[0].transport.stopProducing()

    done: Deferred = Deferred(cancel)
    protocol = _BoundedBody(limit, done)
    holder.append(protocol)
    response.deliverBody(protocol)
    return done


def _describe(error: BaseException) -> str:
    """
    A failed connection or exchange in words: the reasons a C{ResponseFailed}
    wraps, or the error's own.
    """
    reasons = getattr(error, "reasons", None)
    if reasons:
        return "; ".join(_describe(r.value) for r in reasons)
    text = str(error) or type(error).__name__
    return text


class WebhookDeliveries(Service):
    """
    The service that sends the outbox's deliveries (see the module's
    docstring).  Started with the daemon once the store is open; stopped
    before the store closes: it cancels the tries under way (those are sent
    again after the next start) and writes what became of the others.

    @param store: the L{IJobStore} whose outbox it sends.
    @param http: the treq C{HTTPClient} every delivery is posted with: its
        own connection pool, connecting only where the fetch policy allows
        (L{dispatcher.execution._http_client.input_http_client}).
    @param pool: that client's C{HTTPConnectionPool}, closed at stop.
    @param clock: the C{IReactorTime} of polls, timeouts, back-offs and the
        signatures' timestamps.
    @param secret: the key deliveries are signed with.
    @param rules: the L{DeliveryRules}.
    @param draw: the random numbers in [0, 1) that jitter the back-off.
    """

    name = "webhooks"

    def __init__(
        self,
        store: Any,
        http: Any,
        pool: Any,
        clock: Any,
        secret: bytes,
        rules: DeliveryRules,
        draw: Callable[[], float] = random.random,
    ) -> None:
        self._store = store
        self._http = http
        self._pool = pool
        self._clock = clock
        self._secret = secret
        self._rules = rules
        self._draw = draw
        self._loop: Optional[LoopingCall] = None
        # The deliveries being tried, and those tried whose record is not
        # yet written: none of them is read again meanwhile.
        self._sending: dict[int, Deferred] = {}
        self._held: set[int] = set()
        # What became of tries, to write: ids done, (id, due) later.
        self._done: list[int] = []
        self._later: list[tuple[int, float]] = []
        self._writing: Optional[Deferred] = None
        self._reading = False
        # Whether the last read was full: more may be due.
        self._more = False
        self._stopping = False
        self._write_trouble = Throttle(clock)
        self._read_trouble = Throttle(clock)
        self.delivered = 0
        self.given_up = 0
        self.retried = 0

    def startService(self) -> None:
        Service.startService(self)
        self._stopping = False
        self._loop = LoopingCall(self._poll)
        self._loop.clock = self._clock
        # _poll never fails: the loop runs until stopService.
        self._loop.start(self._rules.poll_interval, now=True)

    def stopService(self) -> Deferred:
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        self._stopping = True
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        # A try under way is cancelled, and nothing is recorded of it: it
        # is sent again after the next start.
        sending = list(self._sending.values())
        for d in sending:
            d.cancel()
        await DeferredList(sending, consumeErrors=True)
        while self._writing is not None:
            await self._writing
        if self._done or self._later:
            await self._flush()
        await self._pool.closeCachedConnections()

    # Reading the outbox

    def _poll(self) -> None:
        """
        Write what is left to write (after a failed write), and read as
        many due deliveries as there are free sending slots.  Never fails.
        """
        if self._stopping:
            return
        if self._writing is None and (self._done or self._later):
            self._flush()
        if self._reading:
            return
        room = self._rules.concurrency - len(self._sending)
        if room <= 0:
            return
        self._reading = True
        # Those held are not given again.  On a database shared with other
        # dispatchers, those given are this one's alone for a try's time
        # and a margin (a try takes timeout at most; its record, written
        # after, puts the delivery later or removes it).
        limit = room
        d = self._store.due_deliveries(
            self._clock.seconds(), limit, self._rules.timeout + CLAIM_MARGIN,
            tuple(self._held),
        )
        d.addCallbacks(self._read, self._read_failed, callbackArgs=(room, limit))

    def _read(self, deliveries: list[Delivery], room: int, limit: int) -> None:
        self._reading = False
        count = self._read_trouble.cleared()
        if count is not None:
            log.info("reading the webhook outbox works again")
        if self._stopping:
            return
        fresh = [d for d in deliveries if d.id not in self._held]
        for delivery in fresh[:room]:
            self._start(delivery)
        self._more = len(deliveries) >= limit

    def _read_failed(self, failure: Failure) -> None:
        self._reading = False
        if failure.check(StoreClosed):
            return
        count = self._read_trouble.happened()
        if count is not None:
            log.error(
                "reading the webhook outbox failed ({error}); trying again every "
                "{interval:g} s ({count} failed since the last line; logged at most "
                "once a minute)",
                error=failure.getErrorMessage(),
                interval=self._rules.poll_interval,
                count=count,
            )

    # Sending

    def _start(self, delivery: Delivery) -> None:
        self._held.add(delivery.id)
        d = Deferred.fromCoroutine(self._post(delivery))
        d.addTimeout(self._rules.timeout, self._clock)
        self._sending[delivery.id] = d
        d.addBoth(self._tried, delivery)

    async def _post(self, delivery: Delivery) -> _Tried:
        """
        Post C{delivery} once; how it went.
        """
        body = encode(job_event(delivery))
        stamp = int(self._clock.seconds())
        headers = Headers({
            "Content-Type": ["application/json"],
            "User-Agent": [USER_AGENT],
            EVENT_ID_HEADER: [str(delivery.id)],
            SIGNATURE_HEADER: [sign(self._secret, stamp, body)],
        })
        try:
            response = await self._http.post(
                delivery.url, data=body, headers=headers, allow_redirects=False
            )
        except AddressRefused as e:
            return _Tried(None, _policy_words(e.refusals), final=True)
        except CancelledError:
            raise
        except Exception as e:
            reasons = getattr(e, "reasons", None)
            if reasons and all(r.check(CancelledError) for r in reasons):
                # The Agent wraps a cancel of a request in flight.
                raise CancelledError() from e
            refused = [r.value for r in reasons or () if r.check(AddressRefused)]
            if refused:
                return _Tried(None, _policy_words(refused[0].refusals), final=True)
            return _Tried(None, _describe(e))
        status = response.code
        # Read (a little of) the body: what a failed try's log line shows,
        # and what lets the connection serve the next delivery.
        try:
            answer = await _read_some(response, MAX_ANSWER_BYTES)
        except CancelledError:
            if 200 <= status < 300:
                # Its body never ended (the timeout, or the stop): the
                # receiver said it has the delivery all the same.
                return _Tried(status)
            raise
        if 200 <= status < 300:
            return _Tried(status)
        said = answer.decode("utf-8", "replace").strip()
        said = " ".join(said.split())[:200]
        problem = f"answered {status}" + (f": {said}" if said else "")
        if status == 410:
            return _Tried(status, problem + " (410 Gone: not sent again)", final=True)
        if 300 <= status < 400:
            problem += " (redirects are not followed)"
        return _Tried(status, problem)

    def _tried(self, outcome: Any, delivery: Delivery) -> None:
        """
        Decide what becomes of C{delivery} after a try: done (delivered, or
        given up) or tried again later; and queue the record.
        """
        self._sending.pop(delivery.id, None)
        if isinstance(outcome, Failure):
            if self._stopping and outcome.check(CancelledError):
                # Cut short by the stop: sent again after the next start.
                self._held.discard(delivery.id)
                return
            if outcome.check(TimeoutError, CancelledError):
                tried = _Tried(None, f"no answer within {self._rules.timeout:g} s")
            else:
                log.failure("posting a webhook failed", outcome)
                tried = _Tried(None, _describe(outcome.value))
        else:
            tried = outcome
        now = self._clock.seconds()
        tries = delivery.tries + 1
        if tried.delivered:
            self.delivered += 1
            self._done.append(delivery.id)
        elif (
            tried.final
            or tries >= self._rules.max_attempts
            or now - delivery.at >= self._rules.max_age
        ):
            self.given_up += 1
            self._done.append(delivery.id)
            if tried.final:
                why = "not tried again"
            elif tries >= self._rules.max_attempts:
                why = f"{tries} tries, [webhooks] max_attempts"
            else:
                why = "older than [webhooks] max_age"
            log.warn(
                "gave up the webhook of job {job_id} ({state}, event {event_id}) to "
                "{url}: {problem}; {why}",
                job_id=delivery.job_id,
                state=delivery.state.value,
                event_id=delivery.id,
                url=_shown(delivery.url),
                problem=tried.problem,
                why=why,
            )
        else:
            self.retried += 1
            wait = retry_wait(self._rules, tries, self._draw)
            self._later.append((delivery.id, now + wait))
            log.info(
                "the webhook of job {job_id} ({state}, event {event_id}) to {url} "
                "failed ({problem}); try {tries} of {max_attempts}, the next in "
                "{wait:.0f} s",
                job_id=delivery.job_id,
                state=delivery.state.value,
                event_id=delivery.id,
                url=_shown(delivery.url),
                problem=tried.problem,
                tries=tries,
                max_attempts=self._rules.max_attempts,
                wait=wait,
            )
        if self._writing is None:
            self._flush()
        if self._more and not self._stopping:
            # The last read left deliveries due behind: a slot is free.
            self._poll()

    # Recording

    def _flush(self) -> Deferred:
        """
        Write what became of the deliveries tried since the last write (all
        at once: the writer takes them in one group); fires when written.
        A write that fails is tried again at the next poll, and its
        deliveries are held meanwhile, so that none is sent again.
        """
        if self._writing is not None:
            return self._writing
        if not (self._done or self._later):
            return succeed(None)
        done, self._done = self._done, []
        later, self._later = self._later, []

        def written(_: Any) -> None:
            self._writing = None
            self._held.difference_update(done)
            self._held.difference_update(i for i, _ in later)
            count = self._write_trouble.cleared()
            if count is not None:
                log.info("recording webhook deliveries works again")
            if self._done or self._later:
                self._flush()

        def failed(failure: Failure) -> None:
            self._writing = None
            self._done[:0] = done
            self._later[:0] = later
            if failure.check(StoreClosed):
                log.info(
                    "the store closed before {count} webhook deliveries were "
                    "recorded: they are sent again after the next start",
                    count=len(done) + len(later),
                )
                self._done.clear()
                self._later.clear()
                return
            count = self._write_trouble.happened()
            if count is not None:
                log.error(
                    "recording {count} webhook deliveries failed ({error}); tried "
                    "again at the next poll (logged at most once a minute)",
                    count=len(done) + len(later),
                    error=failure.getErrorMessage(),
                )

        d = self._store.record_deliveries(done, later)
        # Set before the callbacks, which clear it (at once, if the
        # record is written at once).
        self._writing = d
        d.addCallbacks(written, failed)
        return d
