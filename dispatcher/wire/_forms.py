"""
The API's forms of the model's values: a job as the API shows it, a lease
as a worker gets it, the verdict on a worker's heartbeat or report item, a
worker as C{GET /v1/workers} shows it, resources as a worker's description
shows them, a webhook delivery as it is posted.  The model has no JSON; these functions are the one place its
values meet the wire types of L{dispatcher.wire._types}.  (What the store
keeps is the store's own form, L{dispatcher.store._stored}.)
"""

from __future__ import annotations

from typing import Any

from msgspec import UNSET

from dispatcher.model._groups import JobGroup as Group
from dispatcher.model._jobs import (
    NO_RESOURCES,
    Attempt,
    InputSpec,
    Job,
    JobSpec,
    JobState,
    Lease,
    Resources,
    format_time,
)
from dispatcher.model._deliveries import Delivery
from dispatcher.model._jobs import Limits as ModelLimits
from dispatcher.model._jobs import Notify as ModelNotify
from dispatcher.model._workers import ConnectedWorker, LeaseEnd, LeaseVerdict
from dispatcher.wire._types import (
    AttemptView,
    FreeCapacity,
    InputView,
    JobEvent,
    JobGroup,
    JobSummary,
    JobView,
    LeaseGrant,
    LeaseSpec,
    LeaseStatus,
    Limits,
    Notify,
    ResourcesView,
    WorkerView,
)

# Why a worker's write about a lease is refused, as the worker reads it
# (docs/worker-protocol.md).
REFUSALS = {
    LeaseEnd.CANCELLED: "the job was cancelled; stop it",
    LeaseEnd.EXPIRED: "the lease expired without a heartbeat; the job went back to the "
    "queue, or failed if it had no attempt left; stop it",
    LeaseEnd.REPORTED: "its result is already recorded",
    LeaseEnd.SUPERSEDED: "this lease is no longer the job's current one; stop it",
}


def _input_view(spec: InputSpec) -> InputView:
    return InputView(spec.url, spec.path, UNSET if spec.sha256 is None else spec.sha256)


def _resources_view(resources: Resources) -> ResourcesView:
    return ResourcesView(resources.cpus, resources.memory_mb, resources.gpus)


def limits_form(limits: ModelLimits) -> Limits:
    """
    The wire form of an attempt's L{ModelLimits}.
    """
    return Limits(limits.memory_mb, limits.processes, limits.enforced)


def limits_of(form: Limits) -> ModelLimits:
    """
    The model's L{ModelLimits} of their wire form.
    """
    return ModelLimits(form.memory_mb, form.processes, form.enforced)


def _attempt_view(attempt: Attempt) -> AttemptView:
    view = AttemptView(
        attempt.number,
        attempt.holder,
        format_time(attempt.started_at),
        format_time(attempt.finished_at),
        attempt.exit_code,
        attempt.error,
    )
    if attempt.limits is not None:
        view.limits = limits_form(attempt.limits)
    if attempt.log_cut:
        view.log_cut = list(attempt.log_cut)
    return view


def _set_work(target: Any, spec: JobSpec, always_env: bool) -> None:
    """
    Set what a job runs on a L{JobView} or a L{LeaseSpec}: its command and
    environment (an empty one only if C{always_env}), or its task and
    arguments; and its inputs, if it has any.
    """
    if spec.command is not None:
        target.command = list(spec.command)
        if always_env or spec.env:
            target.env = dict(spec.env)
    else:
        target.task = spec.task
        target.args = list(spec.args)
        target.kwargs = dict(spec.kwargs)
    if spec.inputs:
        target.inputs = [_input_view(i) for i in spec.inputs]


def job_view(job: Job) -> JobView:
    """
    A job as the API shows it.
    """
    spec = job.spec
    attempts = job.attempts
    view = JobView(
        job.id,
        job.state,
        spec.name,
        dict(spec.labels),
        format_time(job.created_at),
        format_time(job.started_at),
        format_time(job.finished_at),
        job.exit_code,
        job.result,
        job.error,
        job.wait_reason,
        [_attempt_view(a) for a in attempts] if attempts else [],
        attempts[-1].holder if attempts else None,
        job.owner,
    )
    # Set after: a view is made for every answer that shows a job, and
    # keywords for the kind's fields cost a dict each time.
    _set_work(view, spec, always_env=True)
    view.priority = spec.priority
    view.queue = spec.queue
    view.timeout = spec.timeout
    view.max_attempts = spec.max_attempts
    view.retry_delay = spec.retry_delay
    if spec.not_before is not None:
        view.not_before = format_time(spec.not_before)
    if spec.depends_on:
        view.depends_on = list(spec.depends_on)
    view.array_id = spec.array_id
    view.array_index = spec.array_index
    if spec.batch_id is not None:
        view.batch_id = spec.batch_id
    resources = spec.resources
    if resources is not NO_RESOURCES:
        view.resources = ResourcesView(resources.cpus, resources.memory_mb, resources.gpus)
    if spec.requirements:
        view.requirements = dict(spec.requirements)
    if spec.notify is not None:
        view.notify = notify_view(spec.notify)
    return view


