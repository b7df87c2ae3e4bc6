"""
A holder's free resources, over plain values: what it offers less what its
leased jobs ask for, the same rule for the local executor and a worker.
"""

from dispatcher.core._capacity import free_resources, used_resources
from dispatcher.core._hub import RemoteLease, Worker
from dispatcher.model._jobs import NO_RESOURCES, JobSpec, Lease, Offer, Resources


def lease(job_id, holder="h", **resources):
    """A lease on a job that asks for C{resources}."""
    need = Resources(**resources) if resources else NO_RESOURCES
    spec = JobSpec(command=("true",), resources=need)
    return Lease(job_id, 1, 1, holder, 0.0, spec)


def test_nothing_held_leaves_everything_free():
    """A holder with no leases has all it offers free."""
    offered = Resources(4.0, 1024, 1)
    assert free_resources(offered, []) == offered
    assert used_resources([]) == NO_RESOURCES


def test_each_leased_job_takes_what_it_asks_for():
    """What leased jobs ask for is summed over every resource and taken
    from what is offered; jobs that ask for nothing take nothing."""
    leases = [lease("a", cpus=1.5, memory_mb=100), lease("b"), lease("c", cpus=0.5, gpus=1)]
    assert used_resources(leases) == Resources(2.0, 100, 1)
    assert free_resources(Resources(4.0, 1024, 2), leases) == Resources(2.0, 924, 1)


def test_free_may_go_below_nothing():
    """A holder that now offers less than its running jobs use (a worker
    that called again smaller) has less than nothing free, so that no job
    fits it."""
    free = free_resources(Resources(1.0), [lease("a", cpus=2.0)])
    assert free == Resources(-1.0)
    assert not free.covers(NO_RESOURCES)


def test_a_worker_counts_only_the_leases_it_holds():
    """A worker's held leases are those of its jobs that the hub still
    knows, and its free resources come from them by the same rule."""
    mine, other = lease("a", "w", cpus=1.0), lease("b", "x", cpus=2.0)
    leases = {
        "a": RemoteLease(mine, 10.0, False),
        "b": RemoteLease(other, 10.0, False),
    }
    worker = Worker(Offer("w", 2, Resources(cpus=3.0)), 0.0, jobs={"a", "gone"})
    assert list(worker.held(leases)) == [mine]
    assert free_resources(worker.offer.resources, worker.held(leases)) == Resources(cpus=2.0)


def test_a_worker_has_free_the_slots_its_jobs_leave():
    """A worker's free slots are its slots less the jobs it holds, and never
    fewer than none when it calls again with fewer slots than jobs."""
    worker = Worker(Offer("w", 3), 0.0, jobs={"a"})
    assert worker.free_slots == 2
    worker.offer = Offer("w", 0)
    assert worker.free_slots == 0
