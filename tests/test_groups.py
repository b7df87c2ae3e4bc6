"""
Issue 17's promises against a real `twistd`: batches have ids, arrays and
batches are read, cancelled and retried as things, a request waits for a
job or a group to be final (and no longer than asked, nor than the daemon
lives, nor than its client stays), GET /v1/jobs filters, and every route
refuses a query parameter it does not take.
"""

import json
import signal
import socket
import threading
import time
import urllib.parse

import pytest

from dispatcher.api._routes import ROUTES

from .conftest import WORKER_TOKEN
from .test_twistd import Twistd

FINAL = ("succeeded", "failed", "cancelled")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    """One daemon for the tests that share it: two slots, a worker token."""
    workdir = tmp_path_factory.mktemp("groups")
    token = workdir / "worker.token"
    token.write_text(WORKER_TOKEN + "\n")
    token.chmod(0o600)  # one others may read is refused
    d = Twistd(str(workdir), f"[executor]\nslots = 2\n[workers]\ntoken_file = {token}\n")
    d.start()
    try:
        yield d
    finally:
        d.stop()


def ask(daemon, method, path, body=None, token=None, headers=None):
    """A request with its status, JSON answer and how long it took."""
    started = time.monotonic()
    if headers:
        import urllib.request
        req = urllib.request.Request(
            daemon.url + path, data=None if body is None else json.dumps(body).encode(),
            method=method, headers={"Content-Type": "application/json",
                                    "Authorization": f"Bearer {token or daemon.token}",
                                    **headers})
        try:
            with urllib.request.urlopen(req, timeout=30) as response:
                return response.status, json.loads(response.read()), time.monotonic() - started
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read()), time.monotonic() - started
    code, answer = daemon.request(method, path, body, token=token)
    return code, answer, time.monotonic() - started


def open_wait(daemon, path):
    """A raw connection that sent GET path (a wait) and reads nothing yet."""
    host, port = urllib.parse.urlsplit(daemon.url).netloc.split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {daemon.token}\r\n\r\n".encode())
    return sock


def read_answer(sock):
    """The status and JSON body of the one answer on sock."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += sock.recv(65536)
    return int(head.split(b" ")[1]), json.loads(body)


def test_every_route_refuses_a_query_parameter_it_does_not_take(daemon):
    """Each route (those that take none included) answers an unknown query
    parameter, and a single one given twice, with a 400 invalid_query naming
    it, and changes nothing."""
    code, job = daemon.request("POST", "/v1/jobs", {"command": ["true"]})
    assert code == 201
    for route in ROUTES:
        token = WORKER_TOKEN if route.path.startswith("/v1/leases") else None
        path = route.path.replace("{id}", job["id"]).replace("{name}", "nobody")
        base = {"job_id": "j", "token": "1.AAAAAAAAAAAAAAAAAAAAAA", "stream": "stdout",
                "offset": "0"} if route.path == "/v1/leases/log" else {}
        for extra, field in [("bogus=1", "bogus")] + (
                [(f"{name}=1&{name}=2", name)
                 for name, many in route.query.items() if not many][:1]):
            query = "&".join([*(f"{k}={v}" for k, v in base.items() if k != field), extra])
            code, error, _ = ask(daemon, route.method, f"{path}?{query}", token=token)
            assert code == 400, (route.method, path, query, error)
            assert error["error"]["code"] == "invalid_query"
            assert error["error"]["field"] == field, (route.method, path, error)
    code, still = daemon.request("GET", f"/v1/jobs/{job['id']}")
    assert code == 200 and still["state"] != "cancelled"


def test_a_wait_answers_when_the_job_finishes(daemon):
    """GET /v1/jobs/ID?wait=30 answers as soon as the job has succeeded, not
    at the wait's end."""
    code, job = daemon.request("POST", "/v1/jobs", {"command": ["sleep", "0.5"]})
    assert code == 201
    code, done, took = ask(daemon, "GET", f"/v1/jobs/{job['id']}?wait=30")
    assert code == 200 and done["state"] == "succeeded", done
    assert took < 10
    # Final already: answered at once.
    code, again, took = ask(daemon, "GET", f"/v1/jobs/{job['id']}?wait=30")
    assert code == 200 and again["state"] == "succeeded" and took < 2


