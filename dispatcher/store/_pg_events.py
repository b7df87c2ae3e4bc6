"""
What several dispatchers on one PostgreSQL database hear of each other:
the events the others commit (L{EventFeed}), woken by C{LISTEN/NOTIFY}
(L{NotifyListener}) and read on a timer as well, so that a lost
notification or a lost listening connection strands nothing.

Every group that stores events sends one notification as it commits
(C{NOTIFY dispatcher_events}, in the group's transaction: delivered only
if it commits), its payload the sender's token and the group's last
event id (and C{cancel} if it stored a client's cancel of a running job,
which changes no state until its holder stops it).  Each dispatcher's
listener hears the others' and asks its feed to read the stored events
after the last it published; the feed also reads them every
C{poll_interval} seconds whatever it heard.  A dispatcher alone sends no
notification: each poll counts the others' listening connections, and a
listener that begins says so at once (C{listening}).

Each dispatcher publishes every committed event once, in id order, with
no gap, whoever committed it: its own as its writer commits them
(L{dispatcher.store._writer.GroupWriter.committed}), the others' as the
feed reads them.  Event ids are numbered under the groups' write lock
(L{dispatcher.store._pg_schema.WRITE_LOCK}), so they commit in id order,
and the feed keeps the greatest id published (C{delivered}):

  - A group of its own whose first id is past C{delivered + 1} reads the
    others' events between (they committed before the group took the
    lock) in its transaction, and they are published before its own.
  - A read of the feed that comes back while a group of its own is
    between its commit and its answers is held until that group's events
    are published (the read may hold them: they are not the others'),
    then given out less what was published meanwhile (by id).

So a follower (an event stream, a wait) sees one sequence, whoever wrote
it; and a dispatcher's scheduler hears of the jobs the others queued
(and of the others' ends, for a queue's limit) as it hears of its own.
"""

from __future__ import annotations

import secrets
import threading
from typing import Any, Callable, Optional, Sequence

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from dispatcher._throttle import Throttle
from dispatcher.model._events import SameChange

__all__ = ["CHANNEL", "EventFeed", "NotifyListener", "last_id", "notify_statement"]

log = Logger()

# The channel every dispatcher on a database notifies and listens on.
CHANNEL = "dispatcher_events"

# How many events one read of the feed takes.
PAGE = 1000

# Seconds the listener waits for a notification before it looks whether
# it is to stop (its connection cannot be woken from another thread).
LISTEN_TURN = 0.25

# Seconds between attempts to connect again, at first and at most.
RECONNECT_FIRST = 0.1
RECONNECT_MOST = 5.0


def last_id(events: Sequence[Any]) -> int:
    """
    The id of the last of one write's C{events} (a L{SameChange} holds
    several).
    """
    last = events[-1] if type(events) is not SameChange else None
    if last is None:
        return events.first_id + len(events) - 1  # type: ignore[attr-defined]
    return last.id


def first_id(events: Sequence[Any]) -> int:
    """
    The id of the first of one write's C{events}.
    """
    if type(events) is SameChange:
        return events.first_id
    return events[0].id


def notify_statement(token: str, last: int, cancel: bool = False) -> str:
    """
    The statement that tells the listeners a group committed events up to
    C{last} (C{token}: who sent it; both are the feed's own, never a
    client's), and, with C{cancel}, a client's cancel of a running job.
    """
    return f"NOTIFY {CHANNEL}, '{token} {int(last)}{' cancel' if cancel else ''}'"


