"""
GET /v1/events: the Server-Sent Events stream of job state changes and
workers' comings and goings, against a real twistd (order, resuming after
a disconnect, a restart and a kill -9, filters, who sees what, a slow
subscriber, workers), and with a Clock for time (keep-alive comments,
retention).
"""

import http.client
import json
import signal
import socket
import time
import urllib.parse

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.task import Clock

from dispatcher.model._events import JobEvent
from dispatcher.model._jobs import JobState
from dispatcher.store._sqlite import SQLiteJobStore
from tests.store_contract import spec

from .conftest import sleep
from .test_twistd import Twistd
from .test_worker import WorkerProcess

FINAL = ("succeeded", "failed", "cancelled")


class EventReader:
    """A GET /v1/events stream read event by event, as a client reads it,
    on a plain http.client connection."""

    def __init__(self, url, token, query="", last_event_id=None, timeout=15):
        parts = urllib.parse.urlsplit(url)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
        headers = {"Authorization": f"Bearer {token}"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = str(last_event_id)
        self.conn.request("GET", "/v1/events" + query, headers=headers)
        self.response = self.conn.getresponse()
        self.comments = []

    @property
    def status(self):
        return self.response.status

    def error(self):
        return json.loads(self.response.read())

    def next(self):
        """The next event, as (type, id or None, data); comments are kept
        aside; None at the end of the stream."""
        fields = {}
        while True:
            line = self.response.readline()
            if not line:
                return None
            line = line.decode().rstrip("\n")
            if not line:
                if fields:
                    data = json.loads(fields["data"]) if "data" in fields else None
                    event_id = int(fields["id"]) if "id" in fields else None
                    return fields.get("event"), event_id, data
                continue
            if line.startswith(":"):
                self.comments.append(line)
                continue
            name, _, value = line.partition(": ")
            fields[name] = value

    def until(self, done, most=100_000):
        """Events until one for which done(event) holds (it included)."""
        got = []
        for _ in range(most):
            event = self.next()
            assert event is not None, f"the stream ended after {got}"
            got.append(event)
            if done(event):
                return got
        raise AssertionError("too many events")

    def close(self):
        self.conn.close()


def events_until_quiet(reader):
    """Events until a keep-alive comment comes: the stream has caught up
    and been idle for a heartbeat (half a second on these daemons)."""
    got = []
    fields = {}
    while True:
        line = reader.response.readline()
        assert line, f"the stream ended after {got}"
        line = line.decode().rstrip("\n")
        if line == ": keep-alive" and not fields:
            return got
        if line.startswith(":"):
            continue
        if line:
            name, _, value = line.partition(": ")
            fields[name] = value
            continue
        if fields:
            got.append((fields.get("event"), int(fields["id"]) if "id" in fields else None,
                        json.loads(fields["data"])))
            fields = {}


QUICK_BEAT = "[events]\nheartbeat = 0.5\n"


@pytest.fixture
def twistd(tmp_path):
    made = []

    def make(ini="", workdir=None):
        if "[events]\n" in ini:
            ini = ini.replace("[events]\n", QUICK_BEAT)
        else:
            ini = QUICK_BEAT + ini
        t = Twistd(str(workdir or tmp_path), ini)
        made.append(t)
        t.start()
        return t

    yield make
    for t in made:
        t.stop()


def jobs_events(events, job_id):
    return [e for e in events if e[0] == "job" and e[2]["job_id"] == job_id]


def test_a_job_s_changes_come_in_order_with_increasing_ids(twistd):
    """A subscriber sees a job go queued, running, succeeded, in that
    order, with increasing ids, each with what changed and who owns it."""
    daemon = twistd("[executor]\nslots = 1\n")
    reader = EventReader(daemon.url, daemon.token)
    assert reader.status == 200
    assert reader.response.getheader("content-type").startswith("text/event-stream")
    code, job = daemon.request("POST", "/v1/jobs", {"command": ["true"], "name": "t"})
    assert code == 201
    got = reader.until(lambda e: e[2]["state"] in FINAL)
    mine = jobs_events(got, job["id"])
    assert [e[2]["state"] for e in mine] == ["queued", "running", "succeeded"]
    assert [e[2]["previous"] for e in mine] == [None, "queued", "running"]
    ids = [e[1] for e in mine]
    assert ids == sorted(ids) and len(set(ids)) == 3
    assert all(e[1] == e[2]["id"] for e in mine)
    done = mine[-1][2]
    assert (done["owner"], done["queue"], done["name"]) == ("admin", "default", "t")
    assert (done["attempt"], done["exit_code"], done["error"]) == (1, 0, None)
    assert done["at"].endswith("Z")
    reader.close()


def _all_stored(daemon):
    reader = EventReader(daemon.url, daemon.token, "?after=0")
    got = events_until_quiet(reader)
    reader.close()
    return got


def _submit(daemon, count):
    ids = []
    for _ in range(count):
        code, job = daemon.request("POST", "/v1/jobs", {"command": ["true"]})
        assert code == 201
        ids.append(job["id"])
    return ids


def _resume(daemon, last):
    reader = EventReader(daemon.url, daemon.token, last_event_id=last)
    got = events_until_quiet(reader)
    reader.close()
    return got


def test_resuming_loses_nothing_and_repeats_nothing(twistd, tmp_path):
    """A subscriber that goes away and comes back with Last-Event-ID gets
    every event after its last one exactly once: after a disconnect, after
    a SIGTERM restart and after a kill -9 and restart (ids have no gaps)."""
    daemon = twistd("[executor]\nslots = 2\n")
    reader = EventReader(daemon.url, daemon.token)
    jobs = _submit(daemon, 3)
    got = reader.until(lambda e: e[2]["state"] in FINAL and e[2]["job_id"] == jobs[0])
    reader.close()
    seen = list(got)

    def resume():
        more = _resume(daemon, seen[-1][1])
        seen.extend(more)
        return more

    # A disconnect: jobs submitted meanwhile.
    jobs += _submit(daemon, 3)
    for job_id in jobs:
        daemon.wait(job_id, ("succeeded",))
    resume()
    # A restart.
    daemon.stop_gracefully()
    daemon.start()
    jobs += _submit(daemon, 3)
    for job_id in jobs:
        daemon.wait(job_id, ("succeeded",))
    resume()
    # kill -9, with a job running.
    code, running = daemon.request("POST", "/v1/jobs", {"command": ["sleep", "60"]})
    jobs.append(running["id"])
    daemon.wait(running["id"], ("running",))
    assert daemon.kill(signal.SIGKILL) == -signal.SIGKILL
    daemon.start()
    daemon.wait(running["id"], ("failed",))
    resume()
    ids = [e[1] for e in seen]
    assert ids == list(range(ids[0], ids[0] + len(ids))), "a gap or a repeat"
    assert seen == _all_stored(daemon)[ids[0] - 1:]
    for job_id in jobs[:-1]:
        assert [e[2]["state"] for e in jobs_events(seen, job_id)] == [
            "queued", "running", "succeeded"]
    lost = jobs_events(seen, running["id"])
    assert [e[2]["state"] for e in lost] == ["queued", "running", "failed"]
    assert "lost" in lost[-1][2]["error"]


def test_filters(twistd):
    """Each filter lets through only what it names; given together they
    all hold; stored and live events are filtered alike."""
    daemon = twistd("[executor]\nslots = 0\n")
    code, a = daemon.request("POST", "/v1/jobs", {"command": ["true"],
                                                 "labels": {"team": "x", "env": "p"}})
    code, b = daemon.request("POST", "/v1/jobs", {"command": ["true"],
                                                 "labels": {"team": "x"}})
    code, arr = daemon.request("POST", "/v1/jobs", {"command": ["true"], "array": 2})
    array_id = arr["jobs"][0]["array_id"]
    code, _ = daemon.request("POST", f"/v1/jobs/{b['id']}/cancel")
    assert code == 200
    code, batch = daemon.request("POST", "/v1/jobs/batch", {"jobs": [{"command": ["true"]}]})
    assert code == 201

    def ids(query):
        reader = EventReader(daemon.url, daemon.token, query)
        got = events_until_quiet(reader)
        reader.close()
        return [(e[2]["job_id"], e[2]["state"]) for e in got if e[0] == "job"]

    assert ids(f"?after=0&job={a['id']}") == [(a["id"], "queued")]
    assert ids("?after=0&label=team=x") == [
        (a["id"], "queued"), (b["id"], "queued"), (b["id"], "cancelled")]
    assert ids("?after=0&label=team=x&label=env") == [(a["id"], "queued")]
    assert ids("?after=0&state=cancelled") == [(b["id"], "cancelled")]
    assert ids("?after=0&state=cancelled&state=queued&label=team") == [
        (a["id"], "queued"), (b["id"], "queued"), (b["id"], "cancelled")]
    assert sorted(ids(f"?after=0&array={array_id}")) == sorted(
        (j["id"], "queued") for j in arr["jobs"])
    assert ids(f"?after=0&batch={batch['batch_id']}") == [(batch["jobs"][0]["id"], "queued")]
    assert ids("?after=0&owner=admin&job=" + a["id"]) == [(a["id"], "queued")]
    assert ids("?after=0&owner=someone") == []
    assert ids("?after=0&type=worker") == []
    # Live, as stored.
    reader = EventReader(daemon.url, daemon.token, "?label=team=x&state=cancelled")
    daemon.request("POST", f"/v1/jobs/{a['id']}/cancel")
    event = reader.next()
    assert (event[0], event[2]["job_id"], event[2]["state"]) == ("job", a["id"], "cancelled")
    reader.close()


@pytest.mark.parametrize("query, header, field", [
    ("?jobs=1", None, "jobs"),
    ("?after=-1", None, "after"),
    ("?after=1&after=2", None, "after"),
    ("?after=99999999999999999999", None, "after"),
    ("", "x1", "Last-Event-ID"),
    ("?state=done", None, "state"),
    ("?type=job&type=nothing", None, "type"),
    ("?label==v", None, "label"),
    ("?owner=-bad", None, "owner"),
    ("?job=", None, "job"),
])
def test_a_bad_query_is_refused_naming_it(twistd, query, header, field):
    """A wrong or unknown query parameter (or Last-Event-ID) is a 400
    invalid_query naming it."""
    daemon = twistd()
    reader = EventReader(daemon.url, daemon.token, query, last_event_id=header)
    assert reader.status == 400
    error = reader.error()["error"]
    assert (error["code"], error["field"]) == ("invalid_query", field)


def test_a_submitter_sees_its_own_jobs_events_alone(twistd):
    """A submitter's stream carries its own jobs' events, never another
    owner's (asked for by name or not) and no worker events."""
    daemon = twistd("[executor]\nslots = 0\n")
    tokens = {}
    for name in ("alice", "bob"):
        code, made = daemon.request("POST", "/v1/credentials",
                                    {"name": name, "role": "submitter"})
        assert code == 201
        tokens[name] = made["token"]
    live = EventReader(daemon.url, tokens["alice"])
    code, theirs = daemon.request("POST", "/v1/jobs", {"command": ["true"]},
                                  token=tokens["bob"])
    code, mine = daemon.request("POST", "/v1/jobs", {"command": ["true"]},
                                token=tokens["alice"])
    event = live.next()
    assert (event[2]["job_id"], event[2]["owner"]) == (mine["id"], "alice")
    live.close()
    for query in ("?after=0", "?after=0&owner=bob", f"?after=0&job={theirs['id']}",
                  "?after=0&type=worker"):
        reader = EventReader(daemon.url, tokens["alice"], query)
        got = events_until_quiet(reader)
        reader.close()
        assert {e[2]["owner"] for e in got} <= {"alice"}, query
        assert all(e[2]["job_id"] != theirs["id"] for e in got), query
    reader = EventReader(daemon.url, tokens["alice"], "?after=0")
    assert [e[2]["job_id"] for e in events_until_quiet(reader)] == [mine["id"]]
    reader.close()
    # The admin sees both.
    assert {e[2]["job_id"] for e in _all_stored(daemon)} == {mine["id"], theirs["id"]}


def test_a_subscriber_that_does_not_read_is_dropped(twistd):
    """A subscriber whose connection takes nothing falls behind; past
    [events] buffer events it gets a last dropped event naming the last id
    it was sent, the stream ends, and the daemon answers others at once
    meanwhile."""
    daemon = twistd("[executor]\nslots = 0\n[events]\nbuffer = 16\n")
    port = int(daemon.url.rsplit(":", 1)[1])
    sock = socket.socket()
    # A small window: the daemon's side fills soon.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 f"Authorization: Bearer {daemon.token}\r\n\r\n".encode())
    time.sleep(0.3)
    for _ in range(6):
        code, _ = daemon.request("POST", "/v1/jobs", {"command": ["true"], "array": 5000})
        assert code == 201
        started = time.monotonic()
        code, _ = daemon.request("GET", "/healthz", token="")
        assert code == 200 and time.monotonic() - started < 1.0
    # Now read what it was sent: events, then the dropped one, then the end.
    sock.settimeout(10)
    received = b""
    while True:
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        received += chunk
        if b"event: dropped" in received and received.endswith(b"0\r\n\r\n"):
            break
    sock.close()
    text = received.decode()
    assert "event: dropped" in text
    body = text.split("event: dropped", 1)
    last_ids = [int(line[4:]) for line in body[0].splitlines() if line.startswith("id: ")]
    dropped = json.loads(body[1].split("data: ", 1)[1].split("\n", 1)[0])
    assert dropped["reason"] == "too_far_behind"
    # The id it resumes after is the last one it was sent (the dropped
    # event's own id line says the same) ...
    assert dropped["id"] == last_ids[-1] == last_ids[-2]
    # ... and resuming from it gives the next, with nothing lost.
    reader = EventReader(daemon.url, daemon.token, last_event_id=dropped["id"])
    assert reader.next()[1] == dropped["id"] + 1
    reader.close()


def test_too_many_subscribers_are_refused(twistd):
    """Past [events] max_subscribers a new stream is a 503 with
    Retry-After; once one closes, there is room again."""
    daemon = twistd("[events]\nmax_subscribers = 2\n")
    first = EventReader(daemon.url, daemon.token)
    second = EventReader(daemon.url, daemon.token)
    third = EventReader(daemon.url, daemon.token)
    assert (first.status, second.status, third.status) == (200, 200, 503)
    assert third.response.getheader("retry-after") == "5"
    assert third.error()["error"]["code"] == "too_many_subscribers"
    first.close()
    for _ in range(100):
        again = EventReader(daemon.url, daemon.token)
        if again.status == 200:
            break
        again.close()
        time.sleep(0.05)
    assert again.status == 200
    again.close()
    second.close()


def test_workers_connecting_and_leaving_are_events(twistd, tmp_path, token_file):
    """A real `dispatcher worker` that starts is a worker event
    `connected`; stopped, it is `left` once it has not been heard from for
    a lease's life."""
    daemon = twistd(f"[executor]\nslots = 0\n[workers]\ntoken_file = {token_file}\n"
                    "lease_seconds = 2\n")
    reader = EventReader(daemon.url, daemon.token, "?type=worker")
    worker = WorkerProcess(tmp_path, daemon.url, token_file, slots=1, name="w-events")
    worker.start()
    try:
        kind, event_id, data = reader.next()
        assert (kind, data["worker"], data["change"]) == ("worker", "w-events", "connected")
        assert data["id"] == event_id
        assert worker.stop() == 0
        kind, left_id, data = reader.next()
        assert (kind, data["worker"], data["change"]) == ("worker", "w-events", "left")
        assert left_id > event_id
    finally:
        worker.kill()
        reader.close()


# With a Clock for time


async def _stream(daemon, query=""):
    """Open a stream on an embedded daemon; its chunks go to the list
    returned."""
    chunks = []
    response = await daemon.client.get(
        daemon.url + "/v1/events" + query,
        headers={"Authorization": [f"Bearer {daemon.token}"]},
        unbuffered=True,
    )
    assert response.code == 200
    done = treq.collect(response, chunks.append)
    return chunks, response, done


async def _wait_for(chunks, text, timeout=5.0):
    waited = 0.0
    while text not in b"".join(chunks).decode():
        assert waited < timeout, b"".join(chunks)
        await sleep(0.01)
        waited += 0.01


@pytest_twisted.ensureDeferred
async def test_an_idle_stream_gets_a_keep_alive_every_heartbeat(make_daemon):
    """An idle stream gets ': keep-alive' once a heartbeat has passed with
    nothing sent, and not before."""
    clock = Clock()
    daemon = await make_daemon("[executor]\nslots = 0\n[events]\nheartbeat = 15\n",
                               clock=clock)
    chunks, response, done = await _stream(daemon)
    await _wait_for(chunks, ": events")
    clock.advance(14.9)
    await sleep(0.05)
    assert b"keep-alive" not in b"".join(chunks)
    clock.advance(0.2)
    await _wait_for(chunks, ": keep-alive")
    count = b"".join(chunks).count(b"keep-alive")
    clock.advance(15.0)
    await _wait_for(chunks, ": keep-alive\n\n: keep-alive")
    assert b"".join(chunks).count(b"keep-alive") == count + 1
    daemon.service.api.events.stop()
    await done


@pytest_twisted.ensureDeferred
async def test_old_events_are_removed_and_a_too_old_after_gets_reset(make_daemon):
    """Retention removes events older than [events] retention (never the
    newest); a stream resuming after an id older than what is kept gets a
    reset naming the oldest kept, then the events kept."""
    clock = Clock()
    clock.advance(1_000_000)
    daemon = await make_daemon("[executor]\nslots = 0\n[events]\nretention = 60\n",
                               clock=clock)
    first = [await daemon.submit({"command": ["true"]}) for _ in range(3)]
    clock.advance(61)
    later = await daemon.submit({"command": ["true"]})
    # (The clock's move started a pass already, before the later job: the
    # first call waits for its end, the second runs one of its own.)
    await daemon.service.dispatcher.retention.run_pass()
    await daemon.service.dispatcher.retention.run_pass()
    page = await daemon.service.store.read_events(0, 100)
    assert [e.job_id for e in page.events] == [later["id"]], page
    assert (page.oldest, page.newest) == (4, 4)
    chunks, response, done = await _stream(daemon, "?after=1")
    await _wait_for(chunks, "id: 4")
    text = b"".join(chunks).decode()
    assert 'event: reset\ndata: {"oldest":4}' in text
    assert text.index("event: reset") < text.index("id: 4")
    assert all(job["id"] not in text for job in first)
    # After the newest kept: no reset.
    more, response2, done2 = await _stream(daemon, "?after=4")
    await _wait_for(more, ": events")
    await sleep(0.1)
    assert b"reset" not in b"".join(more)
    daemon.service.api.events.stop()
    await done
    await done2


@pytest_twisted.ensureDeferred
async def test_the_newest_event_is_never_removed(tmp_path):
    """However old, the newest event stays: the next id counts from it, so
    ids never go back."""
    store = SQLiteJobStore(str(tmp_path / "s.db"), reactor)
    await store.open()
    try:
        await store.submit([spec(1), spec(2)], 1.0, ["a", "b"])
        written = await store.remove_events(1000.0, 100)
        assert (written.value.removed, written.value.done) == (1, True)
        await store.submit([spec(3)], 2.0, ["c"])
        page = await store.read_events(0, 100)
        assert [(e.id, e.job_id) for e in page.events] == [(2, "b"), (3, "c")]
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_every_kind_of_change_is_an_event_with_what_changed(tmp_path):
    """A cancel, a retry and a failure are each an event in the same
    commit as the change, with the state left, the attempt, the exit code
    and the error; what is published live is what is stored."""
    from dispatcher.model._jobs import Offer, Outcome
    store = SQLiteJobStore(str(tmp_path / "s.db"), reactor)
    live = []
    store.follow_events(live.extend)
    await store.open()
    try:
        await store.submit([spec(1), spec(2)], 1.0, ["a", "b"], owner="alice")
        await store.cancel("a", 2.0)
        await store.retry("a", 3.0, False)
        claimed = await store.claim(Offer("h", 4), 4, 4.0, 30.0)
        for lease in claimed.leases:
            await store.finish(lease, Outcome(JobState.FAILED, exit_code=3, error="no"), 5.0)
        page = await store.read_events(0, 100)

        def shown(e):
            return (e.id, e.at, e.job_id, e.state, e.previous, e.attempt, e.exit_code,
                    e.error, e.owner, e.spec.name, e.spec.queue, dict(e.spec.labels),
                    e.spec.array_id)

        assert [shown(e) for e in page.events] == [shown(e) for e in live]
        seen = [(e.job_id, e.state.value, e.previous and e.previous.value, e.attempt,
                 e.exit_code, e.error) for e in live]
        assert seen == [
            ("a", "queued", None, None, None, None),
            ("b", "queued", None, None, None, None),
            ("a", "cancelled", "queued", None, None, "cancelled before it ran"),
            ("a", "queued", "cancelled", None, None, None),
            ("a", "running", "queued", 1, None, None),
            ("b", "running", "queued", 1, None, None),
            ("a", "failed", "running", 1, 3, "no"),
            ("b", "failed", "running", 1, 3, "no"),
        ]
        assert [e.id for e in live] == list(range(1, 9))
        assert {e.owner for e in live} == {"alice"}
        assert all(isinstance(e, JobEvent) for e in live)
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_a_stream_after_the_greatest_id_a_client_may_name_is_reset(make_daemon):
    """A stream resuming after the greatest id the API takes (2**63 - 1,
    past anything stored) gets a reset to what is kept and goes on live:
    the store's read of the events after it is no error."""
    daemon = await make_daemon("[executor]\nslots = 0\n")
    await daemon.submit({"command": ["true"]})
    chunks, response, done = await _stream(daemon, f"?after={2**63 - 1}")
    await _wait_for(chunks, "event: reset")
    later = await daemon.submit({"command": ["true"]})
    await _wait_for(chunks, later["id"])
    daemon.service.api.events.stop()
    await done
