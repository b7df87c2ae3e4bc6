"""
The dispatcher's side of remote workers, spoken to over HTTP as a worker
would: tokens, long-polls, matchmaking, heartbeats, expiry, cancels,
results, logs and restarts.  Time is a Clock; the HTTP is real.
"""

import json

import attrs
import jsonschema
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import Clock

from dispatcher.config._ini import parse_config
from dispatcher.app._daemon import DaemonService
from dispatcher.api._openapi import openapi_document
from dispatcher.wire._types import MAX_ITEMS

from .conftest import TEST_TASKS, WORKER_TOKEN, run_clock
from .postgres import one_dispatcher_only

TOKEN = WORKER_TOKEN
API_TOKEN = "api-token-0123456789abc"
# A lease token of the right form that the dispatcher never gave.
STALE = "999999.AAAAAAAAAAAAAAAAAAAAAA"


def worker(name, slots=2, cpus=2, memory_mb=1000, gpus=0, labels=None, tasks=()):
    return {
        "name": name,
        "slots": slots,
        "cpus": cpus,
        "memory_mb": memory_mb,
        "gpus": gpus,
        "labels": labels or {},
        "tasks": list(tasks),
    }


@pytest.fixture
def make_pure(make_daemon, token_file):
    """A dispatcher that runs nothing itself and takes workers."""

    async def make(extra="", clock=None, data_dir=None):
        ini = f"[executor]\nslots = 0\n[workers]\ntoken_file = {token_file}\n" + extra
        return await make_daemon(ini, clock=clock, data_dir=data_dir)

    return make


async def call(daemon, path, body, token=TOKEN):
    return await daemon.json(
        "POST", path, body, headers={"Authorization": [f"Bearer {token}"]}
    )


async def lease(daemon, who, max_jobs=None, wait=0):
    body = {"worker": who, "wait": wait}
    if max_jobs is not None:
        body["max_jobs"] = max_jobs
    code, answer = await call(daemon, "/v1/leases", body)
    assert code == 200, answer
    return answer["leases"]


async def heartbeat(daemon, who, leases, running=False):
    items = [
        {"job_id": l["job_id"], "token": l["token"], "running": running} for l in leases
    ]
    return await call(daemon, "/v1/leases/heartbeat", {"worker": who, "leases": items})


async def report(daemon, who, items):
    return await call(daemon, "/v1/leases/results", {"worker": who, "results": items})


async def until_waiting_for_work(daemon, name, waiting=True):
    """Wait until C{GET /v1/workers} shows the worker C{name} with a
    long-poll open (or, with C{waiting} false, none): the condition a test
    waits for before it moves a fake clock, instead of a sleep."""
    for _ in range(5000):
        code, answer = await daemon.json("GET", "/v1/workers")
        assert code == 200, answer
        if any(w["name"] == name and w["waiting_for_work"] == waiting
               for w in answer["workers"]):
            return
    raise AssertionError(f"{name} never showed waiting_for_work {waiting}")


DOCUMENT = openapi_document()


def _against(schema, instance):
    jsonschema.validate(instance, {**schema, "components": DOCUMENT["components"]})


def answered_as_documented(path, method, status, answer):
    """Fail unless the JSON answer is what the OpenAPI document gives for
    this status of this operation (an undocumented status fails too)."""
    response = DOCUMENT["paths"][path][method]["responses"][str(status)]
    _against(response["content"]["application/json"]["schema"], answer)
    return answer


async def documented_call(daemon, path, body, token=TOKEN):
    """POST a body the document accepts; fail unless the answer is as
    documented."""
    request = DOCUMENT["paths"][path]["post"]["requestBody"]
    _against(request["content"]["application/json"]["schema"], body)
    code, answer = await call(daemon, path, body, token)
    answered_as_documented(path, "post", code, answer)
    return code, answer


def result(granted, state="succeeded", exit_code=0, **kw):
    return {
        "job_id": granted["job_id"],
        "token": granted["token"],
        "state": state,
        "exit_code": exit_code,
        **kw,
    }


