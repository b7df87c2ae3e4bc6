"""
The contract declared once: the wire types check what comes in, the
served OpenAPI document is derived from the same types, and the two agree
on what is refused.
"""

import json

import jsonschema
import msgspec
import pytest
import pytest_twisted

from dispatcher.api._openapi import openapi_document
from dispatcher.api._routes import ROUTES, Router
from dispatcher.model._jobs import Job, JobSpec, JobState, Lease
from dispatcher.wire._forms import job_view, lease_from_grant, lease_grant
from dispatcher.wire._json import encode
from dispatcher.wire._types import MAX_PRIORITY, MAX_SECONDS, JobView, LeaseGrant

# The probe bodies of issue 13: each passed the hand-written JobSubmission
# schema and was refused by the server.  Each with the field named.
PROBES = [
    ({"command": ["a"], "timeout": 1e9}, "timeout"),
    ({"command": ["a"], "env": {"1BAD": "x"}}, "env.1BAD"),
    ({"command": ["a"], "env": {"DISPATCHER_X": "x"}}, "env.DISPATCHER_X"),
    ({"command": ["a"], "name": "a\x00b"}, "name"),
    ({"command": ["a"], "inputs": [{"url": "http://h/x", "path": "../x"}]}, "inputs[0].path"),
    ({"command": ["a"], "not_before": "2026-11-25T13:00:00"}, "not_before"),
    ({"command": ["a"], "array": 1000000}, "array"),
    ({"task": "add", "kwargs": {"1x": 1}}, "kwargs.1x"),
    ({"command": ["a"], "args": [1]}, "args"),
    ({"task": "add", "env": {"A": "1"}}, "env"),
    ({"command": ["a"], "task": "add"}, "command"),
    ({"command": ["a"], "not_before": "2026-11-25T13:00:00Z", "delay": 5}, "delay"),
    ({"command": ["a"], "inputs": [{"url": "http://h/x", "path": "a/"}]}, "inputs[0].path"),
    ({"command": ["a"], "inputs": [{"url": "http://h/x", "path": "/etc/x"}]}, "inputs[0].path"),
    ({"command": [""]}, "command[0]"),
    ({"command": ["a"], "env": {"A": "x\x00"}}, "env.A"),
    ({"command": ["a"], "queue": "nope"}, "queue"),
    ({"task": "nope"}, "task"),
]


def _validator(document, name):
    return jsonschema.Draft202012Validator(
        {"$ref": f"#/components/schemas/{name}", "components": document["components"]}
    )


@pytest.mark.parametrize("body, field", PROBES)
@pytest_twisted.ensureDeferred
async def test_a_probe_is_refused_by_the_server_and_by_the_served_schema(daemon, body, field):
    """Each probe body is a 400 naming its field, alone or as the fourth job
    of a batch, stores nothing, and the document the server serves refuses
    it too."""
    code, document = await daemon.json("GET", "/v1/openapi.json")
    assert code == 200
    assert list(_validator(document, "JobSubmission").iter_errors(body)), body
    code, error = await daemon.json("POST", "/v1/jobs", body)
    assert code == 400, error
    assert error["error"]["field"] == field
    assert error["error"]["message"].startswith(f"{field}: ")
    batch = {"jobs": [{"command": ["true"]}] * 3 + [body]}
    assert list(_validator(document, "Batch").iter_errors(batch))
    code, error = await daemon.json("POST", "/v1/jobs/batch", batch)
    assert code == 400 and error["error"]["field"] == f"jobs[3].{field}", error
    code, page = await daemon.json("GET", "/v1/jobs")
    assert page["jobs"] == []


GOOD = [
    {"command": ["echo", "hi"], "env": {"A": "1"}, "name": "n", "labels": {"k": "v"},
     "inputs": [{"url": "https://h/x", "path": "./d/x", "sha256": "a" * 64}],
     "timeout": 5, "priority": -3, "max_attempts": 2, "retry_delay": 0,
     "not_before": "2026-11-25T13:00:00+01:00", "resources": {"cpus": 0.5},
     "requirements": {"site": "a"}, "queue": "default"},
    {"task": "add", "args": [1, 2], "kwargs": {}, "delay": 0.5, "array": 3},
    {"task": "add", "priority": None, "name": None, "timeout": None},
]


@pytest.mark.parametrize("body", GOOD)
@pytest_twisted.ensureDeferred
async def test_what_the_served_schema_takes_the_server_takes(make_daemon, body):
    """A body the served document takes is stored (201), and the job shown
    is what the document says a job is."""
    daemon = await make_daemon("[executor]\nslots = 0\n")
    code, document = await daemon.json("GET", "/v1/openapi.json")
    _validator(document, "JobSubmission").validate(body)
    code, answer = await daemon.json("POST", "/v1/jobs", body)
    assert code == 201, answer
    shown = answer if "id" in answer else answer["jobs"][0]
    code, job = await daemon.json("GET", f"/v1/jobs/{shown['id']}")
    _validator(document, "JobView").validate(job)


