"""
Scheduling rules through the API of a real daemon: fields, timeouts,
retries, waiting, dependencies, arrays, batches, idempotency, retry and
queue endpoints.  Time runs on a Clock wherever a rule is about time.
"""

import json

import pytest_twisted
from hypothesis import given, settings, strategies as st
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.internet.task import Clock

from dispatcher.config._ini import QueueConfig
from dispatcher.store._stored import encode_stored, plain_stored, spec_to_stored
from dispatcher.wire._submission import parse_submission, plain_jobs

from .conftest import sleep

QUEUES = """
[queue:gpu]
max_running = 1
priority = 7
timeout = 100
"""


async def count_jobs(daemon):
    code, page = await daemon.json("GET", "/v1/jobs?limit=1000")
    return len(page["jobs"])


def at(seconds):
    clock = Clock()
    clock.advance(seconds)
    return clock


async def armed(clock, when):
    """Wait until something on the clock is due at `when` (a timeout being
    armed happens in real time, after the job really started)."""
    for _ in range(1000):
        if any(abs(c.getTime() - when) < 1e-6 for c in clock.getDelayedCalls()):
            return
        await sleep(0.005)
    raise AssertionError(f"nothing was armed for {when}")


@pytest_twisted.ensureDeferred
async def test_fields_defaults_and_queue_defaults(make_daemon):
    """A job shows its scheduling fields with their defaults; a queue gives its
    own priority and timeout; an unknown queue is a 400."""
    daemon = await make_daemon("[executor]\nslots = 0\n" + QUEUES)
    job = await daemon.submit({"command": ["true"]})
    assert (job["priority"], job["queue"], job["timeout"], job["max_attempts"]) == (
        0, "default", None, 1)
    assert job["depends_on"] == [] and job["array_id"] is None
    gpu = await daemon.submit({"command": ["true"], "queue": "gpu"})
    assert (gpu["priority"], gpu["timeout"]) == (7, 100.0)
    own = await daemon.submit({"command": ["true"], "queue": "gpu", "priority": -3,
                               "timeout": 2.5, "max_attempts": 4, "retry_delay": 0})
    assert (own["priority"], own["timeout"], own["max_attempts"], own["retry_delay"]) == (
        -3, 2.5, 4, 0.0)
    for body, field in [
        ({"command": ["true"], "queue": "cpu"}, "queue"),
        ({"command": ["true"], "priority": 1.5}, "priority"),
        ({"command": ["true"], "priority": True}, "priority"),
        ({"command": ["true"], "timeout": 0}, "timeout"),
        ({"command": ["true"], "max_attempts": 0}, "max_attempts"),
        ({"command": ["true"], "retry_delay": -1}, "retry_delay"),
        ({"command": ["true"], "not_before": "tomorrow"}, "not_before"),
        ({"command": ["true"], "not_before": "2026-01-01T00:00:00"}, "not_before"),
        ({"command": ["true"], "delay": 1, "not_before": "2026-01-01T00:00:00Z"}, "delay"),
        ({"command": ["true"], "depends_on": "x"}, "depends_on"),
        ({"command": ["true"], "depends_on": [0]}, "depends_on[0]"),
        ({"command": ["true"], "depends_on": ["nope"]}, "depends_on[0]"),
        ({"command": ["true"], "array": 0}, "array"),
        ({"command": ["true"], "array": 10001}, "array"),
    ]:
        code, error = await daemon.json("POST", "/v1/jobs", body)
        assert code == 400 and error["error"]["field"] == field, (body, error)
    code, page = await daemon.json("GET", "/v1/jobs")
    assert len(page["jobs"]) == 3


@pytest_twisted.ensureDeferred
async def test_timeout_kills_the_process_group(make_daemon, tmp_path):
    """Past its timeout a job's process group gets SIGTERM, then SIGKILL after
    the kill grace; the attempt fails saying it timed out."""
    clock = at(1000)
    daemon = await make_daemon("[executor]\nkill_grace = 10\n", clock=clock)
    job = await daemon.submit({"command": [
        "sh", "-c", "trap 'echo TERM' TERM; echo ready; while :; do sleep 0.05; done"],
        "timeout": 30})
    await daemon.wait(job["id"], states=("running",))

    async def output_is(text):
        while (await daemon.request("GET", f"/v1/jobs/{job['id']}/log"))[1] != text:
            await sleep(0.01)

    await output_is(b"ready\n")
    await armed(clock, 1030)
    clock.advance(29)
    # Not yet due: the timeout is still waiting, nothing was sent.
    await armed(clock, 1030)
    assert (await daemon.json("GET", f"/v1/jobs/{job['id']}"))[1]["state"] == "running"
    clock.advance(1)  # SIGTERM, which the job notes and outlives
    await output_is(b"ready\nTERM\n")
    await armed(clock, 1040)
    assert (await daemon.json("GET", f"/v1/jobs/{job['id']}"))[1]["state"] == "running"
    clock.advance(10)  # SIGKILL
    done = await daemon.wait(job["id"])
    assert done["state"] == "failed"
    assert done["error"] == "timed out after 30 s"
    assert done["exit_code"] == -9