@pytest_twisted.ensureDeferred
async def test_worker_endpoints_need_the_token(make_daemon, make_pure, tmp_path):
    """Without a worker credential a lease is refused: 401 with none or a
    wrong one, 403 for a caller of another role (a reader); the workers'
    token is a worker's."""
    daemon = await make_pure()
    for token in ("wrong-token-0123456789", ""):
        code, answer = await call(daemon, "/v1/leases", {"worker": worker("a")}, token)
        assert code == 401 and answer["error"]["field"] == "Authorization"
    admin = await make_daemon("[executor]\nslots = 0\n", data_dir=tmp_path / "other")
    code, made = await admin.json("POST", "/v1/credentials", {"name": "r", "role": "reader"})
    assert code == 201
    code, answer = await documented_call(admin, "/v1/leases", {"worker": worker("a")},
                                         made["token"])
    assert code == 403 and answer["error"]["code"] == "forbidden"
    code, answer = await call(daemon, "/v1/leases", {"worker": worker("a"), "wait": 0})
    assert code == 200 and answer["leases"] == []
    assert answer["lease_seconds"] == 30 and answer["heartbeat_seconds"] == 10


@pytest_twisted.ensureDeferred
async def test_bad_worker_descriptions_are_400_naming_the_field(make_pure):
    daemon = await make_pure()
    cases = [
        ({"worker": {"name": "a"}}, "worker.slots"),
        ({"worker": dict(worker("a"), slots=0)}, "worker.slots"),
        ({"worker": dict(worker("a"), cpus="many")}, "worker.cpus"),
        ({"worker": dict(worker("a"), labels={"k": 1})}, "worker.labels.k"),
        ({"worker": dict(worker("a"), colour="red")}, "worker.colour"),
        ({"worker": worker("a"), "max_jobs": 3}, "max_jobs"),
        ({"worker": worker("a"), "wait": 61}, "wait"),
    ]
    for body, field in cases:
        code, answer = await call(daemon, "/v1/leases", body)
        assert code == 400 and answer["error"]["field"] == field, (body, answer)


@pytest_twisted.ensureDeferred
async def test_jobs_go_to_the_workers_that_fit_them(make_pure):
    daemon = await make_pure()
    small = worker("small", slots=4, cpus=2, labels={"site": "a"})
    big = worker("big", slots=4, cpus=8, gpus=1, labels={"site": "b"})
    # Both have called once, so both count as connected.
    assert await lease(daemon, small) == []
    assert await lease(daemon, big) == []
    wide = await daemon.submit({"command": ["true"], "resources": {"cpus": 4}})
    local = await daemon.submit({"command": ["true"], "requirements": {"site": "a"}})
    nowhere = await daemon.submit({"command": ["true"], "resources": {"gpus": 2}})
    plain = await daemon.submit({"command": ["true"], "priority": 5})
    assert "no connected worker can take it" in nowhere["wait_reason"]
    assert "has 1 GPUs, not 2" in nowhere["wait_reason"]
    got = await lease(daemon, small, max_jobs=4)
    # The highest priority first; the 4-CPU job and the GPU job pass it by.
    assert [g["job_id"] for g in got] == [plain["id"], local["id"]]
    assert got[0]["holder"] == "small" and got[0]["spec"]["command"] == ["true"]
    got = await lease(daemon, big, max_jobs=4)
    assert [g["job_id"] for g in got] == [wide["id"]]
    job = await daemon.wait(wide["id"], ("running",))
    assert job["worker"] == "big"
    code, listed = await daemon.json("GET", "/v1/workers")
    by_name = {w["name"]: w for w in listed["workers"]}
    assert by_name["big"]["running"] == [wide["id"]]
    assert by_name["big"]["free"] == {"slots": 3, "cpus": 4.0, "memory_mb": 1000, "gpus": 1}
    assert by_name["small"]["free"]["slots"] == 2


@pytest_twisted.ensureDeferred
async def test_a_worker_gets_only_what_its_resources_hold_at_once(make_pure):
    daemon = await make_pure()
    who = worker("w", slots=4, cpus=4)
    jobs = [
        await daemon.submit({"command": ["true"], "resources": {"cpus": 3}})
        for _ in range(2)
    ]
    got = await lease(daemon, who, max_jobs=4)
    assert [g["job_id"] for g in got] == [jobs[0]["id"]]
    # Its running job still holds 3 of the 4 CPUs.
    assert await lease(daemon, who, max_jobs=3) == []
    code, answer = await report(daemon, who, [result(got[0])])
    assert code == 200 and answer["results"][0]["ok"] is True
    got = await lease(daemon, who, max_jobs=4)
    assert [g["job_id"] for g in got] == [jobs[1]["id"]]


