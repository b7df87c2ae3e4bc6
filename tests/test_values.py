"""
Values that can be served (issue 16): what a job holds is JSON that every
answer can carry.  Text no UTF-8 can carry (a lone surrogate) and numbers
that are not finite are refused with a 400 naming the field wherever a
request brings them; a task result that cannot be stored fails its job
saying why, locally and on a remote worker, and never leaves it running; a
query integer out of range is a 400; what older versions stored is repaired
by schema migration 6, and a page holding such a row is still served.
Real daemons on loopback, a real `twistd` and real worker processes.
"""

import json
import os
import shutil
import sqlite3

import pytest
import pytest_twisted
from hypothesis import given

from dispatcher.api._routes import digits_at_most
from dispatcher.model._values import (
    MAX_INTEGER_DIGITS,
    MAX_NESTING,
    UnservableValue,
    repaired,
    servable_text,
    storable,
)
from dispatcher.store._schema import MIGRATIONS, migrate
from dispatcher.wire._types import MAX_CURSOR, MAX_OFFSET

from .conftest import TEST_TASKS, WORKER_TOKEN
from .test_json import values
from .test_remote import poll
from .test_twistd import Twistd
from .test_worker import WorkerProcess
from .postgres import sqlite_file_only

DATA = os.path.join(os.path.dirname(__file__), "data", "schema5")
GIVE = "give = tests.tasks:give\n"
WORKER = {"Authorization": [f"Bearer {WORKER_TOKEN}"]}
# A token of the right form that the dispatcher never gave.
STALE = "999999.AAAAAAAAAAAAAAAAAAAAAA"


def nested(depth):
    value = []
    for _ in range(depth - 1):
        value = [value]
    return value


# The rule, alone


@given(values)
def test_every_json_value_is_storable_as_it_is(value):
    """A value JSON carries (text, finite numbers, arrays, objects with
    text keys) is storable, and stays the very same object."""
    assert storable(value) is value


@pytest.mark.parametrize("value, where, why", [
    ("\ud800", "result", "surrogate (\\ud800)"),
    ({"a": ["x", "b\udfff"]}, "result.a[1]", "surrogate (\\udfff)"),
    ({"k": {"\udc00": 1}}, "result.k", "a key holds a lone UTF-16 surrogate"),
    (float("nan"), "result", "nan is not a JSON number"),
    ([1, {"x": float("-inf")}], "result[1].x", "-inf is not a JSON number"),
    ({1: "a", "1": "b"}, "result", "two keys, 1 and '1', are both written '1'"),
    ({None: 1, "null": 2}, "result", "both written 'null'"),
    ({1, 2}, "result", "a set is not a JSON value"),
    ({(1, 2): 3}, "result", "a key that is a tuple is not text"),
    (nested(MAX_NESTING + 1), "result", f"nested more than {MAX_NESTING} deep"),
    ({"a": nested(MAX_NESTING)}, "result", f"nested more than {MAX_NESTING} deep"),
    # (Named: pytest cannot write such an integer in a test's id either.)
    pytest.param(10 ** MAX_INTEGER_DIGITS, "result", f"more than {MAX_INTEGER_DIGITS} digits",
                 id="huge-int"),
    pytest.param([0, -10 ** 5000], "result[1]", f"more than {MAX_INTEGER_DIGITS} digits",
                 id="huge-int-in-list"),
    pytest.param({"n": {10 ** 5000: 1}}, "result.n", "a key that is an integer of more than",
                 id="huge-int-key"),
])
def test_what_cannot_be_stored_is_named(value, where, why):
    """A lone surrogate (in text or a key), NaN or an infinity, two keys
    JSON writes alike, a value JSON has no form for, or nesting past the
    limit is refused, naming where it is and why."""
    with pytest.raises(UnservableValue) as caught:
        storable(value)
    assert caught.value.where == where and why in caught.value.why, caught.value


def test_integers_of_the_most_digits_are_storable():
    """An integer of MAX_INTEGER_DIGITS digits, the most the store writes
    and reads back, is storable as it is, in a list and as a key too."""
    largest = 10 ** MAX_INTEGER_DIGITS - 1
    assert storable(largest) == largest and storable([-largest]) == [-largest]
    assert storable({largest: 1}) == {str(largest): 1}


