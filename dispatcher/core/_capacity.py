"""
A holder's capacity: what it offers, less what the jobs it holds leases on
ask for.  The local executor and a remote worker are both holders, and a
claim for either takes only the jobs that fit what this says is free.

(Free slots are counted where they are handed out: the L{Scheduler}
counts the local executor's as claims and ends come and go; a worker says
how many it wants in each long-poll, bounded by its slots less the jobs it
holds, L{Worker.free_slots}.)
"""

from __future__ import annotations

from typing import Iterable

from dispatcher.model._jobs import NO_RESOURCES, Lease, Resources


def used_resources(leases: Iterable[Lease]) -> Resources:
    """
    What the jobs of C{leases} ask for, together.
    """
    used = NO_RESOURCES
    for lease in leases:
        need = lease.spec.resources
        # Most jobs ask for nothing: adding nothing would make a new value
        # for each of them, at every claim.
        if need is not NO_RESOURCES:
            used = used + need
    return used


def free_resources(offered: Resources, leases: Iterable[Lease]) -> Resources:
    """
    What a holder that offers C{offered} has free while it holds C{leases}.
    """
    return offered - used_resources(leases)
