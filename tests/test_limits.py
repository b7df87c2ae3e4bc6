"""
What one request may make the dispatcher do, bounded, against a real
daemon: the label filters of a list, the stored size of an array, the
dependencies one submission resolves, and the size of a task's result
(a local task's, and one a remote worker reports).  Over a limit the
answer is a 400 that names the field and the limit, and nothing is stored.
"""

import re

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred

from twisted.internet import reactor

from dispatcher.model._jobs import JobIds, JobSpec, JobState, Offer, Outcome
from dispatcher.model._limits import MAX_DEPENDENCY_LINKS, MAX_RESULT_BYTES
from dispatcher.store._sqlite import SQLiteJobStore
from dispatcher.wire._types import MAX_LABEL_FILTERS

from .test_leases import lease, report, worker
from .postgres import sqlite_file_only

ids = JobIds()


@pytest.fixture
def daemon(make_daemon):
    """A daemon that runs nothing: jobs stay queued."""
    return pytest_twisted.blockon(Deferred.fromCoroutine(make_daemon("[executor]\nslots = 0\n")))


@pytest_twisted.ensureDeferred
async def test_a_list_takes_at_most_the_limit_of_label_filters(daemon):
    """
    A list with one label filter more than MAX_LABEL_FILTERS is a 400
    naming label and the limit; at the limit it is answered.
    """
    job = await daemon.submit({"command": ["true"], "labels": {"k0": "v"}})
    at_limit = "&".join(f"label=k{i % 2}" for i in range(MAX_LABEL_FILTERS - 1))
    code, page = await daemon.json("GET", f"/v1/jobs?label=k0=v&{at_limit}")
    assert code == 200, page
    code, page = await daemon.json(
        "GET", f"/v1/jobs?label=k0&label=k0=v&{at_limit}")
    assert code == 400, page
    assert page["error"]["code"] == "invalid_query"
    assert page["error"]["field"] == "label"
    assert str(MAX_LABEL_FILTERS) in page["error"]["message"]
    code, page = await daemon.json("GET", "/v1/jobs?label=k0=v")
    assert [j["id"] for j in page["jobs"]] == [job["id"]]


@pytest_twisted.ensureDeferred
async def test_a_task_result_over_the_limit_fails_its_job_saying_why(make_daemon):
    """
    A local task that returns more than MAX_RESULT_BYTES of JSON fails its
    job with an error giving the size and the limit, and nothing of the
    result is stored; one under the limit succeeds with its result.
    """
    daemon = await make_daemon()
    big = await daemon.submit({"task": "describe", "args": ["x" * MAX_RESULT_BYTES]})
    small = await daemon.submit({"task": "describe", "args": ["x" * 1000]})
    job = await daemon.wait(big["id"])
    assert job["state"] == "failed", job
    assert job["result"] is None
    assert str(MAX_RESULT_BYTES) in job["error"] and "bytes of JSON" in job["error"]
    assert job["attempts"][-1]["error"] == job["error"]
    job = await daemon.wait(small["id"])
    assert job["state"] == "succeeded", job
    assert job["result"]["args"] == ["x" * 1000]


@pytest_twisted.ensureDeferred
async def test_a_worker_result_over_the_limit_is_refused_naming_it(make_daemon, token_file):
    """
    A remote worker's report holding a result over MAX_RESULT_BYTES is a
    400 naming results[i].result, and nothing of the report is recorded:
    the job stays running under its lease, and a report within the limit
    then ends it.
    """
    daemon = await make_daemon(f"[executor]\nslots = 0\n[workers]\ntoken_file = {token_file}\n")
    jobs = await daemon.batch([{"task": "describe"}, {"task": "describe"}])
    who = worker("w1", tasks=["describe"])
    leases = await lease(daemon, who, max_jobs=2)
    assert len(leases) == 2
    items = [
        {"job_id": l["job_id"], "token": l["token"], "state": "succeeded", "result": r}
        for l, r in zip(leases, [1, {"x": "y" * MAX_RESULT_BYTES}])
    ]
    code, answer = await report(daemon, who, items)
    assert code == 400, answer
    assert answer["error"]["field"] == "results[1].result"
    assert str(MAX_RESULT_BYTES) in answer["error"]["message"]
    for job in jobs:
        code, view = await daemon.json("GET", f"/v1/jobs/{job['id']}")
        assert view["state"] == "running", view
    items[1]["result"] = {"x": "y"}
    code, answer = await report(daemon, who, items)
    assert code == 200, answer
    for job, result in zip(leases, [1, {"x": "y"}]):
        code, view = await daemon.json("GET", f"/v1/jobs/{job['job_id']}")
        assert (view["state"], view["result"]) == ("succeeded", result)


