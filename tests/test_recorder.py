"""
A remote worker's result goes through the same recorder as a local end: a
commit that fails is written again until it lands, and until then the
worker's lease stays its own.  A real daemon on loopback, the real SQLite
store (its C{finish} made to fail as a full disk fails it), and a Clock for
the waits between writes.
"""

import pytest_twisted
from twisted.internet.defer import ensureDeferred, fail
from twisted.internet.task import Clock

from dispatcher.model._jobs import StoreClosed
from dispatcher.store._results import CommitFailed

from .conftest import until
from .postgres import one_dispatcher_only
from .test_leases import (  # noqa: F401 (make_pure is a fixture)
    heartbeat,
    lease,
    make_pure,
    report,
    result,
    until_waiting_for_work,
    worker,
)


def full_disk():
    """The failure of a store whose disk is full: its commit failed."""
    return fail(CommitFailed("database or disk is full"))


def failing_finish(store, clock, job_id, failures, error=full_disk):
    """Make the store's finish of C{job_id} fail C{failures} times, then
    write; return the clock's time at each call and the writes of it that
    went through."""
    real = store.finish
    calls, landed = [], []

    def finish(lease, outcome, now):
        if lease.job_id != job_id:
            return real(lease, outcome, now)
        calls.append(clock.seconds())
        if len(calls) <= failures:
            return error()
        landed.append(lease.job_id)
        return real(lease, outcome, now)

    store.finish = finish
    return calls, landed


async def report_failing(daemon, clock, failures, slots=8):
    """Submit an `add` job, make its result's commit fail C{failures} times,
    lease it to worker "w" and report its result, without waiting for the
    answer; fire once the first commit has been tried, with the job, the
    worker, its lease, the report's answer to come, and failing_finish's
    lists."""
    who = worker("w", slots=slots, tasks=["add"])
    job = await daemon.submit({"task": "add", "args": [2, 3]})
    calls, landed = failing_finish(daemon.service.store, clock, job["id"], failures)
    (granted,) = await lease(daemon, who)
    first = ensureDeferred(report(daemon, who, [result(granted, exit_code=None, result=5)]))
    await until(lambda: calls)
    return job, who, granted, first, calls, landed


@pytest_twisted.ensureDeferred
async def test_a_remote_result_whose_commit_fails_is_written_again_until_it_lands(make_pure):
    """A worker's result whose commit fails six times is written again after
    1, 2, 4 ... 32 s and lands once, with its value; meanwhile the job is not
    handed out again, its lease does not expire, a heartbeat is answered ok,
    and the worker's resend of the same report waits for the same write."""
    clock = Clock()
    clock.advance(1_800_000_000)
    daemon = await make_pure(clock=clock)
    hub = daemon.service.dispatcher.hub
    job, who, granted, first, calls, landed = await report_failing(daemon, clock, 6, slots=1)

    # While it is written again: the lease is still the worker's...
    code, answer = await heartbeat(daemon, who, [granted])
    assert code == 200 and answer["leases"][0]["ok"] is True, answer
    # ...a resend joins the write under way rather than being refused...
    second = ensureDeferred(report(daemon, who, [result(granted, exit_code=None, result=5)]))
    await until(lambda: len(hub.leases[job["id"]].waiting) == 2)
    # ...and the job stays running: another worker gets the next job, not it.
    other = ensureDeferred(lease(daemon, worker("other", tasks=["add"]), wait=60))
    await until_waiting_for_work(daemon, "other")
    later = await daemon.submit({"task": "add", "args": [1, 1]})
    assert [g["job_id"] for g in await other] == [later["id"]]
    code, seen = await daemon.json("GET", f"/v1/jobs/{job['id']}")
    assert seen["state"] == "running"
    assert not first.called and not second.called

    # Past the lease's life without a heartbeat: no expiry while it is written.
    for delay in (1, 2, 4, 8, 16, 32):
        assert not first.called
        clock.advance(delay)
    code, answer = await first
    assert code == 200 and answer["results"] == [
        {"job_id": job["id"], "token": granted["token"], "ok": True}]
    code, answer = await second
    assert code == 200 and answer["results"][0]["ok"] is True
    assert [b - a for a, b in zip(calls, calls[1:])] == [1, 2, 4, 8, 16, 32]
    assert landed == [job["id"]]

    code, done = await daemon.json("GET", f"/v1/jobs/{job['id']}")
    assert done["state"] == "succeeded" and done["result"] == 5
    (attempt,) = done["attempts"]
    assert attempt["holder"] == "w" and attempt["finished_at"] and not attempt["error"]
    # Recorded now: a resend or a heartbeat hears it is, and the slot is free.
    code, answer = await report(daemon, who, [result(granted, exit_code=None, result=5)])
    assert code == 409 and answer["results"][0]["reason"] == "reported"
    code, answer = await heartbeat(daemon, who, [granted])
    assert code == 409 and answer["leases"][0]["reason"] == "reported"
    assert job["id"] not in hub.leases and not hub.workers["w"].jobs
    assert landed == [job["id"]]


