"""
The internal stream of job events: every change of a job's state is
published here once it is committed, and the scheduler (later the workers'
long-polls and clients' live updates) subscribe to it.
"""

from __future__ import annotations

from typing import Callable, Optional

import attrs
from twisted.logger import Logger

from dispatcher.model._jobs import Job, JobState

log = Logger()


@attrs.frozen
class JobEvent:
    """
    A job reached a new state, as committed; C{job} is the whole job where
    the change produced it (a claim produces only leases).
    """

    job_id: str
    state: JobState
    job: Optional[Job] = None


class JobEvents:
    """
    A synchronous publish/subscribe hub.  Subscribers run in the reactor
    thread, in the order they subscribed; one that raises is logged and
    does not stop the others.
    """

    def __init__(self) -> None:
        self._subscribers: list[Callable[[JobEvent], None]] = []

    def publish_job(self, job: Job) -> None:
        """
        Tell every subscriber that C{job} reached its current state.
        """
        self.publish(JobEvent(job.id, job.state, job))

    def subscribe(self, subscriber: Callable[[JobEvent], None]) -> Callable[[], None]:
        """
        Call C{subscriber} with every later event; returns a function that
        ends the subscription.
        """
        self._subscribers.append(subscriber)

        def unsubscribe() -> None:
            if subscriber in self._subscribers:
                self._subscribers.remove(subscriber)

        return unsubscribe

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
