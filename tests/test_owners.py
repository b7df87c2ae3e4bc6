"""
Every job has an owner, the principal that submitted it: shown in the job,
filterable with C{?owner=}, and enforced, against a real daemon with real
credentials.  A submitter sees, cancels, retries and reads the logs of its
own jobs alone, and another's job is a 404 exactly like a missing one; a
reader sees all.
"""

import json
import sqlite3

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred

from dispatcher.store._schema import MIGRATIONS

from .test_leases import lease, worker
from .postgres import sqlite_file_only

# The credentials these tests make, by name: two submitters and a reader.
# "admin" is the daemon's own, made on its first start.
ROLES = {"ann": "submitter", "bob": "submitter", "rita": "reader"}


async def with_credentials(daemon):
    """
    Make the credentials of ROLES on C{daemon}, as its admin, and keep
    their tokens (C{daemon.tokens}, by name; the admin's too).
    """
    daemon.tokens = {"admin": daemon.token}
    for name, role in ROLES.items():
        code, made = await daemon.json("POST", "/v1/credentials", {"name": name, "role": role})
        assert code == 201, made
        daemon.tokens[name] = made["token"]
    return daemon


async def call(daemon, who, method, path, body=None, headers=None, raw=None):
    """A request with the credential of C{who}: its status and its JSON body."""
    response, content = await daemon.request(
        method, path, body,
        headers={"Authorization": [f"Bearer {daemon.tokens[who]}"], **(headers or {})},
        raw=raw)
    return response.code, json.loads(content) if content else None


@pytest.fixture
def daemon(make_daemon):
    """A daemon that runs nothing (jobs stay queued), with the credentials
    of ROLES."""
    async def make():
        return await with_credentials(await make_daemon("[executor]\nslots = 0\n"))

    return pytest_twisted.blockon(Deferred.fromCoroutine(make()))


async def submit(daemon, who, body):
    code, job = await call(daemon, who, "POST", "/v1/jobs", body)
    assert code == 201, job
    return job


@pytest_twisted.ensureDeferred
async def test_every_job_shows_the_principal_that_submitted_it(daemon):
    """A job's owner is its submitter's name, however it was submitted (one
    job, an array, a batch of full or of plain jobs), and every view of it
    shows it; the daemon's own admin credential is named admin."""
    one = await submit(daemon, "ann", {"command": ["true"]})
    assert one["owner"] == "ann"
    code, array = await call(daemon, "bob", "POST", "/v1/jobs",
                             {"command": ["true"], "array": 2},
                             headers={"Prefer": ["return=representation"]})
    assert code == 201 and [j["owner"] for j in array["jobs"]] == ["bob", "bob"]
    code, plain = await call(daemon, "ann", "POST", "/v1/jobs/batch",
                             {"jobs": [{"command": ["true"]}, {"task": "add", "args": [1, 2]}]})
    assert code == 201
    code, full = await call(daemon, "rita", "POST", "/v1/jobs/batch",
                            {"jobs": [{"command": ["true"], "name": "n"}]})
    assert code == 403
    code, full = await call(daemon, "admin", "POST", "/v1/jobs/batch",
                            {"jobs": [{"command": ["true"], "name": "n"}]})
    assert code == 201
    for job_id, owner in [(one["id"], "ann"), (array["jobs"][1]["id"], "bob"),
                          (plain["jobs"][1]["id"], "ann"), (full["jobs"][0]["id"], "admin")]:
        code, job = await call(daemon, "admin", "GET", f"/v1/jobs/{job_id}")
        assert code == 200 and job["owner"] == owner
    code, page = await call(daemon, "rita", "GET", "/v1/jobs")
    assert [j["owner"] for j in page["jobs"]] == ["ann", "bob", "bob", "ann", "ann", "admin"]