@pytest_twisted.ensureDeferred
async def test_task_jobs_go_to_workers_that_know_the_task(make_pure):
    daemon = await make_pure()
    job = await daemon.submit({"task": "add", "args": [1, 2]})
    assert await lease(daemon, worker("plain")) == []
    got = await lease(daemon, worker("tasks", tasks=["add"]))
    assert [g["job_id"] for g in got] == [job["id"]]
    assert got[0]["spec"]["task"] == "add" and got[0]["spec"]["args"] == [1, 2]
    code, answer = await report(daemon, worker("tasks", tasks=["add"]),
                                [result(got[0], exit_code=None, result=3)])
    assert code == 200
    done = await daemon.wait(job["id"])
    assert done["state"] == "succeeded" and done["result"] == 3


@pytest_twisted.ensureDeferred
async def test_a_long_poll_answers_when_a_job_comes_or_the_wait_ends(make_pure):
    clock = Clock()
    daemon = await make_pure(clock=clock)
    who = worker("w")
    poll = ensureDeferred(lease(daemon, who, wait=30))
    await until_waiting_for_work(daemon, "w")
    assert not poll.called
    job = await daemon.submit({"command": ["true"]})
    got = await poll
    assert [g["job_id"] for g in got] == [job["id"]]
    poll = ensureDeferred(lease(daemon, who, wait=30))
    await until_waiting_for_work(daemon, "w")
    clock.advance(29.9)
    await until_waiting_for_work(daemon, "w")
    assert not poll.called
    clock.advance(0.1)
    assert await poll == []


@pytest_twisted.ensureDeferred
async def test_a_lease_without_heartbeat_expires_and_its_writes_are_refused(make_pure):
    clock = Clock()
    daemon = await make_pure(clock=clock)
    who = worker("w")
    job = await daemon.submit({"command": ["true"], "max_attempts": 2, "retry_delay": 0})
    (granted,) = await lease(daemon, who)
    run_clock(clock, 20)
    code, answer = await heartbeat(daemon, who, [granted])
    assert code == 200 and answer["leases"][0]["ok"] is True
    run_clock(clock, 20)  # 20 s since the heartbeat: still alive
    assert (await daemon.json("GET", f"/v1/jobs/{job['id']}"))[1]["state"] == "running"
    run_clock(clock, 11)
    after = await daemon.wait(job["id"], ("queued",))
    assert "sent no heartbeat for 30 s" in after["attempts"][0]["error"]
    code, answer = await heartbeat(daemon, who, [granted])
    assert code == 409
    assert answer["leases"][0]["reason"] == "expired"
    code, answer = await report(daemon, who, [result(granted)])
    assert code == 409 and answer["results"][0]["ok"] is False
    # The second and last attempt expires too; it waits a minute more for
    # its silent worker, shown by its wait reason, then the job fails.
    (second,) = await lease(daemon, worker("other"))
    assert second["attempt"] == 2 and second["token"] > granted["token"]
    run_clock(clock, 31)
    waiting = (await daemon.json("GET", f"/v1/jobs/{job['id']}"))[1]
    assert waiting["state"] == "running"
    assert "its worker other has been silent since" in waiting["wait_reason"]
    run_clock(clock, 60)
    final = await daemon.wait(job["id"], ("failed",))
    assert len(final["attempts"]) == 2
    assert "sent no heartbeat for 30 s" in final["attempts"][1]["error"]


@pytest_twisted.ensureDeferred
async def test_a_worker_whose_lease_expires_gets_no_work_until_it_calls_again(make_pure):
    """A worker that lets a lease run out is presumed stopped or cut off:
    its open long-poll is answered with nothing, so the job it lost goes to
    a live worker instead of into the same silent connection (where it
    would burn another attempt)."""
    clock = Clock()
    daemon = await make_pure(clock=clock)
    frozen, live = worker("frozen", slots=2), worker("live", slots=1)
    job = await daemon.submit({"command": ["true"], "max_attempts": 2, "retry_delay": 0})
    (granted,) = await lease(daemon, frozen, max_jobs=1)
    # The frozen worker still has a long-poll open for its other slot.
    stale = ensureDeferred(lease(daemon, frozen, max_jobs=1, wait=60))
    await until_waiting_for_work(daemon, "frozen")
    run_clock(clock, 20)
    waiting = ensureDeferred(lease(daemon, live, wait=60))
    await until_waiting_for_work(daemon, "live")
    run_clock(clock, 11)
    assert await stale == []
    (moved,) = await waiting
    assert (moved["job_id"], moved["attempt"], moved["holder"]) == (job["id"], 2, "live")
    # Once it calls again it is given work as before.
    other = await daemon.submit({"command": ["true"]})
    (got,) = await lease(daemon, frozen)
    assert got["job_id"] == other["id"]