@pytest_twisted.ensureDeferred
async def test_configured_limits_are_filled_into_the_served_document(make_daemon):
    """The served document carries [dispatcher] max_array, the configured
    tasks and queues and [server] max_body_bytes; the module's own document
    (no configuration) leaves them open."""
    daemon = await make_daemon(
        "[dispatcher]\nmax_array = 7\n[server]\nmax_body_bytes = 4096\n[queue:slow]\n")
    code, document = await daemon.json("GET", "/v1/openapi.json")
    schemas = document["components"]["schemas"]
    assert schemas["Batch"]["properties"]["jobs"]["maxItems"] == 7
    array = schemas["JobSubmission"]["properties"]["array"]["anyOf"][0]
    assert array["maximum"] == 7
    queue = schemas["JobSubmission"]["properties"]["queue"]["anyOf"][0]
    assert queue["enum"] == ["default", "slow"]
    task = schemas["BatchJob"]["properties"]["task"]["anyOf"][0]
    assert "add" in task["enum"]
    assert "4096 bytes" in document["paths"]["/v1/jobs"]["post"]["responses"]["413"]["description"]
    code, error = await daemon.json("POST", "/v1/jobs/batch", {"jobs": [{"command": ["a"]}] * 8})
    assert code == 400 and error["error"]["field"] == "jobs"
    plain = openapi_document()["components"]["schemas"]
    assert "maxItems" not in plain["Batch"]["properties"]["jobs"]
    # A limit is one constant that the check and the schema both read.
    priority = plain["JobSubmission"]["properties"]["priority"]["anyOf"][0]
    assert (priority["minimum"], priority["maximum"]) == (-MAX_PRIORITY, MAX_PRIORITY)
    timeout = plain["JobSubmission"]["properties"]["timeout"]["anyOf"][0]
    assert timeout["maximum"] == MAX_SECONDS


def test_every_operation_is_named_and_routed():
    """Every route has a unique operationId in the document, and the router
    finds every documented path and method."""
    document = openapi_document()
    ids = [op["operationId"] for ops in document["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids)) == len(ROUTES)
    router = Router()
    for path, operations in document["paths"].items():
        segments = path.strip("/").replace("{id}", "x").split("/")
        methods, args = router.match(segments)
        assert set(methods) == {m.upper() for m in operations}
        assert args == (("x",) if "{id}" in path else ())
        for operation in operations.values():
            for status in ("500",):
                assert status in operation["responses"]


@pytest_twisted.ensureDeferred
async def test_retry_refusals_are_documented(daemon):
    """The retry of a job with a body that is not {"dependents": bool} is a
    400 naming the field, a status its operation documents (schemathesis
    found it undocumented)."""
    job = await daemon.submit({"command": ["true"]})
    code, error = await daemon.json("POST", f"/v1/jobs/{job['id']}/retry", {"dependents": {}})
    assert code == 400 and error["error"]["field"] == "dependents"
    responses = openapi_document()["paths"]["/v1/jobs/{id}/retry"]["post"]["responses"]
    assert "400" in responses


def test_a_lease_reads_back_as_it_was_granted():
    """A lease encoded for a worker and read back on the worker is the same
    lease (its expiry on the worker's clock), with empty parts left out."""
    spec = JobSpec(task="add", args=(1, [2]), kwargs={"a": {"b": 2**70}}, name="n",
                   labels={"k": "v"}, timeout=3.0, array_id="arr", array_index=2)
    lease = Lease("job-1", 2, 77, "w", 123.5, spec)
    grant = msgspec.json.decode(encode(lease_grant(lease)), type=LeaseGrant)
    assert lease_from_grant(grant, 99.0) == Lease("job-1", 2, 77, "w", 99.0, spec)
    wire = json.loads(encode(lease_grant(lease)))
    assert not {"env", "inputs", "resources", "requirements"} & set(wire["spec"])
    assert wire["expires_at"] == "1970-01-01T00:02:03.500000Z"


def test_a_job_view_is_what_the_document_says():
    """A job's view validates against the derived JobView schema, command
    and task jobs alike, and shows the fields of its kind only."""
    document = openapi_document()
    validator = _validator(document, "JobView")
    for spec in (JobSpec(command=("true",), env={"A": "1"}), JobSpec(task="add", args=(1,))):
        view = json.loads(encode(job_view(Job("id-1", JobState.QUEUED, spec, 0.0))))
        validator.validate(view)
        kind = {"command", "env"} if spec.command else {"task", "args", "kwargs"}
        assert kind <= set(view)
        assert not ({"command", "env", "task", "args", "kwargs"} - kind) & set(view)
    assert isinstance(job_view(Job("i", JobState.QUEUED, spec, 0.0)), JobView)


@pytest_twisted.ensureDeferred
async def test_a_number_in_a_query_is_ascii_digits(daemon):
    """A query number written with other digits than ASCII ones (a
    superscript two, which str.isdigit takes and int refuses) is a 400
    naming the parameter, not a 500."""
    job = await daemon.submit({"command": ["true"]})
    for path, field in [
        ("/v1/jobs?limit=%C2%B2", "limit"),
        ("/v1/jobs?cursor=%C2%B2", "cursor"),
        (f"/v1/jobs/{job['id']}/log?offset=%C2%B2", "offset"),
    ]:
        code, error = await daemon.json("GET", path)
        assert code == 400 and error["error"]["field"] == field, (path, error)