@pytest_twisted.ensureDeferred
async def test_task_timeout_discards_late_result(make_daemon):
    """A task past its timeout fails at once; its late result is discarded."""
    clock = at(1000)
    daemon = await make_daemon("[executor]\nthreads = 1\n", clock=clock)
    job = await daemon.submit({"task": "wait_for_cancel", "args": [30], "timeout": 5})
    await daemon.wait(job["id"], states=("running",))
    await armed(clock, 1005)
    clock.advance(5)
    done = await daemon.wait(job["id"])
    assert done["state"] == "failed"
    assert done["error"].startswith("timed out after 5 s")
    assert done["result"] is None
    # The task sees its context cancelled and returns "cancelled": once the
    # only task thread has run the next job, that late result has come back
    # too, and nothing recorded it.
    after = await daemon.submit({"task": "add", "args": [1, 1]})
    assert (await daemon.wait(after["id"]))["result"] == 2
    assert (await daemon.json("GET", f"/v1/jobs/{job['id']}"))[1]["result"] is None


@pytest_twisted.ensureDeferred
async def test_retries_until_attempts_run_out(make_daemon):
    """A failing job is retried after its back-off, pending meanwhile with a
    reason, until max_attempts; each attempt sees its number."""
    clock = at(1000)
    daemon = await make_daemon(clock=clock)
    job = await daemon.submit({
        "command": ["sh", "-c", "echo attempt $DISPATCHER_ATTEMPT; exit 3"],
        "max_attempts": 3, "retry_delay": 10})
    waiting = await daemon.wait(job["id"], states=("pending",))
    assert "attempt 1 failed; retrying at" in waiting["wait_reason"]
    assert waiting["error"] == "exited with code 3"
    clock.advance(16)  # at most 1.5 times the delay, with jitter
    waiting = await daemon.wait(job["id"], states=("pending",))
    while len(waiting["attempts"]) < 2:
        waiting = await daemon.wait(job["id"], states=("pending",))
    clock.advance(31)
    done = await daemon.wait(job["id"], states=("failed",))
    assert [a["number"] for a in done["attempts"]] == [1, 2, 3]
    _, out = await daemon.request("GET", f"/v1/jobs/{job['id']}/log")
    assert out == b"attempt 3\n"


@pytest_twisted.ensureDeferred
async def test_delay_and_not_before(make_daemon):
    """A job with delay or not_before waits in pending until then."""
    clock = at(1_800_000_000)
    daemon = await make_daemon(clock=clock)
    later = await daemon.submit({"task": "add", "args": [1, 2], "delay": 60})
    assert later["state"] == "pending"
    assert later["not_before"] == "2027-01-15T08:01:00.000000Z"
    assert later["wait_reason"] == "waiting until 2027-01-15T08:01:00.000000Z"
    fixed = await daemon.submit({"task": "add", "args": [2, 2],
                                 "not_before": "2027-01-15T10:00:00+01:00"})
    clock.advance(59)
    # The wake-up for it is still to come, so nothing has promoted it.
    await armed(clock, 1_800_000_060)
    assert (await daemon.json("GET", f"/v1/jobs/{later['id']}"))[1]["state"] == "pending"
    clock.advance(1)
    assert (await daemon.wait(later["id"]))["result"] == 3
    assert (await daemon.json("GET", f"/v1/jobs/{fixed['id']}"))[1]["state"] == "pending"