@pytest_twisted.ensureDeferred
async def test_cancel_reaches_the_worker_at_its_next_heartbeat(make_pure):
    """A cancelled job's worker is told at its next heartbeat, in the
    protocol's words, and its later log writes are refused the same way."""
    daemon = await make_pure()
    who = worker("w")
    job = await daemon.submit({"command": ["sleep", "100"]})
    (granted,) = await lease(daemon, who)
    code, answer = await daemon.json("POST", f"/v1/jobs/{job['id']}/cancel")
    assert code == 202 or code == 200, answer
    code, answer = await heartbeat(daemon, who, [granted])
    assert code == 409 and answer["leases"] == [{
        "job_id": job["id"], "token": granted["token"], "ok": False, "status": 409,
        "reason": "cancelled", "message": "the job was cancelled; stop it"}]
    done = await daemon.wait(job["id"])
    assert done["state"] == "cancelled"
    code, answer = await daemon.json(
        "POST",
        f"/v1/leases/log?job_id={job['id']}&token={granted['token']}&stream=stdout&offset=0",
        raw=b"x", headers={"Authorization": [f"Bearer {TOKEN}"],
                           "Content-Type": ["application/octet-stream"]})
    assert code == 409 and answer["error"]["code"] == "stale_lease"
    assert answer["error"]["message"] == "token: the job was cancelled; stop it"


@pytest_twisted.ensureDeferred
async def test_results_in_one_request_and_logs_shipped_by_offset(make_pure):
    daemon = await make_pure()
    who = worker("w", slots=2)
    jobs = [await daemon.submit({"command": ["x"]}) for _ in range(2)]
    got = await lease(daemon, who, max_jobs=2)
    first = got[0]
    headers = {"Authorization": [f"Bearer {TOKEN}"],
               "Content-Type": ["application/octet-stream"]}
    path = f"/v1/leases/log?job_id={first['job_id']}&token={first['token']}&stream=stdout"
    response, body = await daemon.request("POST", path + "&offset=0", raw=b"hello ",
                                          headers=headers)
    assert response.code == 200, body
    # A resend of the same bytes is harmless; a gap is refused.
    response, body = await daemon.request("POST", path + "&offset=0", raw=b"hello ",
                                          headers=headers)
    assert response.code == 200
    response, body = await daemon.request("POST", path + "&offset=9", raw=b"x",
                                          headers=headers)
    assert response.code == 400 and b"send from 6" in body
    response, body = await daemon.request("POST", path + "&offset=6", raw=b"world\n",
                                          headers=headers)
    assert response.code == 200
    stale = path.replace(f"token={first['token']}", f"token={STALE}")
    response, body = await daemon.request("POST", stale + "&offset=0", raw=b"x",
                                          headers=headers)
    assert response.code == 409
    code, answer = await report(daemon, who, [
        result(got[0]),
        result(got[1], state="failed", exit_code=3, error="exited with code 3"),
    ])
    assert code == 200 and [a["ok"] for a in answer["results"]] == [True, True]
    response, log = await daemon.request("GET", f"/v1/jobs/{first['job_id']}/log")
    assert log == b"hello world\n"
    states = {j["id"]: (await daemon.wait(j["id"]))["state"] for j in jobs}
    assert sorted(states.values()) == ["failed", "succeeded"]
    # A resent report (its answer was lost) is refused, and says why.
    code, answer = await report(daemon, who, [result(got[0])])
    assert code == 409 and answer["results"][0]["reason"] == "reported"


@pytest_twisted.ensureDeferred
async def test_staged_jobs_become_running_on_the_workers_word(make_pure):
    daemon = await make_pure()
    who = worker("w")
    job = await daemon.submit({
        "command": ["true"],
        "inputs": [{"url": "http://127.0.0.1:9/x", "path": "x"}],
    })
    (granted,) = await lease(daemon, who)
    assert (await daemon.wait(job["id"], ("staging",)))["state"] == "staging"
    code, answer = await heartbeat(daemon, who, [granted], running=True)
    assert code == 200
    assert (await daemon.wait(job["id"], ("running",)))["state"] == "running"