def test_keys_that_are_not_text_are_written_as_json_writes_them():
    """An object's keys that are not text become the text json.dumps writes
    for them, as a task's result always showed them; the rest of the value
    is untouched, and nesting up to the limit is taken."""
    assert storable({1: "a", 2.5: {True: None}, None: [1]}) == {
        "1": "a", "2.5": {"true": None}, "null": [1]}
    deep = nested(MAX_NESTING)
    assert storable(deep) is deep


def test_subclasses_of_json_types_are_written_as_json_writes_them():
    """A str enum, an int enum, a namedtuple and an OrderedDict are stored
    as json.dumps writes them (a str enum's value, not its name)."""
    import collections
    import enum

    class Colour(str, enum.Enum):
        RED = "red"

    class Size(enum.IntEnum):
        BIG = 2

    point = collections.namedtuple("point", "x y")
    value = [Colour.RED, Size.BIG, point(1, 2.5), collections.OrderedDict(c=Colour.RED)]
    assert storable(value) == json.loads(json.dumps(value)) == ["red", 2, [1, 2.5], {"c": "red"}]


def test_error_text_keeps_its_surrogates_as_escapes():
    """An error message with a lone surrogate is stored with its escape in
    its place; text without one is the same object."""
    assert servable_text("boom \ud800!") == "boom \\ud800!"
    text = "déjà"
    assert servable_text(text) is text


def test_repair_says_what_it_replaced():
    """What an older version stored is made servable: each surrogate U+FFFD,
    each number that is not finite null, each replacement named."""
    value, faults = repaired({"a": ["x\ud800", float("nan")], "b": 1.5}, "result")
    assert value == {"a": ["x\ufffd", None], "b": 1.5}
    assert faults == ["result.a[0]: a lone surrogate (\\ud800), now U+FFFD",
                      "result.a[1]: nan, now null"]


# Inputs: a 400 naming the field, nothing stored

SURROGATE = b"\\ud800"
NOT_UTF8 = b"\xed\xa0\x80"


def submissions(bad):
    """(path, body, field) of submissions holding C{bad} where a string goes."""
    return [
        ("/v1/jobs", b'{"command": ["echo", "%s"]}' % bad, "command[1]"),
        ("/v1/jobs", b'{"command": ["echo"], "name": "a%s"}' % bad, "name"),
        ("/v1/jobs", b'{"command": ["echo"], "labels": {"team-x": "%s"}}' % bad,
         "labels.team-x"),
        ("/v1/jobs", b'{"command": ["echo"], "labels": {"%s": "x"}}' % bad, "labels"),
        ("/v1/jobs", b'{"command": ["echo"], "env": {"A": "%s"}}' % bad, "env.A"),
        ("/v1/jobs", b'{"task": "describe", "args": [1, {"k": "%s"}]}' % bad, "args[1].k"),
        ("/v1/jobs", b'{"task": "describe", "kwargs": {"a": ["%s"]}}' % bad, "kwargs.a[0]"),
        ("/v1/jobs", b'{"command": ["true"], "inputs": [{"url": "http://h/%s", "path": "a"}]}'
         % bad, "inputs[0].url"),
        ("/v1/jobs/batch", b'{"jobs": [{"command": ["true"]}, {"command": ["echo", "%s"]}]}'
         % bad, "jobs[1].command[1]"),
        ("/v1/jobs/batch", b'{"jobs": [{"task": "describe", "args": ["%s"]}]}' % bad,
         "jobs[0].args[0]"),
    ]


