"""
The HTTP API against a real daemon on an ephemeral port: submission,
reads, listing, errors, body limits and the OpenAPI document.
"""

import json
import re

import jsonschema
import pytest
import pytest_twisted
from openapi_spec_validator import validate
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientFactory, Protocol

from dispatcher.api._handlers import Answer
from dispatcher.api._openapi import openapi_document

TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
UUID7 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def schema(name):
    doc = openapi_document()
    return {"$ref": f"#/components/schemas/{name}", "components": doc["components"]}


def check(instance, name):
    jsonschema.validate(instance, schema(name))


async def count_jobs(daemon):
    code, page = await daemon.json("GET", "/v1/jobs?limit=1000")
    return len(page["jobs"])


@pytest_twisted.ensureDeferred
async def test_submit_command(make_daemon):
    """A command job is answered 201 with the job and its Location, once stored."""
    daemon = await make_daemon("[executor]\nslots = 0\n")
    response, content = await daemon.request(
        "POST", "/v1/jobs", {"command": ["echo", "hi"], "name": "greet",
                             "labels": {"team": "ice"}, "env": {"A": "1"}})
    assert response.code == 201
    job = json.loads(content)
    check(job, "JobView")
    assert UUID7.match(job["id"])
    assert response.headers.getRawHeaders("location") == [f"/v1/jobs/{job['id']}"]
    assert job["state"] == "queued"
    assert job["name"] == "greet"
    assert job["labels"] == {"team": "ice"}
    assert job["command"] == ["echo", "hi"]
    assert job["env"] == {"A": "1"}
    assert TIME.match(job["created_at"])
    assert job["wait_reason"].startswith("no worker is connected")
    assert job["attempts"] == []
    code, again = await daemon.json("GET", f"/v1/jobs/{job['id']}")
    assert code == 200 and again == job