@pytest_twisted.ensureDeferred
async def test_a_restart_keeps_remote_leases_alive(make_pure, tmp_path):
    one_dispatcher_only("a restart resumes the workers' leases only on a store of its own")
    clock = Clock()
    clock.advance(1000)
    data = tmp_path / "keep"
    daemon = await make_pure(clock=clock, data_dir=data)
    who = worker("w")
    job = await daemon.submit({"command": ["sleep", "100"]})
    (granted,) = await lease(daemon, who)
    run_clock(clock, 25)
    await daemon.service.stopService()
    # The dispatcher was down for longer than a lease lives.
    clock.advance(120)
    daemon = await make_pure(clock=clock, data_dir=data)
    run_clock(clock, 25)
    code, answer = await heartbeat(daemon, who, [granted])
    assert code == 200 and answer["leases"][0]["ok"] is True
    code, answer = await report(daemon, who, [result(granted)])
    assert code == 200
    done = await daemon.wait(job["id"])
    assert done["state"] == "succeeded" and len(done["attempts"]) == 1


@pytest_twisted.ensureDeferred
async def test_a_worker_that_hangs_up_loses_no_job(make_pure):
    daemon = await make_pure()
    poll = ensureDeferred(lease(daemon, worker("gone"), wait=30))
    await until_waiting_for_work(daemon, "gone")
    poll.cancel()
    poll.addErrback(lambda f: None)
    await until_waiting_for_work(daemon, "gone", waiting=False)
    job = await daemon.submit({"command": ["true"]})
    got = await lease(daemon, worker("here"), wait=10)
    assert [g["job_id"] for g in got] == [job["id"]]


@pytest_twisted.ensureDeferred
async def test_api_token_guards_the_job_endpoints(make_daemon, tmp_path):
    path = tmp_path / "api.token"
    path.write_text(API_TOKEN)
    path.chmod(0o600)  # one others may read is refused
    daemon = await make_daemon(f"[api]\ntoken_file = {path}\n")
    code, answer = await daemon.json("GET", "/v1/jobs")
    assert code == 401
    code, answer = await daemon.json(
        "GET", "/v1/jobs", headers={"Authorization": [f"Bearer {API_TOKEN}"]})
    assert code == 200
    code, answer = await daemon.json("GET", "/healthz")
    assert code == 200


def test_a_token_file_that_cannot_serve_is_a_config_error(tmp_path):
    from dispatcher.config._ini import ConfigError

    short = tmp_path / "short"
    short.write_text("abc")
    with pytest.raises(ConfigError) as e:
        parse_config(f"[workers]\ntoken_file = {short}\n", "x.ini")
    assert str(e.value).startswith(f"x.ini: [workers] token_file = '{short}'")
    assert "at least 16 characters" in str(e.value)
    with pytest.raises(ConfigError) as e:
        parse_config(f"[api]\ntoken_file = {tmp_path / 'missing'}\n", "x.ini")
    assert "cannot read the token file" in str(e.value)