def worker_requests(bad):
    """(path, body, field) of worker requests holding C{bad} where a string
    goes."""
    offer = b'{"name": "w", "slots": 1}'
    item = b'{"job_id": "j", "token": "%s", "state": "succeeded"' % STALE.encode()
    return [
        ("/v1/leases", b'{"worker": {"name": "w%s", "slots": 1}, "wait": 0}' % bad,
         "worker.name"),
        ("/v1/leases", b'{"worker": {"name": "w", "slots": 1, "labels": {"site": "%s"}}, '
         b'"wait": 0}' % bad, "worker.labels.site"),
        ("/v1/leases", b'{"worker": {"name": "w", "slots": 1, "tasks": ["%s"]}, "wait": 0}'
         % bad, "worker.tasks[0]"),
        ("/v1/leases", b'{"worker": {"name": "w", "slots": 1, "instance": "%s"}, "wait": 0}'
         % bad, "worker.instance"),
        ("/v1/leases/heartbeat", b'{"worker": {"name": "%s", "slots": 1}, "leases": []}' % bad,
         "worker.name"),
        ("/v1/leases/results", b'{"worker": %s, "results": [%s, "result": {"k": "%s"}}]}'
         % (offer, item, bad), "results[0].result.k"),
        ("/v1/leases/results", b'{"worker": %s, "results": [%s, "error": "%s"}]}'
         % (offer, item, bad), "results[0].error"),
    ]


async def count_jobs(daemon):
    code, page = await daemon.json("GET", "/v1/jobs")
    assert code == 200, page
    return len(page["jobs"])


@pytest_twisted.ensureDeferred
async def test_text_no_utf8_carries_is_refused_naming_its_field(make_daemon, token_file):
    """A lone surrogate escape, or bytes that are not UTF-8, in any string of
    a submission, a batch, a worker's offer, heartbeat or result, a
    credential or a retry is a 400 invalid_field naming that string's
    field, saying why; nothing is stored and no worker is heard of."""
    daemon = await make_daemon(f"[workers]\ntoken_file = {token_file}\n")
    for bad, words in ((SURROGATE, "surrogate"), (NOT_UTF8, "not UTF-8")):
        cases = [(path, body, field, None) for path, body, field in submissions(bad)]
        cases += [(path, body, field, WORKER) for path, body, field in worker_requests(bad)]
        cases += [
            ("/v1/credentials", b'{"name": "a%s", "role": "reader"}' % bad, "name", None),
        ]
        for path, body, field, headers in cases:
            response, content = await daemon.request("POST", path, raw=body, headers=headers)
            error = json.loads(content)["error"]
            assert response.code == 400, (body, error)
            assert error["code"] == "invalid_field" and error["field"] == field, (body, error)
            assert error["message"].startswith(f"{field}: ") and words in error["message"]
    assert await count_jobs(daemon) == 0
    code, workers = await daemon.json("GET", "/v1/workers")
    assert code == 200 and workers["workers"] == []
    code, listed = await daemon.json("GET", "/v1/credentials")
    assert code == 200 and [c["name"] for c in listed["credentials"]] == ["admin"]


@pytest_twisted.ensureDeferred
async def test_query_text_and_headers_that_are_not_text_are_refused(make_daemon, token_file):
    """A label filter, an owner filter or a log chunk's job id that is not
    UTF-8 is a 400 invalid_query naming the parameter, and an
    Idempotency-Key that is not printable ASCII a 400 invalid_header:
    never a filter that silently matches something else, nor a 500."""
    daemon = await make_daemon(f"[workers]\ntoken_file = {token_file}\n")
    for path, field, headers in [
        ("/v1/jobs?label=%ED%A0%80", "label", None),
        ("/v1/jobs?label=team=%FF", "label", None),
        ("/v1/jobs?owner=%ED%A0%80", "owner", None),
    ]:
        response, content = await daemon.request("GET", path, headers=headers)
        error = json.loads(content)["error"]
        assert response.code == 400 and error == {
            "code": "invalid_query", "field": field, "message": error["message"]}, (path, error)
    response, content = await daemon.request(
        "POST", f"/v1/leases/log?job_id=%ED%A0%80&token={STALE}&stream=stdout&offset=0",
        raw=b"x", headers={**WORKER, "Content-Type": ["application/octet-stream"]})
    error = json.loads(content)["error"]
    assert response.code == 400 and error["field"] == "job_id", error
    response, content = await daemon.request(
        "POST", "/v1/jobs", {"command": ["true"]},
        headers={"Idempotency-Key": [b"k\xed\xa0\x80"]})
    error = json.loads(content)["error"]
    assert response.code == 400 and error["field"] == "Idempotency-Key", error
    assert await count_jobs(daemon) == 0