def test_a_wait_answers_at_its_end_with_the_job_as_it_is(daemon):
    """A job that does not finish within the wait is answered as it is when
    the time runs out; a wait out of bounds is a 400 naming wait."""
    code, job = daemon.request("POST", "/v1/jobs", {"command": ["true"], "delay": 3600})
    assert code == 201
    code, pending, took = ask(daemon, "GET", f"/v1/jobs/{job['id']}?wait=0.5")
    assert code == 200 and pending["state"] == "pending"
    assert 0.45 <= took < 5
    for wrong in ("0", "-1", "301", "abc", "nan", "inf", "1_0", ""):
        code, error, _ = ask(daemon, "GET", f"/v1/jobs/{job['id']}?wait={wrong}")
        assert code == 400 and error["error"]["field"] == "wait", wrong
    code, error, _ = ask(daemon, "GET", "/v1/jobs/nothing?wait=5")
    assert code == 404
    daemon.request("POST", f"/v1/jobs/{job['id']}/cancel")


def test_batches_have_ids(daemon):
    """A batch (plain, or with fields) is answered with its batch_id, which
    each of its jobs shows; GET /v1/batches/ID counts them; a replay of the
    same Idempotency-Key answers the same batch_id; a single job has none."""
    body = {"jobs": [{"command": ["true"]}, {"command": ["true"]}]}
    code, plain, _ = ask(daemon, "POST", "/v1/jobs/batch", body,
                         headers={"Idempotency-Key": "batch-key-1"})
    assert code == 201, plain
    batch_id = plain["batch_id"]
    assert [j["batch_id"] for j in plain["jobs"]] == [batch_id, batch_id]
    code, replay, _ = ask(daemon, "POST", "/v1/jobs/batch", body,
                          headers={"Idempotency-Key": "batch-key-1"})
    assert code == 200 and replay["batch_id"] == batch_id
    assert [j["id"] for j in replay["jobs"]] == [j["id"] for j in plain["jobs"]]
    code, job = daemon.request("GET", f"/v1/jobs/{plain['jobs'][0]['id']}")
    assert job["batch_id"] == batch_id
    code, group = daemon.request("GET", f"/v1/batches/{batch_id}?wait=20")
    assert code == 200, group
    assert (group["id"], group["kind"], group["size"]) == (batch_id, "batch", 2)
    assert group["final"] and group["succeeded"] and group["finished"] == 2
    assert group["counts"]["succeeded"] == 2 and set(group["counts"]) == {
        "pending", "queued", "staging", "running", "succeeded", "failed", "cancelled"}
    code, full = daemon.request("POST", "/v1/jobs/batch", {"jobs": [
        {"command": ["true"], "name": "with-name"}, {"command": ["true"], "array": 2}]})
    assert code == 201 and full["batch_id"] != batch_id
    assert {j["batch_id"] for j in full["jobs"]} == {full["batch_id"]}
    code, group = daemon.request("GET", f"/v1/batches/{full['batch_id']}")
    assert group["size"] == 3
    code, single = daemon.request("POST", "/v1/jobs", {"command": ["true"]})
    assert single["batch_id"] is None
    code, error = daemon.request("GET", f"/v1/arrays/{batch_id}")
    assert code == 404 and error["error"]["field"] == "id"