@pytest.mark.parametrize(
    "body, code, field",
    [
        ({}, "missing_field", "command"),
        ({"command": ["a"], "task": "add"}, "invalid_field", "command"),
        ({"command": "echo hi"}, "invalid_field", "command"),
        ({"command": []}, "invalid_field", "command"),
        ({"command": ["echo", 3]}, "invalid_field", "command[1]"),
        ({"command": ["echo\x00"]}, "invalid_field", "command[0]"),
        ({"command": ["a"], "colour": "red"}, "unknown_field", "colour"),
        ({"task": "nope"}, "unknown_task", "task"),
        ({"task": "add", "args": {}}, "invalid_field", "args"),
        ({"task": "add", "env": {}}, "invalid_field", "env"),
        ({"command": ["a"], "args": [1]}, "invalid_field", "args"),
        ({"command": ["a"], "env": {"A": 1}}, "invalid_field", "env.A"),
        ({"command": ["a"], "env": {"DISPATCHER_JOB_ID": "x"}}, "invalid_field",
         "env.DISPATCHER_JOB_ID"),
        ({"command": ["a"], "labels": ["x"]}, "invalid_field", "labels"),
        ({"command": ["a"], "name": 5}, "invalid_field", "name"),
        ({"command": ["a"], "inputs": [{"url": "http://x/a", "path": "../a"}]},
         "invalid_field", "inputs[0].path"),
        ({"command": ["a"], "inputs": [{"url": "http://x/a", "path": "/etc/a"}]},
         "invalid_field", "inputs[0].path"),
        ({"command": ["a"], "inputs": [{"url": "http://x/a", "path": "a\x00b"}]},
         "invalid_field", "inputs[0].path"),
        ({"command": ["a"], "inputs": [{"url": "file:///etc/passwd", "path": "a"}]},
         "invalid_field", "inputs[0].url"),
        ({"command": ["a"], "inputs": [{"url": "http://x/a", "path": "a",
                                         "sha256": "xyz"}]},
         "invalid_field", "inputs[0].sha256"),
        ({"command": ["a"], "inputs": [{"url": "http://x/a"}]},
         "missing_field", "inputs[0].path"),
        ({"command": ["a"], "inputs": [{"url": "http://x/a", "path": "a", "x": 1}]},
         "unknown_field", "inputs[0].x"),
        ([1, 2], "invalid_field", "body"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_bad_submissions(daemon, body, code, field):
    """A wrong submission is a 400 naming the field, and stores nothing."""
    status, error = await daemon.json("POST", "/v1/jobs", body)
    assert status == 400, error
    check(error, "Error")
    assert error["error"]["code"] == code
    assert error["error"]["field"] == field
    assert field.split("[")[0].split(".")[0] in error["error"]["message"] or field == "body"
    assert await count_jobs(daemon) == 0


@pytest_twisted.ensureDeferred
async def test_malformed_json(daemon):
    """A body that is not JSON, or holds NaN or Infinity (which JSON has
    not), is a 400 malformed_json error."""
    for raw in (b"{nope", b'{"task": "add", "args": [NaN, 1]}',
                b'{"task": "add", "args": [1, -Infinity]}'):
        response, content = await daemon.request("POST", "/v1/jobs", raw=raw)
        assert response.code == 400, raw
        assert json.loads(content)["error"]["code"] == "malformed_json"
    assert await count_jobs(daemon) == 0


def nested(depth):
    """A JSON array nested `depth` deep, as text."""
    return "[" * depth + "]" * depth


@pytest_twisted.ensureDeferred
async def test_deeply_nested_arguments(daemon):
    """A task's arguments nest at most 100 deep: deeper is a 400 naming the
    field, singly or in a batch, however deep (orjson reads 1,024 levels,
    json fewer), and nothing is stored; 100 deep is stored and shown."""
    for depth in (101, 970, 1100, 5000):
        for path, raw, field in [
            ("/v1/jobs", f'{{"task": "add", "args": {nested(depth)}}}', "args"),
            ("/v1/jobs", f'{{"task": "add", "kwargs": {{"a": {nested(depth - 1)}}}}}',
             "kwargs"),
            ("/v1/jobs/batch", f'{{"jobs": [{{"task": "add", "args": {nested(depth)}}}]}}',
             "jobs[0].args"),
        ]:
            response, content = await daemon.request("POST", path, raw=raw.encode())
            error = json.loads(content)["error"]
            assert response.code == 400, (depth, path)
            if depth <= 1024:
                assert error["field"] == field, (depth, error)
            else:
                assert error["code"] in ("invalid_field", "malformed_json"), error
    assert await count_jobs(daemon) == 0
    job = await daemon.submit({"task": "describe", "args": json.loads(nested(100))})
    code, shown = await daemon.json("GET", f"/v1/jobs/{job['id']}")
    assert code == 200 and shown["args"] == json.loads(nested(100))


@pytest_twisted.ensureDeferred
async def test_an_answer_that_cannot_be_written_is_a_500(daemon, monkeypatch):
    """A failure while an answer is written (here, a body that cannot be
    encoded) answers 500 with the JSON error, and the connection is not
    left waiting."""
    api = daemon.service.site.handler.__self__

    async def broken(request):
        return Answer(200, {"value": object()}, {"Location": "/nowhere"})

    monkeypatch.setattr(api, "health", broken)
    response, content = await daemon.request("GET", "/healthz")
    assert response.code == 500
    assert json.loads(content)["error"]["code"] == "internal_error"
    assert not response.headers.hasHeader("location")


@pytest_twisted.ensureDeferred
async def test_wrong_content_type(daemon):
    """A body that is not declared application/json is a 415."""
    response, content = await daemon.request(
        "POST", "/v1/jobs", {"command": ["true"]},
        headers={"Content-Type": ["text/plain"]})
    assert response.code == 415
    assert json.loads(content)["error"]["code"] == "unsupported_media_type"
    response, content = await daemon.request(
        "POST", "/v1/jobs", {"command": ["true"]},
        headers={"Content-Type": ["application/json; charset=utf-8"]})
    assert response.code == 201


@pytest_twisted.ensureDeferred
async def test_not_found_and_method(daemon):
    """Unknown paths and jobs are JSON 404s; a wrong method is a JSON 405 with Allow."""
    code, error = await daemon.json("GET", "/v1/nothing")
    assert code == 404 and error["error"]["code"] == "not_found"
    code, error = await daemon.json("GET", "/v1/jobs/0190-nope")
    assert code == 404 and error["error"]["field"] == "id"
    response, content = await daemon.request("DELETE", "/v1/jobs")
    assert response.code == 405
    assert response.headers.getRawHeaders("allow") == ["GET, POST"]
    assert json.loads(content)["error"]["code"] == "method_not_allowed"
    code, error = await daemon.json("POST", "/v1/jobs/x/cancel")
    assert code == 404


async def raw_exchange(port, data):
    """Send raw bytes to the server and collect everything it answers until it
    closes the connection."""
    done = Deferred()
    received = []

    class Raw(Protocol):
        def connectionMade(self):
            self.transport.write(data)

        def dataReceived(self, chunk):
            received.append(chunk)

        def connectionLost(self, reason):
            done.callback(b"".join(received))

    factory = ClientFactory.forProtocol(Raw)
    reactor.connectTCP("127.0.0.1", port, factory)
    return await done


@pytest_twisted.ensureDeferred
async def test_body_too_large(make_daemon):
    """A body over max_body_bytes is a 413, declared or chunked, and stores nothing."""
    daemon = await make_daemon("[server]\nmax_body_bytes = 2048\n")
    big = json.dumps({"command": ["echo", "x" * 5000]}).encode()
    response, content = await daemon.request("POST", "/v1/jobs", raw=big)
    assert response.code == 413
    assert json.loads(content)["error"]["code"] == "body_too_large"
    port = daemon.service.port.getHost().port
    chunks = b"".join(
        b"%x\r\n%s\r\n" % (len(big[i:i + 1000]), big[i:i + 1000])
        for i in range(0, len(big), 1000)
    ) + b"0\r\n\r\n"
    answer = await raw_exchange(
        port,
        b"POST /v1/jobs HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        + b"Authorization: Bearer %s\r\n" % daemon.token.encode()
        + b"Transfer-Encoding: chunked\r\n\r\n" + chunks,
    )
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert b'"body_too_large"' in answer
    small = json.dumps({"command": ["true"]}).encode()
    answer = await raw_exchange(
        port,
        b"POST /v1/jobs HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        + b"Authorization: Bearer %s\r\n" % daemon.token.encode()
        + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        + b"%x\r\n%s\r\n0\r\n\r\n" % (len(small), small),
    )
    assert answer.startswith(b"HTTP/1.1 201 ")
    assert await count_jobs(daemon) == 1


@pytest_twisted.ensureDeferred
async def test_list_pages_and_filters(make_daemon):
    """Listing pages with next_cursor, filters by state and label, and checks
    its query."""
    daemon = await make_daemon("[executor]\nslots = 0\n")
    ids = []
    for i in range(5):
        job = await daemon.submit({"command": ["true"], "labels": {"n": str(i % 2)}})
        ids.append(job["id"])
    code, page = await daemon.json("GET", "/v1/jobs?limit=2")
    assert [j["id"] for j in page["jobs"]] == ids[:2]
    seen = [j["id"] for j in page["jobs"]]
    cursor = page["next_cursor"]
    while cursor:
        code, page = await daemon.json("GET", f"/v1/jobs?limit=2&cursor={cursor}")
        seen += [j["id"] for j in page["jobs"]]
        cursor = page["next_cursor"]
    assert seen == ids
    code, page = await daemon.json("GET", "/v1/jobs?label=n=1")
    assert [j["id"] for j in page["jobs"]] == [ids[1], ids[3]]
    code, page = await daemon.json("GET", "/v1/jobs?state=queued&label=n=0")
    assert len(page["jobs"]) == 3
    code, page = await daemon.json("GET", "/v1/jobs?state=running")
    assert page["jobs"] == []
    for query, field in [("state=sleeping", "state"), ("limit=0", "limit"),
                         ("limit=abc", "limit"), ("cursor=zz", "cursor"),
                         ("colour=red", "colour")]:
        code, error = await daemon.json("GET", f"/v1/jobs?{query}")
        assert code == 400 and error["error"]["field"] == field, query


@pytest_twisted.ensureDeferred
async def test_cancel_queued(make_daemon):
    """Cancelling a queued job is immediate (200); cancelling it again is 409."""
    daemon = await make_daemon("[executor]\nslots = 0\n")
    job = await daemon.submit({"command": ["true"]})
    code, cancelled = await daemon.json("POST", f"/v1/jobs/{job['id']}/cancel")
    assert code == 200
    assert cancelled["state"] == "cancelled"
    assert cancelled["finished_at"] is not None
    code, error = await daemon.json("POST", f"/v1/jobs/{job['id']}/cancel")
    assert code == 409 and error["error"] == {
        "code": "conflict",
        "message": f"job {job['id']} is already cancelled; only a job that has not "
        "finished can be cancelled",
        "field": "id"}
    code, error = await daemon.json("POST", "/v1/jobs/missing/cancel")
    assert code == 404 and error["error"]["field"] == "id"


@pytest_twisted.ensureDeferred
async def test_health_and_openapi(daemon):
    """/healthz answers ok, and /v1/openapi.json is a valid OpenAPI 3.1 document
    listing every route the server serves, and what a job's webhook posts."""
    code, health = await daemon.json("GET", "/healthz")
    assert code == 200 and health == {"status": "ok"}
    code, doc = await daemon.json("GET", "/v1/openapi.json")
    assert code == 200
    validate(doc)
    assert doc["openapi"] == "3.1.0"
    assert set(doc["paths"]) == {
        "/healthz", "/v1/openapi.json", "/metrics", "/v1/jobs", "/v1/jobs/{id}",
        "/v1/jobs/{id}/cancel", "/v1/jobs/{id}/log", "/v1/jobs/batch",
        "/v1/jobs/{id}/retry", "/v1/queues", "/v1/workers", "/v1/leases",
        "/v1/leases/heartbeat", "/v1/leases/results", "/v1/leases/log",
        "/v1/me", "/v1/credentials", "/v1/credentials/{name}",
        "/v1/arrays/{id}", "/v1/arrays/{id}/cancel", "/v1/arrays/{id}/retry",
        "/v1/batches/{id}", "/v1/batches/{id}/cancel", "/v1/batches/{id}/retry",
        "/v1/events",
    }
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    schemas = doc["components"]["schemas"]
    for name in ("JobSubmission", "BatchJob", "JobView"):
        assert "#/components/schemas/Notify" in json.dumps(
            schemas[name]["properties"]["notify"]), name
    (hook,) = doc["webhooks"].values()
    assert hook["post"]["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/JobEvent"}
    assert {"id", "job_id", "state", "previous", "batch_id"} <= set(
        schemas["JobEvent"]["properties"])
    # Every documented operation is served (not 404 or 405).
    for path, operations in doc["paths"].items():
        for method in operations:
            # (An event stream that opens stays open: a refused one is
            # served as well.)
            query = "?after=x" if path == "/v1/events" else ""
            response, _ = await daemon.request(
                method.upper(), path.replace("{id}", "x").replace("{name}", "x") + query,
                {"command": ["true"]})
            assert response.code not in (405,), (method, path)
            if "{" not in path:
                assert response.code != 404, (method, path)


@pytest_twisted.ensureDeferred
async def test_security_as_documented(make_daemon, tmp_path):
    """Each operation answers as the document says, for every role: without
    a credential exactly the operations with a security requirement are a
    401 (with its WWW-Authenticate, and an error of the documented shape);
    with a credential of each role (the token files' included) an operation
    is a 403 exactly when its x-roles leave the role out."""
    api_token, worker_token = "api-token-0123456789abc", "worker-token-0123456789"
    (tmp_path / "api.token").write_text(api_token)
    (tmp_path / "api.token").chmod(0o600)  # one others may read is refused
    (tmp_path / "worker.token").write_text(worker_token)
    (tmp_path / "worker.token").chmod(0o600)  # one others may read is refused
    daemon = await make_daemon(
        f"[executor]\nslots = 0\n[api]\ntoken_file = {tmp_path / 'api.token'}\n"
        f"[workers]\ntoken_file = {tmp_path / 'worker.token'}\n")
    daemon.token = api_token
    tokens = {"admin": api_token, "worker": worker_token}
    for role in ("submitter", "reader"):
        code, made = await daemon.json("POST", "/v1/credentials",
                                       {"name": f"a-{role}", "role": role})
        assert code == 201, made
        tokens[role] = made["token"]
    doc = openapi_document()
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            url = path.replace("{id}", "x").replace("{name}", "nobody-here")
            daemon.token = None
            response, content = await daemon.request(
                method.upper(), url, {"command": ["true"]})
            if operation["security"] == []:
                assert response.code == 200, (method, path)
                continue
            assert response.code == 401, (method, path)
            error = json.loads(content)
            jsonschema.validate(error, {
                **operation["responses"]["401"]["content"]["application/json"]["schema"],
                "components": doc["components"],
            })
            assert response.headers.getRawHeaders("www-authenticate") == [
                'Bearer realm="dispatcher"']
            for role, token in tokens.items():
                daemon.token = token
                if path == "/v1/events":
                    # A stream stays open: its head alone says.
                    response = await daemon.client.request(
                        "GET", daemon.url + url,
                        headers={"Authorization": [f"Bearer {token}"]}, unbuffered=True)
                    daemon.service.api.events.end_all()
                    await response.content()
                else:
                    response, content = await daemon.request(
                        method.upper(), url, {"command": ["true"]})
                assert response.code != 401, (method, path, role)
                forbidden = role not in operation["x-roles"]
                assert (response.code == 403) == forbidden, (method, path, role, content)
                assert str(response.code) in operation["responses"], (method, path, role)


@pytest_twisted.ensureDeferred
async def test_resources_and_requirements(make_daemon):
    """A job shows its resources (zeros where not asked for) and its
    requirements, as the Job schema says; the JobSubmission schema accepts
    and refuses what the server does."""
    daemon = await make_daemon("[executor]\nslots = 0\n")
    body = {"command": ["true"], "resources": {"gpus": 1}, "requirements": {"site": "a"}}
    jsonschema.validate(body, schema("JobSubmission"))
    job = await daemon.submit(body)
    check(job, "JobView")
    assert job["resources"] == {"cpus": 0, "memory_mb": 0, "gpus": 1}
    assert job["requirements"] == {"site": "a"}
    job = await daemon.submit({"command": ["true"]})
    check(job, "JobView")
    assert job["resources"] == {"cpus": 0, "memory_mb": 0, "gpus": 0}
    assert job["requirements"] == {}
    for wrong, field in [
        ({"resources": {"tpus": 1}}, "resources.tpus"),
        ({"resources": {"memory_mb": 1.5}}, "resources.memory_mb"),
        ({"resources": {"cpus": -1}}, "resources.cpus"),
        ({"resources": {"gpus": 100001}}, "resources.gpus"),
        ({"requirements": {"site": 1}}, "requirements.site"),
        ({"requirements": {"": "a"}}, "requirements"),
    ]:
        body = {"command": ["true"], **wrong}
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(body, schema("JobSubmission"))
        code, error = await daemon.json("POST", "/v1/jobs", body)
        assert code == 400 and error["error"]["field"] == field, error
    assert await count_jobs(daemon) == 2


@pytest_twisted.ensureDeferred
async def test_submit_while_stopping(daemon):
    """A submission that arrives after the store closed is a 503 and stores nothing."""
    await daemon.service.store.close()
    code, error = await daemon.json("POST", "/v1/jobs", {"command": ["true"]})
    assert code == 503 and error["error"]["code"] == "shutting_down"


@pytest_twisted.ensureDeferred
async def test_content_type_is_not_parsed_as_email(daemon):
    """A POST does not go through twisted.web's request at all (whose form
    parsing builds an email message per request to read its Content-Type):
    the API is not a twisted.web Site, and a form body is refused with 415,
    not decoded into arguments."""
    from twisted.web.server import Site

    code, job = await daemon.json("POST", "/v1/jobs", {"command": ["true"]})
    assert code == 201
    response, content = await daemon.request(
        "POST", "/v1/jobs", raw=b"command=true",
        headers={"Content-Type": ["application/x-www-form-urlencoded"]})
    assert response.code == 415
    code, page = await daemon.json("GET", "/v1/jobs")
    assert [j["id"] for j in page["jobs"]] == [job["id"]]
    assert not isinstance(daemon.service.site, Site)


@pytest_twisted.ensureDeferred
async def test_access_log_is_buffered_in_the_data_dir(make_daemon, tmp_path):
    """Each request gets a Combined Log Format line in DATA_DIR/access.log,
    written by the buffer's periodic flush while the daemon runs, and at its
    stop; with access_log = no there is no such file."""
    from .conftest import sleep

    daemon = await make_daemon()
    path = tmp_path / "data" / "access.log"
    await daemon.json("GET", "/healthz")
    # The flush runs on the reactor's own timer (every second): wait for
    # it rather than for a fixed time.
    for _ in range(1000):
        if path.exists() and path.read_text():
            break
        await sleep(0.01)
    lines = path.read_text().splitlines()
    assert len(lines) == 1
    assert re.match(r'^"127\.0\.0\.1" - - \[[^]]+\] "GET /healthz HTTP/1\.1" 200 \d+ ', lines[0])
    await daemon.json("GET", "/v1/queues")
    await daemon.service.stopService()
    assert len(path.read_text().splitlines()) == 2
    quiet = await make_daemon("[server]\naccess_log = no\n", data_dir=tmp_path / "quiet")
    await quiet.json("GET", "/healthz")
    await quiet.service.stopService()
    assert not (tmp_path / "quiet" / "access.log").exists()