@pytest_twisted.ensureDeferred
async def test_numbers_that_are_not_finite_are_refused(make_daemon, token_file):
    """NaN and Infinity are not JSON (400 malformed_json), and a number too
    large for a float, which json would read as infinite and write as
    null, is a 400 naming its field saying it must be finite: in a task's
    arguments, a scheduling field and a worker's result; nothing stored."""
    daemon = await make_daemon(f"[workers]\ntoken_file = {token_file}\n")
    for raw in (b'{"task": "describe", "args": [NaN]}',
                b'{"task": "describe", "kwargs": {"a": -Infinity}}'):
        response, content = await daemon.request("POST", "/v1/jobs", raw=raw)
        assert response.code == 400 and json.loads(content)["error"]["code"] == "malformed_json"
    item = b'{"job_id": "j", "token": "%s", "state": "succeeded"' % STALE.encode()
    for path, raw, field, headers in [
        ("/v1/jobs", b'{"task": "describe", "args": [1e999999]}', "args[0]", None),
        ("/v1/jobs", b'{"task": "describe", "args": [1e999999], "priority": 1.0}', "args[0]",
         None),
        ("/v1/jobs", b'{"task": "describe", "kwargs": {"a": [-1e400]}}', "kwargs.a[0]", None),
        ("/v1/jobs", b'{"command": ["true"], "timeout": 1e400}', "timeout", None),
        ("/v1/jobs/batch", b'{"jobs": [{"task": "describe", "args": [1e999999]}]}',
         "jobs[0].args[0]", None),
        ("/v1/leases/results", b'{"worker": {"name": "w", "slots": 1}, "results": [%s, '
         b'"result": [1e999]}]}' % item, "results[0].result[0]", WORKER),
    ]:
        response, content = await daemon.request("POST", path, raw=raw, headers=headers)
        error = json.loads(content)["error"]
        assert response.code == 400 and error["field"] == field, (raw, error)
        assert "finite" in error["message"], error
    assert await count_jobs(daemon) == 0


@pytest_twisted.ensureDeferred
async def test_a_remote_result_nested_too_deep_is_refused(make_daemon, token_file):
    """A worker's result nested deeper than a task's arguments may be is a
    400 naming it (past what msgspec follows too), and its job keeps running under its
    lease; one nested to the limit is recorded and shown."""
    daemon = await make_daemon(
        f"[executor]\nslots = 0\n[workers]\ntoken_file = {token_file}\n")
    who = {"name": "w", "slots": 1, "tasks": ["describe"]}
    job = await daemon.submit({"task": "describe"})
    code, answer = await daemon.json(
        "POST", "/v1/leases", {"worker": who, "wait": 0}, headers=WORKER)
    (granted,) = answer["leases"]
    item = {"job_id": job["id"], "token": granted["token"], "state": "succeeded"}
    for depth in (MAX_NESTING + 1, 1000):
        raw = json.dumps({"worker": who, "results": [{**item, "result": 0}]}).replace(
            '"result": 0', '"result": ' + "[" * depth + "]" * depth).encode()
        response, content = await daemon.request(
            "POST", "/v1/leases/results", raw=raw, headers=WORKER)
        error = json.loads(content)["error"]
        assert response.code == 400 and error["field"] == "results[0].result", (depth, error)
        assert f"more than {MAX_NESTING} deep" in error["message"]
    code, shown = await daemon.json("GET", f"/v1/jobs/{job['id']}")
    assert shown["state"] == "running"
    code, answer = await daemon.json(
        "POST", "/v1/leases/results",
        {"worker": who, "results": [{**item, "result": nested(MAX_NESTING)}]}, headers=WORKER)
    assert code == 200 and answer["results"][0]["ok"], answer
    code, shown = await daemon.json("GET", f"/v1/jobs/{job['id']}")
    assert shown["state"] == "succeeded" and shown["result"] == nested(MAX_NESTING)