@pytest_twisted.ensureDeferred
async def test_an_array_storing_more_than_max_stored_bytes_is_refused(daemon):
    """
    An array whose members would store more than [dispatcher]
    max_stored_bytes (16 MiB by default), each the whole spec, is a 400
    naming array with the sizes and how many members fit, and nothing is
    stored: the 93 KB spec of the finding, 10,000 times, was 2 GB.
    """
    spec = {"command": ["true"], "env": {"BLOB": "x" * 93_000}}
    code, answer = await daemon.json("POST", "/v1/jobs", {**spec, "array": 10_000})
    assert code == 400, answer
    assert answer["error"]["field"] == "array"
    message = answer["error"]["message"]
    assert "max_stored_bytes" in message and str(16 * 1024 * 1024) in message
    fit = int(re.search(r"at most (\d+) jobs of this size", message).group(1))
    assert 170 < fit < 181
    code, page = await daemon.json("GET", "/v1/jobs")
    assert page["jobs"] == []
    code, answer = await daemon.json("POST", "/v1/jobs", {**spec, "array": fit + 1})
    assert (code, answer["error"]["field"]) == (400, "array")
    code, answer = await daemon.json("POST", "/v1/jobs", {**spec, "array": fit})
    assert code == 201, answer
    assert len(answer["jobs"]) == fit


@pytest_twisted.ensureDeferred
async def test_a_batch_whose_arrays_store_too_much_is_refused_whole(make_daemon):
    """
    The arrays of one batch count together against max_stored_bytes: two
    that fit alone and not together are a 400 naming jobs, and nothing of
    the batch is stored.
    """
    daemon = await make_daemon(
        "[executor]\nslots = 0\n[dispatcher]\nmax_stored_bytes = 100000\n")
    item = {"command": ["true"], "env": {"X": "y" * 1000}, "array": 60}
    code, answer = await daemon.json("POST", "/v1/jobs/batch",
                                     {"jobs": [item, {"command": ["true"]}, item]})
    assert code == 400, answer
    assert answer["error"]["field"] == "jobs"
    assert "100000" in answer["error"]["message"]
    code, answer = await daemon.json("POST", "/v1/jobs/batch",
                                     {"jobs": [item, {**item, "array": 200}]})
    assert (code, answer["error"]["field"]) == (400, "jobs[1].array")
    code, page = await daemon.json("GET", "/v1/jobs")
    assert page["jobs"] == []
    code, answer = await daemon.json("POST", "/v1/jobs/batch",
                                     {"jobs": [item, {"command": ["true"]}]})
    assert code == 201, answer
    # The document says the configured limit.
    code, document = await daemon.json("GET", "/v1/openapi.json")
    array = document["components"]["schemas"]["JobSubmission"]["properties"]["array"]
    assert "max_stored_bytes = 100000" in array["anyOf"][0]["description"]