@pytest_twisted.ensureDeferred
async def test_listening_beyond_loopback_needs_authentication(tmp_path):
    """On every interface the daemon starts with authentication required
    (the default) and refuses to with [api] authentication = off."""
    for ini, refused in [
        ("[api]\nauthentication = off\n", True),
        ("", False),
    ]:
        config = parse_config(TEST_TASKS + "[executor]\nslots = 0\n" + ini, "t.ini")
        config = attrs.evolve(
            config,
            dispatcher=attrs.evolve(config.dispatcher, data_dir=str(tmp_path / "d")),
        )
        service = DaemonService(
            reactor, config, serverFromString(reactor, "tcp:0"), stop_reactor=False
        )
        service.startService()
        if refused:
            with pytest.raises(Exception) as e:
                await service.ready
            assert "which other machines can reach" in str(e.value)
            assert "authentication = off" in str(e.value)
            assert service.port is None
        else:
            port = await service.ready
            assert port.getHost().host == "0.0.0.0"
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_worker_endpoints_answer_as_the_openapi_document_says(make_pure):
    """Every answer of the worker endpoints and GET /v1/workers, accepted or
    refused, matches its schema in the OpenAPI document, and the requests a
    worker sends are ones the document accepts."""
    daemon = await make_pure()
    who = worker("w", slots=4, cpus=4, labels={"site": "a"}, tasks=["add"])
    full = await daemon.submit({
        "command": ["true"], "env": {"A": "1"}, "name": "full", "labels": {"k": "v"},
        "inputs": [{"url": "http://127.0.0.1:9/x", "path": "x"}],
        "resources": {"cpus": 1.5, "memory_mb": 100}, "requirements": {"site": "a"},
    })
    task = await daemon.submit({"task": "add", "args": [1, 2]})
    plain = await daemon.submit({"command": ["true"]})
    unfit = await daemon.submit({"command": ["true"], "requirements": {"site": "b"}})
    code, answer = await documented_call(daemon, "/v1/leases", {"worker": who, "wait": 0})
    assert code == 200
    by_id = {g["job_id"]: g for g in answer["leases"]}
    assert set(by_id) == {full["id"], task["id"], plain["id"]}
    spec = by_id[full["id"]]["spec"]
    assert spec["resources"] == {"cpus": 1.5, "memory_mb": 100, "gpus": 0}
    assert spec["requirements"] == {"site": "a"} and spec["env"] == {"A": "1"}
    # Empty parts are left out, as the document says.
    assert not {"env", "inputs", "resources", "requirements"} & set(by_id[plain["id"]]["spec"])
    code, job = await daemon.json("GET", f"/v1/jobs/{unfit['id']}")
    answered_as_documented("/v1/jobs/{id}", "get", code, job)
    assert job["wait_reason"].startswith("no connected worker can take it")
    code, job = await daemon.json("GET", f"/v1/jobs/{full['id']}")
    answered_as_documented("/v1/jobs/{id}", "get", code, job)
    assert job["worker"] == "w" and job["requirements"] == {"site": "a"}

    granted = [by_id[full["id"]], by_id[task["id"]], by_id[plain["id"]]]
    stale = {"job_id": plain["id"], "token": STALE}
    code, answer = await documented_call(daemon, "/v1/leases/heartbeat", {
        "worker": who,
        "leases": [{"job_id": g["job_id"], "token": g["token"], "running": True}
                   for g in granted] + [stale],
    })
    assert code == 200 and [a["ok"] for a in answer["leases"]] == [True, True, True, False]

    headers = {"Authorization": [f"Bearer {TOKEN}"],
               "Content-Type": ["application/octet-stream"]}
    log = f"/v1/leases/log?job_id={plain['id']}&stream=stderr&token="
    for query, body, status in [
        (f"{granted[2]['token']}&offset=0", b"oops\n", 200),
        (f"{granted[2]['token']}&offset=9", b"x", 400),
        (f"{granted[2]['token']}&offset=-1", b"x", 400),
        (f"{STALE}&offset=0", b"x", 409),
    ]:
        code, answer = await daemon.json("POST", log + query, raw=body, headers=headers)
        assert code == status, (query, answer)
        answered_as_documented("/v1/leases/log", "post", code, answer)
    assert answer["error"]["code"] == "stale_lease"

    code, listed = await daemon.json("GET", "/v1/workers")
    answered_as_documented("/v1/workers", "get", code, listed)
    (shown,) = listed["workers"]
    assert sorted(shown["running"]) == sorted(g["job_id"] for g in granted)
    assert shown["free"] == {"slots": 1, "cpus": 2.5, "memory_mb": 900, "gpus": 0}

    code, answer = await documented_call(daemon, "/v1/leases/results", {
        "worker": who,
        "results": [
            result(granted[0], stopped=False, error=None, result=None),
            result(granted[1], exit_code=None, result=3),
            result(granted[2], state="failed", exit_code=-9, error="killed by signal 9"),
        ] + [dict(stale, state="succeeded")],
    })
    assert code == 200 and [a["ok"] for a in answer["results"]] == [True, True, True, False]
    # Everything sent now is refused: the whole answer is a 409 of the same shape.
    code, answer = await documented_call(daemon, "/v1/leases/results",
                                         {"worker": who, "results": [result(granted[0])]})
    assert code == 409 and answer["results"][0]["reason"] == "reported"
    code, answer = await documented_call(daemon, "/v1/leases/heartbeat", {
        "worker": who, "leases": [{"job_id": g["job_id"], "token": g["token"]}
                                  for g in granted]})
    assert code == 409 and {a["reason"] for a in answer["leases"]} == {"reported"}

    code, answer = await documented_call(daemon, "/v1/leases", {"worker": who},
                                         token="wrong-token-0123456789")
    assert code == 401
    code, answer = await call(daemon, "/v1/leases", {"worker": dict(who, slots=0)})
    answered_as_documented("/v1/leases", "post", code, answer)
    assert code == 400 and answer["error"]["field"] == "worker.slots"
    response, content = await daemon.request(
        "POST", "/v1/leases/results", {"worker": who, "results": []},
        headers={"Authorization": [f"Bearer {TOKEN}"], "Content-Type": ["text/plain"]})
    assert response.code == 415
    answered_as_documented("/v1/leases/results", "post", 415, json.loads(content))