# Query integers


@pytest_twisted.ensureDeferred
async def test_query_integers_out_of_range_are_a_400(make_daemon, token_file):
    """A cursor past the largest the store holds, a limit or a log offset
    beyond its range (or of more digits than Python reads), and a log
    chunk's offset past a file offset, are each a 400 invalid_query naming
    the parameter; the largest cursor and offset are taken."""
    daemon = await make_daemon(f"[workers]\ntoken_file = {token_file}\n")
    job = await daemon.submit({"command": ["true"]})
    for path, field in [
        (f"/v1/jobs?cursor={MAX_CURSOR + 1}", "cursor"),
        (f"/v1/jobs?cursor={'9' * 5000}", "cursor"),
        (f"/v1/jobs?limit={'9' * 5000}", "limit"),
        (f"/v1/jobs?limit=%2B5", "limit"),
        (f"/v1/jobs/{job['id']}/log?offset={MAX_OFFSET + 1}", "offset"),
        (f"/v1/jobs/{job['id']}/log?offset={'9' * 5000}", "offset"),
    ]:
        response, content = await daemon.request("GET", path)
        error = json.loads(content)["error"]
        assert response.code == 400, (path[:80], error)
        assert error["code"] == "invalid_query" and error["field"] == field, error
    response, content = await daemon.request(
        "POST", f"/v1/leases/log?job_id=j&token={STALE}&stream=stdout&offset={2**64}",
        raw=b"x", headers={**WORKER, "Content-Type": ["application/octet-stream"]})
    error = json.loads(content)["error"]
    assert response.code == 400 and error["field"] == "offset", error
    code, page = await daemon.json("GET", f"/v1/jobs?cursor={MAX_CURSOR}")
    assert code == 200 and page["jobs"] == []
    code, page = await daemon.json("GET", f"/v1/jobs?cursor=000{MAX_CURSOR}")
    assert code == 200 and page["jobs"] == []
    response, _ = await daemon.request("GET", f"/v1/jobs/{job['id']}/log?offset={MAX_OFFSET}")
    assert response.code == 200


def test_the_document_bounds_the_query_integers():
    """The served document's cursor pattern takes every integer from 0 to
    the largest cursor and no larger one, and the log offsets' maximum is
    the largest file offset: the check and the schema read one constant."""
    import re

    from dispatcher.api._openapi import openapi_document

    document = openapi_document()
    (cursor,) = [p for p in document["paths"]["/v1/jobs"]["get"]["parameters"]
                 if p["name"] == "cursor"]
    pattern = re.compile(cursor["schema"]["pattern"])
    for taken in ("0", "7", "0042", str(MAX_CURSOR), "9" * 18, str(MAX_CURSOR - 10**9)):
        assert pattern.search(taken), taken
    for refused in (str(MAX_CURSOR + 1), "9" * 19, "1" + "0" * 19, "", "-1", "1a"):
        assert not pattern.search(refused), refused
    assert cursor["schema"]["pattern"] == digits_at_most(MAX_CURSOR)
    for path, method in (("/v1/jobs/{id}/log", "get"), ("/v1/leases/log", "post")):
        (offset,) = [p for p in document["paths"][path][method]["parameters"]
                     if p["name"] == "offset"]
        assert offset["schema"]["maximum"] == MAX_OFFSET


# Task results: a job fails saying why, never stays running


async def ended(daemon, job_id):
    """The job once it has finished (it must, within seconds)."""
    return await daemon.wait(job_id, timeout=10)


