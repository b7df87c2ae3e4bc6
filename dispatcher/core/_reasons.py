"""
Wait reasons the holders give: why a queued job waits although it is
queued.

The store gives a job the reasons it knows when it writes it (its
dependencies, its C{not_before}, its queue's limit of running jobs).  What
only the dispatcher knows is who could run it: a job that no holder
connected now could ever take (a task none knows, a label none has, more
CPUs than any offers) or whose queue the configuration no longer names
would wait in silence.  An L{explainer} says so when a job is shown.

A job whose end is waiting to be written (its commit failed: a full
disk) is still C{running} in the store; L{end_not_recorded} is the reason
it is shown with meanwhile, so that it does not look healthy.

Pure functions over values (L{Offer}s, L{JobSpec}s, L{Job}s): no clock,
no I/O, no reactor.
"""

from __future__ import annotations

from typing import Any, Callable, Container, Mapping, Optional, Sequence

from dispatcher.model._jobs import Job, JobSpec, JobState, Offer, format_time

# The most kinds of need an explainer remembers its verdict on.
MAX_REASONS = 1024

# How many holders' refusals a reason names before it counts the rest.
SHOWN_REFUSALS = 3


def unplaceable(spec: JobSpec, offers: Sequence[Offer]) -> Optional[str]:
    """
    Why no holder in C{offers} could ever run C{spec}, even idle, or
    C{None} when one could.
    """
    if not offers:
        return (
            "no worker is connected and this dispatcher runs no jobs itself "
            "([executor] slots = 0)"
        )
    reasons = []
    for offer in offers:
        reason = offer.refuses(spec)
        if reason is None:
            return None
        reasons.append(f"{offer.holder} {reason}")
    shown = "; ".join(reasons[:SHOWN_REFUSALS])
    more = (
        f"; and {len(reasons) - SHOWN_REFUSALS} more"
        if len(reasons) > SHOWN_REFUSALS
        else ""
    )
    return f"no connected worker can take it: {shown}{more}"


def end_not_recorded(
    ended: Optional[JobState], at: float, error: str, retry_at: Optional[float]
) -> str:
    """
    The wait reason of a job whose attempt ended (C{ended}: its state; or
    C{None}: it was given back unspent) at C{at}, but whose end the store
    has not committed yet: it failed with C{error}, and is written again at
    C{retry_at}.
    """
    what = "given back" if ended is None else f"ended ({ended.value})"
    again = "" if retry_at is None else f"; trying again at {format_time(retry_at)}"
    return (
        f"{what} at {format_time(at)}; recording the end waits for the store: "
        f"{error}{again}"
    )


def silent_worker(holder: str, since: Optional[float], until: float) -> str:
    """
    The wait reason of a job whose last attempt's lease ran out, and which
    waits for its worker C{holder}, silent since C{since}, until C{until}
    before it is recorded lost.
    """
    heard = "" if since is None else f" since {format_time(since)}"
    return (
        f"its worker {holder} has been silent{heard}; as its last attempt it "
        f"waits for the worker's result until {format_time(until)}, then it "
        "is recorded lost"
    )


def unconfigured_queue(queue: str) -> str:
    """
    The wait reason of a job whose queue the configuration no longer names.
    """
    return (
        f"its queue {queue} is not in the configuration; "
        f"it runs once [queue:{queue}] is back"
    )


def waits_for_pilot(queue: str, backend: str) -> str:
    """
    The wait reason of a job of a queue that runs on a backend none of
    whose pilots is connected now.
    """
    return (
        f"its queue {queue} runs on backend {backend}, and none of its pilots "
        "is connected yet: one is submitted while jobs wait (up to max_pilots)"
    )


def waits_for_slurm_job(queue: str, backend: str) -> str:
    """
    The wait reason of a job of a queue that runs on a backend in direct
    mode, until the Slurm job made for it starts and takes it.
    """
    return (
        f"its queue {queue} runs on backend {backend}, a Slurm job each: it waits "
        "for its own Slurm job to be submitted and to start"
    )


def fits_no_pilot(backend: str, why: str) -> str:
    """
    The wait reason of a job of a backend's queue that no pilot of that
    backend could run (C{why}: what it asks for that they lack).
    """
    return f"no pilot of backend {backend} can run it: {why}; none is submitted for it"


def explainer(
    offers: Sequence[Offer],
    queues: Container[str],
    backends: Optional[Mapping[str, str]] = None,
    max_reasons: int = MAX_REASONS,
    shapes: Optional[Mapping[str, Any]] = None,
    direct: Container[str] = frozenset(),
) -> Callable[[Job], Job]:
    """
    A function that gives a queued job the wait reason the holders in
    C{offers} and the configured C{queues} (their names) give it: its queue
    is not configured, or no holder could ever take it (L{unplaceable}).
    Any other job comes back as it is, the very object, and so does one
    whose reason is already the one it has.

    Jobs that need the same (task, resources, requirements) are judged
    once: the verdicts are remembered, up to C{max_reasons} kinds of need
    at a time, so one function may serve many calls while C{offers} stays
    true.
    """
    # A closure, not a class with __call__: it runs for every job of every
    # answer that shows jobs, and a closure's call is the cheapest.
    verdicts: dict[Any, Optional[str]] = {}

    def explain(job: Job) -> Job:
        if job.state is not JobState.QUEUED:
            return job
        spec = job.spec
        if spec.queue not in queues:
            return job.waiting(unconfigured_queue(spec.queue))
        needs = (
            spec.task, spec.resources, tuple(sorted(spec.requirements.items())),
            (spec.queue, spec.timeout) if backends else None,
        )
        reason = verdicts.get(needs, False)
        if reason is False:
            if len(verdicts) >= max_reasons:
                verdicts.clear()
            backend = backends.get(spec.queue) if backends else None
            taking = [o for o in offers if o.takes(spec.queue)] if backends else offers
            shape = shapes.get(backend) if shapes and backend is not None else None
            why = shape.refuses(spec) if shape is not None else None
            if backend is not None and backend in direct:
                reason = waits_for_slurm_job(spec.queue, backend)
            elif why is not None:
                reason = fits_no_pilot(backend, why)  # type: ignore[arg-type]
            elif backend is not None and not taking:
                reason = waits_for_pilot(spec.queue, backend)
            else:
                reason = unplaceable(spec, taking)
            verdicts[needs] = reason
        if reason is None or reason == job.wait_reason:
            return job
        return job.waiting(reason)

    return explain