@pytest_twisted.ensureDeferred
async def test_a_list_filters_by_owner(daemon):
    """?owner= lists one principal's jobs to whoever sees all; to a
    submitter, its own name lists its jobs and another's lists nothing,
    as does no filter but its own jobs."""
    mine = [(await submit(daemon, "ann", {"command": ["true"]}))["id"] for _ in range(3)]
    theirs = [(await submit(daemon, "bob", {"command": ["true"]}))["id"] for _ in range(2)]

    async def listed(who, query=""):
        code, page = await call(daemon, who, "GET", f"/v1/jobs{query}")
        assert code == 200, page
        return [j["id"] for j in page["jobs"]]

    assert await listed("rita", "?owner=bob") == theirs
    assert await listed("admin", "?owner=ann&limit=2") == mine[:2]
    assert await listed("rita") == mine + theirs
    assert await listed("ann") == mine
    assert await listed("ann", "?owner=ann&state=queued") == mine
    assert await listed("ann", "?owner=bob") == []
    assert await listed("bob") == theirs
    assert await listed("rita", "?owner=nobody") == []


@pytest.mark.parametrize("query", [
    "owner=", "owner=.ann", "owner=a%20b", "owner=" + "a" * 65, "owner=ann%0A",
    "owner=ann&owner=bob",
])
@pytest_twisted.ensureDeferred
async def test_an_owner_that_is_no_principals_name_is_refused(daemon, query):
    """An owner filter that no principal could be named (or given twice) is
    a 400 naming the parameter, to a submitter too."""
    for who in ("rita", "ann"):
        code, body = await call(daemon, who, "GET", f"/v1/jobs?{query}")
        assert code == 400 and body["error"]["code"] == "invalid_query", body
        assert body["error"]["field"] == "owner"


@pytest_twisted.ensureDeferred
async def test_another_submitters_job_is_answered_as_a_missing_one(daemon):
    """To a submitter, another's job, its log, its cancel and its retry are
    each answered exactly as for an id of no job (the same 404 and words),
    and change nothing; a reader sees it, and its owner acts on it."""
    bob = await submit(daemon, "bob", {"command": ["true"]})
    missing = "0190b1d2-0000-7000-8000-000000000000"
    for method, path in [("GET", "/v1/jobs/{}"), ("GET", "/v1/jobs/{}/log"),
                         ("GET", "/v1/jobs/{}/log?stream=stderr"),
                         ("POST", "/v1/jobs/{}/cancel"), ("POST", "/v1/jobs/{}/retry")]:
        theirs = await call(daemon, "ann", method, path.format(bob["id"]))
        none = await call(daemon, "ann", method, path.format(missing))
        assert theirs[0] == none[0] == 404, (path, theirs)
        assert json.dumps(theirs[1]).replace(bob["id"], missing) == json.dumps(none[1])
    code, seen = await call(daemon, "rita", "GET", f"/v1/jobs/{bob['id']}")
    assert code == 200 and seen["state"] == "queued" and seen == bob | {
        "wait_reason": seen["wait_reason"]}
    code, cancelled = await call(daemon, "bob", "POST", f"/v1/jobs/{bob['id']}/cancel")
    assert code == 200 and cancelled["state"] == "cancelled"
    code, _ = await call(daemon, "ann", "POST", f"/v1/jobs/{bob['id']}/retry")
    assert code == 404
    code, retried = await call(daemon, "bob", "POST", f"/v1/jobs/{bob['id']}/retry")
    assert code == 200 and retried["state"] == "queued"


