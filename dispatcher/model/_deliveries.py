"""
A webhook's delivery, as the store's outbox holds it: one change of state
of a job that names C{notify}, written in the transaction that made the
change, and posted by the delivery service until it is delivered or given
up.
"""

from __future__ import annotations

from typing import Optional

import attrs

from dispatcher.model._jobs import JobState


@attrs.frozen
class Delivery:
    """
    One change of a job's state to post to the job's webhook.

    @ivar id: the outbox row's own number: increasing, never used twice;
        sent as C{Dispatcher-Event-Id} and as the event's C{id}.
    @ivar job_id: the job whose state changed.
    @ivar url: where to post it (the job's C{notify.url}).
    @ivar at: when the change was committed (seconds since the epoch).
    @ivar state: the job's new state.
    @ivar previous: its state before (C{None}: the job was just made).
    @ivar owner: the job's owner (C{None}: stored before jobs had owners).
    @ivar queue: the job's queue.
    @ivar name: the job's name, if it has one.
    @ivar array_id: the array the job is a member of, if any.
    @ivar batch_id: the batch the job was submitted in, if it has an id.
    @ivar attempt: the number of the job's latest attempt (C{None}: none
        yet).
    @ivar exit_code: the job's exit code as it stood after the change.
    @ivar error: the job's error as it stood after the change.
    @ivar tries: how many times it was posted without being delivered.
    """

    id: int
    job_id: str
    url: str
    at: float
    state: JobState
    previous: Optional[JobState]
    owner: Optional[str]
    queue: str
    name: Optional[str]
    array_id: Optional[str]
    batch_id: Optional[str]
    attempt: Optional[int]
    exit_code: Optional[int]
    error: Optional[str]
    tries: int = 0