@pytest_twisted.ensureDeferred
async def test_dependencies_and_cancel_cascade(daemon):
    """A job runs only after its dependencies succeed; when one fails, its
    dependents are cancelled naming it."""
    first = await daemon.submit({"task": "add", "args": [1, 1]})
    second = await daemon.submit({"task": "describe", "depends_on": [first["id"]]})
    assert second["depends_on"] == [first["id"]]
    done = await daemon.wait(second["id"])
    assert done["state"] == "succeeded"
    assert done["started_at"] >= (await daemon.json(
        "GET", f"/v1/jobs/{first['id']}"))[1]["finished_at"]
    bad = await daemon.submit({"task": "fail", "args": ["no"]})
    after = await daemon.submit({"task": "add", "args": [1, 1], "depends_on": [bad["id"]]})
    then = await daemon.submit({"task": "add", "args": [1, 1], "depends_on": [after["id"]]})
    cancelled = await daemon.wait(then["id"])
    assert cancelled["state"] == "cancelled"
    assert cancelled["error"] == f"cancelled because its dependency {after['id']} was cancelled"
    code, retried = await daemon.json(
        "POST", f"/v1/jobs/{after['id']}/retry", {})
    assert code == 409 and bad["id"] in retried["error"]["message"]


@pytest_twisted.ensureDeferred
async def test_array(daemon):
    """An array makes N jobs sharing array_id, each with its index in its
    environment; depends_on may name the array."""
    code, answer = await daemon.json("POST", "/v1/jobs", {
        "command": ["sh", "-c", "echo $DISPATCHER_ARRAY_INDEX"], "array": 4})
    assert code == 201
    members = answer["jobs"]
    assert [m["array_index"] for m in members] == [0, 1, 2, 3]
    array_id = members[0]["array_id"]
    assert {m["array_id"] for m in members} == {array_id}
    after = await daemon.submit({"task": "describe", "depends_on": [array_id]})
    assert after["depends_on"] == [array_id]
    assert "4 job(s)" in after["wait_reason"] or after["state"] != "pending"
    for m in members:
        await daemon.wait(m["id"])
        _, out = await daemon.request("GET", f"/v1/jobs/{m['id']}/log")
        assert out == f"{m['array_index']}\n".encode()
    assert (await daemon.wait(after["id"]))["state"] == "succeeded"


@pytest_twisted.ensureDeferred
async def test_batch_all_or_nothing_with_indexes(daemon):
    """A batch is stored all or nothing, answered in order, and an integer in
    depends_on names an earlier job of it; a later index is refused."""
    jobs = await daemon.batch([
        {"task": "add", "args": [1, 2]},
        {"task": "describe", "depends_on": [0]},
        {"command": ["true"], "array": 2, "depends_on": [1]},
        {"task": "describe", "depends_on": [2]},
    ], full=True)
    assert len(jobs) == 5
    assert jobs[1]["depends_on"] == [jobs[0]["id"]]
    assert jobs[2]["depends_on"] == [jobs[1]["id"]]
    assert jobs[2]["array_id"] == jobs[3]["array_id"]
    assert jobs[4]["depends_on"] == [jobs[2]["array_id"]]
    assert (await daemon.wait(jobs[4]["id"]))["state"] == "succeeded"
    code, page = await daemon.json("GET", "/v1/jobs?limit=1000")
    before = len(page["jobs"])
    for body, field in [
        ({"jobs": [{"command": ["true"]}, {"command": ["true"], "depends_on": [1]}]},
         "jobs[1].depends_on[0]"),
        ({"jobs": [{"command": ["true"]}, {"command": ["true"], "colour": 1}]},
         "jobs[1].colour"),
        ({"jobs": [{"command": ["true"]}, {"command": ["true"], "depends_on": ["x"]}]},
         "jobs[1].depends_on[0]"),
        ({"jobs": []}, "jobs"),
        ({"jobs": [{"command": ["true"]}], "more": 1}, "more"),
    ]:
        code, error = await daemon.json("POST", "/v1/jobs/batch", body)
        assert code == 400 and error["error"]["field"] == field, error
    code, page = await daemon.json("GET", "/v1/jobs?limit=1000")
    assert len(page["jobs"]) == before


