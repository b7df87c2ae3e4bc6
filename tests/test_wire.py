"""
The contract declared once: the wire types check what comes in, the
served OpenAPI document is derived from the same types, and the two agree
on what is refused.
"""

import json
import os

import jsonschema
import msgspec
import pytest
import pytest_twisted

from dispatcher.api._openapi import openapi_document
from dispatcher.api._routes import ROUTES, Router
from dispatcher.model._jobs import Job, JobSpec, JobState, Lease
from dispatcher.wire._forms import job_view, lease_from_grant, lease_grant
from dispatcher.wire._json import encode
from dispatcher.wire._tokens import LeaseTokens, new_key
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
        segments = path.strip("/").replace("{id}", "x").replace("{name}", "x").split("/")
        methods, args = router.match(segments)
        assert set(methods) == {m.upper() for m in operations}
        assert args == (("x",) if "{" in path else ())
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
    lease (its expiry on the worker's clock, its token the text it was
    given, its owner), with empty parts left out."""
    spec = JobSpec(task="add", args=(1, [2]), kwargs={"a": {"b": 2**70}}, name="n",
                   labels={"k": "v"}, timeout=3.0, array_id="arr", array_index=2)
    lease = Lease("job-1", 2, 77, "w", 123.5, spec)
    token = LeaseTokens(new_key()).seal("job-1", 77)
    grant = msgspec.json.decode(encode(lease_grant(lease, token)), type=LeaseGrant)
    assert lease_from_grant(grant, 99.0) == Lease("job-1", 2, token, "w", 99.0, spec)
    wire = json.loads(encode(lease_grant(lease, token)))
    assert not {"env", "inputs", "resources", "requirements"} & set(wire["spec"])
    assert wire["expires_at"] == "1970-01-01T00:02:03.500000Z"
    # The owner travels with it (a worker running as root picks the job's
    # account by it).
    owned = Lease("job-1", 2, 77, "w", 123.5, spec, "alice")
    grant = msgspec.json.decode(encode(lease_grant(owned, token)), type=LeaseGrant)
    assert lease_from_grant(grant, 99.0).owner == "alice"


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


def _auth_routes_401(document):
    return {
        (path, method): "401" in operation["responses"]
        for path, operations in document["paths"].items()
        for method, operation in operations.items()
        if operation["security"] != []
    }


@pytest_twisted.ensureDeferred
async def test_a_whole_number_float_is_an_integer_where_one_is_declared(
    make_daemon, token_file
):
    """A float with no fraction (3.0), which JSON Schema counts an integer,
    is taken where the document declares an integer (array, priority, a
    batch job's max_attempts, a worker's slots, max_jobs), while a task's
    arguments keep their floats as sent and a string or a fraction is
    still refused."""
    daemon = await make_daemon(f"[executor]\nslots = 0\n[workers]\ntoken_file = {token_file}\n")
    code, document = await daemon.json("GET", "/v1/openapi.json")
    body = {"command": ["true"], "array": 3.0, "priority": 1.0}
    _validator(document, "JobSubmission").validate(body)
    code, answer = await daemon.json("POST", "/v1/jobs", body)
    assert code == 201 and len(answer["jobs"]) == 3, answer
    code, job = await daemon.json("GET", f"/v1/jobs/{answer['jobs'][0]['id']}")
    assert job["priority"] == 1 and type(job["priority"]) is int
    batch = {"jobs": [{"command": ["true"]}] * 3 + [{"command": ["true"], "max_attempts": 2.0}]}
    _validator(document, "Batch").validate(batch)
    code, answer = await daemon.json("POST", "/v1/jobs/batch", batch)
    assert code == 201, answer
    code, job = await daemon.json(
        "POST", "/v1/jobs",
        {"task": "add", "args": [3.0, 1], "kwargs": {"x": 3.0}, "priority": 2.0},
    )
    assert code == 201, job
    assert job["args"] == [3.0, 1] and type(job["args"][0]) is float
    assert type(job["kwargs"]["x"]) is float and job["priority"] == 2
    for bad in ({"priority": "3"}, {"priority": 1.5}, {"array": 0.0}):
        code, error = await daemon.json("POST", "/v1/jobs", {"command": ["true"], **bad})
        assert code == 400 and error["error"]["field"] == next(iter(bad)), error
    lease = {"worker": {"name": "w", "slots": 2.0}, "max_jobs": 1.0, "wait": 0}
    _validator(document, "LeaseRequest").validate(lease)
    code, answer = await daemon.json(
        "POST", "/v1/leases", lease,
        headers={"Authorization": [f"Bearer {token_file.read_text().strip()}"]},
    )
    assert code == 200 and len(answer["leases"]) == 1, answer


@pytest.mark.parametrize("paths, field", [
    (["x", "x/y"], "inputs[0].path"),
    (["a/b/c", "a/b"], "inputs[1].path"),
    (["./d/x", "d"], "inputs[1].path"),
])
@pytest_twisted.ensureDeferred
async def test_an_input_path_that_is_a_directory_of_another_is_refused(
    make_daemon, paths, field
):
    """An input whose path is a directory of another input's path (staging
    would need it to be a file and a directory) is a 400 naming the
    parent, alone and in a batch, and nothing is stored."""
    daemon = await make_daemon("[executor]\nslots = 0\n")
    inputs = [{"url": f"http://h/{i}", "path": p} for i, p in enumerate(paths)]
    code, error = await daemon.json("POST", "/v1/jobs", {"command": ["true"], "inputs": inputs})
    assert code == 400 and error["error"]["field"] == field, error
    code, error = await daemon.json(
        "POST", "/v1/jobs/batch", {"jobs": [{"command": ["true"], "inputs": inputs}]})
    assert code == 400 and error["error"]["field"] == f"jobs[0].{field}", error
    code, page = await daemon.json("GET", "/v1/jobs")
    assert page["jobs"] == []


@pytest_twisted.ensureDeferred
async def test_inputs_side_by_side_are_taken(make_daemon):
    """Inputs whose paths share a prefix but not a directory (x and xy/z,
    x-y and x/z's sibling) are stored."""
    daemon = await make_daemon("[executor]\nslots = 0\n")
    inputs = [{"url": "http://h/1", "path": p} for p in ("x", "xy/z", "x-y", "d/x", "d/y")]
    code, job = await daemon.json("POST", "/v1/jobs", {"command": ["true"], "inputs": inputs})
    assert code == 201, job


def test_rules_the_schema_cannot_express_are_described():
    """The rules checked after decoding that JSON Schema cannot express
    (nesting of args and kwargs, input paths against each other, a batch's
    total of jobs) are said in the fields' descriptions and in the 400 of
    the operations that take them."""
    document = openapi_document()
    schemas = document["components"]["schemas"]
    for name in ("JobSubmission", "BatchJob"):
        for key in ("args", "kwargs"):
            described = json.dumps(schemas[name]["properties"][key])
            assert "nest at most 100 deep" in described, (name, key)
    for name in ("JobSubmission", "BatchJob"):
        assert "directory of another" in json.dumps(schemas[name]["properties"]["inputs"])
    assert "made in all" in schemas["Batch"]["properties"]["jobs"]["description"]
    single = document["paths"]["/v1/jobs"]["post"]["responses"]["400"]["description"]
    batch = document["paths"]["/v1/jobs/batch"]["post"]["responses"]["400"]["description"]
    for text in (single, batch):
        assert "100 deep" in text and "directory of another" in text
    assert "max_array jobs in all" in batch


@pytest_twisted.ensureDeferred
async def test_query_parameters_unknown_or_repeated_are_refused(make_daemon, token_file):
    """An unknown query parameter, or a single-valued one given twice, is a
    400 naming it on every route, those that take none included (label and
    state may repeat), and the 400 of each route says so."""
    daemon = await make_daemon(f"[executor]\nslots = 0\n[workers]\ntoken_file = {token_file}\n")
    job = await daemon.submit({"command": ["true"], "labels": {"a": "1", "b": "2"}})
    worker = {"Authorization": [f"Bearer {token_file.read_text().strip()}"],
              "Content-Type": ["application/octet-stream"]}
    log = "/v1/leases/log?job_id=j&token=1&stream=stdout&offset=0"
    for method, path, field, headers in [
        ("GET", "/v1/jobs?foo=1", "foo", None),
        ("GET", "/v1/jobs?order=oldest&order=newest", "order", None),
        ("GET", f"/v1/jobs/{job['id']}?wait=1&wait=2", "wait", None),
        ("GET", f"/v1/jobs/{job['id']}?wiat=1", "wiat", None),
        ("GET", "/v1/queues?x=1", "x", None),
        ("POST", f"/v1/jobs/{job['id']}/cancel?x=1", "x", None),
        ("GET", "/v1/jobs?limit=1&limit=2", "limit", None),
        ("GET", "/v1/jobs?cursor=1&cursor=1", "cursor", None),
        ("GET", f"/v1/jobs/{job['id']}/log?stream=stdout&stream=stderr", "stream", None),
        ("GET", f"/v1/jobs/{job['id']}/log?offset=0&offset=1", "offset", None),
        ("GET", f"/v1/jobs/{job['id']}/log?x=1", "x", None),
        ("POST", log + "&x=1", "x", worker),
        ("POST", log + "&offset=0", "offset", worker),
    ]:
        response, content = await daemon.request(method, path, headers=headers, raw=b"")
        error = json.loads(content)
        assert response.code == 400 and error["error"]["field"] == field, (path, error)
        assert error["error"]["code"] == "invalid_query"
    code, page = await daemon.json("GET", "/v1/jobs?label=a%3D1&label=b%3D2")
    assert code == 200 and [j["id"] for j in page["jobs"]] == [job["id"]]
    code, page = await daemon.json("GET", "/v1/jobs?state=queued&state=running")
    assert code == 200 and [j["id"] for j in page["jobs"]] == [job["id"]]
    code, same = await daemon.json("GET", f"/v1/jobs/{job['id']}")
    assert code == 200 and same["state"] == "queued"
    document = openapi_document()
    for path, operations in document["paths"].items():
        for operation in operations.values():
            text = operation["responses"]["400"]["description"]
            if any(p["in"] == "query" for p in operation.get("parameters", ())):
                assert "not listed for the operation is refused" in text, path
                assert "given twice" in text, path
            else:
                assert "takes no query parameter" in text, path


@pytest_twisted.ensureDeferred
async def test_a_lone_surrogate_escape_is_named_as_such(daemon):
    """A string with a lone UTF-16 surrogate escape is a 400 naming its
    field, with a message that says so (msgspec calls it truncated), while
    a body that is cut short is still called truncated."""
    response, content = await daemon.request(
        "POST", "/v1/jobs", raw=b'{"command": ["true"], "name": "\\ud800"}')
    error = json.loads(content)["error"]
    assert response.code == 400 and error["code"] == "invalid_field"
    assert error["field"] == "name"
    assert "truncated" not in error["message"] and "surrogate" in error["message"]
    response, content = await daemon.request(
        "POST", "/v1/jobs", raw=b'{"command": ["true"], "name": "\\\\ud800')
    error = json.loads(content)["error"]
    assert response.code == 400 and "truncated" in error["message"]


def test_a_job_view_takes_its_defaults_from_the_spec():
    """Each scheduling default a job view shows when not given is the
    spec's own default (written once, in the model)."""
    view = JobView("i", JobState.QUEUED, None, {}, "t", None, None, None, None, None, None,
                   [], None, None)
    spec = JobSpec()
    for name in ("priority", "queue", "timeout", "max_attempts", "retry_delay",
                 "array_id", "array_index"):
        assert getattr(view, name) == getattr(spec, name), name
    resources = spec.resources
    assert (view.resources.cpus, view.resources.memory_mb, view.resources.gpus) == (
        resources.cpus, resources.memory_mb, resources.gpus)


def test_every_route_with_a_token_documents_its_401():
    """Every operation that needs a token documents a 401 (the unauthorized
    code, which the README's errors name too)."""
    document = openapi_document()
    found = _auth_routes_401(document)
    assert found and all(found.values()), found
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    errors = readme.split("### Errors", 1)[1].split("\n#", 1)[0]
    assert "`unauthorized`" in errors and "`401`" in errors


def test_worker_names_with_another_role_is_refused_by_the_document_too():
    """The document's CredentialRequest refuses worker_names with any role
    but worker, as POST /v1/credentials does (400 worker_names), and takes
    it with role worker, or null with any role."""
    validator = _validator(openapi_document(), "CredentialRequest")
    for role in ("admin", "submitter", "reader"):
        assert list(validator.iter_errors({"name": "c", "role": role, "worker_names": ["w"]}))
        validator.validate({"name": "c", "role": role, "worker_names": None})
        validator.validate({"name": "c", "role": role})
    validator.validate({"name": "c", "role": "worker", "worker_names": ["w", "w2"]})


def test_whole_floats_are_made_integers_once_per_field_of_a_batch():
    """Every job of a large batch sending its integer fields as whole
    floats is decoded (each field made an integer across the batch at
    once), with the floats of its arguments as sent; a float with a
    fraction in the same place is refused, naming the job."""
    from dispatcher.wire._submission import ApiError, decode
    from dispatcher.wire._types import Batch
    jobs = [{"task": "add", "args": [1.0], "priority": 1.0, "max_attempts": 2.0,
             "depends_on": [0.0] if i else None} for i in range(1000)]
    batch = decode(json.dumps({"jobs": jobs}).encode(), Batch)
    assert {(j.priority, j.max_attempts) for j in batch.jobs} == {(1, 2)}
    assert type(batch.jobs[0].priority) is int and type(batch.jobs[0].args[0]) is float
    assert batch.jobs[1].depends_on == [0] and type(batch.jobs[1].depends_on[0]) is int
    jobs[7]["max_attempts"] = 2.5
    with pytest.raises(ApiError) as e:
        decode(json.dumps({"jobs": jobs}).encode(), Batch)
    assert e.value.field == "jobs[7].max_attempts"