def notify_view(notify: ModelNotify) -> Notify:
    """
    A job's webhook as the API shows it: its states in the order the job
    states are declared.
    """
    return Notify(notify.url, [state for state in JobState if state in notify.events])


def job_event(delivery: Delivery) -> JobEvent:
    """
    The L{JobEvent} a webhook delivery posts.
    """
    return JobEvent(
        delivery.id,
        format_time(delivery.at),
        delivery.job_id,
        delivery.state,
        delivery.previous,
        delivery.owner,
        delivery.queue,
        delivery.name,
        delivery.array_id,
        delivery.batch_id,
        delivery.attempt,
        delivery.exit_code,
        delivery.error,
    )


def job_summary(job: Job) -> JobSummary:
    """
    What a request that makes several jobs answers for each unless asked
    for more: its id and state, and its place in an array if it has one.
    """
    spec = job.spec
    if spec.array_id is None:
        summary = JobSummary(job.id, job.state)
    else:
        summary = JobSummary(job.id, job.state, spec.array_id, spec.array_index)
    if spec.batch_id is not None:
        summary.batch_id = spec.batch_id
    return summary


def group_view(group: Group) -> JobGroup:
    """
    An array or a batch as C{GET /v1/arrays/{id}} and
    C{GET /v1/batches/{id}} show it.
    """
    return JobGroup(
        group.id,
        group.kind.value,
        group.owner,
        format_time(group.created_at),
        group.size,
        dict(group.counts),
        group.finished,
        group.final,
        group.succeeded,
    )


def lease_grant(lease: Lease, token: str) -> LeaseGrant:
    """
    A lease as the dispatcher hands it to a remote worker, with C{token},
    the lease's token as the worker is given it (L{LeaseTokens.seal}).
    """
    spec = lease.spec
    wire = LeaseSpec(
        name=spec.name,
        labels=dict(spec.labels),
        timeout=spec.timeout,
        array_id=spec.array_id,
        array_index=spec.array_index,
    )
    _set_work(wire, spec, always_env=False)
    if spec.resources != NO_RESOURCES:
        wire.resources = _resources_view(spec.resources)
    if spec.requirements:
        wire.requirements = dict(spec.requirements)
    return LeaseGrant(
        lease.job_id,
        lease.attempt,
        token,
        lease.holder,
        format_time(lease.expires_at),
        wire,
        lease.owner,
    )


def lease_status(verdict: LeaseVerdict, token: str) -> LeaseStatus:
    """
    One item of the answer to a heartbeat or a report: C{ok} (with the new
    expiry, for a heartbeat), or refused with its reason and the message
    the worker logs; C{token} is the item's token as the worker sent it.
    """
    reason = verdict.refused
    if reason is not None:
        return LeaseStatus(
            verdict.job_id,
            token,
            False,
            status=409,
            reason=reason.value,
            message=REFUSALS[reason],
        )
    if verdict.expires is None:
        return LeaseStatus(verdict.job_id, token, True)
    return LeaseStatus(verdict.job_id, token, True, format_time(verdict.expires))


def worker_view(worker: ConnectedWorker) -> WorkerView:
    """
    A connected worker as C{GET /v1/workers} shows it.
    """
    offer = worker.offer
    free = worker.free
    return WorkerView(
        offer.holder,
        offer.slots,
        _resources_view(offer.resources),
        dict(offer.labels),
        sorted(offer.tasks or ()),
        FreeCapacity(worker.free_slots, free.cpus, free.memory_mb, free.gpus),
        list(worker.running),
        worker.waiting_for_work,
        format_time(worker.last_contact),
        worker.name_shared,
        offer.prefetch,
    )


def _unset(value: Any, default: Any) -> Any:
    return default if value is UNSET else value


def lease_from_grant(grant: LeaseGrant, expires_at: float) -> Lease:
    """
    The L{Lease} a worker got as a L{LeaseGrant}; C{expires_at} is on the
    worker's own clock (the dispatcher's times are not comparable).
    """
    wire = grant.spec
    command = _unset(wire.command, None)
    resources = _unset(wire.resources, None)
    spec = JobSpec(
        command=tuple(command) if command is not None else None,
        task=_unset(wire.task, None),
        args=tuple(_unset(wire.args, ())),
        kwargs=dict(_unset(wire.kwargs, {})),
        env=dict(_unset(wire.env, {})),
        inputs=tuple(
            InputSpec(i.url, i.path, _unset(i.sha256, None)) for i in _unset(wire.inputs, ())
        ),
        resources=NO_RESOURCES
        if resources is None
        else Resources(resources.cpus, resources.memory_mb, resources.gpus),
        requirements=dict(_unset(wire.requirements, {})),
        name=wire.name,
        labels=dict(wire.labels),
        timeout=wire.timeout,
        array_id=wire.array_id,
        array_index=wire.array_index,
    )
    return Lease(
        grant.job_id, grant.attempt, grant.token, grant.holder, expires_at, spec, grant.owner
    )