@pytest_twisted.ensureDeferred
async def test_batch_answers_ids_unless_asked_for_more(make_daemon):
    """A batch answers each job's id, state and batch id (and place in its
    array) in order; with Prefer: return=representation it answers each job
    whole, as GET shows it."""
    daemon = await make_daemon("[executor]\nslots = 0\n")
    jobs = await daemon.batch([
        {"command": ["true"], "labels": {"n": "0"}},
        {"command": ["true"], "array": 2},
        {"command": ["true"], "delay": 3600},
    ])
    assert [sorted(j) for j in jobs] == [
        ["batch_id", "id", "state"], ["array_id", "array_index", "batch_id", "id", "state"],
        ["array_id", "array_index", "batch_id", "id", "state"], ["batch_id", "id", "state"]]
    assert len({j["batch_id"] for j in jobs}) == 1
    assert [j["state"] for j in jobs] == ["queued", "queued", "queued", "pending"]
    assert [j.get("array_index") for j in jobs] == [None, 0, 1, None]
    code, first = await daemon.json("GET", f"/v1/jobs/{jobs[0]['id']}")
    assert code == 200 and first["labels"] == {"n": "0"}
    response, content = await daemon.request(
        "POST", "/v1/jobs/batch", {"jobs": [{"command": ["true"], "name": "x"}]},
        headers={"Prefer": ["respond-async, return=representation"]})
    (whole,) = json.loads(content)["jobs"]
    assert response.code == 201
    assert response.headers.getRawHeaders("preference-applied") == ["return=representation"]
    code, again = await daemon.json("GET", f"/v1/jobs/{whole['id']}")
    assert again == whole


PLAIN = [
    {"command": ["echo", "\u00e9", "x y"]},
    {"task": "add", "args": [1, 2]},
    {"task": "describe", "kwargs": {"b": 1, "a": [2, {"z": 1, "y": 2}]}},
    {"task": "describe"},
]
# Jobs that are not plain, or not valid: each goes the general way.
NOT_PLAIN = [
    {"command": ["true"], "name": "x"},
    {"command": ["true"], "env": {}},
    {"task": "add", "args": [1, 2], "priority": 1},
    {"command": ["echo", 3]},
    {"command": []},
    {"command": [""]},
    {"command": ["true", "a\x00"]},
    {"command": "true"},
    {"task": "nope"},
    {"task": "add", "args": {}},
    {"task": "add", "kwargs": {"1x": 1}},
    ["true"],
]


def test_plain_jobs_are_the_jobs_parse_submission_makes():
    """plain_jobs() takes a batch only if every job in it is plain, and then
    stores what parse_submission() would: the same specs, with the default
    queue's priority and timeout."""
    queue = QueueConfig("default", priority=3, timeout=50.0)
    tasks = {"add": None, "describe": None}
    plain = plain_jobs(PLAIN, tasks, queue)
    assert plain is not None
    expected = [parse_submission(body, tasks, {"default": queue}, 0.0, 10).spec
                for body in PLAIN]
    assert plain.specs() == expected
    assert plain_stored(plain) == [encode_stored(spec_to_stored(spec)) for spec in expected]
    for body in NOT_PLAIN:
        assert plain_jobs(PLAIN + [body], tasks, queue) is None, body
    # A null field is the field left out (the wire type's default): plain.
    null_task = {"command": ["true"], "task": None}
    assert plain_jobs([null_task], tasks, queue).specs() == [
        parse_submission(null_task, tasks, {"default": queue}, 0.0, 10).spec]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=3), children, max_size=3),
    max_leaves=8,
)
argv_items = st.text(max_size=4) | st.sampled_from(["", "a\x00", "\u00e9"]) | json_values
near_plain = st.one_of(
    st.fixed_dictionaries({"command": st.lists(argv_items, max_size=3) | json_values}),
    st.fixed_dictionaries(
        {"task": st.sampled_from(["add", "describe", "nope"]) | json_values},
        optional={
            "args": st.lists(json_values, max_size=3) | json_values,
            "kwargs": st.dictionaries(st.sampled_from(["a", "b_2", "1x", "", "é"]),
                                      json_values, max_size=3) | json_values,
        },
    ),
).flatmap(lambda job: st.sampled_from([{}] * 5 + [{"name": "n"}, {"priority": 1}, {"env": {}}])
          .map(lambda extra: {**job, **extra}))


@settings(max_examples=300)
@given(near_plain)
def test_a_job_plain_jobs_takes_is_the_one_parse_submission_makes(body):
    """Any job plain_jobs() takes, parse_submission() takes too, as the same
    spec with the same stored text: the shorter path skips no check."""
    queue = QueueConfig("default", priority=3, timeout=50.0)
    tasks = {"add": None, "describe": None}
    plain = plain_jobs([body], tasks, queue)
    if plain is None:
        return
    spec = parse_submission(body, tasks, {"default": queue}, 0.0, 10).spec
    assert plain.specs() == [spec]
    assert plain_stored(plain) == [encode_stored(spec_to_stored(spec))]


