"""
A report that asks for work (docs/worker-protocol.md, "POST
/v1/leases/results"): its answer records the results and grants leases for
the slots they free, in one round trip and one commit; one bad entry of a
batch costs the others nothing, and never records a result for a lease
that is gone.  Spoken to over HTTP as a worker would; time is a Clock.
"""

import pytest_twisted
from twisted.internet.task import Clock

from dispatcher.wire._types import MAX_RESULT_BYTES

from .conftest import run_clock
from .test_leases import (  # noqa: F401 (make_pure is a fixture)
    STALE,
    call,
    documented_call,
    heartbeat,
    lease,
    make_pure,
    result,
    worker,
)

RESULTS = "/v1/leases/results"


async def report_asking(daemon, who, items, max_jobs, held=None):
    body = {"worker": who, "results": items, "max_jobs": max_jobs}
    if held is not None:
        body["held"] = held
    return await documented_call(daemon, RESULTS, body)


async def job(daemon, job_id):
    code, found = await daemon.json("GET", f"/v1/jobs/{job_id}")
    assert code == 200, found
    return found


@pytest_twisted.ensureDeferred
async def test_a_report_that_asks_for_work_gets_leases_in_its_answer(make_pure):
    """The results are recorded, and the same answer grants leases for every
    slot they free, with the timing a request for work's answer gives; the
    claim shares the results' commit."""
    daemon = await make_pure()
    who = worker("w", slots=2, tasks=("add",))
    jobs = [await daemon.submit({"task": "add", "args": [1, 2]}) for _ in range(4)]
    first = await lease(daemon, who)
    assert len(first) == 2
    store = daemon.service.dispatcher.store
    commits = store.batches
    code, answer = await report_asking(daemon, who, [result(g) for g in first], 2)
    assert code == 200, answer
    assert [r["ok"] for r in answer["results"]] == [True, True]
    # One commit: the two ends and the claim of the next two.
    assert store.batches == commits + 1
    granted = answer["leases"]
    assert len(granted) == 2
    assert {g["job_id"] for g in granted} | {g["job_id"] for g in first} == {
        j["id"] for j in jobs}
    assert answer["lease_seconds"] == 30.0 and answer["heartbeat_seconds"] == 10.0
    assert 0 < answer["fence_seconds"] <= 25.0
    for g in first:
        assert (await job(daemon, g["job_id"]))["state"] == "succeeded"
    for g in granted:
        assert (await job(daemon, g["job_id"]))["state"] == "running"
    # The new leases are the worker's like any other: a heartbeat renews them.
    code, beat = await heartbeat(daemon, who, granted)
    assert code == 200 and all(item["ok"] for item in beat["leases"])


@pytest_twisted.ensureDeferred
async def test_a_report_asks_for_no_more_than_its_free_slots(make_pure):
    """The dispatcher grants what the worker has free once these results
    are recorded, whatever more it asks for; a report that frees nothing
    and finds nothing queued is answered at once with no lease."""
    daemon = await make_pure()
    who = worker("w", slots=3, tasks=("add",))
    for _ in range(6):
        await daemon.submit({"task": "add", "args": [1, 2]})
    held = await lease(daemon, who)
    assert len(held) == 3
    # One result: one slot free, although it asks for three.
    code, answer = await report_asking(daemon, who, [result(held[0])], 3)
    assert code == 200 and len(answer["leases"]) == 1
    code, answer = await report_asking(daemon, who, [], 3)
    assert code == 200 and answer["leases"] == []
    code, listed = await daemon.json("GET", "/v1/workers")
    assert len(listed["workers"][0]["running"]) == 3


@pytest_twisted.ensureDeferred
async def test_a_stale_entry_costs_the_rest_of_its_batch_nothing(make_pure):
    """In one report that asks for work: a result for a lease that expired,
    one with a token the dispatcher never gave and one sent again after it
    was recorded are each refused with their reason, and change nothing;
    the good result beside them is recorded, and the slots it frees are
    filled in the same answer."""
    clock = Clock()
    daemon = await make_pure(clock=clock)
    who = worker("w", slots=3, tasks=("add",))
    jobs = [await daemon.submit({"task": "add", "args": [1, 2], "max_attempts": 2, "retry_delay": 0})
            for _ in range(3)]
    expired, good, again = await lease(daemon, who)
    code, answer = await report_asking(daemon, who, [result(again)], 1)
    assert code == 200 and answer["leases"] == []
    # The other two are kept alive; the first one's lease runs out.
    for _ in range(4):
        run_clock(clock, 9)
        code, _ = await heartbeat(daemon, who, [good])
        assert code == 200
    back = await daemon.wait(expired["job_id"], ("queued",))
    assert "sent no heartbeat" in back["attempts"][0]["error"]
    forged = {**result(good), "token": STALE}
    code, answer = await report_asking(
        daemon, who,
        [result(expired, state="failed", exit_code=3), forged, result(again),
         result(good, exit_code=0)],
        3)
    assert code == 200, answer
    assert [(r["ok"], r.get("reason")) for r in answer["results"]] == [
        (False, "expired"), (False, "superseded"), (False, "reported"), (True, None)]
    assert (await job(daemon, good["job_id"]))["state"] == "succeeded"
    # The expired attempt's result was not recorded: its job went back to
    # the queue, and the same answer leases it again as a second attempt.
    (regranted,) = answer["leases"]
    assert regranted["job_id"] == expired["job_id"] and regranted["attempt"] == 2
    again_job = await job(daemon, again["job_id"])
    assert again_job["state"] == "succeeded" and len(again_job["attempts"]) == 1
    assert {j["id"] for j in jobs} == {expired["job_id"], good["job_id"], again["job_id"]}