@pytest_twisted.ensureDeferred
async def test_a_submitters_queue_counts_are_its_own(make_daemon):
    """GET /v1/queues counts a submitter's own jobs alone, every queue
    still named; a reader's counts are everyone's."""
    daemon = await with_credentials(await make_daemon(
        "[executor]\nslots = 0\n[queue:gpu]\nmax_running = 1\n"))
    await submit(daemon, "ann", {"command": ["true"], "queue": "gpu"})
    await submit(daemon, "bob", {"command": ["true"]})
    await submit(daemon, "bob", {"command": ["true"]})
    code, ann = await call(daemon, "ann", "GET", "/v1/queues")
    assert code == 200
    assert ann["queues"]["gpu"]["counts"]["queued"] == 1
    assert ann["queues"]["default"]["counts"]["queued"] == 0
    assert ann["queues"]["gpu"]["max_running"] == 1
    code, bob = await call(daemon, "bob", "GET", "/v1/queues")
    assert bob["queues"]["default"]["counts"]["queued"] == 2
    assert bob["queues"]["gpu"]["counts"]["queued"] == 0
    code, everyone = await call(daemon, "rita", "GET", "/v1/queues")
    assert everyone["queues"]["default"]["counts"]["queued"] == 2
    assert everyone["queues"]["gpu"]["counts"]["queued"] == 1


@pytest_twisted.ensureDeferred
async def test_depending_on_another_submitters_job_is_refused_as_an_unknown_one(daemon):
    """A submitter's depends_on naming another's job or array is refused
    exactly as an id of no job is, alone or in a batch, and stores
    nothing; its own jobs it may name, and an admin anyone's."""
    bob = await submit(daemon, "bob", {"command": ["true"]})
    code, array = await call(daemon, "bob", "POST", "/v1/jobs", {"command": ["true"],
                                                                 "array": 2})
    array_id = array["jobs"][0]["array_id"]
    missing = "0190b1d2-0000-7000-8000-000000000000"
    for name in (bob["id"], array_id):
        theirs = await call(daemon, "ann", "POST", "/v1/jobs",
                            {"command": ["true"], "depends_on": [name]})
        none = await call(daemon, "ann", "POST", "/v1/jobs",
                          {"command": ["true"], "depends_on": [missing]})
        assert theirs[0] == none[0] == 400
        assert json.dumps(theirs[1]).replace(name, missing) == json.dumps(none[1])
        assert theirs[1]["error"]["code"] == "unknown_dependency"
        code, batch = await call(daemon, "ann", "POST", "/v1/jobs/batch", {"jobs": [
            {"command": ["true"]}, {"command": ["true"], "depends_on": [0, name]}]})
        assert code == 400 and batch["error"]["field"] == "jobs[1].depends_on[1]"
    code, page = await call(daemon, "ann", "GET", "/v1/jobs")
    assert page["jobs"] == []
    mine = await submit(daemon, "ann", {"command": ["true"]})
    after = await submit(daemon, "ann", {"command": ["true"], "depends_on": [mine["id"]]})
    assert after["state"] == "pending"
    admins = await submit(daemon, "admin", {"command": ["true"], "depends_on": [bob["id"]]})
    assert admins["state"] == "pending" and admins["owner"] == "admin"


@pytest.mark.parametrize("path, body", [
    ("/v1/jobs", {"command": ["true"]}),
    ("/v1/jobs/batch", {"jobs": [{"command": ["true"]}]}),
    ("/v1/jobs/batch", {"jobs": [{"command": ["true"], "priority": 1}]}),
])
@pytest_twisted.ensureDeferred
async def test_idempotency_keys_are_each_principals_own(daemon, path, body):
    """Two principals sending the same Idempotency-Key and body each get
    their own jobs; sent again, each key answers its principal's jobs
    alone (by every way of submitting)."""
    headers = {"Idempotency-Key": ["same-key"], "Prefer": ["return=representation"]}

    async def send(who):
        code, answer = await call(daemon, who, "POST", path, body, headers=headers)
        return code, answer["jobs"] if "jobs" in answer else [answer]

    ann_code, ann = await send("ann")
    bob_code, bob = await send("bob")
    assert ann_code == bob_code == 201
    assert {j["id"] for j in ann}.isdisjoint(j["id"] for j in bob)
    assert {j["owner"] for j in ann} == {"ann"} and {j["owner"] for j in bob} == {"bob"}
    for who, first in (("ann", ann), ("bob", bob)):
        code, again = await send(who)
        assert code == 200 and [j["id"] for j in again] == [j["id"] for j in first]