@pytest_twisted.ensureDeferred
async def test_plain_batches_are_stored_as_any_other(make_daemon):
    """A batch of plain jobs, which takes a shorter way to the store, makes
    the same jobs as the general way does (here taken by asking for the
    jobs whole), with the default queue's defaults; a job in it that is
    almost plain has its field named, and nothing is stored."""
    daemon = await make_daemon(
        "[executor]\nslots = 0\n[queue:default]\npriority = 3\ntimeout = 50\n")
    plain = await daemon.batch(PLAIN * 2)
    assert [sorted(job) for job in plain] == [["batch_id", "id", "state"]] * 8
    assert {job["state"] for job in plain} == {"queued"}
    whole = await daemon.batch(PLAIN * 2, full=True)
    ids = [job["id"] for job in plain + whole]
    assert ids == sorted(ids) and len(set(ids)) == 16
    for short, general in zip(plain, whole):
        code, stored = await daemon.json("GET", f"/v1/jobs/{short['id']}")
        assert code == 200
        assert (stored["priority"], stored["timeout"]) == (3, 50.0)
        assert stored["batch_id"] == short["batch_id"] != general["batch_id"]
        for key in ("id", "created_at", "batch_id"):
            del stored[key], general[key]
        assert stored == general
    for body, field in [
        ([{"command": ["true"]}, {"command": ["echo", 3]}], "jobs[1].command[1]"),
        ([{"command": ["true"]}, {"task": "nope"}], "jobs[1].task"),
        ([{"command": ["true", "a\x00"]}], "jobs[0].command[1]"),
        ([{"command": []}], "jobs[0].command"),
        ([{"task": "add", "kwargs": {"1x": 1}}], "jobs[0].kwargs.1x"),
    ]:
        code, error = await daemon.json("POST", "/v1/jobs/batch", {"jobs": body})
        assert code == 400 and error["error"]["field"] == field, error
    assert await count_jobs(daemon) == 16


@pytest_twisted.ensureDeferred
async def test_idempotency_key(make_daemon):
    """The same Idempotency-Key and body answers 200 with the original job;
    another body is 409; concurrent duplicates make one job; batches too."""
    daemon = await make_daemon("[executor]\nslots = 0\n")
    key = {"Idempotency-Key": ["abc-1"]}
    body = {"command": ["true"], "labels": {"a": "1"}}
    answers = await gatherResults([
        ensureDeferred(daemon.request("POST", "/v1/jobs", body, headers=key))
        for _ in range(5)])
    codes = sorted(r.code for r, _ in answers)
    assert codes == [200, 200, 200, 200, 201]
    assert len({json.loads(c)["id"] for _, c in answers}) == 1
    reordered = {"labels": {"a": "1"}, "command": ["true"]}
    code, again = await daemon.json("POST", "/v1/jobs", reordered, headers=key)
    assert code == 200 and again["id"] == json.loads(answers[0][1])["id"]
    code, error = await daemon.json("POST", "/v1/jobs", {"command": ["false"]}, headers=key)
    assert code == 409 and error["error"]["code"] == "idempotency_conflict"
    batch_key = {"Idempotency-Key": ["batch-1"]}
    first = await daemon.batch([{"command": ["true"]}, {"command": ["true"]}],
                               headers=batch_key)
    code, replay = await daemon.json(
        "POST", "/v1/jobs/batch", {"jobs": [{"command": ["true"]}, {"command": ["true"]}]},
        headers=batch_key)
    assert code == 200 and [j["id"] for j in replay["jobs"]] == [j["id"] for j in first]
    code, page = await daemon.json("GET", "/v1/jobs?limit=1000")
    assert len(page["jobs"]) == 3