@pytest_twisted.ensureDeferred
async def test_a_remote_result_still_unwritten_at_a_stop_is_taken_at_the_next_start(
    make_pure, tmp_path
):
    """A stop gives up a result it is writing again: the report is answered
    503, the lease outlives the stop, and the worker's resend to the next
    start records the result."""
    one_dispatcher_only("a restart resumes the workers' leases only on a store of its own")
    clock = Clock()
    clock.advance(1_800_000_000)
    data = tmp_path / "keep"
    daemon = await make_pure(clock=clock, data_dir=data)
    job, who, granted, first, calls, landed = await report_failing(daemon, clock, 1_000_000)
    assert daemon.service.dispatcher.recorder.waiting == 1
    stopped = daemon.service.stopService()
    code, answer = await first
    assert code == 503 and answer["error"]["code"] == "shutting_down", answer
    await stopped
    assert landed == []

    daemon = await make_pure(clock=clock, data_dir=data)
    code, answer = await report(daemon, who, [result(granted, exit_code=None, result=5)])
    assert code == 200 and answer["results"][0]["ok"] is True, answer
    code, done = await daemon.json("GET", f"/v1/jobs/{job['id']}")
    assert done["state"] == "succeeded" and done["result"] == 5
    assert len(done["attempts"]) == 1


@pytest_twisted.ensureDeferred
async def test_a_remote_result_that_fails_otherwise_waits_for_a_resend(make_pure):
    """A result whose write fails with an error that is not the store's is
    not written again: the report is a 500, the lease stays the worker's,
    and its resend records the result."""
    clock = Clock()
    daemon = await make_pure(clock=clock)

    def broken():
        return fail(ValueError("a bug, not a full disk"))

    who = worker("w", tasks=["add"])
    job = await daemon.submit({"task": "add", "args": [2, 3]})
    calls, landed = failing_finish(daemon.service.store, clock, job["id"], 1, broken)
    (granted,) = await lease(daemon, who)
    code, answer = await report(daemon, who, [result(granted, exit_code=None, result=5)])
    assert code == 500 and answer["error"]["code"] == "internal_error"
    assert daemon.service.dispatcher.recorder.waiting == 0
    code, answer = await heartbeat(daemon, who, [granted])
    assert code == 200 and answer["leases"][0]["ok"] is True
    code, answer = await report(daemon, who, [result(granted, exit_code=None, result=5)])
    assert code == 200 and answer["results"][0]["ok"] is True
    code, done = await daemon.json("GET", f"/v1/jobs/{job['id']}")
    assert done["state"] == "succeeded" and done["result"] == 5
    assert len(calls) == 2 and landed == [job["id"]]


@pytest_twisted.ensureDeferred
async def test_a_cancel_asked_while_a_result_is_written_again_ends_nothing_twice(make_pure):
    """A cancel asked for while a worker's result is being written again
    does not end the lease a second time: the worker's heartbeat is still
    answered ok, and the one end written is the result (a success that came
    before the cancel reached the job keeps it)."""
    clock = Clock()
    daemon = await make_pure(clock=clock)
    job, who, granted, first, calls, landed = await report_failing(daemon, clock, 1)
    code, _ = await daemon.json("POST", f"/v1/jobs/{job['id']}/cancel")
    assert code == 202
    code, answer = await heartbeat(daemon, who, [granted])
    assert code == 200 and answer["leases"][0]["ok"] is True, answer
    clock.advance(1)
    code, answer = await first
    assert code == 200 and answer["results"][0]["ok"] is True
    code, done = await daemon.json("GET", f"/v1/jobs/{job['id']}")
    assert done["state"] == "succeeded" and done["result"] == 5
    assert len(done["attempts"]) == 1
    assert len(calls) == 2 and landed == [job["id"]]