def test_an_array_is_waited_for_cancelled_and_retried(daemon):
    """An array's wait answers once every member is final; its cancel stops
    the running members and cancels the rest (202), a second cancel is a
    409; its retry brings every member back (200), after which it can be
    cancelled again; a retry with nothing to retry is a 409."""
    code, made = daemon.request("POST", "/v1/jobs", {"command": ["true"], "array": 3})
    assert code == 201
    array_id = made["jobs"][0]["array_id"]
    code, group, took = ask(daemon, "GET", f"/v1/arrays/{array_id}?wait=20")
    assert code == 200 and group["final"] and group["succeeded"], group
    code, error = daemon.request("POST", f"/v1/arrays/{array_id}/retry")
    assert code == 409 and error["error"]["field"] == "id"

    code, made = daemon.request("POST", "/v1/jobs", {"command": ["sleep", "60"], "array": 3})
    array_id = made["jobs"][0]["array_id"]
    for member in made["jobs"][:2]:
        daemon.wait(member["id"], ("running",))
    code, group, _ = ask(daemon, "POST", f"/v1/arrays/{array_id}/cancel")
    assert code == 202, group
    assert group["counts"]["cancelled"] == 1 and group["counts"]["running"] == 2
    code, group, took = ask(daemon, "GET", f"/v1/arrays/{array_id}?wait=20")
    assert code == 200 and group["final"] and group["counts"]["cancelled"] == 3, group
    assert took < 15
    code, error = daemon.request("POST", f"/v1/arrays/{array_id}/cancel")
    assert code == 409 and error["error"]["code"] == "conflict"
    code, group = daemon.request("POST", f"/v1/arrays/{array_id}/retry")
    assert code == 200 and group["counts"]["cancelled"] == 0 and not group["final"], group
    code, group = daemon.request("POST", f"/v1/arrays/{array_id}/cancel")
    assert code in (200, 202)
    code, group, _ = ask(daemon, "GET", f"/v1/arrays/{array_id}?wait=20")
    assert group["final"] and not group["succeeded"]


def test_list_filters(daemon):
    """GET /v1/jobs filters by several states, array, batch, exact name,
    queue, worker and creation time, newest first with a cursor that goes on
    that way; a submitter lists its own jobs alone, whatever it asks."""
    code, made = daemon.request("POST", "/v1/jobs/batch", {"jobs": [
        {"command": ["true"], "name": "filter-me"}, {"command": ["true"], "array": 2},
        {"command": ["true"], "delay": 3600}]})
    assert code == 201
    batch_id = made["batch_id"]
    ids = [j["id"] for j in made["jobs"]]
    array_id = made["jobs"][1]["array_id"]
    daemon.request("GET", f"/v1/jobs/{ids[0]}?wait=20")

    def listed(query):
        code, page = daemon.request("GET", f"/v1/jobs?{query}")
        assert code == 200, page
        return [j["id"] for j in page["jobs"]]

    assert listed(f"batch={batch_id}") == ids
    assert listed(f"array={array_id}") == ids[1:3]
    assert listed("name=filter-me") == [ids[0]]
    assert listed("name=filter-m") == []
    assert listed(f"batch={batch_id}&state=pending&state=succeeded&order=newest")[0] == ids[3]
    assert listed(f"batch={batch_id}&queue=default") == ids
    assert listed(f"batch={batch_id}&queue=elsewhere") == []
    code, job = daemon.request("GET", f"/v1/jobs/{ids[0]}")
    assert listed(f"batch={batch_id}&worker={job['worker']}")[0] == ids[0]
    assert ids[3] not in listed(f"batch={batch_id}&worker={job['worker']}")
    assert listed(f"batch={batch_id}&created_after=2000-01-01T00:00:00Z") == ids
    assert listed(f"batch={batch_id}&created_before=946684800") == []
    code, page = daemon.request("GET", f"/v1/jobs?batch={batch_id}&order=newest&limit=3")
    assert [j["id"] for j in page["jobs"]] == ids[::-1][:3]
    code, rest = daemon.request(
        "GET", f"/v1/jobs?batch={batch_id}&order=newest&limit=3&cursor={page['next_cursor']}")
    assert [j["id"] for j in rest["jobs"]] == [ids[0]] and rest["next_cursor"] is None
    for query, field in [("order=sideways", "order"), ("created_after=yesterday",
                         "created_after"), ("state=asleep", "state"),
                         ("created_before=2026-13-01T00:00:00Z", "created_before"),
                         ("queue=", "queue"), ("array=" + "a" * 201, "array")]:
        code, error = daemon.request("GET", f"/v1/jobs?{query}")
        assert code == 400 and error["error"]["field"] == field, (query, error)
    code, made = daemon.request("POST", "/v1/credentials",
                                {"name": "filter-submitter", "role": "submitter"})
    submitter = made["token"]
    code, own = daemon.request("POST", "/v1/jobs", {"command": ["true"], "name": "filter-me"},
                               token=submitter)
    code, page = daemon.request("GET", "/v1/jobs?name=filter-me", token=submitter)
    assert [j["id"] for j in page["jobs"]] == [own["id"]]
    code, page = daemon.request("GET", f"/v1/jobs?batch={batch_id}", token=submitter)
    assert page["jobs"] == []
    code, error = daemon.request("GET", f"/v1/batches/{batch_id}", token=submitter)
    assert code == 404
    code, error = daemon.request("POST", f"/v1/batches/{batch_id}/cancel", token=submitter)
    assert code == 404
    daemon.request("POST", f"/v1/jobs/{ids[3]}/cancel")