@pytest_twisted.ensureDeferred
async def test_a_released_job_goes_back_unspent(make_pure):
    daemon = await make_pure()
    who = worker("w")
    job = await daemon.submit({"command": ["sleep", "100"]})
    (granted,) = await lease(daemon, who)
    code, answer = await report(daemon, who, [{
        "job_id": granted["job_id"], "token": granted["token"], "state": "released"}])
    assert code == 200 and answer["results"][0]["ok"] is True
    back = await daemon.wait(job["id"], ("queued",))
    assert "its worker w stopped" in back["attempts"][0]["error"]
    # Not spent: the one allowed attempt is still there to run.
    (again,) = await lease(daemon, worker("other"))
    assert again["attempt"] == 2
    code, answer = await report(daemon, worker("other"), [result(again)])
    assert (await daemon.wait(job["id"]))["state"] == "succeeded"


@pytest_twisted.ensureDeferred
async def test_unknown_or_missing_item_fields_are_400(make_pure):
    daemon = await make_pure()
    who = worker("w")
    code, answer = await call(daemon, "/v1/leases/heartbeat", {
        "worker": who, "leases": [{"job_id": "x", "token": STALE, "colour": "red"}]})
    assert code == 400 and answer["error"]["field"] == "leases[0].colour"
    code, answer = await call(daemon, "/v1/leases/results", {
        "worker": who, "results": [{"job_id": "x", "state": "succeeded"}]})
    assert code == 400 and answer["error"]["code"] == "missing_field"
    assert answer["error"]["field"] == "results[0].token"


@pytest.mark.parametrize("path", ["/v1/leases/heartbeat", "/v1/leases/results"])
def test_a_worker_that_hangs_up_does_not_cancel_its_writes(path):
    """A request whose worker hangs up while what it reported is being
    written leaves the writes alone: the results are good, and a resend
    joins the writes under way."""
    from twisted.internet.defer import CancelledError, Deferred

    from dispatcher.api._workers import WorkerEndpoints
    from dispatcher.wire._tokens import LeaseTokens, new_key

    cancelled = []
    writes = Deferred(lambda d: cancelled.append(d))

    class Hub:
        lease_seconds = 30.0
        heartbeat_seconds = 10.0

        def report(self, offer, results, credential):
            return writes

        def heartbeat(self, offer, items, credential):
            return writes

    endpoints = WorkerEndpoints(Hub(), None, None, None, None, LeaseTokens(new_key()))
    if path.endswith("results"):
        handler = endpoints.results
        body = {"worker": worker("w"), "results": [
            {"job_id": "j", "token": STALE, "state": "succeeded", "exit_code": 0}]}
    else:
        handler = endpoints.heartbeat
        body = {"worker": worker("w"), "leases": [{"job_id": "j", "token": STALE}]}
    # The handler waits on the hub's writes (a body it could not read
    # would fail before it reached them, and prove nothing).
    answer = ensureDeferred(handler(None, json.dumps(body).encode()))
    assert not answer.called
    answer.addErrback(lambda f: f.trap(CancelledError))
    answer.cancel()
    assert cancelled == []
    writes.callback([])


@pytest_twisted.ensureDeferred
async def test_two_processes_under_one_worker_name_are_told_apart(make_pure):
    """A second worker process (another instance) calling under a name heard
    from within a lease's life is logged once a minute and shown as
    name_shared; the same process calling again, or a restart after the
    lease's life, is not."""
    from twisted.logger import globalLogPublisher

    clock = Clock()
    clock.advance(1_800_000_000)
    daemon = await make_pure(clock=clock)
    warnings = []

    def observe(event):
        if "share its slots" in event.get("log_format", ""):
            warnings.append(event)

    async def contact(daemon, who):
        code, answer = await heartbeat(daemon, who, [])
        assert code == 200, answer

    def shared():
        return {w["name"]: w["name_shared"] for w in listed["workers"]}

    globalLogPublisher.addObserver(observe)
    try:
        first = {**worker("w"), "instance": "a" * 16}
        second = {**worker("w"), "instance": "b" * 16}
        await contact(daemon, first)
        await contact(daemon, first)
        code, listed = await daemon.json("GET", "/v1/workers")
        assert code == 200 and shared() == {"w": False} and warnings == []
        await contact(daemon, second)
        await contact(daemon, first)
        await contact(daemon, second)
        code, listed = await daemon.json("GET", "/v1/workers")
        answered_as_documented("/v1/workers", "get", code, listed)
        assert shared() == {"w": True}
        assert len(warnings) == 1
        assert {warnings[0]["first"], warnings[0]["second"]} == {"a" * 16, "b" * 16}
        # A minute later it is logged again; after a lease's life without
        # the other, a new instance is a restart.
        clock.advance(61)
        await contact(daemon, first)
        await contact(daemon, second)
        assert len(warnings) == 2
        clock.advance(31)
        restarted = {**worker("w"), "instance": "c" * 16}
        await contact(daemon, restarted)
        clock.advance(31)
        await contact(daemon, restarted)
        code, listed = await daemon.json("GET", "/v1/workers")
        assert shared() == {"w": False} and len(warnings) == 2
    finally:
        globalLogPublisher.removeObserver(observe)


