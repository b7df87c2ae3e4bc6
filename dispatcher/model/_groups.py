"""
Groups of jobs as things of their own: an array (the members one
submission's C{array} made) and a batch (the jobs of one
C{POST /v1/jobs/batch}), each known by its id; what a group is made of
(L{JobGroup}), and the refusals of a group's reads and changes, and of a
wait for a job or a group.
"""

from __future__ import annotations

import enum
from typing import Mapping, Optional

import attrs

from dispatcher.model._jobs import FINAL_STATES, JobState


class GroupKind(str, enum.Enum):
    """
    What made a group: an array's members share its C{array_id}, a
    batch's jobs their C{batch_id}.
    """

    ARRAY = "array"
    BATCH = "batch"


@attrs.frozen
class JobGroup:
    """
    An array or a batch, as its members stand: how many are in each state.

    @ivar owner: the principal that submitted it (every member has the
        same), or C{None} for jobs stored before owners.
    @ivar created_at: when it was submitted (its first member's
        C{created_at}).
    @ivar counts: every L{JobState} with its number of members.
    """

    id: str
    kind: GroupKind
    owner: Optional[str]
    created_at: float
    counts: Mapping[JobState, int]

    @property
    def size(self) -> int:
        """
        How many members it has.
        """
        return sum(self.counts.values())

    @property
    def finished(self) -> int:
        """
        How many of its members are final (succeeded, failed, cancelled).
        """
        return sum(n for state, n in self.counts.items() if state in FINAL_STATES)

    @property
    def final(self) -> bool:
        """
        Whether every member is final.
        """
        return self.finished == self.size

    @property
    def succeeded(self) -> bool:
        """
        Whether every member succeeded.
        """
        return self.counts.get(JobState.SUCCEEDED, 0) == self.size


def group_counts(found: Mapping[str, int]) -> dict[JobState, int]:
    """
    Every L{JobState} with its count, from C{{state value: count}} as a
    store reads them (states without members left out).
    """
    counts = {state: 0 for state in JobState}
    for state, n in found.items():
        counts[JobState(state)] = n
    return counts


class UnknownGroup(KeyError):
    """
    No array or batch of this kind has this id (or, to a principal that
    sees its own jobs alone, another owner's does).
    """

    def __init__(self, kind: GroupKind, group_id: str) -> None:
        super().__init__(group_id)
        self.kind = kind
        self.group_id = group_id

    def __str__(self) -> str:
        return f"no {self.kind.value} has the id {self.group_id!r}"


class NothingToChange(Exception):
    """
    A cancel of a group none of whose members is unfinished, or a retry of
    one none of whose members failed or was cancelled: nothing changed.
    """


class TooManyWaits(Exception):
    """
    As many requests wait (C{?wait=}) as the dispatcher keeps at once
    (C{[api] max_waits}); this one was not taken.
    """

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"{limit} requests are waiting already ([api] max_waits); ask without "
            "wait, or again shortly"
        )
        self.limit = limit