class NotifyListener:
    """
    A thread of its own, with a connection of its own, that C{LISTEN}s on
    L{CHANNEL} and calls C{heard} in the reactor thread with the greatest
    event id another dispatcher said it committed, and whether one said
    it stored a cancel of a running job (at most one call waiting at a
    time: notifications that come meanwhile are folded into it).  A
    connection lost is made again, after a back-off; each new connection
    calls C{heard} with C{None} and C{True} (what was said while none was
    listening is unknown).

    @param connect: makes the listening connection (a psycopg one, in
        autocommit mode).
    @param token: this dispatcher's own token: its notifications are not
        told.
    """

    def __init__(
        self,
        reactor: Any,
        connect: Callable[[], Any],
        token: str,
        heard: Callable[[Optional[int], bool], None],
        clock: Any,
    ) -> None:
        self._reactor = reactor
        self._connect = connect
        self._token = token
        self._heard = heard
        self._stopping = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._stopped: Optional[Deferred] = None
        self._lock = threading.Lock()
        # The greatest id heard and not yet told, and whether a call is
        # on its way to the reactor.
        self._newest: Optional[int] = None
        self._unknown = False
        self._cancel = False
        self._telling = False
        self._trouble = Throttle(clock)
        # How many connections listened, and the server's process of the
        # last (none yet: 0).
        self.connections = 0
        self.backend = 0

    def start(self) -> None:
        """
        Start listening.
        """
        self._stopped = Deferred()
        self._thread = threading.Thread(target=self._run, name="store-listener", daemon=True)
        self._thread.start()

    def stop(self) -> Deferred:
        """
        Stop listening; fires once the thread has closed its connection.
        """
        if self._thread is None or self._stopped is None:
            return succeed(None)
        self._stopping.set()
        return self._stopped

    def _run(self) -> None:
        wait = RECONNECT_FIRST
        try:
            while not self._stopping.is_set():
                try:
                    conn = self._connect()
                except Exception as e:
                    # (Whatever it was, the polls go on meanwhile.)
                    self._reactor.callFromThread(self._failed, e)
                    self._stopping.wait(wait)
                    wait = min(wait * 2, RECONNECT_MOST)
                    continue
                try:
                    conn.execute(f"LISTEN {CHANNEL}")
                    # Said to the others, who notify only while someone
                    # listens (EventFeed.others_listening).
                    conn.execute(f"NOTIFY {CHANNEL}, '{self._token} 0 listening'")
                    self.backend = conn.info.backend_pid
                    self.connections += 1
                    wait = RECONNECT_FIRST
                    self._reactor.callFromThread(self._listening)
                    self._tell(None)
                    while not self._stopping.is_set():
                        for notify in conn.notifies(timeout=LISTEN_TURN):
                            self._notified(notify.payload)
                except Exception as e:
                    self._reactor.callFromThread(self._failed, e)
                    self._stopping.wait(wait)
                    wait = min(wait * 2, RECONNECT_MOST)
                finally:
                    conn.close()
        finally:
            self._reactor.callFromThread(self._stopped.callback, None)  # type: ignore[union-attr]

    def _notified(self, payload: str) -> None:
        words = payload.split(" ")
        if words[0] == self._token:
            return
        try:
            newest: Optional[int] = int(words[1])
        except (IndexError, ValueError):
            # Not a dispatcher's: read what is there.
            newest = None
        self._tell(newest, words[2:] == ["cancel"] or newest is None)

    def _tell(self, newest: Optional[int], cancel: bool = True) -> None:
        # On the listener's thread: fold into the call on its way, if any.
        with self._lock:
            if newest is None:
                self._unknown = True
            elif self._newest is None or newest > self._newest:
                self._newest = newest
            self._cancel = self._cancel or cancel
            if self._telling:
                return
            self._telling = True
        self._reactor.callFromThread(self._told)

    def _told(self) -> None:
        with self._lock:
            newest, unknown, cancel = self._newest, self._unknown, self._cancel
            self._newest, self._unknown, self._cancel = None, False, False
            self._telling = False
        self._heard(None if unknown else newest, cancel)

    def _failed(self, error: Exception) -> None:
        count = self._trouble.happened()
        if count is not None:
            log.warn(
                "listening for other dispatchers' commits failed ({error}); connecting "
                "again, and reading their events every poll meanwhile ({count} failures "
                "since the last line; logged at most once a minute)",
                error=str(error).strip(),
                count=count,
            )

    def _listening(self) -> None:
        count = self._trouble.cleared()
        if count is not None:
            log.info("listening for other dispatchers' commits again")