@pytest_twisted.ensureDeferred
async def test_answers_tell_workers_when_to_fence_themselves(make_pure):
    """Lease and heartbeat answers carry fence_seconds: the lease less the
    [workers] fence_margin, counted from when the worker sent the request;
    a long-poll that granted late counts the time it was held, so that the
    worker's deadline is still the margin before the lease's expiry."""
    clock = Clock()
    daemon = await make_pure("lease_seconds = 10\nfence_margin = 3\n", clock=clock)
    who = worker("w")
    poll = ensureDeferred(call(daemon, "/v1/leases", {"worker": who, "wait": 30}))
    await until_waiting_for_work(daemon, "w")
    clock.advance(4)
    await daemon.submit({"command": ["true"]})
    code, answer = await poll
    (granted,) = answer["leases"]
    # Granted 4 s after the request came: expiry at 4 + 10, less 3.
    assert answer["fence_seconds"] == 11
    clock.advance(2)
    code, answer = await heartbeat(daemon, who, [granted])
    assert answer["leases"][0]["ok"] is True
    assert answer["fence_seconds"] == 7 and answer["lease_seconds"] == 10


@pytest_twisted.ensureDeferred
async def test_the_default_fence_margin_is_a_fifth_of_the_lease(make_pure):
    """Without [workers] fence_margin a worker fences itself a fifth of the
    lease (at least 2 s) before its expiry: 24 s of a 30 s lease."""
    daemon = await make_pure()
    code, answer = await call(daemon, "/v1/leases", {"worker": worker("w"), "wait": 0})
    assert answer["fence_seconds"] == 24 and answer["lease_seconds"] == 30


@pytest_twisted.ensureDeferred
async def test_a_hostile_held_list_is_refused_and_changes_nothing(make_pure):
    """A request for work whose held list is malformed (a wrong type, a
    token out of range, a lone surrogate or a NUL in a job id, more items
    than allowed) is a 400 naming the field, and the worker's live lease
    is not released; another worker listing this worker's lease with the
    right token releases nothing of either."""
    daemon = await make_pure()
    who = worker("w", slots=2, tasks=())
    who["instance"] = "a" * 16
    job = await daemon.submit({"command": ["true"]})
    (granted,) = await lease(daemon, who, max_jobs=1)
    held = {"job_id": granted["job_id"], "token": granted["token"]}
    for bad, field in [
        ("nope", "held"),
        ([{"job_id": granted["job_id"], "token": 0}], "held[0].token"),
        ([{"job_id": granted["job_id"], "token": "1"}], "held[0].token"),
        ([{"job_id": granted["job_id"], "token": granted["token"] + "A"}], "held[0].token"),
        ([{"job_id": "\ud800", "token": STALE}], None),
        ([{"job_id": "a\x00b", "token": STALE}], "held[0].job_id"),
        ([{"job_id": "j", "token": STALE}] * (MAX_ITEMS + 1), "held"),
    ]:
        code, answer = await call(
            daemon, "/v1/leases", {"worker": who, "wait": 0, "held": bad})
        assert code == 400, (bad if len(str(bad)) < 200 else field, answer)
        if field is not None:
            assert answer["error"]["field"] == field
    other = dict(worker("other"), instance="b" * 16)
    code, answer = await call(
        daemon, "/v1/leases", {"worker": other, "wait": 0, "held": [held]})
    assert code == 200 and answer["leases"] == []
    code, answer = await heartbeat(daemon, who, [granted])
    assert code == 200 and answer["leases"][0]["ok"] is True
    assert (await daemon.json("GET", f"/v1/jobs/{job['id']}"))[1]["state"] == "running"