@pytest_twisted.ensureDeferred
async def test_a_task_result_that_cannot_be_stored_fails_its_job(make_daemon):
    """A task that returns a lone surrogate (in text or a key), two keys
    JSON writes alike, NaN, an infinity or a value nested past the limit
    fails, its error saying where and why, rather than staying running
    for ever or showing null; a task whose exception's words hold a lone
    surrogate fails with its escape; keys that are integers are shown as
    text; every list and job answer is served throughout."""
    daemon = await make_daemon(GIVE)
    for kind, words in [
        ("surrogate", "result: a lone UTF-16 surrogate (\\ud800)"),
        ("surrogate_key", "result: a key holds a lone UTF-16 surrogate (\\udc00)"),
        ("colliding_keys", "result: two keys, 1 and '1', are both written '1'"),
        ("nan", "result: nan is not a JSON number"),
        ("infinity", "result[0]: inf is not a JSON number"),
        ("deep", f"result: arrays and objects nested more than {MAX_NESTING} deep"),
        ("huge_int", f"result: an integer of more than {MAX_INTEGER_DIGITS} digits"),
        ("huge_int_in_list", f"result[1]: an integer of more than {MAX_INTEGER_DIGITS}"),
        ("huge_int_key", f"result: a key that is an integer of more than {MAX_INTEGER_DIGITS}"),
    ]:
        job = await daemon.submit({"task": "give", "args": [kind]})
        done = await ended(daemon, job["id"])
        assert done["state"] == "failed" and done["result"] is None, (kind, done)
        assert words in done["error"], (kind, done["error"])
        assert "is not JSON the dispatcher can store and serve" in done["error"]
        assert done["attempts"][-1]["error"] == done["error"]
    job = await daemon.submit({"task": "give", "args": ["raise"]})
    done = await ended(daemon, job["id"])
    assert done["state"] == "failed" and "no \\ud800 here" in done["error"], done
    job = await daemon.submit({"task": "give", "args": ["int_keys"]})
    done = await ended(daemon, job["id"])
    assert done["state"] == "succeeded" and done["result"] == {"1": "a", "2": "b"}
    code, page = await daemon.json("GET", "/v1/jobs")
    assert code == 200 and len(page["jobs"]) == 11
    assert not [j for j in page["jobs"] if j["state"] == "running"]


@pytest_twisted.ensureDeferred
async def test_an_end_the_store_cannot_write_fails_the_job(make_daemon, monkeypatch):
    """A local end the store cannot write as it is (past the executor's
    check: here the store's own encoding refuses it) is recorded as a
    failure saying why, the job is not left running, and a cancel then
    answers that it has finished."""
    from dispatcher.store import _leases

    real = _leases.encode_stored

    def refusing(value):
        if value == "refuse me":
            raise TypeError("the store cannot write this")
        return real(value)

    monkeypatch.setattr(_leases, "encode_stored", refusing)
    daemon = await make_daemon(GIVE)
    job = await daemon.submit({"task": "describe", "args": ["x"]})
    assert (await ended(daemon, job["id"]))["state"] == "succeeded"
    job = await daemon.submit({"task": "give", "args": ["refuse"]})
    done = await ended(daemon, job["id"])
    assert done["state"] == "failed" and done["result"] is None
    assert done["error"] == ("its end (succeeded) could not be recorded: "
                             "TypeError: the store cannot write this"), done
    code, _ = await daemon.json("POST", f"/v1/jobs/{job['id']}/cancel")
    assert code == 409


@pytest.fixture
def remote(tmp_path, token_file):
    """A real twistd dispatcher that runs nothing itself, and a real worker
    process that runs the test tasks; both stopped at teardown."""
    daemon = Twistd(
        str(tmp_path),
        f"[executor]\nslots = 0\n[tasks]\ngive = tests.tasks:give\n"
        f"[workers]\ntoken_file = {token_file}\n")
    daemon.start()
    worker = WorkerProcess(tmp_path, daemon.url, token_file, slots=2, name="w",
                           ini=TEST_TASKS + GIVE)
    worker.start()
    yield daemon
    worker.kill()
    daemon.stop()