@pytest_twisted.ensureDeferred
async def test_retry_endpoint(daemon):
    """Retry puts a failed job back with a fresh budget, attempt numbers keep
    growing; a job that has not finished cannot be retried (409)."""
    job = await daemon.submit({"task": "fail", "args": ["x"], "max_attempts": 2,
                               "retry_delay": 0})
    failed = await daemon.wait(job["id"])
    assert [a["number"] for a in failed["attempts"]] == [1, 2]
    code, retried = await daemon.json("POST", f"/v1/jobs/{job['id']}/retry")
    assert code == 200 and retried["state"] in ("queued", "running", "failed")
    done = await daemon.wait(job["id"])
    while len(done["attempts"]) < 4:
        done = await daemon.wait(job["id"])
    assert [a["number"] for a in done["attempts"]] == [1, 2, 3, 4]
    running = await daemon.submit({"task": "wait_for_cancel", "args": [30]})
    code, error = await daemon.json("POST", f"/v1/jobs/{running['id']}/retry")
    assert code == 409 and error["error"]["field"] == "id"
    assert error["error"]["message"] in (
        f"job {running['id']} is {state}; only a failed or cancelled job can be retried"
        for state in ("queued", "running"))
    code, error = await daemon.json("POST", f"/v1/jobs/{running['id']}/retry",
                                    {"dependents": "yes"})
    assert code == 400 and error["error"]["field"] == "dependents"
    await daemon.json("POST", f"/v1/jobs/{running['id']}/cancel")
    code, error = await daemon.json("POST", "/v1/jobs/nope/retry")
    assert code == 404


@pytest_twisted.ensureDeferred
async def test_retry_with_dependents_endpoint(daemon):
    """dependents: true also brings back the jobs cancelled because of it."""
    bad = await daemon.submit({"task": "fail", "args": ["x"]})
    after = await daemon.submit({"task": "add", "args": [1, 1], "depends_on": [bad["id"]]})
    assert (await daemon.wait(after["id"]))["state"] == "cancelled"
    code, _ = await daemon.json("POST", f"/v1/jobs/{bad['id']}/retry",
                                {"dependents": True})
    assert code == 200
    await daemon.wait(bad["id"])
    again = await daemon.wait(after["id"])
    assert again["state"] == "cancelled"  # bad fails again, so after is cancelled again
    assert bad["id"] in again["error"]


@pytest_twisted.ensureDeferred
async def test_queues_endpoint_and_limit(make_daemon):
    """GET /v1/queues counts jobs by state per queue with running/limit, and a
    queue at its limit leaves other queues running."""
    daemon = await make_daemon("[executor]\nslots = 4\n" + QUEUES)
    hold = await daemon.submit({"task": "wait_for_cancel", "args": [30], "queue": "gpu"})
    queued = await daemon.submit({"task": "add", "args": [1, 1], "queue": "gpu"})
    await daemon.wait(hold["id"], states=("running",))
    other = await daemon.submit({"task": "add", "args": [2, 2]})
    assert (await daemon.wait(other["id"]))["state"] == "succeeded"
    code, waiting = await daemon.json("GET", f"/v1/jobs/{queued['id']}")
    assert waiting["state"] == "queued"
    assert waiting["wait_reason"] == "queue gpu is at its limit of 1 running jobs"
    code, answer = await daemon.json("GET", "/v1/queues")
    assert code == 200
    gpu = answer["queues"]["gpu"]
    assert gpu["running"] == 1 and gpu["max_running"] == 1
    assert gpu["counts"]["queued"] == 1
    assert answer["queues"]["default"]["counts"]["succeeded"] == 1
    await daemon.json("POST", f"/v1/jobs/{hold['id']}/cancel")
    assert (await daemon.wait(queued["id"]))["state"] == "succeeded"


@pytest_twisted.ensureDeferred
async def test_task_context_has_array_and_attempt(daemon):
    """A task's context carries its job id, attempt and array index."""
    code, answer = await daemon.json("POST", "/v1/jobs", {
        "task": "describe", "array": 2})
    for member in answer["jobs"]:
        done = await daemon.wait(member["id"])
        assert done["result"]["array_index"] == member["array_index"]
        assert done["result"]["attempt"] == 1


@pytest_twisted.ensureDeferred
async def test_a_queue_dropped_from_the_config_says_why_its_jobs_wait(make_daemon, tmp_path):
    """Jobs of a queue that a restart's configuration no longer names stay
    queued (nothing is lost) and say why; when the queue is back they run."""
    data = tmp_path / "kept"
    daemon = await make_daemon("[executor]\nslots = 0\n[queue:gpu]\n", data_dir=data)
    job = await daemon.submit({"command": ["true"], "queue": "gpu"})
    await daemon.service.stopService()
    daemon = await make_daemon("", data_dir=data)
    code, waiting = await daemon.json("GET", f"/v1/jobs/{job['id']}")
    assert waiting["state"] == "queued"
    assert waiting["wait_reason"].startswith("its queue gpu is not in the configuration")
    await daemon.service.stopService()
    daemon = await make_daemon("[queue:gpu]\n", data_dir=data)
    assert (await daemon.wait(job["id"]))["state"] == "succeeded"