@pytest_twisted.ensureDeferred
async def test_a_report_whose_every_result_is_refused_but_gets_work_is_a_200(make_pure):
    """Every result refused and no lease granted is a 409, as before; with
    a lease granted, the answer is a 200 that carries it."""
    daemon = await make_pure()
    who = worker("w", slots=1, tasks=("add",))
    await daemon.submit({"task": "add", "args": [1, 2]})
    code, answer = await report_asking(daemon, who, [result({"job_id": "x", "token": STALE})], 1)
    assert code == 200, answer
    assert answer["results"][0]["ok"] is False and len(answer["leases"]) == 1
    code, answer = await report_asking(
        daemon, who, [result({"job_id": "y", "token": STALE})], 1,
        held=[{"job_id": answer["leases"][0]["job_id"], "token": answer["leases"][0]["token"]}])
    assert code == 409 and answer["leases"] == []


@pytest_twisted.ensureDeferred
async def test_a_hostile_entry_refuses_the_whole_report_and_changes_nothing(make_pure):
    """A report whose one entry is malformed (a token of the wrong form, a
    result over the size limit) is a 400 naming that entry's field: nothing
    of it is recorded and no lease is granted, and the worker's report sent
    again without it records the others."""
    daemon = await make_pure()
    who = worker("w", slots=2, tasks=("add",))
    for _ in range(4):
        await daemon.submit({"task": "add", "args": [1, 2]})
    first, second = await lease(daemon, who)
    big = "x" * (MAX_RESULT_BYTES + 1)
    for bad, field in [({**result(second), "token": "not-a-token"}, "results[1].token"),
                       (result(second, result=big), "results[1].result")]:
        code, answer = await call(daemon, RESULTS, {
            "worker": who, "results": [result(first), bad], "max_jobs": 2})
        assert code == 400, answer
        assert answer["error"]["field"] == field
        for g in (first, second):
            assert (await job(daemon, g["job_id"]))["state"] == "running"
        code, listed = await daemon.json("GET", "/v1/workers")
        assert sorted(listed["workers"][0]["running"]) == sorted(
            [first["job_id"], second["job_id"]])
    code, answer = await report_asking(daemon, who, [result(first)], 1)
    assert code == 200 and answer["results"][0]["ok"] and len(answer["leases"]) == 1


@pytest_twisted.ensureDeferred
async def test_max_jobs_of_a_report_is_checked_and_held_needs_it(make_pure):
    """max_jobs above the worker's slots (or below 1) is a 400 naming it, and
    changes nothing; a held list without max_jobs is ignored: a report that
    does not ask for work releases no lease it leaves out."""
    daemon = await make_pure()
    who = {**worker("w", slots=2, tasks=("add",)), "instance": "a" * 16}
    job_id = (await daemon.submit({"task": "add", "args": [1, 2]}))["id"]
    for body in [{"worker": who, "results": [], "max_jobs": 3},
                 {"worker": who, "results": [], "max_jobs": 0}]:
        code, answer = await call(daemon, RESULTS, body)
        assert code == 400, answer
        assert answer["error"]["field"] == "max_jobs"
    assert (await job(daemon, job_id))["state"] == "queued"
    (granted,) = await lease(daemon, who)
    code, answer = await call(daemon, RESULTS, {"worker": who, "results": [], "held": []})
    assert code == 200 and answer["leases"] == []
    assert (await job(daemon, job_id))["state"] == "running"
    code, beat = await heartbeat(daemon, who, [granted])
    assert code == 200 and beat["leases"][0]["ok"]


@pytest_twisted.ensureDeferred
async def test_leases_a_report_granted_that_never_arrived_go_back_unspent(make_pure):
    """The answer of a report that asked for work is lost: the worker's
    next request for work does not list its leases, and they go back to the
    queue at once, their attempt not counted."""
    daemon = await make_pure()
    who = {**worker("w", slots=1, tasks=("add",)), "instance": "a" * 16}
    job_id = (await daemon.submit({"task": "add", "args": [1, 2]}))["id"]
    code, answer = await report_asking(daemon, who, [], 1, held=[])
    (lost,) = answer["leases"]
    assert lost["job_id"] == job_id
    (again,) = await call_lease(daemon, who, held=[])
    assert again["job_id"] == job_id and again["token"] != lost["token"]
    first = (await job(daemon, job_id))["attempts"][0]
    assert "does not hold its lease" in first["error"]
    # Not spent: the job's one attempt allowed is still there to run.
    code, answer = await report_asking(daemon, who, [result(again)], 1)
    assert code == 200 and answer["results"][0]["ok"]
    assert (await daemon.wait(job_id))["state"] == "succeeded"


async def call_lease(daemon, who, held):
    # Held open until the release has committed and the job is claimed again.
    code, answer = await call(daemon, "/v1/leases", {"worker": who, "wait": 10, "held": held})
    assert code == 200, answer
    return answer["leases"]