def test_a_remote_task_result_that_cannot_be_stored_fails_its_job(remote):
    """On a remote worker, a task returning a lone surrogate, two keys JSON
    writes alike or NaN fails its job saying why, as it does locally: not
    stuck running while the worker cannot send it, not silently one key
    short, not null."""
    daemon = remote
    for kind, words in [
        ("surrogate", "a lone UTF-16 surrogate (\\ud800)"),
        ("colliding_keys", "two keys, 1 and '1', are both written '1'"),
        ("nan", "nan is not a JSON number"),
        # A number no JSON encoder writes: it once failed the worker's
        # whole report, this job's and every later one's, and left them
        # all running for ever.
        ("huge_int", f"an integer of more than {MAX_INTEGER_DIGITS} digits"),
        ("huge_int_in_list", f"an integer of more than {MAX_INTEGER_DIGITS} digits"),
    ]:
        code, job = daemon.request("POST", "/v1/jobs", {"task": "give", "args": [kind]})
        assert code == 201, job
        done = poll(lambda: (lambda j: j if j["state"] in ("succeeded", "failed") else None)(
            daemon.request("GET", f"/v1/jobs/{job['id']}")[1]), what=f"{kind} to end")
        assert done["state"] == "failed" and words in done["error"], (kind, done)
        assert done["worker"] == "w"
    # And the worker reports on: a job after them succeeds.
    code, job = daemon.request("POST", "/v1/jobs", {"task": "give", "args": ["int_keys"]})
    done = poll(lambda: (lambda j: j if j["state"] in ("succeeded", "failed") else None)(
        daemon.request("GET", f"/v1/jobs/{job['id']}")[1]), what="a later job to end")
    assert done["state"] == "succeeded", done


# What older versions stored


def test_migration_6_repairs_what_older_versions_stored(tmp_path):
    """A schema-5 database holding what versions before the store's own
    form wrote (a lone surrogate escape, NaN, Infinity) is repaired by
    migration 6: each made servable, and the job's error says what was
    replaced, after its own words; a job with none is untouched."""
    path = str(tmp_path / "v5.sqlite3")
    conn = sqlite3.connect(path, isolation_level=None)
    for migration in MIGRATIONS[:5]:
        for statement in migration.split(";"):
            if statement.strip():
                conn.execute(statement)
    conn.execute("PRAGMA user_version = 5")
    rows = [
        ("a", '{"args":["\\ud800"],"kwargs":{},"task":"t"}', '{"x":[NaN,1]}', "it broke"),
        ("b", '{"command":["true"]}', "Infinity", None),
        ("c", '{"args":["\\ud83d\\ude00 NaN Infinity"],"kwargs":{},"task":"t"}', '"\\ud83d\\ude00"',
         None),
    ]
    for job_id, spec, result, error in rows:
        conn.execute(
            "INSERT INTO jobs (id, state, name, labels, spec, created_at, result, error)"
            " VALUES (?, 'succeeded', NULL, '{}', ?, 1.0, ?, ?)", (job_id, spec, result, error))
    migrate(conn, path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS) >= 6
    got = {row[0]: row[1:] for row in conn.execute("SELECT id, spec, result, error FROM jobs")}
    assert got["a"] == (
        '{"args":["\ufffd"],"kwargs":{},"task":"t"}', '{"x":[null,1]}',
        "it broke (schema migration 6 replaced what could not be served: args[0]: a lone "
        "surrogate (\\ud800), now U+FFFD; result.x[0]: nan, now null)")
    assert got["b"] == ('{"command":["true"]}', "null",
                        "schema migration 6 replaced what could not be served: result: inf, "
                        "now null")
    assert got["c"] == rows[2][1:]


def test_a_python_migration_that_fails_changes_nothing(tmp_path, monkeypatch):
    """A migration that is a Python step runs in its own transaction: if it
    fails, what it did is undone and the version stays where it was."""
    from dispatcher.store import _schema

    def half_done(conn):
        conn.execute("UPDATE jobs SET name = 'changed'")
        raise RuntimeError("stopped half way")

    path = str(tmp_path / "db.sqlite3")
    conn = sqlite3.connect(path, isolation_level=None)
    monkeypatch.setattr(_schema, "MIGRATIONS", MIGRATIONS[:5])
    _schema.migrate(conn, path)
    conn.execute("INSERT INTO jobs (id, state, name, labels, spec, created_at)"
                 " VALUES ('j', 'queued', 'kept', '{}', '{}', 1.0)")
    monkeypatch.setattr(_schema, "MIGRATIONS", (*MIGRATIONS[:5], half_done))
    with pytest.raises(RuntimeError):
        _schema.migrate(conn, path)
    # (The store closes the connection of a failed open.)
    conn.close()
    conn = sqlite3.connect(path, isolation_level=None)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 5
    assert conn.execute("SELECT name FROM jobs").fetchall() == [("kept",)]