class EventFeed:
    """
    The events other dispatchers commit, published in id order between
    this dispatcher's own (see the module's docstring).  Its methods run
    in the reactor thread, but for L{delivered}, which the writer thread
    reads while a group is in flight (when nothing changes it).

    @param read: C{(after, limit) -> Deferred} firing with an
        L{dispatcher.store._events.EventPage} (the store's read).
    @param clock: the clock of the polls (and of the listener's log
        lines): the C{clock} attribute.
    @param poll_interval: seconds between reads whatever was heard.
    @param count_listeners: C{(backend) -> Deferred} firing with how many
        dispatchers listen on the database other than the listening
        connection C{backend} (0: none); read at every poll, for
        L{others_listening}.
    @ivar own: told each write's own events (the store's
        C{follow_events} listener).
    @ivar others: told the others' events, a list at a time (the store's
        C{follow_others} listener); none: the feed does not run.
    @ivar cancels: told (no arguments) when another dispatcher may have
        stored a cancel of a running job (the store's C{follow_cancels}
        listener): on its notification, and at every poll.
    @ivar delivered: the greatest event id published.
    @ivar token: this dispatcher's, in its notifications.
    @ivar others_listening: whether another dispatcher listened at the
        last poll (groups notify only then; read by the writer thread).
    """

    def __init__(
        self,
        read: Callable[[int, int], Deferred],
        clock: Any,
        poll_interval: float,
        count_listeners: Optional[Callable[[int], Deferred]] = None,
    ) -> None:
        self._read = read
        self._count_listeners = count_listeners
        # Whether another dispatcher listens (as of the last poll): none,
        # and groups notify no one (the other polls at its start anyway).
        self.others_listening = True
        self._counting = False
        self.clock = clock
        self.poll_interval = poll_interval
        self.own: Optional[Callable[[Sequence[Any]], None]] = None
        self.others: Optional[Callable[[list], None]] = None
        self.cancels: Optional[Callable[[], None]] = None
        self.delivered = 0
        self.token = secrets.token_hex(8)
        self.listener: Optional[NotifyListener] = None
        self.running = False
        # A group of the writer's own is between its dispatch and its
        # answers: reads wait for its events to be published.
        self.writing = False
        self._parked: list[Any] = []
        self._parked_again = False
        self._parked_full = False
        self._reading = False
        self._again = False
        self._poll: Optional[LoopingCall] = None
        self._trouble = Throttle(clock)
        # How many reads of the others' events were made.
        self.reads = 0

    @property
    def following(self) -> bool:
        """
        Whether anyone listens for the others' events.
        """
        return self.others is not None

    def start(self, delivered: int, listener: Optional[NotifyListener]) -> None:
        """
        Publish the others' events committed after C{delivered} from now
        on: read them on every notification C{listener} hears, and every
        C{poll_interval} seconds.
        """
        if not self.following:
            return
        self.delivered = delivered
        self.running = True
        self._poll = LoopingCall(self._polled)
        self._poll.clock = self.clock
        self._poll.start(self.poll_interval, now=False)
        self.listener = listener
        if listener is not None:
            listener.start()

    def _polled(self) -> None:
        self.heard(None, True)
        if self.listener is None or self._count_listeners is None or self._counting:
            return
        self._counting = True

        def counted(count: int) -> None:
            self._counting = False
            self.others_listening = count > 0

        def failed(failure: Failure) -> None:
            # Notified meanwhile, as if someone listened.
            self._counting = False
            self.others_listening = True

        self._count_listeners(self.listener.backend).addCallbacks(counted, failed)

    def stop(self) -> Deferred:
        """
        Read no more; fires once the listener has stopped.
        """
        self.running = False
        if self._poll is not None and self._poll.running:
            self._poll.stop()
        if self.listener is not None:
            return self.listener.stop()
        return succeed(None)

    # What the writer tells

    def notified(self, newest: Optional[int], cancel: bool) -> None:
        """
        The listener heard another dispatcher (see L{heard}): someone
        listens, at least the one that just said so.
        """
        self.others_listening = True
        self.heard(newest, cancel)

    def committed(self, events: Sequence[Any]) -> None:
        """
        One write's own events committed (the writer's C{committed}):
        published now.
        """
        last = last_id(events)
        if last > self.delivered:
            self.delivered = last
        if self.own is not None:
            self.own(events)

    def publish(self, events: Sequence[Any]) -> int:
        """
        Publish the others' C{events} (in id order) that are past
        L{delivered}; how many that was.
        """
        if not events or self.others is None:
            return 0
        delivered = self.delivered
        if events[-1].id <= delivered:
            return 0
        start = delivered
        fresh = []
        for event in events:
            # (Reads held back while a group was in flight may overlap.)
            if event.id > delivered:
                fresh.append(event)
                delivered = event.id
        if fresh[0].id != start + 1:
            # Only the removal of old events makes a gap: a dispatcher
            # that fell behind by more than their retention.
            log.warn(
                "the events {first} to {last} were removed before this dispatcher "
                "read them; its event streams skip them",
                first=start + 1,
                last=fresh[0].id - 1,
            )
        self.delivered = delivered
        self.others(fresh)
        return len(fresh)

    def group_starting(self) -> None:
        """
        A group of the writer's own goes to the writer thread: what reads
        held back can be published now (the last group's own events are).
        """
        self.unpark()
        self.writing = True

    def group_answered(self) -> None:
        """
        The writer has published a group's events and has none in flight.
        """
        self.writing = False
        self.unpark()

    def unpark(self) -> None:
        """
        Publish what a read brought while a group was in flight.
        """
        if not self._parked:
            return
        parked, self._parked = self._parked, []
        again, self._parked_again = self._parked_again, False
        full, self._parked_full = self._parked_full, False
        self._published(self.publish(parked), again, full)

    def _published(self, count: int, again: bool, full: bool) -> None:
        # Read again if asked to meanwhile, or if a full page brought the
        # others' events (not if it held only this store's own, which a
        # lone dispatcher's big groups would make a chain of reads).
        if again or (full and count):
            self.heard(None)

    # Reads

    def heard(self, newest: Optional[int], cancel: bool = False) -> None:
        """
        Another dispatcher committed events up to C{newest} (C{None}: may
        have): read them unless they are published already; and, with
        C{cancel}, may have stored a cancel of a running job.
        """
        if not self.running:
            return
        if cancel and self.cancels is not None:
            try:
                self.cancels()
            except Exception:
                log.failure("telling of others' cancels failed")
        if newest is not None and newest <= self.delivered:
            return
        if self._parked:
            # A read waits for a group's answers: read again after them.
            self._parked_again = True
            return
        if self._reading:
            self._again = True
            return
        self._reading = True
        self.reads += 1
        d = self._read(self.delivered, PAGE)
        d.addCallbacks(self._got, self._failed)

    def _got(self, page: Any) -> None:
        self._reading = False
        again, full = self._again, len(page.events) >= PAGE
        self._again = False
        self._trouble_cleared()
        if self.writing:
            self._parked.extend(page.events)
            self._parked_again = self._parked_again or again
            self._parked_full = self._parked_full or full
            return
        self._published(self.publish(page.events), again, full)

    def _failed(self, failure: Failure) -> None:
        self._reading = False
        self._again = False
        if not self.running:
            # The store closes.
            return
        count = self._trouble.happened()
        if count is not None:
            log.warn(
                "reading other dispatchers' events failed ({error}); trying again at "
                "the next poll ({count} failures since the last line; logged at most "
                "once a minute)",
                error=failure.getErrorMessage(),
                count=count,
            )

    def _trouble_cleared(self) -> None:
        count = self._trouble.cleared()
        if count is not None:
            log.info("reading other dispatchers' events works again")
