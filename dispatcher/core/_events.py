"""
The internal stream of job events: every change of a job's state is
published here once it is committed, and the scheduler (later the workers'
long-polls and clients' live updates) subscribe to it.

The store hands over the events of each write as it commits, each with
its durable id (L{publish_committed}), just before the write is answered:
job subscribers (L{subscribe}) hear of each job event; followers
(L{follow}: the API's event streams) get the write's whole list, job and
worker events in id order, and never read the store for them.

Where other dispatchers share the store (PostgreSQL), the events they
commit come too, in their place in id order (L{publish_others}): every
subscriber hears them (a wait, a follow), and the followers that ask
for them (the event streams); those that count what this dispatcher did
(its metrics, its job log) do not.
"""

from __future__ import annotations

from typing import Callable, Sequence, Union

from twisted.logger import Logger

from dispatcher.model._events import JobEvent, WorkerEvent
from dispatcher.model._jobs import Job

__all__ = ["JobEvent", "JobEvents"]

log = Logger()

Event = Union[JobEvent, WorkerEvent]


class JobEvents:
    """
    A synchronous publish/subscribe hub.  Subscribers run in the reactor
    thread, in the order they subscribed; one that raises is logged and
    does not stop the others.
    """

    def __init__(self) -> None:
        self._subscribers: list[Callable[[JobEvent], None]] = []
        self._followers: list[Callable[[Sequence[Event]], None]] = []
        self._others_followers: list[Callable[[Sequence[Event]], None]] = []

    def publish_job(self, job: Job) -> None:
        """
        Tell every subscriber that C{job} reached its current state.
        """
        self.publish(JobEvent(job.id, job.state, job))

    def subscribe(self, subscriber: Callable[[JobEvent], None]) -> Callable[[], None]:
        """
        Call C{subscriber} with every later job event; returns a function
        that ends the subscription.
        """
        self._subscribers.append(subscriber)

        def unsubscribe() -> None:
            if subscriber in self._subscribers:
                self._subscribers.remove(subscriber)

        return unsubscribe

    def follow(
        self, follower: Callable[[Sequence[Event]], None], others: bool = False
    ) -> Callable[[], None]:
        """
        Call C{follower} with the events of every later write that made any
        (a list, in id order, job and worker events), in the order of their
        commits; and, if C{others}, with those other dispatchers committed
        too, in their place; returns a function that ends it.
        """
        lists = [self._followers]
        if others:
            lists.append(self._others_followers)
        for followers in lists:
            followers.append(follower)

        def unfollow() -> None:
            for followers in lists:
                if follower in followers:
                    followers.remove(follower)

        return unfollow

    def publish(self, event: JobEvent) -> None:
        """
        Tell every subscriber of C{event}.
        """
        for subscriber in list(self._subscribers):
            try:
                subscriber(event)
            except Exception:
                log.failure("job event subscriber {subscriber!r} failed",
                            subscriber=subscriber)

    def publish_committed(self, events: Sequence[Event]) -> None:
        """
        Tell every subscriber of each job event of one write, and every
        follower of all of them.
        """
        if self._subscribers:
            for event in events:
                if type(event) is JobEvent:
                    self.publish(event)
        for follower in list(self._followers):
            try:
                follower(events)
            except Exception:
                log.failure("event follower {follower!r} failed", follower=follower)

    def publish_others(self, events: Sequence[Event]) -> None:
        """
        Tell every subscriber of each job event other dispatchers
        committed, and the followers that follow theirs of all of them
        (in id order, in their place among this dispatcher's own).
        """
        if self._subscribers:
            for event in events:
                if type(event) is JobEvent:
                    self.publish(event)
        for follower in list(self._others_followers):
            try:
                follower(events)
            except Exception:
                log.failure("event follower {follower!r} failed", follower=follower)
