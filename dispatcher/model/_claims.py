"""
The claim policy: which queued jobs a lease holder gets.

Highest priority first, oldest first within a priority; among queues whose
best jobs share a priority, the queues take turns; a queue at its limit of
running jobs gives none; a job the holder could not run (a task it does not
know, a label it lacks) or that does not fit its free resources is passed
over, and at most L{MAX_SKIPPED} are passed over in one claim.

It lives in the model, not in the dispatcher's core, because a store
applies it inside the transaction that takes the jobs, and a store may
import the model but not the core: a store's query gives each queue's
queued jobs in order, read lazily, and L{choose_jobs} decides over them.
It does no I/O of its own.
"""

from __future__ import annotations

from typing import Callable, Generic, Iterator, Mapping, Optional, Sequence, TypeVar

import attrs

from dispatcher.model._jobs import JobSpec, Offer, Resources

# How many queued jobs a claim passes over (they do not fit the holder)
# before it gives up: a bound on one claim's work.
MAX_SKIPPED = 1000

Row = TypeVar("Row")


# Not frozen: made once per claim, on the hot path, where a frozen class's
# slower construction showed.
@attrs.define
class Choice(Generic[Row]):
    """
    What L{choose_jobs} chose.

    @ivar chosen: the jobs to lease, as C{(row, spec)}, in the order chosen.
    @ivar taken: how many jobs each queue gave.
    @ivar skipped: how many queued jobs were passed over because they did
        not fit the holder.
    @ivar drained: whether every queue read was read to its end: no job was
        left queued in them (none passed over, none left for want of room).
    @ivar turn: the index in the queues' order of the queue whose turn is
        next among equal priorities.
    """

    chosen: list[tuple[Row, JobSpec]]
    taken: dict[str, int]
    skipped: int
    drained: bool
    turn: int


def room_in_queues(
    queues: Sequence[str],
    limits: Mapping[str, int],
    running: Mapping[str, int],
    capacity: int,
) -> dict[str, int]:
    """
    How many jobs each queue may give a claim of C{capacity}: all of it,
    or, in a queue with a limit of running jobs (C{limits}, 0 for none),
    what is left under the limit with C{running} jobs (staging or running)
    in it.  A queue at or over its limit has no room (0 or less).
    """
    room = {}
    for queue in queues:
        limit = limits.get(queue, 0)
        room[queue] = capacity if not limit else min(capacity, limit - running.get(queue, 0))
    return room


def queues_at_limit(limits: Mapping[str, int], running: Mapping[str, int]) -> dict[str, int]:
    """
    The queues whose C{running} jobs have reached their limit, with the
    limit: their queued jobs wait for one to end.
    """
    return {
        queue: limit
        for queue, limit in limits.items()
        if limit and running.get(queue, 0) >= limit
    }


def choose_jobs(
    queued: Mapping[str, Iterator[Row]],
    room: Mapping[str, int],
    queues: Sequence[str],
    turn: int,
    offer: Offer,
    free: Resources,
    capacity: int,
    priority_of: Callable[[Row], int],
    spec_of: Callable[[Row], JobSpec],
    max_skipped: int = MAX_SKIPPED,
) -> Choice[Row]:
    """
    Choose up to C{capacity} of the queued jobs for C{offer}'s holder.

    @param queued: for each queue that may give jobs, its queued jobs,
        highest priority first and oldest first within a priority; read
        only as far as the choice needs (a database cursor serves).
    @param room: how many jobs each queue may give (L{room_in_queues}).
    @param queues: every queue, in the order they take turns.
    @param turn: the index in C{queues} of the queue whose turn comes first.
    @param offer: what the holder can run.
    @param free: the holder's resources less what its running jobs use.
    @param priority_of: a row's priority; read before its spec, which is
        only made for the rows taken off the head of a queue.
    @param spec_of: a row's L{JobSpec}.
    @param max_skipped: how many jobs that do not fit may be passed over
        before the claim gives up.
    """
    heads: dict[str, Row] = {}
    # A queue the holder does not take from (it belongs to a backend, or
    # the holder is a backend's pilot) is looked into for one job alone:
    # one there counts as passed over, so that the holder rests and the
    # job waits for a holder that takes it.
    others = 0
    restricted = offer.queues is not None or bool(offer.excluded)
    for queue, rows in queued.items():
        row = next(rows, None)
        if row is not None:
            if restricted and not offer.takes(queue):
                others += 1
            else:
                heads[queue] = row
    order = [*queues[turn:], *queues[:turn]]
    chosen: list[tuple[Row, JobSpec]] = []
    taken: dict[str, int] = {}
    skipped = 0
    # A queue left for want of room may still hold jobs.
    left = False
    several = len(queues) > 1
    while heads and len(chosen) < capacity and skipped < max_skipped:
        if len(heads) == 1:
            (queue,) = heads
        else:
            best = max(map(priority_of, heads.values()))
            queue = next(q for q in order if q in heads and priority_of(heads[q]) == best)
        row = heads[queue]
        following: Optional[Row] = next(queued[queue], None)
        if following is None:
            del heads[queue]
        else:
            heads[queue] = following
        spec = spec_of(row)
        if offer.refuses(spec) is not None or not free.covers(spec.resources):
            skipped += 1
            continue
        chosen.append((row, spec))
        free = free - spec.resources
        taken[queue] = taken.get(queue, 0) + 1
        if taken[queue] >= room[queue] and queue in heads:
            del heads[queue]
            left = True
        if several:
            # Among equal priorities the next turn is the next queue's.
            turn = (queues.index(queue) + 1) % len(queues)
            order = [*queues[turn:], *queues[:turn]]
    skipped += others
    drained = not heads and not left and not skipped
    return Choice(chosen, taken, skipped, drained, turn)