@pytest_twisted.ensureDeferred
async def test_a_submitter_sees_the_jobs_workers_hold_of_its_own(make_daemon, token_file):
    """GET /v1/workers shows a submitter only its own jobs among those a
    worker holds; a reader sees them all."""
    daemon = await with_credentials(await make_daemon(
        f"[executor]\nslots = 0\n[workers]\ntoken_file = {token_file}\n"))
    ann = await submit(daemon, "ann", {"command": ["true"]})
    bob = await submit(daemon, "bob", {"command": ["true"]})
    assert len(await lease(daemon, worker("w", slots=2))) == 2

    async def running(who):
        code, answer = await call(daemon, who, "GET", "/v1/workers")
        assert code == 200
        (worker,) = answer["workers"]
        return worker["running"]

    assert await running("ann") == [ann["id"]]
    assert await running("bob") == [bob["id"]]
    assert await running("rita") == sorted([ann["id"], bob["id"]])


@pytest_twisted.ensureDeferred
async def test_jobs_stored_before_owners_have_none(make_daemon, tmp_path):
    """A data directory of schema version 4 starts, its jobs show owner
    null, and only a principal that sees every job sees them."""
    sqlite_file_only()
    data = tmp_path / "old"
    data.mkdir()
    conn = sqlite3.connect(str(data / "dispatcher.sqlite3"), isolation_level=None)
    for migration in MIGRATIONS[:4]:
        for statement in migration.split(";"):
            if statement.strip():
                conn.execute(statement)
    conn.execute("PRAGMA user_version = 4")
    conn.execute(
        "INSERT INTO jobs (id, state, name, labels, spec, created_at, finished_at, error)"
        " VALUES ('0190b1d2-0000-7000-8000-00000000beef', 'failed', NULL, '{}',"
        " '{\"command\":[\"true\"]}', 1.0, 2.0, 'e')")
    conn.close()
    daemon = await with_credentials(
        await make_daemon("[executor]\nslots = 0\n", data_dir=data))
    old = "0190b1d2-0000-7000-8000-00000000beef"
    code, job = await call(daemon, "rita", "GET", f"/v1/jobs/{old}")
    assert code == 200 and job["owner"] is None and job["state"] == "failed"
    code, _ = await call(daemon, "ann", "GET", f"/v1/jobs/{old}")
    assert code == 404
    code, _ = await call(daemon, "ann", "POST", f"/v1/jobs/{old}/retry")
    assert code == 404
    code, page = await call(daemon, "ann", "GET", "/v1/jobs")
    assert page["jobs"] == []
    code, retried = await call(daemon, "admin", "POST", f"/v1/jobs/{old}/retry")
    assert code == 200 and retried["owner"] is None


def test_the_document_shows_the_owner_and_its_filter():
    """The OpenAPI document shows every job's owner (a principal's name, or
    null) and GET /v1/jobs's owner filter, both from the one wire type."""
    from dispatcher.api._openapi import openapi_document
    from dispatcher.model._principals import PRINCIPAL_NAME_PATTERN as PRINCIPAL

    document = openapi_document()
    view = document["components"]["schemas"]["JobView"]
    assert "owner" in view["required"]
    kinds = view["properties"]["owner"]["anyOf"]
    assert {"type": "null"} in kinds
    (name,) = [k for k in kinds if k.get("type") == "string"]
    assert name["pattern"] == PRINCIPAL
    parameters = document["paths"]["/v1/jobs"]["get"]["parameters"]
    (owner,) = [p for p in parameters if p["name"] == "owner"]
    assert owner["in"] == "query" and owner["schema"]["pattern"] == PRINCIPAL
    assert owner["schema"]["maxLength"] == 64