def test_a_data_directory_made_by_main_is_served_after_migration_6(tmp_path):
    """The data directory of a dispatcher at schema 5 (made by main at
    cc4f8ae: tests/data/schema5/make.py) holding what older versions stored
    starts under this one: every page and every job is served (main
    answered 500 for the list and for three of the jobs), each repaired
    job's error says what was replaced, and the database is at the newest version."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("dispatcher.sqlite3", "dispatcher.sqlite3.mark"):
        shutil.copy(os.path.join(DATA, name), data / name)
    with open(os.path.join(DATA, "ids.json")) as f:
        ids = json.load(f)
    daemon = Twistd(str(tmp_path), "[tasks]\ndescribe = tests.tasks:describe\n")
    daemon.start()
    try:
        code, page = daemon.request("GET", "/v1/jobs?limit=2")
        assert code == 200 and len(page["jobs"]) == 2
        code, page = daemon.request("GET", f"/v1/jobs?limit=10&cursor={page['next_cursor']}")
        assert code == 200 and len(page["jobs"]) == 3
        jobs = {}
        for name, job_id in ids.items():
            code, jobs[name] = daemon.request("GET", f"/v1/jobs/{job_id}")
            assert code == 200, (name, jobs[name])
    finally:
        daemon.stop()
    note = "schema migration 6 replaced what could not be served: "
    described = jobs["described"]
    assert described["result"] == {"score": None, "smile": "\U0001f600", "text": "caf\ufffd"}
    assert described["error"] == note + (
        "result.score: nan, now null; result.text: a lone surrogate (\\ud800), now U+FFFD")
    assert jobs["added"]["result"] is None and jobs["added"]["error"] == (
        note + "result: inf, now null")
    assert jobs["plain"]["command"] == ["echo", "\ufffd"]
    assert jobs["plain"]["env"] == {"A": "\ufffd"}
    assert jobs["waiting"]["state"] == "pending" and jobs["waiting"]["args"] == ["\ufffdlater"]
    assert jobs["failed"]["error"] == "the task raised ValueError: boom"
    conn = sqlite3.connect(str(data / "dispatcher.sqlite3"))
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS) >= 6
    conn.close()
    log = open(tmp_path / "out.log").read()
    assert "schema migration 6 repaired 4 jobs" in log


@pytest_twisted.ensureDeferred
async def test_a_row_that_cannot_be_served_does_not_fail_its_pages(make_daemon, tmp_path):
    """A row holding a lone surrogate that gets into the store anyway (here
    written behind the daemon's back, as an older version wrote it) does
    not make the pages and the job that show it fail: they are served with
    U+FFFD in its place, and the other jobs with them."""
    sqlite_file_only()
    daemon = await make_daemon()
    first = await daemon.submit({"command": ["true"], "name": "before"})
    job = await daemon.submit({"command": ["true"], "name": "bad"})
    last = await daemon.submit({"command": ["true"], "name": "after"})
    for j in (first, job, last):
        await daemon.wait(j["id"])
    conn = sqlite3.connect(str(tmp_path / "data" / "dispatcher.sqlite3"), isolation_level=None)
    conn.execute("UPDATE jobs SET result = ? WHERE id = ?", ('{"a":"x\\ud800"}', job["id"]))
    conn.close()
    code, page = await daemon.json("GET", "/v1/jobs")
    assert code == 200 and [j["name"] for j in page["jobs"]] == ["before", "bad", "after"]
    assert page["jobs"][1]["result"] == {"a": "x\ufffd"}
    code, shown = await daemon.json("GET", f"/v1/jobs/{job['id']}")
    assert code == 200 and shown["result"] == {"a": "x\ufffd"}