@pytest.fixture
def one_wait(tmp_path):
    """A daemon that keeps one waiting request at most."""
    d = Twistd(str(tmp_path), "[executor]\nslots = 0\n[api]\nmax_waits = 1\n")
    d.start()
    try:
        yield d
    finally:
        d.stop()


def test_a_client_that_leaves_frees_its_wait(one_wait):
    """Past [api] max_waits a wait is a 503 too_many_waits with Retry-After;
    a client that disconnects frees its wait at once, and the next wait is
    taken."""
    daemon = one_wait
    code, job = daemon.request("POST", "/v1/jobs", {"command": ["true"]})
    held = open_wait(daemon, f"/v1/jobs/{job['id']}?wait=120")
    time.sleep(0.3)
    code, error, took = ask(daemon, "GET", f"/v1/jobs/{job['id']}?wait=5")
    assert code == 503 and error["error"]["code"] == "too_many_waits" and took < 2
    # Without wait, as ever.
    code, same = daemon.request("GET", f"/v1/jobs/{job['id']}")
    assert code == 200 and same["state"] == "queued"
    held.close()
    deadline = time.monotonic() + 3
    while True:
        code, answer, took = ask(daemon, "GET", f"/v1/jobs/{job['id']}?wait=0.2")
        if code == 200:
            break
        assert time.monotonic() < deadline, "the wait was not freed"
        time.sleep(0.05)
    assert answer["state"] == "queued"


def test_a_stopping_daemon_answers_its_waits_at_once(one_wait):
    """SIGTERM answers a waiting request 503 shutting_down at once, and the
    wait does not hold the daemon's stop."""
    daemon = one_wait
    code, job = daemon.request("POST", "/v1/jobs", {"command": ["true"]})
    held = open_wait(daemon, f"/v1/jobs/{job['id']}?wait=250")
    time.sleep(0.3)
    answered = {}

    def read():
        answered["answer"] = read_answer(held)
        answered["at"] = time.monotonic()

    reader = threading.Thread(target=read)
    reader.start()
    started = time.monotonic()
    daemon.process.send_signal(signal.SIGTERM)
    reader.join(20)
    assert answered["answer"][0] == 503
    assert answered["answer"][1]["error"]["code"] == "shutting_down"
    assert answered["at"] - started < 5
    assert daemon.process.wait(timeout=20) in (0, -signal.SIGTERM)
    assert time.monotonic() - started < 20
    held.close()