def test_an_end_waiting_to_be_written_is_kept_with_why_until_it_lands():
    """An end whose commit failed is kept in Recorder.unrecorded, with the
    state it ended in, when, the store's error and when it is written again,
    as the job's wait reason says; while it is being written again it has no
    next time, and once it lands it is gone.  A release that waits says it
    was given back; a stop forgets them all."""
    from twisted.internet.defer import Deferred

    from dispatcher.core._recorder import Recorder
    from dispatcher.model._jobs import JobSpec, Lease, Outcome

    clock = Clock()
    clock.advance(1_800_000_000)
    writes = []

    class Store:
        """Fails every write twice with a full disk, then lets it land."""

        def _write(self, *args):
            writes.append(args)
            if sum(1 for w in writes if w[0] is args[0]) <= 2:
                return full_disk()
            self.pending = Deferred()
            return self.pending

        def finish(self, lease, outcome, now):
            return self._write(lease, outcome, now)

        def release(self, lease, now, reason):
            return self._write(lease, now, reason)

    applied = []
    recorder = Recorder(Store(), clock, applied.append, (CommitFailed,))
    lease = Lease("job-1", 2, 7, "local", 0.0, JobSpec(command=("true",)))
    landed = []
    recorder.finish(lease, Outcome.from_exit_code(0), clock.seconds()).addCallback(
        landed.append)
    (waiting,) = recorder.unrecorded.values()
    assert recorder.unrecorded["job-1"].attempt == 2
    assert waiting.wait_reason == (
        "ended (succeeded) at 2027-01-15T08:00:00.000000Z; recording the end waits "
        "for the store: database or disk is full; trying again at "
        "2027-01-15T08:00:01.000000Z"
    )
    clock.advance(1)
    # Failed again: the next try is 2 s on.
    assert recorder.unrecorded["job-1"].retry_at == 1_800_000_003
    clock.advance(2)
    # Being written: no next time while it is.
    assert recorder.unrecorded["job-1"].retry_at is None
    assert recorder.unrecorded["job-1"].wait_reason.endswith(
        "waits for the store: database or disk is full")
    recorder._store.pending.callback("written")
    assert landed == ["written"] and applied == ["written"]
    assert recorder.unrecorded == {}

    other = Lease("job-2", 1, 8, "local", 0.0, JobSpec(command=("true",)))
    given_back = recorder.release(other, clock.seconds(), "shutdown")
    given_back.addErrback(lambda f: f.trap(StoreClosed))
    assert recorder.unrecorded["job-2"].wait_reason.startswith(
        "given back at 2027-01-15T08:00:03.000000Z; recording the end waits")
    recorder.stop()
    assert recorder.unrecorded == {}
    assert not clock.getDelayedCalls()


def test_ends_waiting_to_be_written_are_written_at_once_when_the_store_answers():
    """Ends whose commits failed, each waiting out its back-off, are all
    written again at once when the dispatcher hears that the store answers
    again (Recorder.write_waiting_now), not at the end of their waits."""
    from dispatcher.core._recorder import Recorder
    from dispatcher.model._jobs import JobSpec, Lease, Outcome

    clock = Clock()
    writes = []

    class Store:
        """Fails a job's first three writes with a full disk, then lands."""

        def finish(self, lease, outcome, now):
            writes.append((lease.job_id, clock.seconds()))
            if sum(1 for w in writes if w[0] == lease.job_id) <= 3:
                return full_disk()
            return ensureDeferred(_written())

    async def _written():
        return "written"

    recorder = Recorder(Store(), clock, lambda written: None, (CommitFailed,))
    landed = []
    for n in range(2):
        lease = Lease(f"job-{n}", 1, n, "local", 0.0, JobSpec(command=("true",)))
        recorder.finish(lease, Outcome.from_exit_code(0), 0.0).addCallback(landed.append)
    clock.advance(1)
    clock.advance(2)
    # Both failed three times and wait 4 s more; the store answers at 3.5.
    clock.advance(0.5)
    assert landed == [] and recorder.waiting == 2
    recorder.write_waiting_now()
    clock.advance(0)
    assert landed == ["written", "written"]
    assert [at for job, at in writes[-2:]] == [3.5, 3.5]
    assert recorder.unrecorded == {} and not clock.getDelayedCalls()