@pytest_twisted.ensureDeferred
async def test_depending_on_more_jobs_than_the_limit_is_refused(daemon, monkeypatch):
    """
    A batch whose jobs would depend on more than MAX_DEPENDENCY_LINKS jobs
    in all (an array counting as its members) is a 400 naming the entry
    that went past, and nothing of it is stored; naming the same array
    again and again counts it once.
    """
    monkeypatch.setattr("dispatcher.store._submissions.MAX_DEPENDENCY_LINKS", 100)
    array = await daemon.json("POST", "/v1/jobs", {"command": ["true"], "array": 60})
    array_id = array[1]["jobs"][0]["array_id"]
    code, answer = await daemon.json("POST", "/v1/jobs/batch", {"jobs": [
        {"command": ["true"], "depends_on": [array_id]},
        {"command": ["true"], "depends_on": [array_id]},
    ]})
    assert code == 400, answer
    assert answer["error"]["field"] == "jobs[1].depends_on[0]"
    assert answer["error"]["code"] == "invalid_field"
    assert "100" in answer["error"]["message"]
    code, page = await daemon.json("GET", "/v1/jobs?limit=1000")
    assert len(page["jobs"]) == 60
    job = await daemon.submit({"command": ["true"], "depends_on": [array_id] * 1000})
    assert job["state"] == "pending"
    assert job["wait_reason"].startswith("waiting for 60 job(s) to succeed")


@pytest_twisted.ensureDeferred
async def test_a_dependency_named_a_thousand_times_is_read_once(daemon):
    """
    The writer resolves an array named a thousand times in depends_on once:
    it reads the array's members one time, not a thousand.
    """
    sqlite_file_only()
    code, array = await daemon.json("POST", "/v1/jobs", {"command": ["true"], "array": 500})
    array_id = array["jobs"][0]["array_id"]
    reads = []
    connection = daemon.service.store._writer.connection
    connection.set_trace_callback(
        lambda sql: reads.append(sql) if "array_id = " in sql else None)
    try:
        job = await daemon.submit({"command": ["true"], "depends_on": [array_id] * 1000})
    finally:
        connection.set_trace_callback(None)
    assert job["wait_reason"].startswith("waiting for 500 job(s) to succeed")
    assert len(reads) == 1, reads[:3]


@pytest_twisted.ensureDeferred
async def test_ends_of_an_array_do_not_each_read_all_of_a_dependents_dependencies(tmp_path):
    """
    As the members of an array a job depends on end one by one, the writer
    reads which jobs the dependent still waits for only once a few are
    left: reading them at every end made 10,000 ends of an array hold the
    writer for 85 s.  The dependent still says how many it waits for, and
    is queued after the last.
    """
    store = SQLiteJobStore(str(tmp_path / "db.sqlite3"), reactor)
    await store.open()
    try:
        array_id = ids.new()
        await store.submit(
            [JobSpec(command=("true",), array_id=array_id, array_index=i) for i in range(30)],
            1.0, [ids.new() for _ in range(30)])
        (job,) = (await store.submit([JobSpec(command=("true",), depends_on=(array_id,))],
                                     1.0, [ids.new()])).value.jobs
        leases = (await store.claim(Offer("h", 30), 30, 2.0, 3600)).leases
        reads = []
        connection = store._writer.connection
        connection.set_trace_callback(
            lambda sql: reads.append(sql) if "!= 'succeeded'" in sql else None)
        reasons = []
        for lease in leases:
            await store.finish(lease, Outcome.from_exit_code(0), 3.0)
            reasons.append((await store.get(job.id)).wait_reason)
        connection.set_trace_callback(None)
        assert len(reads) == 3
        assert reasons[0] == "waiting for 29 job(s) to succeed"
        assert reasons[-2].startswith("waiting for 1 job(s) to succeed: ")
        assert (await store.get(job.id)).state is JobState.QUEUED
    finally:
        await store.close()


def test_the_readme_states_the_limits():
    """
    The README says the limits as the constants have them.
    """
    with open("README.md") as f:
        text = " ".join(f.read().split())
    assert f"up to {MAX_LABEL_FILTERS} times" in text
    assert f"at most {MAX_DEPENDENCY_LINKS:,} jobs in all" in text
    assert f"{MAX_RESULT_BYTES:,} bytes) as JSON" in text
